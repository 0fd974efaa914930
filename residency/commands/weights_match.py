"""Whether a model directory's weight files are the model its config.json describes.

`plan DIR` counts the model the config builds; `inspect DIR` reads the weight files. A config.json beside
weights of another model (six layers in the config, two in the file; a UNet's config beside a Llama's weights)
made the two disagree with nothing said. Only the safetensors headers are read (no tensor data).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from residency.errors import ResidencyError

SHOWN = 3  # names shown in a note or an error; the count says how many more
REPLACE_HINT = ("put back the config.json saved with these weights (save_pretrained writes both), or plan the "
                "config alone in a directory of its own")


Stored = dict[str, tuple[tuple[int, ...], str, bool]]  # tensor name -> (shape, file, comparable by shape)


def _stored_shapes(path: Path) -> tuple[Stored, list[str]] | None:
    """Per stored tensor name of one variant (checkpoint.one_variant): its shape, file, and whether its shape is the model's
    to compare; and the files read. None where there is nothing to compare: no .safetensors file, or a .gguf beside
    (llama.cpp names its tensors its own way)."""
    from residency.checkpoint.checkpoint import one_variant, promised_shards, shard_indexes
    from residency.checkpoint.safetensors_io import read_safetensors

    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = one_variant([p for p in files if p.suffix.lower() == ".safetensors"])
    if not weights or any(p.suffix.lower() == ".gguf" for p in files):
        return None
    listed = {v for weight_map in shard_indexes(path).values() for v in weight_map.values()}
    listed |= promised_shards(weights)  # model.fp16-00001-of-00007 …: a variant has no index read here
    absent = sorted(listed - {p.name for p in files})
    if absent:  # its tensors would be said to be missing from the model: the download is what is unfinished
        raise ResidencyError(f"{len(absent)} shard(s) its index names are missing ({', '.join(absent[:SHOWN])})")
    stored: Stored = {}
    for file in weights:
        found, _meta, others = read_safetensors(file, file.stat().st_size)  # the header only
        stored.update((e.name, (tuple(e.shape), file.name, True)) for e in found)
        # integer tensors (a packed 4-bit weight, an index): present, their shapes not the model's
        stored.update((o.name, (tuple(o.shape), file.name, False)) for o in others)
    return stored, [p.name for p in weights]


def _ignored(model, attribute: str) -> list[re.Pattern]:
    """transformers' own lists of names it does not miss, or does not expect, on loading (regular expressions)."""
    return [_compile(p) for p in getattr(model, attribute, None) or [] if isinstance(p, str)]


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(re.escape(pattern))


def _conversions(model) -> tuple[list[tuple[re.Pattern, str]], list[re.Pattern], list[re.Pattern]] | None:
    """What the model's library does to stored names on loading: (renames as (pattern, replacement): CLIP's
    `^text_model\\.(.+)` → `\\1`, Llava's language_model prefix; the stored names converters fuse or reshape (Mixtral's
    experts.*.w1, Qwen3-VL-MoE's transposed experts); the model names they make). transformers v5's conversion
    mapping, v4's `_checkpoint_conversion_mapping`; nothing for diffusers and plain models. None when the library
    fails to say (then nothing is compared)."""
    renames = [(_compile(str(k)), str(v)) for k, v in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items()]
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import WeightConverter, get_model_conversion_mapping
    except ImportError:  # transformers before v5 (or none): the v4 mapping above is all there is
        return renames, [], []
    sources, targets = [], []
    if isinstance(model, PreTrainedModel):
        try:
            transforms = get_model_conversion_mapping(model)
        except Exception:  # noqa: BLE001 - a library's internal failing: then nothing is compared
            return None
        for t in transforms:
            src, tgt = list(getattr(t, "source_patterns", None) or []), list(getattr(t, "target_patterns", None) or [])
            if isinstance(t, WeightConverter) or not tgt:
                sources += [_compile(str(p)) for p in src]
                targets += [_compile(str(p)) for p in tgt]
            else:
                renames += [(_compile(str(p)), str(tgt[i] if len(tgt) == len(src) else tgt[0])) for i, p in enumerate(src)]
    return renames, sources, targets


def _renamed(name: str, renames: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in renames:
        if pattern.search(name):
            try:
                name = pattern.sub(replacement, name, count=1)
            except (re.error, IndexError):  # a replacement naming a group the pattern lacks: left as stored
                continue
    return name


def check_weights_match(path: Path, model, hint: str | None = None) -> None:
    """Raise ResidencyError where the weight files in `path` cannot be `model`'s (a tensor of another shape, or
    none of its tensors there); say on stderr which of its tensors they lack, or hold beyond it. Silent for a
    directory without safetensors files, where the config is of a quantized checkpoint (its tensors are named
    and shaped by the quantizer: qweight, scales), and where a stored name is one the library converts on loading.
    `hint`: the refusals' (where the model was built as another class than its config's, that is the fix; None:
    put back the config saved with the weights)."""
    hint = hint or REPLACE_HINT
    config = getattr(model, "config", None)
    quantized = (config.get("quantization_config") if isinstance(config, dict)
                 else getattr(config, "quantization_config", None))
    if quantized:
        return
    try:
        read = _stored_shapes(path)
    except (ResidencyError, OSError) as e:
        print(f"note: {path}: its weights were not compared with its config.json: {getattr(e, 'message', e)}",
              file=sys.stderr)
        return
    if read is None:
        pickled = pickled_weights(path)
        if pickled:  # compared with nothing, and said (a 6-layer config beside 2-layer .bin weights went unsaid)
            print(f"note: {path}: its weights are {pickled} (a pickle, which residency does not read): not compared "
                  "with its config.json", file=sys.stderr)
        return
    stored, files = read
    conversions = _conversions(model)
    if conversions is None:
        return
    renames, fused, made = conversions
    converted = False  # a stored name the library converts: then only shapes of names met as they are are judged
    as_loaded: Stored = {}
    for name, where in stored.items():
        if any(p.search(name) for p in fused):  # fused or reshaped on loading: not comparable as stored
            converted = True
            continue
        loaded = _renamed(name, renames)
        converted |= loaded != name
        as_loaded[loaded] = where
    stored = as_loaded
    prefix = getattr(model, "base_model_prefix", "") or ""

    def key(name: str) -> str:  # a checkpoint of the base model (LlamaModel) beside LlamaForCausalLM's config
        return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name

    by_key = {key(n): v for n, v in stored.items()}
    tied: dict[int, list[str]] = defaultdict(list)  # a tied lm_head is the embedding: one tensor, either name
    shapes: dict[int, tuple[int, ...]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied[id(p)].append(name)
        shapes[id(p)] = tuple(p.shape)
    not_missed = _ignored(model, "_keys_to_ignore_on_load_missing")
    missing, wrong, claimed = [], [], set()
    for pid, names in tied.items():
        if any(p.search(n) for p in made for n in names):  # made on loading from tensors stored otherwise
            continue
        hits = [n for n in names if key(n) in by_key]
        claimed.update(key(n) for n in hits)
        if not hits:
            if not any(p.search(n) for p in not_missed for n in names):
                missing.append(names[0])
            continue
        shape, file, comparable = by_key[key(hits[0])]
        if comparable and shape != shapes[pid]:
            wrong.append((hits[0], shape, file, shapes[pid]))
    cls = type(model).__name__
    if tied and len(claimed) == 0 and not converted:
        example, own = next(iter(stored), ""), next(iter(tied.values()))[0]
        raise ResidencyError(f"{path}: its weights are not the {cls} its config.json describes: none of the "
                             f"{len(tied)} weights it has (e.g. {own!r:.80}) is in {_files(files)}, which "
                             f"hold{'s' if len(files) == 1 else ''} {len(stored)} others (e.g. {example!r:.80})",
                             hint=hint)
    if wrong:
        name, shape, file, expected = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ResidencyError(f"{path}: its weights do not fit its config.json: {name!r:.80} is {list(shape)} in "
                             f"{file} but {list(expected)} in the {cls} the config describes{more}",
                             hint=hint)
    if converted:  # the library renames or fuses some names on loading: what is missing or extra is not known here
        return
    buffers = {key(n) for n, _ in model.named_buffers()}  # a rotary inv_freq an older checkpoint saved
    not_expected = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    extra = [n for n in stored if key(n) not in claimed and key(n) not in buffers
             and not any(p.search(n) for p in not_expected)]
    if missing:
        print(f"note: {path}: {len(missing)} of the {len(tied)} weights of the {cls} its config.json describes are "
              f"not in {_files(files)} ({_names(missing)}): the plan counts the model the config describes; "
              "loading these weights into it would leave those freshly initialised", file=sys.stderr)
    if extra:
        print(f"note: {path}: {_files(files)} hold{'s' if len(files) == 1 else ''} {len(extra)} tensors the {cls} "
              f"its config.json describes has no place for ({_names(extra)}): they are not planned",
              file=sys.stderr)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files: loading one runs its code


# a Trainer's checkpoint directory holds its state beside the model's weights: never the weights
TRAINER_STATE = ("optimizer", "scheduler", "rng_state", "training_args", "scaler", "trainer_state")


def pickled_weights(path: Path) -> str:
    """The model's .bin/.pt/.pth/.ckpt weights file in `path` ('' when none or unlistable): weights residency cannot
    read. pytorch_model*.bin and diffusion_pytorch_model*.bin first; a Trainer's optimizer.pt, rng_state.pth … never."""
    try:
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
                       and not p.name.lower().startswith(TRAINER_STATE))
    except OSError:
        return ""
    return next((f for f in files if "model" in f.lower()), files[0] if files else "")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n[:80]) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _files(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"its {len(files)} weight files"
