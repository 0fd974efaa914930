"""Workloads built from a torch module and one counted forward (residency.workload.from_module): plain modules.

The library models (diffusers, transformers) are in test_workload_from_module_models.py; the helpers here
(hooked real order, counted real FLOPs, planning) serve both.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from policies import PlanOptions, PlanRequest, get_policy
from residency.device import resolve_profile
from residency.errors import ResidencyError
from residency.plan import Budget
from residency.simulate import simulate
from residency.workload import (
    ModuleWorkloadWarning,
    Workload,
    module_workload,
    workload_from_dict,
    workload_from_module,
    workload_to_dict,
)

# ---- helpers shared with test_workload_from_module_models.py ----------------------------------------------


def split(example):
    return ((), example) if isinstance(example, dict) else (tuple(example), {})


def real_flops(model: nn.Module, example) -> int:
    """FlopCounterMode on a real forward. SDPA in its math form: torch has no FLOP formula for the CPU's
    fused attention kernel and would count it as 0."""
    args, kwargs = split(example)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def forward_flops(w: Workload) -> float:
    """FLOPs of one forward as the planner sees it: every call of every pass (steps = 1)."""
    assert w.steps == 1
    return w.flops_per_frame()


def hooked_order(model: nn.Module, w: Workload, example) -> list[str]:
    """The blocks in the order a hooked real forward calls their modules; consecutive calls of one block's
    different modules (grouped siblings) are one call."""
    calls: list[tuple[str, str]] = []
    handles = [model.get_submodule(m).register_forward_pre_hook(lambda mod, a, b=b.name, m=m: calls.append((b, m)))
               for b in w.blocks for m in b.modules if b.name.rpartition(".")[2] != "loose"]
    args, kwargs = split(example)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    order: list[str] = []
    for i, (b, m) in enumerate(calls):
        if i and calls[i - 1][0] == b and calls[i - 1][1] != m:
            continue
        order.append(b)
    return order


def scheduled_order(w: Workload) -> list[str]:
    """The workload's calls of one forward, the loose block left out (it is no module call)."""
    return [b for ph in w.phases for p in ph.passes for b in p.blocks if not b.endswith(".loose")]


def unique_tensor_elements(model: nn.Module) -> int:
    """Parameters (tied ones once) and floating buffers: what the workload's blocks must hold in all."""
    return (sum(p.numel() for p in model.parameters())
            + sum(b.numel() for b in model.buffers() if b.is_floating_point()))


def plan_and_simulate(w: Workload) -> None:
    """Plan with ours under a shipped profile at a budget that streams part of the model, and simulate."""
    profile = resolve_profile("rtx-3060-12gb")
    ours = get_policy("ours")
    options = PlanOptions(bound=False)
    roomy = ours(PlanRequest(w, profile, Budget(2**33, None), options=options))
    assert {b.placement for b in roomy.blocks} == {"resident"}
    tight = roomy.prediction.peak_total_bytes - w.nbytes("BF16") // 2
    plan = ours(PlanRequest(w, profile, Budget(tight, None), options=options))
    assert plan.prediction.peak_total_bytes <= tight, plan.notes
    assert any(b.placement != "resident" for b in plan.blocks)
    prediction = simulate(w, plan, profile, bound=False).prediction
    assert prediction.frame_ms > 0 and prediction.compute_ms > 0


# ---- plain modules --------------------------------------------------------------------------------------------


class MLPBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = h[:, None]  # one head of width d, no projections
        h = nn.functional.scaled_dot_product_attention(h, h, h)[:, 0]
        return x + self.fc2(nn.functional.gelu(self.fc1(h)))


class Stack(nn.Module):
    """A ModuleList of blocks between two linears, a loose parameter and a buffer; `checks` adds a
    data-dependent `.item()`, which the meta device cannot answer."""

    def __init__(self, d: int = 32, n: int = 3, tokens: int = 16, checks: bool = False) -> None:
        super().__init__()
        self.checks = checks
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(n))
        self.gain = nn.Parameter(torch.ones(d))
        self.register_buffer("pos", torch.randn(tokens, d))
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        if self.checks and h.abs().amax().item() > 1e6:
            h = h / 2
        for b in self.blocks:
            h = b(h)
        return self.head(h * self.gain)


EXAMPLE = (torch.randn(1, 16, 8),)


def build(model: nn.Module, example=EXAMPLE, **kwargs):
    return module_workload(model, example, name="stack", **kwargs)


def test_blocks_are_the_modulelist_children_the_other_modules_and_a_loose_block():
    r = build(Stack())
    names = [b.name for b in r.workload.blocks]
    assert names == ["stack.loose", "stack.embed", "stack.blocks.0", "stack.blocks.1", "stack.blocks.2",
                     "stack.head"]
    assert r.repeated_from == "ModuleList"
    by = r.workload.by_name
    assert by["stack.blocks.1"].modules == ("blocks.1",)
    assert [n for n, _ in by["stack.loose"].tensors] == ["gain", "pos"]
    assert [n for n, _ in by["stack.blocks.0"].tensors][:2] == ["norm.weight", "norm.bias"]  # block-relative


def test_counted_on_meta_call_order_bytes_and_flops_match_a_real_forward():
    model = Stack()
    r = build(model)
    assert r.counted_on == "meta" and r.meta_error == ""
    assert scheduled_order(r.workload) == hooked_order(model, r.workload, EXAMPLE)
    assert r.workload.params == unique_tensor_elements(model)
    assert forward_flops(r.workload) == pytest.approx(real_flops(model, EXAMPLE), rel=0.02)


def test_flops_split_into_weight_rows_and_activation_products():
    d, t = 32, 16
    b = build(Stack(d)).workload.by_name["stack.blocks.0"]
    assert b.tokens == t
    assert b.flops_per_token == pytest.approx(2 * 2 * d * 4 * d)  # fc1 and fc2 on every token
    assert b.self_attn_flops_per_token_pair == pytest.approx(2 * 2 * d)  # scores h·hᵀ, weighted sum of h
    assert b.fixed_flops == 0


def test_activation_peak_holds_the_widest_intermediates():
    d = 32
    b = build(Stack(d)).workload.by_name["stack.blocks.0"]
    # fc1's output and GELU's (4d each) are alive together, at 2 bytes per element
    assert b.activation_bytes_per_token >= 2 * (4 * d + 4 * d)
    assert b.ops_per_call > b.kernels_per_call > 0 and b.activation_elements_per_call > 0


def test_a_data_dependent_op_falls_back_to_one_counted_real_forward():
    model = Stack(checks=True)
    r = build(model)
    assert r.counted_on == "real" and "item" in r.meta_error
    assert r.workload.extra["counted_on"] == "real"
    assert forward_flops(r.workload) == pytest.approx(real_flops(model, EXAMPLE), rel=0.02)
    assert scheduled_order(r.workload) == hooked_order(model, r.workload, EXAMPLE)


class Counting(Stack):
    """A forward that reads a counter with .item() (the meta device cannot) and updates buffers in place."""

    def __init__(self) -> None:
        super().__init__(checks=True)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.pos.mul_(1.0 + 0.1 * self.calls.item())
        return super().forward(x)


def test_a_real_counting_forward_leaves_the_models_buffers_as_they_were():
    model = Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = build(model)
    assert r.counted_on == "real"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # attach alone changes nothing


class ScalesItsInput(Stack):
    """A data-dependent forward (counted for real) that edits its input in place, as some preprocessing does."""

    def __init__(self) -> None:
        super().__init__(checks=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return super().forward(x)


def test_a_real_counting_forward_leaves_the_callers_example_as_it_was():
    """It ran on the caller's tensors: the example came back doubled, so the first call after attach saw another
    input than the user passed (off by 0.068 on the probe's model)."""
    x = torch.randn(1, 16, 8)
    before = x.clone()
    r = build(ScalesItsInput(), (x,))
    assert r.counted_on == "real"
    assert torch.equal(x, before)


def test_a_model_without_weights_that_fails_on_meta_is_counted_on_a_narrow_instance():
    with init_empty_weights():
        wide = Stack(d=256, checks=True)
    r = build(wide, narrow=lambda: (Stack(d=32, checks=True), EXAMPLE))
    assert r.counted_on == "narrow"
    real = Stack(d=256, checks=True)
    assert forward_flops(r.workload) == pytest.approx(real_flops(real, EXAMPLE), rel=0.02)
    assert r.workload.params == unique_tensor_elements(real)  # the wide model's tensors, not the narrow one's
    counted = build(real)  # the wide model's own real forward: the same op stream, all of it counted
    assert counted.counted_on == "real"
    for name in ("stack.embed", "stack.blocks.0", "stack.head"):
        scaled, exact = r.workload.by_name[name], counted.workload.by_name[name]
        assert (scaled.ops_per_call, scaled.kernels_per_call) == (exact.ops_per_call, exact.kernels_per_call)
        # scaled by the width ratio: exact for elementwise ops on (tokens × width) activations
        assert scaled.activation_elements_per_call == pytest.approx(exact.activation_elements_per_call, rel=0.05)
        assert scaled.activation_bytes_per_token == pytest.approx(exact.activation_bytes_per_token, rel=0.05)


def test_a_model_without_weights_that_fails_on_meta_and_has_no_narrow_instance_is_refused():
    with init_empty_weights():
        wide = Stack(checks=True)
    with pytest.raises(ResidencyError, match="no weights to run") as refused:
        build(wide)
    assert "narrow=" in refused.value.hint


class WithUnused(Stack):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(32, 32)  # never called nor read by forward


def test_parameters_of_a_module_the_forward_never_runs_are_warned_about_and_left_out():
    model = WithUnused()
    with pytest.warns(ModuleWorkloadWarning, match=r"spare\.weight"):
        r = build(model)
    assert r.unowned == ("spare.weight", "spare.bias")
    assert not any("spare" in m for b in r.workload.blocks for m in b.modules)
    assert r.workload.params == unique_tensor_elements(model) - 32 * 32 - 32


class CallsTwice(Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        for b in (*self.blocks, self.blocks[0]):
            h = b(h)
        return self.head(h * self.gain)


def test_a_block_called_twice_is_warned_about_and_its_second_call_opens_a_pass():
    model = CallsTwice()
    with pytest.warns(ModuleWorkloadWarning, match=r"stack\.blocks\.0 ×2"):
        r = build(model)
    assert r.calls_per_forward["stack.blocks.0"] == 2
    passes = [p.blocks for p in r.workload.phases[0].passes]
    assert passes == [("stack.loose", "stack.embed", "stack.blocks.0", "stack.blocks.1", "stack.blocks.2"),
                      ("stack.blocks.0", "stack.head")]
    assert scheduled_order(r.workload) == hooked_order(model, r.workload, EXAMPLE)
    assert forward_flops(r.workload) == pytest.approx(real_flops(model, EXAMPLE), rel=0.02)


class TiedLM(nn.Module):
    """Token embedding and output head sharing one weight, as GPT-2, T5 and small Llamas do."""

    def __init__(self, vocab: int = 64, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(3))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_a_tied_embedding_and_head_are_one_block_called_once_by_each_without_a_warning():
    model = TiedLM()
    ids = (torch.randint(0, 64, (1, 16)),)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModuleWorkloadWarning)
        r = module_workload(model, ids, name="lm")
    assert r.calls_per_forward["lm.embed"] == 2  # the lookup and the head's matmul: still counted, both
    assert r.workload.by_name["lm.embed"].modules == ("embed", "head")
    assert forward_flops(r.workload) == pytest.approx(real_flops(model, ids), rel=0.02)
    model.head = nn.Linear(32, 64, bias=False)  # untied, then the embedding called twice: that one is said
    model.forward = lambda ids: model.head(model.embed(ids) + model.embed(ids))
    with pytest.warns(ModuleWorkloadWarning, match=r"lm\.embed ×2"):
        module_workload(model, ids, name="lm")


def test_the_users_forward_hooks_stay_silent_while_counting_and_torch_own_hooks_run():
    model = Stack()
    seen: list[str] = []
    handles = [model.blocks[0].register_forward_hook(lambda m, a, out: seen.append("post")),
               model.register_forward_pre_hook(lambda m, a, kw: seen.append("pre"), with_kwargs=True),
               model.head.register_forward_hook(lambda m, a, out: seen.append("always"), always_call=True)]
    nn.utils.weight_norm(model.embed)  # torch's own pre-hook: it computes the weight the forward reads
    r = build(model)
    assert seen == [] and r.counted_on == "meta"
    assert "weight_g" in dict(r.workload.by_name["stack.embed"].tensors)  # counted through the hook
    with torch.no_grad():
        model(*EXAMPLE)
    assert seen == ["pre", "post", "always"]  # every hook back, in place, with its flags
    for h in handles:
        h.remove()
    seen.clear()
    with torch.no_grad():
        model(*EXAMPLE)
    assert seen == []


def test_a_plain_model_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModuleWorkloadWarning)
        build(Stack())


def test_the_workload_round_trips_through_a_catalog_document_with_its_module_paths():
    w = build(Stack()).workload
    back = workload_from_dict(workload_to_dict(w))
    assert back == w
    assert back.by_name["stack.blocks.2"].modules == ("blocks.2",)


def test_the_short_form_returns_the_workload_at_the_given_steps_and_component():
    w = workload_from_module(Stack(), EXAMPLE, name="stack", component="dit", steps=4)
    assert w.steps == 4 and w.components == ["dit"] and w.blocks[1].name == "dit.embed"
    assert w.flops_per_frame() == pytest.approx(4 * build(Stack()).workload.flops_per_frame())


def test_a_plain_model_plans_and_simulates():
    plan_and_simulate(build(Stack(d=256)).workload)


def test_an_error_inside_the_models_code_is_told_with_the_line_that_raised_it():
    """A bare assert said only "AssertionError at embeddings.py:921"; its code names what it checks."""
    from residency.workload.from_module import error_line

    def rope(axes_dim, dim):
        if sum(axes_dim) != dim:  # as a bare assert raises (pytest rewrites the asserts of this file)
            raise AssertionError

    try:
        rope([1, 2, 3], 16)
    except AssertionError as e:
        said = error_line(e)
    assert said.startswith("AssertionError at test_workload_from_module.py:")
    assert said.endswith(": `raise AssertionError`")
    try:
        int("two")
    except ValueError as e:
        said = error_line(e)
    assert said.startswith("ValueError: invalid literal for int()") and said.endswith(': `int("two")`')
