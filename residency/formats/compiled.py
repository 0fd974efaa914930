"""Per-format unpack kernels: eager by default, `torch.compile`d where that is faster.

Compiled kernels are cached per (format, output dtype, device type); the eager path
stays as the fallback when compilation is disabled or fails, and (CPU) where the compiled kernel
measures slower than eager on its first calls. A compiled kernel traces the
format's whole-tensor `fused_unpack` (one fused loop, no staging); eager runs chunk by chunk.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
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

# On the CPU a compiled unpack is timed against eager over the PROBE_CALLS calls after the one that compiles it,
# and dropped for good where its median is over SLOWER_MARGIN × eager's: inductor's CPU code for some formats'
# index arithmetic runs scalar (Q6_K, 4096², 2 threads, 2-vCPU EPYC: ~0.3-1 s a call against ~14 ms eager, while
# Q8_0 and Q4_K ran 2× faster than eager). Each probe call runs both kernels into `out` (equal bits): one unpack
# more, three times per format and dtype. No probe on a GPU: timing a call there would synchronise the host.
PROBE_CALLS = 3
SLOWER_MARGIN = 1.10
_probe_on = True
_compiled_once: set[tuple[str, torch.dtype, str]] = set()
_probes: dict[tuple[str, torch.dtype, str], list[tuple[float, float]]] = {}
_slower: dict[tuple[str, torch.dtype, str], tuple[float, float]] = {}  # key -> (compiled, eager) median seconds


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


def compiled_slower(fmt, dtype: torch.dtype, device: torch.device) -> tuple[float, float] | None:
    """(compiled, eager) median seconds a call where the probe found `fmt`'s compiled unpack slower and dropped
    it (its calls run eager), else None."""
    return _slower.get((fmt.name, dtype, device.type))


def set_probe(enabled: bool) -> bool:
    """Turn the CPU speed probe on or off (a benchmark timing the compiled kernel itself turns it off); returns
    the previous setting."""
    global _probe_on
    was, _probe_on = _probe_on, bool(enabled)
    return was


def _record_probe(fmt, key: tuple[str, torch.dtype, str], compiled_s: float, eager_s: float) -> None:
    """One probe pair; after PROBE_CALLS of them, drop the compiled kernel if it is the slower (said once)."""
    with _lock:
        pairs = _probes.setdefault(key, [])
        if len(pairs) >= PROBE_CALLS:  # another thread finished the probe meanwhile
            return
        pairs.append((compiled_s, eager_s))
        if len(pairs) < PROBE_CALLS:
            return
        c = statistics.median(p[0] for p in pairs)
        e = statistics.median(p[1] for p in pairs)
        if c <= e * SLOWER_MARGIN:
            return
        _slower[key] = (c, e)
    warnings.warn(f"torch.compile's unpack of {fmt.name} into {str(key[1]).removeprefix('torch.')} ran "
                  f"{c * 1e3:.1f} ms a call against {e * 1e3:.1f} ms eager on this CPU; it runs eager",
                  RuntimeWarning, stacklevel=3)


def _probing(fmt, key: tuple[str, torch.dtype, str], staging: torch.Tensor | None) -> bool:
    """Is this call one of the probe's (CPU, compiled before, probe unfinished, eager runnable)?"""
    return (_probe_on and key[2] == "cpu" and key in _compiled_once and len(_probes.get(key, ())) < PROBE_CALLS
            and (staging is not None or not fmt.uses_staging))


def unpack_kernel(fmt, dtype: torch.dtype, device: torch.device) -> UnpackFn:
    if fmt.name not in _compile_formats:
        return fmt.eager_unpack
    key = (fmt.name, dtype, device.type)
    if key in _slower:
        return fmt.eager_unpack
    fn = compiled_kernel(fmt, dtype, device)
    if fn is None:
        return fmt.eager_unpack

    def guarded(blocks: torch.Tensor, out2d: torch.Tensor, staging: torch.Tensor | None) -> None:
        probe = _probing(fmt, key, staging)
        t0 = time.perf_counter() if probe else 0.0
        try:
            fn(blocks, out2d)
        except Exception as e:  # compile failure (no compiler, unsupported op): fall back for good, said once
            _failed.add(key)
            _compiled.pop(key, None)
            warnings.warn(f"torch.compile of {fmt.name}'s unpack into {dtype} failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); it runs eager",
                          RuntimeWarning, stacklevel=2)
            fmt.eager_unpack(blocks, out2d, staging)
            return
        _compiled_once.add(key)
        if probe:
            t1 = time.perf_counter()
            fmt.eager_unpack(blocks, out2d, staging)  # the same bits into `out` again
            _record_probe(fmt, key, t1 - t0, time.perf_counter() - t1)

    return guarded
