"""One Workload of a multi-model pipeline: each component's workload as a part of a phase
(text encoders → encode, the denoiser × steps → denoise, the VAE decoder → decode), under one module tree.

The component workloads come from residency.workload.from_module, each traced as a child of a container
named after the component, so their block names and module paths are already paths in that container.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from residency.errors import ResidencyError
from residency.workload.spec import BlockSpec, PassSpec, PhaseSpec, Workload

PHASES = ("encode", "denoise", "decode")  # in the order a text-to-image call runs them


class ComponentCall(nn.Module):
    """One component as the only child `name` of a root whose forward is the method the pipeline calls
    (`encode`, `decode` or `forward`): traced, its block names and module paths are paths in the pipeline."""

    def __init__(self, name: str, module: nn.Module, method: str):
        super().__init__()
        self.add_module(name, module)
        self.__dict__["call"] = getattr(module, method)  # not a submodule: a bound method of the child

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


@dataclass(frozen=True)
class ComponentPart:
    """One component's share of the pipeline: its workload (one forward: one pass or several) and where
    that forward runs."""

    component: str  # the pipeline's attribute name ("text_encoder_2", "transformer", "vae")
    phase: str  # one of PHASES
    per_step: bool  # True: once per denoise step (the denoiser); False: once per image
    workload: Workload  # traced as the container's child `component` (paths start with it)
    calls: int = 1  # forwards per image (per step for the denoiser): 2 for a denoiser run apart for guidance


def container_name(block: str, component: str) -> str:
    """from_module names a block `<component>.<label>`; the label of a child traced in a container already
    starts with the component, so the block's name is its label — a module path of the container — except
    for the loose block, which keeps its component prefix to stay unique."""
    label = block[len(component) + 1:] if block.startswith(component + ".") else block
    return label if label.startswith(component + ".") else f"{component}.{label}"


def enclosing_blocks(workload: Workload) -> tuple[str, ...]:
    """Blocks whose modules hold another block's modules (a component's loose tensors: its root parameters
    and buffers): the runtime cannot hook them, so they stay bound — resident — for the whole call."""
    paths = {b.name: b.modules or (b.name,) for b in workload.blocks}
    out = []
    for name, mine in paths.items():
        others = [p for n, ps in paths.items() if n != name for p in ps]
        if others and any(m == "" or o.startswith(m + ".") or o == m for m in mine for o in others):  # "": the root
            out.append(name)
    return tuple(out)


def join_phases(name: str, parts: Sequence[ComponentPart], steps: int, source: str = "",
                call_order: Sequence[str] = (), video_frames: int = 1) -> Workload:
    """The pipeline's workload: every part's blocks renamed to container paths, each phase made of its
    parts' passes in the given order, all phases per latent frame — one image is one frame, each with its
    own prompt, so the encoders run in every frame (as pipelines/catalog's flux-schnell describes it).
    `call_order` (the components as a real call ran them, one entry a call): a phase of once-per-image parts
    takes its passes in that order where it holds each part's `calls` (two encoders run in turn, prompt then
    negative prompt, are scheduled so, not each encoder's calls together).
    Blocks enclosing others lead the first pass: the runtime takes their calls when the container's call
    begins (residency.runtime.block_calls). `video_frames`: the frames one call makes (a text-to-video
    pipeline's 81): a frame budget from fps is then that many frames' time, and the unit is a video."""
    unknown = [p.phase for p in parts if p.phase not in PHASES]
    if unknown:
        raise ResidencyError(f"pipeline {name}: unknown phase {unknown[0]!r}", hint=f"one of {', '.join(PHASES)}")
    blocks: list[BlockSpec] = []
    passes: dict[str, list[PassSpec]] = {ph: [] for ph in PHASES}
    own: dict[str, list[PassSpec]] = {}  # one call's passes per component
    for part in parts:
        rename = {b.name: container_name(b.name, part.component) for b in part.workload.blocks}
        blocks += [replace(b, name=rename[b.name], component=part.component) for b in part.workload.blocks]
        purpose = f"{part.component} ({part.workload.extra.get('module_class', '')})"
        if part.calls < 1:
            raise ResidencyError(f"pipeline {name}: component {part.component} calls={part.calls}",
                                 hint="forwards per image (per step for the denoiser), at least 1")
        one = [PassSpec(tuple(rename[b] for b in p.blocks), part.per_step, p.kv, purpose)
               for ph in part.workload.phases for p in ph.passes]
        passes[part.phase] += one * part.calls
        own[part.component] = one
    for ph in PHASES:
        in_order = _in_call_order([p for p in parts if p.phase == ph], call_order, own)
        if in_order is not None:
            passes[ph] = in_order
    leading = enclosing_blocks(Workload(name, tuple(blocks), (), steps=1, context_frames=0))
    phases = []
    for ph in PHASES:
        kept = [q for q in (PassSpec(tuple(b for b in p.blocks if b not in leading), p.per_step, p.kv, p.purpose)
                            for p in passes[ph]) if q.blocks]
        if kept and not phases and leading:  # the first phase that runs: its first pass opens with them
            if kept[0].per_step:
                kept.insert(0, PassSpec(leading, False, "none", "tensors read all through the call"))
            else:
                kept[0] = replace(kept[0], blocks=leading + kept[0].blocks)
        if kept:
            phases.append(PhaseSpec(ph, "latent_frame", tuple(kept)))
    order = [b for b in blocks if b.name in leading] + [b for b in blocks if b.name not in leading]
    extra: dict = {"components": [p.component for p in parts]}
    held = {p.workload.extra.get("weights_dtype") for p in parts}
    if len(held) == 1 and None not in held:  # one weights dtype throughout: the quality loss is against it
        extra["weights_dtype"] = held.pop()
    return Workload(name, tuple(order), tuple(phases), steps=1, context_frames=0, source=source,
                    video_frames_per_latent=video_frames, extra=extra).with_params(steps=steps)


def _in_call_order(parts: Sequence[ComponentPart], call_order: Sequence[str],
                   own: dict[str, list[PassSpec]]) -> list[PassSpec] | None:
    """The passes of one phase's parts in the order the call ran them; None where that order does not hold each
    part's calls exactly (or the phase runs per step, or has one part: the given order is that order)."""
    names = {p.component for p in parts}
    if len(names) < 2 or any(p.per_step for p in parts):
        return None
    ran = [c for c in call_order if c in names]
    if any(ran.count(p.component) != p.calls for p in parts):
        return None
    return [q for c in ran for q in own[c]]
