"""Inputs of the measurements: one packed blob per storage format (made on the host; dequant-only formats,
Q2_K and Q3_K, get random valid blocks with small finite fp16 scales), and the non-matmul op mix.
"""

from __future__ import annotations

import numpy as np
import torch

from residency.formats import FORMATS, StorageFormat

# Q2_K/Q3_K keep their fp16 super-block scales (d, dmin or d) in the last 4 bytes of a block.
_KQUANT_SCALE_BYTES = 4


def packed_sample(fmt: StorageFormat, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A flat uint8 blob of `fmt.nbytes((rows, cols))` bytes that unpacks to finite weights."""
    if fmt.can_pack:
        gen = torch.Generator().manual_seed(seed)
        return fmt.pack(torch.randn(rows, cols, generator=gen))
    blocks = rows * cols // fmt.block_weights
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(blocks, fmt.block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal((blocks, 2)) * 1e-2).astype(np.float16)
    raw[:, -_KQUANT_SCALE_BYTES:] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def measured_formats() -> list[str]:
    """Every registered format; each has an unpack path on every device."""
    return list(FORMATS)


MIX_CHANNELS = 256  # the op mix's activations: (1, tokens, MIX_CHANNELS), tokens setting the size class


def op_mix(x: torch.Tensor) -> torch.Tensor:
    """The non-matmul ops of a block: norm, scale-and-shift, activations, a head split and a softmax.
    x: (batch, tokens, channels) with channels divisible by 4."""
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],))
    y = torch.nn.functional.gelu(y * 1.1 + x)
    y = torch.nn.functional.silu(y)
    y = y.view(x.shape[0], x.shape[1], 4, -1).permute(0, 2, 1, 3).reshape(x.shape)
    return torch.softmax(y, -1)


def count_op_mix(shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    """The op mix's counts (residency.workload.op_count.OpCounter) on a meta tensor of `shape`. The meta
    tensor is made outside the counter: a `.to("meta")` inside it would count one copy the timed mix never
    runs (11 ops instead of 10, +12 % elements)."""
    from residency.workload.op_count import OpCounter

    x = torch.empty(shape, dtype=dtype, device="meta")
    with OpCounter() as counter:
        op_mix(x)
    return counter
