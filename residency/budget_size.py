"""The device budget as a user writes it (`vram=` of residency.attach, `Runtime.set_budget`): bytes, a size
("12GiB") or a share of the model's weights ("50%")."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from residency.errors import ResidencyError
from residency.units import MAX_SIZE_BYTES, fmt_bytes, parse_size

VramSpec = int | str | None  # None: the profile's usable device memory


def vram_bytes(vram: VramSpec, weight_bytes: int, usable_bytes: int) -> int:
    """The device budget in bytes. `weight_bytes`: the model's weights at its compute dtype, what a share
    is of; `usable_bytes`: the profile's usable memory, the default."""
    if vram is None:
        return usable_bytes
    if isinstance(vram, numbers.Integral) and not isinstance(vram, bool):
        vram = int(vram)  # numpy's and torch's integers too (np.int64 from a sum of tensor sizes)
    if isinstance(vram, bool) or not isinstance(vram, (int, str)):
        raise ResidencyError(f"vram={vram!r} ({type(vram).__name__})",
                             hint='give bytes (an int), a size such as "12GiB", or a share of the weights, "50%"')
    if isinstance(vram, int):
        if not 1 <= vram <= MAX_SIZE_BYTES:
            raise ResidencyError(f"vram={vram} bytes is out of range", hint="from 1 byte to 2**60 bytes")
        return vram
    text = vram.strip()
    if not text.endswith("%"):
        refuse_unitless(vram, lambda v: f"vram={v}")
        return parse_size(text, "vram")
    try:
        share = Decimal(text[:-1])
    except InvalidOperation:
        share = Decimal("NaN")
    if not share.is_finite() or share <= 0:
        raise ResidencyError(f"vram={vram[:40]!r}: a share of the weights must be a positive percentage",
                             hint='e.g. vram="50%": half the weights\' bytes at the compute dtype')
    budget = int(Decimal(weight_bytes) * share / 100)
    if budget > MAX_SIZE_BYTES:
        raise ResidencyError(f"vram={vram[:40]!r} of {fmt_bytes(weight_bytes)} of weights is more than 2**60 bytes",
                             hint='a share is of the weights: "100%" is all of them, "400%" four times as much')
    if budget < 1:
        raise ResidencyError(f"vram={vram!r} of {fmt_bytes(weight_bytes)} of weights is under one byte",
                             hint="give a larger share or a size such as 64MiB")
    return budget


def refuse_unitless(text: str, said: Callable[[str], str]) -> None:
    """Refuse a size written as a number without a unit: "12" meant 12 GiB more likely than 12 bytes (an int says
    bytes). `said` writes the call a value was given to (`vram=…`, `rt.set_budget(…)`), for the message and hint."""
    body = text.strip()
    try:
        value = float(body)
    except ValueError:
        return  # a unit, or unreadable: parse_size says which
    shown = said(repr(text[:40]))
    if not (math.isfinite(value) and value > 0):
        raise ResidencyError(f"{shown}: a size must be a positive number with a unit",
                             hint=f"e.g. {said(_quoted('12GiB'))}, {said(_quoted('50%'))} or bytes as an int")
    whole = value == int(value) and value <= MAX_SIZE_BYTES
    if whole and value > 1024:  # a byte count written as a string ("1_000_000GiB" is a petabyte: no hint)
        hint = f"bytes are an int: {said(str(int(value)))}"
    else:
        hint = f"did you mean {said(_quoted(body + 'GiB'))}?" + (
            f" (bytes are an int: {said(str(int(value)))})" if whole else "")
    raise ResidencyError(f"{shown} has no unit", hint=hint)


def _quoted(text: str) -> str:
    return f'"{text}"'
