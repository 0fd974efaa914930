"""GGUF K-quant (Q2_K … Q6_K) dequant kernels in plain torch ops, so they run on CPU and CUDA/ROCm
alike; the float32 result equals gguf.quants.dequantize bit for bit (numpy's float op order is kept)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from residency.formats.staging import float_phase

QK_K = 256

# Bit fields are cut from int32 words holding four bytes each: a shift plus a per-byte mask
# never mixes bits of neighbouring bytes, so this is endian-agnostic and 4x fewer lanes than
# uint8. Fields are laid out plane-major, (plane, …, n, bytes): torch's CPU loops only
# vectorize long contiguous runs, and a 32-byte inner run costs 5-10x more per byte. The
# single int→float copy then reads the planes permuted into weight order (Q2_K/Q4_K, whose
# planes are n-major, stack them into weight order first: _weight_order). Each kernel is an
# integer phase over the whole chunk (planes in `work`, staging in `out`) and a float phase
# (staging.float_phase) that reads only the planes and per-block scales, so it can run in
# cache-sized sub-chunks. The float stage is numpy's, op for op: d·q then − m as two ops; a
# fused form (addcmul, FMA) rounds once and breaks bit-exactness.
_M1, _M2, _M4 = 0x01010101, 0x03030303, 0x0F0F0F0F

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
            # 5th/6th-bit fields land at bit 4 straight from the shift (see _high_bits): bit 2g + t
            # of qh for Q5_K, left by 4 - s for g < 2, right by s - 4 for g ≥ 2; Q6_K's 2-bit field
            # s = 2k, k = 2t + m: left by 4 - s for t = 0, right by s - 4 for t = 1.
            "q5_hbit_l": i32([4 - (2 * g + t) for g in range(2) for t in range(2)], (2, 2, 1)),  # [g, t]
            "q5_hbit_r": i32([2 * g + t - 4 for g in range(2, 4) for t in range(2)], (2, 2, 1)),  # [g, t]
            "q6_hbit_l": i32([4 - 2 * m for m in range(2)], (2, 1, 1)),  # [m], t = 0
            "q6_hbit_r": i32([2 * (2 + m) - 4 for m in range(2)], (2, 1, 1)),  # [m], t = 1
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


def _weight_order(work: torch.Tensor | None, n: int, planes: list[torch.Tensor], *shape: int) -> torch.Tensor:
    """The codes in weight order, (n, 256) uint8 in the second half of `work` (or fresh): the
    n-major int32 `planes` (each (n, …, 8) words, 8 words = a 32-weight run) interleaved by one
    stack, so the float phase converts one flat run. Measured per 1 M weights (Q4_K, 1 thread):
    stack 146 µs + flat int→float 209 µs, against 485 µs for the int→float reading the planes
    permuted (32-weight inner runs)."""
    if work is None:
        codes = torch.empty((n, QK_K), dtype=torch.uint8, device=planes[0].device)
    else:
        codes = work[n * QK_K : 2 * n * QK_K].view(n, QK_K)
    torch.stack(planes, dim=len(shape) - 1, out=codes.view(torch.int32).view(n, *shape))
    return codes


def _side(work: torch.Tensor, n: int, per_block: int, half: int = 1) -> torch.Tensor:
    """(n, per_block) float32 of per-block scales in a half of `work` (n·256 bytes each) that the float
    phase does not read: the second for Q5_K and Q6_K (planes in the first), the first for Q4_K once
    its planes are stacked into the second."""
    at = half * n * QK_K
    return work[at : at + 4 * per_block * n].view(torch.float32).view(n, per_block)


class _Scratch:
    """Bump allocator over the result buffer before the float stage overwrites it.

    On CPU every multi-MB temporary is a fresh mmap (glibc trims freed heap tops past 32 MB)
    and costs ~1 µs per 4 KiB page on first touch; staging in `out` reuses pages that must
    be faulted anyway. Only the final integer planes `q` need memory of their own.
    """

    def __init__(self, out: torch.Tensor) -> None:
        self.words = out.view(-1).view(torch.int32)
        self.off = 0

    def typed(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        """A `shape` tensor of `dtype` (of 1, 2 or 4 bytes; whole words in all) from the scratch."""
        return self.take(math.prod(shape) * dtype.itemsize // 4).view(dtype).view(shape)

    def take(self, *shape: int) -> torch.Tensor:
        size = math.prod(shape)
        t = self.words[self.off : self.off + size].view(shape)
        self.off += size
        return t

    def stage(self, part: torch.Tensor) -> torch.Tensor:
        """Copy a (strided, maybe permuted) uint8 view into scratch; return it as int32 words.

        Copied as int64 where both sides allow that view: a permuted copy loops once per contiguous
        run, and a 32-byte run is then 4 elements, not 32. Measured for Q5_K's (g, n, j) stage from
        memory, per 8192-block chunk: 166 against 216 µs; a whole unpack 3-4 % faster."""
        *lead, last = part.shape
        dst = self.take(*lead, last // 4)
        if _int64_viewable(part) and dst.data_ptr() % 8 == 0:
            dst.view(torch.int64).copy_(part.view(torch.int64))
        else:
            dst.view(torch.uint8).copy_(part)
        return dst


def _int64_viewable(part: torch.Tensor) -> bool:
    """Whether a uint8 view can be read as int64 in place: runs of whole 8-byte words on 8-byte
    boundaries. Never while torch.compile traces (dynamo cannot trace data_ptr())."""
    if torch.compiler.is_compiling() or part.shape[-1] % 8 or part.stride(-1) != 1:
        return False
    return (all(st % 8 == 0 for st in part.stride()[:-1]) and part.storage_offset() % 8 == 0
            and part.data_ptr() % 8 == 0)


def _field(
    words: torch.Tensor, shift: torch.Tensor, mask: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(words >> shift) & mask with a broadcast shift; in place after the shift, so one buffer."""
    if out is None:
        return (words >> shift).bitwise_and_(mask)
    return torch.bitwise_right_shift(words, shift, out=out).bitwise_and_(mask)


def _high_bits(words: torch.Tensor, left: torch.Tensor, right: torch.Tensor, mask: int, hb: torch.Tensor) -> torch.Tensor:
    """The high-bit planes `hb` (2, …): a field of each byte of `words` moved to bits 4+ of that byte,
    (byte >> s & m) << 4, as one shift and one mask: left by 4 - s into hb[0] (fields s < 4),
    right by s - 4 into hb[1]. Bits a left shift carries into the next byte, or an arithmetic
    right shift drags in from the sign, fall outside `mask` (m << 4 per byte), and a field below
    bit 4 never leaves the top byte. One pass over the planes fewer than field-then-shift."""
    torch.bitwise_left_shift(words, left, out=hb[0])
    torch.bitwise_right_shift(words, right, out=hb[1])
    return hb.bitwise_and_(mask)


def _dense(part: torch.Tensor) -> torch.Tensor:
    """A fresh packed copy of a few bytes per block, so it can be viewed as a wider dtype.

    Not .contiguous(): for n == 1 that returns the strided view itself, and a dtype view
    needs the row stride and the (possibly odd) storage offset divisible by the new width.
    """
    return part.clone(memory_format=torch.contiguous_format)


def f16_fields(blocks: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """`count` fp16 fields at byte `start` of each block, as float32 (n, count); exact widening.

    Read in place through an fp16 view when the blocks allow one (even block size, offset and
    start, as every K-quant on an aligned buffer); else from a dense copy of the bytes first, a
    copy that loops per block (~4 % of a Q6_K unpack)."""
    if f16_viewable(blocks, start):
        return blocks.view(torch.float16)[:, start // 2 : start // 2 + count].float()
    return _dense(blocks[:, start : start + 2 * count]).view(torch.float16).float()


def f16_viewable(blocks: torch.Tensor, start: int) -> bool:
    """Whether fp16 fields at byte `start` of each block can be read through an fp16 view in place. Never while
    torch.compile traces: dynamo cannot trace storage_offset() or data_ptr() (every GGUF format fell back to
    eager for good), and the dense copy it then takes is fused away."""
    if torch.compiler.is_compiling():
        return False
    return (start % 2 == 0 and blocks.shape[1] % 2 == 0 and blocks.stride(0) % 2 == 0
            and blocks.storage_offset() % 2 == 0 and blocks.data_ptr() % 2 == 0)


def _scale_min_k4(blocks: torch.Tensor, s: _Scratch | None = None, dm: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K/Q5_K's 16-byte head (d, dmin f16; 12 packed bytes) → (2, n, 8) float32, contiguous:
    [d·scale | dmin·min, block, sub-block], into `dm` (or fresh); temporaries in `s` (or fresh).

    Worked transposed, one row of n per byte: with n innermost every op is one long vectorized
    loop, where on (n, 12) rows each op pays a loop call per block (~5 ns a block and op). Ops
    here are few and small (4096 blocks a chunk), so each costs about its ~4 µs dispatch: uint8
    ops on dense rows with scalar operands (an op reading the strided int32 head words in place
    ran a scalar loop, ~25 µs). Measured per 4096-block chunk (2 threads): ~135 µs, against
    ~150-300 µs for the fields cut from a transposed int32 copy of the words. The result is then
    transposed once to block-major (~40 µs a chunk): the float phase's ·scale and −min each
    broadcast one value over 32 weights, and with the 8 values of a block adjacent torch runs each
    as one 2-D loop; read from the (2, 8, n) layout they took a loop call per block, 105 against
    55 µs per 1 M weights (2 threads), about 1.6 ms of a 4096² unpack."""
    n = blocks.shape[0]

    def buf(dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=blocks.device) if s is None else s.typed(dtype, *shape)

    q = buf(torch.uint8, 12, n)
    q.copy_(blocks[:, 4:16].t())  # rows 0-3: a (scales 0-3, top bits of 4-7), 4-7: b (mins), 8-11: c
    ab, c = q[0:8].view(2, 4, n), q[8:12]
    six = buf(torch.uint8, 2, 2, 4, n)  # [scale | min, 0-3 | 4-7, j, n]
    if torch.compiler.is_compiling():  # dynamo refuses a strided out= (Q4_K/Q5_K fell back to eager for good)
        six[:, 0] = ab & 63
        six[:, 1] = (ab >> 2) & 0x30
        hi = six[:, 1]
        hi[0].bitwise_or_(c & 0x0F)
        hi[1].bitwise_or_(c >> 4)
    else:
        torch.bitwise_and(ab, 63, out=six[:, 0])  # fields 0-3: low 6 bits of a (scales), b (mins)
        hi = torch.bitwise_right_shift(ab, 2, out=six[:, 1]).bitwise_and_(0x30)  # fields 4-7: top 2 bits …
        low4 = buf(torch.uint8, 4, n)
        hi[0].bitwise_or_(torch.bitwise_and(c, 0x0F, out=low4))  # … and low 4 from c (scales)
        hi[1].bitwise_or_(torch.bitwise_right_shift(c, 4, out=low4))  # … or its high nibble (mins)
    d = buf(torch.float32, 2, 1, n)
    head = blocks if f16_viewable(blocks, 0) else _dense(blocks[:, 0:4])
    d.view(2, n).copy_(head.view(torch.float16)[:, 0:2].t())  # fp16 d widened exactly by the copy
    f = buf(torch.float32, 2, 8, n)
    f.copy_(six.view(2, 8, n)).mul_(d)
    dm = torch.empty((2, n, 8), dtype=torch.float32, device=blocks.device) if dm is None else dm
    dm.copy_(f.transpose(1, 2))
    return dm


def _scale_min_floats(q: torch.Tensor, dm: torch.Tensor) -> Callable[[int, int, torch.Tensor], None]:
    """Q4_K/Q5_K's float phase: codes `q` (n, 4, 2, 32) indexed in weight order (contiguous for
    Q4_K, a permuted view of the planes for Q5_K), `dm` (2, n, 8) [d·scale | dmin·min] →
    d·scale·q − dmin·min for blocks lo..hi."""

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.view(hi - lo, 4, 2, 32).copy_(q[lo:hi])
        o = o.view(hi - lo, 8, 32)
        o.mul_(dm[0, lo:hi].unsqueeze(-1))
        o.sub_(dm[1, lo:hi].unsqueeze(-1))

    return floats


def dequant_q2_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    # layout: scales[16] (lo nibble scale, hi nibble min), qs[64] (2-bit), d f16, dmin f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    nib = _field(s.stage(blocks[:, 0:16]).view(1, n, 4), sh["nib"], _M4)  # (2, n, 4w): scale | min
    # in place: at a 1 M-weight chunk each (2, n, 16) float is 512 KiB, and two at once pass 1 MiB
    dm = nib.view(torch.uint8).view(2, n, 16).float().mul_(f16_fields(blocks, 80, 2).t().unsqueeze(-1))
    q = _field(s.stage(blocks[:, 16:80]).view(1, n, 16), sh["crumb"], _M2, _planes(work, n, blocks.device, 4, n, 16))  # (k, n, h, j)
    codes = _weight_order(work, n, [p.view(n, 2, 8) for p in q], 2, 4, 8)  # (n, h, k, j)

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.copy_(codes[lo:hi])
        o = o.view(hi - lo, 16, 16)
        o.mul_(dm[0, lo:hi].unsqueeze(-1))
        o.sub_(dm[1, lo:hi].unsqueeze(-1))

    return float_phase(out, dst, floats)


def dequant_q3_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    # layout: hmask[32] (3rd bits), qs[64] (2-bit), scales[12] (6-bit, packed), d f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    w = _dense(blocks[:, 96:108]).view(torch.int32)
    lo = _field(w[:, 0:2].view(n, 1, 2), sh["nib_w"], _M4)  # scales 0-7 | 8-15, low 4 bits
    hi = _field(w[:, 2:3], sh["crumb_w"], _M2)  # scales 0-3 | 4-7 | …, high 2 bits
    six = (lo.view(n, 4) | (hi << 4)).view(torch.int8).view(n, 16) - 32
    dl = f16_fields(blocks, 108, 1) * six.float()
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    qs = s.stage(blocks[:, 32:96].view(n, 2, 32).transpose(0, 1))  # (h, n, j)
    q = _field(qs.view(1, 2, n * 8), sh["crumb"], _M2, _planes(work, n, blocks.device, 4, 2, n * 8))  # (k, h, n, j)
    hm = s.stage(blocks[:, 0:32])
    q |= _field(hm.view(1, 1, n * 8), sh["q3_hbit"], _M1, s.take(4, 2, n * 8)).bitwise_left_shift_(2)
    # A set hmask bit means "no -4 offset": q = (ql | h<<2) - 4, exact in int8 (range -4..3).
    q8 = q.view(torch.int8).sub_(4).view(4, 2, n, 32)

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.view(hi - lo, 2, 4, 32).copy_(q8[:, :, lo:hi].permute(2, 1, 0, 3))
        o.view(hi - lo, 16, 16).mul_(dl[lo:hi].unsqueeze(-1))

    return float_phase(out, dst, floats)


def dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    # layout: d f16, dmin f16, scales[12] (6-bit scale+min, packed), qs[128] (nibbles)
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    q = _field(s.stage(blocks[:, 16:144]).view(1, n, 32), sh["nib"], _M4, _planes(work, n, blocks.device, 2, n, 32))  # (t, n, g, j)
    codes = _weight_order(work, n, [p.view(n, 4, 8) for p in q], 4, 2, 8)  # (n, g, t, j)
    # after the stage (the chunk's blocks are in cache), into the planes' half of `work` once they are stacked
    dm = _scale_min_k4(blocks, s, None if work is None else _side(work, n, 16, half=0).view(2, n, 8))
    return float_phase(out, dst, _scale_min_floats(codes.view(n, 4, 2, 32), dm))


def dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    # layout: d f16, dmin f16, scales[12] (as Q4_K), qh[32] (5th bits), qs[128] (nibbles)
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    qs = s.stage(blocks[:, 48:176].view(n, 4, 32).transpose(0, 1))  # (g, n, j)
    dm = _scale_min_k4(blocks, s, None if work is None else _side(work, n, 16).view(2, n, 8))  # after the stage: blocks in cache
    q = _field(qs.view(4, 1, n * 8), sh["nib"].view(1, 2, 1), _M4, _planes(work, n, blocks.device, 4, 2, n * 8))  # (g, t, n, j)
    qh = s.stage(blocks[:, 16:48]).view(1, 1, n * 8)
    q |= _high_bits(qh, sh["q5_hbit_l"], sh["q5_hbit_r"], _M1 << 4, s.take(2, 2, 2, n * 8)).view(4, 2, n * 8)
    return float_phase(out, dst, _scale_min_floats(q.view(torch.uint8).view(4, 2, n, 32).permute(2, 0, 1, 3), dm))


def dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor | None = None, work: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> torch.Tensor:
    # layout: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] int8, d f16
    n = blocks.shape[0]
    sh = _shifts(blocks.device)
    out = _empty_out(n, blocks.device) if out is None else out
    s = _Scratch(out)
    ql = s.stage(blocks[:, 0:128].view(n, 2, 2, 32).permute(2, 1, 0, 3))  # (m, h, n, j)
    q = _field(ql.view(1, 2, 2, n * 8), sh["nib"].view(2, 1, 1, 1), _M4, _planes(work, n, blocks.device, 2, 2, 2, n * 8))  # (t, m, h, n, j)
    qh = s.stage(blocks[:, 128:192].view(n, 2, 32).transpose(0, 1))  # (h, n, j)
    q |= _high_bits(qh.view(1, 2, n * 8), sh["q6_hbit_l"], sh["q6_hbit_r"], _M2 << 4, s.take(2, 2, 2, n * 8))
    # d·scale after the stages (the chunk's blocks are in cache; read first, it was the chunk's first
    # touch of memory), into the free half of `work`: d (11 bits) · an int8 scale is exact in fp32
    dl = torch.empty((n, 16), dtype=torch.float32, device=blocks.device) if work is None else _side(work, n, 16)
    dl.copy_(blocks[:, 192:208].view(torch.int8)).mul_(f16_fields(blocks, 208, 1))
    # Read permuted by the float phase: a weight-order stack (as Q4_K) needs n-major planes, and
    # that layout measured slower (ql staging +45 µs, 4-plane stack 211 µs + flat 238 µs against
    # 331 µs for this permuted int→float, per 1 M weights).
    q8 = q.view(torch.int8).sub_(32).view(2, 2, 2, n, 32)

    def floats(lo: int, hi: int, o: torch.Tensor) -> None:
        o.view(hi - lo, 2, 2, 2, 32).copy_(q8[:, :, :, lo:hi].permute(3, 2, 0, 1, 4))
        o.view(hi - lo, 16, 16).mul_(dl[lo:hi].unsqueeze(-1))

    return float_phase(out, dst, floats)


DEQUANT_K: dict[str, Callable[..., torch.Tensor]] = {
    "Q2_K": dequant_q2_k,
    "Q3_K": dequant_q3_k,
    "Q4_K": dequant_q4_k,
    "Q5_K": dequant_q5_k,
    "Q6_K": dequant_q6_k,
}
