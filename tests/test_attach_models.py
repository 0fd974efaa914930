"""residency.attach on library models and a plain module, each under half its weight bytes: outputs as the
plain model's (bit-exact where the plan keeps F32), the ledger within the budget, the model restored after."""

from __future__ import annotations

import warnings

import pytest
import torch

# No importorskip: `./dev test` installs the `catalog` extra, and these tests must run wherever CI does.
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel
from sim_helpers import flat_profile
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel

import residency
from residency.errors import ResidencyError
from residency.runtime.hooks import has_hook
from residency.workload import ModuleWorkloadWarning

pytestmark = [pytest.mark.usefixtures("one_compute_thread"),
              pytest.mark.filterwarnings("ignore::residency.workload.ModuleWorkloadWarning")]

PROFILE = flat_profile(backend="cpu")  # a CPU profile: no GPU workspace in the budget, no measurement
QUANTIZED_REL_ERROR = 0.05  # relative L2 error of an output under blocks round-tripped through Q8_0…Q4_K

# The models of tests/test_workload_from_module_models.py, widened (and T5/LLaMA deepened) until the
# weights, not the activations and the dequant scratch, are most of what a plan holds: at half the
# weights a plan must stream.


def flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    g = torch.Generator().manual_seed(1)
    example = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                   pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.ones(1),
                   img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    return model, example


def wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=256, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    g = torch.Generator().manual_seed(2)
    example = dict(hidden_states=torch.randn(1, 4, 1, 8, 8, generator=g), timestep=torch.ones(1),
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)
    return model, example


def unet():
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    g = torch.Generator().manual_seed(3)
    example = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.ones(1),
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)
    return model, example


def t5():
    config = T5Config(vocab_size=128, d_model=128, d_kv=32, d_ff=256, num_layers=6, num_heads=4,
                      feed_forward_proj="gated-gelu")
    return T5EncoderModel(config), dict(input_ids=torch.randint(0, 128, (1, 16), generator=torch.Generator()
                                                                .manual_seed(4)))


def llama():
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config), (torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5)),)


class Stack(nn.Module):
    """A plain module: a ModuleList of MLPs and a head, no library conventions."""

    def __init__(self, depth: int = 8, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                    for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def plain():
    return Stack(), torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(6))


def sequential():
    """An nn.Sequential of identical MLPs and a head: the most plain model there is (its layers are its blocks)."""
    layers = [nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(8)]
    return nn.Sequential(*layers, nn.Linear(64, 10)), torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(7))


MODELS = {"flux": flux, "wan": wan, "unet": unet, "t5": t5, "llama": llama, "plain": plain, "sequential": sequential}


def build(name: str):
    torch.manual_seed(0)
    model, example = MODELS[name]()
    return model.eval(), example


def call(model, example):
    with torch.inference_mode():
        if isinstance(example, dict):
            out = model(**example)
        elif isinstance(example, tuple):
            out = model(*example)
        else:
            out = model(example)
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def weights_bytes(model) -> int:
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in seen.values())


def state_of(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.data_ptr() for p in model.parameters()])


def assert_restored(model, state) -> None:
    tensors, ptrs = state
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[k]), k
    assert not any(has_hook(m) or "forward" in m.__dict__ for m in model.modules())


def assert_output_matches(plan, got, expected) -> None:
    if all(b.format == "F32" for b in plan.blocks):
        assert torch.equal(got, expected)
    else:  # quantized blocks: within their round-trip error, and not the plain numbers
        rel = ((got - expected).norm() / expected.norm()).item()
        assert 0 < rel <= QUANTIZED_REL_ERROR, rel


def attach(model, example, **options):
    return residency.attach(model, vram=options.pop("vram", "50%"), profile=PROFILE, backend="cpu",
                            example_inputs=example, **options)


@pytest.mark.parametrize("name", MODELS)
def test_attached_under_half_its_weight_bytes_it_computes_as_the_plain_model_and_is_restored(name):
    model, example = build(name)
    expected = call(model, example)
    state = state_of(model)
    with attach(model, example) as rt:
        got = [call(model, example) for _ in range(2)]
        peak = rt.ledger.peak_total_bytes
        plan = rt.plan
    assert plan.budget.vram_bytes == weights_bytes(model) // 2
    assert plan.streamed(), "half the weights cannot all stay resident"
    assert peak <= plan.budget.vram_bytes
    assert torch.equal(got[0], got[1])
    assert_output_matches(plan, got[0], expected)
    assert_restored(model, state)
    assert torch.equal(call(model, example), expected)


@pytest.mark.parametrize("name", ["t5", "unet"])
def test_known_model_classes_supply_their_own_example_inputs(name):
    model, _ = build(name)
    with residency.attach(model, vram="100%", profile=PROFILE, backend="cpu") as rt:
        example = rt.workload.extra["example"]
    assert example == ({"input_ids": [1, 16]} if name == "t5" else
                       {"sample": [1, 4, 8, 8], "timestep": [1], "encoder_hidden_states": [1, 77, 32]})


def test_a_call_at_other_shapes_is_refused_and_the_planned_shapes_still_run():
    model, example = build("t5")
    expected = call(model, example)
    longer = dict(input_ids=torch.zeros(1, 24, dtype=torch.long))
    with attach(model, example) as rt:
        with pytest.raises(ResidencyError, match=r"input_ids=1×24.*made for input_ids=1×16") as e:
            call(model, longer)
        assert "example_inputs=" in e.value.hint
        assert_output_matches(rt.plan, call(model, example), expected)
        assert_output_matches(rt.plan, call(model, (example["input_ids"],)), expected)  # positional: same input


def test_a_causal_lm_generates_under_its_plan_as_the_plain_model_does():
    """generate(): the prompt at the example's shape, then one token a step with positions and a cache: every
    call no larger than the example, so it runs under the plan made for the prompt."""
    model, example = build("llama")
    ids = next(iter(example.values())) if isinstance(example, dict) else example[0]
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    with attach(model, example) as rt, torch.inference_mode():
        assert rt.plan.streamed()
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected)
        with pytest.raises(ResidencyError, match=r"is larger than the example.s \(\d+ against \d+ in dimension 1\)"):
            model(torch.cat([ids, ids], dim=1))  # a longer prompt than planned


def test_a_padded_prompt_generates_under_the_plan_made_for_it():
    # its mask (zeros where padded) grows by one a step with the cache: it was refused at the second step, while an
    # all-ones mask (which transformers drops) ran
    model, example = build("llama")
    ids = next(iter(example.values())) if isinstance(example, dict) else example[0]
    mask = torch.ones_like(ids)
    mask[:, :2] = 0
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with attach(model, dict(input_ids=ids, attention_mask=mask)), torch.inference_mode():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)
        with pytest.raises(ResidencyError, match="input_ids is larger than the example"):
            model(torch.cat([ids, ids], dim=1), attention_mask=torch.cat([mask, mask], dim=1))


def test_an_encoder_decoder_generates_greedy_and_beam_under_a_plan_for_the_largest_call():
    """T5's generate() passes encoder_outputs, an input the example lacks: its width is the model's, its other
    dimensions no longer than the example's. The example is the largest call: batch × beams, the longest output."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=3, num_heads=4,
                                                d_kv=16, decoder_start_token_id=0, pad_token_id=0)).eval()
    ids = torch.randint(3, 128, (2, 7))
    options = dict(max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        greedy, beam = model.generate(ids, **options), model.generate(ids, num_beams=2, **options)
    example = dict(input_ids=torch.randint(3, 128, (4, 7)), decoder_input_ids=torch.zeros(4, 8, dtype=torch.long))
    with attach(model, example, vram="50%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        assert torch.equal(model.generate(ids, **options), greedy)
        assert torch.equal(model.generate(ids, num_beams=2, **options), beam)


def test_a_plain_module_without_example_inputs_is_refused():
    model, _ = build("plain")
    with pytest.raises(ResidencyError, match="Stack: residency cannot tell the shapes") as e:
        residency.attach(model, vram="50%", profile=PROFILE, backend="cpu")
    assert "example_inputs=dict(x=…)" in e.value.hint  # the model's own input names
    assert not any(has_hook(m) for m in model.modules())


def test_a_budget_cut_replans_and_the_next_outputs_equal_a_fresh_run_of_the_new_plan():
    model, example = build("plain")
    inputs = [example, 2 * example, 3 * example]
    with attach(model, example, vram="100%") as rt:
        first = call(model, inputs[0])
        rt.set_budget(rt.ledger.total_bytes * 3 // 4)
        got = [call(model, x) for x in inputs[1:]]
        new_plan, recoveries = rt.plan, rt.recoveries
    assert [cause for cause, _ in recoveries] == ["DeviceBudgetExceeded"]
    fresh, _ = build("plain")
    with attach(fresh, example, plan=new_plan) as again:
        assert again.plan is new_plan
        expected = [call(fresh, x) for x in inputs[1:]]
    assert new_plan.streamed() and not torch.equal(first, got[0])
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_a_tied_embedding_is_planned_once():
    model, example = build("llama")
    with attach(model, example) as rt:
        embed = rt.workload.by_name["LlamaForCausalLM.model.embed_tokens"]
    assert embed.modules == ("model.embed_tokens", "lm_head")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    assert rt.workload.params == sum(t.numel() for t in unique.values())


def test_a_module_in_a_second_dtype_keeps_it_and_a_dtype_the_runtime_cannot_store_is_refused():
    model, example = build("plain")
    model.head.to(torch.bfloat16)  # the minor dtype: fp32 (the blocks) is the plan's compute dtype
    with attach(model, example) as rt:
        assert rt.workload.by_name["Stack.head"].own_dtypes == (("weight", "bf16"), ("bias", "bf16"))
        assert {b.compute_dtype for b in rt.plan.blocks} == {"fp32"}
        assert model.head.weight.dtype == torch.bfloat16 and model.blocks[0][0].weight.dtype == torch.float32
    model.head.to(torch.float64)
    with pytest.raises(ResidencyError, match="float32, float64.*not float64") as e:
        attach(model, example)
    assert "cast the model" in e.value.hint
    assert not any(has_hook(m) for m in model.modules())


def test_warnings_of_the_workload_builder_reach_the_caller():
    model, example = build("llama")
    model.spare = nn.Linear(8, 8)  # never called: its parameters are left out, and said to be
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModuleWorkloadWarning)
        attach(model, example).detach()
    assert any("spare.weight" in str(w.message) for w in caught)
    # named at this line, the caller's: a fixed stacklevel named residency/front_door/attach_any.py
    assert all(w.filename == __file__ for w in caught if w.category is ModuleWorkloadWarning)


def test_a_model_set_up_to_train_is_refused_at_its_call_under_a_plan_that_swaps_weights():
    model, (ids,) = build("llama")
    model.gradient_checkpointing_enable()
    model.train()
    with residency.attach(model, vram="40%", profile=PROFILE, backend="cpu", example_inputs=(ids,)) as rt:
        assert any(b.placement != "resident" for b in rt.plan.blocks)
        with pytest.raises(ResidencyError, match="set up to train") as e:
            model(input_ids=ids, labels=ids)
        assert "gradient_checkpointing_disable" in e.value.hint
        model.eval()  # inference, the same model: runs
        with torch.inference_mode():
            model(input_ids=ids)
