"""Measure a trained world model against the real game: control, fidelity, long-rollout tracking, precision.

The quality targets of the shipped model, on its held-out start images (tests/test_trained_model.py
asserts them with these functions):
- control: over 32-step rollouts of direction presses, the fraction of steps in which the model's
  character moves the pressed way, counted where the real game's character did move that way;
- fidelity: PSNR of the first 8 latent frames against the real game's, 4 starts, mixed play;
- tracking: frames of 64-step rollouts in which the character is not detected;
- precision: PSNR lost by Q8_0 and Q4_K weights against the shipped BF16 ones.

    .venv/bin/python tools/evaluate_world_model.py [--model DIR] [--json]     # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipelines.world_model.config import ACTIONS  # noqa: E402
from pipelines.world_model.trained import DEFAULT_DIR, load_default, start_images, starts  # noqa: E402
from pipelines.world_model.trained.evaluate import psnr, rollout, stored_as  # noqa: E402
from residency.cli import report  # noqa: E402
from residency.errors import ResidencyError  # noqa: E402
from tools.game import character_centroid, new_game, policy, replay  # noqa: E402
from tools.game.engine import DIRECTIONS  # noqa: E402

CONTROL_STARTS, CONTROL_STEPS = 3, 32
FIDELITY_STARTS, FIDELITY_FRAMES = 4, 8
LONG_STARTS, LONG_STEPS = 2, 64
MOVED_PX = 1.0  # the real game's character moved along the pressed direction by at least this
TARGETS = {"control": 0.90, "psnr_db": 20.0, "missing_frames": 0, "Q8_0_loss_db": 0.5, "Q4_K_loss_db": 2.0}

Case = tuple[np.ndarray, int]  # (start image, game seed)


def cases(directory: Path = DEFAULT_DIR) -> list[Case]:
    """(image, game seed) of each held-out start of the model in `directory`."""
    return list(zip(start_images(directory), [s["game_seed"] for s in starts(directory)], strict=True))


def actions_for(seed: int, steps: int, moves_only: bool = False) -> list[int]:
    return [ACTIONS.index(a) for a in policy(seed, steps, new_game(seed), moves_only=moves_only)]


def control(pipe, starts_: list[Case], steps: int = CONTROL_STEPS) -> tuple[int, int]:
    """(hits, counted): steps where the model moved the pressed way, of those where the game did."""
    hits = counted = 0
    for image, seed in starts_:
        actions = actions_for(seed, steps, moves_only=True)
        model = [character_centroid(f) for f in [image, *rollout(pipe, image, actions)]]
        real = [character_centroid(f) for f in replay(seed, actions)]
        for k, a in enumerate(actions):
            u = np.array(DIRECTIONS[ACTIONS[a]], dtype=float)
            u /= np.linalg.norm(u)
            if np.dot(np.subtract(real[k + 1], real[k]), u) < MOVED_PX:
                continue  # the real game did not move that way (a wall): no claim either way
            counted += 1
            if model[k] is not None and model[k + 1] is not None:
                hits += int(np.dot(np.subtract(model[k + 1], model[k]), u) > 0.5)
    return hits, counted


def fidelity_pairs(pipe, starts_: list[Case], frames: int = FIDELITY_FRAMES, fmt: str = "BF16"):
    """[(model frames, real frames)] over the first `frames` latent frames, mixed play, weights as `fmt`."""
    out = []
    with stored_as([m for _, m, _ in pipe.blocks()], fmt):
        for image, seed in starts_:
            actions = actions_for(seed, frames)
            out.append((rollout(pipe, image, actions), replay(seed, actions)[1:]))
    return out


def pairs_psnr(pairs) -> float:
    return psnr(np.concatenate([m for m, _ in pairs]), np.concatenate([r for _, r in pairs]))


def missing_frames(pipe, starts_: list[Case], steps: int = LONG_STEPS) -> dict[int, list[int]]:
    """{game seed: frames of a `steps`-step rollout without a detected character}."""
    out = {}
    for image, seed in starts_:
        frames = rollout(pipe, image, actions_for(seed, steps))
        out[seed] = [k for k, f in enumerate(frames) if character_centroid(f) is None]
    return out


def evaluate(directory: Path) -> dict:
    pipe = load_default(directory=directory)
    all_cases = cases(directory)
    t0 = time.perf_counter()
    hits, counted = control(pipe, all_cases[:CONTROL_STARTS])
    psnr_db = {f: pairs_psnr(fidelity_pairs(pipe, all_cases[:FIDELITY_STARTS], fmt=f)) for f in ("BF16", "Q8_0", "Q4_K")}
    missing = missing_frames(pipe, all_cases[:LONG_STARTS])
    return {
        "model": str(directory),
        "control": hits / counted, "control_hits": hits, "control_counted": counted,
        "psnr_db": psnr_db["BF16"],
        "missing_frames": sum(len(v) for v in missing.values()), "missing": missing,
        "Q8_0_loss_db": psnr_db["BF16"] - psnr_db["Q8_0"], "Q4_K_loss_db": psnr_db["BF16"] - psnr_db["Q4_K"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _met(key: str, value: float) -> bool:
    return value >= TARGETS[key] if key in ("control", "psnr_db") else value <= TARGETS[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR, help="trained model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        r = evaluate(args.model)
    except ResidencyError as err:  # e.g. a directory without a trained model
        return report(err)
    table = Table(title=f"{args.model} against the real game ({r['seconds']} s)")
    for col in ("measure", "value", "target", "met"):
        table.add_column(col)
    rows = [("control", f"{r['control']:.1%} ({r['control_hits']}/{r['control_counted']})", "≥ 90%"),
            ("psnr_db", f"{r['psnr_db']:.2f} dB", "≥ 20 dB"),
            ("missing_frames", f"{r['missing_frames']} {r['missing']}", "0"),
            ("Q8_0_loss_db", f"{r['Q8_0_loss_db']:+.2f} dB", "≤ 0.5 dB"),
            ("Q4_K_loss_db", f"{r['Q4_K_loss_db']:+.2f} dB", "≤ 2 dB")]
    for key, value, target in rows:
        table.add_row(key, value, target, "yes" if _met(key, r[key]) else "NO")
    Console(stderr=args.json).print(table)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
