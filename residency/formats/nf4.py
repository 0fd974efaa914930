"""NF4 (4-bit NormalFloat, blocks of 64) packed by bitsandbytes, unpacked in pure torch.

bitsandbytes has no CPU `out=` dequant; our lookup reproduces its result bit for bit.
Blob layout: float32 absmax per 64-weight block, then the 4-bit codes (high nibble first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from residency.errors import FormatError
from residency.formats.base import StorageFormat
from residency.formats.staging import chunk_buffers

BLOCK = 64
_code_cache: dict[torch.device, torch.Tensor] = {}
_pair_cache: dict[torch.device, torch.Tensor] = {}
# bitsandbytes' CPU backend warns on import when the optional `kernels` package (its 4-bit GEMM) is
# missing; we use only its quantizer and NF4 code table, so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _nf4_code(device: torch.device) -> torch.Tensor:
    code = _code_cache.get(device)
    if code is None:
        from bitsandbytes.functional import get_4bit_type

        code = get_4bit_type("nf4", device="cpu").to(torch.float32).to(device)
        _code_cache[device] = code
    return code


def _nf4_pairs(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: both weights a code byte holds (high nibble first), so one gather per byte."""
    pairs = _pair_cache.get(device)
    if pairs is None:
        code = _nf4_code(device)
        byte = torch.arange(256, device=device)
        pairs = _pair_cache[device] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1).contiguous()
    return pairs


@dataclass(frozen=True)
class NF4Format(StorageFormat):
    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import quantize_4bit

        q, state = quantize_4bit(weight.reshape(-1), blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
        absmax = state.absmax.to(torch.float32).contiguous()
        return torch.cat([absmax.view(torch.uint8), q.reshape(-1)])

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        from residency.formats.compiled import unpack_kernel

        unpack_kernel(self, out.dtype, packed.device)(packed, out.view(-1, BLOCK), staging)

    def _parts(self, packed: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = packed.reshape(-1)
        return flat[: n_blocks * 4].view(torch.float32).view(n_blocks, 1), flat[n_blocks * 4 :].view(n_blocks, BLOCK // 2)

    def eager_unpack(self, packed: torch.Tensor, out2d: torch.Tensor, staging: torch.Tensor | None) -> None:
        """Per chunk: code bytes widened to int32 indices in the work area (index_select takes no uint8),
        one gather of weight pairs, the absmax multiply in fp32, then the cast into `out2d`."""
        n_blocks = out2d.shape[0]
        if n_blocks == 0:
            return
        absmax, codes = self._parts(packed, n_blocks)
        pairs, buf = _nf4_pairs(packed.device), chunk_buffers(staging, out2d.dtype)
        step = buf.chunk_weights // BLOCK
        if step == 0:
            raise FormatError(f"NF4: staging of {staging.numel()} bytes holds no {BLOCK}-weight block")
        for i in range(0, n_blocks, step):
            dst = out2d[i : i + step]
            nb = dst.shape[0]
            idx = buf.work[: nb * BLOCK * 2].view(torch.int32)
            idx.copy_(codes[i : i + nb].reshape(-1))
            s = dst if dst.dtype == torch.float32 else buf.f32[: nb * BLOCK].view(nb, BLOCK)
            torch.index_select(pairs, 0, idx, out=s.view(-1, 2))
            s.mul_(absmax[i : i + nb])
            if s is not dst:
                dst.copy_(s)

    def fused_unpack(self, packed: torch.Tensor, out2d: torch.Tensor) -> None:
        """The whole tensor at once, for torch.compile to fuse."""
        absmax, codes = self._parts(packed, out2d.shape[0])
        out2d.copy_(_nf4_pairs(packed.device)[codes.long()].view(out2d.shape) * absmax)
