"""A model directory's weights are checked against its config.json when it is planned: `plan` counts the model
the config builds, `inspect` reads the files, and a config of another model beside the weights went unsaid."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from residency.cli import main

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=False)


def llama_weights(tied=False, prefix="", **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**{k: v for k, v in LLAMA.items() if k != "architectures"}, **sizes,
                            "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if prefix:  # the base model's checkpoint (LlamaModel): its names have no `model.`
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def directory(tmp_path, config, weights: dict[str, dict]):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    for name, state in weights.items():
        save_file(state, str(path / name))
    return path


def plan(capsys, path):
    code = main(["plan", str(path), "--profile", "rx-7800-xt"])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("case", ["own", "tied", "base model", "two variants"])
def test_a_config_beside_its_own_weights_plans_with_nothing_said(capsys, tmp_path, case):
    config = {**LLAMA, "tie_word_embeddings": case == "tied"}
    state = llama_weights(tied=case == "tied", prefix="model." if case == "base model" else "")
    files = {"model.safetensors": state}
    if case == "two variants":  # fp16 and full precision side by side: the same names twice, not two models
        files["model.fp16.safetensors"] = {k: v.half() for k, v in state.items()}
    code, err = plan(capsys, directory(tmp_path, config, files))
    assert code == 0, err
    said = [line for line in err.splitlines() if "weights" in line]
    # the base model has no lm_head: the one tensor it lacks, said as such
    assert said == [] if case != "base model" else ("1 of the" in said[0] and "'lm_head.weight'" in said[0]), said


def test_a_config_of_more_layers_than_the_weights_says_which_weights_are_missing(capsys, tmp_path):
    path = directory(tmp_path, {**LLAMA, "num_hidden_layers": 6}, {"model.safetensors": llama_weights()})
    code, err = plan(capsys, path)
    assert code == 0, err
    # 9 tensors per Llama layer: 4 layers the weights do not hold
    assert "36 of the 57 weights of the LlamaForCausalLM" in err and "'model.layers.2." in err


def test_weights_holding_tensors_the_config_has_no_place_for_are_named(capsys, tmp_path):
    path = directory(tmp_path, {**LLAMA, "num_hidden_layers": 1}, {"model.safetensors": llama_weights()})
    code, err = plan(capsys, path)
    assert code == 0 and "holds 9 tensors the LlamaForCausalLM" in err and "'model.layers.1." in err, err


def test_a_tensor_of_another_shape_is_refused_naming_it_and_both_shapes(capsys, tmp_path):
    path = directory(tmp_path, {**LLAMA, "intermediate_size": 96}, {"model.safetensors": llama_weights()})
    code, err = plan(capsys, path)
    assert code == 1 and "'model.layers.0.mlp.gate_proj.weight' is [64, 32] in model.safetensors but [96, 32]" in err
    assert "(and 5 more)" in err and "hint: put back the config.json" in err


def test_weights_of_another_model_are_refused(capsys, tmp_path):
    unet = dict(_class_name="UNet2DModel", sample_size=8, block_out_channels=[8, 16], norm_num_groups=4,
                layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D"])
    code, err = plan(capsys, directory(tmp_path, unet, {"diffusion_pytorch_model.safetensors": llama_weights()}))
    assert code == 1 and "its weights are not the UNet2DModel its config.json describes" in err
    assert "'lm_head.weight'" in err or "'model." in err


def test_a_missing_shard_is_said_and_the_config_still_plans(capsys, tmp_path):
    state = llama_weights()
    names = sorted(state)
    path = directory(tmp_path, LLAMA, {"model-00001-of-00002.safetensors": {k: state[k] for k in names[:5]}})
    index = {"weight_map": {k: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = plan(capsys, path)
    assert code == 0 and "were not compared" in err and "model-00002-of-00002.safetensors" in err, err
    assert "not in" not in err  # the absent shard's tensors are not said to be missing from the model


def test_integer_tensors_are_present_but_not_compared_by_shape(capsys, tmp_path):
    state = llama_weights()
    state["model.norm.weight"] = torch.zeros(7, dtype=torch.uint8)  # a packed tensor: its shape is not the model's
    code, err = plan(capsys, directory(tmp_path, LLAMA, {"model.safetensors": state}))
    assert code == 0 and "weights" not in err, err


def test_weights_the_library_converts_on_loading_are_not_compared(capsys, tmp_path):
    """transformers renames and fuses some models' tensors on loading (Mixtral's experts.*.w1/w3 into gate_up_proj):
    as stored they are not the built model's, yet they load exactly. Compared, a directory save_pretrained wrote was
    said to miss a third of its weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    code, err = plan(capsys, tmp_path / "mixtral")
    assert code == 0 and "weights" not in err, err


def test_pickled_weights_are_said_to_be_unread_not_absent(capsys, tmp_path):
    path = directory(tmp_path, {**LLAMA, "num_hidden_layers": 6}, {})
    torch.save(llama_weights(), path / "pytorch_model.bin")
    code, err = plan(capsys, path)
    said = "its weights are pytorch_model.bin (a pickle, which residency does not read): not compared"
    assert code == 0 and said in err, err
    assert main(["inspect", str(path), "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["notes"][0]
    assert note.startswith("counted from config.json (its weights are pytorch_model.bin, a pickle residency does not "
                           "read)")  # it said "no weights here"


def test_the_plain_file_is_compared_beside_a_variant_and_a_variants_missing_shard_is_said(capsys, tmp_path):
    """A Hub download holds model.safetensors and model.fp16.safetensors: from_pretrained loads the plain one, so an
    odd fp16 file is not the plain one's fault; a variant's shard missing was said as tensors missing."""
    state = llama_weights()
    odd = {k: v.half() for k, v in llama_weights(intermediate_size=96).items()}
    code, err = plan(capsys, directory(tmp_path, LLAMA, {"model.safetensors": state, "model.fp16.safetensors": odd}))
    assert code == 0 and "weights" not in err, err
    names = sorted(state)
    only = tmp_path / "only"
    only.mkdir()
    (only / "config.json").write_text(json.dumps(LLAMA))
    save_file({k: state[k].half() for k in names[:5]}, str(only / "model.fp16-00001-of-00002.safetensors"))
    code, err = plan(capsys, only)
    assert code == 0 and "were not compared" in err and "model.fp16-00002-of-00002.safetensors" in err, err


@pytest.mark.parametrize("intermediate", [64, 128])
def test_names_the_library_renames_on_loading_are_compared_renamed(capsys, tmp_path, intermediate):
    """A Hub CLIP text encoder stores text_model.*, which transformers renames on loading: the whole comparison was
    skipped for every such directory, a config of other sizes beside it included."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                 eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = CLIPTextModel(CLIPTextConfig(intermediate_size=64, **sizes))
    state = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "intermediate_size": intermediate,
              **sizes}
    code, err = plan(capsys, directory(tmp_path, config, {"model.safetensors": state}))
    if intermediate == 64:
        assert code == 0 and "weights" not in err, err
    else:
        assert code == 1 and "'encoder.layers.0.mlp.fc1.weight' is [64, 32] in model.safetensors but [128, 32]" in err


def test_inspect_reads_the_plain_weights_beside_a_variant_and_says_so(capsys, tmp_path):
    """`inspect DIR` of a Hub download (model.safetensors beside model.fp16 shards and their index) refused it as
    one model twice; it reads the files from_pretrained loads and names the variant it left out."""
    state = llama_weights()
    names = sorted(state)
    path = directory(tmp_path, LLAMA, {})
    half = {k: v.half() for k, v in state.items()}
    # as save_pretrained shards both: each variant's shards and its index (the fp16 one named as transformers does)
    for variant, index, tensors in (("", "model.safetensors.index.json", state),
                                    (".fp16", "model.safetensors.index.fp16.json", half)):
        shards = {f"model{variant}-00001-of-00002.safetensors": names[:5],
                  f"model{variant}-00002-of-00002.safetensors": names[5:]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(path / shard))
        (path / index).write_text(json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"] == sum(v.numel() for v in state.values())
    assert doc["stored_bytes"] == sum(v.numel() * 4 for v in state.values())  # the plain files' F32, once
    note = next(n for n in doc["notes"] if "variant" in n)
    assert note.startswith("read model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, the weights "
                           "from_pretrained loads by default") and all(s in note for s in shards), note
    for plain in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        (path / plain).unlink()  # the fp16 variant alone: read, and said to be one variant of several
    save_file({k: v.bfloat16() for k, v in state.items()}, str(path / "model.bf16.safetensors"))
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    note = next(n for n in doc["notes"] if "variant" in n)
    assert note.startswith("read model.bf16.safetensors, the bf16 variant, the first by name"), note
    assert doc["stored_bytes"] == sum(v.numel() * 2 for v in state.values())
