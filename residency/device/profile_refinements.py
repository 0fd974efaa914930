"""Reading the optional refinements a profile may carry: small-weight and elementwise curves and the schema-2
fields (per-engine slowdowns, compute scales, calibration, execution-mode costs, per-op-kind curves).

Each is checked against its bound; an absent one reads as its default, under which the cost model is as it was.
"""

from __future__ import annotations

from typing import Any

from residency.device.profile import COMPUTE_DTYPES, MAX_SLOWDOWN, Calibration, Curve
from residency.device.profile_reader import (
    CONV_AXES,
    DEQUANT_TENSOR_AXES,
    ELEMENTWISE_AXES,
    MATMUL_AXES,
    REWARM_AXES,
    UNIT_TEXT,
    ProfileReader,
    bounded,
    no_extra,
)
from residency.validate import show

# Bounds of the execution-mode figures: beyond them a figure is a typo or a broken measurement.
MAX_GRAPH_REPLAY_US = 1e3  # per kernel; an eager launch costs 2-20 µs
MAX_COMPILE_S = 3600.0  # one block class; a cold inductor compile of a DiT block takes ~20 s on 2 cores
MAX_GRAPH_POOL_BYTES = 2**40
MAX_COMPUTE_SCALE = 100.0  # a calibration that finds compute 100× off the model measured something else
MAX_STREAMED_CALL_HOST_US = 1e5  # 0.1 s of host time per streamed call is a broken measurement, not overhead
MAX_DEQUANT_CALL_US = 1e5  # 0.1 s to start one unpack is a broken measurement (measured: 15-600 µs on a CPU)
_CALIBRATION_STRINGS = ("base_fingerprint", "workload_fingerprint", "model", "date")


def read_refinements(r: ProfileReader, data: dict[str, Any]) -> dict[str, Any]:
    """The optional fields; a small-weight curve needs both weight dims, the small one below the other."""
    dims = {k: int(r.number(data.get(k, 0), k, "dim", strict=False, integer=True))
            for k in ("matmul_weight_dim", "matmul_small_weight_dim")}
    small: dict[str, Curve] = {}
    if "matmul_small_tflops" in data:
        doc = r.obj(data["matmul_small_tflops"], "matmul_small_tflops")
        no_extra(r, doc, COMPUTE_DTYPES, "matmul_small_tflops")
        small = {d: r.curve(v, f"matmul_small_tflops.{d}", MATMUL_AXES) for d, v in doc.items()}
        if small and dims["matmul_weight_dim"] <= 1:  # the larger dim is the one wrong: name it
            raise r.fail("matmul_weight_dim", f"= {dims['matmul_weight_dim']}: with matmul_small_tflops it must be "
                         f"above matmul_small_weight_dim = {dims['matmul_small_weight_dim']}")
        if small and not 0 < dims["matmul_small_weight_dim"] < dims["matmul_weight_dim"]:
            raise r.fail("matmul_small_weight_dim", f"= {dims['matmul_small_weight_dim']}: with matmul_small_tflops "
                         f"it must be above 0 and below matmul_weight_dim = {dims['matmul_weight_dim']}")
    elementwise = None
    if "elementwise_gelems_per_s" in data:
        elementwise = r.curve(data["elementwise_gelems_per_s"], "elementwise_gelems_per_s", ELEMENTWISE_AXES)
    return {**dims, "matmul_small_tflops": small, "elementwise_gelems_per_s": elementwise, **_schema_2_fields(r, data)}


def _op_kind_fields(r: ProfileReader, data: dict[str, Any]) -> dict[str, Any]:
    """Attention and conv curves by compute dtype and the CPU's re-warm cost after a matmul; absent in profiles
    measured before MEASUREMENT_VERSION 8 (conv: 10) and in datasheet profiles: {} and None, under which attention
    and convs cost at the matmul rate and nothing is charged for re-warming (the cost model as it was)."""
    curves: dict[str, dict[str, Curve]] = {}
    for key, axes in (("attention_tflops", MATMUL_AXES), ("conv_tflops", CONV_AXES)):
        doc = r.obj(data.get(key, {}), key)
        no_extra(r, doc, COMPUTE_DTYPES, key)
        curves[key] = {d: r.curve(v, f"{key}.{d}", axes) for d, v in doc.items()}
    rewarm = None
    if "matmul_rewarm_us" in data:
        rewarm = r.curve(data["matmul_rewarm_us"], "matmul_rewarm_us", REWARM_AXES, positive=False)
    return {**curves, "matmul_rewarm_us": rewarm, "dequant_call_us": _dequant_call(r, data),
            "dequant_tensor_gweights_per_s": _dequant_tensor(r, data), "dequant_fresh_factor": _dequant_fresh(r, data)}


def _dequant_tensor(r: ProfileReader, data: dict[str, Any]) -> dict[str, Curve]:
    """An unpack's rate over tensor size by storage format ({} when absent: profiles before MEASUREMENT_VERSION 11,
    GPU and datasheet profiles, under which a dequant costs its rate and call cost)."""
    from residency.formats import FORMATS

    key = "dequant_tensor_gweights_per_s"
    doc = r.obj(data.get(key, {}), key)
    no_extra(r, doc, tuple(FORMATS), key)
    curves = {f: r.curve(v, f"{key}.{f}", DEQUANT_TENSOR_AXES) for f, v in doc.items()}
    for f, c in curves.items():
        frac = next((x for x in c.x if x != int(x)), None)
        if frac is not None:  # a tensor holds whole weights: a fraction is a typo or a unit mix-up
            raise r.fail(f"{key}.{f}.tensor_weights", f"holds {frac:g}: sizes are whole weights of one tensor",
                         hint=f"re-create it with `residency profile -o`, or remove {key}.{f}")
        if len(c.x) < 2:  # one size tells a rate but not the call cost that dominates small tensors
            raise r.fail(f"{key}.{f}.tensor_weights", f"= {show(list(c.x))}: needs at least 2 sizes (a call cost "
                         "and a rate)", hint=f"re-create it with `residency profile -o`, or remove {key}.{f}")
    return curves


def _dequant_fresh(r: ProfileReader, data: dict[str, Any]) -> dict[str, float]:
    """An unpack's time from a just-copied input over its time from DRAM, by storage format, each in (0, 1] ({} when
    absent: profiles before MEASUREMENT_VERSION 12, GPU and datasheet ones, under which a streamed block's unpack
    costs what one from DRAM does)."""
    from residency.formats import FORMATS

    key = "dequant_fresh_factor"
    doc = r.obj(data.get(key, {}), key)
    no_extra(r, doc, tuple(FORMATS), key)
    factors = {}
    for f, v in doc.items():
        factors[f] = r.number(v, f"{key}.{f}", "fraction")
        if factors[f] > 1.0:  # a warm input is never slower: more than 1 is a broken measurement
            raise r.fail(f"{key}.{f}", f"= {show(v)}: must be at most 1 ({UNIT_TEXT['fraction']})",
                         hint=f"re-create it with `residency profile -o`, or remove {key}.{f}")
    return factors


def _dequant_call(r: ProfileReader, data: dict[str, Any]) -> dict[str, float]:
    """µs per unpack call by storage format ({} when absent: profiles before MEASUREMENT_VERSION 9 and datasheet
    profiles, under which a dequant costs its weights at the rate alone), each in [0, MAX_DEQUANT_CALL_US]."""
    from residency.formats import FORMATS

    if "dequant_call_us" not in data:
        return {}
    doc = r.obj(data["dequant_call_us"], "dequant_call_us")
    no_extra(r, doc, tuple(FORMATS), "dequant_call_us")
    calls = {}
    for f, v in doc.items():
        calls[f] = r.number(v, f"dequant_call_us.{f}", "us", strict=False)
        if calls[f] > MAX_DEQUANT_CALL_US:
            raise r.fail(f"dequant_call_us.{f}", f"= {show(v)}: must be at most {MAX_DEQUANT_CALL_US:g} µs",
                         hint="re-measure with `residency profile -o`, or remove the field")
    return calls


def rates_for_calls(r: ProfileReader, rates: dict[str, float], by_format: dict[str, Any], key: str) -> None:
    """Every format with a per-call cost or a per-tensor curve (`key`) has a rate too: a format's rate is what
    planning checks it was profiled by."""
    for f in by_format:
        if f not in rates:
            raise r.fail(f"{key}.{f}", f"has no dequant_gweights_per_s.{f} beside it",
                         hint=f"add the {f} rate, or remove {key}.{f}")


def _schema_2_fields(r: ProfileReader, data: dict[str, Any]) -> dict[str, Any]:
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


def _exec_mode_fields(r: ProfileReader, data: dict[str, Any]) -> dict[str, Any]:
    """What execution modes cost (0 when absent): replay µs per kernel, the compiled dispatch fraction in (0, 1],
    compile seconds per block class and graph pool bytes per class, each within its bound."""
    replay = bounded(r, data, "graph_replay_us_per_kernel", "µs", MAX_GRAPH_REPLAY_US)
    fraction = bounded(r, data, "compiled_dispatch_fraction", "fraction of eager's dispatches", 1.0)
    compile_s = bounded(r, data, "compile_s_per_block_class", "seconds", MAX_COMPILE_S)
    pool = bounded(r, data, "graph_pool_bytes_per_class", "bytes", MAX_GRAPH_POOL_BYTES, integer=True)
    if data.get("backend") == "cpu" and (replay or pool):
        key = "graph_replay_us_per_kernel" if replay else "graph_pool_bytes_per_class"
        raise r.fail(key, "is a GPU figure: a cpu profile has no graphs", hint="remove the field")
    return {"graph_replay_us_per_kernel": replay, "compiled_dispatch_fraction": fraction,
            "compile_s_per_block_class": compile_s, "graph_pool_bytes_per_class": int(pool)}


def _slowdown(r: ProfileReader, data: dict[str, Any], key: str) -> float:
    """A factor 0 (not measured) or in [1, MAX_SLOWDOWN]."""
    value = r.number(data.get(key, 0.0), key, "dimensionless factor", strict=False)
    if value != 0 and not 1.0 <= value <= MAX_SLOWDOWN:
        raise r.fail(key, f"= {show(value)}: must be 0 (not measured) or a factor in [1, {MAX_SLOWDOWN:g}]",
                     hint="a slowdown is time beside the other engine over time alone; re-measure with "
                     "`residency profile -o`, or remove the field")
    return value


def _host_us(r: ProfileReader, data: dict[str, Any], key: str) -> float:
    """Host µs per call (`key`): ≥ 0 and at most MAX_STREAMED_CALL_HOST_US; 0 when absent."""
    value = data.get(key, 0.0)
    us = r.number(value, key, "µs", strict=False)
    if not 0.0 <= us <= MAX_STREAMED_CALL_HOST_US:
        raise r.fail(key, f"= {show(value)}: must lie in [0, {MAX_STREAMED_CALL_HOST_US:g}] µs",
                     hint="calibrate again (`residency run --calibrate`), or remove the field")
    return us


def _compute_scale(r: ProfileReader, value: Any) -> dict[str, float]:
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


def _calibration(r: ProfileReader, value: Any) -> Calibration:
    """The calibration record: four non-empty strings, a whole number of frames ≥ 1 and an optional note."""
    doc = r.obj(value, "calibration", known=(*_CALIBRATION_STRINGS, "frames", "note"),
                required=(*_CALIBRATION_STRINGS, "frames"))
    strings = {k: r.string(doc[k], f"calibration.{k}", non_empty=True) for k in _CALIBRATION_STRINGS}
    frames = r.integer(doc["frames"], "calibration.frames", 1, unit="latent frames")
    return Calibration(**strings, frames=frames, note=r.string(doc.get("note", ""), "calibration.note"))
