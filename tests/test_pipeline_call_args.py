"""The call a pipeline is attached with: a pipeline that takes no prompt is given none, a seeded generator in the
call draws after attach what it would have drawn without it, and a call the pipeline refuses is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from sim_helpers import flat_profile
from test_pipeline_attach import CALL, image, tiny_flux

import residency
from residency.errors import ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")

PROFILE = flat_profile(backend="cpu")


def tiny_ddpm() -> DDPMPipeline:
    """Unconditional: its call takes batch_size and a generator, no prompt."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20))


def test_a_pipeline_that_takes_no_prompt_is_planned_and_runs_as_without_residency():
    pipe = tiny_ddpm()
    call = dict(batch_size=1, num_inference_steps=2, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call) as rt:
        got = rt(**call, generator=torch.Generator().manual_seed(3)).images
    assert np.array_equal(got, expected)


def test_a_seeded_generator_in_the_call_draws_after_attach_what_it_draws_without():
    pipe = tiny_flux()
    expected = image(pipe)
    call = dict(CALL, output_type="np", generator=torch.Generator().manual_seed(0))
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", policy="accelerate-sequential",
                          example_inputs=call) as rt:
        got = rt(**call).images  # the same dict, its generator given again
    assert np.array_equal(got, expected)


def test_a_call_the_pipeline_refuses_is_an_error_naming_it_and_the_pipeline_is_untouched():
    pipe = tiny_ddpm()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ResidencyError, match="did not run on the call given for planning.*not_an_argument") as e:
        residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu",
                         example_inputs=dict(batch_size=1, num_inference_steps=2, not_an_argument=1))
    assert "example_inputs=" in e.value.hint
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
