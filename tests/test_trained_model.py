"""The shipped world model, measured on held-out start images against the real game.

Control: the character moves the pressed way. Fidelity: frames match the game and the character
stays. Precision: Q8_0 and Q4_K weights cost little against the shipped BF16 ones. Rollouts are
shared per module (a 32-step rollout is ~1-3 s on 2 CPU cores).
"""

from functools import cache

import numpy as np
import pytest

from pipelines.world_model.trained import load_default, sensitivity
from residency.formats.dtypes import KV_DTYPE_BYTES
from residency.simulate.quality import KV_SENSITIVITY_KEY
from tools.evaluate_world_model import (
    CONTROL_STARTS,
    CONTROL_STEPS,
    FIDELITY_STARTS,
    LONG_STARTS,
    cases,
    control,
    fidelity_pairs,
    missing_frames,
    pairs_psnr,
)
from tools.game import replay


@cache
def _pipe():
    return load_default()


@cache
def _cases():
    return cases()


@cache
def _fidelity_rollouts(fmt: str = "BF16"):
    return fidelity_pairs(_pipe(), _cases()[:FIDELITY_STARTS], fmt=fmt)


def test_start_images_are_held_out_layouts_of_the_game():
    for image, seed in _cases():
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image, replay(seed, [])[0])


def test_the_shipped_model_fits_the_size_budget():
    from pipelines.world_model.trained import DEFAULT_DIR

    assert (DEFAULT_DIR / "model.safetensors").stat().st_size <= 25 * 1024 * 1024


# The targets, asserted. Measured on the shipped model (40 min of CPU training) by
# tools/evaluate_world_model.py: control 90/96 = 93.8%, 20.40 dB, no frame lost, Q8_0 −0.01 dB, Q4_K −0.07 dB.
def test_character_moves_in_the_pressed_direction_in_90_percent_of_steps():
    hits, counted = control(_pipe(), _cases()[:CONTROL_STARTS], CONTROL_STEPS)
    assert counted >= CONTROL_STARTS * CONTROL_STEPS // 2
    assert hits / counted >= 0.9, f"moved the pressed way in {hits}/{counted} steps"


def test_rollouts_match_the_real_game_at_20_db_over_8_latent_frames():
    value = pairs_psnr(_fidelity_rollouts())
    assert value >= 20.0, f"PSNR {value:.2f} dB"


def test_the_character_is_detected_in_every_frame_of_64_step_rollouts():
    missing = missing_frames(_pipe(), _cases()[:LONG_STARTS])
    assert not any(missing.values()), f"frames without the character, per start: {missing}"


@pytest.mark.parametrize(("fmt", "max_loss_db"), [("Q8_0", 0.5), ("Q4_K", 2.0)])
def test_quantized_weights_lose_little_psnr_against_bf16(fmt, max_loss_db):
    loss = pairs_psnr(_fidelity_rollouts("BF16")) - pairs_psnr(_fidelity_rollouts(fmt))
    assert loss <= max_loss_db, f"{fmt} loses {loss:.2f} dB"


def test_sensitivity_table_covers_every_block_and_format():
    table = dict(sensitivity())
    kv = table.pop(KV_SENSITIVITY_KEY)
    blocks = [name for name, _, _ in _pipe().blocks()]
    assert sorted(table) == sorted(blocks)
    for row in table.values():
        assert set(row) == {"BF16", "FP8", "Q8_0", "Q6_K", "Q5_K", "Q4_K"}
        assert all(v >= 0.0 for v in row.values())
        assert row["BF16"] == 0.0  # the shipped precision
    # the KV cache's row: every KV dtype, the shipped BF16 cache and fp32 (which holds it) lose nothing, FP8 loses
    # more than fp16 (3 mantissa bits against 10)
    assert set(kv) == set(KV_DTYPE_BYTES)
    assert kv["bf16"] == kv["fp32"] == 0.0
    assert kv["fp8"] > kv["fp16"] >= 0.0
