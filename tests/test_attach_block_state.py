"""What a block does to itself survives the runtime reusing its memory: buffers it updates in place, a reset
from outside between calls, outputs that are views of its weights, hooks that compute its weights, scalar
parameters, a layer registered twice, and a plan switch with blocks packed ahead."""

from __future__ import annotations

import pytest
import torch
from sim_helpers import flat_profile
from test_attach_guards import attach
from torch import nn

import residency

pytestmark = pytest.mark.usefixtures("one_compute_thread")


class GatedBlock(nn.Module):
    """A ReZero-style block: a 0-dim gate beside its layers (CLIP's logit_scale and Gemma's embed_scale are
    0-dim too)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.gate = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.scale * torch.tanh(self.fc(x))


@pytest.mark.parametrize("vram", [None, "30%"])
def test_scalar_parameters_and_buffers_are_stored_and_streamed_like_any_tensor(vram):
    torch.manual_seed(0)
    model, x = nn.Sequential(*[GatedBlock() for _ in range(6)]).eval(), torch.randn(4, 64)
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x, vram=vram) as rt, torch.inference_mode():
        assert bool(rt.plan.streamed()) == (vram is not None)
        assert torch.equal(model(x), expected)
    assert model[3].gate.shape == () and model[3].gate.item() == 0.5


@pytest.mark.parametrize("vram", [None, "40%"])
def test_a_layer_registered_twice_runs_as_the_plain_model_and_keeps_its_weights(vram):
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(nn.Linear(64, 64), shared, nn.Tanh(), nn.Linear(64, 64), shared).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 64)
    with torch.inference_mode():
        expected = model(x)
    with pytest.warns(Warning, match=r"Sequential\.1 ×2"), attach(model, x, vram=vram), torch.inference_mode():
        assert torch.equal(model(x), expected)
    assert shared.weight.device.type == "cpu"  # the meta count once left it on meta: the model wrecked
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("reparametrize", ["prune", "weight_norm", "user_pre_hook"])
def test_pre_hooks_on_streamed_blocks_see_the_blocks_own_weights(reparametrize):
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model, x = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]).eval(), torch.randn(4, 64)
    seen: list[float] = []
    for layer in model:
        if reparametrize == "prune":
            prune.l1_unstructured(layer, "weight", amount=0.5)  # weight = weight_orig · mask, in a pre-hook
        elif reparametrize == "weight_norm":
            with pytest.warns(FutureWarning):
                nn.utils.weight_norm(layer)  # weight = g · v / ‖v‖, in a pre-hook
        else:
            layer.register_forward_pre_hook(lambda m, args: seen.append(float(m.weight.sum())))
    with torch.inference_mode():
        expected = model(x)
    sums, seen[:] = list(seen), []
    with attach(model, x, vram="40%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        assert torch.equal(model(x), expected)
        assert seen == sums  # each hook saw its own block's weight, bound before it ran
    assert all(not hasattr(m, "_residency_hook") for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


class Table(nn.Module):
    """A learned position table that returns views of its own weight in a tuple. (One returning the weight
    itself is kept resident: read later, it cannot be told from a read of the attribute.)"""

    def __init__(self) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(64, 64))

    def forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pe[:n], self.pe[:]


class WithTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = Table()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, whole = self.pos(x.shape[0])
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x + p + whole[: x.shape[0]]


@pytest.mark.parametrize("vram", [None, "30%"])
def test_an_output_that_is_a_view_of_a_streamed_blocks_weights_survives_the_slot_reuse(vram):
    torch.manual_seed(0)
    model, x = WithTable().eval(), torch.randn(16, 64)
    with torch.inference_mode():
        expected = model(x)
    with attach(model, x, vram=vram) as rt, torch.inference_mode():
        assert torch.equal(model(x), expected)
        assert rt.plan.by_name["WithTable.pos"].placement == ("resident" if vram is None else "streamed")


class Stateful(nn.Module):
    """A block that keeps a running state in a buffer, updated in place by every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("state", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.fc(x) + self.state)
        self.state.copy_(y.mean(0))
        return y


@pytest.mark.parametrize("vram", [None, "30%"])
def test_buffers_a_block_updates_in_place_keep_their_state_across_calls_and_detach(vram):
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Stateful() for _ in range(6)]).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with torch.inference_mode():
        expected = [plain(x) for _ in range(3)]
    with attach(model, x, vram=vram) as rt, torch.inference_mode():
        assert bool(rt.plan.streamed()) == (vram is not None)
        for want in expected:
            assert torch.equal(model(x), want)
    for mine, theirs in zip(model.buffers(), plain.buffers(), strict=True):
        assert torch.equal(mine, theirs)  # the state after three calls, kept through detach


def test_a_plan_switch_with_blocks_packed_ahead_keeps_the_buffers_state():
    import copy
    from dataclasses import replace

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Stateful() for _ in range(6)]).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with attach(model, x, vram=None) as rt, torch.inference_mode():
        model(x), plain(x)
        packed = replace(rt.plan, blocks=tuple(replace(bp, format="BF16") for bp in rt.plan.blocks))
        ready = rt.prepack(packed)  # the closed loop packs ahead, then a call moves every state on
        assert sorted(ready) == sorted((bp.name, "BF16") for bp in rt.plan.blocks)
        model(x), plain(x)
        rt.switch_plan(packed, ready=ready)
        for mine, theirs in zip(model, plain, strict=True):  # BF16 storage rounds it, nothing more
            torch.testing.assert_close(mine.state, theirs.state, atol=1e-2, rtol=1e-2)


def test_a_buffer_made_under_inference_mode_attaches_and_runs():
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Stateful() for _ in range(6)]).eval(), torch.randn(4, 64)
    with torch.inference_mode():
        model[3].state = torch.zeros(64)  # an inference tensor: it keeps no version counter
        expected = copy.deepcopy(model)(x)
    with attach(model, x) as rt, torch.inference_mode():
        assert rt.plan.streamed()
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("vram", [None, "30%"])
def test_a_buffer_read_or_reset_from_outside_between_calls_is_the_blocks_own_state(vram):
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Stateful() for _ in range(6)]).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with attach(model, x, vram=vram) as rt, torch.inference_mode():
        assert bool(rt.plan.streamed()) == (vram is not None)
        for _ in range(2):
            assert torch.equal(model(x), plain(x))
        for mine, theirs in zip(model, plain, strict=True):  # read between calls: the state, not a slot
            assert torch.equal(mine.state, theirs.state)
        for layer in (*model, *plain):
            layer.state.zero_()  # a reset between sequences, as users do with a cache
        model[2].state.fill_(0.5)
        plain[2].state.fill_(0.5)
        for _ in range(2):
            assert torch.equal(model(x), plain(x))
    for mine, theirs in zip(model.buffers(), plain.buffers(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("vram", [None, "30%"])
def test_state_dict_while_attached_gives_the_buffers_state_now(vram):
    import copy

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Stateful() for _ in range(6)]).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with attach(model, x, vram=vram), torch.inference_mode():
        for _ in range(2):
            model(x), plain(x)
        mine, theirs = model.state_dict(), plain.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        model(x), plain(x)  # and still right after being read
        assert torch.equal(model(x), plain(x))


class Tally(nn.Module):
    """A block that counts its calls and keeps an EMA of its input in fp32 buffers: states, not weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.ema.mul_(0.99).add_(0.01 * x.mean(0))
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("placement", ["resident-quantized", "streamed"])
def test_buffers_of_a_quantized_block_are_stored_in_their_dtype_not_rounded_each_call(placement):
    """Under Q8_0 the block's matrices are quantized and its vectors fall back to BF16: a buffer that did so
    would be rounded at each write-back (a count stuck at 256, an EMA whose small steps vanish)."""
    import copy
    from dataclasses import replace

    torch.manual_seed(0)
    model, x = nn.Sequential(*[Tally() for _ in range(4)]).eval(), torch.randn(4, 64)
    plain = copy.deepcopy(model)
    with attach(model, x, vram=None) as rt:
        plan = replace(rt.plan, blocks=tuple(replace(bp, placement=placement, format="Q8_0") for bp in rt.plan.blocks))
    kept = {n for b in rt.workload.blocks for n, d in b.own_dtypes if d == "fp32"}
    assert {"calls", "ema"} <= kept
    with residency.attach(model, profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x, plan=plan), \
            torch.inference_mode():
        for _ in range(300):
            model(x), plain(x)
    assert [float(b.calls) for b in model] == [300.0] * 4
    assert torch.equal(model[0].ema, plain[0].ema)  # its input is the model's: bit for bit
