"""GGUF "legacy" 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in pure torch.

Unpack runs on any torch device and matches gguf.quants.dequantize bit for bit in fp32;
pack is gguf's numpy quantizer, the reference for these types, but in blocks of tiny weights (legacy_pack).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from residency.formats.gguf_kquants import f16_fields, f16_viewable
from residency.formats.legacy_pack import quantize_legacy
from residency.formats.staging import float_phase


# Each kernel takes an optional fp32 `out` (n, 32) and stages its integers there: the int→float
# conversion writes `out` directly and the scale is applied in place, so no output-sized temporary
# is allocated (on CPU each one is a fresh mmap whose pages fault on first touch, ~1 µs per 4 KiB).
# Integer planes go to `work` (uint8, ≥ 1 byte per weight) when the caller gives one; the nibble
# formats also cut their planes in `out` before the int→float copy overwrites it.
# The integer phase runs over the whole chunk; the float phase (staging.float_phase: int→float, ·d,
# + m, the cast into `dst`) reads only the planes, d and m, so it can run in cache-sized sub-chunks.
# Same float ops in the same order as gguf's numpy (q·d, then + m): results stay bit-exact.
def _out(blocks: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((blocks.shape[0], 32), dtype=torch.float32, device=blocks.device)
    return out


def _bytes(blocks: torch.Tensor, work: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 scratch of `shape`: the head of `work`, or a fresh tensor when there is none."""
    size = 1
    for d in shape:
        size *= d
    if work is None:
        return torch.empty(shape, dtype=torch.uint8, device=blocks.device)
    return work[:size].view(shape)


_M4 = 0x0F0F0F0F  # low nibble of each byte of an int32 word


def _nibbles_into(q: torch.Tensor, qs: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Low nibbles → weights 0..15, high → 16..31 of uint8 `q` (n, 32), 4-byte aligned.

    `scratch` (the fp32 `out` before the float stage: 4 bytes a weight, 1.5 used) takes a dense
    copy of the (n, 16) nibble bytes, then both nibble planes cut from it as int32 words in two
    long loops (a per-byte mask keeps bytes apart); one cat interleaves the planes. Direct uint8
    ops on the strided (n, 16) view loop per block and have no vector shift: ~2x the time."""
    n = q.shape[0]
    words = scratch.reshape(-1).view(torch.int32)
    dense = words[: 4 * n]
    dense.view(torch.uint8).view(n, 16).copy_(qs)
    planes = words[4 * n : 12 * n].view(2, 4 * n)
    torch.bitwise_and(dense, _M4, out=planes[0])
    torch.bitwise_right_shift(dense, 4, out=planes[1]).bitwise_and_(_M4)
    torch.cat([planes[0].view(n, 4), planes[1].view(n, 4)], dim=1, out=q.view(torch.int32).view(n, 8))
    return q


def _scaled(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> Callable[[int, int, torch.Tensor], None]:
    """The float phase: integer codes q (n, 32) → q·d (+ m) for blocks lo..hi."""

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.copy_(q[lo:hi])
        o.mul_(d[lo:hi])
        if m is not None:
            o.add_(m[lo:hi])

    return floats


def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    q = blocks[:, 2:].view(torch.int8)
    if work is None or dst is None or dst.dtype == torch.float32:
        return float_phase(_out(blocks, out), dst, _scaled(q, f16_fields(blocks, 0)))
    # Into bf16/fp16, d is read per sub-chunk after the int→float has pulled its blocks into cache: read
    # first over the whole chunk, the 2-byte field was the chunk's first touch of memory, a 1-D strided
    # loop at a fraction of the bandwidth (1.3 of ~4 ms, 4096², 2 threads; measured A/B -3 to -14 %).
    # Into fp32 that order measured +3 to +7 %: there the int→float writes memory anyway.
    d_all = work[: 4 * blocks.shape[0]].view(torch.float32).view(-1, 1)
    half = blocks.view(torch.float16) if f16_viewable(blocks, 0) else None

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.copy_(q[lo:hi])
        d = d_all[lo:hi]
        d.copy_(half[lo:hi, 0:1] if half is not None else f16_fields(blocks[lo:hi], 0))
        o.mul_(d)

    return float_phase(_out(blocks, out), dst, floats)


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    o = _out(blocks, out)
    q = _nibbles_into(_bytes(blocks, work, (blocks.shape[0], 32)), blocks[:, 2:], o)
    d = f16_fields(blocks, 0)  # after the nibbles: the chunk's blocks are in cache
    return float_phase(o, dst, _scaled(q.view(torch.int8).sub_(8), d))  # 0..15 − 8, exact in int8


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    o = _out(blocks, out)
    q = _nibbles_into(_bytes(blocks, work, (blocks.shape[0], 32)), blocks[:, 4:], o)
    d = f16_fields(blocks, 0)
    m = f16_fields(blocks, 2)
    return float_phase(o, dst, _scaled(q, d, m))


# The 8 bits of a qh byte spread over the 8 bytes of an int64, bit b → bit 4 of byte b (so, OR-ed onto
# a nibble, it is the 5th bit of weight b): one gather from a 256-entry table (2 KiB, stays in L1).
# Measured per 1 M weights (1 thread, thread-CPU medians): 223 µs, against 446 µs for the arithmetic
# spread (widen each byte to int64, multiply, mask, carry, shift: 5 passes over 8 bytes a byte).
# Hazard: bytes of an int64 are read in memory order, so this assumes a little-endian machine.
assert sys.byteorder == "little", "the Q5_0/Q5_1 bit spread reads int64 bytes in little-endian order"

_SPREAD: dict[torch.device, torch.Tensor] = {}


def _spread_table(device: torch.device) -> torch.Tensor:
    """(256,) int64: entry v has bit 4 of byte b set where bit b of v is; built once per device."""
    t = _SPREAD.get(device)
    if t is None:
        v = torch.arange(256, dtype=torch.int64)
        t = torch.zeros(256, dtype=torch.int64)
        for b in range(8):
            t |= ((v >> b) & 1) << (8 * b + 4)
        t = _SPREAD[device] = t.to(device)
    return t


def _five_bit(blocks: torch.Tensor, qh_at: int, qs_at: int, work: torch.Tensor | None, scratch: torch.Tensor) -> torch.Tensor:
    """(n, 32) uint8 in 0..31: the nibbles plus the 5th bit from the 4-byte little-endian qh word
    (bit i → weight i, i.e. byte i // 8, bit i % 8). Needs 2 bytes of work per weight, and
    `scratch` as _nibbles_into does (words 0..12n) plus words 12n..16n for the qh bytes as int32
    gather indices."""
    n = blocks.shape[0]
    planes = _bytes(blocks, work, (2, n * 32))
    q = _nibbles_into(planes[0].view(n, 32), blocks[:, qs_at : qs_at + 16], scratch)
    idx = scratch.reshape(-1).view(torch.int32)[12 * n : 16 * n]
    idx.view(n, 4).copy_(blocks[:, qh_at : qh_at + 4])
    high = planes[1].view(torch.int64)
    torch.index_select(_spread_table(blocks.device), 0, idx, out=high)
    return q.bitwise_or_(high.view(torch.uint8).view(n, 32))


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    o = _out(blocks, out)
    q = _five_bit(blocks, 2, 6, work, o).view(torch.int8).sub_(16)
    return float_phase(o, dst, _scaled(q, f16_fields(blocks, 0)))


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    o = _out(blocks, out)
    q = _five_bit(blocks, 4, 8, work, o)
    return float_phase(o, dst, _scaled(q, f16_fields(blocks, 0), f16_fields(blocks, 2)))


def _numpy_quantizer(name: str):
    def quant(blocks: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(quantize_legacy(name, blocks.numpy().astype(np.float32, copy=False)))

    return quant


DEQUANT_LEGACY = {
    "Q8_0": dequant_q8_0,
    "Q4_0": dequant_q4_0,
    "Q4_1": dequant_q4_1,
    "Q5_0": dequant_q5_0,
    "Q5_1": dequant_q5_1,
}

QUANT_LEGACY = {name: _numpy_quantizer(name) for name in DEQUANT_LEGACY}
