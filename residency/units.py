"""Parsing and printing of byte sizes and times, with units spelled the way users type them.

`6GiB`, `6GB`, `6000MB`, `512MiB`, `1.5G` (binary when the unit says so, decimal otherwise).
"""

from __future__ import annotations

import re

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
    # A bare K/M/G means binary, as memory is sized in powers of two.
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in `text`; raises UsageError naming `what` and the value on bad input."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(
            f"cannot read {what} {text!r}",
            hint="write a number with a unit, e.g. 6GiB, 6GB, 6000MB or 512MiB",
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"{what} must be positive, got {text!r}", hint="e.g. 6GiB")
    return int(value)


def fmt_bytes(n: float) -> str:
    """Human size in binary units: 1.50 GiB, 12.0 MiB, 512 B."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    """Parameter counts: 516.2M, 12.0B, 3.4K."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}"
