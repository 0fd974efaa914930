"""Our Q4_K/Q5_K/Q6_K quantizers: gguf's reader decodes them, and they beat gguf's Q4_1/Q5_1."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from residency.formats.kquant_pack import QUANT_K

KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]
# Loose ceilings on relative RMS error for Gaussian weights (measured: 0.070, 0.035, 0.017).
MAX_REL = {"Q4_K": 0.075, "Q5_K": 0.037, "Q6_K": 0.018}


def roundtrip(name: str, w: np.ndarray) -> np.ndarray:
    """Quantize rows of `w` with ours, decode with gguf's reference reader."""
    qtype = GGMLQuantizationType[name]
    _, type_size = GGML_QUANT_SIZES[qtype]
    w = np.ascontiguousarray(w, dtype=np.float32)
    packed = QUANT_K[name](torch.from_numpy(w.reshape(-1, 256)))
    assert packed.dtype == torch.uint8
    assert packed.shape == (w.size // 256, type_size)
    return gguf_quants.dequantize(packed.numpy().reshape(w.shape[0], -1), qtype)


def rel_err(w: np.ndarray, r: np.ndarray) -> float:
    return float(np.linalg.norm(w - r) / np.linalg.norm(w))


def gguf_err(name: str, w: np.ndarray) -> float:
    qtype = GGMLQuantizationType[name]
    return rel_err(w, gguf_quants.dequantize(gguf_quants.quantize(w, qtype), qtype))


@pytest.fixture(scope="module")
def matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "gaussian": rng.standard_normal((256, 4096)).astype(np.float32),
        "student_t4": rng.standard_t(4, (256, 4096)).astype(np.float32),
    }


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_gguf_reader_reconstructs(name, scale):
    w = np.random.default_rng(7).standard_normal((16, 1024)).astype(np.float32) * scale
    r = roundtrip(name, w)
    assert r.shape == w.shape
    assert rel_err(w, r) < MAX_REL[name]


@pytest.mark.parametrize("name", KQUANTS)
def test_mixed_subblock_magnitudes(name):
    # Sub-blocks 1000x apart inside one super-block: the small ones get few steps of d.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 8, 32)) * np.logspace(-3, 0, 8).reshape(1, 8, 1)
    w = w.reshape(8, 256).astype(np.float32)
    r = roundtrip(name, w)
    assert np.isfinite(r).all()
    assert rel_err(w, r) < 2 * MAX_REL[name]
    # the largest sub-block still gets the format's nominal accuracy
    assert rel_err(w[:, -32:], r[:, -32:]) < 1.5 * MAX_REL[name]


@pytest.mark.parametrize("kind", ["gaussian", "student_t4"])
def test_quality_targets(matrices, kind):
    w = matrices[kind]
    q4_1, q5_1 = gguf_err("Q4_1", w), gguf_err("Q5_1", w)
    ours = {name: rel_err(w, roundtrip(name, w)) for name in KQUANTS}
    assert ours["Q4_K"] <= q4_1, (ours, q4_1)
    assert ours["Q5_K"] <= q5_1, (ours, q5_1)
    assert ours["Q6_K"] <= 0.5 * q5_1, (ours, q5_1)


def _edge_blocks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    outlier = rng.standard_normal((2, 256)).astype(np.float32)
    outlier[0, 17] = 1e4
    outlier[1, 200] = -1e4
    return {
        "zeros": np.zeros((2, 256), np.float32),
        "constant_pos": np.full((2, 256), 0.37, np.float32),
        "constant_neg": np.full((2, 256), -2.5, np.float32),
        "outlier": outlier,
        "tiny": (rng.standard_normal((2, 256)) * 1e-8).astype(np.float32),
        "huge": (rng.standard_normal((2, 256)) * 1e12).astype(np.float32),
        "nonfinite": np.array([[np.inf, -np.inf, np.nan, 1.0] * 64] * 2, np.float32),
    }


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("case", list(_edge_blocks()))
def test_edge_cases_decode_finite(name, case):
    w = _edge_blocks()[case]
    r = roundtrip(name, w)
    if case == "nonfinite":  # carried through as eager would compute with them, never quietly made finite
        assert np.isnan(r).all()
        return
    assert np.isfinite(r).all()
    if case == "zeros":
        assert not r.any()
    elif case.startswith("constant"):
        np.testing.assert_allclose(r, w, rtol=5e-3)
    elif case == "outlier":
        np.testing.assert_allclose(r[[0, 1], [17, 200]], [1e4, -1e4], rtol=2e-2)
    elif case == "tiny":
        # below fp16's smallest scale step: reconstructed as (near) zero, never blown up
        assert np.abs(r).max() <= 1e-6


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("std", [1e-4, 3e-5, 1e-5, 3e-6, 1e-6])
def test_small_weights_keep_their_accuracy(name, std):
    # a super-scale under fp16's smallest normal (and then subnormal) must not round to 0: Q4_K at std 3e-6
    # decoded as its mins alone (error 2.2, worse than zeros), Q6_K at 3e-5 as zeros
    w = np.random.default_rng(11).standard_normal((8, 1024)).astype(np.float32) * std
    assert rel_err(w, roundtrip(name, w)) < 2 * MAX_REL[name]


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("std", [1e-7, 3e-8, 1e-8, 1e-9])
def test_weights_below_any_scale_are_never_worse_than_zeros(name, std):
    w = np.random.default_rng(12).standard_normal((8, 1024)).astype(np.float32) * std
    r = roundtrip(name, w)
    assert rel_err(w, r) <= 1.0
    # per sub-block too: no block's decoded grid is further from its weights than zeros are
    per = 16 if name == "Q6_K" else 32
    wb, rb = w.reshape(-1, per), r.reshape(-1, per)
    assert (np.square(wb - rb).sum(1) <= np.square(wb).sum(1) * (1 + 1e-5)).all()


def test_one_nonfinite_weight_poisons_only_its_super_block():
    w = np.random.default_rng(13).standard_normal((2, 512)).astype(np.float32)
    w[1, 300] = np.nan
    for name in KQUANTS:
        r = roundtrip(name, w)
        assert np.isnan(r[1, 256:]).all() and np.isfinite(r[:, :256]).all() and np.isfinite(r[0]).all(), name


@pytest.mark.parametrize("name", KQUANTS)
def test_rejects_wrong_block_shape(name):
    with pytest.raises(ValueError):
        QUANT_K[name](torch.zeros(4, 32))
