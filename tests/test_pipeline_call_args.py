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


def tiny_sd_img2img():
    """A StableDiffusionImg2ImgPipeline of ~0.2 M parameters: CLIP, a cross-attention UNet, a 2-level VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from test_pipeline_attach import clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=55, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8).eval()
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(), unet=unet,
                                          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_img2img_call_that_runs_no_step_at_one_is_planned_at_its_own_steps():
    """The planning call runs one denoise step; Stable Diffusion's img2img at strength < 1 runs int(1 × strength)
    = 0 of them (it failed on an empty batch). It is planned from the call at its own steps instead, at the steps it
    runs (strength × steps), with a warning."""
    from residency.errors import PlanWarning

    pipe = tiny_sd_img2img()
    image = torch.rand(1, 3, 32, 32)
    call = dict(prompt="a cat", image=image, strength=0.5, num_inference_steps=4, guidance_scale=7.5,
                output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with pytest.warns(PlanWarning, match="did not run one denoise step"):
        rt = residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", policy="accelerate-sequential",
                              example_inputs=call)
    with rt:
        assert rt.workload.steps == 2  # int(4 × 0.5)
        got = rt(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(got, expected)


def test_a_larger_batch_size_than_planned_is_refused_naming_batch_size():
    pipe = tiny_ddpm()
    call = dict(batch_size=1, num_inference_steps=2, output_type="np")
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call) as rt:
        with pytest.raises(ResidencyError, match=r"batch of 1 through unet; this call runs 2 \(batch_size sets it\)") \
                as e:
            rt(**{**call, "batch_size": 2})
    assert "batch_size=…" in e.value.hint and "prompt" not in str(e.value) + e.value.hint


def test_no_plan_fits_hint_names_only_what_the_pipelines_call_takes():
    from residency.runtime.ledger import DeviceBudgetExceeded

    pipe = tiny_ddpm()
    with pytest.raises(DeviceBudgetExceeded, match="for the shapes of num_inference_steps=2, batch_size=1") as e:
        residency.attach(pipe, vram=1024, profile=PROFILE, backend="cpu",
                         example_inputs=dict(batch_size=1, num_inference_steps=2, output_type="np"))
    # a batch of 1 has nothing smaller to plan for; DDPMPipeline's call takes no height
    assert "batch_size" not in e.value.hint and "height" not in e.value.hint + str(e.value)
    with pytest.raises(DeviceBudgetExceeded, match="batch_size=2") as e:
        residency.attach(pipe, vram=1024, profile=PROFILE, backend="cpu",
                         example_inputs=dict(batch_size=2, num_inference_steps=2, output_type="np"))
    assert "example_inputs=dict(batch_size=…)" in e.value.hint and "height" not in e.value.hint


def test_a_misspelt_argument_the_pipelines_kwargs_would_swallow_is_refused():
    """StableDiffusion's call takes **kwargs (deprecated callbacks): `hieght` was planned at the default height."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_img2img().components)
    with pytest.raises(ResidencyError, match=r"has no argument 'hieght' \(did you mean 'height'\?\)"):
        residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu",
                         example_inputs=dict(prompt="a cat", hieght=16))


def test_a_call_with_prompt_embeds_plans_without_the_encoders_it_does_not_run():
    """Embeddings computed beforehand skip the text encoders: they are left out of the plan (with a warning),
    run as they are, and the image equals the plain pipeline's. It was an error naming them."""
    from residency.errors import PlanWarning

    pipe = tiny_flux()
    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt("a cat", None, max_sequence_length=CALL["max_sequence_length"])
    call = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=16, width=16, max_sequence_length=16,
                num_inference_steps=2, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with pytest.warns(PlanWarning, match="text_encoder, text_encoder_2 did not run in the call planned for"):
        rt = residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call)
    with rt:
        assert {bp.name.split(".")[0] for bp in rt.plan.blocks} == {"transformer", "vae"}
        got = rt(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("call,source", [(None, "DDPMPipeline's default"), (dict(num_inference_steps=100), "given")])
def test_more_steps_than_a_plan_covers_are_refused_naming_the_argument_and_its_source(call, source):
    pipe = tiny_ddpm()  # DDPMPipeline defaults to 1000 steps
    with pytest.raises(ResidencyError) as err:
        residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call)
    assert "denoise steps (num_inference_steps" in err.value.message and f"num_inference_steps {source})" in err.value.message
    assert "example_inputs=dict(num_inference_steps=N)" in err.value.hint
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())  # refused before attaching


def tiny_sd_euler():
    """The text-to-image pipeline of tiny_sd_img2img's components, with a scheduler that takes timesteps=."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    parts = tiny_sd_img2img().components
    return StableDiffusionPipeline(**{**parts, "scheduler": EulerDiscreteScheduler()})


def test_a_call_giving_its_timesteps_is_planned_and_checked_at_their_count():
    """The plan counted the signature's 50 steps for a call that ran 3 (43× the prediction, a false budget warning),
    and a call of those same timesteps against a 3-step plan was refused as num_inference_steps=50."""
    pipe = tiny_sd_euler()
    call = dict(prompt="a cat", timesteps=[999, 600, 300], guidance_scale=7.5, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call) as rt:
        assert rt.workload.steps == 3
        assert np.array_equal(rt(**call, generator=torch.Generator().manual_seed(0)).images, expected)
        rt(prompt="a cat", num_inference_steps=3, guidance_scale=7.5, output_type="np")  # the same 3 steps
        with pytest.raises(ResidencyError, match="made for num_inference_steps=3, this call asks num_inference_steps=4"):
            rt(**{**call, "timesteps": [999, 700, 400, 100]})


def test_a_plan_at_the_default_height_takes_that_height_given_and_a_smaller_one():
    """Compared raw, the default (None) refused `height=32`, the very height it ran at, and any smaller one."""
    pipe = tiny_sd_euler()
    call = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call) as rt:
        assert rt(**call, height=default, width=default).images.shape[1:3] == (default, default)
        assert rt(**call, height=default // 2, width=default // 2).images.shape[1:3] == (default // 2,) * 2
        with pytest.raises(ResidencyError, match=f"made for height={default}, this call asks height={2 * default}"):
            rt(**call, height=2 * default, width=2 * default)
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu",
                          example_inputs={**call, "height": default, "width": default}) as rt:
        assert rt(**call).images.shape[1:3] == (default, default)  # its default is the height planned


def test_the_pipelines_fuse_qkv_projections_is_refused_while_attached_before_it_builds_anything():
    """Fused while attached, to_qkv was built from shared slots: the next call was refused, but the pipeline stayed
    fused and wrong after detach (0.20 off) until unfuse_qkv_projections()."""
    pipe = tiny_sd_euler()
    call = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", policy="accelerate-sequential",
                          example_inputs=call) as rt:
        with pytest.raises(ResidencyError, match=r"fuse_qkv_projections\(\) while residency is attached") as e:
            pipe.fuse_qkv_projections()
        assert "fuse before attaching" in e.value.hint
        assert not any(name.endswith("to_qkv") for name, _ in pipe.unet.named_modules())
        assert np.array_equal(rt(**call, generator=torch.Generator().manual_seed(0)).images, expected)
    assert "fuse_qkv_projections" not in vars(pipe)  # the pipeline's own method again


def test_a_larger_batch_of_class_labels_is_named_for_what_sets_it():
    """A DiT pipeline's call takes class_labels, not a prompt: a longer list read "classifier-free guidance
    (guidance_scale) sets it", with a hint of `example_inputs=dict(…, …)`."""
    from residency.batch_guard import batch_arguments, batch_guard, planned_batches

    lin = torch.nn.Linear(4, 4)
    set_by = batch_arguments(["class_labels", "guidance_scale", "num_inference_steps"])
    assert set_by == ("class_labels", "guidance_scale")
    planned = planned_batches({"transformer": ((torch.zeros(2, 4),), {}, 1)}, {"transformer": "forward"})
    with batch_guard({"transformer": lin}, planned, set_by), pytest.raises(ResidencyError) as e:
        lin(torch.zeros(4, 4))
    assert "a list of class_labels or classifier-free guidance" in str(e.value) and "class_labels=[…]" in e.value.hint


def test_a_pipeline_runtime_takes_a_budget_change_and_calibrates_as_a_models_runtime_does():
    # PipelineRuntime had neither: set_budget / calibrated_profile raised AttributeError (only rt.runtime's worked)
    pipe = tiny_ddpm()
    call = dict(batch_size=1, num_inference_steps=2, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    with residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call) as rt:
        with pytest.raises(ResidencyError, match="calibration needs more than 0 frames of the running plan"):
            rt.calibrated_profile(warmup_frames=0)
        rt.set_budget("50%")
        got = rt(**call, generator=torch.Generator().manual_seed(3)).images
        assert rt.plan.streamed()  # the cut re-planned at the call: some blocks stream now
    assert np.array_equal(got, expected)


def test_a_call_for_latents_plans_without_the_vae_it_does_not_run():
    """The planning call was made with output_type="np" whatever the example said: the VAE was planned (and held in
    the budget) for a user who never decodes, against what the README says."""
    from residency.errors import PlanWarning

    pipe = tiny_flux()
    call = dict(prompt="a cat", height=16, width=16, max_sequence_length=16, num_inference_steps=2,
                output_type="latent")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with pytest.warns(PlanWarning, match="vae did not run in the call planned for"):
        rt = residency.attach(pipe, vram="100%", profile=PROFILE, backend="cpu", example_inputs=call)
    with rt:
        assert "vae" not in {bp.name.split(".")[0] for bp in rt.plan.blocks}
        got = rt(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(got, expected)
