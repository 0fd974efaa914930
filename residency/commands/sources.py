"""Resolve what a user names on the command line: a checkpoint path or a built-in model.

Built-in models are instantiated on the meta device, so inspecting them costs no memory.
"""

from __future__ import annotations

from pathlib import Path

from residency import userpath
from residency.errors import ResidencyError
from residency.inventory import (
    BlockInfo,
    Inventory,
    TensorInfo,
    group_tensors,
    inventory_from_module,
    inventory_from_named_shapes,
)


def builtin_model_names() -> list[str]:
    from pipelines.world_model import PRESETS

    return list(PRESETS)


def catalog_names() -> list[str]:
    from pipelines.catalog import catalog_paths

    return list(catalog_paths())


def resolve_workload(name_or_path: str, steps: int | None = None, context_frames: int | None = None):
    """A catalog entry by name, or a catalog JSON file by path, at the given generation parameters."""
    from pipelines.catalog import catalog_paths
    from residency.workload import load_workload_file

    paths = catalog_paths()
    if name_or_path in paths:
        workload = load_workload_file(paths[name_or_path])
    elif name_or_path.endswith(".json") and userpath.path_kind(name_or_path)[0] != userpath.MISSING:  # read_json says why it cannot read
        workload = load_workload_file(name_or_path)
    else:
        raise ResidencyError(
            f"unknown model {name_or_path!r}",
            hint="catalog models: " + ", ".join(paths) + "; or a catalog .json file (tools/gen_catalog.py)",
        )
    return workload.with_params(steps=steps, context_frames=context_frames)


def _catalog_inventory(name: str) -> Inventory:
    """A catalog entry's tensors as stored at BF16, grouped by the catalog's own blocks and components.

    Names are prefixed with the block so they read as checkpoint keys; the grouping is taken from the
    catalog, not re-derived from names (a block like `transformer.embed` holds keys with digits in them).
    """
    workload = resolve_workload(name)
    blocks = []
    for b in workload.blocks:
        named = [(f"{b.name}.{n}", shape, "BF16") for n, shape in b.tensors]
        blocks.append(BlockInfo(b.name, b.component, inventory_from_named_shapes(name, named).tensors))
    return Inventory(name, blocks)


def _looks_like_path(text: str) -> bool:
    return any(sep in text for sep in ("/", "\\")) or text.endswith((".safetensors", ".gguf")) or userpath.exists(text)


def load_inventory(name_or_path: str) -> Inventory:
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        kind, reason = userpath.path_kind(path)  # Path.exists raises on a 300-character name
        if kind in (userpath.MISSING, userpath.BAD):
            raise ResidencyError(
                f"{name_or_path[:200]}: {reason or 'no such file or directory'}",
                hint="give a .safetensors or .gguf file, a directory of shards, or a built-in model name",
            )
        from residency.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            infos = [TensorInfo(e.name, tuple(e.shape), e.format, e.nbytes) for e in ckpt.entries.values()]
        return group_tensors(str(path), infos)
    names = builtin_model_names()
    if name_or_path not in names:
        catalog = [n for n in catalog_names() if n not in names]
        if name_or_path in catalog:
            return _catalog_inventory(name_or_path)
        raise ResidencyError(
            f"unknown model {name_or_path!r}",
            hint="built-in models: " + ", ".join(names) + "; catalog models: " + ", ".join(catalog)
            + "; or give a path to a .safetensors/.gguf checkpoint",
        )
    from pipelines.world_model import WorldModelPipeline

    pipe = WorldModelPipeline.from_config(name_or_path, device="meta")
    return inventory_from_module(name_or_path, pipe)
