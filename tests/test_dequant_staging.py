"""Unpack through a caller-owned staging buffer: every format, into fp32, bf16 and fp16, chunk by chunk.

Specification: fp32 is gguf's result bit for bit; bf16/fp16 are that fp32 result rounded once; and a
call that is given its staging allocates nothing above 1 MiB, whatever the matrix size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from residency.errors import FormatError
from residency.formats import FORMATS, get_format
from residency.formats import staging as staging_module
from residency.formats.staging import StagedUnpack, bytes_per_weight, new_staging, staging_bytes

GGUF_QUANTS = [n for n, f in FORMATS.items() if f.gguf_type is not None and f.block_weights > 1]
STAGED = [n for n, f in FORMATS.items() if f.uses_staging]
HALF = [torch.bfloat16, torch.float16]
MiB = 2**20


def random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes with every fp16 field made finite: valid blocks of any GGUF quant type."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    f16_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              "Q4_1": (0, 2), "Q5_1": (0, 2)}.get(name, (0,))
    for off in f16_at:
        vals = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype(np.float16)
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw


def packed_matrix(name: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    fmt = get_format(name)
    if fmt.can_pack:
        return fmt.pack(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return torch.from_numpy(random_blocks(name, shape[0] * shape[1] // fmt.block_weights, seed).reshape(-1))


def chunked_staging(chunk_weights: int) -> torch.Tensor:
    """Staging for chunks of `chunk_weights` into a bf16/fp16 output (and as many, or more, into fp32)."""
    return new_staging(bytes_per_weight(torch.bfloat16) * chunk_weights, "cpu")


@pytest.mark.parametrize("name", GGUF_QUANTS)
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), blocks_per_row=st.integers(1, 3), chunk_blocks=st.integers(1, 7),
       seed=st.integers(0, 2**32 - 1))
def test_every_output_dtype_is_ggufs_fp32_result_rounded_once(name, rows, blocks_per_row, chunk_blocks, seed):
    fmt = get_format(name)
    raw = random_blocks(name, rows * blocks_per_row, seed)
    ref = gguf_quants.dequantize(raw.reshape(rows, -1), GGMLQuantizationType[name]).astype(np.float32)
    expect = torch.from_numpy(np.ascontiguousarray(ref))
    packed = torch.from_numpy(raw.reshape(-1))
    staging = chunked_staging(chunk_blocks * fmt.block_weights)  # chunk edges fall anywhere, last one short
    for dtype in (torch.float32, *HALF):
        out = torch.full(expect.shape, float("nan"), dtype=dtype)
        fmt.unpack(packed, out, staging)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(out.view(bits), expect.to(dtype).view(bits)), dtype


@pytest.mark.parametrize("name", GGUF_QUANTS)
@pytest.mark.parametrize(("chunk_blocks", "sub_blocks"), [(7, 1), (7, 3), (5, 5), (4, 9)])
def test_float_sub_chunks_inside_a_chunk_keep_every_output_exact(name, chunk_blocks, sub_blocks):
    # The float phase runs in sub-chunks over integer planes cut for the whole chunk: a sub-chunk
    # that read the chunk's fp32 staging (overwritten by earlier sub-chunks) or the wrong block
    # range would differ here. Real sub-chunks are 128 K weights; these edges fall inside chunks.
    fmt = get_format(name)
    raw = random_blocks(name, 23, seed=sub_blocks)
    expect = torch.from_numpy(gguf_quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float32)).view(23, -1)
    packed = torch.from_numpy(raw.reshape(-1))
    staging = chunked_staging(chunk_blocks * fmt.block_weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(staging_module.FLOAT_SUB_WEIGHTS, "cpu", sub_blocks * fmt.block_weights)
        for dtype in (torch.float32, *HALF):
            out = torch.full(expect.shape, float("nan"), dtype=dtype)
            fmt.unpack(packed, out, staging)
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(out.view(bits), expect.to(dtype).view(bits)), dtype


@pytest.mark.parametrize("name", ["FP8", "NF4"])
@pytest.mark.parametrize("dtype", HALF)
def test_fp8_and_nf4_half_outputs_are_their_fp32_result_rounded_once(name, dtype):
    fmt = get_format(name)
    w = torch.randn(7, 384, generator=torch.Generator().manual_seed(2)) * 3
    packed = fmt.pack(w)
    fp32 = fmt.dequantize(packed, w.shape)
    for chunk in (64, 128, 1000):  # FP8: 64 and 128 split each 384-weight row into column chunks
        out = torch.empty(w.shape, dtype=dtype)
        fmt.unpack(packed, out, chunked_staging(chunk))
        assert torch.equal(out, fp32.to(dtype)), chunk


@pytest.mark.parametrize("name", STAGED)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_a_staged_unpack_allocates_nothing_above_1_mib(name, dtype):
    # 2048×1024 is two CPU chunks; an fp32 temporary of the whole output would be 8 MiB.
    fmt, shape = get_format(name), (2048, 1024)
    packed = packed_matrix(name, shape)
    out = torch.empty(shape, dtype=dtype)
    staging = new_staging(staging_bytes("cpu", out.numel(), dtype), "cpu")
    fmt.unpack(packed, out, staging)  # first call: one-time caches (shift tables, NF4 pairs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fmt.unpack(packed, out, staging)
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    assert largest <= 1 * MiB, f"{largest / MiB:.2f} MiB in one op"


def test_an_unpack_without_staging_allocates_one_for_the_call():
    # The profiler check above can fail: the convenience path's own staging shows up in it.
    fmt, shape = get_format("Q4_K"), (2048, 1024)
    packed, out = fmt.pack(torch.randn(shape)), torch.empty(shape, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fmt.unpack(packed, out)
    assert max(e.self_cpu_memory_usage for e in prof.events()) >= staging_bytes("cpu", out.numel(), out.dtype)


def test_staging_is_one_chunk_or_the_tensor_when_smaller():
    bf16 = torch.bfloat16
    assert staging_bytes("cpu", 1000, bf16) == bytes_per_weight(bf16) * 1000
    # one chunk (2 M weights on the CPU, 1 M on a GPU): 4 bytes of fp32 chunk and 2 of integer work each
    assert staging_bytes("cpu", 10**9, bf16) == staging_bytes("cpu", 10**10, bf16) == 12 * MiB
    assert staging_bytes("cuda", 10**9, bf16) == 6 * MiB
    assert staging_bytes("cpu", 0, bf16) == 0


@pytest.mark.parametrize("shape", [(), (1,), (3,), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tensor_of_an_odd_weight_count_unpacks_through_its_own_staging(shape, dtype):
    """The chunk is rounded down to an even count (the work area's alignment): one weight got a chunk of none."""
    for name in ("FP8", "BF16", "F16"):
        fmt = FORMATS[name]
        x = torch.randn(shape)
        out = torch.empty(shape, dtype=dtype)
        fmt.unpack(fmt.pack(x), out, new_staging(staging_bytes("cpu", out.numel(), dtype), "cpu"))
        assert torch.isfinite(out).all()


def test_an_fp32_output_needs_only_the_integer_work_area():
    # the kernel writes fp32 straight into the output: no fp32 chunk to stage
    assert staging_bytes("cpu", 10**9, torch.float32) * 3 == staging_bytes("cpu", 10**9, torch.bfloat16)


def test_staging_smaller_than_one_block_is_refused():
    fmt = get_format("Q4_K")
    packed = fmt.pack(torch.randn(2, 256))
    with pytest.raises(FormatError, match="holds no 256-weight block"):
        fmt.unpack(packed, torch.empty(2, 256, dtype=torch.bfloat16), chunked_staging(128))


def test_staging_on_another_device_than_the_output_is_refused():
    fmt = get_format("Q8_0")
    with pytest.raises(FormatError, match="staging is on"):
        fmt.unpack(fmt.pack(torch.randn(1, 32)), torch.empty(1, 32), torch.zeros(192, dtype=torch.uint8, device="meta"))


def test_a_staged_unpack_is_the_formats_unpack():
    fmt = get_format("Q5_K")
    w = torch.randn(4, 512)
    packed = fmt.pack(w)
    bound = StagedUnpack(fmt, chunked_staging(256))
    out = torch.empty(4, 512, dtype=torch.bfloat16)
    assert bound.unpack(packed, out) is out and bound.name == "Q5_K"
    assert torch.equal(out, fmt.dequantize(packed, w.shape).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("name", STAGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_staged_gpu_unpack_allocates_nothing_above_1_mib_and_matches_the_cpu(name, dtype):
    fmt, shape = get_format(name), (4096, 2048)  # 8M weights: several GPU chunks
    packed = packed_matrix(name, shape, seed=4)
    expect = torch.empty(shape, dtype=dtype)
    fmt.unpack(packed, expect)
    dev = torch.device("cuda")
    packed_d, out = packed.to(dev), torch.empty(shape, dtype=dtype, device=dev)
    staging = new_staging(staging_bytes("cuda", out.numel(), dtype), dev)
    fmt.unpack(packed_d, out, staging)  # first call: one-time caches
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fmt.unpack(packed_d, out, staging)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 1 * MiB
    assert torch.equal(out.cpu(), expect)
