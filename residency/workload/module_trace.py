"""One counted forward of a model: which block units run, in which order, and what each call dispatches.

Hooks on the units' modules say whose call is running; a dispatch mode charges every aten op to it:
FLOPs (torch's own formulas, split by what they multiply), aten ops, kernels and activation elements
(op_count.OpCounter, one counter per stretch of ops), and the peak of live activation elements.
Ops outside every unit (the root's own code between blocks) are charged to "glue", filed under the unit
that ran last. Runs on meta tensors or real ones alike; nothing here decides which.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry

from residency.errors import ResidencyError
from residency.workload.op_count import OpCounter

PROLOGUE = -1  # glue before the first unit call
NESTED = -2  # on the stack of running units: a unit's module called inside another unit's call (not running)
Shape = tuple[int, ...]
_COMPOSITE_MATMULS = {"linear", "bilinear", "matmul", "einsum", "tensordot", "scaled_dot_product_attention",
                      "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


@dataclass
class UnitCounts:
    """A unit's totals over one forward (all its calls), or a stretch of glue."""

    calls: int = 0
    tokens: int = 0  # rows of the first call's first tensor input, batch included (rows_of)
    token_flops: float = 0.0  # matmuls/convs with a weight operand over more rows than the batch
    fixed_flops: float = 0.0  # with a weight operand, at most one row per batch item (conditioning)
    pair_flops: float = 0.0  # between two activations (attention scores and weighted sums)
    ops: int = 0
    kernels: int = 0
    elements: int = 0
    by_size: dict[int, int] = field(default_factory=dict)
    peak_elements: int = 0  # live activation elements above the call's start, largest call
    made_elements: int = 0  # elements of the activations its ops made, as run
    made_wide: int = 0  # the same at the widened shapes (= made_elements unless a narrow instance is widened)

    def add_ops(self, c: OpCounter) -> None:
        """Add an op counter's ops, kernels and activation elements (per size class) to these counts."""
        self.ops += c.ops
        self.kernels += c.kernels
        self.elements += c.elements
        for k, n in c.elements_by_size.items():
            self.by_size[k] = self.by_size.get(k, 0) + n

    def absorb(self, other: UnitCounts) -> None:
        """Add another unit's or glue's counts (calls and tokens stay this one's)."""
        self.token_flops += other.token_flops
        self.fixed_flops += other.fixed_flops
        self.pair_flops += other.pair_flops
        self.ops += other.ops
        self.kernels += other.kernels
        self.elements += other.elements
        for k, n in other.by_size.items():
            self.by_size[k] = self.by_size.get(k, 0) + n
        self.peak_elements = max(self.peak_elements, other.peak_elements)
        self.made_elements += other.made_elements
        self.made_wide += other.made_wide


@dataclass
class Trace:
    """What one traced forward did: the unit call order, per-unit counts, glue counts, weights read."""
    order: list[int]  # unit index of every call, in call order (a call inside another unit's is part of that one)
    units: list[UnitCounts]  # per unit index
    glue: dict[int, UnitCounts]  # glue counts by the unit that ran last (PROLOGUE: before any)
    weights_read: set[str]  # weight names some op read
    # weight names some op read while no unit owning them was running (glue, or another unit's call): a tied
    # head as F.linear(x, self.emb.weight). The runtime must keep such a block bound beyond its own calls.
    read_outside: set[str] = field(default_factory=set)
    # the type of what the forward returned when it is work left for later (a generator, a coroutine): its blocks run
    # only as the caller iterates it, after the traced call; "" otherwise
    deferred: str = ""


def rows_of(t: torch.Tensor) -> int:
    """Rows a block call processes, batch included, from its first tensor input: tokens of a (B, T, C)
    sequence or (B, T) ids, pixels of a channels-first (B, C, H, W[, …]) map, 1 per item of a (B, C) vector."""
    shape = tuple(t.shape)
    if len(shape) <= 1:
        return shape[0] if shape else 1
    if len(shape) == 2:
        return shape[0] * shape[1] if not t.is_floating_point() else shape[0]
    if len(shape) == 3:
        return shape[0] * shape[1]
    return shape[0] * math.prod(shape[2:])


def attention_flops(q: Shape, k: Shape, v: Shape) -> float:
    """Scores q·kᵀ and the weighted sum of v: 2·L·S·(E + Ev) per query head, as torch counts both SDPA's math
    form and its fused kernels (grouped-query keys are broadcast to the query's heads)."""
    heads, (length, e), s, ev = math.prod(q[:-2]), q[-2:], k[-2], v[-1]
    return 2.0 * heads * length * s * (e + ev)


# Fused attention kernels without a FLOP formula in torch: the CPU's (a real forward on the CPU runs it)
_FUSED_ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu"}


def _first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def grouped_mm_flops(a: Shape, b: Shape, *_args, out_val: Shape, **_kwargs) -> float:
    """FLOPs of torch._grouped_mm (mixture-of-experts layers: transformers' Mixtral, Qwen3-MoE …, each routed row
    through its expert), which torch's flop counter has no formula for: counted as 0, a Mixtral layer came to a
    quarter of the dense Mistral's FLOPs. 2·M·N·K for 2-D × 2-D (groups split K), else 2 per output element and
    inner element — the routed rows only, which is what runs, whatever the groups' sizes (on meta, unknown).
    Called as torch's registry formulas are: operand shapes, then out_val's."""
    out, k = out_val, a[-1]
    if len(a) == 2 and len(b) == 2:
        return 2.0 * a[0] * b[-1] * k
    return 2.0 * math.prod(out) * k


_MORE_FLOPS = {"_grouped_mm": grouped_mm_flops}  # ops torch's flop_registry has no formula for, by name


class _Tracer(TorchDispatchMode):
    """The dispatch mode below the current OpCounter: charges FLOPs and live elements to the running call."""

    def __init__(self, weights: Mapping[int, str], batch: int, widen: Callable[[Shape], Shape] | None) -> None:
        super().__init__()
        self.weights = dict(weights)  # id of a weight tensor, or of a view/copy made of weights only -> its name
        self.batch = batch
        self.widen = widen or tuple
        self.read: set[str] = set()
        self.target: UnitCounts | None = None
        self.live = 0  # activation elements alive now
        self.call_marks: list[tuple[UnitCounts, int, int]] = []  # running calls: (counts, live at start, peak)
        self.owners: dict[str, frozenset[int]] = {}  # weight name -> the units holding it (tied: several)
        self.running: list[int] = []  # units whose call is running (the _Segments stack, shared)
        self.read_outside: set[str] = set()
        # ids of tensors made of weights that are safe to read anywhere: copies made in an owner's call (their own
        # memory), views a call returned (the runtime clones those: Executor.unaliased), and what is made of them.
        # A view kept otherwise (stashed on the module) still points into memory that is reused: not in here.
        self.made_inside: set[int] = set()
        self.originals: set[int] = set()  # ids of the weights themselves (a call returning one is no copy)

    def _release(self, tid: int, n: int) -> None:
        self.live -= n
        self.weights.pop(tid, None)
        self.made_inside.discard(tid)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        # A composite op that hides a matmul (linear on an inference tensor) is decomposed, as FlopCounterMode
        # does, so that its FLOPs are seen; the OpCounter above has counted it as one op. Only these: the
        # first decomposition imports torch._decomp and sympy (~4 s).
        if packet.__name__ in _COMPOSITE_MATMULS:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        named = [self.weights[id(t)] for t in inputs if id(t) in self.weights]
        self.read.update(named)
        for t in inputs:
            n = self.weights.get(id(t))
            units = self.owners.get(n) if n is not None and id(t) not in self.made_inside else None
            if units and not units.intersection(self.running):
                self.read_outside.add(n)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if packet.__name__ in _FUSED_ATTENTION and self.target is not None:
            self.target.pair_flops += attention_flops(*(self.widen(t.shape) for t in args[:3]))
        elif (formula := flop_registry.get(packet) or _MORE_FLOPS.get(packet.__name__)) and self.target is not None:
            # the formulas read shapes only: given as (widened) shapes, they count the wide model's op
            shapes = tree_map_only(torch.Tensor, lambda t: torch.Size(self.widen(t.shape)), (args, kwargs, out))
            flops = float(formula(*shapes[0], **shapes[1], out_val=shapes[2]))
            if not named:
                self.target.pair_flops += flops
            else:
                o = outs[0] if outs else None
                rows = o.numel() // o.shape[-1] if o is not None and o.dim() >= 2 and o.shape[-1] else 1
                # conditioning: one row per batch item (of a batch of 1, or fewer rows than the block takes in);
                # a block fed one row per item of a larger batch, (256, 1024) vectors, runs at 256 rows: the
                # cost model charges fixed FLOPs at one row per item of the planned batch (1), 7x slower per FLOP
                if rows <= self.batch and (rows == 1 or rows < self.target.tokens):
                    self.target.fixed_flops += flops
                else:
                    self.target.token_flops += flops
        derived = bool(inputs) and len(named) == len(inputs)  # a view, cast or copy of weights only
        for o in outs:
            if any(o is t for t in inputs):
                continue  # in place: no new tensor
            if derived:
                self.weights[id(o)] = named[0]
                if ((not func.is_view and self.owners.get(named[0], frozenset()).intersection(self.running))
                        or any(id(t) in self.made_inside for t in inputs)):
                    self.made_inside.add(id(o))
                weakref.finalize(o, self._release, id(o), 0)
            elif not func.is_view:
                n = math.prod(self.widen(o.shape))
                if self.target is not None:
                    self.target.made_elements += o.numel()
                    self.target.made_wide += n
                self.live += n
                weakref.finalize(o, self._release, id(o), n)
        for i, (counts, start, peak) in enumerate(self.call_marks):
            if self.live > peak:
                self.call_marks[i] = (counts, start, self.live)
        return out


class _FusedAttention(TorchFunctionMode):
    """SDPA on meta tensors as the one fused kernel a GPU (flash) or the CPU runs: an allocation of the output,
    charged the attention FLOPs. The meta device can only run SDPA's math form, which holds the (L × S)
    scores of every head — at Flux's 4352 tokens 0.9 GB that no fused kernel allocates — and dispatches
    some 20 ops for one kernel."""

    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
        q, k, v = named["query"], named["key"], named["value"]
        if not q.is_meta:
            return func(*args, **kwargs)
        if self.tracer.target is not None:
            self.tracer.target.pair_flops += attention_flops(q.shape, k.shape, v.shape)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))


class _Segments:
    """Exactly one OpCounter open at a time, for whoever is running: a unit call or a stretch of glue."""

    def __init__(self, tracer: _Tracer, units: list[UnitCounts], glue: dict[int, UnitCounts],
                 modules: list[list[nn.Module]] | None = None) -> None:
        self.tracer, self.units, self.glue = tracer, units, glue
        self.modules = modules or [[] for _ in units]  # each unit's modules, submodules included
        self.stack: list[int] = []  # units whose call is running, innermost last
        self.order: list[int] = []
        self.counter: OpCounter | None = None
        self.target: UnitCounts | None = None

    def switch(self, target: UnitCounts) -> None:
        self.close()
        self.target = self.tracer.target = target
        self.counter = OpCounter()
        self.counter.__enter__()

    def close(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.target.add_ops(self.counter)
            self.counter = None

    def enter(self, unit: int, args: tuple, kwargs: Mapping[str, Any]) -> None:
        if self.stack:
            # Inside a running call: a module of that unit calling another of its modules (or itself), or another
            # unit's module called from inside it (`self.shared(x)` in a block's forward, a module passed in as an
            # argument): part of the running call, charged to it. A nested unit is not running: its weights read
            # here are read outside its own calls, so the runtime keeps its block bound for the session, and its
            # hook does nothing inside another block's call (residency.runtime.block_calls). Counted as a call of
            # its own, it was scheduled as one: the runtime then refilled the outer block's slot under it.
            self.stack.append(unit if unit in self.stack else NESTED)
            return
        counts = self.units[unit]
        counts.calls += 1
        if counts.calls == 1:
            first = _first_tensor(args, kwargs)
            counts.tokens = rows_of(first) if first is not None else 1
        self.order.append(unit)
        self.stack.append(unit)
        self.tracer.call_marks.append((counts, self.tracer.live, self.tracer.live))
        self.switch(counts)

    def leave(self, unit: int, out: Any = None) -> None:
        if not self.stack:  # the call never entered: a hook before ours refused it (torch still calls always_call)
            return
        # views of its weights a call returns are the runtime's to copy out of block memory (Executor.unaliased):
        # read afterwards, they are not reads outside the block. A weight itself returned is not marked: the
        # same object read later by attribute could not be told apart (pinned rather than read wrong)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) in self.tracer.weights and id(t) not in self.tracer.originals:
                self.tracer.made_inside.add(id(t))
        self.stack.pop()
        if self.stack:  # a member's or a nested unit's call ended inside the running call
            return
        self._stashed_views(unit)
        counts, start, peak = self.tracer.call_marks.pop()
        counts.peak_elements = max(counts.peak_elements, peak - start)
        self.switch(self.glue.setdefault(unit, UnitCounts()))

    def _stashed_views(self, unit: int) -> None:
        """A view of weights the call left on one of its modules (`self._wt = self.lin.weight.t()`, made once and
        used by later calls) points into the memory its block was bound to for this call, which a streamed block's
        next call does not get back: the weights it views are marked read outside their calls (pinned). A copy
        made in the call has its own memory and is left alone. Cost: one walk over the unit's attributes a call."""
        tracer = self.tracer
        for module in self.modules[unit]:
            for value in vars(module).values():
                if (isinstance(value, torch.Tensor) and id(value) in tracer.weights
                        and id(value) not in tracer.made_inside and id(value) not in tracer.originals):
                    tracer.read_outside.add(tracer.weights[id(value)])


def trace_forward(model: nn.Module, unit_modules: list[tuple[str, ...]], run: Callable[[], Any],
                  weights: Iterable[tuple[str, torch.Tensor]], batch: int,
                  widen: Callable[[Shape], Shape] | None = None) -> Trace:
    """Run `run()` (a forward of `model`) once with every unit's modules hooked and every op counted.

    `weights` are (name, tensor) of what the forward reads as parameters and buffers (the tensors
    themselves: a functional call's replacements, or the model's own); `batch` is the example's batch
    size, the row count at or below which a weight's matmul counts as per call; `widen` maps a tensor's shape
    to the wide model's (a narrow instance counted for it): FLOPs and live elements are counted at it.
    """
    units = [UnitCounts() for _ in unit_modules]
    glue: dict[int, UnitCounts] = {PROLOGUE: UnitCounts()}
    weights = list(weights)
    tracer = _Tracer({id(t): n for n, t in weights}, batch, widen)
    tracer.owners = _owners(model, unit_modules, [n for n, _ in weights])
    tracer.originals = {id(t) for _, t in weights}
    seg = _Segments(tracer, units, glue,
                    [list({id(m): m for p in paths for m in model.get_submodule(p).modules()}.values())
                     for paths in unit_modules])
    tracer.running = seg.stack
    handles = []
    own_thread = threading.get_ident()

    def enter(i: int, args: tuple, kwargs: Mapping[str, Any]) -> None:
        if threading.get_ident() != own_thread:
            # the runtime follows one block call at a time, on the thread that called the model
            raise ResidencyError(f"{type(model).__name__}: its forward calls {unit_modules[i][0]} on another thread "
                                 "(a thread pool inside the forward)",
                                 hint="call the blocks on the forward's own thread; residency places one block "
                                      "call at a time")
        seg.enter(i, args, kwargs)

    for i, paths in enumerate(unit_modules):
        for path in paths:
            m = model.get_submodule(path)
            # first of the pre-hooks: one of the model's (prune's weight = weight_orig · mask) runs inside the
            # call, as the runtime binds the block's weights before any of them
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: enter(i, args, kwargs), with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(lambda mod, args, out, i=i: seg.leave(i, out), always_call=True))
    # No autograd: it would add alias/detach ops to every count. Not inference mode either: composite ops
    # (linear, attention) would reach the counters whole, unlike the op mix the CPU profile measures.
    try:
        with torch.inference_mode(False), torch.no_grad(), _FusedAttention(tracer), tracer:
            seg.switch(glue[PROLOGUE])
            try:
                out = run()
            finally:
                seg.close()
    finally:
        for h in handles:
            h.remove()
    buffers = {n for n, _ in model.named_buffers()}  # a buffer keeps its own storage between calls: safe to hand out
    for t in tree_flatten(out)[0]:
        # a weight the forward hands back whole (a codebook for the loss, `return x, self.layers[0].weight`) is read
        # by the caller after every block call: no op read it here, so without this its block streamed and the
        # caller got whatever weights its slot held next (another block's)
        if (isinstance(t, torch.Tensor) and id(t) in tracer.weights and id(t) not in tracer.made_inside
                and tracer.weights[id(t)] not in buffers):
            tracer.read_outside.add(tracer.weights[id(t)])
    lazy = inspect.isgenerator(out) or inspect.iscoroutine(out) or inspect.isasyncgen(out)
    if inspect.iscoroutine(out):
        out.close()  # never awaited: closed, not warned about
    return Trace(seg.order, units, glue, tracer.read, tracer.read_outside, type(out).__name__ if lazy else "")


def _owners(model: nn.Module, unit_modules: list[tuple[str, ...]], names: list[str]) -> dict[str, frozenset[int]]:
    """Each weight name -> the units whose modules hold that tensor under any of its names (a tied weight is
    held by the embedding's unit and the head's)."""
    aliases: dict[int, list[str]] = {}
    for n, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(n)
    by_name = {n: group for group in aliases.values() for n in group}
    # module path -> the units holding it; a weight is looked up by each of its name's dotted prefixes (a scan of
    # every unit per weight took 200 s on a 4096-layer model)
    units_at: dict[str, list[int]] = {}
    for i, paths in enumerate(unit_modules):
        for p in paths:
            units_at.setdefault(p, []).append(i)
    whole = units_at.get("", [])  # a unit of the whole model holds every weight
    out = {}
    for name in names:
        held = set(whole)
        for alias in by_name.get(name, [name]):
            dot = alias.find(".")
            while dot >= 0:
                held.update(units_at.get(alias[:dot], ()))
                dot = alias.find(".", dot + 1)
        if held:
            out[name] = frozenset(held)
    return out
