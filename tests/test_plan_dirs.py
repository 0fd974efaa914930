"""`residency plan` of a Flux or Wan model directory and of a diffusers pipeline directory, from configs only
(residency.commands.config_source, residency.commands.pipeline_source): the example each config implies at
the pipeline's default size (or --height/--width/--frames), counted on meta; a pipeline as encode → denoise ×
steps → decode, equal to the workload residency.attach_pipeline traces from one real call of the same pipeline."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    WanTransformer3DModel,
)
from test_pipeline_attach import clip_tokenizer, tiny_flux, tiny_wan
from transformers import CLIPTextConfig, CLIPTextModel

from residency.attach_pipeline import pipeline_workload
from residency.cli import main
from residency.commands.sources import resolve_workload
from residency.front_door.examples import ExampleSize
from residency.workload import workload_from_module

pytestmark = pytest.mark.usefixtures("one_compute_thread")

FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=64)
MODELS = {"flux": (FluxTransformer2DModel, FLUX), "wan": (WanTransformer3DModel, WAN)}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def model_dir(tmp_path, request):
    cls, config = MODELS[request.param]
    cls.from_config(config).save_config(tmp_path / request.param)
    return tmp_path / request.param


def tiny_sd() -> StableDiffusionPipeline:
    """Guidance as one UNet call on a batch of 2 (prompt and negative prompt encoded apart); a VAE of scale 2."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=55, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=24,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    for m in (unet, clip, vae):
        m.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Tiny random Flux, Wan and SD pipelines and the directories save_pretrained wrote, weights removed: a
    pipeline directory planned from its configs and tokenizer configs alone."""
    out = {}
    for name, make in (("flux", tiny_flux), ("wan", tiny_wan), ("sd", tiny_sd)):
        pipe = make()
        path = tmp_path_factory.mktemp(name) / f"{name}-pipe"
        pipe.save_pretrained(path)
        for weights in path.rglob("*.safetensors"):
            weights.unlink()
        out[name] = pipe, path
    return out


def covered(doc, model):
    """Every parameter of `model` under the plan's module paths ("": the root's own tensors)."""
    return {f"{path}.{name}".lstrip(".") for b in doc["blocks"] for path in b["modules"]
            for name, _ in model.get_submodule(path).named_parameters(recurse=bool(path), remove_duplicate=False)}


@pytest.mark.parametrize(("model_dir", "size"), [("flux", "1024×1024, 512 prompt tokens"),
                                                  ("wan", "480×832, 81 frames, 512 prompt tokens")],
                         indirect=["model_dir"])
def test_a_flux_or_wan_model_directory_plans_at_its_pipelines_default_size(capsys, model_dir, size):
    code, out, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == f"{model_dir.name} at {size}"
    cls, config = MODELS[model_dir.name]
    model = cls.from_config(config)
    assert covered(doc, model) == set(dict(model.named_parameters()))


@pytest.mark.parametrize("model_dir", ["flux"], indirect=True)
def test_a_lone_denoiser_at_several_steps_says_its_ms_are_for_that_many_calls(capsys, model_dir):
    """--steps 4 made a "frame" four calls, and the plan said "0.50 ms per call (2000 calls/s)"."""
    code, one, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--policy", "all")
    assert code == 0, err
    code, four, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--policy", "all", "--steps", "4")
    assert code == 0, err
    one, four = " ".join(one.split()), " ".join(four.split())
    assert "per call (" in one and "per 4 calls (" in four and "per call" not in four
    ms_one = float(one.split("predicted: ")[1].split(" ms")[0])
    ms_four = float(four.split("predicted: ")[1].split(" ms")[0])
    rate_four = float(four.split("per 4 calls (")[1].split(" calls/s")[0])
    assert ms_four == pytest.approx(4 * ms_one, rel=0.1)  # four calls of the same model
    assert rate_four == pytest.approx(4000 / ms_four, rel=0.05)  # calls a second, not rounds of four
    assert "ms/4 calls" in four and "link/4 calls" in four


def flux_example(tokens: int, text: int) -> dict:
    return dict(hidden_states=torch.randn(1, tokens, 16), encoder_hidden_states=torch.randn(1, text, 32),
                pooled_projections=torch.randn(1, 24), timestep=torch.ones(1), img_ids=torch.zeros(tokens, 3),
                txt_ids=torch.zeros(text, 3), guidance=torch.ones(1), return_dict=False)


def wan_example(frames: int, side: int, text: int) -> dict:
    return dict(hidden_states=torch.randn(1, 4, frames, side, side), timestep=torch.ones(1),
                encoder_hidden_states=torch.randn(1, text, 32), return_dict=False)


@pytest.mark.parametrize(("model_dir", "size", "example"), [
    ("flux", ExampleSize(64, 96), flux_example(4 * 6, 512)),  # 64×96 px: a 4×6 grid of 2×2-packed latent pixels
    ("wan", ExampleSize(32, 32, 5), wan_example(2, 4, 512)),  # 5 frames: 2 latent frames of 4×4
], indirect=["model_dir"])
def test_a_model_directory_counts_what_the_live_model_counts_at_the_same_example(model_dir, size, example):
    planned = resolve_workload(str(model_dir), compute_dtype="fp32", size=size)
    cls, config = MODELS[model_dir.name]
    torch.manual_seed(0)
    live = workload_from_module(cls.from_config(config), example, name=cls.__name__, compute_dtype="fp32")
    assert planned.blocks == live.blocks  # names, module paths, tensors, FLOPs, ops, activations
    assert planned.phases == live.phases
    assert sum(b.flops(0) for b in planned.blocks) > 0


@pytest.mark.parametrize("model_dir", ["flux"], indirect=True)
def test_height_and_width_size_the_plan_and_a_size_the_model_cannot_take_is_a_usage_error(capsys, model_dir):
    small = resolve_workload(str(model_dir), size=ExampleSize(256, 256))
    large = resolve_workload(str(model_dir), size=ExampleSize(512, 768))
    assert large.name.endswith("at 512×768, 512 prompt tokens")
    assert large.extra["example"]["hidden_states"] == [1, 32 * 48, 16]
    assert sum(b.flops(0) for b in large.blocks) > sum(b.flops(0) for b in small.blocks)
    code, _, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--height", "500")
    assert code == 2 and "height 500 is not a positive multiple of 16" in err and "hint: e.g. 496" in err
    code, _, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--frames", "5")
    assert code == 2 and "makes images" in err


@pytest.mark.parametrize("model_dir", ["wan"], indirect=True)
def test_a_frame_count_the_video_vae_cannot_make_is_a_usage_error(capsys, model_dir):
    code, _, err = run(capsys, "plan", str(model_dir), "--profile", "rtx-5090", "--frames", "8")
    assert code == 2 and "8 frames is not 4k+1" in err and "hint: e.g. 9" in err


def test_a_video_longer_than_wans_rotary_table_is_refused_naming_rope_max_seq_len(capsys, tmp_path):
    """It failed counting on the meta device ('shape [21, 1, 1, -1] is invalid') and blamed missing weights."""
    WanTransformer3DModel.from_config({**WAN, "rope_max_seq_len": 8}).save_config(tmp_path / "wan")
    code, _, err = run(capsys, "plan", str(tmp_path / "wan"), "--profile", "rtx-5090")  # the default 81 frames
    assert code == 1 and "rope_max_seq_len (8)" in err and "21 along time" in err and "no weights" not in err
    code, _, err = run(capsys, "plan", str(tmp_path / "wan"), "--profile", "rtx-5090", "--height", "64", "--width",
                       "64", "--frames", "33")
    assert code == 2 and "9×4×4 patches" in err and "hint: give a smaller --height, --width or --frames" in err
    code, _, err = run(capsys, "plan", str(tmp_path / "wan"), "--profile", "rtx-5090", "--height", "64", "--width",
                       "64", "--frames", "29", "--json")  # 8 latent frames: the table's length, which runs
    assert code == 0, err


def test_a_catalog_model_refuses_a_size(capsys):
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--height", "512")
    assert code == 2 and "--height" in err and "hint:" in err


@pytest.mark.parametrize(("name", "call", "size"), [
    ("flux", dict(height=32, width=32), ExampleSize(32, 32)),
    ("wan", dict(height=16, width=16, num_frames=5, negative_prompt="a"), ExampleSize(16, 16, 5)),
    ("sd", dict(height=16, width=16), ExampleSize(16, 16)),
])
def test_a_pipeline_directory_plans_as_the_live_pipeline_traces(pipelines, name, call, size):
    """The configs alone give the workload one real call of the same pipeline gives: each encoder at its
    tokenizer's length (the last at the pipeline's max_sequence_length, 512), the denoiser at the latent of
    the size, the VAE decoding it; Wan's guidance as two encoder and two transformer calls, SD's as two
    encoder calls and one UNet call on a batch of 2. Wan's pipeline also hands its encoder an attention mask,
    SD its UNet a timestep of no batch: a few ops the derived calls do not count, at the same FLOPs."""
    pipe, path = pipelines[name]
    live = pipeline_workload(pipe, {**call, "max_sequence_length": 512} if name != "sd" else call).workload
    planned = resolve_workload(str(path), compute_dtype="fp32", size=size)
    assert [ph.name for ph in planned.phases] == ["encode", "denoise", "decode"]
    assert planned.phases == live.phases
    if name == "flux":
        assert planned.blocks == live.blocks  # every count: FLOPs, ops, activations
    by_name = {b.name: b for b in live.blocks}
    assert [b.name for b in planned.blocks] == list(by_name)
    for b in planned.blocks:
        odd_ops = (name, b.component) == ("wan", "text_encoder") or b.name == "unet.time_embedding+conv_in"
        assert (b.modules, b.tensors, b.flops(0)) == (by_name[b.name].modules, by_name[b.name].tensors,
                                                      by_name[b.name].flops(0))
        assert odd_ops or b == by_name[b.name]
    assert planned.steps == live.steps == (28 if name == "flux" else 50)  # the pipeline's own default


def test_a_pipeline_directory_plans_from_the_command_line_with_module_paths(capsys, pipelines):
    pipe, path = pipelines["flux"]
    code, out, err = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--steps", "4", "--compute-dtype",
                         "fp32", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["steps"] == 4 and doc["model"] == "flux-pipe at 128×128, 512 prompt tokens"  # 128 latent px, VAE ×1
    assert {b["modules"][0].split(".")[0] for b in doc["blocks"]} == {"text_encoder", "text_encoder_2",
                                                                      "transformer", "vae"}
    components = torch.nn.ModuleDict({c: getattr(pipe, c) for c in ("text_encoder", "text_encoder_2",
                                                                     "transformer", "vae")})
    unused = {n for m in ("encoder", "quant_conv") for n, _ in getattr(pipe.vae, m).named_parameters(prefix=f"vae.{m}")}
    planned = {n for n, _ in components.named_parameters(remove_duplicate=False)} - unused
    assert covered(doc, components) == planned  # all but the VAE's encoder, which text-to-image never runs


def test_tokens_set_a_pipelines_prompt_as_its_last_encoder_and_denoiser_see_it(pipelines):
    pipe, path = pipelines["flux"]
    live = pipeline_workload(pipe, dict(height=32, width=32, max_sequence_length=128)).workload
    planned = resolve_workload(str(path), compute_dtype="fp32", size=ExampleSize(32, 32, prompt_tokens=128))
    assert planned.blocks == live.blocks and planned.phases == live.phases


def test_tokens_other_than_the_padding_of_a_pipeline_without_max_sequence_length_are_refused(capsys, pipelines):
    """StableDiffusionPipeline pads every prompt to its tokenizer's length: --tokens 7 planned a call it never
    makes."""
    _, path = pipelines["sd"]
    code, _, err = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--height", "16", "--width", "16",
                       "--tokens", "7")
    assert code == 2 and "--tokens 7: StableDiffusionPipeline pads every prompt to 8 tokens" in " ".join(err.split())
    code, _, err = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--height", "16", "--width", "16",
                       "--tokens", "8", "--json")
    assert code == 0, err


def test_inspect_reads_the_same_pipeline_directory(capsys, pipelines):
    pipe, path = pipelines["flux"]
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    doc = json.loads(out)
    decoder = sum(p.numel() for m in (pipe.vae.decoder, pipe.vae.post_quant_conv) for p in m.parameters())
    encoders = sum(p.numel() for m in (pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    assert doc["params"] == sum(p.numel() for p in pipe.transformer.parameters()) + decoder + encoders  # T5's
    # shared embedding once; the VAE's encoder is no part of text-to-image


def edited_copy(path, tmp_path, edit):
    """A copy of the pipeline directory's configs with model_index.json edited by `edit(index)`."""
    import shutil

    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    index = json.loads((copy / "model_index.json").read_text())
    edit(index)
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda ix: ix.update(transformer=["diffusers", "NoSuchTransformer"]),
     ["'transformer'", "diffusers.NoSuchTransformer", "lacks"]),
    (lambda ix: ix.update(_class_name="NoSuchPipeline"), ["_class_name 'NoSuchPipeline'", "not a pipeline"]),
    (lambda ix: ix.update(image_encoder=["transformers", "CLIPVisionModel"]),
     ["'image_encoder' (CLIPVisionModel) holds weights", '"image_encoder": [null, null]']),
    (lambda ix: ix.update(vae=["diffusers"]), ["component 'vae' is ['diffusers'], not [library, class]"]),
    (lambda ix: ix.pop("transformer"), ["FluxPipeline takes the components transformer, which the directory does "
                                        "not name"]),
])
def test_a_broken_pipeline_directory_is_refused_naming_the_field(capsys, pipelines, tmp_path, edit, expected):
    copy = edited_copy(pipelines["flux"][1], tmp_path, edit)
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert code == 1 and "hint:" in err, err
    for text in expected:
        assert text in err, err


def test_a_pipeline_with_a_vae_whose_latent_residency_cannot_tell_is_refused(capsys, pipelines, tmp_path):
    copy = edited_copy(pipelines["flux"][1], tmp_path, lambda ix: ix.update(vae=["diffusers", "AutoencoderTiny"]))
    (copy / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert code == 1 and "AutoencoderTiny: residency cannot tell the latent" in err and "residency.attach(pipe" in err


def test_a_pipeline_directory_missing_a_components_config_is_refused(capsys, pipelines, tmp_path):
    copy = edited_copy(pipelines["flux"][1], tmp_path, lambda ix: None)
    (copy / "vae" / "config.json").unlink()
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert code == 1 and "vae/config.json: no such file" in err and "hint:" in err


def test_a_component_saved_as_none_and_pipeline_settings_are_skipped(pipelines, tmp_path):
    copy = edited_copy(pipelines["flux"][1], tmp_path,
                       lambda ix: ix.update(safety_checker=[None, None], requires_safety_checker=True))
    base = resolve_workload(str(pipelines["flux"][1]))
    assert replace(resolve_workload(str(copy)), name=base.name) == base


def test_a_video_pipelines_frame_budget_is_its_videos_frames_at_the_fps(capsys, pipelines):
    """--fps 30 on a text-to-video pipeline budgeted its whole 81-frame video as one image (33 ms, 'missed' at
    542 ms, i.e. 150 fps): a call makes --frames frames, so the budget is frames ÷ fps, and the unit a video."""
    _, path = pipelines["wan"]
    code, out, err = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--height", "16", "--width", "16",
                         "--frames", "5", "--fps", "5")
    assert code in (0, 3), err
    text = " ".join(out.split())
    assert "1000.0 ms/video" in text and "ms per video" in text and "image" not in text
    _, flux = pipelines["flux"]
    code, out, err = run(capsys, "plan", str(flux), "--profile", "rtx-5090", "--fps", "5")
    assert code in (0, 3), err
    assert "200.0 ms/image" in " ".join(out.split())  # an image is still one frame


def test_a_dangling_or_looping_link_is_named_as_a_link_not_as_an_unknown_model(tmp_path, monkeypatch):
    # "loop1" (no slash, no extension) read as a model name: "unknown model 'loop1'"; a dangling link: "no such file"
    import os

    from residency.commands.sources import classify
    from residency.errors import ResidencyError

    monkeypatch.chdir(tmp_path)
    os.symlink("loop2", "loop1")
    os.symlink("loop1", "loop2")
    os.symlink(str(tmp_path / "gone" / "x.safetensors"), "dangling.safetensors")
    with pytest.raises(ResidencyError, match="loop1: a link to 'loop2' that cannot be followed"):
        classify("loop1")
    with pytest.raises(ResidencyError, match="dangling.safetensors: a link to .* that is missing"):
        classify("dangling.safetensors")


def test_a_pixel_space_pipeline_without_a_vae_inspects_and_plans(capsys, tmp_path):
    # DDPMPipeline (a UNet2DModel and a scheduler) was refused as "no vae component", with a hint to give the very
    # directory save_pretrained wrote; its 1000 default steps are planned at the most a plan holds
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "ddpm")
    code, out, err = run(capsys, "inspect", str(tmp_path / "ddpm"), "--json")
    assert code == 0, err
    assert json.loads(out)["params"] == sum(p.numel() for p in unet.parameters())
    # counted from the configs at BF16, not read from the files: said (the text encoder's F32 file read as BF16)
    assert json.loads(out)["notes"][0].startswith("counted from the configs: the modules one call of the pipeline runs")
    code, out, err = run(capsys, "plan", str(tmp_path / "ddpm"), "--profile", "rx-7800-xt", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["steps"] == 64 and all(b["name"].startswith("unet.") for b in doc["blocks"])
    # said where it is seen (it was in the workload's source, which nothing shows)
    assert "64 of its default 1000 steps, the most a plan holds: planned at 64 steps (--steps N" in " ".join(err.split())
    code, out, err = run(capsys, "plan", str(tmp_path / "ddpm"), "--profile", "rx-7800-xt", "--steps", "20", "--json")
    assert code == 0 and json.loads(out)["steps"] == 20 and "default 1000 steps" not in err
    # its unet planned alone is the same pixel-space model: 16×16 px, not 128×128 (a latent's ×8)
    code, out, err = run(capsys, "plan", str(tmp_path / "ddpm" / "unet"), "--profile", "rx-7800-xt", "--json")
    assert code == 0 and json.loads(out)["model"] == "unet at 16×16", err
    code, out, err = run(capsys, "plan", str(tmp_path / "ddpm" / "unet"), "--profile", "rx-7800-xt", "--height", "24",
                         "--width", "32", "--json")
    assert code == 0 and json.loads(out)["model"] == "unet at 24×32", err


@pytest.mark.parametrize(("component", "named", "own", "fails"), [
    ("transformer", "UNet2DModel", "FluxTransformer2DModel", True),
    ("text_encoder_2", "CLIPTextModel", "T5Config", False)])
def test_a_component_whose_config_names_another_class_is_named_as_the_cause_or_noted(capsys, pipelines, tmp_path,
                                                                                      component, named, own, fails):
    """model_index.json's class is built from the component's config, as the library builds it: another class's
    config built a default-sized model, and counting it failed on the meta device ("unsupported operand …
    NoneType") with a hint about sizes. Where the build fails the difference is the error; where it builds (a
    CLIPTextConfig made from a T5 config, as transformers makes it), a note."""
    library = "diffusers" if component == "transformer" else "transformers"
    copy = edited_copy(pipelines["flux"][1], tmp_path, lambda ix: ix.update({component: [library, named]}))
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert f"names component {component!r} a {named}, but" in err and own in err, err
    if fails:
        assert code == 1 and f"({named} fails to build from it:" in err
        assert f"hint: make them agree: the entry {component!r} of model_index.json" in err
    else:
        assert f"built as a {named}, as transformers builds it" in err


@pytest.mark.parametrize(("architectures", "model_type"), [("RobertaModel", "xlm-roberta"), ("BertModel", "roberta")])
def test_a_transformers_config_of_another_model_type_is_built_as_transformers_builds_it(capsys, tmp_path,
                                                                                        architectures, model_type):
    """transformers' from_pretrained reads the config with the class's own config class and logs a warning: an
    XLM-RoBERTa config for RobertaModel is a working pair (it planned before; a first check refused it)."""
    config = {"architectures": [architectures], "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090")
    assert code == 0 and f"architectures names {architectures}, but the config is a" in err, err
    assert f"built as a {architectures}, as transformers builds it" in err


def test_a_pipeline_directory_with_a_models_config_at_the_top_says_which_it_planned(capsys, pipelines, tmp_path):
    copy = edited_copy(pipelines["flux"][1], tmp_path, lambda ix: None)
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert code == 0 and "holds both" not in err, err
    shutil.copy(copy / "transformer" / "config.json", copy / "config.json")
    for command in (("plan", str(copy), "--profile", "rtx-5090"), ("inspect", str(copy))):
        code, _, err = run(capsys, *command)
        assert code == 0 and err.count("holds both model_index.json and a model's config.json: planned as the "
                                       "pipeline") == 1, err


def test_a_pipeline_class_whose_components_the_directory_lacks_is_refused(capsys, pipelines, tmp_path):
    """Flux's components under _class_name StableDiffusionPipeline were planned at its 50 steps and guidance; diffusers
    refuses to load such a directory."""
    copy = edited_copy(pipelines["flux"][1], tmp_path, lambda ix: ix.update(_class_name="StableDiffusionPipeline"))
    code, _, err = run(capsys, "plan", str(copy), "--profile", "rtx-5090")
    assert code == 1 and "_class_name StableDiffusionPipeline takes the components unet" in err, err


def test_inspect_of_a_pipeline_directory_takes_the_size_its_call_is_traced_at(capsys, pipelines, tmp_path):
    """A pipeline whose transformer cannot take its default size could not be inspected (nor an SDXL, SD3 or
    PixArt pipeline, whose call plan cannot trace): the hint said to give --height, --width and --frames, which
    inspect did not have. Untraced, every component's tensors are counted, and the note says why."""
    pipe, path = pipelines["wan"]
    small = tmp_path / "wan-pipe"
    shutil.copytree(path, small)
    config = json.loads((small / "transformer" / "config.json").read_text())
    (small / "transformer" / "config.json").write_text(json.dumps({**config, "rope_max_seq_len": 8}))
    code, out, err = run(capsys, "plan", str(small), "--profile", "rtx-5090")
    assert code == 1 and "rope_max_seq_len (8)" in err and "hint: give --height, --width and --frames" in err
    code, every, err = run(capsys, "inspect", str(small), "--json")
    assert code == 0, err
    every = json.loads(every)
    assert "every component's modules" in every["notes"][0] and "rope_max_seq_len (8)" in every["notes"][0]
    transformer = WanTransformer3DModel.from_config({**pipe.transformer.config, "rope_max_seq_len": 8})
    modules = [transformer, pipe.vae, pipe.text_encoder]  # the rotary tables' buffers are the edited config's
    assert every["params"] == sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers())
                                  if t.is_floating_point())
    assert {c["name"] for c in every["components"]} == {"transformer", "vae", "text_encoder"}
    code, out, err = run(capsys, "inspect", str(small), "--height", "16", "--width", "16", "--frames", "5", "--json")
    assert code == 0, err
    code, other, err = run(capsys, "inspect", str(small), "--height", "32", "--width", "16", "--frames", "9", "--json")
    assert code == 0 and json.loads(out)["params"] == json.loads(other)["params"] > 0, err  # tensors: size-free
    assert json.loads(out)["params"] < every["params"]  # the call runs no VAE encoder
    code, _, err = run(capsys, "inspect", str(small / "transformer"), "--height", "16")
    assert code == 2 and "change no tensor" in err and "hint:" in err


def test_a_component_of_another_class_than_model_index_names_is_hinted_there_when_its_weights_differ(capsys,
                                                                                                 tmp_path):
    """A component built as model_index.json's class (a UNet2DModel) from the config of another (a
    UNet2DConditionModel), its weights of other sizes: the fix is where the two files disagree, model_index.json."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from safetensors.torch import save_file

    blocks = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    path = tmp_path / "ddpm"
    DDPMPipeline(unet=UNet2DModel(block_out_channels=(16, 32), **blocks),
                 scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(path)
    shutil.rmtree(path / "unet")

    def conditional(widths):
        return UNet2DConditionModel(block_out_channels=widths, cross_attention_dim=16, mid_block_type=None, **blocks)

    conditional((16, 32)).save_pretrained(path / "unet")
    save_file({k: v.contiguous() for k, v in conditional((16, 48)).state_dict().items()},
              str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    flat = " ".join(err.split())
    assert code == 1 and "names component 'unet' a UNet2DModel, but" in flat, err
    assert "its weights do not fit its config.json" in flat
    assert "hint: make them agree: the entry 'unet' of model_index.json names the class" in flat
