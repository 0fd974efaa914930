"""The `graphed` execution mode on the CPU, with a test double in place of CUDA graph capture: it records each
capture and replays by calling the captured function on the static buffers it was captured with. What a real
graph would get wrong the double gets wrong the same way: a graph reading another slot, a stale static input,
an output overwritten by a later replay. tests/test_gpu_graphed.py checks the CUDA capture itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

from pipelines.world_model import PRESETS, WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.errors import ResidencyError
from residency.plan import BlockPlan, Budget, Execution, Plan
from residency.runtime import Runtime, graphed
from residency.runtime.backends import get_backend
from residency.runtime.graphed import GraphedForwards
from residency.runtime.module_paths import block_modules
from residency.simulate import simulate
from residency.workload import workload_from_dict

CONFIG = PRESETS["tiny"].replace(context_frames=4)  # a short window: filled, then run past, in few frames
FRAMES = CONFIG.context_frames + 4  # full from frame context_frames on; the ring's slots cycle within 2 more

pytestmark = pytest.mark.usefixtures("one_compute_thread")


class ReplayDouble:
    """GraphCapture on the CPU: warm-up runs fn; capture records (fn, static args) and returns a replay that
    calls fn on those static args. `fail`: capture raises as CUDA does on a host sync under capture."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.captured: list[tuple] = []  # the static args of each capture
        self.replays = 0
        self.warm_ups = 0

    def warm_up(self, fn, args):
        self.warm_ups += 1
        return fn(*args)

    def capture(self, fn, static_args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(static_args)

        def replay():
            self.replays += 1
            fn(*static_args)
        return replay


@pytest.fixture(scope="module")
def workload():
    return workload_from_dict(catalog_entry(CONFIG))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


# --- GraphedForwards alone: blocks bound by hand to "slots", as the executor binds them ------------------------

class Affine(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * scale


def _slots(n: int, module: nn.Module) -> list[list[torch.Tensor]]:
    """n buffers shaped like the module's parameters (a slot ring)."""
    return [[torch.empty_like(p) for p in module.parameters()] for _ in range(n)]


def _bind(module: nn.Module, slot: list[torch.Tensor], source: nn.Module) -> None:
    """Load `source`'s weights into `slot` and bind `module`'s parameters to it (the executor's .data swap)."""
    for p, buf, w in zip(module.parameters(), slot, source.parameters(), strict=True):
        buf.copy_(w.detach())
        p.data = buf


def _graphed(*modules: nn.Module, double: ReplayDouble | None = None):
    notes: list[str] = []
    g = GraphedForwards(double or ReplayDouble(), torch.device("cpu"), notes)
    for i, m in enumerate(modules):
        g.install(f"b{i}", m)
    return g, notes


@torch.inference_mode()
def test_a_replay_reads_the_slot_it_was_captured_with_and_static_inputs_are_refreshed():
    torch.manual_seed(0)
    a, b = Affine(), Affine()  # two blocks of one class, different weights
    ref_a, ref_b = Affine(), Affine()
    ref_a.load_state_dict(a.state_dict())
    ref_b.load_state_dict(b.state_dict())
    runner = Affine()  # the module the hooks call: its parameters are rebound to whichever slot holds a block
    slots = _slots(2, runner)
    double = ReplayDouble()
    g, notes = _graphed(runner, double=double)
    for step in range(4):
        for ref, slot in ((ref_a, 0), (ref_b, 1)):  # block A in slot 0, block B in slot 1
            x = torch.randn(3, 8)
            _bind(runner, slots[slot], ref)
            assert torch.equal(runner(x), ref(x)), (step, slot)
    assert len(double.captured) == 2  # one per (class, slot, shapes)
    assert double.replays == 6 and g.captures == 2 and g.replays == 6 and notes == []
    _bind(runner, slots[0], ref_b)  # slot 0 now holds B: its graph reads B's weights there
    x = torch.randn(3, 8)
    assert torch.equal(runner(x), ref_b(x))
    runner(torch.randn(5, 8))  # another shape: another graph
    runner(torch.randn(3, 8), scale=2.0)  # another plain argument: another graph
    assert len(double.captured) == 4


@torch.inference_mode()
def test_blocks_of_one_class_share_the_graph_of_the_slot_they_are_bound_to():
    torch.manual_seed(1)
    blocks, refs = [Affine() for _ in range(3)], [Affine() for _ in range(3)]
    slots = _slots(2, blocks[0])
    double = ReplayDouble()
    g, notes = _graphed(*blocks, double=double)
    for call in range(9):  # the ring: call k of block k % 3 lands in slot k % 2
        i, slot = call % 3, call % 2
        _bind(blocks[i], slots[slot], refs[i])
        x = torch.randn(3, 8)
        assert torch.equal(blocks[i](x), refs[i](x)), call
    assert len(double.captured) == 2 and double.replays == 7 and notes == []


@torch.inference_mode()
def test_an_output_is_the_callers_and_not_overwritten_by_the_next_replay():
    m = Affine()
    ref = Affine()
    ref.load_state_dict(m.state_dict())
    g, _ = _graphed(m)
    m(torch.randn(2, 8))  # the capture
    x1, x2 = torch.randn(2, 8), torch.randn(2, 8)
    y1 = m(x1)
    y2 = m(x2)  # the same graph, replayed with other inputs
    assert torch.equal(y1, ref(x1)) and torch.equal(y2, ref(x2))
    assert y1.data_ptr() != y2.data_ptr()


@torch.inference_mode()
def test_graphs_past_the_class_limit_go_least_recently_replayed_first(monkeypatch):
    monkeypatch.setattr(graphed, "GRAPHS_KEPT_MIN", 2)
    monkeypatch.setattr(graphed, "GRAPHS_KEPT_PER_MODULE", 1)
    m = Affine()
    g, notes = _graphed(m)
    xs = {n: torch.randn(n, 8) for n in (1, 2, 3)}
    for n in (1, 2, 1, 3):  # 3 arrives with 1 and 2 kept: 2, replayed least recently, goes
        assert torch.equal(m(xs[n]), Affine.forward(m, xs[n]))
    assert g.captures == 3 and g.replays == 1
    for n in (1, 3):
        m(xs[n])
    assert g.captures == 3 and g.replays == 3
    assert torch.equal(m(xs[2]), Affine.forward(m, xs[2]))  # captured again
    assert g.captures == 4 and notes == []


@torch.inference_mode()
def test_a_class_whose_keys_change_at_every_call_runs_eagerly_with_a_note(monkeypatch):
    monkeypatch.setattr(graphed, "CAPTURES_IN_A_ROW_MIN", 3)
    monkeypatch.setattr(graphed, "CAPTURES_IN_A_ROW_PER_MODULE", 1)
    m = Affine()
    g, notes = _graphed(m)
    for n in range(1, 7):  # a shape that follows the data
        x = torch.randn(n, 8)
        assert torch.equal(m(x), Affine.forward(m, x))
    assert g.captures == 3
    assert notes == ["graph of Affine.forward not captured, running it eagerly: 3 captures without a replay "
                     "(its inputs change shape or context at every call)"]


class TakesAnObject(Affine):
    def forward(self, x: torch.Tensor, ctx: object) -> torch.Tensor:
        return super().forward(x) + ctx.offset


class Ctx:
    def __init__(self, offset: float):
        self.offset = offset


class KeyedCtx(Ctx):
    def capture_key(self):
        return (self.offset,)


@torch.inference_mode()
def test_an_argument_without_capture_key_runs_the_class_eagerly_with_a_note():
    m = TakesAnObject()
    g, notes = _graphed(m)
    x = torch.randn(2, 8)
    ctx = Ctx(1.0)
    expected = Affine.forward(m, x) + 1.0
    assert torch.equal(m(x, ctx), expected)
    ctx.offset = 2.0  # eager: the change is seen
    assert torch.equal(m(x, ctx), Affine.forward(m, x) + 2.0)
    assert g.captures == 0
    assert notes == ["graph of TakesAnObject.forward not captured, running it eagerly: an argument of type Ctx "
                     "without capture_key() (what it makes the block compute cannot be keyed)"]


@torch.inference_mode()
def test_an_argument_with_capture_key_is_keyed_by_identity_and_key():
    m = TakesAnObject()
    g, notes = _graphed(m)
    x = torch.randn(2, 8)
    ctx = KeyedCtx(1.0)
    for _ in range(3):
        assert torch.equal(m(x, ctx), Affine.forward(m, x) + 1.0)
    ctx.offset = 2.0  # its key changes: another graph
    assert torch.equal(m(x, ctx), Affine.forward(m, x) + 2.0)
    other = KeyedCtx(2.0)  # same key, another object: another graph
    assert torch.equal(m(x, other), Affine.forward(m, x) + 2.0)
    assert g.captures == 3 and notes == []
    del other  # a dead object's graph is never replayed for a new one at its id
    assert torch.equal(m(x, KeyedCtx(2.0)), Affine.forward(m, x) + 2.0)


@torch.inference_mode()
def test_a_failed_capture_returns_the_eager_result_and_runs_the_class_eagerly_with_a_note():
    m = Affine()
    double = ReplayDouble(fail=True)
    g, notes = _graphed(m, double=double)
    x = torch.randn(2, 8)
    assert torch.equal(m(x), Affine.forward(m, x))
    assert torch.equal(m(x), Affine.forward(m, x))
    assert double.warm_ups == 1 and g.captures == 0  # no second attempt
    assert len(notes) == 1 and "capture failed (RuntimeError: operation not permitted" in notes[0]


class Scaled(Affine):
    """Another block class: its own graphs."""


@torch.inference_mode()
def test_after_one_failed_capture_no_class_captures_again():
    # On a CUDA torch without pytorch#180395 a failed capture leaves the allocator in a capture state and the
    # next capture asserts: one failure turns capturing off for the whole attach, each class with its note.
    a, b = Affine(), Scaled()
    double = ReplayDouble(fail=True)
    g, notes = _graphed(a, b, double=double)
    x = torch.randn(2, 8)
    assert torch.equal(a(x), Affine.forward(a, x))
    double.fail = False  # the driver would accept the next one: we must not ask
    assert torch.equal(b(x), Affine.forward(b, x))
    assert torch.equal(b(x), Affine.forward(b, x))
    assert g.captures == 0 and double.captured == [] and double.warm_ups == 1
    assert len(notes) == 1 and notes[0].startswith("graph of Affine.forward not captured")


@torch.inference_mode()
def test_an_expanded_argument_gets_a_dense_static_copy():
    # A broadcast argument (stride 0): a static buffer with its strides would overlap and refuse copy_.
    m = Affine()
    g, notes = _graphed(m)
    for _ in range(3):
        x = torch.randn(1, 8).expand(4, 8)
        assert torch.equal(m(x), Affine.forward(m, x.contiguous()))
    assert g.captures == 1 and notes == []


@torch.inference_mode()
def test_a_call_under_caching_autocast_runs_eagerly():
    # autocast caches a weight's cast copy and frees it when its region ends: a graph would read freed memory.
    m = Affine()
    double = ReplayDouble()
    g, _ = _graphed(m, double=double)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert torch.equal(m(x), Affine.forward(m, x))
    assert g.captures == 0 and double.warm_ups == 0
    assert torch.equal(m(x), Affine.forward(m, x)) and g.captures == 1  # outside autocast it captures


class AddsInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1.0)


def test_a_block_that_changes_its_argument_in_place_runs_eagerly_with_a_note():
    m = AddsInPlace()
    _, notes = _graphed(m)
    x = torch.zeros(3)
    with torch.no_grad():
        m(x)
        m(x)
    assert torch.equal(x, torch.full((3,), 2.0))  # the caller's tensor, changed once per call
    assert len(notes) == 1 and "changes a tensor argument in place" in notes[0]


def test_with_autograd_on_a_call_runs_eagerly_and_captures_nothing():
    m = Affine()
    g, notes = _graphed(m)
    y = m(torch.randn(2, 8))
    assert y.requires_grad and g.captures == 0 and notes == []


def test_restore_puts_the_class_forward_back_and_refuses_a_later_wrapper():
    m = Affine()
    g, _ = _graphed(m)
    assert "forward" in m.__dict__
    g.restore()
    assert "forward" not in m.__dict__
    g, _ = _graphed(m)
    m.forward = lambda x: x  # wrapped again by someone else
    with pytest.raises(RuntimeError, match="replaced after residency graphed it"):
        g.restore()


# --- the runtime: the tiny world model under graphed plans ------------------------------------------------

def graphed_plan(w, pipe, placement="resident", depth=1, vram=2**31, exec_mode="graphed") -> Plan:
    """tiny_plan's plan with every block graphed that may be (the blocks enclosing others stay eager)."""
    _, enclosing = block_modules(pipe, w)
    blocks = tuple(BlockPlan(b.name, placement, "F32", "fp32",
                             exec_mode="eager" if b.name in enclosing else exec_mode) for b in w.blocks)
    return Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(vram), blocks=blocks, execution=Execution(prefetch_depth=depth),
                steps=w.steps, context_frames=w.context_frames)


def _with_double(double: ReplayDouble):
    backend = get_backend("cpu")
    backend.graph_capture = lambda: double  # injected: the CPU backend captures no graphs of its own
    return backend


def _rollout(pipe, image, workload, plan, backend="cpu", after_step=lambda: None, frames=FRAMES):
    rt = Runtime(plan, backend, workload=workload).attach(pipe)
    try:
        session = pipe.start(image, seed=3)
        out = []
        for i in range(frames):
            out.append(rt.step(session, ("up", "left", "idle", "jump")[i % 4]))
            after_step()
        held = dict(rt.ledger.snapshot().current_bytes)
    finally:
        rt.detach()
    return out, rt, held


@pytest.mark.parametrize("placement,depth", [("resident", 1), ("streamed", 1), ("streamed", 2)])
def test_graphed_blocks_under_the_runtime_equal_the_eager_runtime(workload, image, placement, depth):
    pipe = WorldModelPipeline.from_config(CONFIG)
    expected, _, _ = _rollout(pipe, image, workload, graphed_plan(workload, pipe, placement, depth, exec_mode="eager"))
    double = ReplayDouble()
    captures: list[int] = []
    got, rt, _ = _rollout(pipe, image, workload, graphed_plan(workload, pipe, placement, depth),
                          _with_double(double), lambda: captures.append(len(double.captured)))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    assert rt.notes == []  # every block class captured
    # A fixed set of graphs: (layer, slot, pass kind, window fill); once the window is full, only replays.
    assert captures[-1] == captures[-3] > 0 and double.replays > 0, captures
    assert not [m for m in pipe.modules() if "forward" in m.__dict__]  # detach restored the forwards


def test_a_graphed_plan_is_refused_on_the_cpu_backend_unless_a_capture_is_injected(workload, image):
    pipe = WorldModelPipeline.from_config(CONFIG)
    plan = graphed_plan(workload, pipe)
    with pytest.raises(ResidencyError, match="graphed needs a CUDA/ROCm backend") as e:
        Runtime(plan, "cpu", workload=workload).attach(pipe)
    assert e.value.hint == "use 'compiled' or 'eager' on the CPU backend"
    Runtime(plan, _with_double(ReplayDouble()), workload=workload).attach(pipe).detach()


def test_the_ledger_holds_the_graph_pools_the_simulator_predicts(workload, image):
    pipe = WorldModelPipeline.from_config(CONFIG)
    gpu = dataclasses.replace(flat_profile(), graph_pool_bytes_per_class=3 * 2**20)
    for placement in ("resident", "streamed"):
        plan = graphed_plan(workload, pipe, placement)
        predicted = simulate(workload, plan, gpu).prediction
        assert predicted.peak_bytes["graph_pool"] > 3 * 2**20
        _, rt, held = _rollout(pipe, image, workload, plan.with_prediction(predicted),
                               _with_double(ReplayDouble()))
        assert held["graph_pool"] == predicted.peak_bytes["graph_pool"], placement
        assert rt.ledger.total_bytes == 0  # released at detach
    # A plan without a prediction holds its graphed classes' largest activations (the per-class figure unknown).
    no_extra = dataclasses.replace(gpu, graph_pool_bytes_per_class=0)
    plan = graphed_plan(workload, pipe)
    _, _, held = _rollout(pipe, image, workload, plan, _with_double(ReplayDouble()))
    assert held["graph_pool"] == simulate(workload, plan, no_extra).prediction.peak_bytes["graph_pool"] > 0
    _, _, held = _rollout(pipe, image, workload, graphed_plan(workload, pipe, exec_mode="eager"))
    assert held["graph_pool"] == 0
