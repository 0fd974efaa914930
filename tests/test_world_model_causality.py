"""Causality: KV-cached generation equals full frame-causal recomputation over the same window."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.world_model import PRESETS, KVCache, WorldModelPipeline
from pipelines.world_model.reference import reference_forward, reference_rollout

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CONFIG = PRESETS["tiny"].replace(kv_dtype="fp32", context_frames=6)
TOL = 1e-5  # fp32; a cached pass and a recomputation differ only in summation order


@pytest.fixture(scope="module")
def pipe():
    return WorldModelPipeline.from_config(CONFIG, seed=1)


def _latents(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, CONFIG.latent_channels, CONFIG.latent_height, CONFIG.latent_width, generator=g)


@torch.no_grad()
def _cached_velocity(dit, past, past_actions, x, t, action):
    cache = KVCache(CONFIG)
    for i in range(past.shape[1]):
        cache.begin_write(i)
        dit(past[:, i], torch.zeros(1), torch.tensor([past_actions[i]]), cache, output=False)
        cache.end_write()
    return dit(x, torch.tensor([t]), torch.tensor([action]), cache)


@settings(max_examples=12, deadline=None)
@given(n_past=st.integers(1, CONFIG.context_frames), t=st.floats(0.05, 1.0),
       actions=st.lists(st.integers(0, 10), min_size=CONFIG.context_frames + 1, max_size=CONFIG.context_frames + 1),
       seed=st.integers(0, 2**16))
def test_cached_pass_equals_recomputation(pipe, n_past, t, actions, seed):
    frames = _latents(n_past + 1, seed)
    past, x = frames[:, :n_past], frames[:, n_past]
    cached = _cached_velocity(pipe.dit, past, actions, x, t, actions[n_past])
    times = torch.tensor([[0.0] * n_past + [t]])
    with torch.no_grad():
        full = reference_forward(pipe.dit, frames, times, torch.tensor([actions[: n_past + 1]]),
                                 list(range(n_past + 1)))
    torch.testing.assert_close(cached, full[:, -1], atol=TOL, rtol=TOL)


def test_rollout_equals_recomputed_rollout_within_context(pipe):
    image = np.random.default_rng(0).integers(0, 256, (CONFIG.height, CONFIG.width, 3), dtype=np.uint8)
    actions = [1, 9, 3, 0, 10]  # 5 generated + anchor = 6 = context_frames: nothing evicted
    session = pipe.start(image, seed=5)
    cached = []
    for a in actions:
        session.step(a)
        cached.append(session.last_latent)
    for got, want in zip(cached, reference_rollout(pipe, image, actions, seed=5), strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_past_frames_do_not_see_future_frames(pipe):
    frames = _latents(4, seed=2)
    changed = frames.clone()
    changed[:, 3] += 1.0
    args = (torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long), [0, 1, 2, 3])
    with torch.no_grad():
        a = reference_forward(pipe.dit, frames, *args)
        b = reference_forward(pipe.dit, changed, *args)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=0, rtol=0)
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_the_new_frame_depends_on_the_cached_past(pipe):
    frames = _latents(3, seed=4)
    other = frames.clone()
    other[:, 1] = -other[:, 1]
    a = _cached_velocity(pipe.dit, frames[:, :2], [0, 1], frames[:, 2], 0.5, 2)
    b = _cached_velocity(pipe.dit, other[:, :2], [0, 1], frames[:, 2], 0.5, 2)
    assert (a - b).abs().max() > 1e-3
