"""Joining component workloads into one pipeline workload (residency.workload.pipeline_phases), on hand-made
components: block names become container paths, each component's passes land in its phase, blocks that
enclose others open the first pass."""

from __future__ import annotations

from dataclasses import replace

import pytest

from residency.errors import ResidencyError
from residency.workload import BlockSpec, PassSpec, PhaseSpec, Workload
from residency.workload.pipeline_phases import ComponentPart, container_name, enclosing_blocks, join_phases

TENSORS = (("weight", (64, 64)),)


def component(name: str, labels: list[str], loose: bool = False) -> Workload:
    """As from_module names a component traced as the container's child `name`: `<name>.<label>`, label a path
    that starts with `name`; its loose tensors owned by the component's root module."""
    blocks = [BlockSpec(f"{name}.{name}.{label}", name, TENSORS, 8, 2.0 * 64 * 64, modules=(f"{name}.{label}",))
              for label in labels]
    if loose:
        blocks.insert(0, BlockSpec(f"{name}.loose", name, (("table", (64,)),), 8, 0.0, modules=(name,)))
    phase = PhaseSpec("denoise", "latent_frame", (PassSpec(tuple(b.name for b in blocks), per_step=True),))
    return Workload(name, tuple(blocks), (phase,), steps=1, context_frames=0)


def parts(loose_denoiser: bool = False) -> list[ComponentPart]:
    return [ComponentPart("text_encoder", "encode", False, component("text_encoder", ["layers.0", "layers.1"])),
            ComponentPart("transformer", "denoise", True,
                          component("transformer", ["blocks.0", "blocks.1"], loose=loose_denoiser)),
            ComponentPart("vae", "decode", False, component("vae", ["decoder.conv"]))]


def test_block_names_become_paths_of_the_container_and_the_loose_block_keeps_its_component():
    assert container_name("vae.vae.decoder.conv", "vae") == "vae.decoder.conv"
    assert container_name("transformer.loose", "transformer") == "transformer.loose"


def test_each_component_runs_in_its_phase_with_the_denoiser_per_step():
    w = join_phases("pipe", parts(), steps=3)
    assert [(ph.name, ph.per, [(p.blocks, p.per_step) for p in ph.passes]) for ph in w.phases] == [
        ("encode", "latent_frame", [(("text_encoder.layers.0", "text_encoder.layers.1"), False)]),
        ("denoise", "latent_frame", [(("transformer.blocks.0", "transformer.blocks.1"), True)]),
        ("decode", "latent_frame", [(("vae.decoder.conv",), False)])]
    assert w.steps == 3 and w.calls_per_frame("transformer.blocks.0") == 3 and w.calls_per_frame("vae.decoder.conv") == 1
    assert w.by_name["vae.decoder.conv"].modules == ("vae.decoder.conv",)


def test_a_block_enclosing_others_opens_the_first_pass_where_the_containers_call_takes_it():
    w = join_phases("pipe", parts(loose_denoiser=True), steps=2)
    assert enclosing_blocks(w) == ("transformer.loose",)
    assert w.blocks[0].name == "transformer.loose"
    assert w.phases[0].passes[0].blocks == ("transformer.loose", "text_encoder.layers.0", "text_encoder.layers.1")
    assert "transformer.loose" not in w.phase("denoise").blocks


def test_a_first_pass_per_step_gets_a_pass_of_its_own_for_the_enclosing_blocks():
    denoiser_only = [parts(loose_denoiser=True)[1]]
    w = join_phases("pipe", denoiser_only, steps=2)
    assert [(p.blocks, p.per_step) for p in w.phase("denoise").passes] == [
        (("transformer.loose",), False), (("transformer.blocks.0", "transformer.blocks.1"), True)]


def test_an_unknown_phase_is_refused_naming_it():
    bad = [ComponentPart("safety_checker", "check", False, component("safety_checker", ["head"]))]
    with pytest.raises(ResidencyError, match=r"unknown phase 'check'"):
        join_phases("pipe", bad, steps=1)


def test_a_denoiser_called_twice_a_step_runs_its_passes_twice_a_step():
    twice = [replace(p, calls=2) if p.component == "transformer" else p for p in parts()]
    w = join_phases("pipe", twice, steps=3)
    assert len(w.phase("denoise").passes) == 2 and w.calls_per_frame("transformer.blocks.1") == 6
    assert w.calls_per_frame("text_encoder.layers.0") == 1
