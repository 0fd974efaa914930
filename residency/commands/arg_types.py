"""argparse `type=` callables for every numeric option: ASCII digits only, finite, inside a stated range.

A bad value ends in argparse's usage error (exit 2) naming the option and the value; nothing downstream
sees NaN, inf, a superscript digit or a 400-digit number.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from residency.errors import ResidencyError

# Python's int() and float() accept '١٢', '1_000', ' nan ', 'infinity': only plain ASCII numbers pass here.
_INT_RE = re.compile(r"\+?[0-9]{1,30}")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MIN_VRAM_BYTES = 2**20  # below 1 MiB no block of any model fits; 0.5 would otherwise round to 0 bytes


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """A whole number from `low` to `high` inclusive; `what` says what it counts ("latent frames")."""

    def parse(text: str) -> int:
        if not _INT_RE.fullmatch(text.strip()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number of {what} from {low} to {high}, "
                                             f"got {_show(text)}")
        return int(text)

    parse.__name__ = f"whole number of {what}"
    return parse


def bounded_float(low: float, high: float, what: str) -> Callable[[str], float]:
    """A finite number greater than `low` and at most `high`; `what` names its unit ("frames per second")."""

    def parse(text: str) -> float:
        value = float(text) if _FLOAT_RE.fullmatch(text.strip()) else math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"must be a number of {what} above {low:g} and at most {high:g}, "
                                             f"got {_show(text)}")
        return value

    parse.__name__ = f"number of {what}"
    return parse


def seed(text: str) -> int:
    """A session noise seed: 0 to 2**64 - 1, what torch's generator accepts."""
    if not _INT_RE.fullmatch(text.strip()) or int(text) > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_MAX} (2**64 - 1), "
                                         f"got {_show(text)}")
    return int(text)


def vram_size(text: str) -> int:
    """A device memory size such as 6GiB or 512MiB, of at least 1 MiB (see residency.units.parse_size)."""
    from residency.units import parse_size

    try:
        return parse_size(text, "the size", min_bytes=MIN_VRAM_BYTES)
    except ResidencyError as e:  # argparse reports only its own error type as a usage error
        raise argparse.ArgumentTypeError(f"{e.message} ({e.hint})" if e.hint else e.message) from None


vram_size.__name__ = "size"
_DEVICE_RE = re.compile(r"\s*(cpu|cuda(:[0-9]{1,4})?)\s*", re.IGNORECASE)


def device(text: str) -> str:
    """cpu, cuda or cuda:N (ASCII digits: 'cuda:²' passes str.isdigit and then breaks int())."""
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {_show(text)}: use cpu, cuda or cuda:N "
                                         "(ROCm GPUs are cuda:N too)")
    return text.strip().lower()


device.__name__ = "device"
FPS = bounded_float(0.01, 1000.0, "frames per second")
FRAME_MS = bounded_float(0.0, 3_600_000.0, "milliseconds")
SPEED = bounded_float(0.0, 1000.0, "times the recorded speed")
