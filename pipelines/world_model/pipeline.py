"""WorldModelPipeline: the VAE and the causal DiT as one nn.Module, plus its schedule and blocks.

Plain PyTorch: a runtime attaches from outside with hooks on its blocks, whose names are module paths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.world_model.config import WorldModelConfig, get_config
from pipelines.world_model.dit import CausalDiT, TemporalMixer
from pipelines.world_model.pretrained import load_pretrained, save_pretrained
from pipelines.world_model.schedule import ScheduleEntry, build_schedule
from pipelines.world_model.session import Session, image_to_tensor
from pipelines.world_model.vae import VAE
from residency.errors import ResidencyError


class WorldModelPipeline(nn.Module):
    """The world model as one nn.Module: a VAE and a causal DiT, run a latent frame at a time."""
    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = config
        self.vae = VAE(config)
        self.dit = CausalDiT(config)

    @classmethod
    def from_config(
        cls,
        name_or_config: str | WorldModelConfig | dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> WorldModelPipeline:
        """Random weights drawn from `seed` (CPU generator: identical on every device).

        device="meta" allocates nothing: for counting parameters, bytes and FLOPs.
        """
        config = get_config(name_or_config)
        device = torch.device(device)
        with torch.device("meta"):
            pipe = cls(config).to(dtype)
        if device.type != "meta":
            pipe.to_empty(device=device)
            pipe.init_weights(seed)
        return pipe.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> WorldModelPipeline:
        """Load a directory (config.json + model.safetensors) or a .gguf/.safetensors file."""
        return load_pretrained(cls, path, device, dtype)

    def save_pretrained(self, path: str | os.PathLike[str], format: str | Mapping[str, str] = "F32") -> Path:
        """Write a directory (config.json + model.safetensors), or one .gguf/.safetensors file."""
        return save_pretrained(self, path, format)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales and gates 1, biases 0."""
        generator = torch.Generator().manual_seed(seed)
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                std = 1.0 if id(param) in embeddings else 1.0 / math.sqrt(param[0].numel())
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (after to_empty or a meta-device load)."""
        self.dit.patch_embed.init_buffers()

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (all parameters are expected on one)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter (the pipeline's compute dtype)."""
        return next(self.parameters()).dtype

    def start(self, image: np.ndarray | torch.Tensor, seed: int = 0) -> Session:
        """Encode the start image (HxWx3 uint8, exactly the config's size) and cache it as the anchor."""
        if self.device.type == "meta":
            raise ResidencyError("this pipeline was built on the meta device and holds no weights",
                                 hint="build it with device='cpu' (or a GPU), or load a checkpoint")
        return Session(self, image_to_tensor(image, self.config.height, self.config.width), seed)

    # --- structure, for planners and runtimes ---
    def blocks(self) -> list[tuple[str, nn.Module, str]]:
        """(qualified name, module, component) of every unit of residency, in execution order.

        Together they own every parameter of the pipeline exactly once. Each name is the module's path
        (`self.get_submodule(name)`), so a runtime finds the blocks without this method too.
        """
        out = [(f"vae.encoder.blocks.{i}", b, "encoder") for i, b in enumerate(self.vae.encoder.blocks)]
        out += [(f"dit.{n}", self.dit.get_submodule(n), "dit") for n in self.dit.block_names()]
        out += [(f"vae.decoder.blocks.{i}", b, "decoder") for i, b in enumerate(self.vae.decoder.blocks)]
        return out

    def schedule(self) -> list[ScheduleEntry]:
        """The calls of each component per session and per latent frame, in run order."""
        names = {component: [n for n, _, c in self.blocks() if c == component]
                 for component in ("encoder", "dit", "decoder")}
        no_output = [f"dit.{n}" for n in self.dit.block_names(output=False)]
        return build_schedule(self.config, names["encoder"], names["dit"], no_output, names["decoder"])

    def param_counts(self) -> dict[str, int]:
        """Parameters per part; dit_temporal is the temporal-mixing modules, dit_image the rest."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        temporal = sum(count(m) for m in self.dit.modules() if isinstance(m, TemporalMixer))
        counts = {
            "encoder": count(self.vae.encoder),
            "decoder": count(self.vae.decoder),
            "dit_image": count(self.dit) - temporal,
            "dit_temporal": temporal,
        }
        counts["total"] = sum(counts.values())
        return counts
