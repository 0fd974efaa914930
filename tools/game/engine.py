"""The game the shipped world model learned: a red character walking a 64x64 room, in numpy.

Deterministic given a seed: a layout (walls, floor colours, gems, a lamp) and a start position.
One frame per keyboard action of `pipelines.world_model.config.ACTIONS`; `use` toggles the lamp,
`jump` starts a visible hop (the sprite lifts, a shadow stays on the ground).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipelines.world_model.config import ACTIONS

SIZE = 64  # frame side, pixels
TILE = 8  # wall / floor tile side, pixels
GRID = SIZE // TILE  # tiles per side
SPRITE = 10  # character side, pixels
SPEED = 3  # pixels per frame, per axis (diagonals move 3 on both axes)
HOP = (4, 7, 8, 7, 4)  # sprite lift in pixels on each frame of a hop; len(HOP) frames airborne

CHARACTER_RGB = (230, 40, 40)  # the only strongly red colour of the game: what detectors look for
EYE_RGB = (255, 255, 255)
SHADOW_RGB = (30, 30, 30)
WALL_RGB = ((70, 70, 110), (96, 64, 44), (50, 90, 60))  # one per layout
WALL_EDGE_RGB = (25, 25, 30)
FLOOR_RGB = (  # checker pairs, one per layout
    ((200, 200, 190), (180, 180, 170)),
    ((150, 190, 220), (130, 170, 200)),
    ((190, 220, 160), (170, 200, 140)),
    ((220, 200, 230), (200, 180, 210)),
)
GEM_RGB = ((40, 180, 60), (40, 90, 220), (250, 170, 20))
LAMP_ON_RGB = (255, 235, 80)
LAMP_OFF_RGB = (60, 50, 40)
LAMP_FRAME_RGB = (20, 20, 20)

DIRECTIONS: dict[str, tuple[int, int]] = {  # action -> (dx, dy) in screen axes (y down)
    "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0),
    "up_left": (-1, -1), "up_right": (1, -1), "down_left": (-1, 1), "down_right": (1, 1),
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    walls: np.ndarray  # (GRID, GRID) bool, True = wall tile
    floor: int  # index into FLOOR_RGB
    wall: int  # index into WALL_RGB
    gems: tuple[tuple[int, int, int], ...]  # (x, y, colour index) of 4x4 gems, pixels
    lamp: tuple[int, int]  # top-left of the 6x6 lamp, pixels


@dataclass(frozen=True)
class State:
    layout: Layout
    x: int  # character's top-left, pixels
    y: int  # character's top-left, pixels (on the ground, not lifted by a hop)
    hop: int = 0  # frames into the current hop; 0 = on the ground
    lamp_on: bool = False


def _blocked(walls: np.ndarray, x: int, y: int) -> bool:
    if x < 0 or y < 0 or x + SPRITE > SIZE or y + SPRITE > SIZE:
        return True
    tiles = walls[y // TILE : (y + SPRITE - 1) // TILE + 1, x // TILE : (x + SPRITE - 1) // TILE + 1]
    return bool(tiles.any())


def new_game(seed: int) -> State:
    """A random layout and start state; the same seed gives the same game."""
    rng = np.random.default_rng(seed)
    walls = np.zeros((GRID, GRID), dtype=bool)
    for _ in range(rng.integers(2, 4)):  # short wall segments, 2-3 tiles long
        length = int(rng.integers(2, 4))
        if rng.random() < 0.5:
            r, c = int(rng.integers(1, GRID - 1)), int(rng.integers(0, GRID - length + 1))
            walls[r, c : c + length] = True
        else:
            r, c = int(rng.integers(0, GRID - length + 1)), int(rng.integers(1, GRID - 1))
            walls[r : r + length, c] = True
    free = [(r, c) for r in range(GRID) for c in range(GRID) if not walls[r, c]]
    picks = rng.choice(len(free), size=4, replace=False)
    gems = tuple((free[i][1] * TILE + 2, free[i][0] * TILE + 2, int(rng.integers(len(GEM_RGB)))) for i in picks[:3])
    lamp = (free[picks[3]][1] * TILE + 1, free[picks[3]][0] * TILE + 1)
    layout = Layout(walls, int(rng.integers(len(FLOOR_RGB))), int(rng.integers(len(WALL_RGB))), gems, lamp)
    while True:
        x, y = int(rng.integers(0, SIZE - SPRITE + 1)), int(rng.integers(0, SIZE - SPRITE + 1))
        if not _blocked(walls, x, y):
            return State(layout, x, y, 0, bool(rng.random() < 0.5))


def can_move(state: State, action: str) -> bool:
    """Whether a direction action would move the character at all (sliding along walls counts)."""
    if action not in DIRECTIONS:
        return False
    moved = step(state, action)
    return (moved.x, moved.y) != (state.x, state.y)


def step(state: State, action: str | int) -> State:
    """The next state after one frame with `action` held."""
    name = ACTIONS[action] if isinstance(action, int | np.integer) else action
    if name not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    s = state
    hop = s.hop + 1 if s.hop else 0
    if hop > len(HOP):
        hop = 0
    if name == "jump" and s.hop == 0:
        hop = 1
    lamp_on = not s.lamp_on if name == "use" else s.lamp_on
    x, y = s.x, s.y
    if name in DIRECTIONS:
        dx, dy = DIRECTIONS[name]
        walls = s.layout.walls
        for cx, cy in ((x + dx * SPEED, y + dy * SPEED), (x + dx * SPEED, y), (x, y + dy * SPEED)):
            if (cx, cy) != (x, y) and not _blocked(walls, cx, cy):
                x, y = cx, cy
                break
    return replace(s, x=x, y=y, hop=hop, lamp_on=lamp_on)


def _fill(img: np.ndarray, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, SIZE), min(y + h, SIZE)
    if x1 > x0 and y1 > y0:
        img[y0:y1, x0:x1] = rgb


def render_background(layout: Layout, lamp_on: bool) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    light, dark = FLOOR_RGB[layout.floor]
    checker = (np.add.outer(np.arange(GRID), np.arange(GRID)) % 2).astype(bool)
    tiles = np.where(checker[..., None], np.array(dark, np.uint8), np.array(light, np.uint8))
    img[:] = tiles.repeat(TILE, 0).repeat(TILE, 1)
    for r, c in zip(*np.nonzero(layout.walls), strict=True):
        _fill(img, c * TILE, r * TILE, TILE, TILE, WALL_EDGE_RGB)
        _fill(img, c * TILE + 1, r * TILE + 1, TILE - 2, TILE - 2, WALL_RGB[layout.wall])
    for gx, gy, colour in layout.gems:
        _fill(img, gx, gy, 4, 4, GEM_RGB[colour])
    lx, ly = layout.lamp
    _fill(img, lx, ly, 6, 6, LAMP_FRAME_RGB)
    _fill(img, lx + 1, ly + 1, 4, 4, LAMP_ON_RGB if lamp_on else LAMP_OFF_RGB)
    return img


def render(state: State) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 RGB frame of `state`."""
    img = render_background(state.layout, state.lamp_on)
    lift = min(HOP[state.hop - 1], state.y) if state.hop else 0  # never lifted off the top edge
    if lift:
        _fill(img, state.x + 1, state.y + SPRITE - 3, SPRITE - 2, 3, SHADOW_RGB)
    x, y = state.x, state.y - lift
    _fill(img, x, y, SPRITE, SPRITE, CHARACTER_RGB)
    _fill(img, x + 2, y + 2, 2, 2, EYE_RGB)
    _fill(img, x + 6, y + 2, 2, 2, EYE_RGB)
    return img


def character_mask(frames: np.ndarray) -> np.ndarray:
    """(..., H, W) bool: the character's red pixels in frames (real or decoded), (..., H, W, 3) uint8.

    Thresholds leave room for decoder blur.
    """
    f = frames.astype(np.int16)
    return (f[..., 0] > 150) & (f[..., 1] < 110) & (f[..., 2] < 110) & (f[..., 0] - f[..., 1] > 80)


def character_centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(x, y) centroid of the character's red pixels in a frame, or None if absent.

    12 pixels (an eighth of the sprite) count as present.
    """
    mask = character_mask(frame)
    if mask.sum() < 12:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())
