"""Shared pieces of the catalog generators: a component traced by the module builder at its path in a
pipeline's tree, the KV fields of a causal model's blocks, and the document written for an entry.

Nothing here is a table of FLOPs: tensors, FLOPs, ops and activation elements all come from
`residency.workload.module_workload` on the real module (built on the meta device: no memory, no weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from residency.workload import ModuleWorkloadWarning, module_workload
from residency.workload.catalog import workload_to_dict
from residency.workload.module_schedule import LOOSE
from residency.workload.module_trace import attention_flops
from residency.workload.spec import BlockSpec, PassSpec, PhaseSpec, Workload


class Nested(nn.Module):
    """`module` as the child at dotted `path` (e.g. "vae.decoder") of an otherwise empty tree whose forward
    calls `call`: traced, every block is named by its module path in that tree, which is its path in the
    pipeline the catalog describes (`transformer.transformer_blocks.0`), and the runtime finds it there."""

    def __init__(self, path: str, module: nn.Module, call: Callable[..., Any] | None = None):
        super().__init__()
        head, _, rest = path.partition(".")
        self.add_module(head, Nested(rest, module) if rest else module)
        self.__dict__["call"] = call  # not a module: kept out of the tree

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


def trace_part(path: str, module: nn.Module, example: Any, component: str, *, call: Callable[..., Any] | None = None,
               group_siblings: bool = True, unused_ok: bool = False, compute_dtype: str = "bf16") -> Workload:
    """One forward of `module` (or `call`, a method of it) on `example`, traced at `path`: blocks named by
    their module paths, the loose block `<path>.loose`, all of component `component`.

    unused_ok: the forward runs only part of the module on purpose (a VAE's decoder alone), so the builder's
    warning about parameters no block owns is silenced. compute_dtype: the dtype of the meta tensors (the
    counts do not depend on it; a module holding state from an earlier call needs that call's dtype).
    Cost: one meta forward (seconds for a 12B model).
    """
    with warnings.catch_warnings():
        if unused_ok:
            warnings.simplefilter("ignore", ModuleWorkloadWarning)
        traced = module_workload(Nested(path, module, call or module), example, name=component,
                                 component=component, compute_dtype=compute_dtype, group_siblings=group_siblings)
    w = traced.workload

    def rename(block: str) -> str:
        label = block[len(component) + 1:]
        return f"{path}.{LOOSE}" if label == LOOSE else label

    unstored = _non_persistent_buffers(path, module)
    blocks = tuple(_without_unstored(replace(b, name=rename(b.name), component=component), unstored)
                   for b in w.blocks)
    phases = tuple(replace(ph, passes=tuple(replace(p, blocks=tuple(map(rename, p.blocks))) for p in ph.passes))
                   for ph in w.phases)
    return replace(w, blocks=blocks, phases=phases)


def _non_persistent_buffers(path: str, module: nn.Module) -> frozenset[str]:
    """Paths (under `path`) of the buffers a checkpoint does not store: tables the model rebuilds (rope,
    position embeddings)."""
    return frozenset(".".join(p for p in (path, name, b) if p) for name, sub in module.named_modules()
                     for b in sub._non_persistent_buffers_set)


def _without_unstored(block: BlockSpec, unstored: frozenset[str]) -> BlockSpec:
    """The block with only its stored tensors (_stored), in tensors and own_dtypes alike."""
    tensors = _stored(block, unstored)
    kept = {n for n, _ in tensors}
    return replace(block, tensors=tensors, own_dtypes=tuple((n, d) for n, d in block.own_dtypes if n in kept))


def _stored(block: BlockSpec, unstored: frozenset[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The block's tensors a checkpoint stores. The builder also lists non-persistent floating buffers (they
    must be on the device when the block runs); a catalog entry describes the checkpoint, and the runtime
    moves the buffers a workload does not list to the device by itself (Runtime._move_buffers)."""
    base = _common_parent(block.modules)
    return tuple((n, s) for n, s in block.tensors if (f"{base}.{n}" if base else n) not in unstored)


def _common_parent(modules: Sequence[str]) -> str:
    """The module the block's tensor names are relative to: its module, or its modules' deepest common
    parent (as residency.runtime.module_paths reads them)."""
    if len(modules) == 1:
        return modules[0]
    common = []
    for level in zip(*(m.split(".") for m in modules), strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def forward_blocks(part: Workload) -> tuple[str, ...]:
    """The blocks of one traced forward in call order (its passes joined; a block called again is listed once)."""
    return tuple(dict.fromkeys(b for ph in part.phases for p in ph.passes for b in p.blocks))


def self_attention_pair_flops(attn: nn.Module) -> float:
    """FLOPs of one (query, key) pair of a diffusers attention layer (`to_q`, `to_k`, `to_v`): scores and
    weighted sum over its query width, by the builder's own formula (module_trace.attention_flops; 4·width)."""
    width = attn.to_q.out_features
    return attention_flops((1, 1, width), (1, 1, width), (1, 1, width))


def with_cache(block: BlockSpec, context_pair_flops: float, kv_channels: int, self_pair_flops: float | None = None
               ) -> BlockSpec:
    """A block that keeps K/V of its tokens for later frames and attends to the cached ones: its cost per
    (query, cached key) pair, its K+V channels per token; its own-frame pair cost where the traced one
    included the cache."""
    return replace(block, context_attn_flops_per_token_pair=context_pair_flops, context_tokens_per_frame=block.tokens,
                   kv_channels_per_token=kv_channels,
                   self_attn_flops_per_token_pair=(block.self_attn_flops_per_token_pair if self_pair_flops is None
                                                   else self_pair_flops))


def params_by_component(blocks: Sequence[BlockSpec]) -> dict[str, int]:
    """Weight elements of each component (the catalog's `extra.params`)."""
    out: dict[str, int] = {}
    for b in blocks:
        out[b.component] = out.get(b.component, 0) + b.params
    return out


def catalog_document(workload: Workload, extra: dict[str, Any]) -> dict[str, Any]:
    """The catalog JSON document of a built workload, its facts in `extra` (params by component added)."""
    return workload_to_dict(replace(workload, extra={**extra, "params": params_by_component(workload.blocks)}))


def phase(name: str, per: str, *passes: tuple[Sequence[str], bool, str, str]) -> PhaseSpec:
    """A phase run once per `per` of the passes (blocks, per_step, kv, purpose), in order."""
    return PhaseSpec(name, per, tuple(PassSpec(tuple(b), per_step, kv, purpose) for b, per_step, kv, purpose in passes))
