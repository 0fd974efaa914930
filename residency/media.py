"""Images in and videos out: a start image read to the model's size, rollouts written as GIF or PNGs.

Pillow does the codecs. A GIF is written to a temp file and renamed; a PNG sequence is written whole
into a temp directory beside it and then renamed into place, and never mixes with an older sequence.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from residency import userpath
from residency.atomic_file import atomic_output, check_can_create
from residency.errors import ResidencyError, UsageError
from residency.units import plural

FRAME_FORMATS = (".gif", ".png")
IMAGE_HINT = "give a PNG or JPEG file at the model's size"
MAX_GIF_FRAME_MS = 655_350  # GIF stores a frame's delay in 1/100 s in 16 bits
# Browsers and most viewers play a delay under 2/100 s as 1/10 s: a 60 fps GIF (its 17 ms stored as 1/100 s) played at
# 10 fps. 50 fps is the fastest a GIF plays as written.
MIN_GIF_FRAME_MS = 20


def gif_frame_ms(fps: float) -> int:
    """A GIF frame's delay for `fps`, as the format stores it: whole 1/100 s, at least MIN_GIF_FRAME_MS."""
    return min(MAX_GIF_FRAME_MS, max(MIN_GIF_FRAME_MS, 10 * round(100 / fps)))


# --- the start image ---------------------------------------------------------------------------------------
def max_image_file_bytes(height: int, width: int) -> int:
    """Largest start-image file read: 16 MiB, or two uncompressed RGBA copies of a large model's frame."""
    return max(16 * 2**20, 8 * height * width)


def read_image(path: str | os.PathLike[str], height: int, width: int) -> np.ndarray:
    """HxWx3 uint8 of the image at `path`; a size other than the model's is an error (no resize).

    The declared size is checked before any pixel is decoded, so a PNG that claims 100000x100000
    costs its header, not gigabytes; a FIFO or a directory is refused without being opened.
    """
    from PIL import Image, UnidentifiedImageError

    data = userpath.read_file_bytes(path, "the start image", IMAGE_HINT, max_image_file_bytes(height, width))
    name = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 M pixels; the size check below refuses such an image before decoding it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                declared = img.size
                if declared != (width, height):
                    raise _wrong_size(name, declared, height, width)
                rgb = _rgb8(img)
    except ResidencyError:
        raise
    except UnidentifiedImageError:
        raise ResidencyError(f"{name}: not a readable image (no image format Pillow knows)",
                             hint=IMAGE_HINT) from None
    except Image.DecompressionBombError:
        raise ResidencyError(f"{name}: the image declares more pixels than Pillow will decode "
                             f"(a decompression bomb?); the model takes {width}x{height}", hint=IMAGE_HINT) from None
    except Exception as e:  # a damaged file fails inside any of Pillow's decoders, with any exception type
        raise ResidencyError(f"{name}: not a readable image ({type(e).__name__}: {str(e)[:200]})",
                             hint=IMAGE_HINT) from None
    if rgb.shape != (height, width, 3):  # a decoder that changed its mind about the size (ICO, MPO frames)
        raise _wrong_size(name, (rgb.shape[1], rgb.shape[0]), height, width)
    return np.ascontiguousarray(rgb)


def _rgb8(img) -> np.ndarray:
    """HxWx3 uint8 of a Pillow image, as a writable copy (torch.from_numpy warns on read-only arrays). A 16-bit
    greyscale image (modes I;16*, and I, as Pillow opens a 16-bit PNG) is scaled from 0..65535: convert("RGB")
    clipped it at 255, and a mid-grey start image came out white; a float one (mode F, a TIFF) from 0..1, unless its
    values pass 1 (then 0..255): converted, a 0..1 image came out black."""
    if img.mode.startswith("I") or img.mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        if img.mode == "F":  # floats: 0..1 as most tools write them, else taken as 0..255
            scale = 255.0 if grey.size and grey.max() <= 1.0 else 1.0
        else:
            scale = 1 / 257.0
        grey = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"))


def _wrong_size(name: str, size: tuple[int, int], height: int, width: int) -> ResidencyError:
    return ResidencyError(
        f"{name}: image is {size[0]}x{size[1]}, the model takes {width}x{height} (width x height)",
        hint=f"resize or crop it to {width}x{height} first; residency does not pick a crop for you")


# --- checks before any work --------------------------------------------------------------------------------
def check_writable_target(path: str | os.PathLike[str], suffix: str | None = None,
                          example: str = "out.json") -> Path:
    """A file about to be replaced by a rename: missing or a regular file, in an existing writable directory;
    with `suffix` (".json"), named so (a plan written over start.png lost the image). A name ending in "/"
    is a directory's, even where none exists (Path would drop the slash and write a file of that name)."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        raise ResidencyError(f"{text[:200]}: ends with '/', a directory's name, and a file is written here",
                             hint=f"name the file, e.g. {text}{example}")
    path = Path(path)
    kind, reason = userpath.path_kind(path)
    if kind in (userpath.DIRECTORY, userpath.OTHER, userpath.BAD):
        raise ResidencyError(f"{path}: cannot write here ({reason or 'a directory is in the way'})",
                             hint="pick another file name")
    if suffix is not None and path.suffix.lower() != suffix:  # a usage mistake (exit 2), as run -o out.jpg is
        raise UsageError(f"{text[:200]}: this file is {suffix[1:].upper()}, and the name ends in "
                             f"{path.suffix or 'no extension'}", hint=f"name it *{suffix}, e.g. {example}")
    parent = path.parent
    if userpath.path_kind(parent)[0] != userpath.DIRECTORY:
        why, creatable = userpath.not_a_directory(parent)
        raise ResidencyError(f"{path}: {why}", hint="create it first, or pick another path" if creatable
                             else "pick another path")
    check_can_create(path)  # a read-only filesystem or a permission fails now, not after the work
    return path


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate before any work is done: a known extension, a writable directory, and for numbered PNGs
    no frames of an earlier sequence with the same name (they would mix with the new ones)."""
    if os.fspath(path).endswith(("/", os.sep)) or userpath.path_kind(Path(path))[0] == userpath.DIRECTORY:
        what = "is a directory" if userpath.path_kind(Path(path))[0] == userpath.DIRECTORY else (
            "ends with '/', a directory's name")
        raise ResidencyError(f"{path}: {what}; frames are written to a file",
                             hint=f"name a file in it, e.g. {Path(path) / 'out.gif'}")
    path = Path(path)
    if path.suffix.lower() not in FRAME_FORMATS:
        raise UsageError(f"{path}: cannot write {path.suffix or 'files without an extension'}",
                             hint="use .gif for an animation or .png for numbered frames (out.png -> out-0000.png …)")
    check_writable_target(path)
    if path.suffix.lower() == ".png":
        _remove_abandoned_sequences(path)
        _refuse_earlier_sequence(path)
    return path


def sequence_names(path: Path, count: int) -> list[str]:
    """stem-0000.png …: four digits, more when the sequence needs them (every name of one sequence as wide)."""
    digits = max(4, len(str(count - 1)))
    return [f"{path.stem}-{i:0{digits}d}.png" for i in range(count)]


def _earlier_frames(path: Path) -> list[str]:
    pattern = re.compile(re.escape(path.stem) + r"-[0-9]{4,}\.png")
    try:
        with os.scandir(path.parent) as entries:
            return sorted(e.name for e in entries if pattern.fullmatch(e.name))
    except OSError as e:
        raise ResidencyError(f"{path}: cannot list directory {path.parent} to check for an earlier sequence "
                             f"({e.strerror or e})", hint="pick a directory you can read and write") from None


def _refuse_earlier_sequence(path: Path) -> None:
    # Refused rather than deleted: numbered files of that name may not be ours, and deleting them after
    # writing the new sequence would leave a mix if the run were killed in between.
    found = _earlier_frames(path)
    if found:
        span = found[0] if len(found) == 1 else f"{found[0]} … {found[-1]}"
        # no `rm` pattern in the hint: one of those files may be this run's own input (--image start-0000.png)
        raise ResidencyError(
            f"{path.parent / found[0]}: {plural(len(found), 'numbered frame')} of an earlier {path.name} sequence "
            f"{'is' if len(found) == 1 else 'are'} there; a new sequence does not mix with them",
            hint=f"pick another output name, or move {span} out of {path.parent} first")


# A sequence being written lives in .NAME.frames-HOST-PID-<random>.tmp until it is complete.
def _temp_prefix(path: Path) -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]
    return f".{path.name}.frames-{host}-{os.getpid()}-"


def _remove_abandoned_sequences(path: Path) -> None:
    """Delete the temp directories that a killed run of this host left for this name (its pid is gone)."""
    host_prefix = _temp_prefix(path).rsplit("-", 2)[0] + "-"
    pattern = re.compile(re.escape(host_prefix) + r"([0-9]+)-[A-Za-z0-9_]+\.tmp")
    try:
        with os.scandir(path.parent) as entries:
            abandoned = [e.path for e in entries if (m := pattern.fullmatch(e.name))
                         and not _alive(int(m.group(1))) and e.is_dir(follow_symlinks=False)]
    except OSError:  # an unreadable directory is reported by the check for an earlier sequence
        return
    for directory in abandoned:
        shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid no process can have
        return True
    return True


# --- writing -----------------------------------------------------------------------------------------------
def write_frames(frames: Sequence[np.ndarray], path: str | os.PathLike[str], fps: float) -> list[Path]:
    """Write HxWx3 uint8 frames as one GIF, or as numbered PNGs (stem-0000.png …); returns the files."""
    from PIL import Image

    path = check_output_path(path)
    if not len(frames):
        raise ResidencyError("no frames to write", hint="ask for at least one frame")
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        with atomic_output(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=gif_frame_ms(fps), loop=0)
        return [path]
    return _write_sequence(frames, path)


def _write_sequence(frames: Sequence[np.ndarray], path: Path) -> list[Path]:
    """Every PNG into a temp directory beside `path`, then renamed into place: a run killed while encoding
    leaves no frame (its temp directory is removed by the next write of that name)."""
    from PIL import Image

    names = sequence_names(path, len(frames))
    try:
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise ResidencyError(f"{path}: cannot create a temporary directory beside it ({e.strerror or e})",
                             hint="check the directory is writable and has free space") from None
    try:
        for name, frame in zip(names, frames, strict=True):
            with open(staging / name, "wb") as f:
                Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())  # the renames below must not publish frames that a power cut loses
            os.chmod(staging / name, 0o644)
        _refuse_earlier_sequence(path)  # again: another program may have written some while we encoded
        for name in names:  # renames only: microseconds per frame
            os.rename(staging / name, path.parent / name)
        _fsync_directory(path.parent)
    except OSError as e:
        raise ResidencyError(f"{path}: writing the frames failed ({e.strerror or e})",
                             hint="check free disk space and permissions") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path.parent / name for name in names]


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system allows it; the renames are still atomic
        pass
    finally:
        os.close(fd)
