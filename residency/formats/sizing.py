"""The one rule for which format a tensor really gets, and so how many bytes it takes.

Quantized formats hold matrices (≥ 2-D) whose last dimension fits their block; vectors
(norms, biases) and odd shapes fall back to BF16, as quantizing them saves nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from residency.formats.base import StorageFormat

FALLBACK_FORMAT = "BF16"


def effective_format(fmt: StorageFormat, shape: Sequence[int]) -> StorageFormat:
    if fmt.block_weights == 1 and fmt.name != "FP8":
        return fmt
    if len(shape) >= 2 and fmt.supports(shape):
        return fmt
    return _fallback()


@functools.cache
def _fallback() -> StorageFormat:
    from residency.formats import FORMATS  # the registry imports this module: looked up once, not per call

    return FORMATS[FALLBACK_FORMAT]


def tensor_bytes(shape: Sequence[int], fmt: StorageFormat) -> int:
    """Bytes of a tensor of `shape` stored as `fmt` (after the fallback rule)."""
    eff = effective_format(fmt, shape)
    if eff is fmt and fmt.block_weights > 1:  # effective_format just checked `supports`
        return fmt.nbytes_of_supported(shape)
    return eff.nbytes(shape)


def _rule(fmt: StorageFormat) -> tuple[int, int, int] | None:
    """(kind, block weights, block bytes) of a format whose size is the base rule (numel ÷ block × bytes):
    kind 0 = plain (every shape), 1 = quantized (falls back to BF16); None: its own rule (FP8's row scales)."""
    base = type(fmt).nbytes_of_supported is StorageFormat.nbytes_of_supported
    if not base:
        return None
    plain = fmt.block_weights == 1 and fmt.name != "FP8"
    return (0 if plain else 1), fmt.block_weights, fmt.block_bytes


@functools.lru_cache(maxsize=1 << 14)
def sizes_in(shape: tuple[int, ...], fmt_names: tuple[str, ...]) -> tuple[int, ...]:
    """tensor_bytes(shape, f) for each format named in `fmt_names` (canonical names: "Q8_0", "BF16" …), the
    element count computed once (inspect sizes every tensor of a checkpoint in several formats: ~1 µs a tensor
    here against ~3 µs a format through tensor_bytes). Cached on names, which hash in C where the format
    objects' dataclass hash runs Python: models repeat a few shapes thousands of times. `shape`: ints ≥ 0."""
    fmts = [_named(n) for n in fmt_names]
    if not shape:  # a scalar: the general rule decides (one weight, a quantized format falls back)
        return tuple(tensor_bytes(shape, f) for f, _ in fmts)
    numel = 1
    for d in shape:
        numel *= d
    last, matrix = shape[-1], len(shape) >= 2
    fallback = numel * _fallback().block_bytes
    out = []
    for f, rule in fmts:
        if rule is None:
            out.append(tensor_bytes(shape, f))
        elif rule[0] == 0:
            out.append(numel * rule[2])
        elif matrix and last % rule[1] == 0:
            out.append(numel // rule[1] * rule[2])
        else:
            out.append(fallback)
    return tuple(out)


@functools.cache
def _named(name: str) -> tuple[StorageFormat, tuple[int, int, int] | None]:
    """The registered format of a canonical name and its size rule (KeyError for an unknown name)."""
    from residency.formats import FORMATS  # the registry imports this module: looked up once per name

    fmt = FORMATS[name]
    return fmt, _rule(fmt)
