"""Models of unusual shape attached: a block module under two names, a failure part way through hooking, and what
residency cannot hook or store (TorchScript, lazy and complex parameters, weights read straight from a
ParameterList, blocks called on other threads) refused by name before planning."""

from __future__ import annotations

import pytest
import torch
from test_attach_guards import attach, mlp_stack
from torch import nn

from residency.errors import ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_an_attach_that_fails_while_hooking_leaves_the_model_as_it_was(monkeypatch):
    """A failure part way through hooking the blocks left the model half hooked (every later attach refused:
    "attached to another runtime"), its weights bound to freed memory and torch's thread count changed."""
    from residency.runtime import runtime as runtime_module
    from residency.runtime.hooks import has_hook

    model, x = mlp_stack()
    with torch.inference_mode():
        expected = model(x)
    weights = [p.data_ptr() for p in model.parameters()]
    threads = torch.get_num_threads()
    real_add_hook, added = runtime_module.add_hook, []

    def failing_add_hook(module, hook):
        if len(added) == 3:
            raise RuntimeError("hook refused")
        added.append(module)
        real_add_hook(module, hook)

    monkeypatch.setattr(runtime_module, "add_hook", failing_add_hook)
    with pytest.raises(RuntimeError, match="hook refused"):
        attach(model, x)
    assert added and not any(has_hook(m) for m in model.modules())
    assert [p.data_ptr() for p in model.parameters()] == weights and torch.get_num_threads() == threads
    monkeypatch.setattr(runtime_module, "add_hook", real_add_hook)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    with attach(model, x), torch.inference_mode():  # attaches again
        assert torch.equal(model(x), expected)


class LastAlsoNamed(nn.Module):
    """The last layer is also `self.last`: one block module under two paths."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))
        self.last = self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = layer(x).tanh()
        return self.last(x)


def test_a_block_module_under_two_paths_is_hooked_once():
    """It was hooked twice: "Linear already carries a residency hook; detach the other runtime first"."""
    torch.manual_seed(0)
    model, x = LastAlsoNamed().eval(), torch.randn(3, 64)
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x, "30%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        assert torch.equal(model(x), expected)


class ComplexScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.z = nn.Parameter(torch.randn(8, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.z.real


class IndexParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.order = nn.Parameter(torch.arange(8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[:, self.order])


class DoubleTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(8, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.table.float()


class LazyLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor):
        return (layer(x) for layer in self.layers)


def _dynamic_quantized() -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))


@pytest.mark.parametrize("make, said", [
    (lambda: torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))), "is a TorchScript module"),
    # a scripted layer: "did not run on the example inputs (… not supported on ScriptModules)", a hint about shapes
    (lambda: nn.Sequential(nn.Linear(8, 8), torch.jit.script(nn.Linear(8, 8))),
     r"Sequential.1 is a TorchScript module \(a scripted Linear\)"),
    # refused after planning, with a hint to cast the model (which would turn the indices into floats)
    (IndexParameter, "IndexParameter.order is a parameter of int64"),
    # "Sequential has no floating-point parameters"
    (_dynamic_quantized, r"Sequential.0 is a torch.ao quantized module \(Linear\)"),
    (lambda: nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 8)), "Sequential.0.weight is not initialised yet"),
    (ComplexScale, "ComplexScale.z is complex64: residency stores real weights"),
    # "block DoubleTable computes in fp32 (the workload keeps table in fp32) but the model holds torch.float64
    # weights", with a hint whose other way out failed the same way
    (DoubleTable, "DoubleTable.table is a float64 buffer"),
    # "the forward called none of the model's blocks", with a hint about layer.forward(x)
    (LazyLayers, "LazyLayers: the forward returned a generator"),
])
def test_what_residency_cannot_hook_or_store_is_refused_by_name_before_planning(make, said):
    """Each failed deep in torch: "get_submodule is not supported on ScriptModules", a ValueError of an
    uninitialised parameter, and for a complex weight a hint to cast the model to fp32 (its imaginary part lost)."""
    with pytest.raises(ResidencyError, match=said) as e:
        attach(make(), torch.randn(2, 8), "50%")
    assert e.value.hint


class WeightsInAParameterList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(64, 64)) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.ws:
            x = torch.nn.functional.linear(x, w).tanh()
        return x


def test_weights_read_straight_from_a_parameter_list_are_named_with_what_to_do():
    """The hint was "call them as layer(x)": there is no layer to call."""
    with pytest.raises(ResidencyError, match=r"weights sit in ws \(ParameterList\), read directly") as e:
        attach(WeightsInAParameterList(), torch.randn(2, 64), "50%")
    assert "hold each layer's weights in a module the forward calls" in e.value.hint


class HeadsInAThreadPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        self.out = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            parts = list(pool.map(lambda head: head(x), self.heads))
        return self.out(torch.cat(parts, -1))


def test_blocks_called_on_other_threads_inside_the_forward_are_refused_naming_one():
    """It said "did not run on the example inputs (IndexError: pop from an empty deque)" with a hint about the
    example: the runtime follows one block call at a time, on the model's own thread."""
    with pytest.raises(ResidencyError, match=r"calls heads\.\d on another thread") as e:
        attach(HeadsInAThreadPool().eval(), torch.randn(2, 64), "50%")
    assert "forward's own thread" in e.value.hint


class ScriptedActivation(nn.Module):
    """A TorchScript part with no tensors (a scripted activation): nothing of it is placed, so it runs as it is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.act = torch.jit.script(nn.GELU())

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def test_a_scripted_part_without_weights_attaches_and_computes_as_the_plain_model():
    model, x = ScriptedActivation().eval(), torch.randn(2, 8)
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x, "50%"), torch.inference_mode():
        assert torch.equal(model(x), expected)
