"""read_json: every JSON document a user names is read as a regular file, capped, and parsed to finite plain JSON."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from residency.errors import ResidencyError
from residency.jsonfile import read_json

HINT = "give a good file"


def _refused(path, **kw) -> ResidencyError:
    with pytest.raises(ResidencyError) as e:
        read_json(path, "the thing", HINT, **kw)
    assert e.value.hint and HINT in e.value.hint
    return e.value


def _write(tmp_path: Path, text: str | bytes, name: str = "doc.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_plain_document_reads_back(tmp_path):
    assert read_json(_write(tmp_path, '{"a": [1, 2.5, "x", null, true]}'), "the thing", HINT) == {
        "a": [1, 2.5, "x", None, True]}


def test_a_byte_order_mark_is_not_part_of_the_document(tmp_path):
    # Windows editors save UTF-8 with one; it was refused as "Unexpected UTF-8 BOM"
    assert read_json(_write(tmp_path, b'\xef\xbb\xbf{"a": 1}'), "the thing", HINT) == {"a": 1}
    assert "line 1, column 1" in _refused(_write(tmp_path, b'\xef\xbb\xbf\xef\xbb\xbf{"a": 1}')).message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_refused(tmp_path, literal):
    err = _refused(_write(tmp_path, f'{{"frame_ms": {literal}}}'))
    assert "doc.json" in err.message and literal in err.message


@pytest.mark.parametrize("number", ["1e999", "-1e400"])
def test_a_number_that_overflows_to_infinity_is_refused(tmp_path, number):
    assert "finite" in _refused(_write(tmp_path, f'{{"x": [{number}]}}')).message


def test_a_top_level_overflowing_number_is_refused(tmp_path):
    assert "finite" in _refused(_write(tmp_path, "1e999")).message


def test_an_integer_past_pythons_digit_limit_is_a_clean_error(tmp_path):
    err = _refused(_write(tmp_path, '{"vram_bytes": ' + "9" * 5000 + "}"))
    assert "digits" in err.message and "doc.json" in err.message


def test_nesting_that_would_exhaust_the_parser_is_a_clean_error(tmp_path):
    err = _refused(_write(tmp_path, "[" * 100_000 + "]" * 100_000))
    assert "nested" in err.message


def test_nesting_the_parser_reads_is_refused_by_the_field_that_holds_it(tmp_path):
    """900 levels parse, but a validator quotes a value only to a bounded depth: no RecursionError later."""
    from residency.plan import load_plan

    path = _write(tmp_path, '{"schema_version": 1, "model": ' + "[" * 900 + "]" * 900 + "}", "plan.json")
    with pytest.raises(ResidencyError, match=r"plan\.json: field 'model' = \[\[\[\[\.\.\.\]\]\]\]"):
        load_plan(path)


def test_free_form_catalog_facts_are_refused_past_a_few_levels():
    import copy

    from pipelines.catalog import catalog_paths
    from residency.workload import workload_from_dict

    doc = copy.deepcopy(read_json(catalog_paths()["tiny"], "the catalog entry", HINT))
    doc["extra"] = {"deep": [[[[[[[[[[1]]]]]]]]]]}
    with pytest.raises(ResidencyError, match="'extra' is nested more than"):
        workload_from_dict(doc, "tiny.json")


def test_a_file_over_the_cap_is_refused_before_parsing(tmp_path):
    err = _refused(_write(tmp_path, "[" + "0," * 600 + "0]"), max_bytes=1000)
    assert "1000" in err.message


def test_invalid_json_names_line_and_column(tmp_path):
    err = _refused(_write(tmp_path, '{\n  "a": }'))
    assert re.search(r"doc\.json: not valid JSON.*line 2", err.message)


def test_bytes_that_are_not_utf8_are_refused(tmp_path):
    assert "UTF-8" in _refused(_write(tmp_path, b'{"a": "\xff"}')).message


def test_a_directory_is_refused(tmp_path):
    assert "directory" in _refused(tmp_path).message


def test_an_over_long_name_is_a_clean_error(tmp_path):
    err = _refused(tmp_path / ("x" * 300 + ".json"))
    assert "too long" in err.message and len(err.message) < 400


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def call():
        try:
            read_json(fifo, "the thing", HINT)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the reader so the test process can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_json blocked on a FIFO")
    assert isinstance(outcome[0], ResidencyError) and "regular file" in outcome[0].message


def test_nothing_else_in_the_package_parses_json_text_itself():
    """User JSON goes through read_json; the safetensors header is a checkpoint format with its own bounds."""
    root = Path(__file__).resolve().parents[1] / "residency"
    allowed = {root / "jsonfile.py", root / "checkpoint" / "safetensors_io.py"}
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p not in allowed and re.search(r"\bjson\.loads?\(", p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_each_document_read_as_another_kind_is_named_for_what_it_is(tmp_path, capsys):
    from residency.cli import main

    plan = tmp_path / "p.json"
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(plan)]) == 0
    trace = tmp_path / "t.json"
    trace.write_text('{"traceEvents": []}')
    profile = "profiles/rx-7800-xt.json"
    config, pipeline = tmp_path / "config.json", tmp_path / "model_index.json"
    config.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    pipeline.write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    cases = [(["plan", "tiny", "--profile", str(plan)], "this is a plan (residency plan -o), not a device profile"),
             (["inspect", str(plan)], "this is a plan (residency plan -o), not a workload"),
             (["dashboard", str(plan), "--once"], "this is a plan (residency plan -o), not a trace"),
             (["plan", str(trace)], "this is a Chrome trace (residency run --trace), not a workload"),
             # a trace has no schema_version: "missing field 'schema_version'" was all it said
             (["plan", "tiny", "--profile", str(trace)], "this is a Chrome trace (residency run --trace), not a "
                                                         "device profile"),
             (["run", "default", "--plan", profile, "-o", str(tmp_path / "x.gif")],
              "this is a device profile (residency profile -o), not a plan"),
             # "missing field 'schema_version'", and a hint to re-create it with `residency profile -o`
             (["plan", "tiny", "--profile", str(config)], "this is a model's config (a transformers config.json), "
                                                          "not a device profile"),
             (["run", "default", "--plan", str(pipeline), "-o", str(tmp_path / "x.gif")],
              "this is a model's config (a diffusers config.json or model_index.json), not a plan")]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) != 0, argv
        assert message in capsys.readouterr().err, argv


def test_an_unknown_field_of_a_plan_is_named_not_mistaken_for_another_kind(tmp_path, capsys):
    from residency.cli import main
    from residency.errors import ResidencyError
    from residency.plan import load_plan

    plan = tmp_path / "p.json"
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "-o", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    doc["made_by"] = "me"
    plan.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match="field 'made_by' is not known"):
        load_plan(plan)


@pytest.mark.parametrize("text", ['{"steps": 4, "steps": 64}', '{"blocks": [{"name": "a", "x": 1, "name": "b"}]}'])
def test_a_key_given_twice_in_one_object_is_refused_naming_it(tmp_path, text):
    """The last of two keys won silently: a plan edited to `"steps": 4, "steps": 64` ran 64 steps."""
    err = _refused(_write(tmp_path, text))
    assert "twice in one object" in err.message and re.search(r"key '(steps|name)'", err.message)


def test_a_key_given_twice_with_one_value_is_read(tmp_path):
    """A config.json some tool wrote with `"_diffusers_version"` twice, the same value: diffusers reads it, so do we."""
    assert read_json(_write(tmp_path, '{"v": "0.3", "v": "0.3"}'), "the thing", HINT) == {"v": "0.3"}


def test_the_same_key_in_two_objects_is_fine(tmp_path):
    assert read_json(_write(tmp_path, '{"a": {"k": 1}, "b": {"k": 2}}'), "the thing", HINT) == {"a": {"k": 1},
                                                                                                 "b": {"k": 2}}


def test_a_duplicate_key_and_a_non_finite_number_say_on_which_lines(tmp_path):
    """In a profile, Q8_0 is a key of three objects: the message named it but not where."""
    text = '{\n "rates": {"Q8_0": 1.0},\n "calls": {"Q8_0": 2.0,\n   "Q8_0": 3.0}\n}\n'
    err = _refused(_write(tmp_path, text))
    assert "lines 2, 3, 4" in err.message and "keep one" in err.hint
    err = _refused(_write(tmp_path, '{\n "name": "NaN",\n "note": "x, NaN, \\"y\\"",\n "x": [1,\n  NaN]\n}\n'))
    assert "NaN at line 5" in err.message  # not the strings on lines 2 and 3
    assert "finite" in err.hint


def test_the_lines_of_a_key_stop_after_a_few_and_count_on_from_the_last():
    """Counting each match's lines from the start took 26 s on a 2 MB trace whose events all had "ts" (256 MiB
    are allowed): the lines are counted once, on from the last match, and only the first 13 are kept."""
    from residency.jsonfile import _key_lines

    text = "[\n" + ",\n".join(f'{{"ts": {i}}}' for i in range(60_000)) + "\n]"
    assert _key_lines(text, "ts") == list(range(2, 15))
    assert _key_lines('{"a\\"b": 1,\n "a\\"b": 2}', 'a"b') == [1, 2]  # a key with a quote in it
