"""Random but plausible play: actions held for a few frames, walking away from walls it bumps into.

`play(seed, frames)` gives one (frames, actions) episode; `dataset` stacks many, one layout each.
"""

from __future__ import annotations

import numpy as np

from pipelines.world_model.config import ACTIONS
from tools.game.engine import DIRECTIONS, State, can_move, new_game, render, step

_MOVES = tuple(DIRECTIONS)
_MOVE_P = np.array([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]) / 12.0  # cardinals twice as likely


def policy(seed: int, frames: int, start: State, *, moves_only: bool = False):
    """Yield `frames` action names from `start`, holding each 2-7 frames; jump and use are brief.

    A held direction that no longer moves the character is dropped for one that does, as a
    player would turn at a wall. moves_only=True plays directions only (for control tests).
    """
    rng = np.random.default_rng([seed, 1])
    state, held, left = start, "idle", 0
    for _ in range(frames):
        if left == 0 or (held in DIRECTIONS and not can_move(state, held)):
            roll = rng.random()
            if moves_only or roll < 0.72:
                options = [m for m in _MOVES if can_move(state, m)] or list(_MOVES)
                p = np.array([_MOVE_P[_MOVES.index(m)] for m in options])
                held, left = options[rng.choice(len(options), p=p / p.sum())], int(rng.integers(2, 8))
            elif roll < 0.84:
                held, left = "idle", int(rng.integers(1, 5))
            elif roll < 0.93:
                held, left = "jump", 1
            else:
                held, left = "use", 1
        yield held
        state = step(state, held)
        left -= 1


def play(seed: int, frames: int, *, moves_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """frames+1 RGB frames (the start, then one per action) and `frames` action indices.

    Frame k (k >= 1) is the result of action k-1 applied to frame k-1.
    """
    state = new_game(seed)
    images, actions = [render(state)], []
    for name in policy(seed, frames, state, moves_only=moves_only):
        state = step(state, name)
        images.append(render(state))
        actions.append(ACTIONS.index(name))
    return np.stack(images), np.array(actions, dtype=np.int64)


def replay(seed: int, actions: list[int] | np.ndarray) -> np.ndarray:
    """The real game's frames for a given action sequence from the layout of `seed`: (len+1, H, W, 3)."""
    state = new_game(seed)
    images = [render(state)]
    for a in actions:
        state = step(state, int(a))
        images.append(render(state))
    return np.stack(images)


def dataset(first_seed: int, episodes: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, frames+1, H, W, 3) uint8 and (episodes, frames) int64, seeds first_seed.. in order."""
    pairs = [play(first_seed + i, frames) for i in range(episodes)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
