"""The dtype vocabulary: compute and KV dtype names, their byte sizes, torch dtypes and storage formats.

One table per question, imported by every layer (workload sizing, the simulator, policies, the runtime,
the measurements and the pipelines) so a dtype name means the same bytes everywhere.
"""

from __future__ import annotations

import torch

# What the matmuls run in: bytes per element.
COMPUTE_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}

# What the KV cache is stored in: bytes per element.
KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# The torch dtype of each compute dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The torch dtype of each KV dtype. fp8 is e4m3 at unit scale: |k|, |v| > 448 saturate (clamped on write).
KV_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
}

# The storage format a compute dtype reads without a dequant (a block stored so is viewed in place).
DTYPE_FORMAT: dict[str, str] = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def weights_format(compute_dtype: str) -> str:
    """The storage format that needs no dequant for `compute_dtype` ("bf16" -> "BF16"); KeyError if unknown."""
    return DTYPE_FORMAT[compute_dtype]


__all__ = ["COMPUTE_DTYPE_BYTES", "DTYPE_FORMAT", "KV_DTYPE_BYTES", "KV_TORCH_DTYPES", "TORCH_DTYPES",
           "weights_format"]
