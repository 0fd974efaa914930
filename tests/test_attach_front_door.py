"""residency.attach's arguments: the vram forms, profile="auto" (this machine's cached profile), the world
model, the lazy export, and models another library already offloads, refused with the hook named."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

# No importorskip: `./dev test` installs the `catalog` extra, and these tests must run wherever CI does.
from accelerate import cpu_offload
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel, WanTransformer3DModel
from diffusers.hooks import apply_group_offloading
from sim_helpers import flat_profile
from torch import nn

import residency
from pipelines.world_model import WorldModelPipeline
from residency.device import cached_profile_path, load_profile, machine_profile, resolve_profile
from residency.errors import ResidencyError
from residency.front_door import vram_bytes
from residency.runtime import DeviceBudgetExceeded, Runtime
from residency.runtime.hooks import has_hook

pytestmark = pytest.mark.usefixtures("one_compute_thread")

PROFILE = flat_profile(backend="cpu")
DIM = 32


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


X = torch.randn(2, DIM, generator=torch.Generator().manual_seed(1))
WEIGHT_BYTES = 4 * (DIM * DIM + DIM) * 4  # four F32 Linear layers


def attach_small(model=None, **options):
    options = {"vram": "100%", "profile": PROFILE, "backend": "cpu", "example_inputs": X} | options
    return residency.attach(model if model is not None else Small(), **options)


# --- vram --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vram,expected", [("50%", WEIGHT_BYTES // 2), ("150%", WEIGHT_BYTES * 3 // 2),
                                           ("12MiB", 12 * 2**20), (5_000_000, 5_000_000),
                                           (None, PROFILE.memory_usable_bytes)])
def test_vram_takes_bytes_a_size_or_a_share_of_the_weights(vram, expected):
    with attach_small(vram=vram) as rt:
        assert rt.plan.budget.vram_bytes == expected


@pytest.mark.parametrize("vram,message", [("0%", "positive percentage"), ("-5%", "positive percentage"),
                                          ("half%", "positive percentage"), ("12 parsecs", "cannot read vram"),
                                          (0, "out of range"), (True, "vram=True"), (1.5, "vram=1.5"),
                                          ("1e400%", "more than 2\\*\\*60 bytes"), ("-1", "positive number"),
                                          ("inf", "positive number"), ("nan", "positive number")])
def test_a_vram_the_front_door_cannot_read_is_named(vram, message):
    with pytest.raises(ResidencyError, match=message):
        vram_bytes(vram, WEIGHT_BYTES, 2**30)


@pytest.mark.parametrize("vram,hint", [("1e9", "bytes are an int: vram=1000000000"),
                                       ("12", 'did you mean vram="12GiB"? (bytes are an int: vram=12)'),
                                       ("1.5", 'did you mean vram="1.5GiB"?'),
                                       ("1_000_000", "bytes are an int: vram=1000000")])  # not "1_000_000GiB" (1 PiB)
def test_a_vram_string_without_a_unit_gets_a_hint_that_works(vram, hint):
    with pytest.raises(ResidencyError, match="has no unit") as e:
        vram_bytes(vram, WEIGHT_BYTES, 2**30)
    assert e.value.hint == hint


@pytest.mark.parametrize("options", [{"fps": "30"}, {"frame_ms": True}, {"fps": None, "frame_ms": "50"}])
def test_a_time_budget_that_is_not_a_number_is_named(options):
    name, value = next((k, v) for k, v in options.items() if v is not None)
    with pytest.raises(ResidencyError, match=f"{name}={value!r}.*a time budget is a number"):
        attach_small(**options)


def test_a_budget_that_the_fixed_costs_alone_exceed_says_so_not_the_largest_block():
    gpu = resolve_profile("rx-7800-xt")  # a GPU profile: its 128 MiB workspace comes before any weight
    with pytest.raises(ResidencyError, match="no plan of Small fits") as e:
        attach_small(vram="100%", profile=gpu)
    assert e.value.hint.startswith("what no plan can stream or pack (workspace 128.0 MiB")
    assert "vram=" in e.value.hint and "largest block" not in e.value.hint


def test_a_budget_no_plan_fits_is_refused_before_anything_is_attached():
    model = Small()
    with pytest.raises(residency.BudgetError, match=r"no plan of Small fits vram=64 bytes") as e:
        attach_small(model, vram=64)  # a BudgetError, as a pipeline's DeviceBudgetExceeded: one except for both
    assert isinstance(e.value, ResidencyError) and issubclass(DeviceBudgetExceeded, residency.BudgetError)
    assert "its largest block, Small.blocks." in e.value.hint
    assert not any(has_hook(m) for m in model.modules())
    suggested = re.search(r"give vram='([^']+)' or more", e.value.hint).group(1)
    with attach_small(model, vram=suggested) as rt:  # rounded up: the size it names fits (it was rounded down)
        assert rt.plan.budget.vram_bytes >= rt.plan.prediction.peak_total_bytes - rt.plan.prediction.peak_bytes["reserve"]


@pytest.mark.parametrize("options", [{"fps": float("inf")}, {"frame_ms": float("inf")}, {"fps": float("nan")}])
def test_an_infinite_time_budget_is_named_with_how_to_ask_for_none(options):
    (name, value), = options.items()  # fps=inf read as 0 ms and was refused in Budget's words
    with pytest.raises(ResidencyError, match=f"{name}={value} must be a positive, finite number") as e:
        attach_small(**options)
    assert f"leave {name} out" in e.value.hint


def test_fps_becomes_a_frame_budget_and_both_at_once_are_refused():
    with attach_small(fps=20) as rt:
        assert rt.plan.budget.frame_ms == pytest.approx(50.0)
    with pytest.raises(ResidencyError, match="both fps=20 and frame_ms=50"):
        attach_small(fps=20, frame_ms=50)


def test_a_saved_plan_runs_as_given_and_a_plan_for_other_shapes_is_refused(tmp_path):
    from residency.plan import save_plan

    with attach_small(vram="50%") as rt:
        planned = rt.plan
        expected = rt.pipeline(X)
    path = save_plan(planned, tmp_path / "small.plan.json")
    model = Small()
    with attach_small(model, plan=path) as rt:
        assert rt.plan == planned
        assert torch.equal(model(X), expected)
    with pytest.raises(ResidencyError, match="the plan was made for model 'Small'"):
        attach_small(Small(), plan=path, example_inputs=torch.randn(3, DIM))
    assert not any(has_hook(m) for m in model.modules())


# --- profile ----------------------------------------------------------------------------------------------
def test_profile_auto_is_this_machines_cached_profile(monkeypatch):
    asked = []
    monkeypatch.setattr("residency.front_door.attach_any.machine_profile", lambda kind: asked.append(kind) or PROFILE)
    with attach_small(profile="auto") as rt:
        assert rt.plan.profile == PROFILE.name and rt.profile is PROFILE
    assert asked == ["cpu"]


def test_the_machine_profile_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured, said = [], []

    def measure(device, quick, source=None):  # stands in for the ~25 s measurement
        measured.append((device, quick))
        return load_profile("rx-7800-xt")

    first = machine_profile("cpu", say=said.append, measure=measure)
    again = machine_profile("cpu", say=said.append, measure=measure)
    assert measured == [("cpu", True)]
    assert again.fingerprint() == first.fingerprint()
    assert len(said) == 1 and "measuring this machine's cpu profile once" in said[0]
    assert (tmp_path / "residency").is_dir()


def test_a_directory_where_the_cached_profile_goes_costs_a_remeasure_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached_profile_path("cpu").mkdir(parents=True)
    said = []
    profile = machine_profile("cpu", say=said.append, measure=lambda device, quick, source=None: load_profile("rx-7800-xt"))
    assert profile.name == load_profile("rx-7800-xt").name
    # the error's hint was spliced into the middle of the sentence: "(…: writing failed (Is a directory)\nhint: …)"
    assert said[1] == (f"could not cache the profile: {cached_profile_path('cpu')}: is a directory; it will be measured "
                       "again next time\nhint: give a file name, or remove that directory")


def test_a_cache_home_that_is_a_file_is_said_before_the_measurement(tmp_path, monkeypatch):
    """XDG_CACHE_HOME naming a file was found only after the ~40 s measurement ("could not cache"), and every later
    command measured again."""
    (tmp_path / "exist.json").write_text("{}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "exist.json"))
    said = []

    def measure(device, quick, source=None):
        said.append("measured")
        return load_profile("rx-7800-xt")

    machine_profile("cpu", say=said.append, measure=measure)
    assert "it cannot be cached" in said[0] and "exist.json is a file, not a directory" in said[0]
    assert "XDG_CACHE_HOME" in said[0] and said[1:] == ["measured"]  # not said again after it


def test_a_shipped_profile_name_is_accepted():
    with attach_small(profile="rx-7800-xt", vram="1GiB") as rt:  # a GPU profile: its matmul workspace too
        assert rt.plan.profile_fingerprint == load_profile("rx-7800-xt").fingerprint()


# --- targets ----------------------------------------------------------------------------------------------
def test_import_residency_loads_no_torch_and_its_attach_is_the_front_door():
    code = "import sys, residency; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    from residency.front_door import attach

    assert residency.attach is attach


def test_something_that_is_not_a_model_is_refused():
    with pytest.raises(ResidencyError, match="got a dict, not a model"):
        residency.attach({"weights": 1}, vram="1GiB", profile=PROFILE, backend="cpu")


def test_the_world_model_is_planned_from_its_catalog_entry_and_steps_bit_exactly():
    pipe = WorldModelPipeline.from_config("tiny")
    image = np.zeros((pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    session = pipe.start(image, seed=3)
    expected = [session.step(a) for a in ("right", "down")]
    # 90% of the weights: some blocks stream, and every format stays F32 (at 100% the fastest plan streams
    # small blocks at BF16 and the best quality within 1 ms of it keeps some there: not bit exact)
    with residency.attach(pipe, vram="90%", profile=PROFILE, backend="cpu") as rt:
        assert isinstance(rt, Runtime) and rt.workload.name == "tiny"
        session = pipe.start(image, seed=3)
        got = [rt.step(session, a) for a in ("right", "down")]
        fp32 = all(b.format == "F32" for b in rt.plan.blocks)
    assert fp32
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    assert not any(has_hook(m) for m in pipe.modules())


# --- models another library already offloads --------------------------------------------------------------
def test_a_module_carrying_an_accelerate_hook_is_refused_with_its_path_and_the_removal():
    model = Small()
    add_hook_to_module(model.blocks[2], ModelHook())
    with pytest.raises(ResidencyError, match=r"Small\.blocks\.2 carries accelerate's ModelHook") as e:
        attach_small(model)
    assert "remove_hook_from_module(model, recurse=True)" in e.value.hint
    assert not any(has_hook(m) for m in model.modules())
    remove_hook_from_module(model, recurse=True)
    attach_small(model).detach()  # the hint works


def test_a_cpu_offloaded_model_is_refused():
    model = Small()
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ResidencyError, match=r"^Small carries accelerate's"):
        attach_small(model)


def test_a_group_offloaded_diffusers_model_is_refused_with_the_hook_named():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1)
    with pytest.raises(ResidencyError, match="WanTransformer3DModel carries diffusers hooks group_offloading") as e:
        residency.attach(model, vram="50%", profile=PROFILE, backend="cpu", example_inputs=torch.zeros(1))
    assert "enable_group_offload" in e.value.hint


def _ddpm() -> DDPMPipeline:
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


def test_a_pipeline_with_model_cpu_offload_is_refused_until_its_hooks_are_removed():
    pipe = _ddpm()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ResidencyError, match="enable_model_cpu_offload") as e:
        residency.attach(pipe, vram="50%", profile=PROFILE, backend="cpu")
    assert "pipe.remove_all_hooks()" in e.value.hint
    pipe._all_hooks = []  # as if only its components kept theirs: each is still refused, by name
    with pytest.raises(ResidencyError, match=r"^unet carries accelerate's"):
        residency.attach(pipe, vram="50%", profile=PROFILE, backend="cpu")


def test_a_pipelines_example_inputs_are_the_keyword_arguments_of_its_call():
    with pytest.raises(ResidencyError, match="example_inputs for the pipeline DDPMPipeline is a Tensor"):
        residency.attach(_ddpm(), vram="50%", profile=PROFILE, backend="cpu", example_inputs=torch.zeros(1))


def test_a_plan_with_a_dequant_only_format_is_refused_naming_the_block_before_anything_is_packed():
    import dataclasses

    model, x = Small().eval(), torch.randn(2, DIM)
    with residency.attach(model, vram="40%", profile=PROFILE, backend="cpu", example_inputs=x) as rt:
        plan, workload = rt.plan, rt.workload
    blocks = list(plan.blocks)
    blocks[1] = dataclasses.replace(blocks[1], format="Q2_K")
    bad = dataclasses.replace(plan, blocks=tuple(blocks))
    with pytest.raises(ResidencyError, match=f"the plan's format for block {blocks[1].name} is Q2_K"):
        Runtime(bad, "cpu", workload=workload).attach(model)
    assert not any(has_hook(m) for m in model.modules())
