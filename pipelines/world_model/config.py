"""WorldModelConfig: every shape of the world model, its named presets, and its KV-cache size.

Frozen and validated on construction, so a planner can size a model from its config alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from residency.errors import ResidencyError
from residency.formats.dtypes import KV_DTYPE_BYTES, KV_TORCH_DTYPES

# Keyboard vocabulary: 8 directions + idle + two action keys. Index = embedding row.
ACTIONS: tuple[str, ...] = (
    "idle", "up", "down", "left", "right",
    "up_left", "up_right", "down_left", "down_right",
    "jump", "use",
)  # fmt: skip

# The KV dtypes a config may name (fp8: e4m3 at unit scale, |k|,|v| > 448 saturate); pipelines.world_model exports it.
KV_DTYPES: dict[str, torch.dtype] = KV_TORCH_DTYPES


# Sizes a config may ask for, checked before anything is built from it: a config.json that says
# 16384x16384 would otherwise allocate a position table of gigabytes before any other check.
INT_RANGES: dict[str, tuple[int, int]] = {  # field: (smallest, largest)
    "height": (1, 4096), "width": (1, 4096),  # video pixels
    "temporal_compression": (1, 16), "spatial_compression": (1, 64),
    "latent_channels": (1, 1024), "patch_size": (1, 16),
    "dim": (1, 16384), "depth": (1, 256), "heads": (1, 256), "timestep_freq_dim": (1, 16384),
    "steps": (1, 8),  # the few-step sampler
    "context_frames": (1, 1024),
}  # fmt: skip
FLOAT_MAXIMA: dict[str, float] = {"mlp_ratio": 64.0, "rope_theta": 1e12, "timestep_shift": 1000.0}
MAX_VAE_WIDTH = 4096  # channels of one VAE level
MAX_TOKENS_PER_FRAME = 16384
MAX_POSITION_TABLE_VALUES = 2**26  # tokens per frame × dim: 256 MiB of float32 position table
MAX_ACTIONS = 256
MAX_NAME_CHARS = 128
_ACTION_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _field_error(name: str, problem: str, hint: str | None = None) -> ResidencyError:
    return ResidencyError(f"world model config field '{name}': {problem}", hint=hint)


@dataclass(frozen=True)
class WorldModelConfig:
    """Shape, schedule and dtypes of a world model; validated on construction (ResidencyError)."""
    name: str = "custom"  # preset name, informational
    # --- video and VAE ---
    height: int = 64  # video pixels
    width: int = 64  # video pixels
    temporal_compression: int = 1  # video frames per latent frame (the encoder folds them into channels)
    spatial_compression: int = 8  # video pixels per latent pixel, per side; a power of two
    latent_channels: int = 8  # channels of a latent pixel
    vae_channels: tuple[int, ...] = (32, 64, 64, 128)  # encoder widths, full resolution first; decoder mirrors
    # --- causal DiT ---
    patch_size: int = 2  # latent pixels per token, per side
    dim: int = 256  # transformer width
    depth: int = 4  # DiT blocks
    heads: int = 4  # attention heads (spatial and temporal)
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    timestep_freq_dim: int = 256  # sinusoidal features fed to the timestep MLP
    rope_theta: float = 10000.0  # base of the temporal RoPE frequencies
    # --- generation ---
    steps: int = 4  # flow-matching Euler steps per latent frame (1..8)
    timestep_shift: float = 1.0  # SD3-style shift of the timestep grid; 1.0 = uniform
    context_frames: int = 12  # KV slots per block, latent frames: 1 anchor + (context_frames-1) recent
    kv_dtype: str = "bf16"  # KV storage: fp32 | bf16 | fp16 | fp8
    actions: tuple[str, ...] = ACTIONS  # keyboard vocabulary; must contain "idle" (the anchor's action)

    # --- derived (not serialized) ---
    frames_per_step: int = field(init=False)  # video frames produced per latent frame (= temporal_compression)
    latent_height: int = field(init=False)  # latent pixels
    latent_width: int = field(init=False)  # latent pixels
    grid_height: int = field(init=False)  # tokens per column
    grid_width: int = field(init=False)  # tokens per row
    tokens_per_frame: int = field(init=False)  # tokens per latent frame
    patch_dim: int = field(init=False)  # latent values per token
    head_dim: int = field(init=False)  # channels per head
    mlp_hidden: int = field(init=False)  # MLP hidden width
    vae_levels: int = field(init=False)  # 2x down/up-samplings in the VAE

    def __post_init__(self) -> None:
        self._validate()
        derived = {
            "frames_per_step": self.temporal_compression,
            "latent_height": self.height // self.spatial_compression,
            "latent_width": self.width // self.spatial_compression,
            "head_dim": self.dim // self.heads,
            "mlp_hidden": int(round(self.dim * self.mlp_ratio)),
            "patch_dim": self.latent_channels * self.patch_size**2,
            "vae_levels": int(math.log2(self.spatial_compression)),
        }
        derived["grid_height"] = derived["latent_height"] // self.patch_size
        derived["grid_width"] = derived["latent_width"] // self.patch_size
        derived["tokens_per_frame"] = derived["grid_height"] * derived["grid_width"]
        for key, value in derived.items():
            object.__setattr__(self, key, value)

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_CHARS:
            raise _field_error("name", f"expected a name of 1 to {MAX_NAME_CHARS} characters, "
                               f"got {_shown(self.name)}")
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _field_error(name, f"expected an int, got {type(value).__name__} {_shown(value)}")
            if value <= 0:
                raise _field_error(name, f"must be positive, got {_shown(value)}")
            if not low <= value <= high:
                raise _field_error(name, f"must be from {low} to {high}, got {_shown(value)}")
        for name, high in FLOAT_MAXIMA.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
                raise _field_error(name, f"expected a finite number above 0 and at most {high:g}, "
                                   f"got {_shown(value)}")
        s = self.spatial_compression
        if s & (s - 1):
            raise _field_error("spatial_compression", f"must be a power of two, got {s}", hint="use 8 or 16")
        for side in ("height", "width"):
            if getattr(self, side) % (s * self.patch_size):
                raise _field_error(
                    side, f"{getattr(self, side)} is not a multiple of spatial_compression × patch_size = "
                    f"{s * self.patch_size}", hint="pick a video size the latent grid divides into whole tokens")
        for name in ("vae_channels", "actions"):
            if not isinstance(getattr(self, name), tuple | list):
                raise _field_error(name, f"expected a list, got {type(getattr(self, name)).__name__}")
        levels = int(math.log2(s))
        if len(self.vae_channels) != levels + 1:
            raise _field_error("vae_channels", f"needs log2(spatial_compression)+1 = {levels + 1} widths, "
                               f"got {len(self.vae_channels)}")
        for width in self.vae_channels:
            if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= MAX_VAE_WIDTH or width % 8:
                raise _field_error("vae_channels", f"widths must be multiples of 8 (GroupNorm of 8 groups) from 8 "
                                   f"to {MAX_VAE_WIDTH}, got {_shown(width)}")
        if self.dim % self.heads:
            raise _field_error("heads", f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise _field_error("heads", f"head_dim {self.dim // self.heads} must be even for RoPE")
        if self.context_frames < 2:
            raise _field_error("context_frames", f"needs the anchor plus at least one recent frame, got "
                               f"{self.context_frames}")
        tokens = (self.height // (s * self.patch_size)) * (self.width // (s * self.patch_size))
        if tokens > MAX_TOKENS_PER_FRAME or tokens * self.dim > MAX_POSITION_TABLE_VALUES:
            raise _field_error("height", f"{self.height}x{self.width} video makes {tokens} tokens per frame of "
                               f"width {self.dim}: more than this model family sizes ({MAX_TOKENS_PER_FRAME} "
                               f"tokens, {MAX_POSITION_TABLE_VALUES} position-table values)",
                               hint="a smaller video, or a larger spatial_compression or patch_size")
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_DTYPES:
            raise _field_error("kv_dtype", f"unknown KV storage dtype {self.kv_dtype!r}",
                               hint=f"one of {', '.join(KV_DTYPES)}")
        if not 0 < len(self.actions) <= MAX_ACTIONS or any(
                not isinstance(a, str) or not _ACTION_RE.fullmatch(a) for a in self.actions):
            raise _field_error("actions", f"must be a list of 1 to {MAX_ACTIONS} names, each lower-case letters, "
                               f"digits and _ (a script writes them as right*8,up*4), got {_shown(self.actions)}")
        if len(set(self.actions)) != len(self.actions):
            raise _field_error("actions", "names must be unique")
        if "idle" not in self.actions:
            raise _field_error("actions", "must contain 'idle' (the action the start image is cached with)")

    # --- sizes ---
    @property
    def kv_storage_dtype(self) -> torch.dtype:
        """The torch dtype the KV cache stores keys and values in."""
        return KV_DTYPES[self.kv_dtype]

    def kv_cache_bytes(self, batch: int = 1) -> int:
        """Bytes of the KV slots of all blocks: K and V, context_frames frames each.

        Excludes the per-pass read scratch (see kv_cache.py), which is activation memory.
        """
        per_frame = self.tokens_per_frame * self.dim * KV_DTYPE_BYTES[self.kv_dtype]
        return self.depth * 2 * batch * self.context_frames * per_frame

    @property
    def action_index(self) -> dict[str, int]:
        """Action name -> its index in `actions`."""
        return {name: i for i, name in enumerate(self.actions)}

    # --- serialization ---
    def to_dict(self) -> dict[str, Any]:
        """The init fields as a JSON-ready dict (tuples as lists); from_dict reads it back."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldModelConfig:
        """A config from a JSON object; missing fields take their defaults.

        Raises ResidencyError for a non-dict, an unknown or derived field, a wrongly typed value, or a
        config that fails validation.
        """
        if not isinstance(data, dict):
            raise ResidencyError(f"world model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                derived = {f.name for f in fields(cls) if not f.init}
                why = "is derived from the other fields" if key in derived else "is not a known field"
                raise _field_error(key, why, hint=f"known fields: {', '.join(known)}")
            default = known[key].default
            if isinstance(default, tuple):
                if not isinstance(value, list | tuple):
                    raise _field_error(key, f"expected a list, got {type(value).__name__}")
                value = tuple(value)
            elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value) if abs(value) <= 2**53 else value  # a larger int is refused, not overflowed
            elif isinstance(value, bool) or not isinstance(value, type(default)):
                raise _field_error(key, f"expected {type(default).__name__}, got {type(value).__name__} {value!r}")
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> WorldModelConfig:
        """A copy with `changes` applied, validated again (ResidencyError)."""
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """Serialized fields plus the derived ones (for reports, not for from_dict)."""
        return asdict(self)


# Named presets. The large two share depth and width; 800m only fattens the MLP.
PRESETS: dict[str, WorldModelConfig] = {
    # 64x64 video, 8x8 latent, 16 tokens/frame: fast enough for tests and CPU demos.
    "tiny": WorldModelConfig(name="tiny"),
    # 352x640 video, 16x spatial + 4x temporal VAE -> 22x40x32 latent, 220 tokens/frame.
    "lucid-500m": WorldModelConfig(
        name="lucid-500m", height=352, width=640, temporal_compression=4, spatial_compression=16,
        latent_channels=32, vae_channels=(64, 128, 192, 192, 192), patch_size=2,
        dim=1024, depth=22, heads=16, mlp_ratio=4.0, context_frames=12, steps=4, kv_dtype="bf16",
    ),
    "lucid-800m": WorldModelConfig(
        name="lucid-800m", height=352, width=640, temporal_compression=4, spatial_compression=16,
        latent_channels=32, vae_channels=(64, 128, 192, 192, 192), patch_size=2,
        dim=1024, depth=22, heads=16, mlp_ratio=10.125, context_frames=12, steps=4, kv_dtype="bf16",
    ),
}


def get_config(name_or_config: str | WorldModelConfig | dict[str, Any]) -> WorldModelConfig:
    """A preset by name, a config built from a dict, or the config given.

    Raises ResidencyError for an unknown preset name or an invalid dict.
    """
    if isinstance(name_or_config, WorldModelConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return WorldModelConfig.from_dict(name_or_config)
    if name_or_config not in PRESETS:
        raise ResidencyError(f"unknown world model config {name_or_config!r}",
                             hint=f"one of {', '.join(PRESETS)}, or pass a WorldModelConfig")
    return PRESETS[name_or_config]
