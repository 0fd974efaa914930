"""From a counted forward to blocks and passes: sibling grouping, glue, per-call coefficients, the schedule.

`module_blocks` says which modules are block units, `module_trace` what each unit's calls dispatched;
this turns the two into the BlockSpecs and PassSpecs of a Workload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from residency.workload.module_blocks import ModuleBlocks, unit_tensors
from residency.workload.module_trace import PROLOGUE, Trace, UnitCounts
from residency.workload.spec import BlockSpec

LOOSE = "loose"  # label of the block holding the loose tensors
_ACT_BYTES = 2  # BlockSpec states activation bytes at a 2-byte compute dtype


@dataclass
class Draft:
    """A block before it is a BlockSpec: its units, its counts over the forward, its calls."""

    label: str  # name below the component: a module path, "parent.a+b" for grouped siblings, or LOOSE
    units: list[int]  # unit indices, first called first
    modules: tuple[str, ...]  # module paths it owns
    counts: UnitCounts = field(default_factory=UnitCounts)
    calls: int = 0  # per forward


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _groupable(blocks: ModuleBlocks, trace: Trace, unit: int) -> bool:
    u = blocks.units[unit]
    return not u.repeated and len(u.modules) == 1 and trace.units[unit].calls == 1


# A group of siblings holds at most this share of the model's parameters, or as many as its largest repeated
# block where that is more (a small test model's embedders outweigh an 8th of it): grouping saves a small
# module's per-block scheduling, and a group big enough to matter could no longer be evicted or streamed in
# parts (an encoder and a decoder called once each, side by side, would be one block).
GROUP_MAX_SHARE = 1 / 8


def draft_blocks(blocks: ModuleBlocks, trace: Trace, group_siblings: bool,
                 unit_elements: list[int] | None = None) -> tuple[list[Draft], list[int], dict[int, int]]:
    """Drafts in first-call order, the forward's calls as draft indices (consecutive calls of one group's
    members are one call) and each called unit's draft. Siblings are grouped when each is a non-repeated
    module called once, straight after the previous one, while the group holds at most GROUP_MAX_SHARE of
    the parameters or as many as the largest repeated unit (`unit_elements`: each unit's; None: no limit)."""
    drafts: list[Draft] = []
    of_unit: dict[int, int] = {}
    sequence: list[int] = []
    prev = None
    cap = float("inf")
    if unit_elements:
        cap = max([GROUP_MAX_SHARE * sum(unit_elements)]
                  + [n for u, n in zip(blocks.units, unit_elements, strict=True) if u.repeated])

    def fits(units: list[int], unit: int) -> bool:
        return unit_elements is None or sum(unit_elements[u] for u in units) + unit_elements[unit] <= cap
    for unit in trace.order:
        if unit in of_unit:
            d = of_unit[unit]
            sequence.append(d)
            prev = unit
            continue
        path = blocks.units[unit].modules[0]
        tail = drafts[-1] if drafts else None
        if (group_siblings and tail is not None and tail.units[-1] == prev
                and _groupable(blocks, trace, unit) and _groupable(blocks, trace, prev)
                and _parent(path) == _parent(blocks.units[prev].modules[0]) and fits(tail.units, unit)):
            tail.units.append(unit)
            parent = _parent(path)
            names = "+".join(blocks.units[u].modules[0].rpartition(".")[2] for u in tail.units)
            tail.label = f"{parent}.{names}" if parent else names
            tail.modules += blocks.units[unit].modules
            of_unit[unit] = len(drafts) - 1
        else:
            drafts.append(Draft(path, [unit], blocks.units[unit].modules))
            of_unit[unit] = len(drafts) - 1
            sequence.append(of_unit[unit])
        prev = unit
    for i, d in enumerate(drafts):
        d.calls = sequence.count(i)
        first = trace.units[d.units[0]]
        d.counts = UnitCounts(calls=d.calls, tokens=first.tokens)
        for u in d.units:
            d.counts.absorb(trace.units[u])
    return drafts, sequence, of_unit


def charge_glue(drafts: list[Draft], of_unit: dict[int, int], trace: Trace, loose: Draft | None) -> None:
    """The root's own ops between blocks: to the loose block when there is one (its tensors are the root's),
    else to the block that ran just before (the first block for ops before any)."""
    for last, counts in trace.glue.items():
        if loose is not None:
            loose.counts.absorb(counts)
        else:
            drafts[of_unit[last] if last != PROLOGUE else 0].counts.absorb(counts)


def passes_of(sequence: list[int], names: list[str], loose: str | None) -> tuple[tuple[str, ...], ...]:
    """The call sequence cut into passes that name each block once: a block called again starts a new pass
    (a pass runs each of its blocks once). The loose block opens the first."""
    passes: list[list[str]] = [[loose] if loose else []]
    for d in sequence:
        if names[d] in passes[-1]:
            passes.append([])
        passes[-1].append(names[d])
    return tuple(tuple(p) for p in passes)


def _relative(paths: list[str], prefix: str) -> list[str]:
    return [p[len(prefix) + 1:] if prefix and p.startswith(prefix + ".") else p for p in paths]


def _common_module(modules: tuple[str, ...]) -> str:
    if len(modules) == 1:
        return modules[0]
    parts = [m.split(".") for m in modules]
    common = []
    for level in zip(*parts, strict=False):  # up to the shortest path
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def block_spec(name: str, component: str, draft: Draft, tensors: list[tuple[str, tuple[int, ...]]],
               tokens: int) -> BlockSpec:
    """Per-call coefficients from a draft's totals over the forward (a block called n times: the mean)."""
    c = draft.counts
    n = max(1, draft.calls)
    t = max(1, tokens)
    by_size = tuple((k, round(v / n)) for k, v in sorted(c.by_size.items()) if round(v / n) > 0)
    # relative to the block's module, or to its modules' deepest common parent ("" the model itself), which is
    # how residency.runtime.module_paths finds them again
    names = _relative([p for p, _ in tensors], _common_module(draft.modules))
    return BlockSpec(
        name=name, component=component, tensors=tuple(zip(names, (s for _, s in tensors), strict=True)), tokens=t,
        flops_per_token=c.token_flops / n / t, fixed_flops=c.fixed_flops / n,
        # at this one shape the split between per-token and per-pair FLOPs only says which rows they run at
        self_attn_flops_per_token_pair=c.pair_flops / n / (t * t),
        activation_bytes_per_token=c.peak_elements * _ACT_BYTES / t,
        ops_per_call=round(c.ops / n), kernels_per_call=round(c.kernels / n),
        activation_elements_per_call=sum(v for _, v in by_size), activation_elements_by_size=by_size,
        modules=draft.modules)


def draft_tensors(model: nn.Module, drafts: list[Draft], blocks: ModuleBlocks,
                  loose_paths: list[str]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Each draft's (path, shape); a tensor shared by several (tied) is counted once, at its first module
    block — the loose block only holds what no module block does."""
    seen: set[int] = set()
    out: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    every = (dict(model.named_parameters(remove_duplicate=False))
             | dict(model.named_buffers(remove_duplicate=False)))
    for i in sorted(range(len(drafts)), key=lambda i: drafts[i].label == LOOSE):
        d = drafts[i]
        if d.label == LOOSE:
            items = [(p, every[p]) for p in loose_paths]
        else:
            items = [pt for u in d.units for pt in unit_tensors(model, blocks.units[u].modules)]
        out[i] = []
        for p, t in items:
            if id(t) not in seen:
                seen.add(id(t))
                out[i].append((p, tuple(t.shape)))
    return [out[i] for i in range(len(drafts))]
