"""Structure for a runtime: blocks own every parameter, and forward hooks see the schedule's order."""

import numpy as np
import pytest

from pipelines.world_model import PHASES, WorldModelPipeline

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def pipe():
    return WorldModelPipeline.from_config("tiny")


def test_blocks_own_every_parameter_exactly_once(pipe):
    owned = [id(p) for _, module, _ in pipe.blocks() for p in module.parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in pipe.parameters()}


def test_blocks_are_the_module_lists_runtimes_hook(pipe):
    names = [n for n, _, _ in pipe.blocks()]
    assert names[0] == "vae.encoder.blocks.0" and names[-1].startswith("vae.decoder.blocks.")
    for name, module, _ in pipe.blocks():
        assert pipe.get_submodule(name) is module
    assert [c for _, _, c in pipe.blocks()] == sorted((c for _, _, c in pipe.blocks()),
                                                      key=["encoder", "dit", "decoder"].index)


def test_schedule_counts_steps_plus_a_cache_write_per_frame(pipe):
    entries = pipe.schedule()
    assert {e.phase for e in entries} <= set(PHASES)
    per_frame_dit = sum(e.calls for e in entries if e.component == "dit" and e.per == "latent_frame")
    assert per_frame_dit == pipe.config.steps + 1
    decode = [e for e in entries if e.phase == "decode"]
    assert len(decode) == 1 and decode[0].calls == 1 and decode[0].per == "latent_frame"
    assert [e.per for e in entries] == ["session", "session"] + ["latent_frame"] * 3


def _expand(entries):
    return [name for e in entries for _ in range(e.calls) for name in e.blocks]


def test_forward_hooks_fire_in_schedule_order(pipe):
    calls = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: calls.append(n)) for name, m, _ in pipe.blocks()]
    try:
        image = np.zeros((pipe.config.height, pipe.config.width, 3), np.uint8)
        session = pipe.start(image)
        per_session = list(calls)
        calls.clear()
        session.step("up")
        per_frame = list(calls)
    finally:
        for h in handles:
            h.remove()
    schedule = pipe.schedule()
    assert per_session == _expand(e for e in schedule if e.per == "session")
    assert per_frame == _expand(e for e in schedule if e.per == "latent_frame")
