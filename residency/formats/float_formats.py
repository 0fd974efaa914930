"""Unquantized storage (F32, F16, BF16) and FP8 e4m3 with a per-row float32 scale.

FP8 blob layout: rows × float32 scales first (aligned at offset 0), then rows × cols e4m3 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from residency.formats.base import StorageFormat
from residency.formats.staging import chunk_buffers

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448


@dataclass(frozen=True)
class PlainFormat(StorageFormat):
    torch_dtype: torch.dtype = torch.float32
    uses_staging: ClassVar[bool] = False  # one cast-copy: torch converts in registers, no temporary

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.torch_dtype).contiguous().reshape(-1).view(torch.uint8)  # reshape first: a scalar too

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        out.copy_(packed.view(self.torch_dtype).view(out.shape))


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    cols = int(shape[-1]) if len(shape) else 1
    rows = math.prod(int(d) for d in shape[:-1]) if len(shape) > 1 else 1
    return rows, cols


@dataclass(frozen=True)
class FP8RowFormat(StorageFormat):
    """e4m3 storage, scale = row absmax / 448, so every row uses the full e4m3 range."""

    def nbytes_of_supported(self, shape: Sequence[int]) -> int:
        rows, cols = _rows_cols(shape)
        return rows * 4 + rows * cols

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = _rows_cols(weight.shape)
        w = weight.reshape(rows, cols)
        amax = w.abs().amax(dim=1, keepdim=True) if cols else torch.zeros(rows, 1)
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        q = (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
        return torch.cat([scale.reshape(-1).view(torch.uint8), q.view(torch.uint8).reshape(-1)])

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        from residency.formats.compiled import unpack_kernel

        rows, cols = _rows_cols(out.shape)
        unpack_kernel(self, out.dtype, packed.device)(packed, out.view(rows, cols), staging)

    def _parts(self, packed: torch.Tensor, out2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = out2d.shape
        flat = packed.reshape(-1)
        return flat[: rows * 4].view(torch.float32).view(rows, 1), flat[rows * 4 :].view(_FP8).view(rows, cols)

    def eager_unpack(self, packed: torch.Tensor, out2d: torch.Tensor, staging: torch.Tensor | None) -> None:
        """Row chunks (column chunks too, for rows longer than a chunk): e4m3 → fp32 is exact, the one
        multiply by the row scale rounds in fp32, and a bf16/fp16 chunk is then one cast of that."""
        rows, cols = out2d.shape
        if rows * cols == 0:
            return
        scale, q = self._parts(packed, out2d)
        if out2d.dtype == torch.float32:  # copy, then scale in place: no staging at all
            out2d.copy_(q)
            out2d.mul_(scale)
            return
        f32 = chunk_buffers(staging, out2d.dtype).f32
        cstep = min(cols, f32.numel())
        rstep = max(1, f32.numel() // cols)
        for r in range(0, rows, rstep):
            for c in range(0, cols, cstep):
                src, dst = q[r : r + rstep, c : c + cstep], out2d[r : r + rstep, c : c + cstep]
                s = f32[: dst.numel()].view(dst.shape)
                s.copy_(src)  # mul with an fp8 input would first cast it into a fresh fp32 temporary
                s.mul_(scale[r : r + rstep])
                dst.copy_(s)

    def fused_unpack(self, packed: torch.Tensor, out2d: torch.Tensor) -> None:
        """The whole tensor at once, for torch.compile to fuse."""
        scale, q = self._parts(packed, out2d)
        out2d.copy_(q.float() * scale)
