"""Which modules of a model are its blocks, read from the module tree alone (nothing runs).

The repeated blocks a library declares (`_repeated_blocks`, else `_no_split_modules`), else the children of
ModuleLists and the repeated children of an nn.Sequential (or of the root); beside them every other parameter-owning module where the tree branches off; and the loose
tensors no such module holds (the root's own parameters, buffers of parameter-less modules such as rope).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate.utils import find_tied_parameters
from torch import nn

# Where the repeated blocks were found, most specific first: diffusers declares `_repeated_blocks` for
# regional compilation; transformers and diffusers declare `_no_split_modules` for device maps.
DECLARATIONS = ("_repeated_blocks", "_no_split_modules")


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class BlockUnit:
    """Modules whose tensors are loaded and evicted together: one module, or several sharing a tied tensor."""

    modules: tuple[str, ...]  # module paths from the root, tree order
    repeated: bool  # a repeated block (declared, or a ModuleList child) rather than a module beside them


@dataclass(frozen=True)
class ModuleBlocks:
    """A module tree cut into block units, the tensors no unit holds, and the rule that cut it."""
    units: tuple[BlockUnit, ...]  # tree order; disjoint subtrees
    loose: tuple[str, ...]  # tensor paths from the root that no unit holds
    repeated_from: str  # "_repeated_blocks" | "_no_split_modules" | "ModuleList" | "none"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _declared_names(model: nn.Module) -> tuple[str, frozenset[str]]:
    """The first declaration that names a class present in the tree, with the names it declares."""
    present = {type(m).__name__ for m in model.modules()}
    for attr in DECLARATIONS:
        names = frozenset(n for m in model.modules() for n in (getattr(type(m), attr, None) or ()))
        if names & present:
            return attr, names
    return "ModuleList", frozenset()


def _signature(module: nn.Module) -> tuple:
    """A module's class and parameter shapes: equal for two layers built alike."""
    return type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _repeats(module: nn.Module) -> set[str]:
    """Names of the parameter-owning children of `module` that siblings repeat (same class and parameter
    shapes) — three or more, or two composite layers — holding no stack of their own: an nn.Sequential of 16
    identical layers is a stack of blocks, as a ModuleList of them is, where an MLP's Linear(1024, 4096) and
    Linear(4096, 1024) are not, nor the two Linear(d, d) of one MLP, nor two towers that each hold a
    ModuleList of layers (those layers are the blocks)."""
    by_signature: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, child in module.named_children():
        if owns_parameters(child):
            by_signature.setdefault(_signature(child), []).append((name, child))
    out: set[str] = set()
    for group in by_signature.values():
        first = group[0][1]
        composite = next(first.children(), None) is not None
        if (len(group) >= 3 or (len(group) == 2 and composite)) and not _holds_stack(first):
            out.update(name for name, _ in group)
    return out


def _holds_stack(module: nn.Module) -> bool:
    """Whether a stack of layers lies beneath `module`: a ModuleList of parameter-owning layers, or repeats."""
    for sub in module.modules():
        if sub is module:
            continue
        if isinstance(sub, nn.ModuleList) and sum(1 for c in sub.children() if owns_parameters(c)) > 1:
            return True
        if isinstance(sub, nn.Sequential) and _repeats(sub):
            return True
    return False


def _repeated_paths(model: nn.Module, how: str, names: frozenset[str]) -> set[str]:
    """Outermost repeated blocks: a declared class, or (undeclared) a parameter-owning ModuleList child or a
    repeated child of an nn.Sequential (the root's too, whatever its class: it is always split)."""
    found: set[str] = set()

    def visit(module: nn.Module, path: str) -> None:
        repeats = _repeats(module) if how == "ModuleList" and (
            isinstance(module, nn.Sequential) or module is model) else set()
        for name, child in module.named_children():
            p = _join(path, name)
            hit = (type(child).__name__ in names if how != "ModuleList"
                   else (isinstance(module, nn.ModuleList) and owns_parameters(child)
                         and not isinstance(child, _CONTAINERS)) or name in repeats)
            if hit:
                found.add(p)
            else:
                visit(child, p)

    visit(model, "")
    return found


def _floating_buffers(module: nn.Module, path: str, recurse: bool) -> Iterator[str]:
    # integer buffers (position ids, masks) are a few bytes and no storage format applies to them
    for name, b in module.named_buffers(recurse=recurse):
        if b.is_floating_point():
            yield _join(path, name)


def find_blocks(model: nn.Module) -> ModuleBlocks:
    """The model's block units and loose tensors. The root is always split into its children."""
    how, names = _declared_names(model)
    repeated = _repeated_paths(model, how, names)
    if not repeated:
        how = "none"
    units: list[BlockUnit] = []
    loose = [name for name, _ in model.named_parameters(recurse=False)]
    loose += _floating_buffers(model, "", recurse=False)
    _cut(model, "", repeated, units, loose, False)
    return ModuleBlocks(_merge_tied(model, units), tuple(loose), how)


def _cut(module: nn.Module, path: str, repeated: set[str], units: list[BlockUnit], loose: list[str],
         inherited: bool) -> None:
    """Units for the children of `module` (at `path`): a repeated path is a repeated unit; a container, or a module
    above a repeated path, is cut further (its own tensors loose); another parameter-owning child is a unit
    (repeated when `inherited`); a parameter-less one's floating buffers are loose."""
    for name, child in module.named_children():
        p = _join(path, name)
        if p in repeated:
            units.append(BlockUnit((p,), True))
        elif any(r.startswith(p + ".") for r in repeated) or isinstance(child, _CONTAINERS):
            # a container is never called itself: its children are what the forward runs
            loose.extend(_join(p, n) for n, _ in child.named_parameters(recurse=False))
            loose.extend(_floating_buffers(child, p, recurse=False))
            _cut(child, p, repeated, units, loose, inherited)
        elif owns_parameters(child):
            units.append(BlockUnit((p,), inherited))
        else:
            loose.extend(_floating_buffers(child, p, recurse=True))


def split_units(model: nn.Module, blocks: ModuleBlocks, which: set[int]) -> ModuleBlocks:
    """`blocks` with each unit of index in `which` (one module each) cut into its children, as the root is: a layer
    whose forward is never called while its parent calls its parts (`x = layer.mlp(layer.norm(x))`) holds blocks,
    not one. The unit's own tensors become loose; its parts keep its repeated flag, and tied tensors merge again."""
    units: list[BlockUnit] = []
    loose = list(blocks.loose)
    for i, u in enumerate(blocks.units):
        if i not in which or len(u.modules) != 1:
            units.append(u)
            continue
        path = u.modules[0]
        sub = model.get_submodule(path)
        loose.extend(_join(path, n) for n, _ in sub.named_parameters(recurse=False))
        loose.extend(_floating_buffers(sub, path, recurse=False))
        _cut(sub, path, set(), units, loose, u.repeated)
    return ModuleBlocks(_merge_tied(model, units), tuple(loose), blocks.repeated_from)


def _warn_joined(model: nn.Module, modules: list[str], tensors: list[str]) -> None:
    """A small tensor shared by more than two would-be blocks (one `gain` every layer holds) makes them one block,
    which streamed needs a slot of all their weights: said, with the tensor, where the user can untie it."""
    import warnings

    from residency.errors import PlanWarning
    from residency.units import fmt_bytes

    params = {id(p): p for m in modules for p in model.get_submodule(m).parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if sum(_tensor_bytes(model, t) for t in tensors) * 4 > total:  # the tie is most of it (T5's shared embedding
        return                                                       # read by both stacks and the head): as meant
    shown = ", ".join(f"{t} ({fmt_bytes(_tensor_bytes(model, t))})" for t in tensors[:2])
    warnings.warn(f"{len(modules)} modules ({modules[0]} … {modules[-1]}) share {shown or 'a tensor'}: they are "
                  "planned as one block, loaded and streamed whole; give each module its own copy of that tensor "
                  "to plan them as blocks of their own", PlanWarning, stacklevel=2)


def _tensor_bytes(model: nn.Module, path: str) -> int:
    try:
        t = model.get_parameter(path)
    except (AttributeError, TypeError):
        return 0
    return t.numel() * t.element_size()


def _merge_tied(model: nn.Module, units: list[BlockUnit]) -> tuple[BlockUnit, ...]:
    """Units that share a tensor become one: the tensor is stored once, and every module reading it needs it
    on the device (an LM head tied to its embedding is the embedding block, called twice)."""
    owner = {}  # parameter path -> unit index
    for i, u in enumerate(units):
        for m in u.modules:
            for n, _ in model.get_submodule(m).named_parameters(remove_duplicate=False):
                owner[_join(m, n)] = i
    parent = list(range(len(units)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    joined_by: dict[int, list[str]] = {}  # unit index -> a tied tensor that joined others to it
    for group in find_tied_parameters(model):
        holders = sorted({root(owner[p]) for p in group if p in owner})
        for h in holders[1:]:
            parent[h] = holders[0]
        if len(holders) > 1:
            joined_by.setdefault(holders[0], []).append(sorted(group)[0])
    merged: dict[int, list[BlockUnit]] = {}
    for i, u in enumerate(units):
        merged.setdefault(root(i), []).append(u)
    for r, group in merged.items():
        if len(group) > 2:  # a tie of more than two modules (an embedding and its head are two): say which tensor
            _warn_joined(model, [m for u in group for m in u.modules], joined_by.get(r, []))
    return tuple(BlockUnit(tuple(m for u in group for m in u.modules), any(u.repeated for u in group))
                 for group in merged.values())


def unit_tensors(model: nn.Module, modules: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    """(path from the root, tensor) of the parameters and floating buffers of `modules`, tied ones once."""
    seen: set[int] = set()
    out = []
    for m in modules:
        sub = model.get_submodule(m)
        tensors = list(sub.named_parameters(remove_duplicate=False)) + [
            (n, b) for n, b in sub.named_buffers(remove_duplicate=False) if b.is_floating_point()]
        for n, t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append((_join(m, n), t))
    return out
