"""A model whose parameters were made under torch.inference_mode: attaching rebinds their .data, after which torch
refuses every call that reads them ("Inference tensors do not track version counter", raised from the model's
forward). It attached, then failed on every call; now attach refuses it, naming a parameter and the remedy."""

from __future__ import annotations

import pytest
import torch
from test_attach_guards import attach
from torch import nn

from residency.errors import ResidencyError
from residency.runtime import Runtime
from residency.runtime.hooks import has_hook

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def built_in_inference_mode() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)]).eval()
    return model, torch.randn(2, 32)


@pytest.mark.parametrize("vram", ["40%", None])
def test_parameters_made_in_inference_mode_are_refused_by_name_and_the_remedy_works(vram):
    model, x = built_in_inference_mode()
    with torch.inference_mode():
        expected = model(x)
    with pytest.raises(ResidencyError, match=r"Sequential\.0\.0\.weight .*inference_mode") as e:
        attach(model, x, vram=vram)
    assert "nn.Parameter(p.clone()" in e.value.hint
    assert not any(has_hook(m) for m in model.modules())
    for m in model.modules():  # the hint's remedy, outside inference mode
        for n, p in list(m.named_parameters(recurse=False)):
            setattr(m, n, nn.Parameter(p.clone(), requires_grad=False))
    with attach(model, x, vram=vram), torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_a_runtime_attached_directly_refuses_them_too():
    """Runtime.attach (the world-model pipeline's and attach_pipeline's way in) checks as residency.attach does."""
    model, x = built_in_inference_mode()
    twin = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)]).eval()
    with attach(twin, x) as rt:  # the same architecture outside inference mode: a plan for `model` too
        plan, workload = rt.plan, rt.workload
    with pytest.raises(ResidencyError, match="inference_mode"):
        Runtime(plan, "cpu", workload=workload).attach(model)
    assert not any(has_hook(m) for m in model.modules())
