"""Reading a profile document's fields: quantities with units, curves over named axes, provenance, known keys.

The one reader of profile JSON that profile_io and profile_refinements share; errors name the file, the field,
the value and the unit expected.
"""

from __future__ import annotations

import math
from typing import Any

from residency.device.profile import PROVENANCE_KINDS, Curve, Provenance
from residency.validate import MAX_NAME_CHARS, Reader, show

# JSON names of a curve's axes: link curves are GB/s over transfer bytes, matmul curves TFLOP/s over rows.
LINK_AXES = ("sizes_bytes", "gbps")
MATMUL_AXES = ("rows", "tflops")
ELEMENTWISE_AXES = ("tensor_elements", "gelems_per_s")  # rate over the size class of an op's largest tensor
REWARM_AXES = ("weight_elements", "us")  # µs lost after a matmul over the elements of its weight
CONV_AXES = ("kernel_elements", "tflops")  # a conv2d's TFLOP/s over the elements of its kernel
DEQUANT_TENSOR_AXES = ("tensor_weights", "gweights_per_s")  # one unpack call's rate over its tensor's weights
# What each unit suffix means, for messages that say which unit is expected.
UNIT_TEXT = {
    "bytes": "bytes",
    "gbps": "GB/s, 1e9 bytes per second",
    "tflops": "TFLOP/s, 1e12 per second",
    "us": "microseconds",
    "gweights_per_s": "1e9 weights per second",
    "gelems_per_s": "1e9 elements per second",
    "dim": "elements along one side of a square weight matrix",
    "tensor_elements": "elements of a tensor",
    "rows": "token rows",
    "weight_elements": "elements of a weight matrix",
    "kernel_elements": "elements of a conv kernel (out × in × kernel height × width)",
    "tensor_weights": "weights of one tensor",
    "fraction": "a fraction of the time from DRAM, above 0 and at most 1",
}
MAX_QUANTITY = 1e30  # above any byte count, rate or size a device profile holds; keeps every value a float
# The least a positive rate can be (a thousand times below the slowest device or link there is): a link of
# 1e-300 GB/s made every time overflow and planned "0.00 ms per frame, inf fps" under a lower bound of 72 ms
RATE_FLOOR = {"gbps": 1e-3, "tflops": 1e-6, "gweights_per_s": 1e-6, "gelems_per_s": 1e-6}
# The most a rate can be, where a figure in the wrong unit lands far above it (FLOP/s written as TFLOP/s: 3.7e13,
# planned as a faster card with nothing said): ten thousand times the fastest device there is (~2e3 TFLOP/s dense
# FP8). A link's own ceiling is LINK_GBPS_CEILING.
RATE_CEILING = {"tflops": 1e7}
# No host link reaches 10 TB/s (PCIe 6.0 x16 ~121 GB/s, NVLink-C2C 900 GB/s): above it, MB/s written as GB/s
LINK_GBPS_CEILING = 1e4
_FIX_HINT = "re-create it with `residency profile -o`, or fix the field by hand"


class ProfileReader(Reader):
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
        floor = RATE_FLOOR.get(unit)
        if floor is not None and 0 < value < floor:
            raise self.fail(field, f"= {show(value)}: below any real device's rate (at least {floor:g} "
                            f"{UNIT_TEXT[unit]})")
        ceiling = RATE_CEILING.get(unit)
        if ceiling is not None and value > ceiling:
            raise self.fail(field, f"= {show(value)}: above any real device's rate (at most {ceiling:g} "
                            f"{UNIT_TEXT[unit]})", hint=f"write it in {UNIT_TEXT[unit]} (a figure in another unit?); "
                            f"{_FIX_HINT}")
        if value > MAX_QUANTITY:  # an integer of 400 digits has no float; no real figure comes near this
            raise self.fail(field, f"= {show(value)}: must be at most {MAX_QUANTITY:g} ({UNIT_TEXT.get(unit, unit)})")
        return int(value) if integer else float(value)

    def text(self, doc: dict[str, Any], key: str) -> str:
        """A string field; the name non-empty. Control characters are refused: printed in a plan's title, an
        escape sequence in a profile's name recoloured the terminal and a newline split the line."""
        return self.string(self.get(doc, key), key, non_empty=key == "name", max_chars=MAX_NAME_CHARS)

    def curve(self, value: Any, field: str, axes: tuple[str, str], positive: bool = True) -> Curve:
        """A Curve of `axes` (x, y); x > 0, y > 0 (≥ 0 when not `positive`)."""
        doc = self.obj(value, field)
        no_extra(self, doc, (*axes, "spread"), field)
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
                shown = [_plain(x) for x in xs]  # as the file wrote them: 65536, not 65536.0
                raise self.fail(f"{field}.{axes[0]}", f"= {show(shown)}: must be strictly increasing "
                                f"({shown[i - 1]!r} then {shown[i]!r})", hint="sort the samples by size")
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
    """The unit suffix of `key` (a key of UNIT_TEXT: "memory_total_bytes" -> "bytes"), or "" when it has none."""
    for unit in sorted(UNIT_TEXT, key=len, reverse=True):
        if key.endswith("_" + unit) or key == unit:
            return unit
    return ""


def no_extra(r: ProfileReader, doc: dict[str, Any], known: tuple[str, ...], field: str) -> None:
    """Reject keys this schema does not know; one that differs from a known key only in unit says so."""
    for key in doc:
        if key in known:
            continue
        where = f"{field}.{key}" if field else str(key)
        expected = _same_stem(str(key), known)
        if expected is not None and expected in doc:  # not a misnamed unit: the field is there beside it
            raise r.fail(where, f"= {show(doc[key])} is not a field this version of residency knows ('{expected}' "
                         "is given beside it: a field of another version, or a typo?)",
                         hint=f"remove '{key}' (a measured profile is re-made by `residency profile`)")
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


def bounded(r: ProfileReader, data: dict[str, Any], key: str, unit: str, maximum: float, integer: bool = False) -> float:
    """The figure `key` in [0, maximum] (0 when absent: not known)."""
    value = r.number(data.get(key, 0), key, unit, strict=False, integer=integer)
    if value > maximum:
        raise r.fail(key, f"= {show(data[key])}: must be at most {maximum:g} ({unit})",
                     hint="re-measure it, or remove the field (0: not known)")
    return value


def _plain(x: float) -> int | float:
    """A whole float as an int (an error quotes 65536 as the file wrote it, not 65536.0)."""
    return int(x) if x.is_integer() else x
