"""Any nn.Module: attached by module path (no blocks() method); its recovery: test_runtime_any_model_recovery.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

from pipelines.world_model import WorldModelPipeline
from residency.errors import ResidencyError
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime
from residency.runtime.backend_cpu import CpuBackend
from residency.runtime.hooks import has_hook
from residency.workload import BlockSpec, PassSpec, PhaseSpec, Workload

pytestmark = pytest.mark.usefixtures("one_compute_thread")

DIM, HIDDEN, CLASSES, TOKENS, DEPTH = 64, 256, 10, 8, 4
PROFILE = flat_profile(backend="cpu")


class Residual(nn.Module):
    """A plain model: a ModuleList named `blocks` (a path, not a method) and a head; no blocks() method."""

    def __init__(self, depth: int = DEPTH):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))
                                    for _ in range(depth))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _mlp_spec(name: str) -> BlockSpec:
    tensors = (("0.weight", (HIDDEN, DIM)), ("0.bias", (HIDDEN,)), ("2.weight", (DIM, HIDDEN)), ("2.bias", (DIM,)))
    return BlockSpec(name, "model", tensors, TOKENS, 4.0 * DIM * HIDDEN)


def residual_workload(depth: int = DEPTH) -> Workload:
    blocks = tuple(_mlp_spec(f"blocks.{i}") for i in range(depth))
    blocks += (BlockSpec("head", "model", (("weight", (CLASSES, DIM)), ("bias", (CLASSES,))), TOKENS,
                         2.0 * DIM * CLASSES),)
    phase = PhaseSpec("forward", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),))
    return Workload("residual", blocks, (phase,), steps=1, context_frames=0)


def make_plan(w: Workload, placement: str = "resident", fmt: str = "F32", vram: int = 2**26, depth: int = 1,
              copy_mode: str = "async") -> Plan:
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile=PROFILE.name,
                profile_fingerprint=PROFILE.fingerprint(), policy="test", budget=Budget(vram),
                blocks=tuple(BlockPlan(b.name, placement, fmt, "fp32") for b in w.blocks),
                execution=Execution(copy_mode=copy_mode, prefetch_depth=depth), steps=1, context_frames=0)


def small_plan(budget: Budget, profile) -> Plan:
    """What the tests' replan(budget, profile) returns: everything streamed as Q8_0."""
    assert profile is PROFILE
    return make_plan(W, "streamed", "Q8_0", vram=budget.vram_bytes)


W = residual_workload()
X = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(1))


def _call(model, x=X):
    with torch.inference_mode():
        return model(x)


def _run_fresh(plan: Plan, inputs) -> list[torch.Tensor]:
    """An uninterrupted run of `plan` on a fresh copy of the model."""
    model = Residual()
    rt = Runtime(plan, "cpu", workload=W).attach(model)
    try:
        return [_call(model, x) for x in inputs]
    finally:
        rt.detach()


def _held_bytes(plan: Plan) -> int:
    model = Residual()
    rt = Runtime(plan, "cpu", workload=W).attach(model)
    held = rt.ledger.total_bytes
    rt.detach()
    return held


# --- attach by module path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("placement,depth,copy_mode", [("resident", 1, "async"), ("streamed", 1, "async"),
                                                       ("streamed", 2, "async"), ("streamed", 1, "sync"),
                                                       ("resident-quantized", 1, "async")])
def test_a_plain_module_is_attached_by_module_path_and_computes_bit_exactly(placement, depth, copy_mode):
    model = Residual()
    expected = [_call(model), _call(model, 2 * X)]
    rt = Runtime(make_plan(W, placement, depth=depth, copy_mode=copy_mode), "cpu", workload=W).attach(model)
    try:
        assert all(has_hook(m) for m in (*model.blocks, model.head))
        got = [_call(model), _call(model, 2 * X)]
        stats = rt.executor_stats
    finally:
        rt.detach()
    assert stats == {"resyncs": 0, "out_of_schedule_calls": 0}
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_detach_restores_the_plain_module_bit_for_bit():
    model = Residual()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    rt = Runtime(make_plan(W, "streamed", "Q8_0"), "cpu", workload=W).attach(model)
    _call(model)
    rt.detach()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(has_hook(m) or "forward" in m.__dict__ for m in model.modules())


def test_a_missing_module_path_is_named_with_the_models_top_level_modules():
    model = Residual(depth=DEPTH - 1)  # the workload's blocks.3 does not exist
    before = [p.data_ptr() for p in model.parameters()]
    rt = Runtime(make_plan(W), "cpu", workload=W)
    with pytest.raises(ResidencyError, match=r"blocks\.3.*'blocks\.3'.*top-level modules: blocks, head"):
        rt.attach(model)
    assert [p.data_ptr() for p in model.parameters()] == before
    assert not any(has_hook(m) for m in model.modules())


class Scaled(Residual):
    """A parameter of the model itself, read before the first block: no module of its own to hook."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, DIM))

    def forward(self, x):
        return super().forward(x * self.scale)


def scaled_workload() -> Workload:
    """As residency.workload.from_module describes it: a block of the loose tensors, first in the pass."""
    loose = BlockSpec("loose", "model", (("scale", (DIM,)),), TOKENS, 0.0, modules=("",))
    blocks = (loose, *residual_workload().blocks)
    phase = PhaseSpec("forward", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),))
    return Workload("scaled", blocks, (phase,), steps=1, context_frames=0)


def test_a_block_of_the_models_own_tensors_stays_bound_through_the_call():
    w = scaled_workload()
    model = Scaled()
    expected = _call(model)
    plan = make_plan(w, "streamed")
    plan = replace(plan, blocks=(replace(plan.blocks[0], placement="resident"), *plan.blocks[1:]))
    rt = Runtime(plan, "cpu", workload=w).attach(model)
    try:
        got = [_call(model) for _ in range(3)]
        stats = rt.executor_stats
        calls = [b.calls for b in rt.telemetry().frames[-1].blocks]
    finally:
        rt.detach()
    assert stats == {"resyncs": 0, "out_of_schedule_calls": 0}
    assert calls == [1] * len(w.blocks)
    assert all(torch.equal(g, expected) for g in got)


def test_a_block_enclosing_others_must_be_planned_resident_for_the_session():
    w = scaled_workload()
    with pytest.raises(ResidencyError, match="loose encloses other blocks"):
        Runtime(make_plan(w, "streamed"), "cpu", workload=w).attach(Scaled())


def test_two_blocks_of_one_module_are_refused():
    blocks = (*W.blocks, BlockSpec("head-again", "model", W.blocks[-1].tensors, TOKENS, 0.0, modules=("head",)))
    w = Workload("twice", blocks, (PhaseSpec("forward", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),)),),
                 steps=1, context_frames=0)
    with pytest.raises(ResidencyError, match="share module Linear"):
        Runtime(make_plan(w), "cpu", workload=w).attach(Residual())


class Gated(nn.Module):
    """Two sibling modules that one block owns (`inp`, `gate`), called one after the other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.gate, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.out(self.inp(x) * torch.sigmoid(self.gate(x)))


def gated_workload() -> Workload:
    linear = (("weight", (DIM, DIM)), ("bias", (DIM,)))
    # as residency.workload.from_module names them: tensors from the modules' common parent (the root here)
    blocks = (BlockSpec("gated.inp+gate", "model", tuple((f"{m}.{n}", s) for m in ("inp", "gate") for n, s in linear),
                        TOKENS, 4.0 * DIM * DIM, modules=("inp", "gate")),
              BlockSpec("gated.out", "model", linear, TOKENS, 2.0 * DIM * DIM, modules=("out",)))
    # the members' consecutive calls are one call of the block
    return Workload("gated", blocks, (PhaseSpec("forward", "latent_frame", (PassSpec(tuple(b.name for b in blocks)),)),),
                    steps=1, context_frames=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_block_of_several_sibling_modules_is_one_call_over_the_union_of_their_weights(depth):
    w = gated_workload()
    model = Gated()
    expected = _call(model)
    rt = Runtime(make_plan(w, "streamed", depth=depth), "cpu", workload=w).attach(model)
    try:
        assert has_hook(model.inp) and has_hook(model.gate)
        got = [_call(model) for _ in range(3)]
        stats = rt.executor_stats
        frames = rt.telemetry().frames
    finally:
        rt.detach()
    assert stats == {"resyncs": 0, "out_of_schedule_calls": 0}
    assert [b.calls for b in frames[-1].blocks] == [1, 1]
    assert frames[-1].link_bytes == sum(b.nbytes("F32") for b in w.blocks)
    assert all(torch.equal(g, expected) for g in got)


def test_module_paths_come_from_the_block_spec_when_it_records_them():
    w = gated_workload()  # block `gated.out` is no path of the model; its recorded module `out` is
    model = Gated()
    rt = Runtime(make_plan(w), "cpu", workload=w).attach(model)
    hooked = [has_hook(m) for m in (model.inp, model.gate, model.out)]
    rt.detach()
    assert hooked == [True, True, True]


def test_the_world_models_block_names_are_its_module_paths():
    pipe = WorldModelPipeline.from_config("tiny", device="meta")
    assert all(pipe.get_submodule(name) is module for name, module, _ in pipe.blocks())


# --- threads -----------------------------------------------------------------------------------------------
@pytest.fixture
def caller_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # neither the fixture's 1 nor any runtime's count below
    yield 3
    torch.set_num_threads(before)


def test_detach_gives_the_caller_its_thread_count_back(caller_threads):
    model = Residual()
    rt = Runtime(make_plan(W), CpuBackend(compute_threads=2), workload=W).attach(model)
    assert torch.get_num_threads() == 2  # while attached: the runtime's count, for the whole process
    rt.detach()
    assert torch.get_num_threads() == caller_threads


def test_two_runtimes_attached_at_once_give_the_thread_count_back_after_the_last(caller_threads):
    a = Runtime(make_plan(W), CpuBackend(compute_threads=1), workload=W).attach(Residual())
    b = Runtime(make_plan(W), CpuBackend(compute_threads=1), workload=W).attach(Residual())
    a.detach()
    assert torch.get_num_threads() == 1  # b still computes on its count
    b.detach()
    assert torch.get_num_threads() == caller_threads


def test_a_model_with_layers_its_workload_does_not_know_is_warned_about():
    """A plan for 3 layers attached to a model of 4 ran the 4th unmanaged, outside the budget, silently."""
    import warnings

    import residency
    from residency.errors import PlanWarning
    from residency.workload import workload_from_module

    def model(n: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), *[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(n)]).eval()

    x = torch.randn(2, 32)
    small = workload_from_module(model(3), x, name="Sequential", compute_dtype="fp32")
    plan = residency.make_plan(small, flat_profile(backend="cpu"), compute_dtype="fp32")
    with pytest.warns(PlanWarning, match=r"4: beside the model's blocks and like them, but in no block"):
        residency.Runtime(plan, "cpu", workload=small).attach(model(4)).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        residency.Runtime(plan, "cpu", workload=small).attach(model(3)).detach()


def test_the_runtime_called_calls_the_attached_model():
    """`with residency.attach(m, …) as rt: rt(x)` (as a pipeline's handle is called) was a TypeError."""
    model = Residual()
    expected = _call(model)
    rt = Runtime(make_plan(W), "cpu", workload=W).attach(model)
    with torch.inference_mode():
        got = rt(X)
    rt.detach()
    with pytest.raises(ResidencyError, match="not attached"):
        rt(X)
    assert torch.equal(got, expected)
