"""`vram=` of residency.attach: bytes, a size ("12GiB") or a share of the model's weights ("50%")."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from residency.errors import ResidencyError
from residency.units import MAX_SIZE_BYTES, fmt_bytes, parse_size

VramSpec = int | str | None  # None: the profile's usable device memory
COMPUTE_FORMAT = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}  # weights as the model computes them


def vram_bytes(vram: VramSpec, weight_bytes: int, usable_bytes: int) -> int:
    """The device budget in bytes. `weight_bytes`: the model's weights at its compute dtype, what a share
    is of; `usable_bytes`: the profile's usable memory, the default."""
    if vram is None:
        return usable_bytes
    if isinstance(vram, bool) or not isinstance(vram, (int, str)):
        raise ResidencyError(f"vram={vram!r} ({type(vram).__name__})",
                             hint='give bytes (an int), a size such as "12GiB", or a share of the weights, "50%"')
    if isinstance(vram, int):
        if not 1 <= vram <= MAX_SIZE_BYTES:
            raise ResidencyError(f"vram={vram} bytes is out of range", hint="from 1 byte to 2**60 bytes")
        return vram
    text = vram.strip()
    if not text.endswith("%"):
        return parse_size(text, "vram")
    try:
        share = Decimal(text[:-1])
    except InvalidOperation:
        share = Decimal("NaN")
    if not share.is_finite() or share <= 0:
        raise ResidencyError(f"vram={vram[:40]!r}: a share of the weights must be a positive percentage",
                             hint='e.g. vram="50%": half the weights\' bytes at the compute dtype')
    budget = int(Decimal(weight_bytes) * share / 100)
    if budget < 1:
        raise ResidencyError(f"vram={vram!r} of {fmt_bytes(weight_bytes)} of weights is under one byte",
                             hint="give a larger share or a size such as 64MiB")
    return budget
