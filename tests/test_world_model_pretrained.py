"""save_pretrained / from_pretrained: a directory or one file, the config travelling with the weights."""

import json

import numpy as np
import pytest
import torch

from pipelines.world_model import PRESETS, WorldModelPipeline
from pipelines.world_model.pretrained import CONFIG_KEY
from residency.checkpoint import open_checkpoint, save_checkpoint
from residency.errors import ResidencyError

CONFIG = PRESETS["tiny"].replace(name="tiny-small", dim=64, heads=2, depth=2)


pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def pipe():
    return WorldModelPipeline.from_config(CONFIG, seed=3)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_directory_round_trip_is_exact_in_f32(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == CONFIG.to_dict()
    loaded = WorldModelPipeline.from_pretrained(tmp_path / "model")
    assert loaded.config == CONFIG and _same_weights(pipe, loaded)


@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_single_file_carries_the_config_in_metadata(pipe, tmp_path, suffix):
    path = pipe.save_pretrained(tmp_path / f"model{suffix}")
    with open_checkpoint(path) as checkpoint:
        assert json.loads(checkpoint.metadata[CONFIG_KEY]) == CONFIG.to_dict()
    assert _same_weights(pipe, WorldModelPipeline.from_pretrained(path))


def test_loaded_pipeline_generates_the_same_frames(pipe, tmp_path):
    loaded = WorldModelPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m.gguf"))
    image = np.full((CONFIG.height, CONFIG.width, 3), 90, np.uint8)
    assert np.array_equal(pipe.start(image, seed=1).step("up"), loaded.start(image, seed=1).step("up"))


def test_bf16_storage_loads_close_to_the_original(pipe, tmp_path):
    loaded = WorldModelPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m", format="BF16"))
    for (name, a), b in zip(pipe.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=2**-8, msg=name)


def test_q8_0_storage_quantizes_matrices_and_keeps_vectors_exact(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "q8.gguf", format="Q8_0")
    with open_checkpoint(path) as checkpoint:
        formats = {name: e.format for name, e in checkpoint.entries.items()}
    assert formats["dit.blocks.0.mlp.fc1.weight"] == "Q8_0"
    assert formats["dit.blocks.0.mlp.fc1.bias"] == "F32"
    loaded = WorldModelPipeline.from_pretrained(path)
    image = np.zeros((CONFIG.height, CONFIG.width, 3), np.uint8)
    assert loaded.start(image).step("up").shape == (1, CONFIG.height, CONFIG.width, 3)


def test_checkpoint_of_another_config_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG.replace(depth=3).to_dict()))
    with pytest.raises(ResidencyError, match="missing"):
        WorldModelPipeline.from_pretrained(tmp_path / "model")


def test_missing_config_is_a_clear_error(pipe, tmp_path):
    path = save_checkpoint(tmp_path / "bare.safetensors", pipe.state_dict())
    with pytest.raises(ResidencyError, match="no world model config"):
        WorldModelPipeline.from_pretrained(path)


def _saved_with_config(pipe, tmp_path, **changes):
    target = pipe.save_pretrained(tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def test_a_config_json_of_16384x16384_is_refused_before_anything_is_built(pipe, tmp_path, monkeypatch):
    target = _saved_with_config(pipe, tmp_path, height=16384, width=16384)
    built = []
    monkeypatch.setattr(WorldModelPipeline, "__init__", lambda *a, **k: built.append(a))
    with pytest.raises(ResidencyError) as err:
        WorldModelPipeline.from_pretrained(target)
    assert str(target / "config.json") in err.value.message and "'height'" in err.value.message
    assert "16384" in err.value.message and built == []


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"dim": ' + "9" * 5000 + "}", "{"])
def test_a_config_in_metadata_that_is_not_json_is_a_clear_error(tmp_path, text):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, metadata={CONFIG_KEY: text})
    with pytest.raises(ResidencyError, match="metadata key 'residency.config'"):
        WorldModelPipeline.from_pretrained(path)


def test_save_pretrained_replaces_config_json_atomically(pipe, tmp_path, monkeypatch):
    target = pipe.save_pretrained(tmp_path / "model")
    before = (target / "config.json").read_text()
    real_write_text = type(target).write_text

    def failing_write_text(self, text, *a, **k):
        real_write_text(self, text[: len(text) // 2], *a, **k)  # half written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_text", failing_write_text)
    with pytest.raises(ResidencyError, match="No space left"):
        pipe.save_pretrained(target)
    assert (target / "config.json").read_text() == before
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_a_directory_of_shards_with_its_config_loads_as_the_saved_pipeline(tmp_path):
    import shutil

    from residency.checkpoint import save_checkpoint

    pipe = WorldModelPipeline.from_config("tiny")
    pipe.save_pretrained(tmp_path / "whole")
    state = pipe.state_dict()
    keys = sorted(state)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_checkpoint(shards / "model-00001-of-00002.safetensors", {k: state[k] for k in keys[:50]})
    save_checkpoint(shards / "model-00002-of-00002.safetensors", {k: state[k] for k in keys[50:]})
    shutil.copy(tmp_path / "whole" / "config.json", shards / "config.json")
    loaded = WorldModelPipeline.from_pretrained(shards)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
