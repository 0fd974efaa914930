"""On the CPU backend the device memory is RAM: the default commands fit what is free now.

The host-memory reading is patched (residency.device.host_memory.host_memory, which every check calls
through its module), so no test depends on this machine's free RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import numpy as np
import pytest
from PIL import Image
from sim_helpers import flat_profile

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency import session_setup
from residency.cli import main
from residency.commands.console import make_console
from residency.device import cached_profile_path, load_profile, save_profile
from residency.device.host_memory import HostMemory
from residency.plan import BlockPlan, Budget, Plan
from residency.runtime import HostMemoryExceeded, Runtime, clear_host_cache
from residency.runtime.host_store import HOST_HEADROOM, blob_layout
from residency.simulate import simulate
from residency.workload import workload_from_dict

GIB = 2**30


def report_free(monkeypatch, available_bytes: int) -> None:
    reading = HostMemory(total_bytes=max(available_bytes, 32 * GIB), available_bytes=available_bytes,
                         limited_by="host")
    monkeypatch.setattr("residency.device.host_memory.host_memory", lambda *a, **k: reading)


@pytest.fixture()
def big_cpu_box(tmp_path, monkeypatch):
    """30 GiB free, and a cached CPU profile measured then: usable = free - 2 GiB, as measure_cpu sets it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(session_setup, "device_kind", lambda: "cpu")
    report_free(monkeypatch, 30 * GIB)
    profile = load_profile("rx-7800-xt")
    profile = dataclasses.replace(profile, backend="cpu", memory_total_bytes=32 * GIB,
                                  memory_reserve_bytes=2 * GIB, memory_usable_bytes=28 * GIB,
                                  graph_replay_us_per_kernel=0.0, graph_pool_bytes_per_class=0)  # no graphs on a cpu
    path = cached_profile_path("cpu")
    path.parent.mkdir(parents=True)
    save_profile(profile, path)
    load_profile(path)  # readable: else every test here would measure the machine (~1 min) and test that instead
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "start.png")
    return tmp_path


def test_run_with_its_defaults_fits_a_machine_with_30_gib_free(big_cpu_box, capsys):
    assert main(["run", "default", "--frames", "2", "-o", "x.gif"]) == 0, capsys.readouterr().err
    with Image.open(big_cpu_box / "x.gif") as gif:
        assert gif.n_frames >= 2


def test_the_default_cpu_budget_is_no_larger_than_the_ram_free_now_less_the_host_store(big_cpu_box, capsys):
    w = workload_from_dict(catalog_entry("tiny"))
    budget = session_setup.default_vram_bytes(28 * GIB, w, make_console(stderr=True))
    assert budget == int(30 * GIB * HOST_HEADROOM) - w.nbytes("F32")
    assert "below the profile's" not in capsys.readouterr().err  # gigabytes for a model of megabytes: not said


def test_a_cpu_budget_the_ram_free_now_makes_binding_is_said(big_cpu_box, capsys, monkeypatch):
    w = workload_from_dict(catalog_entry("tiny"))
    free = int((w.nbytes("F32") * 2.5) / HOST_HEADROOM)  # room for the weights 1.5 times over: it may bind
    report_free(monkeypatch, free)
    budget = session_setup.default_vram_bytes(28 * GIB, w, make_console(stderr=True))
    assert budget == int(free * HOST_HEADROOM) - w.nbytes("F32")
    assert "below the profile's" in capsys.readouterr().err  # said, not silent


def test_the_default_cpu_budget_keeps_a_profile_that_fits(big_cpu_box):
    w = workload_from_dict(catalog_entry("tiny"))
    assert session_setup.default_vram_bytes(4 * GIB, w, make_console(stderr=True)) == 4 * GIB


def test_no_ram_left_for_the_device_memory_is_a_clear_error(big_cpu_box, monkeypatch, capsys):
    report_free(monkeypatch, 2**20)
    assert main(["run", "tiny", "--image", "start.png", "-o", "x.gif"]) == 1
    err = capsys.readouterr().err
    assert "nothing is left for the model's device memory" in err and "hint:" in err
    assert not (big_cpu_box / "x.gif").exists()


class _Keys:
    """Stands in for the terminal: no key for the first frame, then q."""

    def __init__(self):
        self.calls = 0

    def read(self, timeout_s: float) -> list[str]:
        self.calls += 1
        return [] if self.calls == 1 else ["q"]


class _Screen:
    def refresh(self) -> None:
        pass


def test_play_with_its_defaults_fits_a_machine_with_30_gib_free(big_cpu_box, monkeypatch, capsys):
    from residency.commands import play_cmd

    monkeypatch.setattr("residency.dashboard.require_terminal", lambda console, what, instead: None)
    monkeypatch.setattr(play_cmd, "_require_keyboard", lambda: None)
    monkeypatch.setattr("residency.dashboard.keyboard.raw_keyboard", lambda: contextlib.nullcontext(_Keys()))
    monkeypatch.setattr("residency.dashboard.live", lambda console, view: contextlib.nullcontext(_Screen()))
    assert main(["play"]) == 0, capsys.readouterr().err
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "played 1 latent frames" in out


# --- the runtime's check: host store + the plan's predicted device peak, not the budget ---------------------
@pytest.fixture(scope="module")
def tiny():
    return workload_from_dict(catalog_entry("tiny"))


def predicted_plan(w, budget_bytes: int) -> Plan:
    blocks = tuple(BlockPlan(b.name, "resident", "F32", "fp32") for b in w.blocks)
    plan = Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="test",
                policy="test", budget=Budget(budget_bytes), blocks=blocks, steps=w.steps,
                context_frames=w.context_frames)
    return plan.with_prediction(simulate(w, plan, flat_profile()).prediction)


def store_bytes(w) -> int:
    return sum(blob_layout(b, "F32").nbytes for b in w.blocks)


def test_a_budget_larger_than_the_ram_is_not_counted_against_it(tiny, monkeypatch):
    clear_host_cache()
    plan = predicted_plan(tiny, 64 * GIB)  # a ceiling far beyond the RAM reported free
    need = store_bytes(tiny) + plan.prediction.peak_total_bytes
    report_free(monkeypatch, int(need / HOST_HEADROOM) + 2**20)
    rt = Runtime(plan, "cpu", workload=tiny).attach(WorldModelPipeline.from_config("tiny"))
    rt.detach()


def test_a_plan_whose_peak_and_store_exceed_the_ram_is_refused_before_packing(tiny, monkeypatch):
    clear_host_cache()
    plan = predicted_plan(tiny, 64 * GIB)
    need = store_bytes(tiny) + plan.prediction.peak_total_bytes
    report_free(monkeypatch, int(need / HOST_HEADROOM) - 2**20)
    rt = Runtime(plan, "cpu", workload=tiny)
    with pytest.raises(HostMemoryExceeded, match="device memory in RAM") as err:
        rt.attach(WorldModelPipeline.from_config("tiny"))
    assert err.value.hint and rt.store.packed_now_bytes == 0


def test_run_refuses_a_plan_that_does_not_fit_the_ram_with_an_error_and_no_output(big_cpu_box, monkeypatch,
                                                                                   capsys):
    report_free(monkeypatch, 8 * 2**20)  # room for neither the store nor the device memory
    code = main(["run", "tiny", "--image", "start.png", "--vram", "24MiB", "-o", "x.gif"])
    err = capsys.readouterr().err
    assert code == 1 and "of RAM" in err and "hint:" in err and "Traceback" not in err
    assert not (big_cpu_box / "x.gif").exists()


def test_a_vram_budget_beyond_the_device_is_run_as_asked_and_said(big_cpu_box, capsys):
    assert main(["run", "default", "--frames", "2", "--vram", "1000TiB", "-o", "x.gif"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: --vram 1000.0 TiB is more than" in err and "(28.0 GiB)" in err and "leave --vram out" in err
