"""Unpack staging: a small buffer each dequantizing thread owns, reused by every call it makes.

A dequant computes in fp32 one cache-sized chunk of weights at a time and casts each chunk into the
output, so no call allocates anything of output size whatever the dtype or the matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Bytes of staging per chunk weight: 2 of integer work (code planes, indices), plus 4 for the fp32
# chunk when the output is bf16/fp16 (an fp32 output is its own chunk).
WORK_BYTES_PER_WEIGHT = 2
# Weights per chunk. Each chunk costs ~60 torch calls (ops and views) of 1-25 µs each on CPU
# (more on a loaded box: a cold dispatch), and per-block loops cost ~5 ns per block and op, so
# fixed costs fall with the chunk; the fp32 chunk then spills L2 (2 MiB a core here) into L3.
# Measured into bf16, 4096², 1 thread, thread-CPU medians of interleaved rounds (loaded box):
# Q4_K 44.4 / 39.0 / 34.4 ms and Q4_0 28.1 / 25.3 / 23.8 ms at 256 K / 512 K / 1 M weights;
# 2 M was slower again. GPU: each op is a kernel launch (~5 µs), so fewer chunks launch less;
# each dequantizing thread holds one staging (6 MiB at 1 M into bf16), counted in the ledger.
# Re-measured at 2 threads (2-vCPU EPYC, the 6 bench formats × fp32/bf16, 4096², medians of 15 interleaved
# rounds, two runs): 2 M weights a chunk with 512 K a thread a sub-chunk ran in 0.84-0.87 of the time of
# 1 M / 128 K (1 M / 512 K: 0.93-0.95; 2 M / 1 M: 0.91-0.94): each op's fork/join and dispatch cost more
# than the L3 traffic the larger sub-chunk adds. Staging: 12 MiB a thread into bf16 (4 MiB into fp32).
CHUNK_WEIGHTS = {"cpu": 1 << 21, "cuda": 1 << 20}
# Weights per float sub-chunk and intra-op thread: a kernel cuts its integer planes over the whole
# chunk, then runs the float phase (int→float, scale, min, cast into the output) over sub-chunks
# whose fp32 values (512 KiB a thread at 128 K) stay in L2 across those 3-4 passes instead of
# streaming from L3 each time. Each op splits a sub-chunk between torch's threads, so the
# sub-chunk grows with them: each thread's share stays what fits its L2, and every op is one
# fork/join of the thread pool fewer. CPU only: on a GPU every sub-chunk is more kernel launches
# and no cache is gained. Measured in the float phase alone (Q4_K, into bf16, 1 thread,
# thread-CPU medians, Xeon): 24.8 / 22.6 / 21.4 ms per 16.7 M weights at 1 M / 256 K / 128 K.
# At 2 threads (2-vCPU EPYC, whole unpacks, medians of 7 interleaved, a noisy box): 256 K was
# faster than 128 K in 11 of the 12 rows Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K × fp32, bf16; 512 K
# then measured faster still on that box. On a 2-vCPU Xeon (2 MiB L2 a core; 2 M chunks, medians of 21
# interleaved rounds, two runs) 256 K beat 512 K in 22 of 24 rows, by 0-15 %: at 512 K a thread's fp32
# (2 MiB) fills its L2. 256 K is the size that beat 128 K on the one box and 512 K on the other.
# Re-measured for the bf16 output alone on the 2-vCPU EPYC (1 MiB L2 a core, sysfs), fp32 kept at 256 K, the 6
# bench formats, 5 fresh processes per size: at 96 K and 128 K the worst format's bf16 ran 1.24-1.97x its fp32 in
# every process (the extra fork/joins cost more than the L2 hits gain); 384 K and 512 K beat 256 K by 1-5 % in processes
# that ran fast, and lost by up to 50 % in those that ran the whole process ~1.8x slower (this VM's slow state,
# fp32 too). 256 K stays.
FLOAT_SUB_WEIGHTS = {"cpu": 1 << 18}


def bytes_per_weight(out_dtype: torch.dtype) -> int:
    return WORK_BYTES_PER_WEIGHT + (0 if out_dtype == torch.float32 else 4)


def staging_bytes(device_type: str, largest_weights: int, out_dtype: torch.dtype) -> int:
    """Staging one thread needs to unpack tensors of up to `largest_weights` weights into `out_dtype`
    on `device_type` (one chunk, or the whole tensor when it is smaller than a chunk)."""
    cap = CHUNK_WEIGHTS.get(device_type, CHUNK_WEIGHTS["cuda"])
    weights = min(cap, max(0, int(largest_weights)))
    # chunk_buffers rounds its chunk down to an even count (the work area's alignment): an odd count is rounded up
    # here, or a 1-weight tensor (a 0-dim scalar) got a chunk of none
    return bytes_per_weight(out_dtype) * (weights + weights % 2)


def float_phase(f32: torch.Tensor, dst: torch.Tensor | None, body: Callable[[int, int, torch.Tensor], None]) -> torch.Tensor:
    """Run a kernel's float phase over blocks 0..n of its (n, block_weights) fp32 chunk `f32`.

    `body(lo, hi, o)` writes the fp32 weights of blocks lo..hi into o, a (hi - lo, block_weights)
    float32 view; it may read only integer planes and per-block scales, since `f32` (staging for
    the integer phase) is overwritten. dst None: one pass into `f32`, which is the result (the
    whole-tensor form torch.compile traces). Else `dst` (n, block_weights), any float dtype: on
    CPU in sub-chunks, each computed in `dst` itself when it is fp32 (then `f32` may be `dst`),
    else in the head of `f32` and cast into `dst` at once, while it is in L2."""
    n = f32.shape[0]
    if dst is None:
        body(0, n, f32)
        return f32
    sub = FLOAT_SUB_WEIGHTS.get(f32.device.type)
    step = n if sub is None else max(1, sub * torch.get_num_threads() // f32.shape[1])
    direct = dst.dtype == torch.float32
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        if direct:
            body(lo, hi, dst[lo:hi])
        else:
            o = f32[: hi - lo]
            body(lo, hi, o)
            dst[lo:hi].copy_(o)
    return dst


def new_staging(nbytes: int, device: torch.device | str) -> torch.Tensor:
    """A flat uint8 staging buffer, zero-filled so its pages are touched once, here, not in a hot call."""
    return torch.zeros(int(nbytes), dtype=torch.uint8, device=device)


@dataclass(frozen=True)
class ChunkBuffers:
    """The two views a kernel gets out of one staging buffer."""

    chunk_weights: int
    f32: torch.Tensor | None  # (chunk_weights,) float32, the chunk before its cast; None for fp32 output
    work: torch.Tensor  # (2·chunk_weights,) uint8, 8-byte aligned: integer planes, indices


def chunk_buffers(staging: torch.Tensor, out_dtype: torch.dtype) -> ChunkBuffers:
    if staging.dtype != torch.uint8 or staging.dim() != 1:
        raise ValueError(f"staging must be a flat uint8 tensor, got {staging.dtype} of shape {tuple(staging.shape)}")
    # Wider dtype views need an aligned start; a slice of a bigger buffer may not have one.
    if staging.data_ptr() % 8:
        raise ValueError("staging must start on an 8-byte boundary")
    c = staging.numel() // bytes_per_weight(out_dtype)
    c -= c % 2  # the work area then starts 8-byte aligned: kernels view it as int32 or int64
    if out_dtype == torch.float32:
        return ChunkBuffers(c, None, staging[: 2 * c])
    return ChunkBuffers(c, staging[: 4 * c].view(torch.float32), staging[4 * c : 6 * c])


@dataclass(frozen=True)
class StagedUnpack:
    """A format bound to one thread's staging (None for a format that needs none): `unpack(packed, out)` as the
    format's, allocating nothing and checking nothing (the runtime's hot path).

    Hazard: two threads (or GPU streams) must never share one: each chunk overwrites the staging.
    """

    format: object  # StorageFormat (not imported: base imports this module)
    staging: torch.Tensor

    @property
    def name(self) -> str:
        return self.format.name

    def unpack(self, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The format's unpack without its argument checks: for the runtime's own packed blobs and outputs
        (aligned, contiguous, on one device, sized by the plan), in its hot path."""
        self.format.unpack_trusted(packed, out, self.staging)
        return out
