"""DeviceProfile <-> JSON: a versioned document with units in its field names, written atomically.

Loading validates every number; errors name the file, the field, the value and the unit expected.
Fields are read with profile_reader.ProfileReader; the optional refinements by profile_refinements.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from profiles import profiles_dir, shipped_profile_paths
from residency.atomic_file import atomic_output
from residency.device.profile import (
    BACKENDS,
    COMPUTE_DTYPES,
    EXEC_MODE_FIELDS,
    LINK_DIRECTIONS,
    OPTIONAL_FIELDS,
    Curve,
    DeviceProfile,
    Provenance,
)
from residency.device.profile_reader import (
    CONV_AXES,
    DEQUANT_TENSOR_AXES,
    ELEMENTWISE_AXES,
    LINK_AXES,
    LINK_GBPS_CEILING,
    MATMUL_AXES,
    REWARM_AXES,
    ProfileReader,
    no_extra,
)
from residency.device.profile_refinements import rates_for_calls, read_refinements
from residency.errors import ResidencyError, UsageError
from residency.jsonfile import read_json
from residency.userpath import FILE, MISSING, path_kind
from residency.validate import did_you_mean, document_kind, show, use_of

# 2: per-engine interference (copy_slowdown, compute_slowdown), compute_scale, calibration and what execution
# modes cost (EXEC_MODE_FIELDS). A profile that
# sets none of them is still written as version 1, which older readers load (the shipped datasheet profiles).
PROFILE_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
SCHEMA_2_FIELDS = ("copy_slowdown", "compute_slowdown", "compute_scale", "call_host_us", "streamed_call_host_us",
                   "calibration", *EXEC_MODE_FIELDS, "attention_tflops", "conv_tflops", "matmul_rewarm_us",
                   "dequant_call_us", "dequant_tensor_gweights_per_s", "dequant_fresh_factor")
# Top-level groups of numbers that must each say where they came from.
PROVENANCE_FIELDS = (
    "memory",
    "link",
    "device_memory_gbps",
    "matmul_tflops",
    "dequant_gweights_per_s",
    "copy_compute_overlap",
    "launch_overhead_us",
)
_STRINGS = ("name", "vendor", "backend", "torch_version", "cuda_version", "hip_version", "driver", "date")
_MEMORY = ("memory_total_bytes", "memory_reserve_bytes", "memory_usable_bytes")
MIN_DEVICE_BYTES = 16 * 2**20  # less memory than any device (or host) a profile describes: a figure in GiB, not bytes
_TOP_KEYS = ("schema_version", *_STRINGS, *_MEMORY, "link", "device_memory_gbps", "matmul_tflops",
             "dequant_gweights_per_s", "copy_compute_overlap", "launch_overhead_us", "compute_threads", "provenance",
             *OPTIONAL_FIELDS)
MAX_COMPUTE_THREADS = 4096


# ---------------------------------------------------------------- writing
def _curve_to_dict(curve: Curve, axes: tuple[str, str]) -> dict[str, list[float]]:
    # Sizes and rows are whole numbers: write 65536, not 65536.0 (the value read back is the same).
    xs = [int(x) if float(x).is_integer() else x for x in curve.x]
    return {axes[0]: xs, axes[1]: list(curve.y), "spread": list(curve.spread)}


def schema_version_of(profile: DeviceProfile) -> int:
    """The oldest schema that holds `profile`: 1 unless it sets a field of SCHEMA_2_FIELDS."""
    uses_2 = (profile.copy_slowdown or profile.compute_slowdown or profile.compute_scale
              or profile.call_host_us or profile.streamed_call_host_us or profile.calibration is not None
              or any(getattr(profile, k) for k in EXEC_MODE_FIELDS)
              or profile.attention_tflops or profile.conv_tflops or profile.matmul_rewarm_us is not None
              or profile.dequant_call_us or profile.dequant_tensor_gweights_per_s or profile.dequant_fresh_factor)
    return PROFILE_SCHEMA_VERSION if uses_2 else 1


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The JSON document of `profile` (schema_version_of it); refinements only when measured or calibrated."""
    doc: dict[str, Any] = {"schema_version": schema_version_of(profile)}
    doc.update({k: getattr(profile, k) for k in _STRINGS + _MEMORY})
    doc["link"] = {d: _curve_to_dict(c, LINK_AXES) for d, c in profile.link.items()}
    doc["device_memory_gbps"] = profile.device_memory_gbps
    doc["matmul_tflops"] = {d: _curve_to_dict(c, MATMUL_AXES) for d, c in profile.matmul_tflops.items()}
    doc["dequant_gweights_per_s"] = dict(profile.dequant_gweights_per_s)
    doc["copy_compute_overlap"] = profile.copy_compute_overlap
    doc["launch_overhead_us"] = profile.launch_overhead_us
    doc["compute_threads"] = profile.compute_threads
    # The refinements are written only when measured: datasheet profiles stay as they were.
    if profile.matmul_weight_dim:
        doc["matmul_weight_dim"] = profile.matmul_weight_dim
    if profile.matmul_small_weight_dim:
        doc["matmul_small_weight_dim"] = profile.matmul_small_weight_dim
    if profile.matmul_small_tflops:
        doc["matmul_small_tflops"] = {d: _curve_to_dict(c, MATMUL_AXES) for d, c in profile.matmul_small_tflops.items()}
    if profile.elementwise_gelems_per_s is not None:
        doc["elementwise_gelems_per_s"] = _curve_to_dict(profile.elementwise_gelems_per_s, ELEMENTWISE_AXES)
    if profile.attention_tflops:
        doc["attention_tflops"] = {d: _curve_to_dict(c, MATMUL_AXES) for d, c in profile.attention_tflops.items()}
    if profile.conv_tflops:
        doc["conv_tflops"] = {d: _curve_to_dict(c, CONV_AXES) for d, c in profile.conv_tflops.items()}
    if profile.matmul_rewarm_us is not None:
        doc["matmul_rewarm_us"] = _curve_to_dict(profile.matmul_rewarm_us, REWARM_AXES)
    if profile.dequant_call_us:
        doc["dequant_call_us"] = dict(profile.dequant_call_us)
    if profile.dequant_tensor_gweights_per_s:
        doc["dequant_tensor_gweights_per_s"] = {f: _curve_to_dict(c, DEQUANT_TENSOR_AXES)
                                                for f, c in profile.dequant_tensor_gweights_per_s.items()}
    if profile.dequant_fresh_factor:
        doc["dequant_fresh_factor"] = dict(profile.dequant_fresh_factor)
    doc.update(_schema_2_to_dict(profile))
    doc["provenance"] = {
        k: {"kind": p.kind, "source": p.source, "derating": p.derating} for k, p in profile.provenance.items()
    }
    return doc


def _schema_2_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The schema-2 fields that `profile` sets (none for a profile of schema 1)."""
    doc: dict[str, Any] = {}
    if profile.copy_slowdown:
        doc["copy_slowdown"] = profile.copy_slowdown
    if profile.compute_slowdown:
        doc["compute_slowdown"] = profile.compute_slowdown
    if profile.compute_scale:
        doc["compute_scale"] = dict(profile.compute_scale)
    if profile.call_host_us:
        doc["call_host_us"] = profile.call_host_us
    if profile.streamed_call_host_us:
        doc["streamed_call_host_us"] = profile.streamed_call_host_us
    doc.update({k: getattr(profile, k) for k in EXEC_MODE_FIELDS if getattr(profile, k)})
    if profile.calibration is not None:
        c = profile.calibration
        doc["calibration"] = {"base_fingerprint": c.base_fingerprint, "workload_fingerprint": c.workload_fingerprint,
                              "model": c.model, "frames": c.frames, "date": c.date, "note": c.note}
    return doc


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write `profile` as JSON to `path` atomically (the old file or the new one, never half of one)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ResidencyError(f"{path}: directory {path.parent} does not exist",
                             hint="create it first, or give -o a path in an existing directory")
    text = json.dumps(profile_to_dict(profile), indent=2) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading
def _check_document(r: ProfileReader, data: Any, source: str) -> None:
    """Raises unless `data` is an object of a readable schema version with no unknown top-level key; a version-1
    document may not hold the fields version 2 added."""
    kind = document_kind(data)  # before any field: a trace has no schema_version, and said only that
    if kind is not None and "device profile" not in kind:
        raise ResidencyError(f"{source}: this is {kind}, not a device profile",
                             hint=f"{use_of(kind) or 'use it where it belongs'}; for a profile give a shipped name "
                                  "(`residency profiles`) or a file written by `residency profile -o`")
    if not isinstance(data, dict):
        raise ResidencyError(f"{source}: expected a JSON object, got {type(data).__name__}",
                             hint="give a file written by `residency profile -o`")
    version = r.need(data, "schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise r.fail("schema_version", f"= {show(version)}: expected a whole number (the bare JSON integer "
                     f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}, not a string)")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise r.fail("schema_version", f"= {show(version)}: this version of residency reads schema_version "
                     f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
                     hint="re-create the profile with this version of `residency profile`")
    newer = [key for key in SCHEMA_2_FIELDS if key in data] if version == 1 else []
    if newer:
        raise r.fail(newer[0], "needs schema_version 2 (the file says 1)",
                     hint="set \"schema_version\": 2, or remove the field")
    no_extra(r, data, _TOP_KEYS, "")


def _strings(r: ProfileReader, data: dict[str, Any]) -> dict[str, str]:
    strings = {k: r.text(data, k) for k in _STRINGS}
    if strings["backend"] not in BACKENDS:
        raise r.fail("backend", f"= {show(strings['backend'])}: expected one of {', '.join(BACKENDS)}")
    try:  # what `residency profile` writes (date.isoformat())
        datetime.date.fromisoformat(strings["date"])
    except ValueError:
        raise r.fail("date", f"= {show(strings['date'])}: expected the ISO date the numbers were measured or looked "
                             "up, e.g. 2026-11-23") from None
    return strings


def _memory(r: ProfileReader, data: dict[str, Any]) -> dict[str, int]:
    """The three memory sizes in bytes; usable may not exceed total."""
    total = r.number(r.get(data, "memory_total_bytes"), "memory_total_bytes", "bytes", integer=True)
    if total < MIN_DEVICE_BYTES:  # 16 written for a 16 GiB card: a device of 16 bytes, planned as such
        raise r.fail("memory_total_bytes", f"= {int(total)}: below any device's memory (at least "
                     f"{MIN_DEVICE_BYTES // 2**20} MiB)", hint="write it in bytes, e.g. 17179869184 for 16 GiB; "
                     "memory_reserve_bytes and memory_usable_bytes are bytes too")
    reserve = r.number(r.get(data, "memory_reserve_bytes"), "memory_reserve_bytes", "bytes", strict=False, integer=True)
    usable = r.number(r.get(data, "memory_usable_bytes"), "memory_usable_bytes", "bytes", integer=True)
    if usable > total:
        raise r.fail("memory_usable_bytes", f"= {usable}: exceeds memory_total_bytes = {total}")
    if reserve + usable > total:  # the reserve is held back from the total, so both fit within it
        raise r.fail("memory_reserve_bytes", f"= {reserve}: with memory_usable_bytes = {usable} it exceeds "
                     f"memory_total_bytes = {total} (usable + reserve ≤ total)")
    return {"memory_total_bytes": int(total), "memory_reserve_bytes": int(reserve),
            "memory_usable_bytes": int(usable)}


def _curves(r: ProfileReader, data: dict[str, Any]) -> tuple[dict[str, Curve], dict[str, Curve]]:
    """The link curves (one per direction, GB/s over bytes) and matmul curves (one per dtype, TFLOP/s over rows)."""
    link_doc = r.obj(r.get(data, "link"), "link")
    no_extra(r, link_doc, LINK_DIRECTIONS, "link")
    link = {d: r.curve(r.get(link_doc, d, "link"), f"link.{d}", LINK_AXES) for d in LINK_DIRECTIONS}
    for d, c in link.items():
        fast = next((i for i, y in enumerate(c.y) if y > LINK_GBPS_CEILING), None)
        if fast is not None:
            raise r.fail(f"link.{d}.gbps[{fast}]", f"= {c.y[fast]:g}: above any host link (at most "
                         f"{LINK_GBPS_CEILING:g} GB/s)", hint="write it in GB/s, 1e9 bytes per second (a figure in "
                         "MB/s?); re-create it with `residency profile -o`, or fix the field by hand")
    matmul_doc = r.obj(r.get(data, "matmul_tflops"), "matmul_tflops")
    no_extra(r, matmul_doc, COMPUTE_DTYPES, "matmul_tflops")
    matmul = {d: r.curve(r.get(matmul_doc, d, "matmul_tflops"), f"matmul_tflops.{d}", MATMUL_AXES)
              for d in COMPUTE_DTYPES}
    return link, matmul


def _dequant(r: ProfileReader, data: dict[str, Any]) -> dict[str, float]:
    """Dequant rates in 1e9 weights per second, by storage format: at least one, every name a known format."""
    from residency.formats import FORMATS

    dequant_doc = r.obj(r.get(data, "dequant_gweights_per_s"), "dequant_gweights_per_s")
    if not dequant_doc:
        raise r.fail("dequant_gweights_per_s", "is empty: give a rate for each storage format")
    no_extra(r, dequant_doc, tuple(FORMATS), "dequant_gweights_per_s")
    return {f: r.number(v, f"dequant_gweights_per_s.{f}", "gweights_per_s") for f, v in dequant_doc.items()}


def _overlap(r: ProfileReader, data: dict[str, Any]) -> float:
    overlap = r.number(r.get(data, "copy_compute_overlap"), "copy_compute_overlap", "fraction 0..1", strict=False)
    if overlap > 1.0:
        raise r.fail("copy_compute_overlap", f"= {overlap!r}: must lie in [0, 1] (a fraction of the copy hidden)")
    return overlap


def _provenance(r: ProfileReader, data: dict[str, Any], refinements: dict[str, Any]) -> dict[str, Provenance]:
    """Where each group of numbers came from; every group in PROVENANCE_FIELDS, and each refinement present,
    must have one."""
    prov_doc = r.obj(r.get(data, "provenance"), "provenance")
    # the refinements present need a provenance too (their dims are labels, not figures)
    present = tuple(k for k in ("matmul_small_tflops", "elementwise_gelems_per_s", "copy_slowdown",
                                "compute_slowdown", *EXEC_MODE_FIELDS, "attention_tflops", "conv_tflops",
                                "matmul_rewarm_us",
                                "dequant_call_us", "dequant_tensor_gweights_per_s", "dequant_fresh_factor")
                    if refinements[k])
    for key in PROVENANCE_FIELDS + present:
        if key not in prov_doc:
            raise r.fail(f"provenance.{key}", "is missing: every number must say where it came from",
                         hint="add {\"kind\": \"measured\"|\"datasheet\", \"source\": …, \"derating\": …}")
    return {k: r.provenance(v, f"provenance.{k}") for k, v in prov_doc.items()}


def profile_from_dict(data: Any, source: str) -> DeviceProfile:
    """Build and validate a DeviceProfile from a parsed JSON document; `source` names it in errors.

    Raises ResidencyError on the first field that is missing, unknown, of the wrong type or unit, or out of
    range; the message names `source`, the field, the value and the unit expected.
    """
    r = ProfileReader(source)
    # The checks run in document order: a document with several faults always reports the same first one.
    _check_document(r, data, source)
    strings = _strings(r, data)
    memory = _memory(r, data)
    link, matmul = _curves(r, data)
    dequant = _dequant(r, data)
    overlap = _overlap(r, data)
    refinements = read_refinements(r, data)
    rates_for_calls(r, dequant, refinements["dequant_call_us"], "dequant_call_us")
    rates_for_calls(r, dequant, refinements["dequant_tensor_gweights_per_s"], "dequant_tensor_gweights_per_s")
    rates_for_calls(r, dequant, refinements["dequant_fresh_factor"], "dequant_fresh_factor")
    provenance = _provenance(r, data, refinements)
    return DeviceProfile(
        **strings,
        **memory,
        link=link,
        device_memory_gbps=r.number(r.get(data, "device_memory_gbps"), "device_memory_gbps", "gbps"),
        matmul_tflops=matmul,
        dequant_gweights_per_s=dequant,
        copy_compute_overlap=overlap,
        launch_overhead_us=r.number(r.get(data, "launch_overhead_us"), "launch_overhead_us", "us", strict=False),
        compute_threads=r.integer(data.get("compute_threads", 0), "compute_threads", 0, MAX_COMPUTE_THREADS,
                                  unit="threads"),
        provenance=provenance,
        **refinements,
    )


def read_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    """The profile in the JSON file at `path`. Raises ResidencyError when the file cannot be read or parsed,
    or a field is invalid."""
    data = read_json(path, "the profile", "check the path; `residency profiles` lists the shipped ones, "
                     "`residency profile -o` writes one")
    return profile_from_dict(data, str(path))


def shipped_profile_names() -> list[str]:
    """The names (file stems) of the profiles shipped in `profiles/`."""
    return [p.stem for p in shipped_profile_paths()]


def profile_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped profile's file by name (`rx-7800-xt`), or the given path when it names a file."""
    text = os.fspath(name_or_path)
    candidate = Path(text)
    kind, _ = path_kind(text)
    if kind == FILE:
        return candidate
    shipped = profiles_dir() / f"{text}.json"
    if os.sep not in text and "/" not in text and path_kind(shipped)[0] == FILE:
        return shipped
    # a bare name that exists here (a directory, a FIFO) is that path, not an unknown shipped name
    looks_like_path = candidate.suffix == ".json" or os.sep in text or "/" in text or kind != MISSING
    if looks_like_path and kind != MISSING:
        return candidate  # a directory, a FIFO or an unusable name: read_json says which, without opening a FIFO
    if looks_like_path:
        raise ResidencyError(f"{show(text)}: no such profile file",
                             hint="check the path, or give a shipped profile name: "
                             + ", ".join(shipped_profile_names()))
    # a name not known is a mistake in the command line (exit 2), as an unknown model's is
    raise UsageError(f"unknown profile {show(text)}{did_you_mean(text, shipped_profile_names())}",
                     hint="shipped profiles: " + ", ".join(shipped_profile_names())
                     + "; or measure this machine with `residency profile -o PATH`")


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load and validate a shipped profile by name ("rtx-4090"; `residency profiles` lists them), or a
    profile file by path (written by `residency profile -o`).

    Raises ResidencyError for an unknown name, an unreadable file or an invalid field (naming it)."""
    return read_profile(profile_path(name_or_path))


def resolve_profile(name_or_path: str | os.PathLike[str] | DeviceProfile) -> DeviceProfile:
    """What `--profile NAME|PATH` means everywhere; a DeviceProfile passes through unchanged."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):  # None or a number: a bare TypeError from pathlib
        raise ResidencyError(f"profile {name_or_path!r:.60}: give a shipped name, a profile file's path or a "
                             "DeviceProfile", hint="`residency profiles` lists the shipped names")
    return load_profile(name_or_path)
