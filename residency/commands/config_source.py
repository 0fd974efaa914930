"""A diffusers or transformers model directory read as config only: the model built empty, its workload
counted on meta.

Planning needs shapes, not weights, so a directory holding only config.json plans like one with its
checkpoint; nothing is allocated (accelerate.init_empty_weights puts every parameter on the meta device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from residency import userpath
from residency.errors import ResidencyError
from residency.jsonfile import read_json

MODEL_CONFIG = "config.json"  # diffusers: `_class_name` names the class; transformers: `architectures`
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline directory: components in subfolders


def is_model_dir(path: Path) -> bool:
    """A diffusers or transformers model directory (its config names the model class)."""
    if not (_kind(path) == userpath.DIRECTORY and _kind(path / MODEL_CONFIG) == userpath.FILE):
        return False
    config = _read(path / MODEL_CONFIG)
    return "_class_name" in config or "architectures" in config


def is_diffusers_pipeline_dir(path: Path) -> bool:
    """True when `path` is a directory holding a diffusers model_index.json."""
    return _kind(path) == userpath.DIRECTORY and _kind(path / PIPELINE_INDEX) == userpath.FILE


def _kind(path: Path) -> str:
    return userpath.path_kind(path)[0]  # Path.is_dir() raises on a name too long for the file system


def _read(path: Path) -> dict[str, Any]:
    doc = read_json(path, "the model config", "give a diffusers or transformers model directory whose "
                    "config.json is valid JSON")  # regular files only, capped; no NaN, no bombs
    if not isinstance(doc, dict):
        raise ResidencyError(f"{path}: the config is a JSON {type(doc).__name__}, not an object",
                             hint="give a diffusers model directory written by save_pretrained")
    return doc


def empty_model(path: Path):
    """The model `path`/config.json describes, every parameter on the meta device (no memory, no weights read)."""
    config = _read(path / MODEL_CONFIG)
    library, field = ("diffusers", "_class_name") if "_class_name" in config else ("transformers", "architectures")
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
            return build(config)
        except Exception as e:  # a config the class refuses: wrong or missing fields
            raise ResidencyError(f"{path / MODEL_CONFIG}: {class_name} refuses the config "
                                 f"({type(e).__name__}: {str(e)[:200]})",
                                 hint="give the directory save_pretrained wrote for this model") from e


def model_dir_workload(path: Path, compute_dtype: str):
    """The workload of one forward of the model in `path`, at the example input its config implies."""
    from residency.front_door.examples import derived_example
    from residency.workload import workload_from_module

    model = empty_model(path)
    try:
        example = derived_example(model)
    except ResidencyError as e:
        raise ResidencyError(
            f"{path}: {e.message}",
            hint="build the workload in Python (residency.workload.workload_from_module(model, example_inputs, "
                 "name=…)), save it with residency.workload.workload_to_dict as JSON, and plan that file") from e
    return workload_from_module(model, example, name=path.name, compute_dtype=compute_dtype)
