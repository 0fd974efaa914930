"""GGUF block formats (Q8_0 … Q6_K): a StorageFormat over a per-block torch kernel.

Kernels map uint8 blocks (n, block_bytes) → float32 weights (n, block_weights); their
float32 result equals gguf.quants.dequantize bit for bit, so fp32 output is exact and a
bf16/fp16 output, one cast of it, is correctly rounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from residency.errors import FormatError
from residency.formats.base import StorageFormat
from residency.formats.staging import chunk_buffers

# (blocks uint8 (n, block_bytes), out f32 (n, block_weights) or None, work uint8 or None, dst or None)
# -> the result. `work` holds the kernel's integer planes (at most 2 bytes per weight); None: the kernel
# allocates them. dst None: the result is fp32 in `out`; else `out` is the fp32 staging of the chunk and
# the result goes into `dst` (n, block_weights) of any float dtype (staging.float_phase).
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

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        from residency.formats.compiled import unpack_kernel

        blocks = packed.view(-1, self.block_bytes)
        unpack_kernel(self, out.dtype, blocks.device)(blocks, out.view(-1, self.block_weights), staging)

    def eager_unpack(self, blocks: torch.Tensor, out2d: torch.Tensor, staging: torch.Tensor | None) -> None:
        """Chunk by chunk: the kernel cuts a chunk's integer planes into the staging, then runs its float
        phase in cache-sized sub-chunks straight into an fp32 `out2d`, else through the head of the
        staging's fp32 chunk, each sub-chunk cast into `out2d` while it is still in cache."""
        assert self.dequant_kernel is not None
        n = blocks.shape[0]
        if n == 0:
            return
        buf = chunk_buffers(staging, out2d.dtype)
        step = buf.chunk_weights // self.block_weights
        if step == 0:
            raise FormatError(f"{self.name}: staging of {staging.numel()} bytes holds no {self.block_weights}-weight block")
        direct = out2d.dtype == torch.float32
        for i in range(0, n, step):
            b, o = blocks[i : i + step], out2d[i : i + step]
            f32 = o if direct else buf.f32[: o.numel()].view(o.shape)
            self.dequant_kernel(b, out=f32, work=buf.work, dst=o)

    def fused_unpack(self, blocks: torch.Tensor, out2d: torch.Tensor) -> None:
        """The whole tensor at once, for torch.compile to fuse (eager, it would allocate output-sized
        fp32 temporaries)."""
        assert self.dequant_kernel is not None
        if out2d.dtype == torch.float32:
            self.dequant_kernel(blocks, out=out2d)
        else:
            out2d.copy_(self.dequant_kernel(blocks))
