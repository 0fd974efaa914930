"""The procedural game the shipped world model learned: deterministic, and every key does something visible."""

import numpy as np
import pytest

from pipelines.world_model.config import ACTIONS
from pipelines.world_model.trained.png import read_png, write_png
from tools.game import character_centroid, new_game, play, render, replay, step
from tools.game.engine import HOP, SPEED, can_move


def test_the_same_seed_plays_the_same_episode():
    a_frames, a_actions = play(7, 24)
    b_frames, b_actions = play(7, 24)
    assert np.array_equal(a_frames, b_frames) and np.array_equal(a_actions, b_actions)


def test_different_seeds_give_different_layouts():
    assert not np.array_equal(render(new_game(1)), render(new_game(2)))


def test_replay_reproduces_the_played_frames():
    frames, actions = play(3, 16)
    assert np.array_equal(replay(3, actions), frames)


@pytest.mark.parametrize("action", ["up", "down", "left", "right", "up_left", "down_right"])
def test_a_direction_moves_the_detected_character_that_way(action):
    dx, dy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0),
              "up_left": (-1, -1), "down_right": (1, 1)}[action]
    for seed in range(20):
        state = new_game(seed)
        moved = step(state, action)
        if (moved.x, moved.y) == (state.x + dx * SPEED, state.y + dy * SPEED):
            (x0, y0), (x1, y1) = character_centroid(render(state)), character_centroid(render(moved))
            assert (x1 - x0, y1 - y0) == pytest.approx((dx * SPEED, dy * SPEED))
            return
    pytest.fail("no seed could move freely")


def test_walls_and_edges_stop_the_character():
    state = new_game(0)
    for _ in range(40):
        state = step(state, "left")
    assert not can_move(state, "left")
    assert step(state, "left") == state


def test_use_toggles_the_lamp_and_nothing_else_moves():
    state = new_game(4)
    after = step(state, "use")
    assert after.lamp_on != state.lamp_on and (after.x, after.y) == (state.x, state.y)
    assert not np.array_equal(render(after), render(state))


def test_jump_is_a_visible_hop_that_lands():
    state = new_game(5).__class__(**{**new_game(5).__dict__, "y": 30})
    frames = [render(state)]
    state = step(state, "jump")
    for _ in range(len(HOP) + 1):
        frames.append(render(state))
        state = step(state, "idle")
    ys = [character_centroid(f)[1] for f in frames]
    assert min(ys) < ys[0] - 5 and ys[-1] == ys[0]


def test_random_play_uses_every_key():
    actions = np.concatenate([play(s, 40)[1] for s in range(30)])
    assert set(np.unique(actions)) == set(range(len(ACTIONS)))


def test_png_round_trip(tmp_path):
    image = play(2, 1)[0][-1]
    write_png(tmp_path / "f.png", image)
    assert np.array_equal(read_png(tmp_path / "f.png"), image)
