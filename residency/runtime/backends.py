"""get_backend(name): the backend implementation for a name ('cpu', 'cuda'/'rocm'/'gpu') or this machine.

Apart from the contract (backend.py), which the implementations import: the contract knowing them would
be an import cycle.
"""

from __future__ import annotations

import torch

from residency.errors import ResidencyError
from residency.runtime.backend import Backend
from residency.runtime.backend_cpu import CpuBackend
from residency.runtime.backend_cuda import CudaBackend


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend for `name`: 'cpu', 'cuda' (also 'rocm', 'gpu': ROCm runs through torch.cuda), or None for
    the GPU when torch sees one, else the CPU. A Backend instance is returned as it is.

    Raises ResidencyError for an unknown name, or a GPU name when torch sees no CUDA/ROCm device.
    """
    if name is not None and not isinstance(name, str):
        return name
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CpuBackend()
    if name in ("cuda", "rocm", "gpu"):
        if not torch.cuda.is_available():
            raise ResidencyError(f"backend {name!r} needs a CUDA or ROCm device and torch sees none",
                                 hint="use the CPU backend: --backend cpu")
        return CudaBackend()
    raise ResidencyError(f"unknown backend {name!r}", hint="one of: cpu, cuda, rocm")
