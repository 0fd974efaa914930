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
