"""`import residency` exports the API the README shows, lazily: the import itself loads no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from sim_helpers import chain_workload, flat_profile

import residency
from policies import PlanRequest, get_policy
from residency.errors import ResidencyError
from residency.plan import Budget

EXPORTED = ("attach", "Runtime", "load_profile", "machine_profile", "DeviceProfile", "get_format", "open_checkpoint",
            "save_checkpoint", "Budget", "Plan", "load_plan", "save_plan", "make_plan", "workload_from_module")


def test_import_residency_loads_neither_torch_nor_the_planner():
    code = "import residency, sys; assert 'torch' not in sys.modules and 'policies' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_readme_name_is_exported_with_a_docstring(name):
    assert name in residency.__all__
    value = getattr(residency, name)
    assert value.__doc__ and len(value.__doc__.split()) >= 8, f"residency.{name} needs a docstring"


def test_exports_are_the_objects_of_their_own_modules():
    from residency.device import load_profile
    from residency.plan import Plan
    from residency.runtime import Runtime

    assert (residency.load_profile, residency.Plan, residency.Runtime) == (load_profile, Plan, Runtime)


def test_the_plan_subpackage_is_not_shadowed():
    import residency.plan

    assert residency.plan.Budget is residency.Budget


def test_an_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        residency.no_such_name  # noqa: B018


def test_make_plan_is_the_policy_on_the_same_request():
    workload, profile = chain_workload(n=4), flat_profile()
    got = residency.make_plan(workload, profile, vram=2**30, frame_ms=50.0, compute_dtype="fp16")
    want = get_policy("ours")(PlanRequest(workload, profile, Budget(2**30, 50.0), compute_dtype="fp16"))
    assert dataclasses.replace(got, notes=()) == dataclasses.replace(want, notes=())  # notes carry timings


def test_make_plan_reads_fps_as_video_frames_per_second():
    workload, profile = chain_workload(n=4), flat_profile()
    plan = residency.make_plan(workload, profile, vram="1GiB", fps=20, policy="all-resident")
    assert plan.budget == Budget(2**30, 1000.0 * workload.video_frames_per_latent / 20)


def test_make_plan_takes_auto_as_attach_does_this_machines_cached_profile(monkeypatch):
    import residency.device

    profile, asked = flat_profile(), []
    monkeypatch.setattr(residency.device, "machine_profile", lambda *a, **k: asked.append(a) or profile)
    plan = residency.make_plan(chain_workload(n=2), "auto", vram="1GiB")
    assert asked and plan.profile_fingerprint == residency.make_plan(chain_workload(n=2), profile,
                                                                     vram="1GiB").profile_fingerprint


def test_make_plan_refuses_an_unknown_compute_dtype():
    with pytest.raises(ResidencyError, match="compute_dtype"):
        residency.make_plan(chain_workload(n=2), flat_profile(), compute_dtype="int8")


def test_the_dtype_tables_agree_on_bytes():
    from residency.formats import (
        COMPUTE_DTYPE_BYTES,
        DTYPE_FORMAT,
        KV_DTYPE_BYTES,
        KV_TORCH_DTYPES,
        TORCH_DTYPES,
    )

    for name, nbytes in COMPUTE_DTYPE_BYTES.items():
        assert TORCH_DTYPES[name].itemsize == nbytes == residency.get_format(DTYPE_FORMAT[name]).nbytes((1,))
    assert {k: v.itemsize for k, v in KV_TORCH_DTYPES.items()} == KV_DTYPE_BYTES


@pytest.mark.parametrize("args", [(-1,), (0,), (1.5,), (True,), (2**30, -3.0), (2**30, 0.0), (2**30, float("nan"))])
def test_a_budget_no_plan_could_hold_is_refused_where_it_is_made(args):
    from residency.errors import ResidencyError
    from residency.plan import Budget

    with pytest.raises(ResidencyError, match=r"Budget\.(vram_bytes|frame_ms) must be"):
        Budget(*args)


@pytest.mark.parametrize("field_value", [("compute_dtype", "fp64"), ("profile", "rx-7800-xt"), ("budget", 2**30)])
def test_a_plan_request_of_the_wrong_kind_says_which_field(field_value):
    from pipelines.catalog import catalog_paths
    from policies import PlanRequest
    from residency.device import load_profile
    from residency.errors import ResidencyError
    from residency.plan import Budget
    from residency.workload import load_workload_file

    name, value = field_value
    fields = dict(workload=load_workload_file(catalog_paths()["tiny"]), profile=load_profile("rx-7800-xt"),
                  budget=Budget(2**30))
    with pytest.raises(ResidencyError, match=f"PlanRequest.{name}"):
        PlanRequest(**{**fields, name: value})
