"""Checking a parsed JSON document field by field: one error style for plans, profiles, catalogs and traces.

Every refusal names the file, the field as a JSON path (`blocks[3].placement`) and the value, with a hint.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from collections.abc import Iterable
from typing import Any

from residency.errors import ResidencyError

# Values are shown cut short: a 10 MB string or a list of a million numbers must not become the message.
MAX_TEXT_CHARS = 4096  # any string of a document a user names (a note, a tensor name)
MAX_NAME_CHARS = 256  # a name shown in titles and table cells (a model, profile, block or phase)
class _JsonishRepr(reprlib.Repr):
    """Python's repr, but JSON's words for the values a JSON document holds as words: `true`, `false`, `null` (an
    error about a file quoted `True` and `None`, which the file does not say)."""

    def repr_bool(self, x: bool, level: int) -> str:
        return "true" if x else "false"

    def repr_NoneType(self, x: None, level: int) -> str:  # noqa: N802 (reprlib dispatches on the type's name)
        return "null"


_SHOW = _JsonishRepr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 60, 60, 6, 4, 3


def show(value: Any) -> str:
    """A value as errors quote it: bounded in length and depth, whatever the document held."""
    return _SHOW.repr(value)


def did_you_mean(text: str, known: Iterable[str]) -> str:
    """" (did you mean X?)" for the known name closest to `text`, case aside (`TINY`, `lucid500m`), or a name a
    typo away, or two in a scramble of its letters or a name of 6 characters or more (`tyni`, which difflib's
    ratio, 0.5, misses); "" for none."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(text.lower(), list(by_lower), n=1)
    if not close:
        typos = sorted((_typos(text.lower(), k), k) for k in by_lower)
        # one typo; two only where they are a scramble of the same letters (tyni) or in a longer name: two in
        # four letters of another word (mini, city) are another word
        close = [k for n, k in typos[:1]
                 if n <= 1 or (n == 2 and (sorted(text.lower()) == sorted(k) or min(len(text), len(k)) >= 6))]
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def _typos(a: str, b: str) -> int:
    """Letters inserted, deleted, replaced or two neighbours swapped to make `a` into `b` (optimal string
    alignment); names are short: O(len(a) · len(b))."""
    if abs(len(a) - len(b)) > 3:
        return abs(len(a) - len(b))
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def a_type(value: Any) -> str:
    """The type of `value` with its article, as a message says what was given: "an int", "a list", "a NoneType"."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def at(path: str, key: str | int) -> str:
    """The JSON path of `key` inside `path`: at("blocks", 3) -> "blocks[3]", at("budget", "frame_ms")."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


# What each of our JSON documents has that the others do not: a file read as the wrong one is named for what it
# is ("this is a Chrome trace"), not refused for its first field ("field 'traceEvents' is not known").
_KINDS = (("traceEvents", "a Chrome trace (residency run --trace)"),
          ("workload_fingerprint", "a plan (residency plan -o)"),
          ("phases", "a workload (a catalog document, pipelines/catalog)"),
          ("memory_total_bytes", "a device profile (residency profile -o)"),
          # a model's own config, given where a profile or plan goes (`--profile config.json` was told to re-create it
          # with `residency profile -o`); after residency's kinds, whose keys come first
          ("architectures", "a model's config (a transformers config.json)"),
          ("_class_name", "a model's config (a diffusers config.json or model_index.json)"))


# Where each kind of document goes, for the hint when it is given where another is read
_USES = {"a Chrome trace": "replay it with `residency dashboard FILE`",
         "a plan": "give it as --plan FILE (run, play) or attach(plan=FILE)",
         "a workload": "plan it as `residency plan FILE`",
         "a device profile": "give it as --profile FILE (plan, run, play, demo)",
         "a model's config": "plan the directory that holds it and its weights: `residency plan DIR`"}


def use_of(kind: str) -> str | None:
    """What to do with a document of `kind` (document_kind's words), or None."""
    return next((use for name, use in _USES.items() if kind.startswith(name)), None)


def document_kind(doc: Any) -> str | None:
    """Which of residency's documents `doc` looks like, by a field only that kind has; None when none."""
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "ph" in doc[0]:
        return "a Chrome trace (residency run --trace), in its JSON-array form"
    if isinstance(doc, dict):
        return next((kind for key, kind in _KINDS if key in doc), None)
    return None


class Reader:
    """Checks one document; `source` names it (a file path) and `hint` says how to get a good one."""

    def __init__(self, source: str, hint: str, note: str = "", expects: str = "the document read here"):
        self.source, self.hint, self.note, self.expects = source, hint, note, expects

    def within(self, note: str) -> Reader:
        """The same reader, its messages also saying which item they are in ("block 'dit.blocks.0'")."""
        return Reader(self.source, self.hint, note, self.expects)

    def fail(self, path: str, problem: str, hint: str | None = None) -> ResidencyError:
        """`problem` starts with "= value: …" when it is about a value, or states what is wrong."""
        where = f"field '{path}'" if path else "the document"  # "field '(top level)'" named no field
        return ResidencyError(f"{self.source}: {where}{self._in()} {problem}", hint=hint or self.hint)

    def missing(self, path: str) -> ResidencyError:
        """The error (not raised) for the missing field at `path`."""
        return ResidencyError(f"{self.source}: missing field '{path}'{self._in()}", hint=self.hint)

    def _in(self) -> str:
        return f" (in {self.note})" if self.note else ""

    def bad(self, path: str, value: Any, expected: str, hint: str | None = None) -> ResidencyError:
        """The error (not raised) for `value` at `path`, which should have been `expected`."""
        return self.fail(path, f"= {show(value)}: expected {expected}", hint)

    # ------------------------------------------------------------ containers
    def obj(self, value: Any, path: str, known: Iterable[str] | None = None,
            required: Iterable[str] = ()) -> dict[str, Any]:
        """`value` as a JSON object; with `known`, any other key is refused; each `required` key must be there."""
        if not isinstance(value, dict):
            raise self.bad(path, value, "a JSON object")
        for key in required:
            if key not in value:
                raise self.missing(at(path, key))
        if known is not None:
            allowed = tuple(known)
            for key in value:
                if key not in allowed:
                    kind = document_kind(value) if not path else None
                    if kind is not None and kind.split(" (")[0] != self.expects.split(" (")[0]:
                        raise ResidencyError(f"{self.source}: this is {kind}, not {self.expects}",
                                             hint=use_of(kind) or self.hint)
                    raise self.fail(at(path, key), "is not known", hint=f"known fields here: {', '.join(allowed)}")
        return value

    def need(self, doc: dict[str, Any], key: str, path: str = "") -> Any:
        """`doc[key]`; raises ResidencyError (missing field) when `key` is absent."""
        if key not in doc:
            raise self.missing(at(path, key))
        return doc[key]

    def items(self, value: Any, path: str, min_items: int = 0, max_items: int | None = None) -> list[Any]:
        """`value` as a JSON array of min_items..max_items entries."""
        if not isinstance(value, list):
            raise self.bad(path, value, "a list (JSON array)")
        if len(value) < min_items:
            raise self.fail(path, f"has {len(value)} entries: needs at least {min_items}")
        if max_items is not None and len(value) > max_items:
            raise self.fail(path, f"has {len(value)} entries: at most {max_items} are accepted")
        return value

    # ------------------------------------------------------------ scalars
    def string(self, value: Any, path: str, non_empty: bool = False, max_chars: int = MAX_TEXT_CHARS) -> str:
        """`value` as a str (non-empty if asked) of printable characters, at most `max_chars` of them; raises
        ResidencyError otherwise. Control characters are refused: printed in a table or a title, an escape
        sequence recoloured or cleared the terminal and a newline split the row. Length is bounded: a profile
        named in 100,000 characters took over a minute to render in a plan's title."""
        if not isinstance(value, str) or (non_empty and not value):
            raise self.bad(path, value, "a non-empty string" if non_empty else "a string")
        if len(value) > max_chars:
            raise self.fail(path, f"= {show(value)}: {len(value):,} characters, more than the {max_chars:,} it may have",
                            hint="shorten it")
        bad = control_character(value)
        if bad is not None:
            raise self.fail(path, f"= {show(value)}: holds a control character ({bad!r})",
                            hint="use printable text (no escape sequences, tabs or newlines)")
        return value

    def choice(self, value: Any, path: str, allowed: Iterable[str]) -> str:
        """`value` when it is one of `allowed`; raises ResidencyError otherwise."""
        options = tuple(allowed)
        if not isinstance(value, str) or value not in options:
            raise self.bad(path, value, f"one of {', '.join(o if o else chr(34) * 2 for o in options)}")  # "" shown
        return value

    def boolean(self, value: Any, path: str) -> bool:
        """`value` when it is a JSON boolean; raises ResidencyError otherwise."""
        if not isinstance(value, bool):
            raise self.bad(path, value, "true or false")
        return value

    def integer(self, value: Any, path: str, minimum: int = 0, maximum: int | None = None,
                unit: str = "") -> int:
        """A whole number in [minimum, maximum]; 5.0 counts as 5 (as in JSON Schema), true does not count as 1."""
        what = f"a whole number{f' of {unit}' if unit else ''}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(path, value, what, hint=f"write a bare JSON number{f' of {unit}' if unit else ''}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise self.bad(path, value, what)
        # comparing before converting: a float of 1e300 or an int of 4,000 digits stays exact here
        if value < minimum or (maximum is not None and value > maximum):
            raise self.bad(path, value, f"{what} in {_range(minimum, maximum)}")
        return int(value)

    def number(self, value: Any, path: str, minimum: float | None = 0.0, strict: bool = False,
               maximum: float | None = None, unit: str = "") -> float:
        """A finite number ≥ minimum (> minimum when strict) and ≤ maximum; None bounds are open."""
        what = f"a number{f' in {unit}' if unit else ''}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(path, value, what, hint=f"write a bare JSON number{f' in {unit}' if unit else ''}, "
                           "without a unit")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.bad(path, value, f"a finite {what[2:]}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            if strict and minimum == 0:  # "a number in ms positive" read badly
                raise self.bad(path, value, f"a positive number{f' in {unit}' if unit else ''}")
            raise self.bad(path, value, f"{what} {'>' if strict else '≥'} {minimum:g}")
        if maximum is not None and value > maximum:
            raise self.bad(path, value, f"{what} ≤ {maximum:g}")
        try:
            return float(value)
        except OverflowError:  # an integer literal past 1e308
            raise self.bad(path, value, f"{what} below 1e308") from None

    def shallow(self, value: Any, path: str, max_depth: int) -> Any:
        """A free-form value (kept, not interpreted) nested at most `max_depth` deep, so that writing it back
        with json.dumps or comparing it cannot exhaust the recursion limit. Iterative, one visit per value."""
        level, depth = ([value] if isinstance(value, dict | list) else []), 0
        while level:
            depth += 1
            if depth > max_depth:
                raise self.fail(path, f"is nested more than {max_depth} levels deep")
            children = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
            level = [c for c in children if isinstance(c, dict | list)]
        return value

    def optional(self, doc: dict[str, Any], key: str, default: Any) -> Any:
        """doc[key], or `default` when the key is absent (a present null is passed on, to be checked)."""
        return doc[key] if key in doc else default


def _range(minimum: int, maximum: int | None) -> str:
    return f"{minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"


def control_character(text: str) -> str | None:
    """The first C0/C1 control character (or DEL) in `text`, None when it has none. Cost: one C-level scan when
    it is printable (nearly always); a Python loop otherwise."""
    if text.isprintable():
        return None
    return next((c for c in text if ord(c) < 32 or 127 <= ord(c) < 160), None)
