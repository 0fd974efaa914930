"""The torch K-quant kernels against gguf's numpy reference: equal float32 bits, any valid block.

Random bytes are valid blocks except the fp16 super-block scales, which are drawn finite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from residency.formats.gguf_kquants import DEQUANT_K

# name -> (bytes per block, byte offsets of the fp16 d / dmin fields)
LAYOUT = {
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}

# Finite fp16 values, subnormals and signed zeros included.
_finite_f16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@st.composite
def _blocks(draw, type_size: int, f16_offsets: tuple[int, ...]) -> np.ndarray:
    # Bulk bytes come from a drawn seed: drawing kilobytes through hypothesis overruns its
    # buffer and trips the filter_too_much health check. Hypothesis drives the fp16 fields.
    n = draw(st.sampled_from([1, 2, 3, 16, 33]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for off in f16_offsets:
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all ones is inf/NaN: make it finite
        picked = draw(st.lists(_finite_f16, max_size=n))
        bits[: len(picked)] = np.array(picked, dtype=np.float16).view(np.uint16)
        raw[:, off : off + 2] = bits.view(np.uint8).reshape(n, 2)
    return raw


def _assert_bit_equal(name: str, raw: np.ndarray) -> None:
    ref = dequantize(raw, GGMLQuantizationType[name]).reshape(raw.shape[0], 256)
    out = DEQUANT_K[name](torch.from_numpy(raw))
    assert out.dtype == torch.float32 and out.shape == (raw.shape[0], 256)
    assert not torch.isnan(out).any()
    expect = torch.from_numpy(np.ascontiguousarray(ref))
    assert torch.equal(out.view(torch.int32), expect.view(torch.int32))


@pytest.mark.parametrize("name", sorted(LAYOUT))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_kquant_matches_gguf_bitwise(name: str, data: st.DataObject) -> None:
    type_size, offsets = LAYOUT[name]
    _assert_bit_equal(name, data.draw(_blocks(type_size, offsets)))


@pytest.mark.parametrize("n", [1, 5000])  # 5000 blocks: a 5 MB result, the huge-page path
@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_kquant_odd_offset_input(name: str, n: int) -> None:
    # A block view into a larger blob at an odd byte offset: the fp16 fields are misaligned.
    type_size, offsets = LAYOUT[name]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for off in offsets:
        raw[:, off : off + 2] = rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(-1, 2)
    blob = torch.zeros(raw.size + 1, dtype=torch.uint8)
    blob[1:] = torch.from_numpy(raw.reshape(-1))
    out = DEQUANT_K[name](blob[1:].view(-1, type_size))
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[name]).reshape(-1, 256))
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_kquant_empty(name: str) -> None:
    out = DEQUANT_K[name](torch.empty(0, LAYOUT[name][0], dtype=torch.uint8))
    assert out.shape == (0, 256) and out.dtype == torch.float32
