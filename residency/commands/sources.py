"""Resolve what a user names on the command line, one way for `inspect` and `plan`.

Sources: a catalog name, a catalog (workload) JSON, a checkpoint (.safetensors/.gguf or a directory of
shards), a diffusers or transformers model directory (config.json; config only, no weights needed), or a
diffusers pipeline directory (model_index.json). Built-in models are instantiated on the meta device, so
inspecting them costs no memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from residency import userpath
from residency.checkpoint.checkpoint import SHARD_INDEX_SUFFIXES
from residency.commands.config_source import (
    MODEL_CONFIG,
    SAVED_DTYPE_KEYS,
    SAVED_DTYPES,
    empty_model,
    has_model_config,
    is_diffusers_pipeline_dir,
    is_model_dir,
    is_world_model_dir,
    model_dir_workload,
    read_config,
    refuse_classless,
)
from residency.commands.weights_match import pickled_weights
from residency.errors import ResidencyError, UsageError
from residency.inventory import (
    BlockInfo,
    Inventory,
    TensorInfo,
    group_tensors,
    inventory_from_module,
    inventory_from_named_shapes,
)
from residency.units import first_names
from residency.validate import did_you_mean

CATALOG = "catalog"  # a name in pipelines/catalog (the built-in world models are catalog names too)
WORKLOAD_JSON = "workload-json"  # a catalog document written by pipelines.catalog_build or workload_to_dict
CHECKPOINT = "checkpoint"  # .safetensors / .gguf file or a directory of shards
MODEL_DIR = "model-dir"  # config.json naming a diffusers or transformers class (+ weights or not)
PIPELINE_DIR = "diffusers-pipeline"  # model_index.json and one subfolder per component
WORLD_MODEL_DIR = "world-model-dir"  # a saved WorldModelPipeline (save_pretrained: config.json + weights)
SHIPPED = "shipped"  # `default`: the world model that ships trained (tiny's config when its weights are absent),
SHIPPED_NAME = "default"  # as `run`, `play` and `demo` name it (residency.session_setup.load_model)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")  # SHARD_INDEX_SUFFIXES: their shard indexes
SOURCES_HINT = ("give default (the shipped world model), a catalog model ({names}), a catalog .json, a "
                "diffusers or transformers model directory (config.json), a diffusers pipeline directory "
                "(model_index.json), a world model saved by WorldModelPipeline.save_pretrained, or, for inspect "
                "only, another .safetensors/.gguf checkpoint")


@dataclass(frozen=True)
class Source:
    """What a model argument names: its kind, the text given, and its path (None for a catalog name)."""
    kind: str  # one of the kinds above
    text: str  # as the user gave it
    path: Path | None  # None for a catalog name


def builtin_model_names() -> list[str]:
    """Names of the built-in world model presets."""
    from pipelines.world_model import PRESETS

    return list(PRESETS)


def catalog_names() -> list[str]:
    """Names of the models in pipelines/catalog."""
    from pipelines.catalog import catalog_paths

    return list(catalog_paths())


def _looks_like_path(text: str) -> bool:
    return (any(sep in text for sep in ("/", "\\")) or text.endswith((*WEIGHT_SUFFIXES, ".json"))
            or userpath.exists(text) or _is_link(text))  # a dangling or looping link is a path, not a model name


def _is_link(text: str) -> bool:
    try:
        return os.path.islink(text)
    except (OSError, ValueError):  # a name the OS refuses (NUL byte, too long)
        return False


def _missing_reason(path: Path, kind: str, reason: str | None) -> str:
    """Why `path` cannot be read: a link says where it points (a snapshot copied without its blobs)."""
    if _is_link(str(path)):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return (f"a link to {target!r} that is missing" if kind == userpath.MISSING else
                f"a link to {target!r} that cannot be followed ({reason})")
    return reason or "no such file or directory"


def classify(text: str) -> Source:
    """Which kind of source `text` names; ResidencyError naming it, with every accepted kind, when none."""
    if text == SHIPPED_NAME:  # before any path: `run default` means the shipped model whatever is in the cwd
        return Source(SHIPPED, text, None)
    if not _looks_like_path(text):
        catalog = catalog_names()  # one listing of the catalog directory
        known = [*catalog, *(n for n in builtin_model_names() if n not in catalog)]
        if text in known:
            return Source(CATALOG, text, None)
        raise UsageError(f"unknown model {text!r}{did_you_mean(text, [SHIPPED_NAME, *known])}",
                             hint=SOURCES_HINT.format(names=", ".join(catalog_names())))
    path = Path(text)
    kind, reason = userpath.path_kind(path)  # Path.exists raises on a 300-character name
    if kind in (userpath.MISSING, userpath.BAD):
        raise ResidencyError(f"{text[:200]}: {_missing_reason(path, kind, reason)}",
                             hint=SOURCES_HINT.format(names=", ".join(catalog_names())))
    if path.is_dir():
        if is_diffusers_pipeline_dir(path):
            return Source(PIPELINE_DIR, text, path)
        if is_model_dir(path):
            return Source(MODEL_DIR, text, path)
        if is_world_model_dir(path):
            return Source(WORLD_MODEL_DIR, text, path)
        weights = _has_weights(path)
        if has_model_config(path) and not weights:
            refuse_classless(path)  # a model directory whose config.json names no class: say so, not "no weights"
        if not weights:
            pickled = pickled_weights(path)
            if pickled:  # torch.save files: residency reads no pickles (loading one runs its code)
                raise ResidencyError(f"{text[:200]}: its weights are {pickled} (a pickle), which residency does not "
                                     "read; and it has no config.json or model_index.json",
                                     hint="convert them to .safetensors (safetensors.torch.save_file), or give the "
                                          "model's directory with its config.json")
            raise ResidencyError(f"{text[:200]}: a directory with no model in it (no config.json, model_index.json "
                                 "or .safetensors/.gguf file)", hint=SOURCES_HINT.format(names=", ".join(catalog_names())))
        return Source(CHECKPOINT, text, path)
    if path.suffix == ".json":
        _refuse_a_directorys_config(text, path)
        return Source(WORKLOAD_JSON, text, path)
    return Source(CHECKPOINT, text, path)


def _refuse_a_directorys_config(text: str, path: Path) -> None:
    """A model's config.json (or a pipeline's model_index.json) given as the file: read as a catalog document it
    failed with "field 'model_type' is not known" and the catalog's fields as the hint. Its directory is the
    source."""
    parent = path.parent
    kind = ("a diffusers pipeline" if path.name == "model_index.json" and is_diffusers_pipeline_dir(parent) else
            "a model directory" if path.name == "config.json" and (is_model_dir(parent) or is_world_model_dir(parent))
            # model.safetensors.index.json: the shard index of a checkpoint split in files, read with its directory
            else "a sharded checkpoint (its shard index)" if path.name.endswith(".safetensors.index.json")
            else None)
    if kind is not None:
        raise ResidencyError(f"{text[:200]}: the {path.name} of {kind}, not a catalog document",
                             hint=f"give its directory: {str(parent)[:200]}")


def resolve_workload(name_or_path: str, steps: int | None = None, context_frames: int | None = None,
                     compute_dtype: str = "bf16", size=None):
    """The workload a source describes, at the given generation parameters.

    compute_dtype: what a workload counted from a model or pipeline directory assumes (catalog documents carry
    their own). size: the height/width/frames such a directory is planned at (a
    residency.front_door.examples.ExampleSize; None: the model's or pipeline's default); UsageError for a
    catalog source, whose size is fixed. A bare checkpoint is refused: its tensors do not say in which order
    blocks run, how often, nor their FLOPs."""
    from residency.workload import load_workload_file

    source = classify(name_or_path)
    saved = _saved_world_model(source.path) if source.kind == CHECKPOINT else None
    if source.kind == CHECKPOINT and saved is None:
        _refuse_checkpoint(name_or_path, source.path)
    if size is not None and size.given() and source.kind not in (MODEL_DIR, PIPELINE_DIR):
        raise UsageError(f"{name_or_path}: a catalog model is described at a fixed size; --height, --width, "
                         "--frames and --tokens apply to a model or pipeline directory",
                         hint="leave them out, or plan the model's diffusers directory")
    if saved is not None:
        workload = saved
    elif source.kind == SHIPPED:
        workload = shipped_workload()
    elif source.kind == CATALOG:
        from pipelines.catalog import catalog_paths

        workload = load_workload_file(catalog_paths()[name_or_path])
    elif source.kind == WORKLOAD_JSON:  # the user's own document: not regenerated by the catalog builder
        from residency.workload.catalog import USER_HINT

        workload = load_workload_file(source.path, USER_HINT)
    elif source.kind == MODEL_DIR:
        if steps not in (None, 1) and not read_config(source.path / MODEL_CONFIG).get("_class_name"):
            # its "frame" was counted as that many forwards: a text model's plan at 4 "denoise steps" per call
            raise UsageError(f"{name_or_path}: --steps {steps}: a transformers model (a text model, an encoder) runs "
                             "no denoise steps; they apply to a diffusion model's denoiser",
                             hint="leave --steps out: one call is one forward")
        workload = model_dir_workload(source.path, compute_dtype, size)
    elif source.kind == PIPELINE_DIR:
        from residency.commands.pipeline_source import pipeline_dir_workload

        workload = pipeline_dir_workload(source.path, compute_dtype, size, steps_given=steps is not None)
    elif source.kind == WORLD_MODEL_DIR:  # as `run DIR` builds it (residency.session_setup.load_model)
        from pipelines.world_model.pretrained import load_config
        from pipelines.world_model.workload import catalog_entry
        from residency.workload import workload_from_dict

        workload = workload_from_dict(catalog_entry(load_config(source.path, {})))
    return workload.with_params(steps=steps, context_frames=context_frames)


def _shipped_config():
    """The shipped model's config (its config.json, read without the weights), or tiny's when its weights are
    absent: what `run default` loads, so a plan made here matches the model `run default --plan` runs."""
    from pipelines.world_model import PRESETS
    from residency.session_setup import has_trained_weights, trained_dir

    if not has_trained_weights():
        return PRESETS["tiny"]
    from pipelines.world_model.pretrained import load_config

    return load_config(trained_dir(), {})


def shipped_workload():
    """The workload of `default`, built as residency.session_setup.load_model builds it (same fingerprint)."""
    from pipelines.world_model.workload import catalog_entry
    from residency.workload import workload_from_dict

    return workload_from_dict(catalog_entry(_shipped_config()))


def shipped_sensitivity(name_or_path: str) -> dict | None:
    """The measured block × format loss table `run` plans `default` with; None for any other source, or when
    the shipped model has none."""
    if name_or_path != SHIPPED_NAME:
        return None
    from residency.session_setup import shipped_sensitivity as shipped

    return shipped()


def _saved_world_model(path: Path):
    """The workload of a world model saved as one file (WorldModelPipeline.save_pretrained("x.gguf"): its config in
    the file's metadata), as `run x.gguf` plans it; None for any other checkpoint."""
    from pipelines.world_model.pretrained import CONFIG_KEY, load_config
    from pipelines.world_model.workload import catalog_entry
    from residency.checkpoint import open_checkpoint
    from residency.workload import workload_from_dict

    if not (path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES):
        return None
    with open_checkpoint(path) as ckpt:  # the header only
        metadata = dict(ckpt.metadata)
    if CONFIG_KEY not in metadata:
        return None
    return workload_from_dict(catalog_entry(load_config(path, metadata)))


def _refuse_checkpoint(name_or_path: str, path: Path) -> NoReturn:
    """A checkpoint cannot be planned; one beside a config.json that names no model class is told so."""
    if has_model_config(path):
        refuse_classless(path)
    if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:  # an image, a text file: not a model
        raise ResidencyError(f"{name_or_path}: not a model to plan (a {path.suffix or 'suffix-less'} file)",
                             hint=SOURCES_HINT.format(names=", ".join(catalog_names())))
    raise ResidencyError(
        f"{name_or_path}: a checkpoint holds tensors, not the model's forward: the order its blocks run in, "
        "how often, and their FLOPs are not in it, so it cannot be planned",
        hint="plan the diffusers or transformers model directory holding its config.json (weights are not "
             "needed), a catalog model or a catalog .json; `residency inspect` reads a bare checkpoint")


def _workload_inventory(name: str, workload, note: str = "") -> Inventory:
    """A workload's tensors as stored at BF16, grouped by the workload's own blocks and components.

    Names are prefixed with the block so they read as checkpoint keys; the grouping is taken from the
    workload, not re-derived from names (a block like `transformer.x_embedder+time_text_embed+context_embedder`
    holds keys with digits in them).
    """
    blocks = []
    for b in workload.blocks:
        named = [(f"{b.name}.{n}", shape, "BF16") for n, shape in b.tensors]
        blocks.append(BlockInfo(b.name, b.component, inventory_from_named_shapes(name, named).tensors))
    return Inventory(name, blocks, note=note)


def _has_weights(path: Path) -> bool:
    """Weight files, or a shard index naming them (its shards all missing, the checkpoint reader names them)."""
    return any(p.suffix in WEIGHT_SUFFIXES or p.name.lower().endswith(SHARD_INDEX_SUFFIXES) for p in path.iterdir())


def _checkpoint_inventory(path: Path, model_dir: bool = False) -> Inventory:
    """A checkpoint's tensors as stored; of a model directory (`model_dir`), one variant's files, the one
    from_pretrained loads (model.safetensors before model.fp16.safetensors: both read, every tensor was twice)."""
    from residency.checkpoint import open_checkpoint
    from residency.checkpoint.checkpoint import one_variant, variant_of

    only, note = None, ""
    if model_dir:
        files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        weights = [p for p in files if p.suffix.lower() == ".safetensors"]
        chosen = one_variant(weights)
        if len(chosen) < len(weights):
            only = {p.name for p in chosen} | {p.name for p in files if p.suffix.lower() == ".gguf"}
            skipped = sorted({p.name for p in weights} - only)
            variant = variant_of(chosen[0])
            which = (f"the {variant} variant, the first by name (from_pretrained loads one only with variant=)"
                     if variant else "the weights from_pretrained loads by default")
            note = (f"read {first_names([p.name for p in chosen], 2)}, {which}; the other variant beside it "
                    f"({first_names(skipped, 2)}) is another copy of them, not counted")
    with open_checkpoint(path, only) as ckpt:
        infos = [TensorInfo(e.name, tuple(e.shape), e.format, e.nbytes) for e in ckpt.entries.values()]
        others = [(o.name, o.dtype, o.shape, o.nbytes) for o in ckpt.left_out]
    inv = group_tensors(str(path), infos)
    inv.left_out = others
    inv.note = note
    return inv


def _as_saved(model, path: Path):
    """The empty (meta) model in the dtype its config.json says its weights are saved in, where it says one of
    float32, float16 and bfloat16; as built (float32) otherwise."""
    import torch

    config = read_config(path / "config.json")
    named = next((config[k] for k in SAVED_DTYPE_KEYS if isinstance(config.get(k), str)), None)
    if named not in SAVED_DTYPES:
        return model
    return model.to(getattr(torch, named))  # meta tensors: nothing is allocated


def load_inventory(name_or_path: str, size=None) -> Inventory:
    """The tensors a source holds, grouped by block: read from a checkpoint where there is one, else counted.
    size: the ExampleSize a pipeline directory's call is traced at (which modules it runs); UsageError for any
    other source, whose tensors no size changes."""
    source = classify(name_or_path)
    if size is not None and size.given() and source.kind != PIPELINE_DIR:
        raise UsageError(f"{name_or_path}: --height, --width, --frames and --tokens change no tensor it holds; they "
                         "only choose the call a pipeline directory is traced by",
                         hint="leave them out (`residency plan` takes them, for the compute of a call)")
    if source.kind == SHIPPED:
        from residency.session_setup import has_trained_weights, trained_dir

        if has_trained_weights():
            return _checkpoint_inventory(trained_dir() / "model.safetensors")
        from pipelines.world_model import WorldModelPipeline

        return inventory_from_module(name_or_path, WorldModelPipeline.from_config("tiny", device="meta"))
    if source.kind == CHECKPOINT or (source.kind in (MODEL_DIR, WORLD_MODEL_DIR) and _has_weights(source.path)):
        # as stored: the real formats, not an assumed BF16
        return _checkpoint_inventory(source.path, model_dir=source.kind == MODEL_DIR)
    if source.kind == CATALOG and name_or_path in builtin_model_names():
        import torch

        from pipelines.world_model import WorldModelPipeline

        # at BF16, as every catalog model is shown (and as a GPU runs them); the pipeline is built in F32, which
        # showed twice the bytes `plan` counts (meta: no memory either way)
        pipe = WorldModelPipeline.from_config(name_or_path, device="meta").to(torch.bfloat16)
        return inventory_from_module(name_or_path, pipe)
    if source.kind == MODEL_DIR:
        # config only: the model built empty, its tensors named and typed as its weights would be stored (the
        # config's dtype), as for a directory with weights; no forward is counted (inspect needs none, and a
        # class whose inputs its config does not give, a UNet2DModel, has none to count)
        model = _as_saved(empty_model(source.path), source.path)
        inv = inventory_from_module(name_or_path, model)
        dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), "float32")
        pickled = pickled_weights(source.path)
        where = f"its weights are {pickled}, a pickle residency does not read" if pickled else "no weights here"
        inv.note = (f"counted from config.json ({where}): the {type(model).__name__} it describes, in "
                    f"{dtype}: its parameters and buffers, as `plan` counts them")
        return inv
    # a pipeline's components' files may hold other dtypes, and parts a call never runs
    note = ("counted from the configs: the modules one call of the pipeline runs (a text-to-image call runs no VAE "
            "encoder), each at BF16, as `plan` counts them; `inspect DIR/COMPONENT` reads a component's own files"
            if source.kind == PIPELINE_DIR else "")
    try:
        # steps=1: tensors do not depend on them (and a capped default steps count is a planning note)
        workload = resolve_workload(name_or_path, steps=1, size=size)
    except UsageError:
        raise
    except ResidencyError as e:
        if source.kind != PIPELINE_DIR:
            raise
        return _untraced_pipeline_inventory(name_or_path, source.path, e)
    return _workload_inventory(name_or_path, workload, note)


def _untraced_pipeline_inventory(name: str, path: Path, cause: ResidencyError) -> Inventory:
    """A pipeline directory whose call `plan` cannot trace (an SDXL UNet's added conditioning, a component in no
    phase it knows): its tensors are there all the same, every component's, counted from its config. `cause` is
    raised where they cannot be counted either."""
    from residency.commands.pipeline_source import component_tensors

    try:
        named, left_out = component_tensors(path)
    except ResidencyError:
        raise cause from None
    if not named:
        raise cause
    inv = inventory_from_named_shapes(name, named)
    for b in inv.blocks:  # `transformer.scale_shift_table` is the transformer's, not a "model" of its own
        b.component = b.name.split(".")[0]
    unread = f"; not counted: {', '.join(left_out)}" if left_out else ""
    why = re.sub(rf"^{re.escape(str(path))}(/model_index\.json)?: ", "", cause.message)
    inv.note = (f"counted from the configs: every component's modules, each at BF16 (which ones a call runs is not "
                f"known: {why}){unread}; `inspect DIR/COMPONENT` reads a component's own files")
    return inv


