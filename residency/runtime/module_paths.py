"""Where each workload block lives in a model: its module(s) by path, and its tensors.

A block's paths are the `modules` its BlockSpec records, else its name (`model.get_submodule(path)`); a
model's `blocks()` method, where its class defines one, overrides both.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from residency.errors import PlanWarning, ResidencyError
from residency.formats.dtypes import TORCH_DTYPES
from residency.runtime.host_store import block_tensor
from residency.workload import BlockSpec, Workload


def module_path(root: nn.Module | None, module: nn.Module) -> str:
    """`module`'s path in the attached model `root` ("UNet2DModel.down_blocks.0"; the model's name for itself), for
    messages: a walk of the model's modules, so only on the way to an error."""
    from residency.runtime.structure_watch import model_label

    if root is not None:
        for path, m in root.named_modules(remove_duplicate=False):
            if m is module:
                return f"{model_label(root)}.{path}" if path else model_label(root)
    return f"a {type(module).__name__} outside the attached model"


def block_paths(spec: BlockSpec) -> tuple[str, ...]:
    """The module paths a block owns: BlockSpec.modules where the workload records them, else its name."""
    return spec.modules or (spec.name,)


def common_module(paths: tuple[str, ...]) -> str:
    """The path a block's tensor names are relative to: its module, or its modules' deepest common parent
    ("" for the model itself), as residency.workload.from_module names them."""
    if len(paths) == 1:
        return paths[0]
    common = []
    for level in zip(*(p.split(".") for p in paths), strict=False):  # up to the shortest path
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def block_modules(model: nn.Module, workload: Workload) -> tuple[dict[str, tuple[nn.Module, ...]], tuple[str, ...]]:
    """Every block's modules in workload order, and the blocks that enclose others.

    A block enclosing others owns the model itself or a module holding other blocks (the loose tensors of
    residency.workload.from_module: the root's own parameters, rope buffers): its tensors are read all
    through the model's call, so it is not hooked. The others are disjoint sub-trees: the executor follows
    one block call at a time."""
    listed = getattr(type(model), "blocks", None)
    if inspect.isfunction(listed):  # a method; a ModuleList named `blocks` is a path like any other
        names = [n for n, _, _ in model.blocks()]
        if names != [b.name for b in workload.blocks]:
            raise ResidencyError(f"the model's blocks() do not match workload {workload.name!r}",
                                 hint="build the workload from this model's config")
        found = {n: (m,) for n, m, _ in model.blocks()}
    else:
        found = {b.name: tuple(_submodule(model, b.name, path) for path in block_paths(b)) for b in workload.blocks}
    enclosing = _enclosing(model, found)
    _check_disjoint({n: mods for n, mods in found.items() if n not in enclosing})
    return found, enclosing


def block_tensors(model: nn.Module, workload: Workload,
                  modules: dict[str, tuple[nn.Module, ...]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each block's parameters and persistent buffers in BlockSpec.tensors order. Tensor names are relative
    to the block's module, or for a block of several modules to their common parent (common_module)."""
    out = {}
    for b in workload.blocks:
        mods = modules[b.name]
        if len(mods) == 1:
            out[b.name] = tuple(block_tensor(mods[0], n) for n, _ in b.tensors)
            continue
        paths = block_paths(b)
        base = common_module(paths)
        full = [f"{base}.{n}" if base else n for n, _ in b.tensors]
        for n, path in zip((n for n, _ in b.tensors), full, strict=True):
            if not any(p == "" or path.startswith(p + ".") for p in paths):
                raise ResidencyError(f"block {b.name}: tensor {n!r} ({path}) lies under none of its modules "
                                     f"({', '.join(paths)})",
                                     hint="a block of several modules names its tensors from their common parent")
        out[b.name] = tuple(block_tensor(model, path) for path in full)
    return out


def check_block_tensors(plan, workload: Workload, tensors: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Refuse, before anything is packed, a block tensor the runtime cannot take: not in the dtype the plan
    computes it in (its own, for a tensor the workload keeps in one) or not on the CPU. `plan`: a Plan."""
    for bp in plan.blocks:
        spec = workload.by_name[bp.name]
        for t, (tensor, _), own in zip(tensors[bp.name], spec.tensors, spec.tensor_own_dtypes, strict=True):
            # a tensor the workload keeps in its own dtype (a bf16 model's fp32 norm) is stored and bound in it
            if t.is_floating_point() and t.dtype not in TORCH_DTYPES.values():
                raise ResidencyError(f"block {bp.name} holds {tensor} in {str(t.dtype).removeprefix('torch.')}: residency "
                                     "stores tensors in float32, float16 and bfloat16 only",
                                     hint="cast it before attaching (a buffer assigned its .float() stays a buffer)")
            if t.dtype != TORCH_DTYPES[own or bp.compute_dtype]:
                kept = f" (the workload keeps {tensor} in {own})" if own else ""
                raise ResidencyError(
                    f"block {bp.name} computes in {bp.compute_dtype}{kept} but the model holds {t.dtype} "
                    f"weights ({tensor}; activations follow the model's dtype)",
                    hint=f"cast the model to the plan's compute dtype ({bp.compute_dtype}), or plan for the model's "
                         "own: make_plan(workload_from_module(model, example, name=…), profile) counts and plans "
                         "in it by default")
            if t.device.type != "cpu":
                raise ResidencyError(f"block {bp.name} has weights on {t.device}; the runtime places them",
                                     hint="build or load the model (or pipeline) on the CPU before attaching: "
                                          "the runtime moves its blocks to the device")


def check_block_formats(plan, source: str = "") -> None:
    """Refuse, before anything is predicted or packed, a block whose plan format residency cannot pack a model's
    weights into (Q2_K, Q3_K: read from GGUF files only). It failed mid-attach, after a run had printed its
    prediction, naming neither block nor file. `plan`: a Plan; `source`: its file, for the message."""
    from residency.formats import FORMATS

    for i, bp in enumerate(plan.blocks):
        fmt = FORMATS.get(bp.format)
        if fmt is not None and not fmt.can_pack:
            packable = ", ".join(n for n, f in FORMATS.items() if f.can_pack)
            where = f"{source}: blocks[{i}].format" if source else "the plan's format"
            raise ResidencyError(f"{where} for block {bp.name} is {bp.format}, a format residency reads from GGUF "
                                 "files but cannot quantize a model's weights into", hint=f"pick one it packs: {packable}")


def _submodule(model: nn.Module, block: str, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ResidencyError(
            f"block {block}: {type(model).__name__} has no module at path {path!r} "
            f"(its top-level modules: {children})",
            hint="build the workload from this model (block names are module paths), "
            "or give the model's class a blocks() method") from None


def _enclosing(model: nn.Module, found: dict[str, tuple[nn.Module, ...]]) -> tuple[str, ...]:
    inside = {id(m) for name, mods in found.items() for m in mods}
    out = []
    for name, mods in found.items():
        own = {id(m) for m in mods}
        if any(m is model for m in mods) or any(id(sub) in inside - own for m in mods for sub in m.modules()):
            out.append(name)
    if len(out) == len(found):
        raise ResidencyError("every block of the workload encloses another (or is the whole model)",
                             hint="describe the model as several blocks below it (its repeated layers, head, …)")
    return tuple(out)


def _check_disjoint(found: dict[str, tuple[nn.Module, ...]]) -> None:
    owner = {id(m): name for name, mods in found.items() for m in mods}
    for name, mods in found.items():
        for m in mods:
            for sub in m.modules():  # once per attach: O(modules)
                other = owner.get(id(sub), name)
                if other != name:
                    raise ResidencyError(f"blocks {name} and {other} share module {type(sub).__name__}",
                                         hint="blocks must be disjoint: the runtime hooks one block call at a time")


def unplanned_siblings(model: nn.Module, found: dict[str, tuple[nn.Module, ...]],
                       known_unowned: Iterable[str] = ()) -> list[str]:
    """Modules with parameters that sit beside a block's module in its container, of the same class, yet in no
    block: layers the workload does not know (a plan for 3 layers attached to a model of 4 ran the 4th
    unmanaged, outside the budget). `known_unowned`: parameter paths the workload says it left out on purpose."""
    block_ids = {id(m) for mods in found.values() for m in mods}
    skip = tuple(known_unowned)
    out = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)):  # a stack of layers; not a model's parts (a
            continue                                                 # VAE's quant_conv beside post_quant_conv)
        kids = list(parent.named_children())
        planned = {type(c) for _, c in kids if id(c) in block_ids}
        if not planned:
            continue
        for name, child in kids:
            path = f"{parent_name}.{name}" if parent_name else name
            if (id(child) not in block_ids and type(child) in planned and any(True for _ in child.parameters())
                    and not any(u == path or u.startswith(path + ".") for u in skip)):
                out.append(path)
    return out


def check_bound_blocks(plan, workload, enclosing: Iterable[str]) -> None:
    """Refuse a plan that does not keep resident for the session a block that must stay bound: one enclosing the
    others (not hooked: its tensors are read all through the model's call) or one whose tensors the model
    reads outside its calls (BlockSpec.read_outside_calls: a reused slot would be read)."""
    reasons = {n: None for n in enclosing}
    reasons.update({b.name: "outside" for b in workload.blocks if b.read_outside_calls and b.name not in reasons})
    for name, reason in reasons.items():
        bp = plan.by_name[name]
        if (bp.placement, bp.lifetime) == ("resident", "session"):
            continue
        if reason is None:
            raise ResidencyError(
                f"block {name} encloses other blocks (the model's own tensors, read all through its call); "
                f"the plan makes it {bp.placement} for the {bp.lifetime}",
                hint="plan it resident for the session: it stays bound while the blocks inside it run")
        raise ResidencyError(
            f"block {name}'s tensors are read outside its calls (the model uses them directly, as a tied head "
            f"F.linear(x, emb.weight) does); the plan makes it {bp.placement} for the {bp.lifetime}, so those "
            "reads would find another block's weights",
            hint="plan it resident for the session: residency.attach does (leave plan= out), or set its "
                 "BlockPlan to placement='resident' at the compute dtype's format")


def warn_unplanned(model: nn.Module, found: dict[str, tuple[nn.Module, ...]], workload) -> None:
    """A PlanWarning naming the layers unplanned_siblings finds (the workload's own unowned ones left out)."""
    extra = unplanned_siblings(model, found, workload.extra.get("unowned", ()))
    if extra:
        warnings.warn(f"{', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}: beside the model's blocks and like "
                      f"them, but in no block of workload {workload.name!r}: "
                      f"{'they run' if len(extra) > 1 else 'it runs'} unmanaged, outside the budget (a workload of "
                      "another model, with fewer layers?)", PlanWarning, stacklevel=4)
