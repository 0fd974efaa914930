"""GGUF K-quant (Q2_K … Q6_K) dequant kernels in plain torch ops, so they run on CPU and CUDA/ROCm
alike; the float32 result equals gguf.quants.dequantize bit for bit (numpy's float op order is kept)."""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256

# Bit fields are cut from int32 words holding four bytes each: a shift plus a per-byte mask
# never mixes bits of neighbouring bytes, so this is endian-agnostic and 4x fewer lanes than
# uint8. Fields are laid out plane-major, (plane, …, n, bytes): torch's CPU loops only
# vectorize long contiguous runs, and a 32-byte inner run costs 5-10x more per byte. The
# single int→float copy then reads the planes permuted into weight order. The float stage
# is numpy's, op for op: d·q then − m as two ops; a fused form (addcmul, FMA) rounds once
# and breaks bit-exactness.
_M1, _M2, _M4, _M6 = 0x01010101, 0x03030303, 0x0F0F0F0F, 0x3F3F3F3F

_SHIFTS: dict[torch.device, dict[str, torch.Tensor]] = {}


def _shifts(device: torch.device) -> dict[str, torch.Tensor]:
    """Broadcast shift tensors, built once per device (a per-call build is a host→device copy)."""
    s = _SHIFTS.get(device)
    if s is None:

        def i32(vals: list[int], shape: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.int32, device=device).reshape(shape)

        s = {
            "nib": i32([0, 4], (2, 1, 1)),
            "crumb": i32([0, 2, 4, 6], (4, 1, 1)),
            "q3_hbit": i32([4 * h + k for k in range(4) for h in range(2)], (4, 2, 1)),  # [k, h]
            "q5_hbit": i32([2 * g + t for t in range(2) for g in range(4)], (2, 4, 1)),  # [t, g]
            "q6_hbit": i32([2 * k for k in range(4)], (2, 2, 1, 1)),  # [t, m], k = 2t + m
            "nib_w": i32([0, 4], (1, 2, 1)),
            "crumb_w": i32([0, 2, 4, 6], (1, 4)),
        }
        _SHIFTS[device] = s
    return s


def _empty_out(n: int, device: torch.device) -> torch.Tensor:
    """The (n, 256) float32 result buffer when the caller passed no `out`; the kernel also uses it as
    scratch before the float stage. No huge-page advice: on a VM the first touch of a fresh huge page
    is bimodal (4-12 ms or 56-103 ms for 64 MiB), so callers that care pass their own `out`."""
    return torch.empty((n, QK_K), dtype=torch.float32, device=device)


def _planes(work: torch.Tensor | None, n: int, device: torch.device, *shape: int) -> torch.Tensor:
    """The int32 code planes, n·64 words (1 byte per weight): the head of `work`, or fresh."""
    if work is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    return work[: n * QK_K].view(torch.int32).view(shape)


class _Scratch:
    """Bump allocator over the result buffer before the float stage overwrites it.

    On CPU every multi-MB temporary is a fresh mmap (glibc trims freed heap tops past 32 MB)
    and costs ~1 µs per 4 KiB page on first touch; staging in `out` reuses pages that must
    be faulted anyway. Only the final integer planes `q` need memory of their own.
    """

    def __init__(self, out: torch.Tensor) -> None:
        self.words = out.view(-1).view(torch.int32)
        self.off = 0

    def take(self, *shape: int) -> torch.Tensor:
        size = 1
        for d in shape:
            size *= d
        t = self.words[self.off : self.off + size].view(shape)
        self.off += size
        return t

    def stage(self, part: torch.Tensor) -> torch.Tensor:
        """Copy a (strided, maybe permuted) uint8 view into scratch; return it as int32 words."""
        *lead, last = part.shape
        dst = self.take(*lead, last // 4)
        dst.view(torch.uint8).copy_(part)
        return dst


def _field(
    words: torch.Tensor, shift: torch.Tensor, mask: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(words >> shift) & mask with a broadcast shift; in place after the shift, so one buffer."""
    if out is None:
        return (words >> shift).bitwise_and_(mask)
    return torch.bitwise_right_shift(words, shift, out=out).bitwise_and_(mask)


def _dense(part: torch.Tensor) -> torch.Tensor:
    """A fresh packed copy of a few bytes per block, so it can be viewed as a wider dtype.

    Not .contiguous(): for n == 1 that returns the strided view itself, and a dtype view
    needs the row stride and the (possibly odd) storage offset divisible by the new width.
    """
    return part.clone(memory_format=torch.contiguous_format)


def _f16(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` fp16 fields at byte `start` of each block, as float32 (n, count); exact widening.

    Read in place through an fp16 view when the blocks allow one (even block size, offset and
    start, as every K-quant on an aligned buffer); else from a dense copy of the bytes first, a
    copy that loops per block (~4 % of a Q6_K unpack)."""
    if (start % 2 == 0 and blocks.shape[1] % 2 == 0 and blocks.stride(0) % 2 == 0
            and blocks.storage_offset() % 2 == 0 and blocks.data_ptr() % 2 == 0):
        return blocks.view(torch.float16)[:, start // 2 : start // 2 + count].float()
    return _dense(blocks[:, start : start + 2 * count]).view(torch.float16).float()


def _scale_min_k4(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 16-byte head (d, dmin f16; 12 packed bytes) → (n, 2, 8) float32: [d·scale,
    dmin·min] per sub-block, a permuted view of a (2, 8, n) tensor.

    Worked transposed, one row of n per field: with n innermost every op is one long loop, where
    on (n, 2..8) tensors each op pays a loop call per block (~40 ns a block over the 10 ops)."""
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    head = _dense(_dense(blocks[:, 0:16]).view(torch.int32).t())  # (4, n): d|dmin, a, b, c
    ab, c = head[1:3], head[3:4]
    six = torch.empty((2, 2, n), dtype=torch.int32, device=blocks.device)  # [scale | min, bytes 0-3 | 4-7, n]
    torch.bitwise_and(ab, _M6, out=six[:, 0])  # 6-bit fields 0-3: low 6 bits of a (scales), b (mins)
    hi = torch.bitwise_right_shift(ab, 2, out=six[:, 1]).bitwise_and_(0x30303030)  # fields 4-7: top 2 bits
    hi.bitwise_or_(_field(c, sh["nib"].view(2, 1), _M4))  # … and low 4 from c (scales | mins)
    d = head[0].view(torch.float16).view(n, 2).t().unsqueeze(1)  # (2, 1, n): d, dmin
    dm = torch.empty((2, 8, n), dtype=torch.float32, device=blocks.device)
    dm.view(2, 2, 4, n).copy_(six.view(torch.uint8).view(2, 2, n, 4).permute(0, 1, 3, 2))
    return dm.mul_(d).permute(2, 0, 1)  # fp16 d widened exactly inside the mul


def dequant_q2_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    # layout: scales[16] (lo nibble scale, hi nibble min), qs[64] (2-bit), d f16, dmin f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    nib = _field(s.stage(blocks[:, 0:16]).view(1, n, 4), sh["nib"], _M4)  # (2, n, 4w): scale | min
    # in place: at a 1 M-weight chunk each (2, n, 16) float is 512 KiB, and two at once pass 1 MiB
    dm = nib.view(torch.uint8).view(2, n, 16).float().mul_(_f16(blocks, 80, 2).t().unsqueeze(-1))
    q = _field(s.stage(blocks[:, 16:80]).view(1, n, 16), sh["crumb"], _M2, _planes(work, n, blocks.device, 4, n, 16))  # (k, n, h, j)
    out.view(n, 2, 4, 32).copy_(q.view(torch.uint8).view(4, n, 2, 32).permute(1, 2, 0, 3))
    o = out.view(n, 16, 16)
    o.mul_(dm[0].view(n, 16, 1))
    return o.sub_(dm[1].view(n, 16, 1)).view(n, QK_K)


def dequant_q3_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    # layout: hmask[32] (3rd bits), qs[64] (2-bit), scales[12] (6-bit, packed), d f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    w = _dense(blocks[:, 96:108]).view(torch.int32)
    lo = _field(w[:, 0:2].view(n, 1, 2), sh["nib_w"], _M4)  # scales 0-7 | 8-15, low 4 bits
    hi = _field(w[:, 2:3], sh["crumb_w"], _M2)  # scales 0-3 | 4-7 | …, high 2 bits
    six = (lo.view(n, 4) | (hi << 4)).view(torch.int8).view(n, 16) - 32
    dl = _f16(blocks, 108, 1) * six.float()
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    qs = s.stage(blocks[:, 32:96].view(n, 2, 32).transpose(0, 1))  # (h, n, j)
    q = _field(qs.view(1, 2, n * 8), sh["crumb"], _M2, _planes(work, n, blocks.device, 4, 2, n * 8))  # (k, h, n, j)
    hm = s.stage(blocks[:, 0:32])
    q |= _field(hm.view(1, 1, n * 8), sh["q3_hbit"], _M1, s.take(4, 2, n * 8)).bitwise_left_shift_(2)
    # A set hmask bit means "no -4 offset": q = (ql | h<<2) - 4, exact in int8 (range -4..3).
    q8 = q.view(torch.int8).sub_(4).view(4, 2, n, 32).permute(2, 1, 0, 3)
    out.view(n, 2, 4, 32).copy_(q8)
    return out.view(n, 16, 16).mul_(dl.view(n, 16, 1)).view(n, QK_K)


def dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    # layout: d f16, dmin f16, scales[12] (6-bit scale+min, packed), qs[128] (nibbles)
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    dm = _scale_min_k4(blocks)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    q = _field(s.stage(blocks[:, 16:144]).view(1, n, 32), sh["nib"], _M4, _planes(work, n, blocks.device, 2, n, 32))  # (t, n, g, j)
    out.view(n, 4, 2, 32).copy_(q.view(torch.uint8).view(2, n, 4, 32).permute(1, 2, 0, 3))
    o = out.view(n, 8, 32)
    o.mul_(dm[:, 0].unsqueeze(-1))
    return o.sub_(dm[:, 1].unsqueeze(-1)).view(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    # layout: d f16, dmin f16, scales[12] (as Q4_K), qh[32] (5th bits), qs[128] (nibbles)
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    dm = _scale_min_k4(blocks)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    qs = s.stage(blocks[:, 48:176].view(n, 4, 32).transpose(0, 1))  # (g, n, j)
    q = _field(qs.view(1, 4, n * 8), sh["nib"], _M4, _planes(work, n, blocks.device, 2, 4, n * 8))  # (t, g, n, j)
    qh = s.stage(blocks[:, 16:48])
    q |= _field(qh.view(1, 1, n * 8), sh["q5_hbit"], _M1, s.take(2, 4, n * 8)).bitwise_left_shift_(4)
    out.view(n, 4, 2, 32).copy_(q.view(torch.uint8).view(2, 4, n, 32).permute(2, 1, 0, 3))
    o = out.view(n, 8, 32)
    o.mul_(dm[:, 0].unsqueeze(-1))
    return o.sub_(dm[:, 1].unsqueeze(-1)).view(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    # layout: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] int8, d f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    dl = _f16(blocks, 208, 1) * blocks[:, 192:208].view(torch.int8).float()
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    ql = s.stage(blocks[:, 0:128].view(n, 2, 2, 32).permute(2, 1, 0, 3))  # (m, h, n, j)
    q = _field(ql.view(1, 2, 2, n * 8), sh["nib"].view(2, 1, 1, 1), _M4, _planes(work, n, blocks.device, 2, 2, 2, n * 8))  # (t, m, h, n, j)
    qh = s.stage(blocks[:, 128:192].view(n, 2, 32).transpose(0, 1))  # (h, n, j)
    q |= _field(qh.view(1, 1, 2, n * 8), sh["q6_hbit"], _M2, s.take(2, 2, 2, n * 8)).bitwise_left_shift_(4)
    q8 = q.view(torch.int8).sub_(32).view(2, 2, 2, n, 32).permute(3, 2, 0, 1, 4)
    out.view(n, 2, 2, 2, 32).copy_(q8)
    return out.view(n, 16, 16).mul_(dl.view(n, 16, 1)).view(n, QK_K)


DEQUANT_K: dict[str, Callable[..., torch.Tensor]] = {
    "Q2_K": dequant_q2_k,
    "Q3_K": dequant_q3_k,
    "Q4_K": dequant_q4_k,
    "Q5_K": dequant_q5_k,
    "Q6_K": dequant_q6_k,
}
