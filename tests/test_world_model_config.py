"""WorldModelConfig: presets, parameter counts on the meta device, KV bytes, (de)serialization."""

import pytest
import torch

from pipelines.world_model import ACTIONS, PRESETS, WorldModelConfig, WorldModelPipeline, get_config
from residency.errors import ResidencyError


def test_actions_are_idle_eight_directions_and_two_keys():
    assert ACTIONS[0] == "idle"
    assert set(ACTIONS) == {"idle", "up", "down", "left", "right", "up_left", "up_right",
                            "down_left", "down_right", "jump", "use"}


@pytest.mark.parametrize("name, target, tolerance", [("lucid-500m", 516e6, 0.02), ("lucid-800m", 800e6, 0.03)])
def test_large_preset_parameter_count(name, target, tolerance):
    pipe = WorldModelPipeline.from_config(name, device="meta")
    total = pipe.param_counts()["total"]
    assert abs(total - target) <= tolerance * target, f"{name}: {total / 1e6:.2f}M"
    assert all(p.is_meta for p in pipe.parameters())


def test_lucid_500m_is_a_420m_image_dit_plus_temporal_modules():
    counts = WorldModelPipeline.from_config("lucid-500m", device="meta").param_counts()
    assert abs(counts["dit_image"] - 420e6) <= 0.02 * 420e6
    assert 80e6 <= counts["dit_temporal"] <= 100e6


def test_800m_differs_from_500m_only_in_mlp_width():
    small, large = PRESETS["lucid-500m"].to_dict(), PRESETS["lucid-800m"].to_dict()
    diff = {k for k in small if small[k] != large[k]}
    assert diff == {"name", "mlp_ratio"}


def test_large_presets_shape_352x640_video_into_22x40_latent_at_4x_temporal():
    for name in ("lucid-500m", "lucid-800m"):
        c = PRESETS[name]
        assert (c.height, c.width, c.spatial_compression, c.temporal_compression) == (352, 640, 16, 4)
        assert (c.latent_height, c.latent_width, c.context_frames) == (22, 40, 12)


def test_tiny_preset_is_a_few_million_parameters():
    total = WorldModelPipeline.from_config("tiny", device="meta").param_counts()["total"]
    assert 1e6 <= total <= 10e6


@pytest.mark.parametrize("kv_dtype, nbytes", [("fp32", 4), ("bf16", 2), ("fp16", 2), ("fp8", 1)])
def test_kv_cache_bytes_by_hand(kv_dtype, nbytes):
    c = PRESETS["lucid-500m"].replace(kv_dtype=kv_dtype)
    tokens = (22 // 2) * (40 // 2)  # 2x2 patches of the 22x40 latent
    expect = 22 * 2 * 3 * 12 * tokens * 1024 * nbytes  # blocks * (K,V) * batch * frames * tokens * dim * bytes
    assert c.kv_cache_bytes(batch=3) == expect


def test_dict_round_trip_keeps_every_field():
    for config in PRESETS.values():
        assert WorldModelConfig.from_dict(config.to_dict()) == config


def test_to_dict_holds_no_derived_fields():
    assert "tokens_per_frame" not in PRESETS["tiny"].to_dict()


@pytest.mark.parametrize("field, value", [("dim", "wide"), ("steps", 1.5), ("vae_channels", 64), ("kv_dtype", 8)])
def test_from_dict_type_error_names_the_field(field, value):
    with pytest.raises(ResidencyError, match=f"'{field}'"):
        WorldModelConfig.from_dict({**PRESETS["tiny"].to_dict(), field: value})


def test_from_dict_rejects_unknown_and_derived_keys():
    with pytest.raises(ResidencyError, match="'depthh'") as err:
        WorldModelConfig.from_dict({"depthh": 3})
    assert "depth" in err.value.hint
    with pytest.raises(ResidencyError, match="'tokens_per_frame'.*derived"):
        WorldModelConfig.from_dict({"tokens_per_frame": 3})


@pytest.mark.parametrize("changes, field", [
    ({"height": 60}, "height"),
    ({"spatial_compression": 12}, "spatial_compression"),
    ({"heads": 3}, "heads"),
    ({"steps": 9}, "steps"),
    ({"context_frames": 1}, "context_frames"),
    ({"kv_dtype": "int4"}, "kv_dtype"),
    ({"vae_channels": (32, 64)}, "vae_channels"),
    ({"actions": ("up", "down")}, "actions"),
    ({"actions": ("idle", "up", "up")}, "actions"),
])
def test_invalid_value_error_names_the_field(changes, field):
    with pytest.raises(ResidencyError, match=f"'{field}'"):
        PRESETS["tiny"].replace(**changes)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ResidencyError) as err:
        get_config("lucid-2b")
    assert "lucid-500m" in err.value.hint


def test_meta_pipeline_takes_the_requested_dtype():
    pipe = WorldModelPipeline.from_config("tiny", device="meta", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "meta"


# --- sizes checked before anything is built ----------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("height", 16384), ("width", 16384), ("dim", 2**40), ("depth", 10**6), ("heads", 10**30),
    ("latent_channels", 10**9), ("patch_size", 4096), ("temporal_compression", 1000),
    ("context_frames", 10**9), ("timestep_freq_dim", 10**12), ("height", True), ("depth", 4.0),
    ("mlp_ratio", float("inf")), ("mlp_ratio", float("nan")), ("rope_theta", 10**400), ("timestep_shift", 1e300),
    ("mlp_ratio", True), ("vae_channels", [2**20, 32, 64, 64]), ("vae_channels", [True, 32, 64, 64]),
    ("actions", ["idle"] * 1000), ("actions", ["idle", "right*2"]), ("actions", ["idle", "Up"]),
    ("name", "x" * 10_000), ("kv_dtype", "int3"),
])
def test_from_dict_refuses_an_out_of_range_or_mistyped_size_naming_field_and_value(field, value):
    with pytest.raises(ResidencyError, match=f"'{field}'") as err:
        WorldModelConfig.from_dict({**PRESETS["tiny"].to_dict(), field: value})
    assert len(err.value.message) < 400  # a 10,000-character value is cut, not echoed


def test_a_video_of_too_many_tokens_is_refused_though_each_side_is_in_range():
    with pytest.raises(ResidencyError, match="tokens per frame"):
        PRESETS["tiny"].replace(height=4096, width=4096, spatial_compression=8, patch_size=1, vae_channels=(32,) * 4)


def test_every_preset_is_within_the_limits():
    for config in PRESETS.values():
        assert WorldModelConfig.from_dict(config.to_dict()) == config
