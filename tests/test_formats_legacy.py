"""GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: our torch unpack equals gguf's numpy reference bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st

from residency.formats import get_format

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# Byte offsets of the fp16 fields (d, and m where present) that must be finite.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2]}


def random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes are valid blocks once the fp16 scale fields hold finite values."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        vals = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype(np.float16)
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("name", LEGACY)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), blocks_per_row=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_unpack_equals_gguf_reference_bitwise(name, rows, blocks_per_row, seed):
    fmt = get_format(name)
    raw = random_blocks(name, rows * blocks_per_row, seed).reshape(rows, -1)
    ref = gguf_quants.dequantize(raw, GGMLQuantizationType[name])
    ours = fmt.dequantize(torch.from_numpy(raw.copy()).reshape(-1), (rows, blocks_per_row * fmt.block_weights))
    assert np.array_equal(ours.numpy().view(np.int32), ref.astype(np.float32).view(np.int32))


@pytest.mark.parametrize("name", LEGACY)
def test_pack_produces_gguf_reference_bytes(name):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    ours = get_format(name).pack(w).numpy().reshape(8, -1)
    ref = gguf_quants.quantize(w.numpy(), GGMLQuantizationType[name])
    assert np.array_equal(ours, ref)


def _block_sq_error(w: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    return ((decoded.reshape(-1, 32).astype(np.float64) - w.reshape(-1, 32)) ** 2).sum(axis=1)


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("std", [3e-4, 1e-5, 1e-6, 1e-7])
def test_tiny_weights_lose_no_more_than_at_unit_scale_and_never_more_than_the_reference(name, std):
    # the reference codes against the exact scale and stores it as an fp16 subnormal: Q8_0 at std 1e-5 lost 18× its
    # error at std 1, and at 1e-6 decoded every block as zeros
    qtype = GGMLQuantizationType[name]
    fmt = get_format(name)
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((16, 1024)).astype(np.float32)
    w = unit * np.float32(std)
    ours = fmt.dequantize(fmt.pack(torch.from_numpy(w)), w.shape).numpy()
    ref = gguf_quants.dequantize(gguf_quants.quantize(w, qtype), qtype)
    assert (_block_sq_error(w, ours) <= _block_sq_error(w, ref)).all()
    nominal = get_format(name).dequantize(fmt.pack(torch.from_numpy(unit)), w.shape).numpy()
    rel = float(np.sqrt(_block_sq_error(w, ours).sum() / (w.astype(np.float64) ** 2).sum()))
    rel_nominal = float(np.sqrt(_block_sq_error(unit, nominal).sum() / (unit.astype(np.float64) ** 2).sum()))
    if std >= 1e-5:
        assert rel <= 1.5 * rel_nominal
    else:  # coarser, as fp16's smallest subnormal (6e-8) is the finest step: but never decoded as zeros
        assert rel < 0.5


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_the_rounded_fp32_result(name, dtype):
    fmt = get_format(name)
    w = torch.randn(16, 128)
    packed = fmt.pack(w)
    out = torch.empty(16, 128, dtype=dtype)
    fmt.unpack(packed, out)
    assert torch.equal(out, fmt.dequantize(packed, (16, 128)).to(dtype))


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("shift", [0, 1])  # 1: a block view at an odd byte offset, so no in-place fp16 view
def test_unpack_at_any_byte_offset_equals_gguf(name, shift):
    fmt = get_format(name)
    raw = random_blocks(name, 3 * 40, 7).reshape(3, -1)  # 40 blocks a row: chunk edges inside rows below
    ref = gguf_quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float32)
    blob = torch.zeros(raw.size + shift, dtype=torch.uint8)
    blob[shift:] = torch.from_numpy(raw.reshape(-1))
    staging = torch.zeros(6 * 7 * 32, dtype=torch.uint8)  # chunks of 7 blocks into bf16, of 21 into fp32
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((3, 40 * 32), float("nan"), dtype=dtype)
        fmt.unpack(blob[shift:], out, staging)
        assert torch.equal(out, torch.from_numpy(ref).to(dtype)), dtype
