"""attach's counted forward leaves the model as it found it: attributes a block caches or counts on its first call,
state a model keeps in plain attributes, and the RNG draws of a forward run for counting."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from test_attach_guards import attach
from torch import nn

from residency.workload.left_as_found import generators_in, left_as_found

pytestmark = pytest.mark.usefixtures("one_compute_thread")


class LazyBlock(nn.Module):
    """Derives a tensor from its weight on its first call and keeps it; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.derived = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.derived is None:
            self.derived = self.lin.weight * 0.5  # a new tensor, not a view of the weight
        return torch.tanh(x @ self.derived.t() + self.lin.bias)


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Recurrent(Stack):
    """Keeps its state across calls in plain attributes, created on the first call."""

    def __init__(self) -> None:
        super().__init__(lambda: nn.Linear(64, 64), 3)
        self.state = None
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state = torch.zeros_like(x)
        for layer in self.layers:
            x = torch.tanh(layer(x + self.state))
        self.state = x.detach()
        self.steps += 1
        return x


class Sampler(Stack):
    """Draws noise from the global RNG, and reads a value to the host (the meta count fails: a real forward)."""

    def __init__(self) -> None:
        super().__init__(lambda: nn.Linear(64, 64), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) + 0.1 * torch.randn_like(x)
            if x.abs().max().item() > 100:
                break
        return x


@pytest.mark.parametrize("vram", [None, "40%"])
def test_what_a_block_caches_or_counts_in_the_counting_forward_is_not_kept(vram):
    torch.manual_seed(0)
    model, x = Stack(LazyBlock).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = plain(x)
    with attach(model, x, vram):
        assert all(layer.derived is None and layer.calls == 0 for layer in model.layers)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        assert [layer.calls for layer in model.layers] == [1] * 4
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class LazyBufferBlock(nn.Module):
    """Registers a buffer on its first call and counts its calls in it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "count"):
            self.register_buffer("count", torch.zeros(64), persistent=False)
        self.count.add_(1.0)
        return torch.tanh(self.lin(x)) + self.count


class HooksOnce(Stack):
    """Installs a forward hook on each layer on its first call, behind a flag (as transformers' output capturing)."""

    def __init__(self) -> None:
        super().__init__(lambda: nn.Linear(64, 64), 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not getattr(self, "_installed", False):
            self.seen = []
            for layer in self.layers:
                layer.register_forward_hook(lambda mod, args, out: self.seen.append(out))
            self._installed = True
        self.seen.clear()
        return super().forward(x), len(self.seen)


@pytest.mark.parametrize("vram", [None, "40%"])
def test_hooks_and_buffers_a_forward_adds_on_its_first_call_are_not_kept_from_the_count(vram):
    # kept, the flag put back and the hook not, each hook ran twice ever after (transformers: every hidden state
    # twice); a buffer registered in the count kept its update (a call counter one ahead), detached or not
    torch.manual_seed(0)
    model, x = HooksOnce().eval(), torch.randn(4, 64)
    with attach(model, x, vram), torch.no_grad():
        assert [len(layer._forward_hooks) for layer in model.layers] == [0, 0, 0]
        assert model(x)[1] == 3
    assert model(x)[1] == 3 and [len(layer._forward_hooks) for layer in model.layers] == [1, 1, 1]

    model = Stack(LazyBufferBlock).eval()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = [plain(x) for _ in range(2)]
    with attach(model, x, vram), torch.no_grad():
        assert not any(hasattr(layer, "count") for layer in model.layers)
        assert all(torch.equal(model(x), e) for e in expected)
    assert [layer.count[0].item() for layer in model.layers] == [2.0] * 4


def test_state_kept_in_plain_attributes_starts_where_the_plain_model_does():
    torch.manual_seed(0)
    model, xs = Recurrent().eval(), [torch.randn(2, 64) for _ in range(3)]
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = [plain(x) for x in xs]
    with attach(model, xs[0], "40%"):
        assert model.state is None and model.steps == 0
        with torch.no_grad():
            for x, want in zip(xs, expected, strict=True):
                assert torch.equal(model(x), want)
    assert model.steps == 3


def test_a_seed_set_before_attach_gives_the_plain_models_draws():
    torch.manual_seed(0)
    model, x = Sampler().eval(), torch.randn(2, 64)
    plain = copy.deepcopy(model)
    torch.manual_seed(123)
    with torch.no_grad():
        expected = plain(x)
    torch.manual_seed(123)
    with attach(model, x, None), torch.no_grad():
        assert torch.equal(model(x), expected)


def test_left_as_found_puts_back_attributes_tensor_values_and_generators():
    module = nn.Linear(4, 4)
    module.note = "kept"
    module.buf = torch.zeros(3)  # a plain tensor attribute, not a registered buffer
    gen = torch.Generator().manual_seed(7)
    want_gen = torch.Generator().manual_seed(7)
    torch.manual_seed(5)
    want_global = torch.rand(2)
    torch.manual_seed(5)
    random.seed(3), np.random.seed(3)
    want_streams = (random.random(), np.random.rand())
    random.seed(3), np.random.seed(3)
    with left_as_found([module], generators_in({"g": [gen], "x": 1})):
        module.note = "changed"
        module.added = 1
        module.buf.add_(1.0)
        del module.buf
        torch.rand(3, generator=gen)
        torch.rand(4)
        random.random(), np.random.rand()  # Python's and NumPy's global streams (a LayerDrop draws from them)
    assert (random.random(), np.random.rand()) == want_streams
    assert module.note == "kept" and not hasattr(module, "added")
    assert torch.equal(module.buf, torch.zeros(3))
    assert torch.equal(torch.rand(2, generator=gen), torch.rand(2, generator=want_gen))
    assert torch.equal(torch.rand(2), want_global)


def test_left_as_found_puts_back_the_contents_of_containers_attributes_hold():
    module = nn.Linear(4, 4)
    state = torch.zeros(2)
    module.cache = {"k": [state], "steps": 0}
    module.history = [1, (2, [3])]
    module.seen = {"a"}
    inner, nested = module.cache["k"], module.history[1][1]
    with left_as_found([module]):
        module.cache["k"].append(torch.empty(2, device="meta"))
        module.cache["v"] = torch.empty(2, device="meta")
        module.cache["steps"] += 1
        state.add_(1.0)
        module.history.append(4)
        nested.clear()
        module.seen.add("b")
    assert module.cache == {"k": [state], "steps": 0} and module.cache["k"] is inner
    assert torch.equal(state, torch.zeros(2))
    assert module.history == [1, (2, [3])] and module.history[1][1] is nested and module.seen == {"a"}


class HandWrittenCache(nn.Module):
    """Attention keeping its keys and values in a plain dict attribute, and call lengths in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(64, 192)
        self.kv: dict[str, torch.Tensor] = {}
        self.lengths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        if "k" in self.kv:
            k, v = torch.cat([self.kv["k"], k], 1), torch.cat([self.kv["v"], v], 1)
        self.kv["k"], self.kv["v"] = k, v
        self.lengths.append(x.shape[1])
        return x + torch.softmax(q @ k.transpose(1, 2) / 8, -1) @ v


def test_a_cache_kept_in_a_dict_attribute_starts_empty_after_attach_as_in_the_plain_model():
    """The counting forward left meta keys in the dict: every call failed ("Tensor on device cpu is not on the
    expected device meta"), detached too."""
    torch.manual_seed(0)
    model = nn.Sequential(*(HandWrittenCache() for _ in range(4))).eval()
    plain, x = copy.deepcopy(model), torch.randn(1, 4, 64)
    with torch.inference_mode():
        want = [plain(x), plain(x)]
    with attach(model, x, "30%") as rt, torch.inference_mode():
        assert rt.plan.streamed() and all(m.kv == {} and m.lengths == [] for m in model)
        got = [model(x), model(x)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_plan_for_the_same_model_at_other_shapes_says_so():
    from residency.errors import ResidencyError

    torch.manual_seed(0)
    model = Stack(LazyBlock).eval()
    with attach(model, torch.randn(4, 64), "40%") as rt:
        plan = rt.plan
    with pytest.raises(ResidencyError, match="the same model counted at other shapes"):
        import residency

        residency.attach(model, plan=plan, example_inputs=torch.randn(8, 64), backend="cpu")
