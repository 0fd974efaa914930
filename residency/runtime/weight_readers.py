"""Modules that compute from a block's weights without being the block: each is hooked as a call of the block.

A block whose memory is reused (streamed, phase, packed) has its parameters bound to a slot, an arena or a
scratch that holds its weights only during its own call. Two kinds of module read them at other times:
- a submodule of the block called on its own (`text_encoder.get_input_embeddings()(ids)`, as prompt-weighting
  code does; `layers[4].mlp(x)` to probe a layer);
- a module outside the block holding one of its parameters: a head tied to an embedding when only the body is
  attached (`attach(llm.model)` with `tie_word_embeddings`), found by one pass over the live objects.
Either computed on whatever another block had left in that memory (off by 174 on a tied head, no error). Called
inside any block call it is part of that call (as a nested block call is); called on its own, it is one call of
its block, loaded out of schedule.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from residency.errors import ResidencyError

Readers = dict[str, tuple[nn.Module, ...]]  # block -> modules to hook as calls of it
# modules that only hold parameters and compute nothing (an EMA helper's ParameterList(model.parameters())): no reader
_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
Holders = tuple[tuple[nn.Module, frozenset[str]], ...]  # modules outside the blocks, with the blocks whose parameters they hold


def scan_holders(modules: dict[str, tuple[nn.Module, ...]], tensors: dict[str, tuple[torch.Tensor, ...]]) -> Holders:
    """Modules outside every block's sub-tree whose own parameters include a block's parameter (the same
    nn.Parameter object: a tie). Cost: one pass over the interpreter's live objects (~0.14 s for 500 k objects,
    a process with diffusers and transformers imported): once per attach of a model, not per re-plan."""
    owner = {id(t): name for name, ts in tensors.items() if name in modules for t in ts if isinstance(t, nn.Parameter)}
    inside = {id(sub) for mods in modules.values() for m in mods for sub in m.modules()}
    found = []
    gc.collect()  # a module no longer referenced but not yet collected is no reader
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some objects compute (a deprecation warning)
        kind = type(obj)
        if not issubclass(kind, nn.Module) or issubclass(kind, _CONTAINERS) or id(obj) in inside:
            continue
        try:
            held = frozenset(owner[id(p)] for p in obj._parameters.values() if id(p) in owner)
        except Exception:  # a module whose _parameters is not torch's (a half-built one): it holds no block's
            continue
        if held:
            found.append((obj, held))
    return tuple(found)


def readers(modules: dict[str, tuple[nn.Module, ...]], volatile: set[str],
            holders: Holders) -> tuple[Readers, Readers]:
    """The modules to hook for the blocks in `volatile` (those whose memory is reused): their submodules that own
    parameters (a GELU reads none; the block's own modules are hooked already), then the holders of their parameters.

    Raises ResidencyError for a holder that cannot be one call of one block: it holds parameters of two such
    blocks, or it contains blocks (its call would enclose theirs)."""
    inner: dict[str, dict[int, nn.Module]] = {}
    for name in volatile:
        own = {id(m) for m in modules[name]}
        seen = inner.setdefault(name, {})
        for m in modules[name]:
            for sub in m.modules():
                if id(sub) not in own and any(p is not None for p in sub._parameters.values()):
                    seen.setdefault(id(sub), sub)
    blocks = {id(m): name for name, mods in modules.items() for m in mods}
    outer: dict[str, dict[int, nn.Module]] = {}
    for holder, held in holders:
        held = held & volatile
        if not held:
            continue
        what = f"{type(holder).__name__} outside the attached blocks"
        if len(held) > 1:
            raise ResidencyError(f"{what} holds parameters of blocks {', '.join(sorted(held))}, which the plan streams "
                                 "or packs: it would read them while other weights fill their memory",
                                 hint="attach the module that holds them all, or untie the weights")
        name = next(iter(held))
        enclosed = sorted({blocks[id(sub)] for sub in holder.modules() if id(sub) in blocks})
        if enclosed:
            raise ResidencyError(f"{what} holds a parameter of block {name} and contains block(s) "
                                 f"{', '.join(enclosed[:3])}",
                                 hint="attach that module itself, or untie the weights")
        outer.setdefault(name, {})[id(holder)] = holder
    return ({name: tuple(mods.values()) for name, mods in inner.items() if mods},
            {name: tuple(mods.values()) for name, mods in outer.items()})
