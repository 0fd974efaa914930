"""An output path that names one of the command's own inputs, refused before any work.

`plan c1.json -o c1.json` replaced the catalog file with the plan, `run --plan p.json --trace p.json` the plan with
the trace, `plan md3 -o md3/config.json` the model directory's config: each exited 0 and the input was gone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from residency.atomic_file import through_link
from residency.errors import UsageError

# the arguments that name files a command reads, and those it writes (per command: `trace` is dashboard's input)
INPUT_ARGS = ("model", "profile", "plan", "image", "actions")
OUTPUT_ARGS = ("output", "trace")
DEMO_OUTPUTS = ("demo.gif", "demo-trace.json")  # what `demo -o DIR` writes in DIR
READS_TRACE = ("dashboard",)
# files of a model directory that a command reads: its configs (config.json, a component's, a tokenizer's or
# scheduler's *_config.json, model_index.json), weights and shard indexes; a plan.json written there is not one
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_READ_NAMES = ("model_index.json",)
_READ_ENDINGS = ("config.json", ".index.json")


def check_outputs_apart(args: argparse.Namespace) -> None:
    """Raise UsageError when an output of `args` is the same file as an input, or a file a model directory given
    as input holds (a config, a shard)."""
    inputs = [(name, getattr(args, name)) for name in INPUT_ARGS if isinstance(getattr(args, name, None), str)]
    if args.command in READS_TRACE:
        return
    outputs = [(f"--{name}" if name != "output" else "-o", getattr(args, name)) for name in OUTPUT_ARGS
               if isinstance(getattr(args, name, None), str)]
    out_dir = getattr(args, "output_dir", None)
    if isinstance(out_dir, str):
        outputs += [("-o", os.path.join(out_dir, f)) for f in DEMO_OUTPUTS]
    for flag, out in outputs:
        if flag == "-o" and args.command == "run" and out.lower().endswith(".png"):
            continue  # numbered frames (out-0000.png …), never out.png itself; media refuses existing ones
        # a link is written where it points (atomic_file.through_link): its target is judged too, by its own name
        # (plan.json linking to the model's model.safetensors replaced the weights with the plan)
        places = dict.fromkeys((Path(out), through_link(Path(out))))
        owned = next((o for o in map(lambda p: _owned(p, args.command), places) if o is not None), None)
        if owned is not None:
            raise UsageError(f"{flag} {out[:200]}: {owned}",
                             hint="write the output to another file")
        for name, value in inputs:
            how = next((h for h in (_clash(p, Path(value)) for p in places) if h is not None), None)
            if how is not None:
                shown = "the model" if name == "model" else f"--{name}"
                raise UsageError(f"{flag} {out[:200]}: {how} {shown} {value[:200]}, which this command reads; writing "
                                 "there would replace it", hint="write the output to another file")


def _owned(out: Path, command: str) -> str | None:
    """What `out` is when residency reads it without its path being given: an existing shipped profile
    (`--profile rx-7800-xt`) or catalog entry (`plan flux-schnell`); any file of its calibration cache, new or not
    (every .json there is read as a calibrated profile, and `profiles --remove-calibrated` deletes it: a plan written
    there was skipped with a note on every run); an existing file of the rest of its cache (this machine's profile,
    read when no --profile is given). `profile` may write this machine's cached profile (a full measurement over the
    quick one), nothing else there (it overwrote an older method's cache file).
    `plan tiny --profile rx-7800-xt -o profiles/rx-7800-xt.json` replaced the shipped profile with the plan, and every
    later use of the name failed; named by path they are caught as inputs (_clash). None for anything else."""
    from pipelines.catalog import catalog_dir
    from profiles import profiles_dir
    from residency.device.auto_profile import cache_dir, cached_profile_path
    from residency.device.calibrated import calibrated_dir

    try:
        at = out.resolve()
        cache = cache_dir().resolve()
        if at.is_relative_to(calibrated_dir().resolve()):
            return (f"in residency's calibration cache ({calibrated_dir()}), where every .json is read as a "
                    "calibrated profile and `residency profiles --remove-calibrated` deletes it")
        if command == "profile" and at.is_relative_to(cache):
            if at in (cached_profile_path(kind).resolve() for kind in ("cpu", "cuda")):
                return None
            return (f"in residency's cache ({cache}), where `profile -o` writes only this machine's cached profile "
                    f"({cached_profile_path('cpu').name} or {cached_profile_path('cuda').name})")
        if not out.is_file():
            return None
        if at.suffix.lower() == ".json" and at.parent == profiles_dir().resolve():
            return f"that is the shipped profile {at.stem}, which `--profile {at.stem}` reads; writing there would replace it"
        if at.suffix.lower() == ".json" and at.parent == catalog_dir().resolve():
            return (f"that is the catalog entry {at.stem}, which `plan {at.stem}` and `inspect {at.stem}` read; writing "
                    "there would replace it")
        if at.is_relative_to(cache) and command != "profile":
            return (f"that is a file of residency's cache ({cache}), which it reads on its own (the machine's measured "
                    "and calibrated profiles); writing there would replace it")
    except (OSError, ValueError, RuntimeError):  # an unreadable or looping path: the command's own checks say why
        return None
    return None


def _clash(out: Path, source: Path) -> str | None:
    """How `out` is the input `source` ("that is", "a file of"), or None."""
    try:
        if not source.exists():  # a catalog or profile name, not a path
            return None
        if source.is_dir():
            name = out.name.lower()
            read = (out.suffix.lower() in _WEIGHT_SUFFIXES or name in _READ_NAMES or name.endswith(_READ_ENDINGS))
            # the parent resolved, not the file: a snapshot's config.json is a link into ../../blobs
            inside = read and out.exists() and out.parent.resolve().is_relative_to(source.resolve())
            return "a file of" if inside else None
        same = os.path.samefile(out, source) if out.exists() else out.resolve() == source.resolve()
        return "that is" if same else None
    except (OSError, ValueError, RuntimeError):  # an unreadable or looping path: the command's own checks say why
        return None
