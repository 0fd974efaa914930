"""Plan: per block placement, storage format and compute dtype; slots, KV dtype, phases; the prediction.

A plan is tied to one workload and one device profile by their fingerprints.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Protocol

import numpy as np

from residency.errors import ResidencyError
from residency.units import fmt_bytes, fmt_ms
from residency.validate import show
from residency.workload.spec import MAX_CONTEXT_FRAMES, MAX_STEPS  # noqa: F401  (bounds a plan shares)

PLACEMENTS = ("resident", "resident-quantized", "streamed")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
LIFETIMES = ("session", "phase")  # resident blocks: loaded once for the session, or per run of their phase
COPY_MODES = ("async", "sync")  # copy engine beside compute, or blocking copies on the compute stream
DEQUANT_ON = ("compute", "copy")  # where a streamed block is dequantized: compute stream, or copy engine
# How a block's module runs: as written; through torch.compile; as a CUDA/HIP graph per block class and slot.
EXEC_MODES = ("eager", "compiled", "graphed")
# Bounds a plan document is held to (plan_io, plan.schema.json). Beyond them a plan is a typo or hostile:
MAX_PREFETCH_DEPTH = 16  # each level is a slot of device memory; the planner tries 1 and 2
MAX_PLAN_BYTES = 2**53  # any byte count: 8 PiB, and every value below it is exact as a JSON (double) number


class _Named(Protocol):
    name: str


class PlannedFor(Protocol):
    """What a plan checks of the workload it is applied to."""

    @property
    def blocks(self) -> Sequence[_Named]:
        """The blocks, each with a `name`, in execution order."""
        ...

    def fingerprint(self) -> str:
        """A hash of what the plan depends on; compared with the plan's."""
        ...


@dataclass(frozen=True)
class BlockPlan:
    """Where one block lives (placement), in which storage format and dtype, and for how long."""
    name: str  # block name in the workload
    placement: str  # "resident" | "resident-quantized" | "streamed"
    format: str  # storage format: host store for streamed, device for resident-quantized, load source for resident
    compute_dtype: str = "bf16"  # "bf16" | "fp16" | "fp32"
    lifetime: str = "session"  # resident kinds: "session" or "phase" (evicted when its phase ends)
    dequant_on: str = "compute"  # streamed quantized blocks: "compute" (slot holds packed bytes) or "copy"
    # Where the block lives in the model, copied from the workload by the policy (build_plan) for readers of
    # the plan JSON: module paths (relative to the traced model; the block's name where the workload has
    # none) and tensor names (relative to the block). Not what the plan decides, so not compared.
    modules: tuple[str, ...] = field(default=(), compare=False)
    tensors: tuple[str, ...] = field(default=(), compare=False)
    exec_mode: str = "eager"  # "eager" | "compiled" (torch.compile of the block) | "graphed" (GPU only)

    def __post_init__(self) -> None:
        for what, value, allowed in (("placement", self.placement, PLACEMENTS),
                                     ("exec_mode", self.exec_mode, EXEC_MODES),
                                     ("lifetime", self.lifetime, LIFETIMES),
                                     ("dequant_on", self.dequant_on, DEQUANT_ON),
                                     ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)):
            if value not in allowed:
                raise ResidencyError(f"block {self.name}: {what} {value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Execution:
    """How copies are issued: ours, or a peer's documented behaviour."""

    copy_mode: str = "async"  # "async": copy engine/stream beside compute; "sync": blocking, on the compute stream
    prefetch_depth: int = 1  # streamed blocks whose copy may run ahead of the one computing; slots = depth + 1
    lookahead_from_compute_start: bool = False  # a copy may only start once the previous block began computing
    pinned: bool = True  # host blobs staged through pinned memory (else pageable bandwidth)
    per_tensor_copies: bool = False  # one transfer per tensor (leaf-module hooks) instead of one per block
    host_sync_per_onload_us: float = 0.0  # host-side wait per streamed block (peers that synchronize)

    def __post_init__(self) -> None:
        if self.copy_mode not in COPY_MODES:
            raise ResidencyError(f"copy_mode {self.copy_mode!r} is not one of {', '.join(COPY_MODES)}")
        if self.prefetch_depth < 0:
            raise ResidencyError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")

    @property
    def slots(self) -> int:
        """Device slots for streamed blocks: the prefetch depth plus the one being computed."""
        return self.prefetch_depth + 1


@dataclass(frozen=True)
class Budget:
    """What a plan may use: device bytes and milliseconds per latent frame (None: the fastest plan that fits)."""

    vram_bytes: int  # device bytes the plan may use (excludes the profile's reserve)
    frame_ms: float | None = None  # ms per latent frame; None = no latency target

    def __post_init__(self) -> None:
        # a policy given Budget(-1) planned "budget -1 B", and Budget(2**30, -3.0) "no plan holds -3.00 ms"
        v = self.vram_bytes
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ResidencyError(f"Budget.vram_bytes must be a whole number of bytes ≥ 1, got {v!r}",
                                 hint="e.g. Budget(6 * 2**30); residency.make_plan and attach also take sizes "
                                      "such as vram='6GiB' or '50%'")
        f = self.frame_ms
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float | np.floating)
                              or not math.isfinite(f) or f <= 0):
            raise ResidencyError(f"Budget.frame_ms must be a positive number of milliseconds or None, got {f!r}",
                                 hint="e.g. Budget(vram, 1000 / 30) for 30 latent frames a second")


@dataclass(frozen=True)
class Prediction:
    """The simulator's figures for this plan (filled by residency.simulate)."""

    frame_ms: float  # steady-state latent frame
    first_frame_ms: float  # session start (phase loads, encode) plus the first latent frame
    stall_ms: float  # per steady frame: compute waiting for copies
    copy_ms: float  # per steady frame: copy-engine busy time
    compute_ms: float  # per steady frame: compute-stream busy time
    link_bytes_per_frame: int  # host->device bytes per steady frame
    peak_bytes: dict[str, int]  # device memory by kind at the peak
    lower_bound_ms: float  # physical floor for this workload, device, budget and precisions
    quality_loss: float  # Σ sensitivity × format error

    @property
    def peak_total_bytes(self) -> int:
        """Predicted peak device bytes within the budget (the profile's reserve left out)."""
        return sum(v for k, v in self.peak_bytes.items() if k != "reserve")

    @property
    def fps(self) -> float:
        """Predicted latent frames per second (inf when frame_ms is 0)."""
        return 1000.0 / self.frame_ms if self.frame_ms > 0 else float("inf")


@dataclass(frozen=True)
class Plan:
    """Where every block of one workload lives on one device profile, and how it is copied and computed.

    A policy makes it (residency.make_plan); the Runtime executes it. Tied to the workload and the profile by
    their fingerprints (check_matches raises ResidencyError for another model); `prediction` holds the
    simulator's figures (ms, bytes), `notes` the policy's verdict and caveats.
    """

    model: str
    workload_fingerprint: str
    profile: str  # profile name
    profile_fingerprint: str
    policy: str  # "ours", "accelerate-sequential", …
    budget: Budget
    blocks: tuple[BlockPlan, ...]  # in the workload's block order
    execution: Execution = field(default_factory=Execution)
    kv_dtype: str = "bf16"
    steps: int = 4
    context_frames: int = 0
    prediction: Prediction | None = None
    notes: tuple[str, ...] = ()  # verdict, gap statement, peer caveats
    profile_backend: str = ""  # the profile's backend ("cuda", "rocm", "cpu"; "" in files written before it was kept)

    @cached_property
    def by_name(self) -> dict[str, BlockPlan]:
        """Block name -> its BlockPlan."""
        return {b.name: b for b in self.blocks}

    def placement_of(self, block: str) -> str:
        """The placement of block `block` (KeyError when the plan has no such block)."""
        return self.by_name[block].placement

    def streamed(self) -> list[BlockPlan]:
        """The streamed blocks, in plan order."""
        return [b for b in self.blocks if b.placement == "streamed"]

    def phase_actions(self, phases: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
        """(phase, blocks evicted when it ends) for phases given as (name, blocks used), in order.

        Phase-lifetime blocks are loaded when a phase that uses them starts and evicted when it ends."""
        return [(name, tuple(b for b in blocks if b in self.by_name and self.by_name[b].placement != "streamed"
                             and self.by_name[b].lifetime == "phase")) for name, blocks in phases]

    def with_prediction(self, prediction: Prediction) -> Plan:
        """A copy of the plan carrying `prediction`."""
        return replace(self, prediction=prediction)

    def summary(self) -> str:
        """A few lines for a reader (`print(rt.plan)`): the budget, the prediction, how many blocks each placement
        holds and in which formats, and the notes. The repr stays the whole dataclass; `residency plan` draws the
        per-block table."""
        unit = "latent frame" if self.context_frames else "call"  # a world model's frame; a model's or pipeline's call
        frame = f", {fmt_ms(self.budget.frame_ms)} ms per {unit}" if self.budget.frame_ms else ""
        lines = [f"plan of {self.model} on {self.profile} by {self.policy}: budget {fmt_bytes(self.budget.vram_bytes)}"
                 f"{frame}"]
        p = self.prediction
        if p is not None:
            lines.append(f"predicted {fmt_ms(p.frame_ms)} ms per {unit} (stall {fmt_ms(p.stall_ms)} ms), "
                         f"{fmt_bytes(p.peak_total_bytes)} at the peak, quality loss {p.quality_loss:.3g}")
        by_placement: dict[str, Counter] = {}
        for b in self.blocks:
            by_placement.setdefault(b.placement, Counter())[b.format] += 1
        lines.append("blocks: " + "; ".join(
            f"{sum(c.values())} {placement} ({', '.join(f'{n} {f}' for f, n in c.most_common())})"
            for placement, c in by_placement.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def check_matches(self, workload: PlannedFor, what: str = "this model", fix: str | None = None) -> None:
        """Refuse to apply the plan to a workload it was not made for, or whose blocks it does not name.

        A hand-edited plan can keep the fingerprint and still rename, drop or repeat a block; every
        lookup by name after this point relies on the plan naming each block of the workload once. `fix`: the
        hint for the caller's users (default: the CLI's)."""
        fingerprint = workload.fingerprint()
        mine, theirs = [b.name for b in self.blocks], [b.name for b in workload.blocks]
        if fingerprint != self.workload_fingerprint and mine != theirs and \
                [n.partition(".")[2] for n in mine] == [n.partition(".")[2] for n in theirs]:
            # the same blocks under another prefix: a workload named otherwise than attach names the model
            raise ResidencyError(
                f"the plan's blocks are named {mine[0].partition('.')[0]}.…, those of {what} "
                f"{theirs[0].partition('.')[0]}.…: the same model counted under another name",
                hint="make its workload with name= the model's class name (residency.attach names blocks "
                     "<class>.<module path>), e.g. workload_from_module(model, x, name=type(model).__name__)")
        if fingerprint != self.workload_fingerprint:
            name = getattr(workload, "name", None)
            if mine != theirs:  # a hand-edited plan can differ in its blocks and in its settings: say both
                why = f"; its blocks differ too: {_block_difference(mine, theirs)}"
            elif name is not None and name != self.model:
                why = f" — another model ({name!r}) whose blocks have the same names, at other sizes or settings"
            else:
                why = " — the same model counted at other shapes, dtypes or settings"
            raise ResidencyError(
                f"the plan was made for model {self.model!r} (fingerprint {self.workload_fingerprint}), "
                f"not for {what} (fingerprint {fingerprint}){why}",
                hint=fix or "make a new plan for this model with `residency plan`",
            )
        expected = [b.name for b in workload.blocks]
        named = [b.name for b in self.blocks]
        if named != expected:
            raise ResidencyError(f"the plan for {self.model!r} does not name the blocks of {what}: "
                                 f"{_block_difference(named, expected)}",
                                 hint=fix or "make a new plan with `residency plan -o` rather than editing block names")
        for i, (b, spec) in enumerate(zip(self.blocks, workload.blocks, strict=True)):
            _check_block_contents(i, b, spec, what)

    @property
    def holds_budget(self) -> bool:
        """True when the prediction fits the VRAM budget and meets the frame budget (False if none)."""
        p = self.prediction
        if p is None:
            return False
        fits = p.peak_total_bytes <= self.budget.vram_bytes
        fast = self.budget.frame_ms is None or p.frame_ms <= self.budget.frame_ms
        return fits and fast


def _check_block_contents(i: int, b: BlockPlan, spec: object, what: str) -> None:
    """A plan's modules and tensors of a block restate the workload's (`plan` writes them for the reader): an
    edit of them moves nothing, so one that disagrees is refused rather than ignored. Older plans omit them."""
    want_modules = tuple(getattr(spec, "modules", ()) or (b.name,))
    want_tensors = tuple(n for n, _ in getattr(spec, "tensors", ()))
    for key, have, want in (("modules", b.modules, want_modules), ("tensors", b.tensors, want_tensors)):
        if have and want and have != want:
            extra = [n for n in have if n not in want]
            gone = [n for n in want if n not in have]
            diff = (f"{show(extra[0])} is not one of the block's {key}" if extra else
                    f"{show(gone[0])} is missing" if gone else "they are in another order")
            raise ResidencyError(f"the plan's blocks[{i}].{key} ({b.name}) differ from those of {what}: {diff}",
                                 hint=f"a block's {key} are written by `residency plan` to show what it "
                                      "holds; editing them moves nothing: make a new plan, or change only placement "
                                      "and format")


def _block_difference(named: list[str], expected: list[str]) -> str:
    """The first way the plan's block names differ from the workload's, for an error message."""
    have, want = Counter(named), Counter(expected)
    unknown = [n for n in have if n not in want]
    missing = [n for n in want if n not in have]
    repeated = [n for n, k in have.items() if k > 1]
    for label, names in (("unknown block", unknown), ("missing block", missing), ("block named twice", repeated)):
        if names:
            shown = ", ".join(repr(n[:80]) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            return f"{label}{'s' if len(names) > 1 else ''} {shown}"
    return "the blocks are in another order than the workload's"
