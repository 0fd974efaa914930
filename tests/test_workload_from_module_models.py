"""Workloads from library models (the `catalog` extra): tiny random diffusers and transformers models built
from small configs, no download. Each is checked against a hooked real forward and FlopCounterMode."""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import init_empty_weights

# No importorskip: `./dev test` installs the `catalog` extra, and these tests must run wherever CI does.
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel  # noqa: E402
from test_workload_from_module import (  # noqa: E402
    forward_flops,
    hooked_order,
    plan_and_simulate,
    real_flops,
    scheduled_order,
    split,
    unique_tensor_elements,
)
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel  # noqa: E402

from residency.workload import ModuleWorkloadWarning, module_workload  # noqa: E402


def flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    example = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                   pooled_projections=torch.randn(1, 24), timestep=torch.ones(1), img_ids=torch.zeros(64, 3),
                   txt_ids=torch.zeros(8, 3), return_dict=False)
    return model, example


def wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    example = dict(hidden_states=torch.randn(1, 4, 1, 16, 16), timestep=torch.ones(1),
                   encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)
    return model, example


def unet():
    model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    example = dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.ones(1),
                   encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)
    return model, example


def t5():
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    return T5EncoderModel(config), dict(input_ids=torch.randint(0, 128, (1, 16)))


def llama():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config), (torch.randint(0, 256, (1, 16)),)


MODELS = {"flux": flux, "wan": wan, "unet": unet, "t5": t5, "llama": llama}


def build(name: str):
    model, example = MODELS[name]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModuleWorkloadWarning)  # llama's tied head: tested on its own
        return model, example, module_workload(model, example, name=name)


@pytest.mark.parametrize("name", MODELS)
def test_call_order_bytes_and_flops_match_a_real_forward(name):
    model, example, r = build(name)
    assert r.counted_on == "meta"
    assert scheduled_order(r.workload) == hooked_order(model, r.workload, example)
    assert r.workload.params == unique_tensor_elements(model)  # tied weights counted once
    assert forward_flops(r.workload) == pytest.approx(real_flops(model, example), rel=0.02)


def names(r) -> list[str]:
    return [b.name.partition(".")[2] for b in r.workload.blocks]


def test_flux_blocks_are_its_declared_repeated_blocks_between_grouped_embedders_and_output():
    _, _, r = build("flux")
    assert r.repeated_from == "_repeated_blocks"
    assert names(r) == ["x_embedder+time_text_embed+context_embedder", "transformer_blocks.0",
                        "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1",
                        "norm_out+proj_out"]
    embed = r.workload.by_name["flux.x_embedder+time_text_embed+context_embedder"]
    assert embed.modules == ("x_embedder", "time_text_embed", "context_embedder")
    assert "context_embedder.weight" in dict(embed.tensors)
    assert r.workload.by_name["flux.transformer_blocks.0"].fixed_flops > 0  # adaLN on the conditioning vector


def test_wan_loose_block_holds_the_scale_shift_table_and_the_rope_buffers():
    model, _, r = build("wan")
    loose = r.workload.by_name["wan.loose"]
    assert [n for n, _ in loose.tensors] == ["scale_shift_table", "rope.freqs_cos", "rope.freqs_sin"]
    assert r.workload.phases[0].passes[0].blocks[0] == "wan.loose"
    assert names(r)[2:] == ["blocks.0", "blocks.1", "proj_out"]


def test_unet_blocks_are_its_transformer_blocks_and_the_modules_beside_them():
    _, _, r = build("unet")
    found = names(r)
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in found
    assert "down_blocks.0.resnets.0" in found and "up_blocks.0" in found
    assert found[0] == "time_embedding+conv_in" and found[-1] == "conv_norm_out+conv_out"


def test_t5_shared_embedding_and_its_encoder_alias_are_one_block():
    model, _, r = build("t5")
    assert r.repeated_from == "_no_split_modules"
    shared = r.workload.by_name["t5.shared"]
    assert shared.modules == ("shared", "encoder.embed_tokens")
    assert [n for n, _ in shared.tensors] == ["shared.weight"]
    assert r.calls_per_forward["t5.shared"] == 1


def test_llama_tied_head_reads_the_embedding_block_twice_as_a_tied_head_does_without_a_warning():
    model, example = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModuleWorkloadWarning)  # one call per module sharing the weight: expected
        r = module_workload(model, example, name="llama")
    assert r.calls_per_forward["llama.model.embed_tokens"] == 2
    embed = r.workload.by_name["llama.model.embed_tokens"]
    assert embed.modules == ("model.embed_tokens", "lm_head")
    assert [n for n, _ in embed.tensors] == ["model.embed_tokens.weight"]
    passes = [p.blocks for p in r.workload.phases[0].passes]
    assert passes[1] == ("llama.model.embed_tokens",)  # the head's call, after the final norm
    loose = r.workload.by_name["llama.loose"]
    assert loose.modules == ("model.rotary_emb",)
    assert [n for n, _ in loose.tensors] == ["inv_freq", "original_inv_freq"]


def test_a_model_built_without_weights_gives_the_same_workload():
    model, example, r = build("flux")
    with init_empty_weights():
        empty, _ = flux()
    meta_example = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in split(example)[1].items()}
    assert module_workload(empty, meta_example, name="flux").workload == r.workload


@pytest.mark.parametrize("name", ["flux", "wan", "unet"])
def test_the_workload_plans_and_simulates(name):
    plan_and_simulate(build(name)[2].workload)


def test_a_mixture_of_experts_layer_counts_its_routed_experts_flops():
    """transformers' Mixtral runs its experts through torch._grouped_mm, which torch's flop counter has no formula
    for: a layer counted attention and router only, a quarter of the dense Mistral of the same width."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2)
    with init_empty_weights():
        model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    tokens = 16
    w = module_workload(model, (torch.zeros(1, tokens, dtype=torch.long),), name="mixtral").workload
    layer = next(b for b in w.blocks if b.name.endswith("layers.0"))
    attention = 4 * 64 * 64  # q, k, v, o
    experts = 2 * 3 * 64 * 256  # two routed experts a token: gate, up, down
    assert layer.flops_per_token == pytest.approx(2 * (attention + experts + 64 * 4), rel=0.1)
