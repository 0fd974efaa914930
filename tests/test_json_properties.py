"""Random damage to a good plan, profile, catalog or trace gives a clean ResidencyError or a valid read, nothing else.

One field at a time is replaced by a hostile value, deleted, or joined by an unknown one.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_json_cli import TRACE

from pipelines.catalog import catalog_paths
from residency.dashboard import read_trace
from residency.device import load_profile, profile_from_dict, profile_to_dict
from residency.errors import ResidencyError
from residency.plan import BlockPlan, Budget, Plan, Prediction, plan_from_dict, plan_to_dict
from residency.workload import workload_from_dict

HOSTILE = st.sampled_from([None, True, False, 0, -1, 1, 2**63, 2**64 + 1, 10**400, 0.5, -0.0, 1e308, "", "x",
                           "8MiB", [], [1], ["x"], {}, {"a": 1}, [[[]]]])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _paths(doc, prefix=()):
    """Every (container path, key) in the document, so a mutation can reach any field."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield prefix, key
        yield from _paths(value, (*prefix, key))


def _damage(doc, data) -> dict:
    doc = copy.deepcopy(doc)
    sites = list(_paths(doc))
    prefix, key = data.draw(st.sampled_from(sites))
    parent = doc
    for k in prefix:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[key] = data.draw(HOSTILE)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent["unexpected_field"] = data.draw(HOSTILE)
    else:
        parent.append(data.draw(HOSTILE))
    return doc


def _plan_doc() -> dict:
    prediction = Prediction(40.0, 60.0, 1.0, 5.0, 35.0, 1024, {"slots": 1024, "weights": 2048}, 30.0, 0.01)
    blocks = (BlockPlan("a", "resident", "BF16"), BlockPlan("b", "streamed", "Q4_K", dequant_on="copy"))
    return plan_to_dict(Plan("m", "f" * 16, "p", "-", "ours", Budget(2**30, 50.0), blocks, kv_dtype="fp8",
                             steps=4, context_frames=12, prediction=prediction, notes=("n",)))


PLAN = _plan_doc()
PROFILE = profile_to_dict(load_profile("rx-7800-xt"))
CATALOG = json.loads(catalog_paths()["tiny"].read_text())


def _clean_or_valid(read) -> None:
    try:
        read()
    except ResidencyError as e:
        assert e.message and e.hint


def test_the_undamaged_documents_read():
    plan_from_dict(PLAN, "plan.json")
    profile_from_dict(PROFILE, "gpu.json")
    workload_from_dict(CATALOG, "tiny.json")


@SETTINGS
@given(data=st.data())
def test_a_damaged_plan_is_refused_cleanly_or_read(data):
    _clean_or_valid(lambda: plan_from_dict(_damage(PLAN, data), "plan.json"))


@SETTINGS
@given(data=st.data())
def test_a_damaged_profile_is_refused_cleanly_or_read(data):
    _clean_or_valid(lambda: profile_from_dict(_damage(PROFILE, data), "gpu.json"))


@SETTINGS
@given(data=st.data())
def test_a_damaged_catalog_is_refused_cleanly_or_read(data):
    _clean_or_valid(lambda: workload_from_dict(_damage(CATALOG, data), "tiny.json"))


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "trace.json"


@SETTINGS
@given(data=st.data())
def test_a_damaged_trace_is_refused_cleanly_or_read(trace_path, data):
    trace_path.write_text(json.dumps(_damage(TRACE, data)))
    _clean_or_valid(lambda: read_trace(trace_path))
