"""GGUF "legacy" 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in pure torch.

Unpack runs on any torch device and matches gguf.quants.dequantize bit for bit in fp32;
pack delegates to gguf's numpy quantizer, which is the reference for these types.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

_shift_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def _shifts(kind: str, device: torch.device) -> torch.Tensor:
    # Small constant tensors, built once per device so the hot path does not allocate them.
    key = (kind, device)
    t = _shift_cache.get(key)
    if t is None:
        if kind == "nibble":  # low nibble holds weights 0..15, high nibble 16..31
            t = torch.tensor([0, 4], dtype=torch.uint8, device=device).view(1, 2, 1)
        else:  # "bit32": bit i of the 32-bit qh word is the 5th bit of weight i
            t = torch.arange(32, dtype=torch.int32, device=device).view(1, 32)
        _shift_cache[key] = t
    return t


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # A 2-byte column slice is strided; the contiguous copy is n×2 bytes, negligible.
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    n = qs.shape[0]
    return ((qs.unsqueeze(1) >> _shifts("nibble", qs.device)) & 0x0F).reshape(n, 32)


def _high_bits(qh_bytes: torch.Tensor) -> torch.Tensor:
    # 4 bytes little-endian → one int32 word per block, then bit i → weight i.
    b = qh_bytes.to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    return ((word.unsqueeze(1) >> _shifts("bit32", qh_bytes.device)) & 1).to(torch.uint8)


# Each kernel takes an optional fp32 `out` (n, 32): the last multiply writes there, saving a full-size
# temporary and the copy pass after it. Same ops in the same order: results stay bit-exact.
def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    return torch.mul(blocks[:, 2:].view(torch.int8).float(), d, out=out)


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return torch.mul(d, q.float(), out=out)


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    return torch.mul(d, _nibbles(blocks[:, 4:]).float(), out=out).add_(m)


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = (_nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return torch.mul(d, q.float(), out=out)


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return torch.mul(d, q.float(), out=out).add_(m)


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
