"""NF4 (4-bit NormalFloat, blocks of 64) packed by bitsandbytes, unpacked in pure torch.

bitsandbytes has no CPU `out=` dequant; our lookup reproduces its result bit for bit.
Blob layout: float32 absmax per 64-weight block, then the 4-bit codes (high nibble first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from residency.formats.base import StorageFormat

BLOCK = 64
_code_cache: dict[torch.device, torch.Tensor] = {}
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


@dataclass(frozen=True)
class NF4Format(StorageFormat):
    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import quantize_4bit

        q, state = quantize_4bit(weight.reshape(-1), blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
        absmax = state.absmax.to(torch.float32).contiguous()
        return torch.cat([absmax.view(torch.uint8), q.reshape(-1)])

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from residency.formats.compiled import unpack_kernel

        unpack_kernel(self, out.dtype, packed.device)(packed, out.view(-1, BLOCK))

    def eager_unpack(self, packed: torch.Tensor, out2d: torch.Tensor) -> None:
        n_blocks = out2d.shape[0]
        flat = packed.reshape(-1)
        absmax = flat[: n_blocks * 4].view(torch.float32).view(n_blocks, 1)
        codes = flat[n_blocks * 4 :]
        idx = torch.stack([codes >> 4, codes & 0x0F], dim=1).view(n_blocks, BLOCK).long()
        out2d.copy_(_nf4_code(codes.device)[idx] * absmax)
