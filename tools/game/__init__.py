"""A procedural 2D game (numpy) whose play the shipped world model was trained on.

engine.py: layout, state, step, render, the character detector. play.py: random play, datasets.
"""

from tools.game.engine import SIZE, State, character_centroid, new_game, render, step
from tools.game.play import dataset, play, policy, replay

__all__ = ["SIZE", "State", "character_centroid", "dataset", "new_game", "play", "policy", "render", "replay", "step"]
