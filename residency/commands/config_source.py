"""A diffusers or transformers model directory read as config only: the model built empty, its workload
counted on meta.

Planning needs shapes, not weights, so a directory holding only config.json plans like one with its
checkpoint; nothing is allocated (accelerate.init_empty_weights puts every parameter on the meta device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from residency import userpath
from residency.errors import ResidencyError, UsageError
from residency.jsonfile import read_json

MODEL_CONFIG = "config.json"  # diffusers: `_class_name` names the class; transformers: `architectures`
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline directory: components in subfolders
PYTHON_ROUTE = ("build the workload in Python (residency.workload.workload_from_module(model, example_inputs, "
                "name=…)), save it with residency.workload.workload_to_dict as JSON, and plan that file")


def is_model_dir(path: Path) -> bool:
    """A diffusers or transformers model directory (its config names the model class)."""
    if not (_kind(path) == userpath.DIRECTORY and _kind(path / MODEL_CONFIG) == userpath.FILE):
        return False
    config = read_config(path / MODEL_CONFIG)
    return "_class_name" in config or "architectures" in config


def is_diffusers_pipeline_dir(path: Path) -> bool:
    """True when `path` is a directory holding a diffusers model_index.json."""
    return _kind(path) == userpath.DIRECTORY and _kind(path / PIPELINE_INDEX) == userpath.FILE


def _kind(path: Path) -> str:
    return userpath.path_kind(path)[0]  # Path.is_dir() raises on a name too long for the file system


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (a config.json, model_index.json, tokenizer_config.json); ResidencyError
    naming the file when it is not one."""
    doc = read_json(path, "the model config", "give a diffusers or transformers model directory whose "
                    f"{path.name} is valid JSON")  # regular files only, capped; no NaN, no bombs
    if not isinstance(doc, dict):
        raise ResidencyError(f"{path}: the config is a JSON {type(doc).__name__}, not an object",
                             hint="give a diffusers model directory written by save_pretrained")
    return doc


def empty_model(path: Path, named_as: tuple[str, str] | None = None):
    """The model `path`/config.json describes, every parameter on the meta device (no memory, no weights read).

    named_as: (library, class name) as a pipeline's model_index.json names the component, instead of the
    config's own `_class_name` / `architectures` (a text encoder's config may name no class)."""
    if _kind(path / MODEL_CONFIG) != userpath.FILE:
        raise ResidencyError(f"{path / MODEL_CONFIG}: no such file",
                             hint="every planned component of a pipeline directory needs its config.json")
    config = read_config(path / MODEL_CONFIG)
    if named_as is not None:
        (library, class_name), field = named_as, "class"
        named = class_name
    else:
        library, field = ("diffusers", "_class_name") if "_class_name" in config else ("transformers",
                                                                                        "architectures")
        named = config[field]
        class_name = named[0] if isinstance(named, list) and named else named
    try:
        import importlib

        lib = importlib.import_module(library)
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ResidencyError(f"{path}: planning a {library} model needs {library} and accelerate ({e})",
                             hint="pip install 'residency[catalog]'") from e
    cls = getattr(lib, str(class_name), None) if isinstance(class_name, str) else None
    build = getattr(cls, "from_config" if library == "diffusers" else "_from_config", None)
    if build is None:
        raise ResidencyError(f"{path / MODEL_CONFIG}: {field} {named!r} is not a {library} model class",
                             hint=f"{library} {lib.__version__} has no such class; update {library} or fix {field}")
    if library == "transformers":
        config = lib.AutoConfig.from_pretrained(path)  # a local directory: nothing is downloaded
    with init_empty_weights():
        try:
            model = build(config)
        except Exception as e:  # a config the class refuses: wrong or missing fields
            raise ResidencyError(f"{path / MODEL_CONFIG}: {class_name} refuses the config "
                                 f"({type(e).__name__}: {str(e)[:200]})",
                                 hint="give the directory save_pretrained wrote for this model") from e
    if library == "transformers":
        # built under init_empty_weights a transformers model leaves its tied weights untied (T5's shared
        # embedding, a tied lm_head): counted twice, or left unowned; tying outside it shares them, on meta
        model.tie_weights()
    return model.eval()  # built in training mode: its dropouts would be counted as ops an inference never runs


def model_dir_workload(path: Path, compute_dtype: str, size=None):
    """The workload of one forward of the model in `path`, at the example input its config implies for
    `size` (an ExampleSize; None: the model's default generation). Named `<dir> at <size>`."""
    from residency.front_door.examples import derive
    from residency.workload import workload_from_module

    model = empty_model(path)
    try:
        derived = derive(model, size)
    except ResidencyError as e:  # a size the model cannot take (UsageError) keeps its own hint
        hint = e.hint if isinstance(e, UsageError) else PYTHON_ROUTE
        raise type(e)(f"{path}: {e.message}", hint=hint) from e
    try:
        return workload_from_module(model, derived.example, name=f"{path.name} at {derived.label}",
                                    compute_dtype=compute_dtype)
    except ResidencyError as e:  # a forward meta cannot run: no weights here to run it for real
        raise ResidencyError(f"{path}: {e.message}", hint=PYTHON_ROUTE) from e
