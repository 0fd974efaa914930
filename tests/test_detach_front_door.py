"""`residency.detach(model)`: let go of an attach whose runtime the caller did not keep."""

from __future__ import annotations

import pytest
import torch
from sim_helpers import flat_profile
from test_attach_front_door import Small, X, attach_small
from test_pipeline_call_args import tiny_ddpm

import residency
from residency.errors import ResidencyError
from residency.runtime.hooks import has_hook

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _state(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def test_a_model_attached_on_a_line_alone_is_detached_by_name_and_restored():
    model = Small()
    want, before = model(X), _state(model)
    attach_small(model, vram="40%")  # the runtime not kept
    with pytest.raises(ResidencyError) as e:
        attach_small(model)
    assert "residency.detach(model)" in e.value.hint
    residency.detach(model)
    assert not any(has_hook(m) for m in model.modules())
    after = _state(model)
    assert all(after[k][0] == before[k][0] and torch.equal(after[k][1], before[k][1]) for k in before)
    assert torch.equal(model(X), want)
    attach_small(model).detach()  # attachable again


def test_detach_of_what_is_not_attached_or_is_one_block_of_it_is_refused_by_name():
    model = Small()
    with pytest.raises(ResidencyError, match="Small is not attached"):
        residency.detach(model)
    rt = attach_small(model, vram="40%")
    try:
        with pytest.raises(ResidencyError, match="one block of a model attached whole"):
            residency.detach(model.blocks[0])
    finally:
        rt.detach()
    with pytest.raises(ResidencyError, match="not attached"):
        residency.detach(model)  # detached by its runtime: nothing left


def test_a_pipeline_is_detached_by_name_offload_guards_and_all():
    pipe = tiny_ddpm()
    residency.attach(pipe, vram="60%", profile=flat_profile(backend="cpu"), backend="cpu",
                     example_inputs=dict(num_inference_steps=2))
    assert "enable_model_cpu_offload" in vars(pipe)  # the guard refusing offload while attached
    residency.detach(pipe)
    assert "enable_model_cpu_offload" not in vars(pipe)
    assert not any(has_hook(m) for m in pipe.unet.modules())
    with pytest.raises(ResidencyError, match="DDPMPipeline is not attached"):
        residency.detach(pipe)


def test_a_runtime_refuses_copy_and_pickling_by_name():
    import copy
    import pickle

    model = Small()
    with attach_small(model, vram="40%") as rt:
        for op in (copy.deepcopy, copy.copy, pickle.dumps):
            with pytest.raises(ResidencyError, match="Runtime") as e:
                op(rt)
            assert "save_plan" in e.value.hint
        assert torch.equal(model(X), model(X))  # still attached and running
