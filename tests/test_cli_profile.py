"""`residency profile` and `residency profiles` through the CLI entry point."""

from __future__ import annotations

import json
import re

import pytest
import torch

from residency.cli import main
from residency.device import PROVENANCE_KINDS, load_profile, shipped_profile_names
from residency.device.profile_io import PROVENANCE_FIELDS


def test_quick_cpu_profile_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "cpu.json"
    assert main(["profile", "--device", "cpu", "--quick", "-o", str(out)]) == 0
    assert torch.get_num_threads() == threads  # measurement restores torch's thread count
    profile = load_profile(out)
    assert profile.backend == "cpu"
    assert 1 <= profile.compute_threads
    assert 0 < profile.memory_usable_bytes < profile.memory_total_bytes
    assert set(PROVENANCE_FIELDS) <= set(profile.provenance)
    assert all(p.kind == "measured" and p.source.startswith("residency profile --device cpu --quick")
               for p in profile.provenance.values())
    assert all(len(c.spread) == len(c.x) for c in (*profile.link.values(), *profile.matmul_tflops.values()))
    # the CPU refinements: a small-weight curve for every compute dtype and an elementwise rate
    assert 0 < profile.matmul_small_weight_dim < profile.matmul_weight_dim
    assert set(profile.matmul_small_tflops) == set(profile.matmul_tflops)  # every compute dtype
    assert min(profile.elementwise_gelems_per_s.y) > 0 and profile.launch_overhead_us > 0
    shown = capsys.readouterr().out
    assert str(out) in shown
    # the table shows the figures the CPU cost model reads beyond matmul: attention, convs and the re-warm
    assert profile.attention_tflops and "attention fp32" in shown
    assert profile.conv_tflops and "conv fp32" in shown
    assert profile.matmul_rewarm_us is not None and "re-warm" in shown
    # every format's unpack by tensor size, sizes strictly growing, and the table's middle sample of it
    assert set(profile.dequant_tensor_gweights_per_s) == set(profile.dequant_gweights_per_s)
    q8 = profile.dequant_tensor_gweights_per_s["Q8_0"]
    assert len(q8.x) >= 3 and all(a < b for a, b in zip(q8.x, q8.x[1:], strict=False)) and min(q8.y) > 0
    flat = re.sub(r"[\s│]+", " ", shown)  # the value column wraps at the test console's 80 characters
    assert "µs/call" in flat and "-weight tensor" in flat
    # and the unpack from a slot just filled, against one from DRAM: never slower
    assert set(profile.dequant_fresh_factor) == set(profile.dequant_gweights_per_s)
    assert all(0.2 <= f <= 1.0 for f in profile.dequant_fresh_factor.values()) and "fresh slot ×" in flat


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_profile_cuda_without_gpu_exits_1_with_hint(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["profile", "--device", "cuda:0", "--quick", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot measure cuda:0") and "hint:" in err  # no blank progress line above it
    assert not out.exists()


def test_profile_into_missing_directory_exits_1_before_measuring(tmp_path, capsys):
    out = tmp_path / "missing" / "p.json"
    assert main(["profile", "--device", "cpu", "--quick", "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.parent.exists()


def test_profile_onto_a_read_only_filesystem_exits_1_before_measuring(tmp_path, capsys, monkeypatch):
    import residency.atomic_file as atomic_file

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic_file.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("residency.commands.profile_cmd.measure_profile",
                        lambda *a, **k: pytest.fail("measured before checking -o"))
    assert main(["profile", "--device", "cpu", "--quick", "-o", str(tmp_path / "p.json")]) == 1
    assert "(Read-only file system)" in capsys.readouterr().err


def test_profile_unknown_device_is_a_usage_error(capsys):
    assert main(["profile", "--device", "tpu", "--quick"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_profiles_json_lists_every_shipped_profile(capsys):
    assert main(["profiles", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["profiles"]
    assert [r["name"] for r in rows] == shipped_profile_names()
    assert all(r["link_h2d_pinned_gbps_at_64mib"] > 0 and r["device_memory_gbps"] > 0 for r in rows)
    assert all(set(r["provenance"]) <= set(PROVENANCE_KINDS) for r in rows)


def test_profiles_table_names_each_profile(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name[:8] in out for name in shipped_profile_names())


@pytest.mark.parametrize("name,message,code", [("out/", "ends with '/', a directory's name", 1),
                                               ("profile.txt", "the name ends in .txt", 2)])
def test_profile_to_a_name_that_is_no_json_file_exits_before_measuring(tmp_path, capsys, monkeypatch, name,
                                                                       message, code):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--device", "cpu", "--quick", "-o", name]) == code
    err = capsys.readouterr().err
    assert message in err and "hint:" in err
    assert list(tmp_path.iterdir()) == []


def test_a_stray_file_in_the_shipped_folder_is_skipped_with_a_note_not_the_listings_failure(tmp_path, capsys,
                                                                                             monkeypatch):
    # `plan -o profiles/new.json` is allowed; `profiles` then exited 1 with no table
    import shutil

    from residency.device import profile_io

    name = shipped_profile_names()[0]
    shutil.copy(profile_io.profile_path(name), tmp_path / f"{name}.json")
    (tmp_path / "new.json").write_text('{"schema_version": 2, "model": "tiny"}')
    monkeypatch.setattr(profile_io, "profiles_dir", lambda: tmp_path)
    monkeypatch.setattr(profile_io, "shipped_profile_paths", lambda: sorted(tmp_path.glob("*.json")))
    assert main(["profiles", "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["name"] for r in json.loads(captured.out)["profiles"]] == [name]
    assert "note: skipped new:" in captured.err
