"""tools/gpu_check without a GPU: its refusal, its report file, its stage bookkeeping and its table.

The GPU itself is exercised by the gpu-marked tests and by running the script on a machine that has one."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import math
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "tools" / "gpu_check"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


gc = _load_script()


def _rendered(report: dict) -> str:
    console = Console(file=io.StringIO(), width=220, record=True)
    console.print(gc.render(report))
    return console.export_text()


def _report(**stages) -> dict:
    return {"schema": gc.REPORT_SCHEMA, "environment": {"torch": torch.__version__}, "stages": dict(stages)}


# --- refusing to run --------------------------------------------------------------------------------------------
def test_without_a_gpu_it_says_so_on_stderr_and_exits_2_writing_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    assert gc.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: no CUDA or ROCm GPU" in err and f"torch {torch.__version__}" in err
    assert "\nhint: " in err
    assert not out.exists()


def test_a_report_path_that_is_a_directory_is_refused(capsys, tmp_path):
    assert gc.main(["--out", str(tmp_path)]) == 2
    assert "cannot write the report there" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_number_of_seconds_is_a_usage_error(capsys, budget):
    assert gc.main(["--budget-s", budget]) == 2
    assert "--budget-s" in capsys.readouterr().err


def test_a_package_residency_cannot_import_without_is_named_with_how_to_carry_its_wheel(monkeypatch, tmp_path):
    pkg = tmp_path / "gc_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import gc_probe_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(gc.SetupError) as caught:
        gc.check_importable("gc_probe_pkg")
    assert "'gc_probe_missing_dependency' is missing" in caught.value.message
    assert "pip download" in caught.value.hint and "--wheels" in caught.value.hint


def test_a_wheels_folder_without_wheels_is_refused(tmp_path):
    (tmp_path / "gguf-0.19.0.tar.gz").write_bytes(b"not a wheel")
    with pytest.raises(gc.SetupError, match="no .whl file"):
        gc.install_wheels(str(tmp_path), str(tmp_path / "site"))
    with pytest.raises(gc.SetupError, match="not a directory"):
        gc.install_wheels(str(tmp_path / "absent"), str(tmp_path / "site"))


def _fake_gpu_machine(monkeypatch, statuses: dict[str, str]):
    """check_gpu passes and every stage returns the status given for it, without a subprocess."""
    monkeypatch.setattr(gc, "check_gpu", lambda _device: {"torch": "2.11.0", "cuda_version": "13.0",
                                                          "hip_version": None, "rocm": False})
    monkeypatch.setattr(gc, "check_importable", lambda module="residency.formats": None)

    def runner_for(name):
        results = {"device": "Fake H200", "memory_total_bytes": 140 * 2**30} if name == "environment" else {}
        return lambda _budget_s: {"status": statuses.get(name, "ok"), "results": results}

    monkeypatch.setattr(gc, "child_stage", lambda name, *_args: runner_for(name))
    monkeypatch.setattr(gc, "tests_stage", lambda budget_s, *_args: runner_for("tests")(budget_s))


def test_with_a_gpu_every_stage_runs_in_order_and_the_table_is_printed(monkeypatch, capsys, tmp_path):
    _fake_gpu_machine(monkeypatch, {})
    out = tmp_path / "report.json"
    assert gc.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["stages"]) == list(gc.STAGES)
    assert report["environment"]["device"] == "Fake H200" and report["finished"] is not None
    printed = capsys.readouterr().out
    assert "Fake H200" in printed and f"report: {out}" in printed


def test_a_failed_stage_makes_the_exit_status_1_and_a_skipped_one_by_request_does_not(monkeypatch, tmp_path):
    _fake_gpu_machine(monkeypatch, {"profile": "timed out"})
    assert gc.main(["--out", str(tmp_path / "a.json")]) == 1
    _fake_gpu_machine(monkeypatch, {})
    assert gc.main(["--out", str(tmp_path / "b.json"), "--skip", "bench"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["stages"]["bench"]["status"] == "skipped"


def test_a_stage_skipped_for_want_of_time_leaves_the_check_incomplete():
    report = _report(tests={"status": "ok"}, bench={"status": "skipped"})
    assert gc.incomplete(report, []) == ["bench"]
    assert gc.incomplete(report, ["bench"]) == []


# --- the report file ----------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_previous_report_and_no_temp_file(tmp_path):
    out = tmp_path / "report.json"
    gc.write_json_atomic(out, {"stages": {"tests": {"status": "ok"}}})
    with pytest.raises(TypeError):
        gc.write_json_atomic(out, {"stages": {"tests": {"status": object()}}})
    assert json.loads(out.read_text()) == {"stages": {"tests": {"status": "ok"}}}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_non_finite_numbers_are_written_as_null_so_strict_readers_accept_the_report(tmp_path):
    out = tmp_path / "report.json"
    gc.write_json_atomic(out, {"error": math.nan, "rows": [math.inf, 1.5]})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(out.read_text(), parse_constant=refuse) == {"error": None, "rows": [None, 1.5]}


def test_the_report_is_rewritten_after_each_stage_and_a_raising_stage_does_not_stop_the_run(tmp_path):
    out = tmp_path / "report.json"
    report = _report()
    seen_by_third = {}

    def raises(_budget_s):
        raise ValueError("boom in the stage runner")

    def reads_the_file(_budget_s):
        seen_by_third.update(json.loads(out.read_text())["stages"])
        return {"status": "ok", "results": {"n": 3}}

    stages = [("environment", 10.0, lambda _b: {"status": "ok", "results": {"device": "Fake GPU"}}),
              ("tests", 10.0, raises), ("profile", 10.0, reads_the_file)]
    gc.run_stages(stages, report, out, time.monotonic() + 60)
    assert seen_by_third["environment"]["status"] == "ok"
    assert seen_by_third["tests"]["status"] == "error"
    assert "ValueError: boom in the stage runner" in seen_by_third["tests"]["errors"][0]
    final = json.loads(out.read_text())
    assert [final["stages"][n]["status"] for n in ("environment", "tests", "profile")] == ["ok", "error", "ok"]
    assert final["environment"]["device"] == "Fake GPU"
    assert all(final["stages"][n]["duration_s"] >= 0 for n in final["stages"])


def test_a_stage_with_too_little_time_left_is_skipped_without_being_started(tmp_path):
    started = []
    gc.run_stages([("bench", 100.0, lambda b: started.append(b) or {"status": "ok"})], _report(),
                  tmp_path / "r.json", time.monotonic() + gc.MIN_STAGE_S / 2)
    assert started == []
    assert json.loads((tmp_path / "r.json").read_text())["stages"]["bench"]["status"] == "skipped"


def test_a_stage_past_its_budget_is_killed_and_keeps_what_it_finished(tmp_path):
    partial = tmp_path / "partial.json"
    child = textwrap.dedent(f"""
        import json, time
        open({str(partial)!r}, "w").write(json.dumps({{"status": "ok", "results": {{"cases": 1}}}}))
        print("first case done", flush=True)
        time.sleep(60)
    """)
    t0 = time.monotonic()
    record = gc.stage_from_process([sys.executable, "-c", child], 1.5, partial, None, "t")
    assert time.monotonic() - t0 < 15
    assert record["status"] == "timed out"
    assert record["results"] == {"cases": 1}
    assert "first case done" in record["output_tail"]


# --- what the stages report -----------------------------------------------------------------------------------------
def test_junit_results_count_passes_failures_and_skips(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">
        <testcase classname="tests.test_gpu_runtime" name="test_a"/>
        <testcase classname="tests.test_gpu_runtime" name="test_b"><failure message="assert 2 == 1">trace</failure></testcase>
        <testcase classname="tests.test_gpu_runtime" name="test_c"><skipped message="needs bitsandbytes"/></testcase>
        <testcase classname="tests.test_gpu_runtime" name="test_d"/></testsuite></testsuites>""")
    got = gc.parse_junit(xml)
    assert (got["tests"], got["passed"], got["failures"], got["skipped"]) == (4, 2, 1, 1)
    assert got["failed"][0]["test"] == "tests.test_gpu_runtime::test_b"
    assert got["skipped_tests"][0]["reason"] == "needs bitsandbytes"
    assert gc.parse_junit(tmp_path / "absent.xml") is None


def test_the_tests_stage_collects_only_files_with_gpu_marked_tests():
    files = gc.gpu_test_files()
    assert "tests/test_gpu_runtime.py" in files
    assert "tests/test_gpu_check.py" not in files  # no gpu mark here: it runs everywhere
    assert all(gc.GPU_MARK.search((ROOT / f).read_text()) for f in files)


def test_the_profile_leaves_out_a_format_whose_package_is_missing_and_says_why(monkeypatch):
    from residency.device import measure_cuda

    def fake_measure(_dev, _stream, name, _plan):
        if name == "NF4":
            raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")
        return 1.0, 20.0

    monkeypatch.setattr(measure_cuda, "measure_dequant", fake_measure)
    steps = []
    rates, calls, missing = measure_cuda.measure_dequant_rates(None, None, ["Q8_0", "NF4", "Q4_K"], None, steps.append)
    assert rates == {"Q8_0": 1.0, "Q4_K": 1.0}
    assert calls == {"Q8_0": 20.0, "Q4_K": 20.0}
    assert "bitsandbytes" in missing["NF4"]
    assert steps == ["dequant Q8_0", "dequant NF4", "dequant Q4_K"]


def test_the_bench_stage_saves_each_case_as_it_ends_and_names_what_raised(monkeypatch, tmp_path):
    partial = gc.Partial(tmp_path / "bench.json")
    saved_after_first_case = []

    def fake_bench(name, _profile, _backend, frames, warmup, deadline, on_case):
        if name == "broken":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        result = {"model": name, "rows": {"resident": {"measured_ms": 12.0}}}
        on_case(result)
        saved_after_first_case.append(json.loads(partial.path.read_text()))
        result["rows"]["streamed"] = {"exception": "Traceback…\ntorch.OutOfMemoryError: CUDA out of memory"}
        on_case(result)
        return result

    monkeypatch.setitem(sys.modules, "bench_runtime",
                        types.SimpleNamespace(GPU_MODELS=("tiny", "broken"), bench_gpu_model=fake_bench))
    monkeypatch.setattr(torch.cuda, "set_device", lambda _index: None)
    args = types.SimpleNamespace(device="cuda:0", budget_s=100.0, profile_json=str(tmp_path / "absent.json"))
    gc.bench_child(partial, args)
    partial.save()
    assert saved_after_first_case[0]["results"]["models"][0]["rows"] == {"resident": {"measured_ms": 12.0}}
    doc = json.loads(partial.path.read_text())
    assert doc["status"] == "failed"
    assert [m["model"] for m in doc["results"]["models"]] == ["tiny", "broken"]
    assert "illegal memory access" in doc["results"]["models"][1]["exception"]
    assert "tiny streamed" in doc["errors"][0] and "broken" in doc["errors"][0]
    assert any("nothing simulated" in n for n in doc["notes"])


# --- the table ---------------------------------------------------------------------------------------------------------
def test_the_table_renders_from_a_partial_report():
    report = _report(
        tests={"status": "ok", "duration_s": 41.0, "results": {"tests": 9, "passed": 8, "failures": 0, "errors": 0,
                                                               "skipped": 1}},
        bench={"status": "timed out", "duration_s": 150.0, "results": {"models": [
            {"model": "lucid-500m", "weights_bytes": 1.03e9, "build_s": 9.5,
             "rows": {"resident": {"measured_ms": 61.0, "simulated_ms": 55.0, "error": -0.1, "attach_s": 1.2},
                      "streamed-Q4_K": {"skipped": "the stage's time budget was spent"}}}]}})
    text = _rendered(report)
    assert "8 passed, 0 failed, 1 skipped" in text
    assert "not run" in text  # environment and profile never ran
    assert "timed out" in text and "1 of 2 cases measured" in text
    assert "61.0" in text and "-10%" in text and "time budget was spent" in text


def test_the_table_renders_from_a_report_with_no_stage_at_all():
    assert _rendered(_report()).count("not run") == len(gc.STAGES)


# --- the GPU bench's code path, on the CPU backend ------------------------------------------------------------------
@pytest.mark.usefixtures("one_compute_thread")
def test_the_gpu_bench_measures_and_simulates_a_streamed_case_on_the_cpu_backend():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_runtime

    from residency.device import load_profile

    cases_seen = []
    result = bench_runtime.bench_gpu_model("tiny", load_profile("rtx-4090"), "cpu", frames=1, warmup=0,
                                           cases=("streamed",), on_case=lambda r: cases_seen.append(dict(r["rows"])))
    row = result["rows"]["streamed"]
    assert "exception" not in row, row.get("exception")
    assert row["measured_ms"] > 0 and row["simulated_ms"] > 0
    assert row["link_bytes_per_frame"] == row["sim_link_bytes_per_frame"] > 0
    assert cases_seen == [result["rows"]]


def test_the_gpu_bench_records_a_raising_case_and_skips_past_its_deadline(monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_runtime

    def fake_case(_w, _pipe, _image, case, *_rest):
        if case == "streamed":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"measured_ms": 1.0}

    monkeypatch.setattr(bench_runtime, "_gpu_case", fake_case)
    monkeypatch.setattr(bench_runtime, "WorldModelPipeline", types.SimpleNamespace(from_config=lambda *a, **k: None))
    result = bench_runtime.bench_gpu_model("tiny", None, "cpu", cases=("resident", "streamed", "streamed-Q8_0"))
    assert result["rows"]["resident"] == {"measured_ms": 1.0}
    assert "OutOfMemoryError" in result["rows"]["streamed"]["exception"]
    assert result["rows"]["streamed-Q8_0"] == {"measured_ms": 1.0}
    late = bench_runtime.bench_gpu_model("tiny", None, "cpu", cases=("resident",), deadline=time.monotonic() - 1)
    assert "skipped" in late["rows"]["resident"]
