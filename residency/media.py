"""Images in and videos out: a start image read to the model's size, rollouts written as GIF or PNGs.

Pillow does the codecs; every write goes to a temp file first and is renamed, so no partial output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from residency.errors import ResidencyError

FRAME_FORMATS = (".gif", ".png")


def read_image(path: str | os.PathLike[str], height: int, width: int) -> np.ndarray:
    """HxWx3 uint8 of the image at `path`; a size other than the model's is an error (no resize)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = np.array(img.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except FileNotFoundError:
        raise ResidencyError(f"{path}: no such image", hint="give the path of a PNG or JPEG start image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ResidencyError(f"{path}: not a readable image ({e})", hint="give a PNG or JPEG file") from None
    if rgb.shape[:2] != (height, width):
        raise ResidencyError(
            f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, the model takes {width}x{height} (width x height)",
            hint=f"resize or crop it to {width}x{height} first; residency does not pick a crop for you")
    return np.ascontiguousarray(rgb)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate before any work is done: a known extension and a writable, existing directory."""
    path = Path(path)
    if path.suffix.lower() not in FRAME_FORMATS:
        raise ResidencyError(f"{path}: cannot write {path.suffix or 'files without an extension'}",
                             hint="use .gif for an animation or .png for numbered frames (out.png -> out-0000.png …)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ResidencyError(f"{path}: directory {parent} does not exist", hint="create it first, or pick another path")
    if not os.access(parent, os.W_OK):
        raise ResidencyError(f"{path}: directory {parent} is not writable", hint="pick a writable directory")
    return path


def write_frames(frames: Sequence[np.ndarray], path: str | os.PathLike[str], fps: float) -> list[Path]:
    """Write HxWx3 uint8 frames as one GIF, or as numbered PNGs (stem-0000.png …); returns the files."""
    from PIL import Image

    from residency.checkpoint.atomic import atomic_output

    path = check_output_path(path)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    if not images:
        raise ResidencyError("no frames to write", hint="ask for at least one frame")
    if path.suffix.lower() == ".gif":
        with atomic_output(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=max(1, round(1000 / fps)), loop=0)
        return [path]
    out = []
    for i, img in enumerate(images):
        target = path.with_name(f"{path.stem}-{i:04d}.png")
        with atomic_output(target) as tmp:
            img.save(tmp, format="PNG")
        out.append(target)
    return out
