"""Per-format unpack kernels: eager by default, `torch.compile`d where that is faster.

Compiled kernels are cached per (format, output dtype, device type); the eager path
stays as the fallback when compilation is disabled or fails. A compiled kernel traces the
format's whole-tensor `fused_unpack` (one fused loop, no staging); eager runs chunk by chunk.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

# (blocks uint8 2-D, out 2-D, staging uint8 1-D or None) -> None
UnpackFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]

_lock = threading.Lock()
_compiled: dict[tuple[str, torch.dtype, str], UnpackFn] = {}
_failed: set[tuple[str, torch.dtype, str]] = set()
# Formats whose compiled kernel the caller asked for (benchmarks or the runtime decide
# per device from measurements; compile costs seconds once per format and dtype).
_compile_formats: set[str] = set()


def compile_enabled() -> bool:
    return os.environ.get("RESIDENCY_COMPILE", "1") != "0"


def use_compiled(format_names: set[str] | list[str] | tuple[str, ...]) -> None:
    """Route the given formats' unpack through torch.compile (empty to turn it off); canonical names (the
    checked entry point is residency.formats.use_compiled)."""
    with _lock:
        _compile_formats.clear()
        _compile_formats.update(format_names)


def compiled_formats() -> frozenset[str]:
    return frozenset(_compile_formats)


def _build(fmt, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def fn(blocks: torch.Tensor, out2d: torch.Tensor) -> None:
        fmt.fused_unpack(blocks, out2d)

    # Dynamo caches and counts recompilations per code object: with one shared `fn`, formats × dtypes
    # exhaust its recompile limit (8) and later formats silently run eager. A code object of its own
    # per (format, dtype) gives each kernel its own cache.
    fn.__code__ = fn.__code__.replace(co_name=f"unpack_{fmt.name}_{str(dtype).removeprefix('torch.')}")
    # dynamic=True: one kernel for every tensor size of this format and dtype.
    return torch.compile(fn, dynamic=True, fullgraph=True)


def compiled_kernel(fmt, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """The compiled unpack of `fmt`, or None when compilation is off or failed before."""
    if not compile_enabled():
        return None
    key = (fmt.name, dtype, device.type)
    if key in _failed:
        return None
    with _lock:
        fn = _compiled.get(key)
        if fn is None:
            fn = _build(fmt, dtype)
            _compiled[key] = fn
    return fn


def compile_failed(fmt, dtype: torch.dtype, device: torch.device) -> bool:
    """Did compiling `fmt`'s unpack fail here (so its calls run eager)?"""
    return (fmt.name, dtype, device.type) in _failed


def unpack_kernel(fmt, dtype: torch.dtype, device: torch.device) -> UnpackFn:
    if fmt.name not in _compile_formats:
        return fmt.eager_unpack
    fn = compiled_kernel(fmt, dtype, device)
    if fn is None:
        return fmt.eager_unpack
    key = (fmt.name, dtype, device.type)

    def guarded(blocks: torch.Tensor, out2d: torch.Tensor, staging: torch.Tensor | None) -> None:
        try:
            fn(blocks, out2d)
        except Exception as e:  # compile failure (no compiler, unsupported op): fall back for good, said once
            _failed.add(key)
            _compiled.pop(key, None)
            warnings.warn(f"torch.compile of {fmt.name}'s unpack into {dtype} failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); it runs eager",
                          RuntimeWarning, stacklevel=2)
            fmt.eager_unpack(blocks, out2d, staging)

    return guarded
