"""The world model that ships with the package: trained on CPU on the game of tools/game.

Files here: config.json + model.safetensors (BF16), held-out start images (start_*.png, listed
in starts.json with the game seed of each), training.json, and sensitivity.json — the measured
per-block × format loss table a planner reads (PlanRequest.sensitivity).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipelines.world_model.config import PRESETS
from pipelines.world_model.trained.png import read_png
from residency.errors import ResidencyError

DEFAULT_DIR = Path(__file__).resolve().parent
# `tiny` with a slimmer VAE (a third of its FLOPs), which is what made CPU training fit the budget.
GAME_CONFIG = PRESETS["tiny"].replace(name="game-64", vae_channels=(16, 32, 64, 64))


def _require(path: Path) -> Path:
    if not path.exists():
        raise ResidencyError(f"the shipped world model is missing {path.name} in {path.parent}",
                             hint="train it with: .venv/bin/python tools/train_world_model.py")
    return path


def load_default(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, directory: Path = DEFAULT_DIR
):
    """The shipped model as a WorldModelPipeline (BF16 weights, computed in `dtype`)."""
    from pipelines.world_model.pipeline import WorldModelPipeline

    _require(Path(directory) / "model.safetensors")
    return WorldModelPipeline.from_pretrained(directory, device=device, dtype=dtype)


def starts(directory: Path = DEFAULT_DIR) -> list[dict]:
    """[{"file": "start_0.png", "game_seed": 0}, …]: the held-out start images and their game layouts."""
    return json.loads(_require(Path(directory) / "starts.json").read_text())


def start_images(directory: Path = DEFAULT_DIR) -> list[np.ndarray]:
    """The held-out start images, (64, 64, 3) uint8 each (never seen in training)."""
    return [read_png(Path(directory) / s["file"]) for s in starts(directory)]


def sensitivity(directory: Path = DEFAULT_DIR) -> dict[str, dict[str, float]]:
    """{block: {format: loss}} measured by tools/measure_sensitivity.py, for PlanRequest.sensitivity."""
    return json.loads(_require(Path(directory) / "sensitivity.json").read_text())["loss"]
