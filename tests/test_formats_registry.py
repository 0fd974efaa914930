"""The format registry: byte sizes, pack/unpack round trips, errors, out-buffer contract."""

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from residency.errors import FormatError
from residency.formats import FORMATS, format_for_gguf_type, get_format, relative_rms_error
from residency.formats.sizing import effective_format, tensor_bytes

PACKABLE = [name for name, f in FORMATS.items() if f.can_pack]
# Upper bounds on relative RMS error for a Gaussian matrix: each format's own resolution.
MAX_REL_ERROR = {
    "F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "FP8": 0.04, "Q8_0": 0.01, "Q6_K": 0.025, "Q5_K": 0.05,
    "Q5_1": 0.05, "Q5_0": 0.06, "Q4_K": 0.1, "Q4_1": 0.1, "Q4_0": 0.12, "NF4": 0.11,
}


def test_every_issue_format_is_registered():
    expected = {"F32", "F16", "BF16", "FP8", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "NF4"}
    assert expected <= set(FORMATS)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.gguf_type is not None])
def test_gguf_byte_sizes_match_ggml_tables(name):
    fmt = get_format(name)
    qtype = GGMLQuantizationType(fmt.gguf_type)
    assert (fmt.block_weights, fmt.block_bytes) == GGML_QUANT_SIZES[qtype]
    assert fmt.nbytes((3, 512)) == 3 * 512 // fmt.block_weights * fmt.block_bytes
    assert format_for_gguf_type(fmt.gguf_type) is fmt


def test_fp8_and_nf4_sizes_include_their_scales():
    assert get_format("FP8").nbytes((10, 64)) == 10 * 64 + 10 * 4
    assert get_format("NF4").nbytes((10, 64)) == 10 * 32 + 10 * 4


def test_lookup_is_case_insensitive_and_unknown_names_list_the_known():
    assert get_format("q4_k") is FORMATS["Q4_K"]
    with pytest.raises(FormatError) as err:
        get_format("Q7_K")
    assert "Q7_K" in str(err.value) and "Q4_K" in err.value.hint


@pytest.mark.parametrize("name", PACKABLE)
def test_pack_size_is_exact_and_roundtrip_error_is_within_format_resolution(name):
    fmt = get_format(name)
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(3))
    packed = fmt.pack(w)
    assert packed.dtype == torch.uint8 and packed.numel() == fmt.nbytes(w.shape)
    err = relative_rms_error(w, fmt.dequantize(packed, w.shape))
    assert err <= MAX_REL_ERROR[name]


@pytest.mark.parametrize("name", PACKABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpack_writes_into_the_callers_buffer(name, dtype):
    fmt = get_format(name)
    w = torch.randn(4, 256)
    out = torch.full((4, 256), float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    result = fmt.unpack(fmt.pack(w), out)
    assert result.data_ptr() == ptr and not torch.isnan(out).any()


def test_shape_the_format_cannot_hold_names_the_shape():
    with pytest.raises(FormatError, match=r"\(4, 100\)"):
        get_format("Q4_K").pack(torch.randn(4, 100))


def test_wrong_packed_size_is_refused():
    fmt = get_format("Q8_0")
    with pytest.raises(FormatError, match="expected 68"):
        fmt.unpack(torch.zeros(10, dtype=torch.uint8), torch.empty(2, 32))


def test_dequant_only_formats_refuse_to_pack():
    for name in ("Q2_K", "Q3_K"):
        with pytest.raises(FormatError, match="dequant-only"):
            get_format(name).pack(torch.randn(1, 256))


def test_fp8_handles_zero_rows_and_bounds_error_per_row():
    w = torch.randn(4, 64)
    w[1] = 0
    w[2] *= 1e4
    r = get_format("FP8").roundtrip(w)
    assert torch.equal(r[1], torch.zeros(64))
    assert relative_rms_error(w[2], r[2]) < 0.04


def test_nf4_equals_bitsandbytes_dequant_bitwise():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    q, state = quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4", compress_statistics=False)
    ref = dequantize_4bit(q, state).reshape(8, 256)
    ours = get_format("NF4").roundtrip(w)
    assert torch.equal(ours, ref)


def test_vectors_and_odd_shapes_fall_back_to_bf16():
    q4k = get_format("Q4_K")
    assert effective_format(q4k, (4096,)).name == "BF16"
    assert effective_format(q4k, (64, 100)).name == "BF16"
    assert effective_format(q4k, (64, 256)) is q4k
    assert tensor_bytes((4096,), q4k) == 8192


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "FP8", "NF4", "BF16", "F32"])
def test_unpack_reads_a_packed_slice_at_any_offset_and_refuses_outputs_it_cannot_write(name):
    """An odd offset made FP8/NF4/BF16/F32 raise torch's view error; a meta `out` was 'written' by some formats
    and refused by others; an out needing grad raised torch's in-place error."""

    fmt = get_format(name)
    packed = fmt.pack(torch.randn(4, 256, generator=torch.Generator().manual_seed(0)))
    big = torch.zeros(packed.numel() + 3, dtype=torch.uint8)
    big[3:] = packed
    assert torch.equal(fmt.unpack(big[3:], torch.empty(4, 256)), fmt.unpack(packed, torch.empty(4, 256)))
    with pytest.raises(FormatError, match="out on meta"):
        fmt.unpack(packed, torch.empty(4, 256, device="meta"))
    with pytest.raises(FormatError, match="requires grad"):
        fmt.unpack(packed, torch.empty(4, 256, requires_grad=True))
    for wrong in ("hello", None, [torch.zeros(4, 256)]):
        with pytest.raises(FormatError, match="pack takes a torch tensor"):
            fmt.pack(wrong)
    with pytest.raises(FormatError, match="is not a shape"):
        fmt.nbytes((-1, 256))
