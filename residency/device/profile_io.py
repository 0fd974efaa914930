"""DeviceProfile <-> JSON: a versioned document with units in its field names, written atomically.

Loading validates every number; errors name the file, the field, the value and the unit expected.
"""

from __future__ import annotations

import json
import math
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
    MAX_SLOWDOWN,
    OPTIONAL_FIELDS,
    PROVENANCE_KINDS,
    Calibration,
    Curve,
    DeviceProfile,
    Provenance,
)
from residency.errors import ResidencyError
from residency.jsonfile import read_json
from residency.userpath import FILE, MISSING, path_kind
from residency.validate import Reader, show

# 2: per-engine interference (copy_slowdown, compute_slowdown), compute_scale, calibration and what execution
# modes cost (EXEC_MODE_FIELDS). A profile that
# sets none of them is still written as version 1, which older readers load (the shipped datasheet profiles).
PROFILE_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
SCHEMA_2_FIELDS = ("copy_slowdown", "compute_slowdown", "compute_scale", "call_host_us", "streamed_call_host_us",
                   "calibration", *EXEC_MODE_FIELDS, "attention_tflops", "conv_tflops", "matmul_rewarm_us",
                   "dequant_call_us")
# Bounds of the execution-mode figures: beyond them a figure is a typo or a broken measurement.
MAX_GRAPH_REPLAY_US = 1e3  # per kernel; an eager launch costs 2-20 µs
MAX_COMPILE_S = 3600.0  # one block class; a cold inductor compile of a DiT block takes ~20 s on 2 cores
MAX_GRAPH_POOL_BYTES = 2**40
MAX_COMPUTE_SCALE = 100.0  # a calibration that finds compute 100× off the model measured something else
MAX_STREAMED_CALL_HOST_US = 1e5  # 0.1 s of host time per streamed call is a broken measurement, not overhead
MAX_DEQUANT_CALL_US = 1e5  # 0.1 s to start one unpack is a broken measurement (measured: 15-600 µs on a CPU)
_CALIBRATION_STRINGS = ("base_fingerprint", "workload_fingerprint", "model", "date")
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
# JSON names of a curve's axes: link curves are GB/s over transfer bytes, matmul curves TFLOP/s over rows.
LINK_AXES = ("sizes_bytes", "gbps")
MATMUL_AXES = ("rows", "tflops")
ELEMENTWISE_AXES = ("tensor_elements", "gelems_per_s")  # rate over the size class of an op's largest tensor
REWARM_AXES = ("weight_elements", "us")  # µs lost after a matmul over the elements of its weight
CONV_AXES = ("kernel_elements", "tflops")  # a conv2d's TFLOP/s over the elements of its kernel
# What each unit suffix means, for messages that say which unit is expected.
UNIT_TEXT = {
    "bytes": "bytes",
    "gbps": "GB/s (1e9 bytes per second)",
    "tflops": "TFLOP/s (1e12 per second)",
    "us": "microseconds",
    "gweights_per_s": "1e9 weights per second",
    "gelems_per_s": "1e9 elements per second",
    "dim": "elements along one side of a square weight matrix",
    "tensor_elements": "elements of a tensor",
    "rows": "token rows",
    "weight_elements": "elements of a weight matrix",
    "kernel_elements": "elements of a conv kernel (out × in × kernel height × width)",
}
_STRINGS = ("name", "vendor", "backend", "torch_version", "cuda_version", "hip_version", "driver", "date")
_MEMORY = ("memory_total_bytes", "memory_reserve_bytes", "memory_usable_bytes")
_TOP_KEYS = ("schema_version", *_STRINGS, *_MEMORY, "link", "device_memory_gbps", "matmul_tflops",
             "dequant_gweights_per_s", "copy_compute_overlap", "launch_overhead_us", "compute_threads", "provenance",
             *OPTIONAL_FIELDS)
MAX_QUANTITY = 1e30  # above any byte count, rate or size a device profile holds; keeps every value a float
MAX_COMPUTE_THREADS = 4096
_FIX_HINT = "re-create it with `residency profile -o`, or fix the field by hand"


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
              or profile.dequant_call_us)
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
        raise ResidencyError(f"{path}: directory {str(path.parent)!r} does not exist",
                             hint="create it first, or give -o a path in an existing directory")
    text = json.dumps(profile_to_dict(profile), indent=2) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading
class _Reader(Reader):
    """The shared document checks plus the profile's own: quantities with units, curves, provenance."""

    def __init__(self, source: str):
        super().__init__(source, _FIX_HINT)

    def get(self, doc: dict[str, Any], key: str, where: str = "") -> Any:
        return self.need(doc, key, where)

    def number(self, value: Any, field: str, unit: str, minimum: float = 0.0, strict: bool = True,
               integer: bool = False) -> float:
        what = f"a number in {UNIT_TEXT.get(unit, unit)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"= {show(value)}: expected {what}",
                            hint=f"write a bare JSON number in {UNIT_TEXT.get(unit, unit)}, without a unit")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(field, f"= {show(value)}: expected a finite number")
        if integer and isinstance(value, float) and not value.is_integer():
            raise self.fail(field, f"= {show(value)}: expected a whole number of {UNIT_TEXT.get(unit, unit)}")
        if (strict and value <= minimum) or (not strict and value < minimum):
            relation = "positive" if (strict and minimum == 0) else f"{'>' if strict else '≥'} {minimum}"
            raise self.fail(field, f"= {show(value)}: must be {relation} ({UNIT_TEXT.get(unit, unit)})")
        if value > MAX_QUANTITY:  # an integer of 400 digits has no float; no real figure comes near this
            raise self.fail(field, f"= {show(value)}: must be at most {MAX_QUANTITY:g} ({UNIT_TEXT.get(unit, unit)})")
        return int(value) if integer else float(value)

    def text(self, doc: dict[str, Any], key: str) -> str:
        return self.string(self.get(doc, key), key)

    def curve(self, value: Any, field: str, axes: tuple[str, str], positive: bool = True) -> Curve:
        """A Curve of `axes` (x, y); x > 0, y > 0 (≥ 0 when not `positive`)."""
        doc = self.obj(value, field)
        _no_extra(self, doc, (*axes, "spread"), field)
        xs = self.numbers(self.get(doc, axes[0], field), f"{field}.{axes[0]}", axes[0])
        ys = self.numbers(self.get(doc, axes[1], field), f"{field}.{axes[1]}", axes[1], strict=positive)
        spread_raw = doc.get("spread", [])
        spread = self.numbers(spread_raw, f"{field}.spread", "spread", strict=False, allow_empty=True)
        if len(xs) != len(ys):
            raise self.fail(field, f"has {len(xs)} {axes[0]} but {len(ys)} {axes[1]}: the lists must have equal length")
        if spread and len(spread) != len(xs):
            raise self.fail(f"{field}.spread", f"has {len(spread)} entries for {len(xs)} samples",
                            hint="give one spread per sample, or an empty list")
        for i in range(1, len(xs)):
            if xs[i] <= xs[i - 1]:
                raise self.fail(f"{field}.{axes[0]}", f"= {show(list(xs))}: must be strictly increasing "
                                f"({xs[i - 1]!r} then {xs[i]!r})", hint="sort the samples by size")
        return Curve(tuple(xs), tuple(ys), tuple(spread))

    def numbers(self, value: Any, field: str, unit: str, strict: bool = True, allow_empty: bool = False) -> list[float]:
        if not isinstance(value, list) or (not value and not allow_empty):
            raise self.fail(field, f"= {show(value)}: expected a non-empty list of numbers in {UNIT_TEXT.get(unit, unit)}")
        return [self.number(v, f"{field}[{i}]", unit, strict=strict) for i, v in enumerate(value)]

    def provenance(self, value: Any, field: str) -> Provenance:
        doc = self.obj(value, field)
        kind = doc.get("kind")
        if kind not in PROVENANCE_KINDS:
            raise self.fail(f"{field}.kind", f"= {show(kind)}: expected one of {', '.join(PROVENANCE_KINDS)}")
        source = doc.get("source")
        if not isinstance(source, str) or not source.strip():
            raise self.fail(f"{field}.source", f"= {show(source)}: say which command measured it or which page it came from")
        derating = doc.get("derating", "")
        if not isinstance(derating, str) or (kind == "datasheet" and not derating.strip()):
            raise self.fail(f"{field}.derating", f"= {show(derating)}: a datasheet figure must state how it was derated")
        return Provenance(kind, source, derating)


def _unit_of(key: str) -> str:
    for unit in sorted(UNIT_TEXT, key=len, reverse=True):
        if key.endswith("_" + unit) or key == unit:
            return unit
    return ""


def _check_document(r: _Reader, data: Any, source: str) -> None:
    """Raises unless `data` is an object of a readable schema version with no unknown top-level key; a version-1
    document may not hold the fields version 2 added."""
    if not isinstance(data, dict):
        raise ResidencyError(f"{source}: expected a JSON object, got {type(data).__name__}",
                             hint="give a file written by `residency profile -o`")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        raise r.fail("schema_version", f"= {show(version)}: this version of residency reads schema_version "
                     f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
                     hint="re-create the profile with this version of `residency profile`")
    newer = [key for key in SCHEMA_2_FIELDS if key in data] if version == 1 else []
    if newer:
        raise r.fail(newer[0], "needs schema_version 2 (the file says 1)",
                     hint="set \"schema_version\": 2, or remove the field")
    _no_extra(r, data, _TOP_KEYS, "")


def _strings(r: _Reader, data: dict[str, Any]) -> dict[str, str]:
    strings = {k: r.text(data, k) for k in _STRINGS}
    if strings["backend"] not in BACKENDS:
        raise r.fail("backend", f"= {show(strings['backend'])}: expected one of {', '.join(BACKENDS)}")
    return strings


def _memory(r: _Reader, data: dict[str, Any]) -> dict[str, int]:
    """The three memory sizes in bytes; usable may not exceed total."""
    total = r.number(r.get(data, "memory_total_bytes"), "memory_total_bytes", "bytes", integer=True)
    reserve = r.number(r.get(data, "memory_reserve_bytes"), "memory_reserve_bytes", "bytes", strict=False, integer=True)
    usable = r.number(r.get(data, "memory_usable_bytes"), "memory_usable_bytes", "bytes", integer=True)
    if usable > total:
        raise r.fail("memory_usable_bytes", f"= {usable}: exceeds memory_total_bytes = {total}")
    if reserve + usable > total:  # the reserve is held back from the total, so both fit within it
        raise r.fail("memory_reserve_bytes", f"= {reserve}: with memory_usable_bytes = {usable} it exceeds "
                     f"memory_total_bytes = {total} (usable + reserve ≤ total)")
    return {"memory_total_bytes": int(total), "memory_reserve_bytes": int(reserve),
            "memory_usable_bytes": int(usable)}


def _curves(r: _Reader, data: dict[str, Any]) -> tuple[dict[str, Curve], dict[str, Curve]]:
    """The link curves (one per direction, GB/s over bytes) and matmul curves (one per dtype, TFLOP/s over rows)."""
    link_doc = r.obj(r.get(data, "link"), "link")
    _no_extra(r, link_doc, LINK_DIRECTIONS, "link")
    link = {d: r.curve(r.get(link_doc, d, "link"), f"link.{d}", LINK_AXES) for d in LINK_DIRECTIONS}
    matmul_doc = r.obj(r.get(data, "matmul_tflops"), "matmul_tflops")
    _no_extra(r, matmul_doc, COMPUTE_DTYPES, "matmul_tflops")
    matmul = {d: r.curve(r.get(matmul_doc, d, "matmul_tflops"), f"matmul_tflops.{d}", MATMUL_AXES)
              for d in COMPUTE_DTYPES}
    return link, matmul


def _dequant(r: _Reader, data: dict[str, Any]) -> dict[str, float]:
    """Dequant rates in 1e9 weights per second, by storage format: at least one, every name a known format."""
    from residency.formats import FORMATS

    dequant_doc = r.obj(r.get(data, "dequant_gweights_per_s"), "dequant_gweights_per_s")
    if not dequant_doc:
        raise r.fail("dequant_gweights_per_s", "is empty: give a rate for each storage format")
    _no_extra(r, dequant_doc, tuple(FORMATS), "dequant_gweights_per_s")
    return {f: r.number(v, f"dequant_gweights_per_s.{f}", "gweights_per_s") for f, v in dequant_doc.items()}


def _overlap(r: _Reader, data: dict[str, Any]) -> float:
    overlap = r.number(r.get(data, "copy_compute_overlap"), "copy_compute_overlap", "fraction 0..1", strict=False)
    if overlap > 1.0:
        raise r.fail("copy_compute_overlap", f"= {overlap!r}: must lie in [0, 1] (a fraction of the copy hidden)")
    return overlap


def _provenance(r: _Reader, data: dict[str, Any], refinements: dict[str, Any]) -> dict[str, Provenance]:
    """Where each group of numbers came from; every group in PROVENANCE_FIELDS, and each refinement present,
    must have one."""
    prov_doc = r.obj(r.get(data, "provenance"), "provenance")
    # the refinements present need a provenance too (their dims are labels, not figures)
    present = tuple(k for k in ("matmul_small_tflops", "elementwise_gelems_per_s", "copy_slowdown",
                                "compute_slowdown", *EXEC_MODE_FIELDS, "attention_tflops", "conv_tflops",
                                "matmul_rewarm_us",
                                "dequant_call_us")
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
    r = _Reader(source)
    # The checks run in document order: a document with several faults always reports the same first one.
    _check_document(r, data, source)
    strings = _strings(r, data)
    memory = _memory(r, data)
    link, matmul = _curves(r, data)
    dequant = _dequant(r, data)
    overlap = _overlap(r, data)
    refinements = _refinements(r, data)
    _rates_for_calls(r, dequant, refinements["dequant_call_us"])
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


def _refinements(r: _Reader, data: dict[str, Any]) -> dict[str, Any]:
    """The optional fields; a small-weight curve needs both weight dims, the small one below the other."""
    dims = {k: int(r.number(data.get(k, 0), k, "dim", strict=False, integer=True))
            for k in ("matmul_weight_dim", "matmul_small_weight_dim")}
    small: dict[str, Curve] = {}
    if "matmul_small_tflops" in data:
        doc = r.obj(data["matmul_small_tflops"], "matmul_small_tflops")
        _no_extra(r, doc, COMPUTE_DTYPES, "matmul_small_tflops")
        small = {d: r.curve(v, f"matmul_small_tflops.{d}", MATMUL_AXES) for d, v in doc.items()}
        if small and not 0 < dims["matmul_small_weight_dim"] < dims["matmul_weight_dim"]:
            raise r.fail("matmul_small_weight_dim", f"= {dims['matmul_small_weight_dim']}: with matmul_small_tflops "
                         f"it must be above 0 and below matmul_weight_dim = {dims['matmul_weight_dim']}")
    elementwise = None
    if "elementwise_gelems_per_s" in data:
        elementwise = r.curve(data["elementwise_gelems_per_s"], "elementwise_gelems_per_s", ELEMENTWISE_AXES)
    return {**dims, "matmul_small_tflops": small, "elementwise_gelems_per_s": elementwise, **_schema_2_fields(r, data)}


def _op_kind_fields(r: _Reader, data: dict[str, Any]) -> dict[str, Any]:
    """Attention and conv curves by compute dtype and the CPU's re-warm cost after a matmul; absent in profiles
    measured before MEASUREMENT_VERSION 8 (conv: 10) and in datasheet profiles: {} and None, under which attention
    and convs cost at the matmul rate and nothing is charged for re-warming (the cost model as it was)."""
    curves: dict[str, dict[str, Curve]] = {}
    for key, axes in (("attention_tflops", MATMUL_AXES), ("conv_tflops", CONV_AXES)):
        doc = r.obj(data.get(key, {}), key)
        _no_extra(r, doc, COMPUTE_DTYPES, key)
        curves[key] = {d: r.curve(v, f"{key}.{d}", axes) for d, v in doc.items()}
    rewarm = None
    if "matmul_rewarm_us" in data:
        rewarm = r.curve(data["matmul_rewarm_us"], "matmul_rewarm_us", REWARM_AXES, positive=False)
    return {**curves, "matmul_rewarm_us": rewarm, "dequant_call_us": _dequant_call(r, data)}


def _dequant_call(r: _Reader, data: dict[str, Any]) -> dict[str, float]:
    """µs per unpack call by storage format ({} when absent: profiles before MEASUREMENT_VERSION 9 and datasheet
    profiles, under which a dequant costs its weights at the rate alone), each in [0, MAX_DEQUANT_CALL_US]."""
    from residency.formats import FORMATS

    if "dequant_call_us" not in data:
        return {}
    doc = r.obj(data["dequant_call_us"], "dequant_call_us")
    _no_extra(r, doc, tuple(FORMATS), "dequant_call_us")
    calls = {}
    for f, v in doc.items():
        calls[f] = r.number(v, f"dequant_call_us.{f}", "us", strict=False)
        if calls[f] > MAX_DEQUANT_CALL_US:
            raise r.fail(f"dequant_call_us.{f}", f"= {show(v)}: must be at most {MAX_DEQUANT_CALL_US:g} µs",
                         hint="re-measure with `residency profile -o`, or remove the field")
    return calls


def _rates_for_calls(r: _Reader, rates: dict[str, float], calls: dict[str, float]) -> None:
    """Every format with a per-call cost has a rate too: the call cost is what an unpack adds to it."""
    for f in calls:
        if f not in rates:
            raise r.fail(f"dequant_call_us.{f}", f"has no dequant_gweights_per_s.{f} beside it",
                         hint=f"add the {f} rate, or remove dequant_call_us.{f}")


def _schema_2_fields(r: _Reader, data: dict[str, Any]) -> dict[str, Any]:
    """Per-engine slowdowns, compute_scale and calibration; their defaults when absent (a schema-1 file)."""
    return {
        "copy_slowdown": _slowdown(r, data, "copy_slowdown"),
        "compute_slowdown": _slowdown(r, data, "compute_slowdown"),
        "compute_scale": _compute_scale(r, data.get("compute_scale", {})),
        "call_host_us": _host_us(r, data, "call_host_us"),
        "streamed_call_host_us": _host_us(r, data, "streamed_call_host_us"),
        "calibration": _calibration(r, data["calibration"]) if "calibration" in data else None,
        **_exec_mode_fields(r, data),
        **_op_kind_fields(r, data),
    }


def _exec_mode_fields(r: _Reader, data: dict[str, Any]) -> dict[str, Any]:
    """What execution modes cost (0 when absent): replay µs per kernel, the compiled dispatch fraction in (0, 1],
    compile seconds per block class and graph pool bytes per class, each within its bound."""
    replay = _bounded(r, data, "graph_replay_us_per_kernel", "µs", MAX_GRAPH_REPLAY_US)
    fraction = _bounded(r, data, "compiled_dispatch_fraction", "fraction of eager's dispatches", 1.0)
    compile_s = _bounded(r, data, "compile_s_per_block_class", "seconds", MAX_COMPILE_S)
    pool = _bounded(r, data, "graph_pool_bytes_per_class", "bytes", MAX_GRAPH_POOL_BYTES, integer=True)
    if data.get("backend") == "cpu" and (replay or pool):
        key = "graph_replay_us_per_kernel" if replay else "graph_pool_bytes_per_class"
        raise r.fail(key, "is a GPU figure: a cpu profile has no graphs", hint="remove the field")
    return {"graph_replay_us_per_kernel": replay, "compiled_dispatch_fraction": fraction,
            "compile_s_per_block_class": compile_s, "graph_pool_bytes_per_class": int(pool)}


def _bounded(r: _Reader, data: dict[str, Any], key: str, unit: str, maximum: float, integer: bool = False) -> float:
    """The figure `key` in [0, maximum] (0 when absent: not known)."""
    value = r.number(data.get(key, 0), key, unit, strict=False, integer=integer)
    if value > maximum:
        raise r.fail(key, f"= {show(data[key])}: must be at most {maximum:g} ({unit})",
                     hint="re-measure it, or remove the field (0: not known)")
    return value


def _slowdown(r: _Reader, data: dict[str, Any], key: str) -> float:
    """A factor 0 (not measured) or in [1, MAX_SLOWDOWN]."""
    value = r.number(data.get(key, 0.0), key, "dimensionless factor", strict=False)
    if value != 0 and not 1.0 <= value <= MAX_SLOWDOWN:
        raise r.fail(key, f"= {show(value)}: must be 0 (not measured) or a factor in [1, {MAX_SLOWDOWN:g}]",
                     hint="a slowdown is time beside the other engine over time alone; re-measure with "
                     "`residency profile -o`, or remove the field")
    return value


def _host_us(r: _Reader, data: dict[str, Any], key: str) -> float:
    """Host µs per call (`key`): ≥ 0 and at most MAX_STREAMED_CALL_HOST_US; 0 when absent."""
    value = data.get(key, 0.0)
    us = r.number(value, key, "µs", strict=False)
    if not 0.0 <= us <= MAX_STREAMED_CALL_HOST_US:
        raise r.fail(key, f"= {show(value)}: must lie in [0, {MAX_STREAMED_CALL_HOST_US:g}] µs",
                     hint="calibrate again (`residency run --calibrate`), or remove the field")
    return us


def _compute_scale(r: _Reader, value: Any) -> dict[str, float]:
    """Block ("dit.blocks.7"), block class ("dit.blocks.*") or component ("dit") -> multiplier in
    (0, MAX_COMPUTE_SCALE] on its predicted compute seconds."""
    doc = r.obj(value, "compute_scale")
    scale = {}
    for name, factor in doc.items():
        if not name:
            raise r.fail("compute_scale", "has an empty component name",
                         hint="name each block component (\"dit\", \"encoder\", \"decoder\", …)")
        field = f"compute_scale.{name}"
        scale[name] = r.number(factor, field, "dimensionless factor")
        if scale[name] > MAX_COMPUTE_SCALE:
            raise r.fail(field, f"= {show(factor)}: must be at most {MAX_COMPUTE_SCALE:g}",
                         hint="calibrate again: a factor this large means the run timed something else")
    return scale


def _calibration(r: _Reader, value: Any) -> Calibration:
    """The calibration record: four non-empty strings, a whole number of frames ≥ 1 and an optional note."""
    doc = r.obj(value, "calibration", known=(*_CALIBRATION_STRINGS, "frames", "note"),
                required=(*_CALIBRATION_STRINGS, "frames"))
    strings = {k: r.string(doc[k], f"calibration.{k}", non_empty=True) for k in _CALIBRATION_STRINGS}
    frames = r.integer(doc["frames"], "calibration.frames", 1, unit="latent frames")
    return Calibration(**strings, frames=frames, note=r.string(doc.get("note", ""), "calibration.note"))


def _no_extra(r: _Reader, doc: dict[str, Any], known: tuple[str, ...], field: str) -> None:
    """Reject keys this schema does not know; one that differs from a known key only in unit says so."""
    for key in doc:
        if key in known:
            continue
        where = f"{field}.{key}" if field else str(key)
        expected = _same_stem(str(key), known)
        if expected is not None:
            unit = UNIT_TEXT[_unit_of(expected)]
            raise r.fail(where, f"= {show(doc[key])} is in the wrong unit: expected '{expected}' in {unit}",
                         hint=f"rename it to '{expected}' and convert the value to {unit}")
        described = ", ".join(f"{k} ({UNIT_TEXT[_unit_of(k)]})" if _unit_of(k) else k for k in known)
        raise r.fail(where, "is not known", hint=f"expected keys: {described}")


def _same_stem(key: str, known: tuple[str, ...]) -> str | None:
    """The known key that `key` matches but for its unit suffix (device_memory_mbps → device_memory_gbps)."""
    for k in known:
        unit = _unit_of(k)
        if unit and k != unit and key.startswith(k[: -len(unit)]):
            return k
    return None


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
    looks_like_path = candidate.suffix == ".json" or os.sep in text or "/" in text
    if looks_like_path and kind != MISSING:
        return candidate  # a directory, a FIFO or an unusable name: read_json says which, without opening a FIFO
    if looks_like_path:
        raise ResidencyError(f"{show(text)}: no such profile file",
                             hint="check the path, or give a shipped profile name: "
                             + ", ".join(shipped_profile_names()))
    raise ResidencyError(f"unknown profile {show(text)}",
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
    return load_profile(name_or_path)
