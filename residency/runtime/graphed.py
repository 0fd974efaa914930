"""The `graphed` execution mode (BlockPlan.exec_mode): a block's forward captured once into a CUDA/HIP graph per
block class, binding and input signature, then replayed.

A graph replays fixed device addresses. What it reads:
- its weights where the executor bound them: a streamed block's slot, a resident block's own buffer (the key
  holds every parameter's and buffer's data_ptr, so a graph reads the slot it was captured with, and block A
  in slot 0 and block B in slot 1 are two graphs);
- its tensor arguments, copied each call into static inputs shared by the graphs of the class (the copy is
  issued on the compute stream before the replay, so it never overtakes the replay before it);
- what a non-tensor argument reaches (the world model's LayerKV: its layer's KV stores, the cache's RoPE
  tables and write-slot index, all made once: the KV ring is static). Such an argument must say, through a
  `capture_key()` method, every Python value that changes what a block computes with it (LayerKV: the window's
  fill and whether a commit is running); the key holds its identity (checked through a weak reference, so a
  new object at a dead one's id never replays its graph) and that value. An argument without one, a tensor on
  another device, a capture that fails (a host synchronisation, an op a graph cannot hold) or a class whose
  keys never stop changing runs eagerly from then on, with a note. A call under autocast with its cast cache on
  runs eagerly (that call only): a graph would read the cached cast, freed when the autocast region ends.

Copies stay outside the graphs: the executor binds the weights and makes the compute stream wait for the
slot's load before the forward runs, and queues the refill after it returns, recording its "after" event on the
compute stream. A replay is issued on the current stream, which is that compute stream (the backend took it
at start), so it counts as the compute that read the slot: a refill never overtakes the replay that read it.

Instances of a class share graphs when their parameters' shapes and dtypes and their plain attributes (ints,
strings, flags…) agree; an attribute that changes after attach, or a non-plain one that changes what forward
computes, is not seen (hazard). Other hazards: a block that changes a tensor argument in place changes its
static copy under a graph (detected for tensors outside inference mode: the class runs eagerly);
replays allocate the caller's copy of the output (one device copy per output tensor; the graph's own output
buffer is overwritten by the next replay of any graph of the class, so it is never handed out).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from residency.plan import Plan
from residency.runtime.compiled import CompiledForwards, check_exec_modes, compile_blocks, remove_forwards
from residency.workload import Workload

_CONTAINERS = (list, tuple, dict)  # what torch's pytree opens in a call's arguments
PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
# Graphs kept per class, per module of the class (at least GRAPHS_KEPT_MIN); past it the least recently replayed
# goes (a filling KV window's keys are never met again). A layer of the world model has at most (2 pass kinds)
# x (slots) keys once its window is full.
GRAPHS_KEPT_PER_MODULE, GRAPHS_KEPT_MIN = 16, 512
# Captures in a row with no replay of the class between them, per module of the class (at least CAPTURES_MIN):
# past it its keys change at every call (a shape that follows the data, a new context each call) and it runs
# eagerly. A world model's window fills with 2 keys per layer and frame, no replay between them with 1 step.
CAPTURES_IN_A_ROW_PER_MODULE, CAPTURES_IN_A_ROW_MIN = 64, 256


class GraphCapture(Protocol):
    """Warm-up and capture of one graph (CUDA: residency.runtime.backend_cuda.CudaGraphCapture; tests: a double
    that replays by calling fn). A backend that captures graphs has `graph_capture()`: a new GraphCapture (its
    own memory pool) per attach."""

    def warm_up(self, fn: Callable[..., Any], args: tuple) -> Any:
        """fn(*args) run eagerly as a capture's warm-up (CUDA: on a side stream); returns its result."""

    def capture(self, fn: Callable[..., Any], static_args: tuple) -> Callable[[], None]:
        """Capture fn(*static_args) (which writes its results into static buffers); returns the replay."""


class Uncapturable(Exception):
    """A call of a graphed class that no graph can stand for; the class runs eagerly from then on."""


def graph_capture_of(backend: Any) -> Callable[[], GraphCapture] | None:
    """The backend's graph capture factory, None for a backend that captures no graphs (the CPU's)."""
    return getattr(backend, "graph_capture", None)


def check_block_modes(plan: Plan, backend: Any, enclosing: Iterable[str] = ()) -> None:
    """check_exec_modes on the backend's device, graphed blocks allowed where the backend captures graphs."""
    check_exec_modes(plan, backend.device, enclosing, graph_capture_of(backend) is not None)


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return isinstance(value, PLAIN)


def instance_signature(module: nn.Module) -> tuple:
    """What instances of one class must share to share graphs: per submodule its path, class, plain attributes
    and its tensors' shapes and dtypes."""
    out = []
    for path, sub in module.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(sub).items() if not k.startswith("_") and _plain(v)))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in (*sub._parameters.items(), *sub._buffers.items())
                        if t is not None)
        out.append((path, type(sub), attrs, tensors))
    return tuple(out)


def _tensor_sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


@dataclass
class _Graph:
    replay: Callable[[], None]
    outs: list[torch.Tensor]  # the shared static outputs it writes, tensor leaves in order
    spec: Any  # the output's pytree spec
    consts: list[Any]  # the output's leaves, None where a tensor goes
    refs: tuple  # weak references to the non-tensor arguments it was captured with


@dataclass
class _ClassGraphs:
    """The graphs of one block class (instances of one signature) and their shared static buffers."""

    name: str
    inputs: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # input signature -> static inputs
    outputs: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # output signature -> static outputs
    graphs: dict[tuple, _Graph] = field(default_factory=dict)  # least recently replayed first
    captures_in_a_row: int = 0  # captures since the class's last replay
    modules: int = 0  # modules installed with it
    failed: bool = False


class _Module:
    """One module's tensors, read at every call: parameters (stable objects whose .data the executor rebinds)
    and buffers (looked up again: a buffer moved to the device is a new tensor)."""

    def __init__(self, module: nn.Module):
        self.params = [p for _, p in module.named_parameters(remove_duplicate=False)]
        self.buffers = [(sub, k) for sub in module.modules() for k, b in sub._buffers.items() if b is not None]

    def binding(self) -> tuple[int, ...]:
        """Where the tensors are now (a slot, the block's own buffer): data_ptr each, 0 for a buffer set to None."""
        return (*(p.data_ptr() for p in self.params),
                *(getattr(sub._buffers[k], "data_ptr", int)() for sub, k in self.buffers))

    def bound(self) -> list:
        """What each tensor is bound to now: the parameters' .data, the buffers."""
        return [*(p.data for p in self.params), *(sub._buffers[k] for sub, k in self.buffers)]

    def bind(self, bound) -> None:
        """Rebind every tensor to `bound` (as bound() returned it): a metadata swap, no copy."""
        for p, data in zip(self.params, bound[:len(self.params)], strict=True):
            p.data = data
        for (sub, k), buf in zip(self.buffers, bound[len(self.params):], strict=True):
            sub._buffers[k] = buf


class GraphedForwards:
    """The graphed forwards of one attach: `install` before the block hooks go on, `restore` after they came
    off. One GraphCapture (one memory pool) for every graph of the attach."""

    def __init__(self, capture: GraphCapture, device: torch.device, notes: list[str]):
        if device.type == "cuda" and device.index is None:  # the backend's "cuda": tensors say cuda:<index>
            device = torch.device("cuda", torch.cuda.current_device())
        self.capture, self.device, self.notes = capture, device, notes
        self._classes: dict[tuple, _ClassGraphs] = {}
        self._installed: list[tuple[nn.Module, Callable[..., Any]]] = []
        self.captures = 0  # graphs captured (telemetry for tests and benches)
        # Hazard: on torch without pytorch/pytorch#180395 a capture that raises leaves the caching allocator
        # believing a capture is still under way, and the next capture's empty_cache() asserts: after one
        # failed capture, no class captures again in this attach (all run eagerly, each with its note).
        self.capture_broken = False
        self.replays = 0

    def install(self, name: str, module: nn.Module) -> None:
        """Make `module.forward` (of block `name`) the graphed forward of its class; a module with a forward of
        its own (another library's wrapper) is left eager, with a note."""
        if "forward" in module.__dict__:
            self.notes.append(f"block {name}: {type(module).__name__} has a forward of its own (a wrapper); "
                              "left eager")
            return
        sig = instance_signature(module)
        graphs = self._classes.setdefault(sig, _ClassGraphs(type(module).__name__))
        graphs.modules += 1
        ours = functools.partial(self._call, graphs, module, _Module(module), type(module).forward)
        module.forward = ours
        self._installed.append((module, ours))

    def restore(self) -> None:
        """Put every module's forward back (the class's) and drop the graphs and their buffers.

        Raises ForwardReplacedError when a module's forward is another wrapper put on after ours."""
        remove_forwards(self._installed, "graphed")
        if self.captures and self.device.type == "cuda":
            # Detach only: the graphs' pool is freed with them, and a replay may still be running on it.
            torch.cuda.synchronize(self.device)
        self._installed, self._classes = [], {}

    # --- a call ---
    def _call(self, graphs: _ClassGraphs, module: nn.Module, tensors: _Module, eager: Callable[..., Any],
              *args: Any, **kwargs: Any) -> Any:
        # autograd: a replay would record no graph for backward
        if graphs.failed or self.capture_broken or torch.is_grad_enabled():
            return eager(module, *args, **kwargs)
        if torch.is_autocast_enabled(self.device.type) and torch.is_autocast_cache_enabled():
            # Hazard (torch's make_graphed_callables refuses it too): a graph would bake in the address of
            # autocast's cached cast of a weight, freed when the autocast region ends; eager for this call.
            return eager(module, *args, **kwargs)
        leaves, spec = _flatten(args, kwargs)
        try:
            key, arg_tensors, refs = self._key(leaves, spec, tensors)
        except Uncapturable as e:
            return self._fall_back(graphs, str(e), eager(module, *args, **kwargs))
        graph = graphs.graphs.get(key)
        if graph is not None and all(r() is not None for r in graph.refs):
            static = graphs.inputs[key[1]]
            for dst, src in zip(static, arg_tensors, strict=True):
                dst.copy_(src)  # on the compute stream, after the previous replay that read dst
            graph.replay()
            self.replays += 1
            graphs.captures_in_a_row = 0
            graphs.graphs[key] = graphs.graphs.pop(key)  # the most recently replayed last
            if graph.spec is None:  # a tensor: the graph's buffer is overwritten by the next replay, so a copy
                return graph.outs[0].clone()
            outs = iter([t.clone() for t in graph.outs])
            return pytree.tree_unflatten([next(outs) if c is None else c for c in graph.consts], graph.spec)
        return self._first_call(graphs, module, tensors, eager, key, leaves, spec, arg_tensors, refs)

    def _key(self, leaves: list, spec: Any, tensors: _Module) -> tuple[tuple, list[torch.Tensor], tuple]:
        """(binding, input signature, non-tensor values), the argument tensors, weak references to the objects."""
        sig, values, arg_tensors, refs = [], [], [], []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device:
                    raise Uncapturable(f"an argument on {leaf.device}, not {self.device}")
                sig.append(_tensor_sig(leaf))
                arg_tensors.append(leaf)
            elif _plain(leaf):
                values.append(leaf)
            elif callable(getattr(leaf, "capture_key", None)):
                values.append((type(leaf), id(leaf), leaf.capture_key()))
                refs.append(weakref.ref(leaf))
            else:
                raise Uncapturable(f"an argument of type {type(leaf).__name__} without capture_key() (what it "
                                   "makes the block compute cannot be keyed)")
        return (tensors.binding(), (spec, tuple(sig)), tuple(values)), arg_tensors, tuple(refs)

    def _first_call(self, graphs: _ClassGraphs, module: nn.Module, tensors: _Module, eager: Callable[..., Any],
                    key: tuple, leaves: list, spec: Any, arg_tensors: list[torch.Tensor], refs: tuple) -> Any:
        """The eager call as the capture's warm-up (its result is the call's), then the capture for the next."""
        args, kwargs = _unflatten(leaves, spec)
        most = max(CAPTURES_IN_A_ROW_MIN, CAPTURES_IN_A_ROW_PER_MODULE * graphs.modules)
        if graphs.captures_in_a_row >= most:
            why = f"{most} captures without a replay (its inputs change shape or context at every call)"
            return self._fall_back(graphs, why, eager(module, *args, **kwargs))
        if len(graphs.graphs) >= max(GRAPHS_KEPT_MIN, GRAPHS_KEPT_PER_MODULE * graphs.modules):
            self._prune(graphs)
        static = _buffers_like(graphs.inputs, key[1], arg_tensors)
        for dst, src in zip(static, arg_tensors, strict=True):
            dst.copy_(src)  # before the warm-up: a block that changes its argument in place is caught below
        versions = [_version(t) for t in arg_tensors]
        result = self.capture.warm_up(lambda *a: eager(module, *a, **kwargs), args)
        if versions != [_version(t) for t in arg_tensors]:
            return self._fall_back(graphs, "it changes a tensor argument in place", result)
        out_leaves, out_spec = ([result], None) if isinstance(result, torch.Tensor) else pytree.tree_flatten(result)
        out_tensors = [t for t in out_leaves if isinstance(t, torch.Tensor)]
        if any(t.device != self.device for t in out_tensors):
            return self._fall_back(graphs, f"an output not on {self.device}", result)
        outs = _buffers_like(graphs.outputs, tuple(_tensor_sig(t) for t in out_tensors), out_tensors)
        bound = tensors.bound()
        n_in = len(static)

        def body(*static_args: torch.Tensor) -> None:
            """The block on the static inputs and the weights bound at capture (static_args: inputs, then
            weights; a graph reads both at the addresses it was captured with, and binding them here makes a
            replay that reruns body do the same), its result written into the class's static outputs (outside
            the graph's pool, so the graphs of the class share them)."""
            it = iter(static_args[:n_in])
            s_args, s_kwargs = _unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
            now = tensors.bound()
            tensors.bind(static_args[n_in:])
            try:
                got = eager(module, *s_args, **s_kwargs)
            finally:
                tensors.bind(now)
            got = [got] if isinstance(got, torch.Tensor) else [t for t in pytree.tree_leaves(got)
                                                                if isinstance(t, torch.Tensor)]
            for dst, src in zip(outs, got, strict=True):
                dst.copy_(src)

        try:
            replay = self.capture.capture(body, (*static, *bound))
        except torch.OutOfMemoryError:
            raise  # the runtime's recovery re-plans for less memory
        except Exception as e:  # a host sync, an op a graph cannot hold, a capture the driver refused
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.capture_broken = True
            return self._fall_back(graphs, f"its capture failed ({type(e).__name__}: {first})", result)
        self.captures += 1
        graphs.captures_in_a_row += 1
        graphs.graphs[key] = _Graph(replay, outs, out_spec,
                                    [None if isinstance(x, torch.Tensor) else x for x in out_leaves], refs)
        return result

    def _prune(self, graphs: _ClassGraphs) -> None:
        """Forget the graphs whose non-tensor arguments are gone (a finished session's KV cache); if none is,
        the least recently replayed one. Its pool memory is shared with the others: only the graph goes."""
        dead = [k for k, g in graphs.graphs.items() if any(r() is None for r in g.refs)]
        for key in dead or [next(iter(graphs.graphs))]:
            del graphs.graphs[key]

    def _fall_back(self, graphs: _ClassGraphs, why: str, result: Any) -> Any:
        graphs.failed = True
        graphs.graphs.clear()
        self.notes.append(f"graph of {graphs.name}.forward not captured, running it eagerly: {why}")
        return result


def _buffers_like(store: dict, key: Any, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The static buffers `store` keeps under `key`, made once like `like` (shape, dtype, device; the strides of a
    dense tensor, else contiguous). Plain tensors, not inference tensors: they are written in place inside and
    outside inference mode."""
    bufs = store.get(key)
    if bufs is None:
        with torch.inference_mode(False):
            # empty_like, not empty_strided: an expanded argument (stride 0) would give a buffer whose elements
            # overlap, and copy_ into it raises ("more than one element ... refers to a single memory location").
            bufs = store[key] = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
    return bufs


def _flatten(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """(leaves, spec) of a call's arguments: without a container among them (the usual block call) the
    arguments themselves and (count, keyword names), else torch's pytree (~10 µs more a call)."""
    if any(isinstance(a, _CONTAINERS) for a in args) or any(isinstance(v, _CONTAINERS) for v in kwargs.values()):
        return pytree.tree_flatten((args, kwargs))
    return [*args, *kwargs.values()], (len(args), tuple(kwargs))


def _unflatten(leaves: list, spec: Any) -> tuple[tuple, dict]:
    if isinstance(spec, tuple):
        n, names = spec
        return tuple(leaves[:n]), dict(zip(names, leaves[n:], strict=True))
    return pytree.tree_unflatten(leaves, spec)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter; None for an inference tensor (it keeps none)."""
    return None if t.is_inference() else t._version


def graph_pool_reserve_bytes(workload: Workload, plan: Plan) -> int:
    """Device bytes the ledger holds for the graphed blocks' pools: what the plan's prediction counts
    (residency.simulate.memory.graph_pool_bytes: per graphed block class its largest block's activations plus
    the profile's graph_pool_bytes_per_class; 0 on a CPU profile), else, for a plan without a prediction, the
    activations part alone (the profile's per-class figure unknown). 0 when no block is graphed."""
    graphed = [bp for bp in plan.blocks if bp.exec_mode == "graphed"]
    if not graphed:
        return 0
    if plan.prediction is not None:
        return plan.prediction.peak_bytes.get("graph_pool", 0)
    per_class: dict[str, int] = {}
    for bp in graphed:
        block = workload.by_name[bp.name]
        act = block.activation_bytes(bp.compute_dtype, workload.batch)
        per_class[block.block_class] = max(per_class.get(block.block_class, 0), act)
    return sum(per_class.values())


class BlockForwards:
    """The compiled and the graphed forwards of one attach, restored together."""

    def __init__(self, compiled: CompiledForwards, graphed: GraphedForwards | None):
        self.compiled, self.graphed = compiled, graphed

    def restore(self) -> None:
        """Put every module's forward back as attach found it."""
        if self.graphed is not None:
            self.graphed.restore()
        self.compiled.restore()


def block_forwards(plan: Plan, modules: dict[str, tuple[nn.Module, ...]], notes: list[str],
                   backend: Any) -> BlockForwards:
    """Install the forwards of every `compiled` and `graphed` block of `plan`, beneath the block hooks (weights
    bind outside them). Cost: nothing until a block first runs; a graphed one then runs eagerly once per key as
    the capture's warm-up, and captures (CUDA: torch.cuda.graph synchronises the device once per capture)."""
    compiled = compile_blocks(plan, modules, notes)
    graphed = None
    names = [n for n in modules if plan.by_name[n].exec_mode == "graphed"]
    if names:
        factory = graph_capture_of(backend)
        if factory is None:  # check_exec_modes refused it already; kept for a direct caller
            raise ValueError(f"backend {getattr(backend, 'name', backend)!r} captures no graphs")
        graphed = GraphedForwards(factory(), backend.device, notes)
        for name in names:
            for module in modules[name]:
                graphed.install(name, module)
    return BlockForwards(compiled, graphed)

