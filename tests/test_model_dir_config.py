"""A diffusers model directory: its blocks are named by module path (the `<dir> at <size>` label stays the
plan's display name), and a config naming no known class, or a layer count no model has, is refused naming
the file, the field and the value, with the supported classes — never diagnosed as a checkpoint or a size."""

from __future__ import annotations

import json

import pytest
import torch

from residency.cli import main
from residency.commands.sources import resolve_workload
from residency.front_door.examples import DIFFUSERS_CLASSES, derived_example
from residency.workload import workload_from_module

pytestmark = pytest.mark.usefixtures("one_compute_thread")

FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
            axes_dims_rope=[4, 6, 6])
LABEL = "at 1024×1024, 512 prompt tokens"  # FluxPipeline's default size: the workload's name, not its blocks'


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def model_dir(tmp_path, config: dict, name: str = "flux"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_model_directorys_blocks_are_named_by_module_path_not_by_its_label(capsys, tmp_path):
    path = model_dir(tmp_path, FLUX)
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--json")
    assert code in (0, 3), err
    doc = json.loads(out)
    assert doc["model"] == f"flux {LABEL}"
    for block in doc["blocks"]:
        assert LABEL not in block["name"]
        if len(block["modules"]) == 1 and block["modules"][0]:
            assert block["name"] == f"FluxTransformer2DModel.{block['modules'][0]}"
    assert "FluxTransformer2DModel.transformer_blocks.1" in [b["name"] for b in doc["blocks"]]


@pytest.mark.parametrize(("command", "named"), [(("plan", "--profile", "rx-7800-xt"), "FluxTransformer2DModel."),
                                                (("inspect",), "")])
def test_the_tables_show_module_paths_without_the_label(capsys, tmp_path, command, named):
    """plan names blocks as attach does (<class>.<path>); inspect names tensors as the weights would be stored."""
    path = model_dir(tmp_path, FLUX)
    code, out, err = run(capsys, command[0], str(path), *command[1:])
    assert code in (0, 3), err
    assert "tokens." not in out.replace("\n", "")  # the label glued onto a block name ("… prompt tokens.x")
    assert f"{named}transformer_blocks" in out.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize("config", [FLUX, {**FLUX, "torch_dtype": "bfloat16"}])
def test_inspect_of_a_config_shows_the_dtype_its_weights_would_be_stored_in(capsys, tmp_path, config):
    path = model_dir(tmp_path, config)
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    dtypes = {f for c in json.loads(out)["components"] for b in c["blocks"] for f in b["formats"]}
    assert dtypes == {"BF16" if "torch_dtype" in config else "F32"}


def test_a_plan_of_a_model_directory_names_the_blocks_as_attach_does(tmp_path):
    path = model_dir(tmp_path, FLUX)
    planned = resolve_workload(str(path), compute_dtype="fp32")
    config = {k: v for k, v in FLUX.items() if not k.startswith("_")}
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(config)
    live = workload_from_module(model, derived_example(model), name=type(model).__name__, compute_dtype="fp32")
    assert [b.name for b in planned.blocks] == [b.name for b in live.blocks]
    assert planned.fingerprint() == live.fingerprint()  # a plan written by `plan DIR` applies to attach(model)


CLASSLESS = [{}, {"_class_name": None}, {"_class_name": ""}, {"num_layers": 2}]


@pytest.mark.parametrize("config", CLASSLESS)
@pytest.mark.parametrize("argv", [("plan", "--profile", "rx-7800-xt"), ("plan",), ("inspect",),
                                  ("plan", "--profile", "rx-7800-xt", "--height", "77")])
def test_a_config_naming_no_class_is_refused_naming_the_file_and_field(capsys, tmp_path, config, argv):
    path = model_dir(tmp_path, config)
    code, out, err = run(capsys, argv[0], str(path), *argv[1:])  # ("plan",): refused before this machine's
    assert code == 1, out                                              # profile is read or measured
    assert f"{path / 'config.json'}" in err and "_class_name" in err
    assert all(cls in err.split("hint:")[1] for cls in DIFFUSERS_CLASSES)
    for wrong in ("checkpoint", ".safetensors", "fixed size"):
        assert wrong not in err


def test_a_config_naming_an_unknown_class_lists_the_supported_ones(capsys, tmp_path):
    path = model_dir(tmp_path, {"_class_name": "NoSuchModel"})
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1
    assert f"{path / 'config.json'}: _class_name 'NoSuchModel'" in err
    assert all(cls in err.split("hint:")[1] for cls in DIFFUSERS_CLASSES)


def test_a_classless_config_beside_weights_still_inspects_as_a_checkpoint_but_plans_with_the_reason(capsys, tmp_path):
    from safetensors.torch import save_file

    path = model_dir(tmp_path, {})
    save_file({"a.weight": torch.zeros(4, 4)}, path / "model.safetensors")
    assert run(capsys, "inspect", str(path))[0] == 0
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "config.json" in err and "_class_name" in err


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("num_layers", -1, "num_layers is -1"),
    ("num_single_layers", 2.5, "num_single_layers is 2.5"),
    ("num_layers", "2", 'num_layers is "2"'),
    ("num_layers", True, "num_layers is true"),
])
@pytest.mark.parametrize("command", [("plan", "--profile", "rx-7800-xt"), ("inspect",)])
def test_a_layer_count_that_is_not_a_whole_number_of_0_or_more_is_refused(capsys, tmp_path, field, value, shown, command):
    path = model_dir(tmp_path, {**FLUX, field: value})
    code, _, err = run(capsys, command[0], str(path), *command[1:])
    assert code == 1
    assert f"{path / 'config.json'}: {shown}" in err and "whole number" in err and "hint:" in err


def test_a_unets_per_block_layer_counts_are_checked_each(capsys, tmp_path):
    path = model_dir(tmp_path, {"_class_name": "UNet2DConditionModel", "layers_per_block": [1, -1]})
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "layers_per_block is [1, -1]" in err


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
         "max_position_embeddings": 256}


@pytest.mark.parametrize(("change", "words"), [
    ({"torch_dtype": "bogus"}, "bogus"),
    # torch's words ("no attribute 'bfloat61'", "Float8_e4m3fnStorage") named no field: the hint names it
    ({"torch_dtype": "bfloat61"}, "hint: fix the field 'torch_dtype' ('bfloat61'; one of float32"),
    ({"dtype": "float8_e4m3fn"}, "hint: fix the field 'dtype' ('float8_e4m3fn'; one of float32"),
    # a float64 model failing on its heads: not its dtype's fault
    ({"torch_dtype": "float64", "num_attention_heads": 5, "num_key_value_heads": 5}, "hint: fix the field it names"),
    ({"hidden_size": "abc"}, "LlamaForCausalLM refuses the config"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "LlamaForCausalLM refuses the config"),  # 64 / 5
    ({"model_type": "nonexistent_model"}, "LlamaForCausalLM refuses the config"),
    ({"num_hidden_layers": 100_000}, "from 0 to 4096"),
    # each planned (exit 0): no limit on tokens, an empty vocabulary
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0; a size must be a whole number of 1 or more"),
    ({"max_position_embeddings": -5}, "max_position_embeddings is -5"),
    ({"vocab_size": 0}, "vocab_size is 0"),
])
@pytest.mark.parametrize("command", [("plan", "--profile", "rx-7800-xt"), ("inspect",)])
def test_a_config_transformers_refuses_is_an_error_naming_the_file_not_a_traceback(capsys, tmp_path, change, words,
                                                                                  command):
    path = model_dir(tmp_path, {**LLAMA, **change}, "llama")
    code, _, err = run(capsys, command[0], str(path), *command[1:])
    assert code == 1 and f"{path / 'config.json'}" in err and words in err and "hint:" in err


def test_tokens_past_the_models_positions_are_refused(capsys, tmp_path):
    path = model_dir(tmp_path, LLAMA, "llama")
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--tokens", "300")
    assert code == 2 and "takes at most 256 tokens (its config's max_position_embeddings); 300 asked" in err
    assert run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--tokens", "256")[0] == 0


def test_inspect_lists_a_models_parameters_when_its_config_gives_no_inputs(capsys, tmp_path):
    unet = {"_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
            "layers_per_block": 1, "block_out_channels": [32, 64], "norm_num_groups": 8,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    path = model_dir(tmp_path, unet, "unet")
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["params"] > 0 and {c["name"] for c in doc["components"]} >= {"down_blocks", "up_blocks"}


@pytest.mark.parametrize("command", [("inspect",), ("plan", "--profile", "rx-7800-xt")])
def test_a_model_directorys_config_json_given_as_the_file_points_at_its_directory(capsys, tmp_path, command):
    """Read as a catalog document it said "field '_class_name' is not known", with the catalog's fields."""
    path = model_dir(tmp_path, FLUX)
    code, _, err = run(capsys, command[0], str(path / "config.json"), *command[1:])
    err = " ".join(err.split())
    assert code == 1 and "the config.json of a model directory, not a catalog document" in err
    assert f"hint: give its directory: {path}" in err


UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 8,
        "norm_num_groups": 8}


def test_a_sample_size_past_the_largest_planned_size_is_refused_naming_it(capsys, tmp_path):
    """sample_size 100000 built a 160 GB example input: a traceback (can't allocate), and 12000 planned at 96000 px,
    past the bound --height has."""
    path = model_dir(tmp_path, {**UNET, "sample_size": 100000}, "unet")
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "sample_size is 100000" in err and "16384 px" in err and "hint: fix sample_size" in err
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--height", "512", "--width", "512",
                         "--json")
    assert code == 0, err


def test_a_flux_patch_size_of_0_is_refused_naming_it(capsys, tmp_path):
    """It built a model of empty tensors and planned it, exit 0, torch's zero-element warning on stderr."""
    path = model_dir(tmp_path, {**FLUX, "patch_size": 0})
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "patch_size is 0" in err and "hint: fix patch_size" in err and "Warning" not in err


def test_a_directory_of_pickled_weights_only_says_they_are_not_read(capsys, tmp_path):
    """It said only "a directory with no model in it", beside the pytorch_model.bin the user was looking at."""
    path = tmp_path / "old"
    path.mkdir()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 1 and "pytorch_model.bin (a pickle), which residency does not read" in err
    assert "convert them to .safetensors" in err


def test_a_configs_quantization_config_is_said_to_be_not_applied(capsys, tmp_path):
    quantized = {**FLUX, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    code, out, err = run(capsys, "plan", str(model_dir(tmp_path, quantized)), "--profile", "rx-7800-xt", "--json")
    assert code == 0, err
    assert "quantization_config (bitsandbytes) is not applied" in err and str(tmp_path / "flux") in err
    assert json.loads(out)["blocks"]  # planned as the unquantized model
    code, _, err = run(capsys, "plan", str(model_dir(tmp_path, FLUX, "plain")), "--profile", "rx-7800-xt", "--json")
    assert code == 0 and "quantization_config" not in err


def test_size_fields_a_config_leaves_out_are_said_to_be_the_classs_defaults(capsys, tmp_path):
    # a hand-written config.json without hidden_size planned a 4096-wide Llama, 6.7 B parameters, with nothing said
    bare = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
    code, _, err = run(capsys, "inspect", str(model_dir(tmp_path, bare, "bare")))
    assert code == 0, err
    assert "gives no hidden_size (so 4096), intermediate_size (so 11008)" in err
    assert "LlamaForCausalLM's defaults are used" in err
    # derived fields (head_dim from hidden_size and heads) are not defaults; nor is what the file gives
    sized = {**bare, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100,
             "max_position_embeddings": 64}
    code, _, err = run(capsys, "inspect", str(model_dir(tmp_path, sized, "sized")))
    assert code == 0 and "gives no" not in err, err
    code, _, err = run(capsys, "inspect", str(model_dir(tmp_path, FLUX, "flux")))
    assert code == 0 and "gives no" not in err, err


def test_parameters_the_forward_never_runs_are_one_warning_line_not_pythons_form(capsys, tmp_path):
    """A Llava read as a text model leaves its vision tower out: said as Python's warning, with our file path and
    a line of our source, among the plan's notes."""
    import transformers as T

    text = T.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=5)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(tmp_path / "llava")
    code, _, err = run(capsys, "plan", str(tmp_path / "llava"), "--profile", "rx-7800-xt")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "the forward never ran" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "vision_tower" in lines[0]
    assert "ModuleWorkloadWarning" not in err and "from_module.py" not in err


def test_a_shard_index_given_as_the_file_points_at_its_directory(capsys, tmp_path):
    """model.safetensors.index.json was read as a catalog document: "field 'metadata' is not known"."""
    from safetensors.torch import save_file

    save_file({"blocks.0.w": torch.zeros(4, 4)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"blocks.0.w": "model-00001-of-00001.safetensors"}}))
    code, _, err = run(capsys, "inspect", str(index))
    err = " ".join(err.split())
    assert code == 1 and "a sharded checkpoint (its shard index), not a catalog document" in err
    assert f"give its directory: {tmp_path}" in err
    assert run(capsys, "inspect", str(tmp_path))[0] == 0


UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16, norm_num_groups=8,
            attention_head_dim=4)


def test_a_unet_of_height_and_width_sample_sizes_plans_at_them(capsys, tmp_path):
    """diffusers takes sample_size [height, width]: it was refused as "no single sample_size", even with --height
    and --width given."""
    path = model_dir(tmp_path, {**UNET, "sample_size": [8, 12]}, "unet")
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--json")
    assert code == 0 and json.loads(out)["model"] == "unet at 64×96, 77 prompt tokens", err
    code, out, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt", "--height", "32", "--width", "48",
                         "--json")
    assert code == 0 and json.loads(out)["model"] == "unet at 32×48, 77 prompt tokens", err


def test_a_planned_class_whose_config_it_cannot_derive_inputs_for_is_not_hinted_as_planned(capsys, tmp_path):
    """An SDXL UNet (added conditioning) was refused with a hint saying residency plans UNet2DConditionModel from
    config.json alone."""
    path = model_dir(tmp_path, {**UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                                "projection_class_embeddings_input_dim": 64}, "unet")
    code, _, err = run(capsys, "plan", str(path), "--profile", "rx-7800-xt")
    assert code == 1 and "sets addition_embed_type" in err, err
    hint = err.split("hint: ")[1]
    assert "UNet2DConditionModel" not in hint and "workload_from_module" in hint and "encoder_hidden_states" in hint


def test_a_model_reading_images_beside_token_ids_says_so(capsys, tmp_path):
    """CLIPModel failed counting on pixel_values.shape, and the hint blamed its config."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    code, _, err = run(capsys, "plan", str(tmp_path / "clip"), "--profile", "rx-7800-xt")
    assert code == 1 and "CLIPModel reads 'pixel_values' beside input_ids" in err, err
    assert "example_inputs=dict(input_ids=…, pixel_values=…)" in err and "config.json the model's code" not in err
