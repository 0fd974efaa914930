"""torch.compile of the GGUF formats' unpack: each traces whole (fullgraph) and equals eager.

Traced with dynamo's "eager" backend (tracing only: inductor would take seconds a format); the bench compiles
with the real one. Every GGUF format fell back to eager for good on torch 2.13: storage_offset()/data_ptr()
in the fp16 reads and a strided out= in the K-quant scales do not trace."""

from __future__ import annotations

import pytest
import torch

from residency.errors import FormatError
from residency.formats import FORMATS, get_format, use_compiled
from residency.formats.compiled import compiled_formats
from residency.formats.gguf_block import GGUFBlockFormat

GGUF = sorted(n for n, f in FORMATS.items() if isinstance(f, GGUFBlockFormat) and f.can_pack)


@pytest.mark.parametrize("name", GGUF)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unpack_traces_whole_and_equals_eager(name, dtype):
    torch._dynamo.reset()
    fmt = get_format(name)
    packed = fmt.pack(torch.randn(8, 512, generator=torch.Generator().manual_seed(0)))
    blocks = packed.view(-1, fmt.block_bytes)
    eager, traced = torch.empty(8, 512, dtype=dtype), torch.empty(8, 512, dtype=dtype)
    fmt.unpack(packed, eager)

    def fn(b: torch.Tensor, out: torch.Tensor) -> None:
        fmt.fused_unpack(b, out.view(-1, fmt.block_weights))

    torch.compile(fn, fullgraph=True, backend="eager")(blocks, traced)  # a graph break raises here
    assert torch.equal(traced, eager)


def test_use_compiled_takes_names_as_get_format_does_and_refuses_what_is_none():
    try:
        use_compiled({"q8_0", "Q4_K"})
        assert compiled_formats() == {"Q8_0", "Q4_K"}  # "q8_0" was kept as is and never matched
        with pytest.raises(FormatError, match="give a set of format names"):
            use_compiled("Q8_0")  # its letters were taken as four names
        with pytest.raises(FormatError):
            use_compiled({"Q9_9"})
    finally:
        use_compiled(set())


def _probe_setup(monkeypatch, compiled_fn):
    """Q8_0 into fp32 on the CPU with `compiled_fn` standing in for its compiled kernel (no inductor in tests),
    the probe's state empty."""
    from residency.formats import compiled

    for name in ("_compiled", "_compiled_once", "_probes", "_slower"):
        monkeypatch.setattr(compiled, name, type(getattr(compiled, name))())
    monkeypatch.setattr(compiled, "_build", lambda fmt, dtype: compiled_fn)
    monkeypatch.setattr(compiled, "_probe_on", True)
    fmt = get_format("Q8_0")
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    packed = fmt.pack(weight)
    expect = fmt.dequantize(packed, weight.shape)  # eager: use_compiled is off
    return compiled, fmt, packed, expect


def test_a_compiled_unpack_slower_than_eager_is_dropped_after_its_probe_and_said_once(monkeypatch):
    import time as _time

    calls = []

    def slow(blocks, out2d):  # right bits, 40 ms late: a kernel inductor made scalar
        calls.append(1)
        _EAGER(get_format("Q8_0"), blocks, out2d, _staging(out2d))
        _time.sleep(0.04)

    compiled, fmt, packed, expect = _probe_setup(monkeypatch, slow)
    use_compiled({"Q8_0"})
    try:
        out = torch.empty_like(expect)
        with pytest.warns(RuntimeWarning, match=r"Q8_0 into float32 ran .* ms a call against .* ms eager"):
            for _ in range(1 + compiled.PROBE_CALLS):  # the compiling call, then the probe's
                out.zero_()
                fmt.unpack(packed, out)
                assert torch.equal(out, expect)
        assert compiled.compiled_slower(fmt, torch.float32, out.device) is not None
        seen = len(calls)
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("error")  # said once: no second warning
            for _ in range(3):
                out.zero_()
                fmt.unpack(packed, out)
                assert torch.equal(out, expect)
        assert len(calls) == seen  # the compiled kernel is not called again
    finally:
        use_compiled(set())


def test_a_compiled_unpack_faster_than_eager_is_kept_after_its_probe(monkeypatch):
    import time as _time

    calls = []

    def fast(blocks, out2d):
        calls.append(1)
        _EAGER(get_format("Q8_0"), blocks, out2d, _staging(out2d))

    compiled, fmt, packed, expect = _probe_setup(monkeypatch, fast)
    def slow_eager(self, blocks, out2d, staging):  # eager made 40 ms slower, only while the probe runs it
        _EAGER(self, blocks, out2d, staging)
        _time.sleep(0.04)

    use_compiled({"Q8_0"})
    try:
        out = torch.empty_like(expect)
        for _ in range(1 + compiled.PROBE_CALLS):
            monkeypatch.setattr(type(fmt), "eager_unpack", slow_eager)
            fmt.unpack(packed, out)
            monkeypatch.setattr(type(fmt), "eager_unpack", _EAGER)
            assert torch.equal(out, expect)
        assert compiled.compiled_slower(fmt, torch.float32, out.device) is None
        before = len(calls)
        fmt.unpack(packed, out)
        assert len(calls) == before + 1 and torch.equal(out, expect)  # still the compiled kernel
    finally:
        use_compiled(set())


_EAGER = GGUFBlockFormat.eager_unpack  # the real eager kernel, whatever a test patches onto the class


def _staging(out2d):
    from residency.formats.staging import new_staging, staging_bytes

    return new_staging(staging_bytes("cpu", out2d.numel(), out2d.dtype), "cpu")
