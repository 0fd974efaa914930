"""Host-side quantizers for the GGUF K-quants Q4_K, Q5_K and Q6_K, in ggml's byte layouts.

gguf's Python package only reads these types; attaching a model needs us to write them too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK = 256  # weights per super-block
# Super-blocks per pass: each candidate scale allocates ~10 temporaries of the chunk's size,
# and keeping them near cache size is worth ~2x over one pass across a whole matrix.
_CHUNK = 2048
# Inputs are clamped here: no format decodes beyond ~1.3e8 (fp16 max * 63 * 31), and it keeps
# squares and sums in float32 range.
_LIMIT = 1.0e8
_F16_MAX = 65504.0

# Offsets added to nmax for the candidate inverse scales (nmax + step) / range.
_Q4_STEPS = [i / 10 for i in range(-10, 11, 2)]
_Q5_STEPS = [i / 10 for i in range(-10, 11)]
_Q6_STEPS = [i / 10 for i in range(-20, 21, 2)]

Tensor = torch.Tensor


def _prepare(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Clean the input, and a power of two near each super-block's max |x| to divide by.

    The search runs on x / norm: exact (power-of-two division) and it keeps its sums of
    squares away from float32 underflow for tiny weights.
    """
    x = torch.nan_to_num(blocks.float(), nan=0.0, posinf=_LIMIT, neginf=-_LIMIT).clamp(-_LIMIT, _LIMIT)
    amax = x.abs().amax(-1, keepdim=True)
    _, exp = torch.frexp(torch.where(amax > 0, amax, torch.ones_like(amax)))
    return x, torch.ldexp(torch.ones_like(amax), exp)


def _f16(v: Tensor) -> Tensor:
    """fp16 of a non-negative super-block scale, rounded up (so every sub-block scale codes within the 6/8-bit
    range) and saturating instead of overflowing to inf. Rounded to nearest, a scale below fp16's smallest
    subnormal (6e-8: weights of std ~3e-6 at Q4_K) became 0 and its block decoded as its mins alone: twice the
    error of storing zeros; rounded up it stays a coarse but working step."""
    h = v.clamp(0.0, _F16_MAX).to(torch.float16)
    up = (h.float() < v) & (h < _F16_MAX)
    return torch.where(up, (h.view(torch.int16) + 1).view(torch.float16), h)  # bits + 1: the next fp16 above


def _f16_bytes(v: Tensor) -> Tensor:
    return v.reshape(-1).view(torch.uint8).reshape(-1, 2)


def _codes(s: Tensor, d: Tensor, lo: int, hi: int) -> Tensor:
    """Integer codes for sub-block scales s against the fp16 super-scale d (0 where d is 0)."""
    df = d.float()
    return torch.where(df > 0, torch.round(s / df.clamp_min(1e-38)), torch.zeros_like(s)).clamp(lo, hi)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


# ---------------------------------------------------------------------------- Q4_K, Q5_K


def _fit_affine(x: Tensor, nmax: int, steps: list[float]) -> tuple[Tensor, Tensor]:
    """Per row of x, a (scale >= 0, offset <= 0) with low ||scale*q + offset - x||, q in [0, nmax].

    Each candidate rounds x with iscale = (nmax + step) / (max - min), then refits scale and
    offset by least squares on those levels; the lowest error wins. The offset is capped at 0
    because the format stores it as a subtracted non-negative min.
    """
    n = x.shape[-1]
    mn = x.amin(-1, keepdim=True).clamp(max=0.0)
    rng = x.amax(-1, keepdim=True) - mn
    sx = x.sum(-1, keepdim=True)
    sxx = (x * x).sum(-1, keepdim=True)
    # min/max fit as the default, in case every candidate's sums come out NaN
    best_s, best_m = rng / nmax, mn
    best_e = torch.full_like(mn, float("inf"))
    inv_rng = _safe_div(torch.ones_like(rng), rng)
    xs = x - mn
    for step in steps:
        q = torch.round(xs * (inv_rng * (nmax + step))).clamp_(0, nmax)
        sq = q.sum(-1, keepdim=True)
        sqq = (q * q).sum(-1, keepdim=True)
        sqx = (q * x).sum(-1, keepdim=True)
        det = n * sqq - sq * sq
        s = _safe_div(n * sqx - sq * sx, det)
        m = _safe_div(sqq * sx - sq * sqx, det)
        # A positive offset: refit the scale alone with offset 0. All levels equal (det 0):
        # the best is the constant mean, as an offset if <= 0, else through the scale.
        flat = det <= 0
        flat_neg = flat & (sx <= 0)
        alone = (flat & ~flat_neg) | (m > 0)
        s = torch.where(alone, _safe_div(sqx, sqq), s).clamp_min(0.0)
        s = torch.where(flat_neg, torch.zeros_like(s), s)
        m = torch.where(flat_neg, sx / n, torch.where(alone, torch.zeros_like(m), m))
        # squared error from the sums saves a pass over x; float32 cancellation here is ~1e-6 of
        # sum x^2, far below the ~1e-3 relative gaps between candidates
        e = sxx - 2 * s * sqx - 2 * m * sx + s * s * sqq + 2 * s * m * sq + n * m * m
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
    return best_s, best_m


def _round_affine(xb: Tensor, sc: Tensor, mo: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Levels of xb on the grid sc*q - mo, and the squared error per sub-block."""
    sc, mo = sc.unsqueeze(-1), mo.unsqueeze(-1)
    q = torch.round(_safe_div(xb + mo, sc)).clamp_(0, nmax)
    return q, (sc * q - mo - xb).square_().sum(-1)


def _quant_affine(blocks: Tensor, nmax: int, steps: list[float]) -> tuple[Tensor, ...]:
    """Shared Q4_K/Q5_K path: (d, dmin) fp16, 12 scale bytes, levels (n, 8, 32) uint8."""
    x, norm = _prepare(blocks)
    nb = x.shape[0]
    s, m = _fit_affine((x / norm).reshape(nb * 8, 32), nmax, steps)
    s = s.reshape(nb, 8) * norm
    mins = -m.reshape(nb, 8) * norm
    d, dmin = _f16(s.amax(-1, keepdim=True) / 63), _f16(mins.amax(-1, keepdim=True) / 63)
    df, dminf = d.float(), dmin.float()
    ls, lm = _codes(s, d, 0, 63), _codes(mins, dmin, 0, 63)
    # Re-round the weights on the grid the stored 6-bit codes define (the fit's own levels
    # would be stale by up to half a code step), and let each sub-block move its scale and
    # min codes by one where that lowers its error: small scales, coded with few steps of d,
    # lose most in the 6-bit rounding, and this recovers most of that loss.
    xb = x.reshape(nb, 8, 32)
    q, err = _round_affine(xb, df * ls, dminf * lm, nmax)
    best_ls, best_lm = ls, lm
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            if a or b:
                ls2, lm2 = (ls + a).clamp(0, 63), (lm + b).clamp(0, 63)
                q2, e2 = _round_affine(xb, df * ls2, dminf * lm2, nmax)
                better = e2 < err
                err = torch.where(better, e2, err)
                best_ls, best_lm = torch.where(better, ls2, best_ls), torch.where(better, lm2, best_lm)
                q = torch.where(better.unsqueeze(-1), q2, q)
    # a sub-block whose coded grid is worse than zeros (a scale that coded to 0 beside a min that did not)
    # stores zeros
    zero = err > xb.square().sum(-1)
    best_ls, best_lm = best_ls.masked_fill(zero, 0), best_lm.masked_fill(zero, 0)
    return d, dmin, _pack_scales_6bit(best_ls.to(torch.uint8), best_lm.to(torch.uint8)), q.to(torch.uint8)


def _pack_scales_6bit(ls: Tensor, lm: Tensor) -> Tensor:
    """Eight 6-bit scales and eight 6-bit mins into ggml's 12-byte layout.

    Bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of
    scales / mins 4-7 in bits 6-7; bytes 8-11 hold the low nibbles of scale 4+k | min 4+k.
    """
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _nibbles(q: Tensor) -> Tensor:
    """Levels (n, 8, 32): sub-blocks 2c and 2c+1 share bytes 32c..32c+31 as low/high nibble."""
    lo = q & 0x0F
    return (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(q.shape[0], 128)


def _q4_k(blocks: Tensor) -> Tensor:
    d, dmin, scales, q = _quant_affine(blocks, 15, _Q4_STEPS)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles(q)], dim=1)


def _q5_k(blocks: Tensor) -> Tensor:
    d, dmin, scales, q = _quant_affine(blocks, 31, _Q5_STEPS)
    # bit 4 of weight j of sub-block b is bit b of byte j
    bit4 = ((q >> 4) & 1).to(torch.int32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)
    qh = bit4.sum(1).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, qh, _nibbles(q)], dim=1)


# ---------------------------------------------------------------------------- Q6_K


def _fit_symmetric(x: Tensor, steps: list[float]) -> Tensor:
    """Per row of x, a signed scale with low ||scale*q - x||, q in [-32, 31].

    Candidates send the largest-|x| element to about -32, the longer side of the range (so
    the scale has the opposite sign of that element), and are refit by least squares.
    """
    peak = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))
    inv_peak = _safe_div(torch.ones_like(peak), peak)
    best_s, best_g = torch.zeros_like(peak), torch.zeros_like(peak)
    for step in steps:
        q = torch.round(x * (inv_peak * -(32.0 + step))).clamp_(-32, 31)
        sqx = (q * x).sum(-1, keepdim=True)
        sqq = (q * q).sum(-1, keepdim=True)
        # error = sum x^2 - sqx^2 / sqq: maximise the gain term
        g = _safe_div(sqx * sqx, sqq)
        better = g > best_g
        best_g = torch.where(better, g, best_g)
        best_s = torch.where(better, _safe_div(sqx, sqq), best_s)
    return best_s


def _round_symmetric(xb: Tensor, sc: Tensor) -> tuple[Tensor, Tensor]:
    sc = sc.unsqueeze(-1)
    q = torch.round(_safe_div(xb, sc)).clamp_(-32, 31)
    return q, (sc * q - xb).square_().sum(-1)


def _q6_k(blocks: Tensor) -> Tensor:
    x, norm = _prepare(blocks)
    nb = x.shape[0]
    s = _fit_symmetric((x / norm).reshape(nb * 16, 16), _Q6_STEPS).reshape(nb, 16) * norm
    d = _f16(s.abs().amax(-1, keepdim=True) / 127)
    df = d.float()
    ls = _codes(s, d, -127, 127)
    # as for Q4_K: re-round on the stored int8 scales, letting each move by one code
    xb = x.reshape(nb, 16, 16)
    q, err = _round_symmetric(xb, df * ls)
    for a in (-1, 1):
        ls2 = (ls + a).clamp(-127, 127)
        q2, e2 = _round_symmetric(xb, df * ls2)
        better = e2 < err
        err = torch.where(better, e2, err)
        ls = torch.where(better, ls2, ls)
        q = torch.where(better.unsqueeze(-1), q2, q)
    ls = ls.masked_fill(err > xb.square().sum(-1), 0)  # worse than zeros: zeros
    q = (q + 32).to(torch.uint8).reshape(nb, 256)
    # low nibbles: byte 64h+j holds weight 128h+j (low) and 128h+64+j (high)
    lo = (q & 0x0F).reshape(nb, 2, 2, 64)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    # top 2 bits: byte 32h+j holds weight 128h+32k+j in bits 2k..2k+1, k = 0..3
    shifts = (2 * torch.arange(4, dtype=torch.int32)).view(1, 1, 4, 1)
    qh = ((q >> 4).reshape(nb, 2, 4, 32).to(torch.int32) << shifts).sum(2).to(torch.uint8).reshape(nb, 64)
    return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


# ---------------------------------------------------------------------------- public


_F16_NAN = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8)


def _chunked(fn: Callable[[Tensor], Tensor], type_size: int, d_at: int) -> Callable[[Tensor], Tensor]:
    """`fn` over chunks of super-blocks; a super-block holding NaN or ±inf gets a NaN super-scale (bytes d_at,
    d_at + 1), so it decodes as NaN as eager would compute with it, not as quiet finite numbers (the legacy
    formats carry NaN through their scale the same way)."""

    def quant(blocks: Tensor) -> Tensor:
        if blocks.dim() != 2 or blocks.shape[1] != QK:
            raise ValueError(f"expected (n_blocks, {QK}) weights, got {tuple(blocks.shape)}")
        blocks = blocks.detach().to("cpu", torch.float32)
        out = torch.empty(blocks.shape[0], type_size, dtype=torch.uint8)
        for i in range(0, blocks.shape[0], _CHUNK):
            out[i : i + _CHUNK] = fn(blocks[i : i + _CHUNK])
        bad = ~torch.isfinite(blocks).all(1)
        if bool(bad.any()):
            out[bad, d_at : d_at + 2] = _F16_NAN
        return out

    quant.__name__ = quant.__qualname__ = f"quant{fn.__name__}"
    return quant


# f32 (n_blocks, 256) -> uint8 (n_blocks, type_size), readable by gguf.quants.dequantize
QUANT_K: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_K": _chunked(_q4_k, 144, 0),
    "Q5_K": _chunked(_q5_k, 176, 0),
    "Q6_K": _chunked(_q6_k, 210, 208),
}
