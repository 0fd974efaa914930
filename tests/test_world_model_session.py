"""Sessions: frames out of actions, reproducible from a seed, and clear errors on bad input."""

import numpy as np
import pytest
import torch

from pipelines.world_model import PRESETS, WorldModelPipeline
from residency.errors import ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def pipe():
    return WorldModelPipeline.from_config("tiny")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 256, (CONFIG.height, CONFIG.width, 3), dtype=np.uint8)


def _rollout(pipe, image, actions, seed=0):
    session = pipe.start(image, seed=seed)
    return np.stack([session.step(a) for a in actions])


def test_step_returns_uint8_video_frames(pipe, image):
    frames = pipe.start(image).step("up")
    assert frames.shape == (CONFIG.temporal_compression, CONFIG.height, CONFIG.width, 3)
    assert frames.dtype == np.uint8


def test_same_seed_gives_identical_frames(pipe, image):
    actions = ["up", "jump", "left", "idle"]
    assert np.array_equal(_rollout(pipe, image, actions, seed=3), _rollout(pipe, image, actions, seed=3))


def test_different_seeds_give_different_frames(pipe, image):
    assert not np.array_equal(_rollout(pipe, image, ["up"], seed=1), _rollout(pipe, image, ["up"], seed=2))


def test_different_actions_give_different_frames(pipe, image):
    frames = {a: _rollout(pipe, image, [a], seed=0)[0] for a in CONFIG.actions}
    for a in CONFIG.actions:
        for b in CONFIG.actions:
            if a < b:
                assert not np.array_equal(frames[a], frames[b]), (a, b)


def test_action_by_name_or_index_is_the_same(pipe, image):
    assert np.array_equal(_rollout(pipe, image, ["down_left", "use"]), _rollout(pipe, image, [7, np.int64(10)]))


def test_reset_replays_the_same_frames(pipe, image):
    session = pipe.start(image, seed=9)
    first = [session.step(a) for a in ("up", "right", "use")]
    session.reset()
    assert session.frame_index == 0
    again = [session.step(a) for a in ("up", "right", "use")]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))


def test_frame_index_counts_latent_frames(pipe, image):
    session = pipe.start(image)
    for _ in range(3):
        session.step("idle")
    assert session.frame_index == 3


def test_torch_image_equals_numpy_image(pipe, image):
    a = pipe.start(image, seed=4).step("up")
    b = pipe.start(torch.from_numpy(image), seed=4).step("up")
    assert np.array_equal(a, b)


def test_bfloat16_pipeline_runs(image):
    session = WorldModelPipeline.from_config("tiny", dtype=torch.bfloat16).start(image)
    assert session.step("right").dtype == np.uint8


@pytest.mark.parametrize("action", ["fly", 11, -1, True, 2.0, None])
def test_unknown_action_lists_the_valid_names(pipe, image, action):
    session = pipe.start(image)
    with pytest.raises(ResidencyError, match="unknown action") as err:
        session.step(action)
    assert all(name in err.value.hint for name in CONFIG.actions)


@pytest.mark.parametrize("shape", [(32, 32, 3), (64, 64, 4), (64, 64), (3, 64, 64)])
def test_wrong_image_size_is_an_error_not_a_resize(pipe, shape):
    with pytest.raises(ResidencyError, match=r"\(64, 64, 3\)") as err:
        pipe.start(np.zeros(shape, np.uint8))
    assert "64x64" in err.value.hint


def test_float_image_is_an_error(pipe):
    with pytest.raises(ResidencyError, match="uint8"):
        pipe.start(np.zeros((64, 64, 3), np.float32))


def test_meta_pipeline_cannot_start():
    pipe = WorldModelPipeline.from_config("tiny", device="meta")
    with pytest.raises(ResidencyError, match="meta"):
        pipe.start(np.zeros((64, 64, 3), np.uint8))


def test_restoring_a_snapshot_replays_the_same_frames(pipe, image):
    """The session's part of residency.runtime.session_protocol: RNG, counters, last latent and cache."""
    session = pipe.start(image, seed=4)
    session.step("up")
    snap = session.snapshot()
    first = [session.step(a) for a in ("left", "jump")]
    session.restore(snap)
    assert session.frame_index == 1
    again = [session.step(a) for a in ("left", "jump")]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_kv_cache_bytes_are_the_caches(pipe, image):
    session = pipe.start(image)
    assert session.kv_cache_bytes == session.cache.nbytes == CONFIG.kv_cache_bytes(batch=1)
