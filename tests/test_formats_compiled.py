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
