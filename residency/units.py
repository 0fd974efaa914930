"""Parsing and printing of byte sizes and times, with units spelled the way users type them.

`6GiB`, `6GB`, `6000MB`, `512MiB`, `1.5G` (binary when the unit says so, decimal otherwise).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from residency.errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    # beyond any memory (MAX_SIZE_BYTES refuses most), read so that "5PiB" is told too large, not unreadable
    "PB": 10**15,
    "EB": 10**18,
    "PIB": 2**50,
    "EIB": 2**60,
    # A bare K/M/G means binary, as memory is sized in powers of two.
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
    "P": 2**50,
    "E": 2**60,
}
# ASCII digits only: str.isdigit and float() accept other scripts ('٦GiB'); Decimal reads any length exactly.
# An exponent ("1e3MiB") of at most 4 digits: Decimal then stays far inside its context (a "1e999999999" overflowed it).
_BITS = {"K": "kilo", "M": "mega", "G": "giga", "T": "tera", "P": "peta", "E": "exa"}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]{1,4})?)\s*([a-zA-Z]{0,3})\s*", re.ASCII)
MAX_SIZE_BYTES = 2**60  # 1 EiB: larger than any memory; beyond it a size is a typo


def parse_size(text: str, what: str = "size", min_bytes: int = 1) -> int:
    """Bytes in `text`, from `min_bytes` to MAX_SIZE_BYTES; raises UsageError naming `what` and the value.

    Exact (decimal arithmetic, rounded down to whole bytes): "1.5G" is 1610612736, not a float's guess.
    """
    text = str(text)
    shown = repr(text if len(text) <= 40 else text[:40] + "…")
    m = _SIZE_RE.fullmatch(text) if len(text) <= 1000 else None
    unit = m.group(2).upper() if m else None
    if m is None and text.strip().startswith("-") and _SIZE_RE.fullmatch(text.strip()[1:]):
        raise UsageError(f"{what} must be positive, got {shown}", hint="e.g. 6GiB or 512MiB")
    if m is None or unit not in _UNITS:
        raise UsageError(f"cannot read {what} {shown}",
                         hint="write a number with a unit, e.g. 6GiB, 6GB, 6000MB or 512MiB")
    written = m.group(2)
    if len(written) == 2 and written[0].isupper() and written[1] == "b":  # "6Gb": gigabits, as network speeds are
        raise UsageError(f"cannot read {what} {shown}: {written} is {_BITS.get(written[0], '')}bits",
                         hint=f"bytes are a capital B: {m.group(1)}{written[0]}B or {m.group(1)}{written[0]}iB")
    value = Decimal(m.group(1)) * _UNITS[unit]
    if not min_bytes <= value <= MAX_SIZE_BYTES:
        raise UsageError(f"{what} must be at least {fmt_bytes(min_bytes)} and at most 2**60 bytes (1048576 TiB), "
                         f"got {shown}", hint="e.g. 6GiB or 512MiB")
    return int(value)


_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _shown_unit(n: float) -> tuple[str, int, int] | None:
    """(unit, its bytes, decimals) fmt_bytes shows `n` bytes in: 2 decimals under 10 units, else 1; None: bytes."""
    for i, (unit, scale) in enumerate(_BINARY_UNITS):
        if abs(n) >= scale:
            return unit, scale, 2 if abs(n) / scale < 10 else 1
        # just under a unit, shown in the one below, rounds to 1024.0 of it ("1024.0 MiB" beside "1.00 GiB")
        below = _BINARY_UNITS[i + 1][1] if i + 1 < len(_BINARY_UNITS) else 1
        if abs(n) / below >= 1023.95:
            return unit, scale, 2
    return None


def fmt_bytes(n: float) -> str:
    """Human size in binary units: 1.50 GiB, 12.0 MiB, 512 B."""
    n = float(n)
    shown = _shown_unit(n)
    if shown is None:
        return f"{int(n)} B"
    unit, scale, digits = shown
    return f"{n / scale:.{digits}f} {unit}"


def size_at_least(n: float) -> str:
    """`n` bytes as a size to give back (--vram, vram=): fmt_bytes' precision, rounded up so that it is never
    less than n, no space ("656.3KiB" for 671,948 bytes, where fmt_bytes shows 656.2 KiB)."""
    n = float(n)
    shown = _shown_unit(n)
    if shown is None:
        return f"{math.ceil(n)}B"
    unit, scale, digits = shown
    v = math.ceil(n / scale * 10**digits - 1e-9) / 10**digits
    if v * scale < n:  # the float division rounded below: one step up
        v += 10**-digits
    if round(v, digits) >= 1024 and unit != _BINARY_UNITS[0][0]:  # "1024.0KiB": the next unit's 1.00 is the same
        return size_at_least(1024 * scale)
    return f"{v:.{digits}f}{unit}"


def fmt_ms(ms: float) -> str:
    """Milliseconds to three significant figures or so, never shown as 0.0 when they are not: 41.3, 2.47,
    0.010 (a 100,000 fps budget read "0.0 ms" at one decimal)."""
    a = abs(ms)
    return f"{ms:.1f}" if a >= 10 else f"{ms:.2f}" if a >= 1 else f"{ms:.3f}" if a >= 0.001 or a == 0 else f"{ms:.1e}"


def fmt_count(n: float) -> str:
    """Parameter counts: 516.2M, 12.0B, 3.4K."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}"


def first_names(names: list[str], shown: int = 3) -> str:
    """"a, b, c and 3 more": the first `shown` names, the rest counted."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def plural(n: int, word: str) -> str:
    """'1 block', '3 blocks': a count with its noun (an 's' added when n is not 1)."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"

MAX_SIDE_PX = 16384  # the largest image height or width planned, from a flag (`plan --height`) or a model's config
# A frame-time budget, from `--frame-ms` or a plan file: above 10 µs (no frame of any model runs in less: one kernel
# launch is ~5 µs; 1e-300 was taken and shown as 0.0 ms), at most an hour
MIN_FRAME_MS, MAX_FRAME_MS = 0.01, 3_600_000.0
BACKENDS = ("cuda", "rocm", "cpu")  # a device profile's backends, which a plan made for one records
