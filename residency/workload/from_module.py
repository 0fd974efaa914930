"""The Workload of any torch model, from its module tree and one counted forward: no hand-written tables.

Blocks are the model's repeated blocks, the other parameter-owning modules beside them (adjacent siblings
grouped) and a block for the loose tensors; call order, calls per forward, FLOPs, ops and elements come
from one forward on the meta device — or, where meta fails (a data-dependent `.item()`), one counted
forward of the model itself, or of a narrow instance of it for a model that has no weights.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from residency.errors import ResidencyError, user_stacklevel
from residency.formats.dtypes import COMPUTE_DTYPE_BYTES, TORCH_DTYPES
from residency.workload.example_inputs import Example, split_example
from residency.workload.fallback_trace import fallback_trace
from residency.workload.integer_inputs import IntegerInputError, float_layers_refuse_integers
from residency.workload.left_as_found import generators_in, left_as_found
from residency.workload.module_blocks import (
    ModuleBlocks,
    find_blocks,
    owns_parameters,
    split_units,
    unit_tensors,
)
from residency.workload.module_schedule import (
    LOOSE,
    Draft,
    block_spec,
    charge_glue,
    draft_blocks,
    draft_tensors,
    passes_of,
)
from residency.workload.module_trace import Trace, UnitCounts, trace_forward
from residency.workload.quiet_hooks import user_hooks_quiet
from residency.workload.spec import BlockSpec, PassSpec, PhaseSpec, Workload

COUNTED_ON = ("meta", "real", "narrow")  # which forward the counts come from
DTYPE_NAMES = {t: n for n, t in TORCH_DTYPES.items()}  # the floating dtypes residency stores: name by torch dtype


class ModuleWorkloadWarning(UserWarning):
    """The model does something a Workload states only approximately: a parameter no block owns (left out
    of the plan), or a block called more than once per forward (its calls share one mean cost)."""


@dataclass(frozen=True)
class ModuleWorkload:
    """A workload traced from an nn.Module, with how it was counted and what was left out."""
    workload: Workload
    counted_on: str  # "meta" | "real" | "narrow" (COUNTED_ON)
    meta_error: str  # why the meta forward failed; "" when it ran
    repeated_from: str  # "_repeated_blocks" | "_no_split_modules" | "ModuleList" | "none"
    calls_per_forward: dict[str, int]  # block name -> calls in one forward (the loose block: 1)
    unowned: tuple[str, ...]  # parameter paths of modules the forward never ran nor read: not in any block
    build_s: float  # wall time of building it [s]


def parameter_bytes_by_dtype(modules: Iterable[nn.Module]) -> dict[torch.dtype, int]:
    """Bytes of the modules' floating-point parameters by dtype, a parameter shared (tied) counted once."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        seen.update((id(p), p) for p in m.parameters() if p.is_floating_point())
    out: dict[torch.dtype, int] = {}
    for p in seen.values():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out


def main_dtype(modules: Iterable[nn.Module]) -> str | None:
    """The dtype of most of the modules' floating parameter bytes among those residency stores ("fp32", "fp16",
    "bf16"); None when they hold none. Tensors in another floating dtype are kept in theirs (BlockSpec.own_dtypes)."""
    return dominant_dtype(parameter_bytes_by_dtype(modules))


def dominant_dtype(bytes_by_dtype: dict[torch.dtype, int]) -> str | None:
    """Of parameter_bytes_by_dtype's result, the stored dtype ("fp32", "fp16", "bf16") holding the most bytes (ties:
    the first by name); None when none of them is there."""
    by_dtype = {DTYPE_NAMES[d]: n for d, n in bytes_by_dtype.items() if d in DTYPE_NAMES}
    return max(sorted(by_dtype), key=by_dtype.__getitem__) if by_dtype else None


def workload_from_module(model: nn.Module, example_inputs: Example, *, name: str, component: str | None = None,
                         compute_dtype: str | None = None, **options: Any) -> Workload:
    """The Workload of `model` run on `example_inputs` (see module_workload for the options).

    example_inputs: one call's inputs (a tensor, a tuple, or a dict of keyword inputs) at the shapes to plan
    for. name: the workload's name (plans and reports show it). component: the prefix of its block names
    (default: `name`). compute_dtype: "bf16", "fp16" or "fp32", what byte and FLOP
    figures assume; None: the dtype of most of the model's parameter bytes (bf16 for a model with none of those),
    what residency.attach plans it in. Raises ResidencyError for an unknown compute dtype or a model whose blocks
    or forward cannot be found or counted."""
    if not isinstance(model, nn.Module):
        raise ResidencyError(f"workload_from_module counts a torch nn.Module, not a {type(model).__name__}",
                             hint="pass the model itself")
    for what, value in (("name", name), ("component", component)):
        if value is not None and (not isinstance(value, str) or not value.strip()):  # a plan of it is unreadable
            raise ResidencyError(f"{what}={value!r:.40}: a non-empty string", hint="e.g. name=type(model).__name__")
    if compute_dtype is None:
        compute_dtype = main_dtype([model]) or "bf16"
    return module_workload(model, example_inputs, name=name, component=component, compute_dtype=compute_dtype,
                           **options).workload


def module_workload(model: nn.Module, example_inputs: Example, *, name: str, component: str | None = None,
                    compute_dtype: str = "bf16", steps: int = 1, phase: str = "denoise", per: str = "latent_frame",
                    group_siblings: bool = True,
                    narrow: Callable[[], tuple[nn.Module, Example]] | None = None,
                    weights_dtype: str | None = None) -> ModuleWorkload:
    """The Workload of one forward of `model` at the example's shape, and how it was counted.

    The forward is one pass of phase `phase` (`per` session or latent frame), run `steps` times per phase
    run. The meta device is tried first (nothing allocated); if it fails, a model with weights runs the
    example itself (meta example tensors become zeros), and a model without (built on meta) needs `narrow`:
    a factory of the same module tree with fewer channels and its example, whose counts are scaled up.

    weights_dtype: the model's main weight dtype (default: main_dtype(model), that of most parameter bytes).
    Tensors the model holds in another of fp32, fp16 and bf16 (a bf16 model's fp32 norms) keep their own dtype:
    recorded in BlockSpec.own_dtypes, stored and computed in it under any plan; the meta forward runs them in
    it too (and inputs in it as they are). Tensors in the main dtype are counted at the plan's formats and
    `compute_dtype`, as every tensor of a one-dtype model is.
    """
    start = time.perf_counter()
    if compute_dtype not in COMPUTE_DTYPE_BYTES:
        raise ResidencyError(f"compute_dtype {compute_dtype!r}", hint=", ".join(COMPUTE_DTYPE_BYTES))
    if weights_dtype is not None and weights_dtype not in TORCH_DTYPES:
        raise ResidencyError(f"weights_dtype {weights_dtype!r}", hint=", ".join(TORCH_DTYPES))
    main = TORCH_DTYPES.get(weights_dtype or main_dtype([model]) or "")
    blocks = find_blocks(model)
    args, kwargs = split_example(example_inputs)
    batch = _batch(args, kwargs)
    keep = _kept(model, main)
    trace_dtypes = (TORCH_DTYPES[compute_dtype], main if keep else None)
    trace, counted_on, meta_error = _count(model, blocks, args, kwargs, trace_dtypes, batch, narrow, name)
    for _ in range(MAX_SPLITS):  # layers whose parts the parent calls: cut into those parts and count again
        parents = _called_through_parts(model, blocks, trace) if counted_on != "narrow" else set()
        if not parents:
            break
        blocks = split_units(model, blocks, parents)
        trace, counted_on, meta_error = _count(model, blocks, args, kwargs, trace_dtypes, batch, narrow, name)
    specs, passes, calls, unowned = _schedule(model, blocks, trace, name, component or name, group_siblings,
                                              main if keep else None, compute_dtype)
    # a block of modules that share weights (a tied embedding and lm_head) is called once per module: expected
    tied = {s.name: _tied_modules(model, s.modules) for s in specs if calls.get(s.name, 0) > 1}
    _warn(name, unowned, {n: c for n, c in calls.items() if c > max(1, tied.get(n, 1))})
    extra = {"counted_on": counted_on, "repeated_from": blocks.repeated_from, "compute_dtype": compute_dtype,
             "example": _shapes(args, kwargs), "module_class": type(model).__name__}
    own = [d for b in specs for _, d in b.own_dtypes if main is None or d != DTYPE_NAMES[main]]  # not buffers
    if main is not None:  # what the weights are held in: a format that holds it exactly loses nothing
        extra["weights_dtype"] = DTYPE_NAMES[main]
    if own:
        extra["own_dtype_tensors"] = {d: own.count(d) for d in sorted(set(own))}
    if meta_error:
        extra["meta_error"] = meta_error
    if unowned:
        extra["unowned"] = list(unowned)
    if any(c > 1 for c in calls.values()):
        extra["calls_per_forward"] = {n: c for n, c in calls.items() if c > 1}
    purpose = f"{type(model).__name__} forward"
    workload = Workload(
        name=name, blocks=specs,
        phases=(PhaseSpec(phase, per, tuple(PassSpec(p, per_step=True, purpose=purpose) for p in passes)),),
        steps=1, context_frames=0,
        source=f"{type(model).__name__}, one forward counted on {counted_on} (residency.workload.from_module)",
        extra=extra).with_params(steps=steps)
    return ModuleWorkload(workload, counted_on, meta_error, blocks.repeated_from, calls, unowned,
                          time.perf_counter() - start)


# Rounds of cutting never-called units into their parts: a ModuleList of layers whose parts the parent calls is one
# round, a layer of sub-layers called by their parts two.
MAX_SPLITS = 3


def _count(model: nn.Module, blocks: ModuleBlocks, args: tuple, kwargs: dict[str, Any],
           dtypes: tuple[torch.dtype, torch.dtype | None], batch: int,
           narrow: Callable[[], tuple[nn.Module, Example]] | None, name: str) -> tuple[Trace, str, str]:
    """One counted forward over `blocks`' units: on the meta device, else as fallback_trace runs it. Returns the
    trace, where it was counted ("meta", "real", "narrow") and why the meta run failed ("" when it did not)."""
    units = [u.modules for u in blocks.units]
    # a model held in the compute dtype runs its example's floats in their own dtype, as the real call does: a
    # float16 example into a float32 Linear is then said here (a PlanWarning), not at the user's first call (its own
    # cast, x.to(w.dtype), makes a tensor of the weight's dtype as for real)
    as_given = dtypes[1] is None and all(t.dtype == dtypes[0] for t in chain(model.parameters(), model.buffers())
                                         if t.is_floating_point())
    # the user's feature hooks record the user's calls, not this count; whatever the forward caches, counts or
    # draws is put back (left_as_found)
    with user_hooks_quiet(model), left_as_found([model], generators_in((args, kwargs))):
        try:
            with float_layers_refuse_integers(model, name, floats=as_given):  # refusals the model makes, meta not
                return _meta_trace(model, units, args, kwargs, dtypes[0], batch, dtypes[1], as_given), "meta", ""
        except IntegerInputError:  # not a meta failure: the real run would refuse it too
            raise
        except Exception as e:  # any failure of the meta run (data-dependent op, CPU tensor kept as attribute)
            meta_error = error_line(e)
            try:
                trace, counted_on = fallback_trace(model, blocks, args, kwargs, batch, narrow, name, meta_error)
            except ResidencyError:
                raise
            except Exception as real:  # the model's own error on the example: most often the example itself
                raise ResidencyError(
                    f"{name} did not run on the example inputs ({error_line(real)})",
                    hint="example_inputs= is what the model is called with: one tensor, a tuple of positional "
                         "arguments (a list argument as ([t1, t2],)) or a dict of keyword arguments, at the "
                         "shapes the model takes") from real
            return trace, counted_on, meta_error


def error_line(e: BaseException) -> str:
    """An exception in one line: its type and first line, then where it was raised and that line's code (a bare
    assert said only "AssertionError at embeddings.py:921"; its code names the config field it checks:
    "assert sum(self.axes_dim) == dim")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if first.endswith(":") and len(lines) > 1:  # "Class validation error for validator 'x':" then the reason
        first = f"{first} {lines[1]}"
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    said = f": {first[:200]}" if first else ""
    if where is not None:
        code = (where.line or "").strip()
        said += f" at {Path(where.filename).name}:{where.lineno}" + (f": `{code[:120]}`" if code else "")
    return f"{type(e).__name__}{said}"[:360]


def _called_through_parts(model: nn.Module, blocks: ModuleBlocks, trace: Trace) -> set[int]:
    """Indices of units of one module the forward never called whose parts it did call (their weights were read
    inside units or not): `x = layer.mlp(layer.norm(x))`, a ModuleList used as a container. Cut into their parts,
    they stream as blocks; left whole, every such layer was kept resident in the loose block."""
    canonical = {id(t): n for n, t in chain(model.named_parameters(), model.named_buffers())}
    out = set()
    for i, u in enumerate(blocks.units):
        if trace.units[i].calls or len(u.modules) != 1:
            continue
        sub = model.get_submodule(u.modules[0])
        if not any(owns_parameters(c) for c in sub.children()):
            continue
        if any(canonical.get(id(t)) in trace.weights_read for _, t in unit_tensors(model, u.modules)):
            out.add(i)
    return out


def _kept(model: nn.Module, main: torch.dtype | None) -> bool:
    """True when the model holds a parameter or floating buffer in a stored dtype other than `main`."""
    return main is not None and any(t.dtype != main and t.dtype in DTYPE_NAMES
                                    for t in chain(model.parameters(), model.buffers()))


def _schedule(model: nn.Module, blocks: ModuleBlocks, trace: Trace, name: str, component: str,
              group_siblings: bool, main: torch.dtype | None = None, compute_dtype: str = "bf16",
              ) -> tuple[tuple[BlockSpec, ...], tuple[tuple[str, ...], ...], dict[str, int], tuple[str, ...]]:
    """Block specs (the loose block first), the passes, calls per forward by block, the unowned parameters.
    `main`: the model's main weight dtype when it holds tensors in another (they keep theirs); else None.
    Floating buffers are never quantized: see _with_own_dtypes."""
    elements = [sum(p.numel() for m in u.modules for p in model.get_submodule(m).parameters()) for u in blocks.units]
    drafts, sequence, of_unit = draft_blocks(blocks, trace, group_siblings, elements)
    if not drafts:
        if not any(True for _ in model.children()):
            raise ResidencyError(f"{name}: a single layer ({type(model).__name__}) is one block with nothing to "
                                 "stream around it", hint="attach the model it belongs to (its blocks are its "
                                 "layers); a lone layer runs as it is")
        held = [u.modules[0] for u in blocks.units
                if isinstance(model.get_submodule(u.modules[0]), (nn.ParameterList, nn.ParameterDict))]
        if held:
            raise ResidencyError(f"{name}: the forward called none of the model's blocks; its weights sit in "
                                 f"{held[0]} ({type(model.get_submodule(held[0])).__name__}), read directly",
                                 hint="residency places a model by the calls of its layers: hold each layer's "
                                      "weights in a module the forward calls (nn.Linear, or a small module of "
                                      "your own) instead of F.linear(x, self.weights[i])")
        if trace.deferred:
            raise ResidencyError(f"{name}: the forward returned a {trace.deferred}, and called none of the model's "
                                 "blocks while it ran: they run later, as the caller consumes it, and residency places "
                                 "a model by the calls of its layers during the forward",
                                 hint="attach a module whose forward computes its result before returning it (e.g. "
                                      "one that returns list(...) of the generator)")
        raise ResidencyError(f"{name}: the forward called none of the model's blocks",
                             hint="residency places a model by the calls of its layers: call them as layer(x); a "
                                  "forward that runs layer.forward(x), or reads their weights itself "
                                  "(F.linear(x, layer.weight, layer.bias)), skips the call residency sees. Or pass "
                                  "the module whose forward runs the model")
    loose_paths, unowned = _loose_and_unowned(model, blocks, trace)
    loose = Draft(LOOSE, [], tuple(dict.fromkeys(p.rpartition(".")[0] for p in loose_paths)),
                  UnitCounts(calls=1, tokens=drafts[0].counts.tokens), calls=1) if loose_paths else None
    charge_glue(drafts, of_unit, trace, loose)
    every = ([loose] if loose else []) + drafts
    names = [f"{component}.{d.label}" for d in every]
    if len(set(names)) != len(names):
        raise ResidencyError(f"{name}: a module is named {LOOSE!r}, the name of the loose-tensor block")
    shapes = draft_tensors(model, every, blocks, loose_paths)
    specs = tuple(block_spec(n, component, d, s, d.counts.tokens)
                  for n, d, s in zip(names, every, shapes, strict=True))
    by_path = dict(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))
    specs = _with_own_dtypes(model, specs, shapes, main, compute_dtype, by_path)
    if trace.read_outside:  # a tied tensor is read by any of its names: matched by identity
        read = {id(t) for n, t in by_path.items() if n in trace.read_outside}
        specs = tuple(replace(s, read_outside_calls=True) if any(id(by_path[p]) in read for p, _ in paths) else s
                      for s, paths in zip(specs, shapes, strict=True))
    passes = passes_of(sequence, names[1:] if loose else names, names[0] if loose else None)
    return specs, passes, {n: d.calls for n, d in zip(names, every, strict=True)}, unowned


def _with_own_dtypes(model: nn.Module, specs: tuple[BlockSpec, ...], shapes: list[list[tuple[str, tuple[int, ...]]]],
                     main: torch.dtype | None, compute_dtype: str,
                     every: Mapping[str, torch.Tensor]) -> tuple[BlockSpec, ...]:
    """The specs with their tensors that keep a dtype recorded in own_dtypes: a tensor held in a stored dtype
    other than `main` (None: no tensor is), and every floating buffer. A buffer is a state (running statistics,
    an EMA, a step count) or a table (positions, rotary frequencies), not a weight: quantized, or stored in BF16
    where the plan's format falls back, it would be rounded on each write-back (a counter stuck at 256, an EMA
    that stops moving) or lose the precision its model keeps it in. It is stored in the dtype it computes in:
    its own when the model keeps it apart from `main`, else `compute_dtype`. `every`: the model's tensors by
    path, parameters and buffers."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for spec, paths in zip(specs, shapes, strict=True):
        own = []
        for (n, _), (path, _) in zip(spec.tensors, paths, strict=True):
            t = every[path]
            if main is not None and t.dtype != main and t.dtype in DTYPE_NAMES:
                own.append((n, DTYPE_NAMES[t.dtype]))
            elif path not in params:
                own.append((n, compute_dtype))
        out.append(replace(spec, own_dtypes=tuple(own)) if own else spec)
    return tuple(out)


def _batch(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """The example's batch: the leading dimension of its first tensor (1 for a scalar)."""
    first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _shapes(args: tuple, kwargs: Mapping[str, Any]) -> dict[str, list[int]]:
    out = {f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    out.update({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return out


def _tied_modules(model: nn.Module, paths: tuple[str, ...]) -> int:
    """How many of a block's modules share a weight with another of them (2 for a tied embedding and head;
    0 for siblings grouped into one block, which share none)."""
    owned = []
    for path in paths:
        try:
            owned.append({id(p) for p in model.get_submodule(path).parameters()})
        except AttributeError:  # the loose block names parents, not modules
            owned.append(set())
    return sum(1 for i, ids in enumerate(owned) if any(ids & other for j, other in enumerate(owned) if j != i))


def _meta_trace(model: nn.Module, units: list[tuple[str, ...]], args: tuple, kwargs: dict[str, Any],
                dtype: torch.dtype, batch: int, main: torch.dtype | None = None, inputs_as_given: bool = False) -> Trace:
    """The forward with every parameter, buffer and input replaced by a meta tensor (floating ones in the
    compute dtype) for the call only: the model itself is left as it is, weights or not. `main`: a model's
    main dtype when it keeps tensors in others; a tensor (or input) in another stored dtype stays in it, as
    the model runs it. inputs_as_given: every input keeps its own dtype (a model held in the compute dtype)."""
    def meta(t: Any, as_given: bool = False) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        own = as_given or (main is not None and t.dtype != main and t.dtype in DTYPE_NAMES)
        return torch.empty(t.shape, dtype=dtype if t.is_floating_point() and not own else t.dtype, device="meta")

    state = {n: meta(t) for n, t in chain(model.named_parameters(), model.named_buffers())}
    margs, mkwargs = tree_map(lambda t: meta(t, inputs_as_given), (args, kwargs))
    # functional_call swaps the tensors in and back out; a module registered at two places (one layer
    # listed twice in a ModuleList) came back with meta weights, the user's model wrecked. Whatever it
    # leaves, every module's own tensors are put back as they were.
    held = [(m, store, dict(getattr(m, store))) for m in model.modules() for store in ("_parameters", "_buffers")]
    try:
        return trace_forward(model, units, lambda: functional_call(model, state, margs, mkwargs, tie_weights=True),
                             state.items(), batch)
    finally:
        for module, store, tensors in held:
            current = getattr(module, store)
            for name, t in tensors.items():
                if current.get(name) is not t:
                    current[name] = t


def _loose_and_unowned(model: nn.Module, blocks: ModuleBlocks, trace: Trace) -> tuple[list[str], tuple[str, ...]]:
    """Loose tensor paths, plus the tensors of units the forward never called but read (their position in
    the forward is unknown, so they stay resident); the parameters of units neither called nor read."""
    canonical = {id(t): n for n, t in chain(model.named_parameters(), model.named_buffers())}
    loose = list(blocks.loose)
    unowned: list[str] = []
    for i, u in enumerate(blocks.units):
        if trace.units[i].calls:
            continue
        tensors = unit_tensors(model, u.modules)
        if any(canonical.get(id(t)) in trace.weights_read for _, t in tensors):
            loose.extend(p for p, _ in tensors)
        else:
            unowned.extend(p for p, t in tensors if isinstance(t, nn.Parameter))
    return loose, tuple(unowned)


def _warn(name: str, unowned: tuple[str, ...], repeated_calls: dict[str, int]) -> None:
    if unowned:
        shown = ", ".join(unowned[:5]) + (f" and {len(unowned) - 5} more" if len(unowned) > 5 else "")
        warnings.warn(f"{name}: {len(unowned)} parameters belong to modules the forward never ran nor read "
                      f"({shown}); no block owns them and the plan leaves them out", ModuleWorkloadWarning,
                      stacklevel=user_stacklevel())
    if repeated_calls:
        shown = ", ".join(f"{b} ×{c}" for b, c in list(repeated_calls.items())[:5])
        warnings.warn(f"{name}: blocks called more than once per forward ({shown}); each call is charged the "
                      "mean of their costs, and the schedule starts a new pass at each repeat",
                      ModuleWorkloadWarning, stacklevel=user_stacklevel())
