"""sizes_in (inspect's fast sizing of one shape in several formats) agrees with tensor_bytes, the one rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from residency.formats import FORMATS
from residency.formats.sizing import sizes_in, tensor_bytes

ALL = tuple(FORMATS.values())
NAMES = tuple(f.name for f in ALL)
dims = st.one_of(st.integers(0, 8), st.sampled_from([16, 32, 64, 128, 256, 4096, 11008]), st.integers(0, 2**20))


@settings(max_examples=300, deadline=None)
@given(st.lists(dims, min_size=1, max_size=4))
def test_sizes_in_is_tensor_bytes_for_every_format(shape):
    shape = tuple(shape)
    assert sizes_in(shape, NAMES) == tuple(tensor_bytes(shape, f) for f in ALL)


def test_a_scalar_follows_the_general_rule():
    """A scalar (CLIP's logit_scale) is one weight: a plain format stores it, a quantized one falls back to BF16
    as a vector does; sizes_in defers to tensor_bytes for it."""
    assert tensor_bytes((), FORMATS["F32"]) == 4 and tensor_bytes((), FORMATS["Q8_0"]) == 2
    assert sizes_in((), ("Q8_0", "F32", "BF16")) == (2, 4, 2)
