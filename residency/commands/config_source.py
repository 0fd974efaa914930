"""A diffusers or transformers model directory read as config only: the model built empty, its workload
counted on meta.

Planning needs shapes, not weights, so a directory holding only config.json plans like one with its
checkpoint; nothing is allocated (accelerate.init_empty_weights puts every parameter on the meta device).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from residency import userpath
from residency.errors import ResidencyError, UsageError
from residency.jsonfile import read_json
from residency.units import fmt_bytes

MODEL_CONFIG = "config.json"  # diffusers: `_class_name` names the class; transformers: `architectures`
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline directory: components in subfolders
# A transformers config's record of the dtype its weights were saved in (`torch_dtype`; `dtype` from v4.56 on)
SAVED_DTYPE_KEYS = ("torch_dtype", "dtype")
SAVED_DTYPES = ("float32", "float16", "bfloat16")  # torch attribute names
PYTHON_ROUTE = ("build the workload in Python (residency.workload.workload_from_module(model, example_inputs, "
                "name=…)), save it with residency.workload.workload_to_dict as JSON, and plan that file")
# counts of layers a config may set: each a whole number ≥ 0 (0: a stack the model leaves out — a UNet's per-block
# transformer counts can be; a UNet's per-block counts come as a list of them)
# Layers a config may declare: the deepest released models have ~200; building 100,000 empty layers took minutes
# (no output) before any error
MAX_LAYERS = 4096
# sizes a config gives that must be 1 or more where given (a list: each of its items)
SIZE_FIELDS = ("patch_size", "patch_size_t", "in_channels", "out_channels", "block_out_channels", "hidden_size",
               "intermediate_size", "vocab_size", "max_position_embeddings", "n_positions", "num_attention_heads",
               "num_key_value_heads", "attention_head_dim", "head_dim", "d_model", "d_ff", "d_kv", "num_heads",
               "joint_attention_dim", "pooled_projection_dim", "cross_attention_dim", "text_dim", "ffn_dim", "n_embd",
               "n_head", "norm_num_groups")
LAYER_COUNT_FIELDS = ("num_layers", "num_single_layers", "num_hidden_layers", "num_encoder_layers",
                      "num_decoder_layers", "encoder_layers", "decoder_layers", "n_layer", "n_layers",
                      "layers_per_block", "transformer_layers_per_block")


def is_model_dir(path: Path) -> bool:
    """A diffusers or transformers model directory (its config names the model class)."""
    if not (_kind(path) == userpath.DIRECTORY and _kind(path / MODEL_CONFIG) == userpath.FILE):
        return False
    config = read_config(path / MODEL_CONFIG)
    return bool(config.get("_class_name") or config.get("architectures"))


# fields of a WorldModelPipeline config (pipelines.world_model.config) no diffusers or transformers config has
WORLD_MODEL_FIELDS = ("latent_channels", "vae_channels", "context_frames")


def is_world_model_dir(path: Path) -> bool:
    """A directory WorldModelPipeline.save_pretrained wrote: a config.json of the world model's own fields."""
    if not (_kind(path) == userpath.DIRECTORY and _kind(path / MODEL_CONFIG) == userpath.FILE):
        return False
    config = read_config(path / MODEL_CONFIG)
    return not (config.get("_class_name") or config.get("architectures")) and all(
        k in config for k in WORLD_MODEL_FIELDS)


def has_model_config(path: Path) -> bool:
    """True when the directory `path` holds a config.json (whether or not it names a model class)."""
    return _kind(path) == userpath.DIRECTORY and _kind(path / MODEL_CONFIG) == userpath.FILE


def supported_models() -> str:
    """The models residency plans from a config alone, for a hint."""
    from residency.front_door.examples import DIFFUSERS_CLASSES

    classes = f"{', '.join(DIFFUSERS_CLASSES[:-1])} or {DIFFUSERS_CLASSES[-1]}"
    return (f"residency plans from config.json alone a diffusers {classes} (named by "
            "`_class_name`) or a transformers model reading token ids (named by `architectures`, e.g. "
            "[\"LlamaForCausalLM\"])")


def refuse_classless(path: Path) -> NoReturn:
    """Raise the error for a directory whose config.json names no model class."""
    raise ResidencyError(f"{path / MODEL_CONFIG}: the config names no model class: `_class_name` (a diffusers "
                         "model) is missing or empty, and so is `architectures` (a transformers model)",
                         hint=f"{supported_models()}; save_pretrained writes these fields")


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
    with open(path, "rb") as f:  # a regular file read whole just above: its first bytes again
        if f.read(3) == b"\xef\xbb\xbf":  # read here, then refused by transformers as "not a valid JSON file"
            raise ResidencyError(f"{path}: the file starts with a UTF-8 byte-order mark, which transformers and "
                                 "diffusers refuse (they read config files as plain UTF-8 JSON)",
                                 hint="save it without the mark (UTF-8, not 'UTF-8 with BOM')")
    return doc


def empty_model(path: Path, named_as: tuple[str, str] | None = None):
    """The model `path`/config.json describes, every parameter on the meta device (no memory, no weights read).

    named_as: (library, class name) as a pipeline's model_index.json names the component, instead of the
    config's own `_class_name` / `architectures` (a text encoder's config may name no class)."""
    if _kind(path / MODEL_CONFIG) != userpath.FILE:
        raise ResidencyError(f"{path / MODEL_CONFIG}: no such file",
                             hint="every planned component of a pipeline directory needs its config.json")
    config = raw = read_config(path / MODEL_CONFIG)
    _check_layer_counts(path / MODEL_CONFIG, config)
    _check_sizes(path / MODEL_CONFIG, config)
    _check_head_groups(path / MODEL_CONFIG, config)
    _note_quantization_config(path / MODEL_CONFIG, config)
    if named_as is not None:
        (library, class_name), field = named_as, "class"
        named = class_name
    else:
        library, field = ("diffusers", "_class_name") if config.get("_class_name") else ("transformers",
                                                                                          "architectures")
        named = config.get(field)
        class_name = named[0] if isinstance(named, list) and named else named
    try:
        import importlib

        lib = importlib.import_module(library)
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ResidencyError(f"{path}: planning a {library} model needs {library} and accelerate ({e})",
                             hint="pip install 'residency[catalog]'") from e
    cls = getattr(lib, str(class_name), None) if isinstance(class_name, str) else None
    # a scheduler or a pipeline class has from_config too: built, it failed as "'DDPMScheduler' object has no
    # attribute 'eval'" (a traceback)
    import torch

    model_class = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    build = getattr(cls, "from_config" if library == "diffusers" else "_from_config", None) if model_class else None
    if cls is not None and not model_class:
        raise ResidencyError(f"{path / MODEL_CONFIG}: {field} {named!r} is a {library} class but not a model's (no "
                             "weights to place)", hint="give a model's directory (a pipeline's unet/ or transformer/ "
                             "folder), or the pipeline's directory itself (the one with model_index.json)")
    if build is not None and cls.forward is torch.nn.Module.forward:  # PreTrainedModel, ModelMixin: bases, no forward
        raise ResidencyError(f"{path / MODEL_CONFIG}: {field} {named!r} is a base class of {library}'s models, with "
                             "no forward of its own", hint=f"name the model's own class: {supported_models()}")
    if build is None:
        known = supported_models() if named_as is None else f"{library} {lib.__version__} has no such class"
        raise ResidencyError(f"{path / MODEL_CONFIG}: {field} {named!r} is not a {library} model class",
                             hint=f"{known}; fix {field}, or update {library} if it is newer than "
                                  f"{library} {lib.__version__}")
    # a config of another class than the one built (model_index.json names another; a transformers config of
    # another model_type): built as the library builds it, the difference named when that fails, noted when not
    other = config.get("_class_name") if named_as is not None and library == "diffusers" else None
    other = other if isinstance(other, str) and other and other != class_name else None  # None: the config's own
    with init_empty_weights():
        try:
            if library == "transformers":
                # a local directory: nothing is downloaded. It validates fields (a dtype torch lacks, a text
                # width, heads that do not divide the width, an unknown model_type): refused here, not raised
                config = lib.AutoConfig.from_pretrained(path)
                own = getattr(cls, "config_class", None)
                if isinstance(own, type) and not isinstance(config, own):  # as from_pretrained: the class's own
                    other = f"a {type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r})"
                    config = own.from_pretrained(path)
            model = build(config)
        except ResidencyError:
            raise
        except Exception as e:  # a config the class refuses: wrong or missing fields
            from residency.workload.from_module import error_line

            if other is not None:  # the difference is the cause: a Flux transformer's config built as a
                # UNet2DModel failed as "unsupported operand … NoneType", with a hint about sizes
                said, hint = _other_class_words(path, class_name, other, named_as)
                raise ResidencyError(f"{said} ({class_name} fails to build from it: {error_line(e)})", hint=hint) from e
            # sizes so large that what the empty model still builds in RAM does not fit: its buffers, or a weight
            # its class makes before registering it (init_empty_weights moves a parameter to meta once registered)
            huge = "allocat" in str(e)
            asked = re.search(r"allocate (\d+) bytes", str(e))
            # the allocator's own words ("[enforce fail at alloc_cpu.cpp:127] err == 0 …") tell a user nothing
            why = (f"building it, even without weights, would allocate {fmt_bytes(int(asked.group(1)))} of host "
                   "memory for its tensors" if asked else error_line(e))
            named = _blamed_field(raw, str(e))
            raise ResidencyError(f"{path / MODEL_CONFIG}: {class_name} refuses the config ({why})",
                                 hint="its sizes (heads, widths, positions) are too large to build the model even "
                                      "without weights: fix them" if huge else f"fix {named}, or give the "
                                      "directory save_pretrained wrote for this model") from e
    # built as the library builds it (transformers logs it as a warning; an XLM-RoBERTa config read by RobertaModel is a
    # common, working pair): said, and a weights mismatch then hints at the class named, not at the config
    other_hint = None
    if other is not None:
        said, other_hint = _other_class_words(path, class_name, other, named_as)
        print(f"note: {said}: built as a {class_name}, as {library} builds it", file=sys.stderr)
    _note_defaulted_sizes(path / MODEL_CONFIG, raw, model)
    if library == "transformers":
        # built under init_empty_weights a transformers model leaves its tied weights untied (T5's shared
        # embedding, a tied lm_head): counted twice, or left unowned; tying outside it shares them, on meta
        model.tie_weights()
    from residency.commands.weights_match import check_weights_match

    check_weights_match(path, model, other_hint)  # weight files beside the config: the headers are read, no data
    return model.eval()  # built in training mode: its dropouts would be counted as ops an inference never runs


def _other_class_words(path: Path, class_name: str, other: str, named_as: tuple | None) -> tuple[str, str]:
    """(what differs, where to fix it) for a config of another class than `class_name`, which it was built as."""
    if named_as is not None:  # a pipeline's component: model_index.json names the class
        return (f"{path.parent / PIPELINE_INDEX} names component {path.name!r} a {class_name}, but "
                f"{path / MODEL_CONFIG} is the config of {other}",
                f"make them agree: the entry {path.name!r} of {PIPELINE_INDEX} names the class whose config and "
                f"weights are in {path.name}/ (save_pretrained writes both)")
    return (f"{path / MODEL_CONFIG}: architectures names {class_name}, but the config is {other}",
            "name a class of that model type in architectures, or fix model_type (save_pretrained writes both)")


def _check_layer_counts(config_path: Path, config: dict[str, Any]) -> None:
    """Refuse a layer count that is not a whole number ≥ 0: a negative one builds a model without those blocks
    instead of saying so, a fraction one the class cannot build."""
    for field in LAYER_COUNT_FIELDS:
        if field not in config or config[field] is None:
            continue
        for value in _flat(config[field]):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LAYERS:
                shown = json.dumps(config[field])[:80]
                raise ResidencyError(f"{config_path}: {field} is {shown}; a layer count must be a whole number "
                                     f"from 0 to {MAX_LAYERS}",
                                     hint=f"fix {field} (save_pretrained writes the model's own count)")


def _check_sizes(config_path: Path, config: dict[str, Any]) -> None:
    """Refuse a size that is not positive: a patch_size of 0 built a model of empty tensors and planned it (exit 0),
    a max_position_embeddings of 0 or -5 was read as no limit, a vocab_size of 0 planned an empty embedding."""
    for field in SIZE_FIELDS:
        if config.get(field) is None:
            continue
        for value in _flat(config[field]):
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                shown = json.dumps(config[field])[:80]
                raise ResidencyError(f"{config_path}: {field} is {shown}; a size must be a whole number of 1 or more",
                                     hint=f"fix {field} (save_pretrained writes the model's own)")


def _check_head_groups(config_path: Path, config: dict[str, Any]) -> None:
    """Refuse key/value heads that do not divide the attention heads (grouped-query attention shares each among a
    whole number of query heads): the config built, and planned (exit 0), a model whose forward fails at its first
    attention; transformers checks it only when the model runs."""
    for where, part in _sub_configs(config):
        heads, groups = part.get("num_attention_heads"), part.get("num_key_value_heads")
        whole = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (heads, groups))
        if whole and heads % groups:
            raise ResidencyError(f"{config_path}: {where}num_key_value_heads is {groups}, which does not divide "
                                 f"{where}num_attention_heads ({heads}): the model's attention cannot share its "
                                 "key/value heads among the query heads", hint="fix num_key_value_heads (a divisor of "
                                 "num_attention_heads; save_pretrained writes the model's own)")


def _sub_configs(config: dict[str, Any], where: str = "", depth: int = 0):
    """(prefix, dict) of the config and of the configs nested in it (a multimodal model's text_config, vision_config),
    a few levels deep."""
    yield where, config
    if depth < 3:
        for key, value in config.items():
            if isinstance(value, dict) and key.endswith("_config") and key != "quantization_config":
                yield from _sub_configs(value, f"{where}{key}.", depth + 1)


def _note_quantization_config(config_path: Path, config: dict[str, Any]) -> None:
    """Say on stderr that a config's quantization_config (bitsandbytes, GGUF, torchao …, which from_pretrained
    applies) is not what residency plans with: the model is built unquantized and its blocks' storage formats are
    the plan's own choice. Silent, a user of a 4-bit checkpoint read the plan's sizes as those of their file."""
    quant = config.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    named = f" ({method})" if isinstance(method, str) and method else ""
    print(f"note: {config_path}: its quantization_config{named} is not applied: residency plans the model's "
          "weights in storage formats of its own choosing per block (BF16, Q8_0, Q4_K …), from the unquantized "
          "model's shapes", file=sys.stderr)


def _note_defaulted_sizes(config_path: Path, given: dict[str, Any], model: Any) -> None:
    """Say on stderr which size fields the config leaves out, so the class's defaults are planned: a hand-written
    config.json without hidden_size planned a 4096-wide Llama with nothing said. save_pretrained writes them all."""
    built = getattr(model, "config", None)
    if built is None:
        return
    aliases = getattr(type(built), "attribute_map", {}) or {}  # transformers: hidden_size read from n_embd (GPT-2)
    defaults = _class_defaults(model, built)
    left = []
    for field in (*LAYER_COUNT_FIELDS, *SIZE_FIELDS):
        value = built.get(field) if isinstance(built, dict) else getattr(built, field, None)
        if value is None or field in given or aliases.get(field) in given or any(
                k in given for k, v in aliases.items() if v == field):
            continue
        # a field derived from given ones (head_dim from hidden_size and heads) differs from the class default
        shown = json.dumps(value, default=str)
        if field in defaults and json.dumps(defaults[field], default=str) == shown:
            left.append(f"{field} (so {shown[:40]})")
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        print(f"note: {config_path} gives no {shown}: {type(model).__name__}'s defaults are used, as shown",
              file=sys.stderr)


def _class_defaults(model: Any, built: Any) -> dict[str, Any]:
    """The values a config class (transformers) or a model's __init__ (diffusers) takes for fields not given."""
    try:
        if isinstance(built, dict):  # diffusers: the config is the __init__'s arguments
            import inspect

            params = inspect.signature(type(model).__init__).parameters.values()
            return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        return type(built)().to_dict()
    except Exception:  # a class that cannot be built bare: then no field is said to be a default  # noqa: BLE001
        return {}


def _flat(value: Any) -> list[Any]:
    """A value and, for a list (a UNet's per-block counts, nested per layer), every item in it."""
    if isinstance(value, list | tuple):
        return [v for item in value for v in _flat(item)] or [value]
    return [value]


def _blamed_field(raw: dict, error: str) -> str:
    """The config field a build error comes from, for its hint: a saved dtype no model is built in ("bfloat61",
    "auto", "float8_e4m3fn": torch's words name no field), else the one whose value the error quotes."""
    for key in SAVED_DTYPE_KEYS:
        value = raw.get(key)
        # only where the error is about it: a float64 model failing on its heads is not its dtype's fault
        if isinstance(value, str) and value not in SAVED_DTYPES and value.lower() in error.lower():
            return f"the field {key!r} ({value!r}; one of {', '.join(SAVED_DTYPES)})"
    quoted = [k for k, v in raw.items() if isinstance(v, str) and len(v) > 2 and f"'{v}'" in error]
    return f"the field {quoted[0]!r} ({raw[quoted[0]]!r})" if len(quoted) == 1 else "the field it names"


def _input_not_given(model, example: dict, failure: str) -> str | None:
    """The input of `model`'s forward that the derived `example` left out and its failed forward names (CLIPModel's
    `pixel_values.shape` on None), else None."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "NoneType" not in failure:  # an input left out is None where the forward reads it
        return None
    return next((name for name, p in params.items() if name not in example
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and re.search(rf"\b{re.escape(name)}\b", failure)), None)


def model_dir_workload(path: Path, compute_dtype: str, size=None):
    """The workload of one forward of the model in `path`, at the example input its config implies for
    `size` (an ExampleSize; None: the model's default generation). Named `<dir> at <size>`, a display label
    only: the blocks are named `<class>.<module path>`, as residency.attach names the same model's blocks, so a
    plan written here applies to it."""
    from residency.front_door.examples import DIFFUSERS_CLASSES, ConfigFieldError, derive
    from residency.workload import workload_from_module

    model = empty_model(path)
    try:
        derived = derive(model, size)
    except ResidencyError as e:  # a size the model cannot take (UsageError) keeps its own hint
        if isinstance(e, (UsageError, ConfigFieldError)):
            hint = e.hint
        elif type(model).__name__ in DIFFUSERS_CLASSES:  # a class planned from configs, but not with this one's
            # fields (an SDXL UNet's added conditioning): the list of classes it does plan would name this one
            hint = f"{PYTHON_ROUTE}; its {e.hint.removeprefix('pass ')}"
        else:
            hint = f"{supported_models()}; for another model, {PYTHON_ROUTE}"
        raise type(e)(f"{path}: {e.message}", hint=hint) from e
    except (RuntimeError, MemoryError) as e:  # a size field so large its example inputs do not fit in RAM
        if not isinstance(e, MemoryError) and "allocat" not in str(e):
            raise
        from residency.workload.from_module import error_line

        raise ResidencyError(f"{path / MODEL_CONFIG}: the example inputs its sizes imply do not fit in memory "
                             f"({error_line(e)})", hint="fix the size fields (sample_size, channels, widths), or "
                             "give a smaller --height, --width or --tokens") from e
    try:
        return workload_from_module(model, derived.example, name=f"{path.name} at {derived.label}",
                                    component=type(model).__name__, compute_dtype=compute_dtype)
    except ResidencyError as e:  # a forward meta cannot run: no weights here to run it for real
        needed = _input_not_given(model, derived.example, e.message)
        if needed is not None:  # CLIPModel, SiglipModel: images beside the token ids, which no config sizes
            given = ", ".join(derived.example)
            raise ResidencyError(f"{path}: {type(model).__name__} reads {needed!r} beside {given}: its shape is not "
                                 "in its config", hint=f"{PYTHON_ROUTE}, with example_inputs=dict({given}=…, "
                                 f"{needed}=…)") from e
        raise ResidencyError(f"{path}: {e.message}",
                             hint=f"most often a value of {path / MODEL_CONFIG} the model's code cannot take (the line "
                                  f"above reads it): fix it; or {PYTHON_ROUTE}") from e
