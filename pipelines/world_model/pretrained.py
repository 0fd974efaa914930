"""save_pretrained / from_pretrained: the pipeline's weights and config through residency.checkpoint.

A directory holds config.json + model.safetensors; a single .gguf (or .safetensors) file
carries the config JSON in its metadata key `residency.config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from pipelines.world_model.config import WorldModelConfig
from residency import userpath
from residency.atomic_file import atomic_output
from residency.checkpoint import open_checkpoint, save_checkpoint
from residency.errors import ResidencyError
from residency.jsonfile import read_json

CONFIG_KEY = "residency.config"  # checkpoint metadata key holding the config JSON
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(pipe, path: str | os.PathLike[str], format: str | Mapping[str, str] = "F32") -> Path:
    """Write `pipe` to `path`: a .gguf/.safetensors file, or else a directory (created if needed).

    `format` is a residency storage format for every tensor ("F32", "BF16", "Q8_0", …) or a
    {tensor name: format} mapping with a "*" default; tensors a quantized format cannot hold
    (norms, biases, 3x3 convs) fall back to F32. Cost: the packed checkpoint is held in memory.
    """
    path = Path(os.fspath(path))
    config_json = json.dumps(pipe.config.to_dict(), indent=2)
    tensors = {name: t.detach().cpu() for name, t in pipe.state_dict().items()}
    metadata = {CONFIG_KEY: config_json}
    if path.suffix.lower() in (".gguf", ".safetensors"):
        return save_checkpoint(path, tensors, formats=format, metadata=metadata)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResidencyError(f"{path}: cannot create the pipeline directory ({e.strerror or e})",
                             hint="pick a writable place, or a .safetensors/.gguf file name") from None
    save_checkpoint(path / WEIGHTS_FILE, tensors, formats=format, metadata=metadata)
    with atomic_output(path / CONFIG_FILE) as tmp:  # a kill leaves the old config.json or the new one
        tmp.write_text(config_json + "\n")
    return path


def load_config(path: Path, metadata: Mapping[str, str]) -> WorldModelConfig:
    """The config beside the weights (config.json) or in their metadata, every field checked before use.

    Errors name the file (or metadata key), the field and the value.
    """
    config_file = path / CONFIG_FILE
    hint = "write the pipeline with WorldModelPipeline.save_pretrained, or fix the field named"
    if userpath.path_kind(path)[0] == userpath.DIRECTORY and userpath.exists(config_file):
        source = str(config_file)
        data = read_json(config_file, "a world model config", hint)
    elif CONFIG_KEY in metadata:
        source = f"{path} metadata key {CONFIG_KEY!r}"
        try:
            data = json.loads(metadata[CONFIG_KEY])
        except (ValueError, RecursionError) as e:  # also too deep a nesting, or an int of 5,000 digits
            raise ResidencyError(f"{source}: config is not valid JSON ({str(e)[:200]})", hint=hint) from None
    else:
        raise ResidencyError(f"{path}: no world model config found",
                             hint=f"expected {CONFIG_FILE} beside the weights or a {CONFIG_KEY!r} metadata key")
    try:
        return WorldModelConfig.from_dict(data)
    except ResidencyError as e:
        raise ResidencyError(f"{source}: {e.message}", hint=e.hint or hint) from None


def load_pretrained(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """Build `cls` on the meta device and assign dequantized tensors: no random init, one copy each."""
    path = Path(os.fspath(path))
    weights = path
    if userpath.path_kind(path)[0] == userpath.DIRECTORY and userpath.exists(path / WEIGHTS_FILE):
        weights = path / WEIGHTS_FILE  # as save_pretrained writes it; else the directory's shards, whatever named
    with open_checkpoint(weights) as checkpoint:
        config = load_config(path, checkpoint.metadata)
        with torch.device("meta"):
            pipe = cls(config)
        expected = set(pipe.state_dict())
        missing, unexpected = sorted(expected - set(checkpoint.entries)), sorted(set(checkpoint.entries) - expected)
        if missing or unexpected:
            raise ResidencyError(
                f"{weights}: tensors do not match config {config.name!r}: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}",
                hint="the checkpoint was written for another config or model",
            )
        state = {}
        for name, meta_tensor in pipe.state_dict().items():
            entry = checkpoint.entry(name)
            if tuple(entry.shape) != tuple(meta_tensor.shape):
                raise ResidencyError(f"{weights}: tensor {name!r} has shape {tuple(entry.shape)}, the config "
                                     f"needs {tuple(meta_tensor.shape)}",
                                     hint=f"the checkpoint was written for another config than {path / 'config.json'}: "
                                          "save the two together (WorldModelPipeline.save_pretrained)")
            state[name] = checkpoint.read_tensor(name, dtype).to(device)
    pipe.load_state_dict(state, assign=True)
    pipe.init_buffers()
    return pipe.eval()
