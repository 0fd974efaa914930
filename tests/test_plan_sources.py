"""`residency plan` and `residency inspect` read the same sources: catalog names, catalog JSON, diffusers model
directories (config only: no weights) — and refuse what cannot be planned with a reason and a hint."""

from __future__ import annotations

import json

import pytest
from diffusers import UNet2DConditionModel

from residency.cli import main
from residency.commands.sources import CATALOG, CHECKPOINT, MODEL_DIR, PIPELINE_DIR, WORKLOAD_JSON, classify
from residency.workload import workload_to_dict

UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=8)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def unet_dir(tmp_path):
    """A diffusers model directory with its config and no weights, as a user would copy it from the hub."""
    path = tmp_path / "unet"
    UNet2DConditionModel(**UNET_CONFIG).save_config(path)
    assert not any(p.suffix == ".safetensors" for p in path.iterdir())
    return path


def test_each_kind_of_source_is_told_apart(tmp_path, unet_dir):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "w.json").write_text("{}")
    assert classify("tiny").kind == CATALOG
    assert classify(str(unet_dir)).kind == MODEL_DIR
    assert classify(str(tmp_path / "pipe")).kind == PIPELINE_DIR
    assert classify(str(tmp_path / "w.safetensors")).kind == CHECKPOINT
    assert classify(str(tmp_path / "w.json")).kind == WORKLOAD_JSON


def test_a_config_only_diffusers_directory_plans_with_module_paths(capsys, unet_dir):
    code, out, err = run(capsys, "plan", str(unet_dir), "--profile", "rtx-5090", "--compute-dtype", "fp32", "--json")
    assert code == 0, err
    doc = json.loads(out)
    # sample_size 16 latent pixels × the VAE's 8; a CLIP prompt padded to 77 tokens, as its pipeline pads it
    assert doc["model"] == "unet at 128×128, 77 prompt tokens"
    assert {b["compute_dtype"] for b in doc["blocks"]} == {"fp32"}
    model = UNet2DConditionModel(**UNET_CONFIG)
    covered = {f"{path}.{name}" for b in doc["blocks"] for path in b["modules"]
               for name, _ in model.get_submodule(path).named_parameters()}
    assert covered == set(dict(model.named_parameters()))  # every module path is the model's own, none missed
    assert sum(len(b["tensors"]) for b in doc["blocks"]) == len(covered)


def test_a_plan_of_a_model_directory_validates_against_the_shipped_schema(capsys, unet_dir, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from residency.plan.plan_io import PLAN_SCHEMA_PATH

    out_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "plan", str(unet_dir), "--profile", "rx-7800-xt", "--vram", "1MiB", "-o", str(out_path))
    assert code in (0, 3), err
    schema = json.loads(PLAN_SCHEMA_PATH.read_text())
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(json.loads(out_path.read_text()))] == []


def test_a_config_only_transformers_directory_plans(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    code, out, err = run(capsys, "plan", str(tmp_path / "llama"), "--profile", "rtx-5090", "--json")
    assert code == 0, err
    modules = {m for b in json.loads(out)["blocks"] for m in b["modules"]}
    assert {"model.layers.0", "model.layers.1", "model.embed_tokens"} <= modules
    activations = {}
    for tokens in ("16", "256"):  # 16 is the default; --tokens plans another length
        code, out, err = run(capsys, "plan", str(tmp_path / "llama"), "--profile", "rtx-5090", "--tokens", tokens)
        assert code == 0 and f"at {tokens} tokens" in out, err
        code, out, _ = run(capsys, "plan", str(tmp_path / "llama"), "--profile", "rtx-5090", "--tokens", tokens,
                           "--json")
        activations[tokens] = json.loads(out)["prediction"]["peak_bytes"]["activations"]
    assert activations["256"] == 16 * activations["16"]  # activations grow with the tokens, linearly here
    code, _, err = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--tokens", "64")
    assert code == 2 and "--tokens apply to a model or pipeline directory" in err
    # a text model runs no denoise steps: "--steps 4" planned four forwards a call, said nowhere
    code, _, err = run(capsys, "plan", str(tmp_path / "llama"), "--profile", "rtx-5090", "--steps", "4")
    assert code == 2 and "--steps 4: a transformers model" in err and "hint: leave --steps out" in err
    code, out, err = run(capsys, "plan", str(tmp_path / "llama"), "--profile", "rtx-5090", "--steps", "1", "--json")
    assert code == 0 and json.loads(out)["steps"] == 1, err


def test_inspect_reads_the_same_config_only_directory(capsys, unet_dir):
    code, out, err = run(capsys, "inspect", str(unet_dir), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["params"] == sum(p.numel() for p in UNet2DConditionModel.from_config(UNET_CONFIG).parameters())
    # said to be counted, not read: "stored" sizes of files that are not there
    assert doc["notes"][0].startswith("counted from config.json (no weights here): the UNet2DConditionModel")


def test_a_catalog_json_plans_like_its_catalog_name(capsys, tmp_path):
    from pipelines.catalog import catalog_paths
    from residency.workload import load_workload_file

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(workload_to_dict(load_workload_file(catalog_paths()["tiny"]))))
    _, by_name, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--json")
    _, by_file, _ = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--json")
    assert [b["format"] for b in json.loads(by_file)["blocks"]] == [b["format"] for b in json.loads(by_name)["blocks"]]


def test_a_bare_checkpoint_is_refused_for_planning_with_what_to_give(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(4, 4)}, path)
    code, _, err = run(capsys, "plan", str(path), "--profile", "rtx-5090")
    assert code == 1
    assert "cannot be planned" in err and "hint:" in err and "config.json" in err
    assert run(capsys, "inspect", str(path))[0] == 0  # inspect still reads it


@pytest.mark.parametrize("name", ["tiny.gguf", "tiny.safetensors"])
def test_a_world_model_saved_as_one_file_plans_as_run_plans_it(capsys, tmp_path, name):
    """`run x.gguf` rolled it out, and `plan x.gguf` refused it as a bare checkpoint with a hint about diffusers
    directories: its config is in the file's metadata."""
    from pipelines.world_model import WorldModelPipeline

    path = tmp_path / name
    WorldModelPipeline.from_config("tiny").save_pretrained(path, format="Q8_0")
    code, by_file, err = run(capsys, "plan", str(path), "--profile", "rtx-5090", "--json")
    assert code == 0, err
    _, by_name, _ = run(capsys, "plan", "tiny", "--profile", "rtx-5090", "--json")
    by_file, by_name = json.loads(by_file), json.loads(by_name)
    assert by_file["workload_fingerprint"] == by_name["workload_fingerprint"]
    assert [b["format"] for b in by_file["blocks"]] == [b["format"] for b in by_name["blocks"]]


def test_a_file_that_is_no_model_is_not_called_a_checkpoint(capsys, tmp_path):
    path = tmp_path / "start.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = run(capsys, "plan", str(path), "--profile", "rtx-5090")
    assert code == 1 and "not a model to plan (a .png file)" in err and "checkpoint holds" not in err


def test_a_pipeline_directory_naming_no_pipeline_class_is_refused(capsys, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    code, _, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090")
    assert code == 1 and "model_index.json: _class_name is None" in err and "save_pretrained" in err


def test_a_config_naming_no_diffusers_class_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    code, _, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090")
    assert code == 1 and "'NoSuchModel' is not a diffusers model class" in err and "hint:" in err


@pytest.mark.parametrize("config, said", [
    # built, the scheduler failed as "'DDPMScheduler' object has no attribute 'eval'" (a traceback, no --json document)
    ({"_class_name": "DDPMScheduler"}, "'DDPMScheduler' is a diffusers class but not a model's"),
    ({"_class_name": "DiffusionPipeline"}, "'DiffusionPipeline' is a diffusers class but not a model's"),
    # "did not run on the example inputs (StopIteration at fallback_trace.py:29)"
    ({"architectures": ["PreTrainedModel"], "model_type": "llama"}, "is a base class of transformers's models"),
])
def test_a_config_naming_a_class_that_is_no_model_is_refused(capsys, tmp_path, config, said):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090", "--json")
    assert code == 1 and said in json.loads(out)["error"] and "Traceback" not in err


def test_a_config_with_a_byte_order_mark_is_refused_by_what_it_is(capsys, tmp_path):
    """Read by residency, then refused by transformers: "not a valid JSON file", with a hint to fix a field."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())
    code, _, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090")
    assert code == 1 and "byte-order mark" in err and "without the mark" in err


def test_key_value_heads_that_do_not_divide_the_heads_are_refused(capsys, tmp_path):
    """It planned (exit 0) a Llama whose forward fails at its first attention."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}
    for groups, refused in ((3, True), (2, False)):
        (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": groups}))
        code, _, err = run(capsys, "plan", str(tmp_path), "--profile", "rtx-5090")
        assert (code == 1 and "num_key_value_heads is 3, which does not divide" in err) if refused else code == 0, err


def test_key_value_heads_of_a_nested_text_config_are_checked_too(capsys, tmp_path):
    from residency.commands.config_source import _check_head_groups
    from residency.errors import ResidencyError

    config = {"architectures": ["LlavaForConditionalGeneration"],
              "text_config": {"num_attention_heads": 4, "num_key_value_heads": 3}}
    with pytest.raises(ResidencyError, match=r"text_config\.num_key_value_heads is 3, which does not divide"):
        _check_head_groups(tmp_path / "config.json", config)
    _check_head_groups(tmp_path / "config.json", {**config, "text_config": {"num_attention_heads": 4,
                                                                           "num_key_value_heads": 2}})


def test_a_model_whose_inputs_the_config_does_not_fix_is_refused_with_the_python_route(capsys, tmp_path):
    from diffusers import SD3Transformer2DModel

    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32).save_config(tmp_path / "sd3")
    code, _, err = run(capsys, "plan", str(tmp_path / "sd3"), "--profile", "rtx-5090")
    assert code == 1 and "SD3Transformer2DModel" in err and "shapes of its inputs" in err
    assert "workload_from_module" in err and "workload_to_dict" in err


def test_a_saved_world_model_pipeline_plans_as_run_loads_it(capsys, tmp_path):
    from pipelines.world_model import WorldModelPipeline
    from residency.commands.sources import WORLD_MODEL_DIR
    from residency.plan import load_plan
    from residency.session_setup import load_model

    saved = tmp_path / "mine"
    WorldModelPipeline.from_config("tiny").save_pretrained(saved)
    assert classify(str(saved)).kind == WORLD_MODEL_DIR
    out_path = tmp_path / "mine.plan.json"
    code, _, err = run(capsys, "plan", str(saved), "--profile", "rx-7800-xt", "-o", str(out_path))
    assert code == 0, err
    load_plan(out_path).check_matches(load_model(str(saved)).workload, "the saved pipeline")  # `run --plan` takes it
    code, out, _ = run(capsys, "inspect", str(saved))
    assert code == 0 and "175 tensors" in out


def test_a_broken_workload_document_of_the_users_gets_a_hint_a_user_can_follow(capsys, tmp_path):
    """`{}` got "regenerate the catalog with python -m pipelines.catalog_build", a command of this repository's."""
    (tmp_path / "mine.json").write_text("{}")
    code, _, err = run(capsys, "plan", str(tmp_path / "mine.json"), "--profile", "rtx-5090")
    err = " ".join(err.split())
    assert code == 1 and "missing field 'schema_version'" in err and "catalog_build" not in err
    assert "hint: write it with residency.workload.workload_to_dict(workload_from_module(" in err
