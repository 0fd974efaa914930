"""The model catalog: every entry loads, real architectures have their published sizes, FLOPs match torch.

Needs no diffusers/transformers (regenerating the entries is tests/test_catalog_build.py).
"""

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipelines.catalog import catalog_paths
from residency.cli import main as cli_main
from residency.workload import load_workload_file

# Parameters per component (the pipeline attribute each is), (low, high): published sizes of the checkpoints.
EXPECTED_PARAMS = {
    "flux-schnell": {
        "transformer": (11.85e9, 11.95e9),  # FLUX.1 MMDiT "12B": 11.89B
        "text_encoder_2": (4.70e9, 4.80e9),  # T5-v1.1-XXL encoder: 4.76B
        "text_encoder": (120e6, 126e6),  # CLIP-L text tower: 123M
        "vae": (48e6, 52e6),  # Flux AutoencoderKL decoder (text-to-image runs no encoder): 49.5M
    },
    "wan-causal-1.3b": {
        "transformer": (1.40e9, 1.44e9),  # Wan2.1 "1.3B" DiT: 1.419B with embeddings and head
        "text_encoder": (5.60e9, 5.75e9),  # umT5-XXL encoder (256k vocabulary): 5.68B
        "vae": (123e6, 135e6),  # Wan 2.1 VAE, encoder and decoder
    },
}
# Blocks under a module path, (low, high): the halves of a component.
EXPECTED_PARTS = {
    "wan-causal-1.3b": {
        "vae.encoder.": (50e6, 58e6),  # Wan 2.1 VAE encoder: 53.6M
        "vae.decoder.": (70e6, 77e6),  # Wan 2.1 VAE decoder: 73.3M
    },
}


@pytest.mark.parametrize("name", sorted(catalog_paths()))
def test_every_catalog_entry_loads_as_a_workload(name):
    workload = load_workload_file(catalog_paths()[name])
    assert workload.name == name
    assert workload.params > 0 and workload.flops_per_frame() > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_external_entries_have_the_published_parameter_counts(name):
    workload = load_workload_file(catalog_paths()[name])
    got = {c: sum(b.params for b in workload.blocks if b.component == c) for c in workload.components}
    assert set(got) == set(EXPECTED_PARAMS[name])
    for component, (low, high) in EXPECTED_PARAMS[name].items():
        assert low <= got[component] <= high, (component, got[component])
    for prefix, (low, high) in EXPECTED_PARTS.get(name, {}).items():
        part = sum(b.params for b in workload.blocks if b.name.startswith(prefix))
        assert low <= part <= high, (prefix, part)


def test_external_entries_stay_small_enough_to_commit():
    for name in EXPECTED_PARAMS:
        assert catalog_paths()[name].stat().st_size < 400_000


def test_wan_denoise_reads_the_cache_and_writes_it_once_per_frame():
    w = load_workload_file(catalog_paths()["wan-causal-1.3b"])
    passes = w.phase("denoise").passes
    assert [(p.per_step, p.kv) for p in passes] == [(True, "read"), (False, "read+write")]
    assert w.video_frames_per_latent == 4 and w.context_frames == 6
    block = w.by_name["transformer.blocks.0"]
    assert block.tokens == block.context_tokens_per_frame == 60 * 104 // 4


def test_tiny_dit_flops_at_a_full_cache_match_flop_counter():
    from pipelines.world_model import WorldModelPipeline

    workload = load_workload_file(catalog_paths()["tiny"])
    pipe = WorldModelPipeline.from_config("tiny")
    c = pipe.config
    image = np.random.default_rng(0).integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
    session = pipe.start(image, seed=0)
    while len(session.window()) < c.context_frames:  # the anchor plus generated frames fill the ring
        session.step("idle")
    latent = torch.zeros(1, c.latent_channels, c.latent_height, c.latent_width)
    t, action = torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    # FlopCounterMode has no formula for CPU's fused flash attention (it would count 0): use the math kernel
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe.dit(latent, t, action, session.cache)
    predicted = sum(b.flops(workload.context_frames) for b in workload.blocks if b.component == "dit")
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_inspect_json_of_a_catalog_model_groups_by_its_blocks(capsys):
    assert cli_main(["inspect", "flux-schnell", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    workload = load_workload_file(catalog_paths()["flux-schnell"])
    assert doc["params"] == workload.params
    assert [c["name"] for c in doc["components"]] == workload.components
    blocks = [b["name"] for c in doc["components"] for b in c["blocks"]]
    assert blocks == [b.name for b in workload.blocks]
    assert doc["bytes_by_format"]["BF16"] == workload.nbytes("BF16")


def test_inspect_unknown_model_lists_catalog_names(capsys):
    assert cli_main(["inspect", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "flux-schnell" in err and "wan-causal-1.3b" in err


@pytest.mark.parametrize(("value", "words"), [
    ("lots", "expected a list"),
    ([[4096, -1]], "two positive whole numbers"),
    ([[4096, 5]], "sums to 5"),
])
def test_bad_elements_by_size_names_the_block_and_field(value, words):
    import copy

    from pipelines.world_model.workload import catalog_entry
    from residency.errors import ResidencyError
    from residency.workload import workload_from_dict

    doc = copy.deepcopy(catalog_entry("tiny"))
    block = next(b for b in doc["blocks"] if b["name"] == "dit.blocks.0")
    block["activation_elements_by_size"] = value
    with pytest.raises(ResidencyError) as e:
        workload_from_dict(doc, "tiny.json")
    assert "tiny.json" in e.value.message and "dit.blocks.0" in e.value.message and words in e.value.message


def _tensor_twice(doc):
    doc["blocks"][5]["tensors"].append(doc["blocks"][5]["tensors"][0])


def _phase_twice(doc):
    doc["phases"].append(dict(doc["phases"][1]))


@pytest.mark.parametrize(("change", "words"), [
    (_tensor_twice, "the block lists this tensor twice"),  # its bytes were counted twice
    (_phase_twice, "phase names must be unique"),
    (lambda d: d.update(phases=[]), "'phases' holds no phase that runs per latent frame"),  # the error named the workload
    (lambda d: d.update(name="m" * 300), "300 characters, more than the 256"),  # rendering took seconds a 10 k name
    # a block no pass runs: planned, the plan's table listed it and its totals did not count it
    (lambda d: d["blocks"].append(dict(d["blocks"][5], name="unused")), "'unused': no pass of any phase runs this block"),
])
def test_a_catalog_document_that_counts_twice_or_names_past_its_bounds_is_refused_naming_the_file(change, words):
    import copy

    from pipelines.world_model.workload import catalog_entry
    from residency.errors import ResidencyError
    from residency.workload import workload_from_dict

    doc = copy.deepcopy(catalog_entry("tiny"))
    change(doc)
    with pytest.raises(ResidencyError) as e:
        workload_from_dict(doc, "tiny.json")
    assert e.value.message.startswith("tiny.json") and words in e.value.message


def test_inspect_says_what_a_grouped_row_counts_and_marks_sizes_with_matrices_kept_bf16(capsys, monkeypatch):
    """A row "dit.blocks.0–3 (×4)" gave one block's tensors and bytes without saying so, and dit.patch_embed read
    larger at Q6_K than at Q8_0 with nothing to say why."""
    monkeypatch.setenv("COLUMNS", "200")
    assert cli_main(["inspect", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "(×N): N blocks alike, one row; its tensors, params and sizes are one block's" in out
    patch = next(line for line in out.splitlines() if "dit.patch_embed" in line)
    cells = [c.strip() for c in patch.split("│")]
    assert cells[-4].endswith("B") and cells[-3].endswith("*") and cells[-2].endswith("*")  # Q8_0 fits; K-quants
    assert "*: some of its matrices stay BF16 at that format" in out
    dit = out.split("dit  (")[1]
    blocks = next(line for line in dit.splitlines() if "dit.blocks.0–3" in line)
    assert "*" not in blocks  # 256-multiple widths: every matrix in the format
