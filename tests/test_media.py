"""Start images read safely, and PNG sequences that appear whole or not at all and never mix."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from residency.cli import main
from residency.errors import ResidencyError
from residency.media import read_image, sequence_names, write_frames

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(h: int = 64, w: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (and a valid CRC, so Pillow believes it)."""
    ihdr = png[12:29]  # b"IHDR" + 13 bytes of fields
    fields = struct.pack(">II", width, height) + ihdr[12:]
    return png[:16] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields)) + png[33:]


# --- the start image ---------------------------------------------------------------------------------------
def test_a_start_image_of_the_model_size_reads_as_rgb(tmp_path):
    (tmp_path / "s.png").write_bytes(png_bytes())
    rgb = read_image(tmp_path / "s.png", 64, 64)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable


def test_a_16_bit_greyscale_start_image_is_scaled_not_clipped(tmp_path):
    """convert("RGB") clipped 16-bit values at 255: a mid-grey image (20000 of 65535) read as white."""
    grey = np.random.default_rng(1).integers(0, 65536, (64, 64)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png", 64, 64)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(grey / 257.0).astype(np.uint8)
    assert all(np.array_equal(rgb[:, :, c], expected) for c in range(3))


def test_a_float_greyscale_start_image_is_scaled_from_0_to_1(tmp_path):
    """convert("RGB") of a 0..1 float image (mode F, a TIFF) gave black."""
    grey = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    Image.fromarray(grey, mode="F").save(tmp_path / "f.tiff")
    rgb = read_image(tmp_path / "f.tiff", 64, 64)
    assert np.array_equal(rgb[:, :, 0], np.rint(grey.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, "more pixels than Pillow will decode"),  # Pillow's bomb error, converted
    (10_000, 10_000, "image is 10000x10000"),  # Pillow only warns; the size check refuses before decoding
])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, width, height, message):
    (tmp_path / "bomb.png").write_bytes(with_declared_size(png_bytes(), width, height))
    t0 = time.perf_counter()
    with pytest.raises(ResidencyError, match=message):
        read_image(tmp_path / "bomb.png", 64, 64)
    assert time.perf_counter() - t0 < 1.0


def test_a_fifo_or_a_directory_as_start_image_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(ResidencyError, match="not a regular file"):
        read_image(tmp_path / "fifo.png", 64, 64)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ResidencyError, match="a directory"):
        read_image(tmp_path / "dir.png", 64, 64)


def test_a_truncated_png_is_not_a_readable_image(tmp_path):
    (tmp_path / "cut.png").write_bytes(png_bytes()[:120])
    with pytest.raises(ResidencyError, match="not a readable image"):
        read_image(tmp_path / "cut.png", 64, 64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_mutated_png_reads_as_the_model_size_or_fails_cleanly(tmp_path, edits):
    data = bytearray(png_bytes())
    for offset, value in edits:
        data[offset % len(data)] = value
    (tmp_path / "m.png").write_bytes(bytes(data))
    try:
        rgb = read_image(tmp_path / "m.png", 64, 64)
    except ResidencyError as e:
        assert e.hint
        return
    assert rgb.shape == (64, 64, 3)


@pytest.mark.parametrize("argv, message", [
    (["run", "tiny", "--image", "x" * 300 + ".png", "-o", "o.gif"], "name is too long"),
    (["run", "x" * 300, "--image", "s.png", "-o", "o.gif"], "name is too long"),
    (["run", "tiny", "--image", "s.png", "-o", "x" * 300 + ".gif"], "name is too long"),
    (["run", "tiny", "--image", "s.png", "-o", "o.gif", "--trace", "x" * 300 + ".json"], "name is too long"),
    (["run", "tiny", "--image", "s.png", "-o", "adir.gif"], "is a directory"),
    (["demo", "-o", "x" * 300], "name is too long"),
])
def test_unusable_paths_are_errors_not_tracebacks(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.png").write_bytes(png_bytes())
    (tmp_path / "adir.gif").mkdir()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "hint: " in err and "Traceback" not in err


def test_a_fifo_given_as_the_model_is_refused_without_blocking(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "model.safetensors")
    assert main(["run", "model.safetensors", "-o", "o.gif"]) == 1
    assert "not a regular file" in capsys.readouterr().err


# --- PNG sequences -----------------------------------------------------------------------------------------
def frames(n: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), i, np.uint8) for i in range(n)]


def test_a_sequence_is_written_under_numbered_names_and_no_temp_directory_stays(tmp_path):
    written = write_frames(frames(3), tmp_path / "f.png", 15.0)
    assert [p.name for p in written] == ["f-0000.png", "f-0001.png", "f-0002.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f-0000.png", "f-0001.png", "f-0002.png"]
    with Image.open(written[2]) as img:
        assert np.array(img)[0, 0, 0] == 2


def test_every_name_of_a_long_sequence_has_the_same_width():
    names = sequence_names(Path("f.png"), 10_001)
    assert names[0] == "f-00000.png" and names[-1] == "f-10000.png"
    assert sequence_names(Path("f.png"), 10_000)[-1] == "f-9999.png"


def test_a_new_sequence_never_mixes_with_frames_of_an_earlier_one(tmp_path, capsys):
    write_frames(frames(4), tmp_path / "f.png", 15.0)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ResidencyError, match="earlier f.png sequence") as err:
        write_frames(frames(2), tmp_path / "f.png", 15.0)
    assert "pick another output name" in err.value.hint and "rm " not in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    write_frames(frames(2), tmp_path / "g.png", 15.0)  # another name is another sequence


def test_run_refuses_earlier_frames_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f-0003.png").write_bytes(b"old")
    assert main(["run", "no-such-model", "-o", "f.png"]) == 1  # refused before the model is even looked up
    assert "earlier f.png sequence" in capsys.readouterr().err


def test_a_temp_directory_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from residency.media import _temp_prefix

    prefix = _temp_prefix(tmp_path / "f.png")
    abandoned = tmp_path / (prefix.rsplit("-", 2)[0] + f"-{pid}-abc123.tmp")
    ours = tmp_path / (prefix + "live99.tmp")  # this process is alive: its directory is not touched
    for d in (abandoned, ours):
        d.mkdir()
        (d / "f-0000.png").write_bytes(b"partial")
    write_frames(frames(1), tmp_path / "f.png", 15.0)
    assert not abandoned.exists() and ours.is_dir()


KILLED_WRITER = """
import sys, time, numpy as np
from PIL import Image
from residency.media import write_frames
real_save = Image.Image.save
def slow_save(self, fp, *a, **k):
    real_save(self, fp, *a, **k)
    time.sleep(0.05)
Image.Image.save = slow_save
write_frames([np.zeros((8, 8, 3), np.uint8)] * 200, sys.argv[1], 15.0)
"""


def test_a_writer_killed_mid_sequence_leaves_no_frames_and_the_next_run_writes_them_all(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "f.png")], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(len(list(d.iterdir())) >= 3 for d in tmp_path.iterdir()
                                                      if d.is_dir()):
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("f-")]  # no frame was published
    written = write_frames(frames(5), tmp_path / "f.png", 15.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]  # the temp dir is gone


@pytest.mark.parametrize("fps, delay_ms", [(15.0, 70), (60.0, 20), (50.0, 20), (10.0, 100), (0.001, 655_350)])
def test_a_gif_frame_delay_is_whole_hundredths_and_never_under_two(tmp_path, fps, delay_ms):
    """At --fps 60 the 17 ms delay was stored as 1/100 s, which viewers play at 10 fps."""
    frames = [np.full((4, 4, 3), v, dtype=np.uint8) for v in (0, 255)]
    (gif,) = write_frames(frames, tmp_path / "o.gif", fps)
    with Image.open(gif) as img:
        assert img.info["duration"] == delay_ms
