"""GGUF block formats (Q8_0 … Q6_K): a StorageFormat over a per-block torch kernel.

Kernels map uint8 blocks (n, block_bytes) → float32 weights (n, block_weights); their
float32 result equals gguf.quants.dequantize bit for bit, so fp32 output is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from residency.formats.base import StorageFormat

# uint8 (n, block_bytes), optional contiguous f32 out (n, block_weights) -> f32 (n, block_weights)
DequantKernel = Callable[..., torch.Tensor]
QuantKernel = Callable[[torch.Tensor], torch.Tensor]  # f32 (n, block_weights) -> uint8 (n, block_bytes)


@dataclass(frozen=True)
class GGUFBlockFormat(StorageFormat):
    dequant_kernel: DequantKernel | None = field(default=None, compare=False, repr=False)
    quant_kernel: QuantKernel | None = field(default=None, compare=False, repr=False)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        assert self.quant_kernel is not None
        blocks = weight.reshape(-1, self.block_weights)
        return self.quant_kernel(blocks).reshape(-1)

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from residency.formats.compiled import unpack_kernel

        blocks = packed.view(-1, self.block_bytes)
        unpack_kernel(self, out.dtype, blocks.device)(blocks, out.view(-1, self.block_weights))

    def eager_unpack(self, blocks: torch.Tensor, out2d: torch.Tensor) -> None:
        """The reference path: kernel in fp32, then one cast-copy into `out2d` — or, for fp32 output,
        straight into it."""
        assert self.dequant_kernel is not None
        if out2d.dtype == torch.float32:
            self.dequant_kernel(blocks, out=out2d)
        else:
            out2d.copy_(self.dequant_kernel(blocks))
