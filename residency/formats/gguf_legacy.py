"""GGUF "legacy" 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in pure torch.

Unpack runs on any torch device and matches gguf.quants.dequantize bit for bit in fp32;
pack delegates to gguf's numpy quantizer, which is the reference for these types.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

_bit_cache: dict[torch.device, torch.Tensor] = {}


def _bit_shifts(device: torch.device) -> torch.Tensor:
    """0..7 as a broadcast shift, built once per device so the hot path does not allocate it."""
    t = _bit_cache.get(device)
    if t is None:
        t = _bit_cache[device] = torch.arange(8, dtype=torch.uint8, device=device).view(1, 1, 8)
    return t


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # A 2-byte column slice is strided; the contiguous copy is n×2 bytes, negligible.
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


# Each kernel takes an optional fp32 `out` (n, 32) and stages its integers there: the int→float
# conversion writes `out` directly and the scale is applied in place, so no output-sized temporary
# is allocated (on CPU each one is a fresh mmap whose pages fault on first touch, ~1 µs per 4 KiB).
# Same float ops in the same order as gguf's numpy (q·d, then + m): results stay bit-exact.
def _out(blocks: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((blocks.shape[0], 32), dtype=torch.float32, device=blocks.device)
    return out


def _split_nibbles_into(o: torch.Tensor, qs: torch.Tensor, offset: int) -> None:
    """Low nibbles → weights 0..15, high → 16..31 of fp32 `o` (n, 32), minus `offset`; the int8
    temporaries are 1/8 of the output's bytes."""
    o3 = o.view(-1, 2, 16)
    lo = torch.bitwise_and(qs, 0x0F).view(torch.int8)
    hi = torch.bitwise_right_shift(qs, 4).view(torch.int8)
    if offset:
        lo.sub_(offset)
        hi.sub_(offset)
    o3[:, 0].copy_(lo)
    o3[:, 1].copy_(hi)


def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    o = _out(blocks, out)
    o.copy_(blocks[:, 2:].view(torch.int8))
    return o.mul_(d)


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    o = _out(blocks, out)
    _split_nibbles_into(o, blocks[:, 2:], 8)
    return o.mul_(d)


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    o = _out(blocks, out)
    _split_nibbles_into(o, blocks[:, 4:], 0)
    return o.mul_(d).add_(m)


def _five_bit(blocks: torch.Tensor, qh_at: int, qs_at: int) -> torch.Tensor:
    """(n, 32) uint8 in 0..31: the nibbles plus the 5th bit from the 4-byte little-endian qh word
    (bit i → weight i, i.e. byte i // 8, bit i % 8). uint8 temporaries only: 1/4 of fp32 output."""
    n = blocks.shape[0]
    q = torch.empty((n, 32), dtype=torch.uint8, device=blocks.device)
    q3, qs = q.view(n, 2, 16), blocks[:, qs_at : qs_at + 16]
    torch.bitwise_and(qs, 0x0F, out=q3[:, 0])
    torch.bitwise_right_shift(qs, 4, out=q3[:, 1])
    high = (blocks[:, qh_at : qh_at + 4].unsqueeze(-1) >> _bit_shifts(blocks.device)) & 1
    return q.bitwise_or_(high.view(n, 32).bitwise_left_shift_(4))


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    o = _out(blocks, out)
    o.copy_(_five_bit(blocks, 2, 6).view(torch.int8).sub_(16))
    return o.mul_(d)


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    o = _out(blocks, out)
    o.copy_(_five_bit(blocks, 4, 8))
    return o.mul_(d).add_(m)


def _numpy_quantizer(qtype: GGMLQuantizationType):
    def quant(blocks: torch.Tensor) -> torch.Tensor:
        raw = gguf_quants.quantize(blocks.numpy().astype(np.float32, copy=False), qtype)
        return torch.from_numpy(np.ascontiguousarray(raw))

    return quant


DEQUANT_LEGACY = {
    "Q8_0": dequant_q8_0,
    "Q4_0": dequant_q4_0,
    "Q4_1": dequant_q4_1,
    "Q5_0": dequant_q5_0,
    "Q5_1": dequant_q5_1,
}

QUANT_LEGACY = {name: _numpy_quantizer(GGMLQuantizationType[name]) for name in DEQUANT_LEGACY}
