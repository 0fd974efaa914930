"""The storage-format contract: exact byte size, host-side pack, device-side unpack.

A packed tensor is one flat uint8 blob (what GGUF stores and what the runtime streams).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from residency.errors import FormatError
from residency.formats.staging import new_staging, staging_bytes
from residency.validate import a_type

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StorageFormat(ABC):
    """How a weight tensor is kept. Subclasses implement `_pack` and `_unpack_into`.

    Quantized formats group `block_weights` consecutive weights of the last dimension
    into one block of `block_bytes` bytes; float formats have block_weights == 1.
    """

    name: str
    block_weights: int  # weights per block, along the last dim
    block_bytes: int  # bytes per block (data + scales)
    gguf_type: int | None  # GGMLQuantizationType value, None if GGUF has no such type
    can_pack: bool = True  # False for dequant-only formats (Q2_K, Q3_K)
    uses_staging: ClassVar[bool] = True  # False where unpack is one cast-copy (plain float formats)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_weights

    @property
    def is_quantized(self) -> bool:
        return self.block_weights > 1 or self.name in ("FP8",)

    def supports(self, shape: Sequence[int]) -> bool:
        # min()/prod over the dims as given: ~0.3 µs where int() per dim in a generator cost ~1.5 µs, and
        # inspect sizes every tensor of a checkpoint in several formats (200,000 tensors × 5 formats).
        if not shape:  # a scalar (CLIP's logit_scale, Gemma's embed_scale): one weight, no block to fill
            return self.block_weights == 1
        return min(shape) >= 0 and shape[-1] % self.block_weights == 0

    def nbytes(self, shape: Sequence[int]) -> int:
        """Exact packed size in bytes of a tensor of `shape` (torch order)."""
        self.check_shape(shape)
        return self.nbytes_of_supported(shape)

    def nbytes_of_supported(self, shape: Sequence[int]) -> int:
        """nbytes for a shape already known to pass `supports` (the sizing rule checks it once, not twice)."""
        return int(math.prod(shape)) // self.block_weights * self.block_bytes

    def nbytes_or_none(self, shape: Sequence[int]) -> int | None:
        return self.nbytes(shape) if self.supports(shape) else None

    def check_shape(self, shape: Sequence[int]) -> None:
        if any(not isinstance(d, int) or d < 0 for d in shape):  # else read as a block-size problem
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not a shape (whole dimensions, 0 or more)")
        if not self.supports(shape):
            raise FormatError(
                f"{self.name} cannot store a tensor of shape {tuple(shape)}: "
                f"its last dimension must be a multiple of {self.block_weights}",
                hint="keep this tensor in BF16/F16/F32, or pick a format with a smaller block",
            )

    # --- host side -------------------------------------------------------
    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize a float tensor (any device) into a flat uint8 CPU tensor of nbytes(shape)."""
        if not self.can_pack:
            raise FormatError(
                f"{self.name} is dequant-only: residency reads it from GGUF files but does not quantize to it",
                hint="use Q4_K, Q5_K or Q6_K to quantize",
            )
        if not isinstance(weight, torch.Tensor):
            raise FormatError(f"{self.name}: pack takes a torch tensor, not a {type(weight).__name__}",
                              hint="e.g. torch.from_numpy(array) or torch.tensor(values)")
        if weight.is_meta:
            raise FormatError(f"{self.name}: a meta tensor holds no values to pack", hint="load the weights first")
        self.check_shape(tuple(weight.shape))
        packed = self._pack(weight.detach().to("cpu", torch.float32).contiguous())
        assert packed.dtype == torch.uint8 and packed.numel() == self.nbytes(tuple(weight.shape))
        return packed.reshape(-1)

    # --- device side -----------------------------------------------------
    def unpack(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantize `packed` (uint8, on the device) into the preallocated `out`.

        `out` gives the shape and the compute dtype (fp32, fp16 or bf16). `staging` is the calling
        thread's own buffer (residency.formats.staging): with it, a call allocates nothing above a few
        hundred KiB, whatever the matrix. Without it, one is allocated for this call (not for hot paths).
        A bf16/fp16 result is the fp32 result rounded once.
        """
        for what, t in (("packed", packed), ("out", out)):
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{self.name}: unpack's {what} is {a_type(t)}, not a torch tensor",
                                  hint="packed: the uint8 tensor pack() returned; out: torch.empty(shape, dtype=…)")
        if out.dtype not in OUT_DTYPES:
            raise FormatError(f"{self.name}: cannot unpack into dtype {out.dtype}", hint="use float32, float16 or bfloat16")
        if out.is_meta or packed.device != out.device:  # a meta out was "written" silently by some formats
            raise FormatError(f"{self.name}: packed is on {packed.device}, out on {out.device}",
                              hint="put both on the device that computes (a meta tensor holds no values)")
        if out.requires_grad:
            raise FormatError(f"{self.name}: out requires grad; unpack writes it in place",
                              hint="torch.empty(shape, dtype=…) without requires_grad, or unpack under torch.no_grad()")
        expect = self.nbytes(tuple(out.shape))
        if packed.dtype != torch.uint8 or packed.numel() != expect:
            raise FormatError(
                f"{self.name}: packed buffer holds {packed.numel()} {packed.dtype} elements, "
                f"expected {expect} uint8 for shape {tuple(out.shape)}"
            )
        if not out.is_contiguous():
            raise FormatError(f"{self.name}: output buffer must be contiguous")
        if not packed.is_contiguous() or packed.storage_offset() % 8 or packed.data_ptr() % 8:
            # a slice of a larger buffer at an odd offset: the fp16/fp32 views of its fields need alignment.
            # Cost: one copy of the packed bytes (not a hot path: the runtime's blobs are aligned)
            packed = packed.contiguous().clone()
        if staging is None and self.uses_staging and out.numel():
            staging = new_staging(staging_bytes(out.device.type, out.numel(), out.dtype), out.device)
        elif staging is not None and staging.device != out.device:
            raise FormatError(f"{self.name}: staging is on {staging.device}, the output on {out.device}")
        self._unpack_into(packed.reshape(-1), out, staging)
        return out

    def unpack_trusted(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        """unpack() without its checks, for the runtime's own buffers (flat aligned uint8 `packed` of
        nbytes(out.shape), contiguous `out` on its device, the thread's `staging` or None where the format
        uses none). Hazard: a wrong argument is undefined behaviour, not an error."""
        self._unpack_into(packed if packed.dim() == 1 else packed.reshape(-1), out, staging)

    def dequantize(self, packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Convenience: allocate the output and unpack into it (not for hot paths)."""
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
        return self.unpack(packed, out)

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """pack then unpack in fp32 on the CPU: the values this format really stores."""
        return self.dequantize(self.pack(weight), tuple(weight.shape), torch.float32)

    @abstractmethod
    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantize a contiguous float32 CPU tensor into uint8 bytes (each format implements it)."""

    @abstractmethod
    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        """Dequantize flat uint8 `packed` into `out`, chunk by chunk through `staging` (None only where
        `uses_staging` is False, or `out` is empty)."""


def relative_rms_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖w − ŵ‖₂ / ‖w‖₂ in float64: the default sensitivity proxy of a format on a block."""
    w = weight.detach().double()
    denom = torch.linalg.vector_norm(w).item()
    if denom == 0.0:
        return 0.0
    return torch.linalg.vector_norm(w - approx.detach().double()).item() / denom
