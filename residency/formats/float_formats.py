"""Unquantized storage (F32, F16, BF16) and FP8 e4m3 with a per-row float32 scale.

FP8 blob layout: rows × float32 scales first (aligned at offset 0), then rows × cols e4m3 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from residency.formats.base import StorageFormat

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448


@dataclass(frozen=True)
class PlainFormat(StorageFormat):
    torch_dtype: torch.dtype = torch.float32

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.torch_dtype).contiguous().view(torch.uint8).reshape(-1)

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(packed.view(self.torch_dtype).view(out.shape))

    def eager_unpack(self, blocks: torch.Tensor, out2d: torch.Tensor) -> None:
        out2d.copy_(blocks.reshape(-1).view(self.torch_dtype).view(out2d.shape))


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    cols = int(shape[-1]) if len(shape) else 1
    rows = math.prod(int(d) for d in shape[:-1]) if len(shape) > 1 else 1
    return rows, cols


@dataclass(frozen=True)
class FP8RowFormat(StorageFormat):
    """e4m3 storage, scale = row absmax / 448, so every row uses the full e4m3 range."""

    def nbytes(self, shape: Sequence[int]) -> int:
        self.check_shape(shape)
        rows, cols = _rows_cols(shape)
        return rows * 4 + rows * cols

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = _rows_cols(weight.shape)
        w = weight.reshape(rows, cols)
        amax = w.abs().amax(dim=1, keepdim=True) if cols else torch.zeros(rows, 1)
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        q = (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
        return torch.cat([scale.reshape(-1).view(torch.uint8), q.view(torch.uint8).reshape(-1)])

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from residency.formats.compiled import unpack_kernel

        rows, cols = _rows_cols(out.shape)
        unpack_kernel(self, out.dtype, packed.device)(packed, out.view(rows, cols))

    def eager_unpack(self, packed: torch.Tensor, out2d: torch.Tensor) -> None:
        rows, cols = out2d.shape
        flat = packed.reshape(-1)
        scale = flat[: rows * 4].view(torch.float32).view(rows, 1)
        q = flat[rows * 4 :].view(_FP8).view(rows, cols)
        # One fp32 temporary of output size: the multiply runs in fp32 so the scale is applied exactly.
        if out2d.dtype == torch.float32:
            torch.mul(q.float(), scale, out=out2d)
        else:
            out2d.copy_(q.float() * scale)
