"""The catalog generators (pipelines.catalog_build): the shipped entries equal a regeneration, --check
catches a stale one, and what the module builder gives is what the world model runs.

The world models regenerate in seconds; the external entries (flux-schnell ~25 s, wan-causal-1.3b ~20 s on a
2-core CPU, and the `catalog` extra) are checked by the slow test.
"""

import json
import math

import pytest
import torch

from pipelines.catalog import catalog_paths
from pipelines.catalog_build import GENERATORS
from pipelines.catalog_build.__main__ import main
from pipelines.world_model import WorldModelPipeline
from residency.workload import load_workload_file, workload_from_dict

WORLD_MODEL_ENTRIES = ("tiny", "lucid-500m", "lucid-800m")
EXTERNAL_ENTRIES = ("flux-schnell", "wan-causal-1.3b")


def test_every_shipped_entry_has_a_generator():
    assert set(GENERATORS) == set(catalog_paths())


def test_shipped_world_model_entries_equal_a_regeneration(capsys):
    assert main(["--check", *WORLD_MODEL_ENTRIES]) == 0
    assert "tiny: up to date" in capsys.readouterr().out


def test_check_reports_a_stale_entry_and_writing_fixes_it(tmp_path, monkeypatch, capsys):
    import pipelines.catalog_build.__main__ as cli

    doc = json.loads(catalog_paths()["tiny"].read_text())
    doc["blocks"][0]["flops_per_token"] *= 2
    (tmp_path / "tiny.json").write_text(json.dumps(doc, indent=1) + "\n")
    monkeypatch.setattr(cli, "catalog_dir", lambda: tmp_path)
    assert main(["--check", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "stale catalog entries: tiny" in err and "flops_per_token" in err
    assert "python -m pipelines.catalog_build tiny" in err
    assert main(["tiny"]) == 0
    assert (tmp_path / "tiny.json").read_text() == catalog_paths()["tiny"].read_text()
    assert main(["--check", "tiny"]) == 0


def test_an_unknown_entry_is_refused_with_the_names(capsys):
    assert main(["--check", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "lucid-500m" in err and "hint:" in err


@pytest.mark.parametrize("name", ["tiny", "lucid-500m"])
def test_world_model_blocks_are_its_modules_in_schedule_order(name):
    workload = load_workload_file(catalog_paths()[name])
    pipe = WorldModelPipeline.from_config(name, device="meta")
    assert [b.name for b in workload.blocks] == [n for n, _, _ in pipe.blocks()]
    for b in workload.blocks:
        module = pipe.get_submodule(b.modules[0])
        stored = {n: tuple(t.shape) for n, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}
        assert dict(b.tensors) == stored, b.name
    assert workload.params == sum(p.numel() for p in pipe.parameters())


def test_world_model_cached_attention_costs_its_width_per_pair():
    """The builder's two traces (window full, window empty) split a DiT block's attention FLOPs into the
    own-frame part (spatial + temporal over the frame: 2·4·dim per pair) and the cached part (4·dim)."""
    w = load_workload_file(catalog_paths()["lucid-500m"])
    c = WorldModelPipeline.from_config("lucid-500m", device="meta").config
    block = w.by_name["dit.blocks.0"]
    assert block.self_attn_flops_per_token_pair == 2 * 4.0 * c.dim
    assert block.context_attn_flops_per_token_pair == 4.0 * c.dim
    assert block.kv_channels_per_token == 2 * c.dim and block.context_tokens_per_frame == c.tokens_per_frame
    assert not w.by_name["dit.final"].kv_channels_per_token


def test_world_model_ops_are_those_of_a_block_call_at_a_full_window():
    """ops_per_call comes from the builder's trace of the steady state: more than a call with no cache to read."""
    from pipelines.world_model.workload import _dit

    c = WorldModelPipeline.from_config("tiny", device="meta").config
    pipe = WorldModelPipeline.from_config(c, device="meta")
    with torch.no_grad():
        full, empty = _dit(c, pipe, c.context_frames), _dit(c, pipe, 0)
    shipped = load_workload_file(catalog_paths()["tiny"]).by_name["dit.blocks.0"]
    assert shipped.ops_per_call == full.by_name["dit.blocks.0"].ops_per_call > empty.by_name["dit.blocks.0"].ops_per_call


def test_wan_blocks_keep_the_kv_of_their_self_attention():
    w = load_workload_file(catalog_paths()["wan-causal-1.3b"])
    block = w.by_name["transformer.blocks.0"]
    width = 12 * 128  # heads × head dim of the published config
    assert block.kv_channels_per_token == 2 * width and block.context_attn_flops_per_token_pair == 4.0 * width
    cache_write = w.phase("denoise").passes[1]
    assert "transformer.proj_out" not in cache_write.blocks and "transformer.blocks.29" in cache_write.blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTERNAL_ENTRIES)
def test_shipped_external_entries_equal_a_regeneration(name):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    assert main(["--check", name]) == 0


@pytest.mark.slow
def test_flux_regeneration_has_the_flops_of_torchs_counter():
    """The builder's FLOPs of the 12B transformer equal FlopCounterMode's over one meta call."""
    pytest.importorskip("diffusers")
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.catalog_build.flux import T5_TOKENS, TRANSFORMER_CONFIG

    with init_empty_weights():
        model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    img = 4096

    def meta(*s):
        return torch.zeros(s, device="meta")

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=meta(1, img, 64), encoder_hidden_states=meta(1, T5_TOKENS, 4096),
              pooled_projections=meta(1, 768), timestep=meta(1), img_ids=meta(img, 3), txt_ids=meta(T5_TOKENS, 3),
              return_dict=False)
    w = workload_from_dict(json.loads(catalog_paths()["flux-schnell"].read_text()))
    ours = sum(b.flops(0) for b in w.blocks if b.component == "transformer")
    assert math.isclose(ours, counter.get_total_flops(), rel_tol=1e-9)
