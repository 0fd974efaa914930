"""The KV cache: bounded slots, the anchor kept, the oldest intermediate frame evicted first."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.world_model import PRESETS, KVCache, WorldModelPipeline

pytestmark = pytest.mark.usefixtures("one_compute_thread")

# One token per frame, one block, one step: 100 frames in well under a second.
MICRO = PRESETS["tiny"].replace(
    name="micro", height=16, width=16, vae_channels=(8, 8, 8, 8), latent_channels=4,
    dim=32, depth=1, heads=2, steps=1, context_frames=4, kv_dtype="fp32",
)


def expected_window(frames_written: int, slots: int) -> list[int]:
    """Anchor 0 plus the most recent slots-1 frames of 1..frames_written-1."""
    last = frames_written - 1
    return [0] + list(range(max(1, last - slots + 2), last + 1))


@settings(max_examples=40, deadline=None)
@given(slots=st.integers(2, 9), frames=st.integers(1, 60))
def test_window_is_anchor_plus_most_recent_frames(slots, frames):
    cache = KVCache(PRESETS["tiny"].replace(context_frames=slots, depth=1), device="meta")
    for frame in range(frames):
        cache.begin_write(frame)
        cache.end_write()
        assert cache.count <= slots
    assert cache.window() == expected_window(frames, slots)


def test_eviction_order_is_oldest_intermediate_first():
    cache = KVCache(PRESETS["tiny"].replace(context_frames=4, depth=1), device="meta")
    evicted = []
    for frame in range(10):
        before = set(cache.window())
        cache.begin_write(frame)
        cache.end_write()
        evicted += sorted(before - set(cache.window()))
    assert evicted == [1, 2, 3, 4, 5, 6]


def test_session_cache_never_exceeds_its_slots_over_100_frames():
    pipe = WorldModelPipeline.from_config(MICRO)
    session = pipe.start(np.zeros((16, 16, 3), np.uint8))
    for i in range(100):
        session.step(i % len(MICRO.actions))
        assert session.cache.count <= MICRO.context_frames
        assert len(session.window()) <= MICRO.context_frames
    assert session.window() == [0, 98, 99, 100]


def test_anchor_slot_keeps_the_start_frame_keys():
    pipe = WorldModelPipeline.from_config(MICRO)
    session = pipe.start(np.full((16, 16, 3), 200, np.uint8))
    anchor_keys = session.cache.keys[0][:, :, 0].clone()
    for _ in range(20):
        session.step("up")
    assert torch.equal(session.cache.keys[0][:, :, 0], anchor_keys)


def test_reset_keeps_only_the_anchor():
    pipe = WorldModelPipeline.from_config(MICRO)
    session = pipe.start(np.zeros((16, 16, 3), np.uint8))
    for _ in range(7):
        session.step("left")
    session.reset()
    assert session.window() == [0] and session.frame_index == 0


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp16", "fp8"])
def test_allocated_bytes_equal_the_config_formula(kv_dtype):
    config = PRESETS["tiny"].replace(kv_dtype=kv_dtype)
    assert KVCache(config, batch=2, device="meta").nbytes == config.kv_cache_bytes(batch=2)


def test_fp8_storage_generates_finite_frames():
    pipe = WorldModelPipeline.from_config(MICRO.replace(kv_dtype="fp8"))
    session = pipe.start(np.zeros((16, 16, 3), np.uint8))
    for _ in range(6):
        session.step("jump")
    assert session.cache.keys[0].dtype == torch.float8_e4m3fn
    assert torch.isfinite(session.last_latent).all()


def _fill(session, frames: int) -> None:
    for i in range(frames):
        session.step(i % len(MICRO.actions))


class _Fail(Exception):
    pass


def _fail_mid_commit(session):
    """Run a step whose commit pass fails after the first block stored its K/V (the window is full)."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == MICRO.steps + 1:  # the denoise calls, then the commit's
            raise _Fail
    handle = session.pipe.dit.blocks[0].register_forward_hook(hook)
    try:
        with pytest.raises(_Fail):
            session.step("up")
    finally:
        handle.remove()


def test_restore_undoes_a_commit_that_overwrote_the_oldest_slot():
    pipe = WorldModelPipeline.from_config(MICRO)
    session = pipe.start(np.zeros((16, 16, 3), np.uint8))
    _fill(session, 2 * MICRO.context_frames)  # the window is full: a commit overwrites a held frame
    keys = [k.clone() for k in session.cache.keys]
    window, current = session.window(), session.cache.current_frame
    snap = session.cache.snapshot()
    _fail_mid_commit(session)
    assert not all(torch.equal(a, b) for a, b in zip(keys, session.cache.keys, strict=True))
    session.cache.restore(snap)
    assert all(torch.equal(a, b) for a, b in zip(keys, session.cache.keys, strict=True))
    assert session.window() == window and session.cache.current_frame == current


def test_only_the_latest_snapshot_restores_a_slot():
    pipe = WorldModelPipeline.from_config(MICRO)
    session = pipe.start(np.zeros((16, 16, 3), np.uint8))
    _fill(session, 2 * MICRO.context_frames)
    older = session.cache.snapshot()
    session.cache.snapshot()  # reuses the backup the older one relied on
    with pytest.raises(ValueError, match="latest"):
        session.cache.restore(older)
