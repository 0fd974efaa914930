"""Models that keep some modules in fp32 (diffusers' and transformers' `_keep_in_fp32_modules`) attached as
from_pretrained loads them: the main dtype is the plan's compute dtype, the kept tensors stay in their own
dtype — stored, streamed and computed in it, never quantized — and the bytes the plan counts are the bytes
the runtime's ledger holds."""

from __future__ import annotations

import dataclasses
import json
from itertools import chain

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from sim_helpers import flat_profile
from torch import nn
from transformers import T5Config, T5EncoderModel

import residency
from policies import PlanRequest, build_plan
from residency.formats import FORMATS
from residency.front_door.vram import COMPUTE_FORMAT
from residency.plan import BlockPlan, Budget, Execution
from residency.runtime.hooks import has_hook
from residency.runtime.module_paths import block_paths, common_module
from residency.simulate.memory import peak_bytes
from residency.workload import module_workload, workload_from_dict, workload_to_dict

pytestmark = [pytest.mark.usefixtures("one_compute_thread"),
              pytest.mark.filterwarnings("ignore::residency.workload.ModuleWorkloadWarning")]

PROFILE = flat_profile(backend="cpu")
QUANTIZED_REL_ERROR = 0.05  # relative L2 error of an output under blocks round-tripped through Q8_0/FP8


def as_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What from_pretrained(torch_dtype=dtype) leaves: every floating tensor in `dtype`, those under a module
    the class keeps in fp32 (a name segment of `_keep_in_fp32_modules`, as diffusers and transformers match it)
    in float32."""
    keep = type(model)._keep_in_fp32_modules or []
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model.eval()


def wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=256, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    g = torch.Generator().manual_seed(2)
    example = dict(hidden_states=torch.randn(1, 4, 1, 8, 8, generator=g, dtype=torch.bfloat16),
                   timestep=torch.ones(1), return_dict=False,
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g, dtype=torch.bfloat16))
    return as_from_pretrained(model, torch.bfloat16), example


def t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=128, d_kv=32, d_ff=256, num_layers=4, num_heads=4,
                      feed_forward_proj="gated-gelu")
    example = dict(input_ids=torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4)))
    return as_from_pretrained(T5EncoderModel(config), torch.float16), example


def call(model, example) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**example)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def weights_bytes(model) -> int:
    seen = {id(t): t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def kept_names(model) -> set[str]:
    main = max({p.dtype for p in model.parameters()}, key=lambda d: sum(
        p.numel() * p.element_size() for p in model.parameters() if p.dtype == d))
    return {n for n, t in chain(model.named_parameters(), model.named_buffers())
            if t.is_floating_point() and t.dtype != main}


def state_of(model):
    return [(n, t, t.data_ptr(), t.dtype, t.detach().clone()) for n, t in chain(model.named_parameters(),
                                                                              model.named_buffers())]


def assert_restored(model, state) -> None:
    for name, t, ptr, dtype, value in state:
        assert t.data_ptr() == ptr and t.dtype == dtype and t.device.type == "cpu", name
        assert torch.equal(t, value), name
    assert not any(has_hook(m) or "forward" in m.__dict__ for m in model.modules())


def own_paths(workload) -> set[str]:
    """Model paths of the tensors the workload keeps in their own dtype."""
    out = set()
    for b in workload.blocks:
        base = common_module(block_paths(b))
        out |= {f"{base}.{n}" if base else n for n, _ in b.own_dtypes}
    return out


def assert_ledger_is_the_prediction(rt) -> None:
    """Every kind the runtime holds is the bytes the simulator counts for the plan, and within the budget."""
    predicted = peak_bytes(rt.workload, rt.plan, PROFILE)
    held = dict(rt.ledger.snapshot().current_bytes)
    assert held == {k: predicted.get(k, 0) for k in held}  # the simulator lists graph_pool only when graphed
    assert rt.ledger.peak_total_bytes <= rt.plan.budget.vram_bytes


@pytest.mark.parametrize("build", [wan, t5], ids=["wan-bf16", "t5-fp16"])
def test_a_model_keeping_fp32_modules_attached_at_half_its_bytes_is_bit_exact_and_restored(build):
    model, example = build()
    kept = kept_names(model)
    assert kept and {t.dtype for t in model.parameters()} >= {torch.float32}
    expected = call(model, example)
    state = state_of(model)
    with residency.attach(model, vram="50%", profile=PROFILE, backend="cpu", example_inputs=example) as rt:
        got = [call(model, example) for _ in range(2)]
        assert_ledger_is_the_prediction(rt)
        plan, workload = rt.plan, rt.workload
        # every kept tensor is bound in its own dtype while attached
        assert all(t.dtype == torch.float32 for n, t in chain(model.named_parameters(), model.named_buffers())
                   if n in kept)
    assert plan.budget.vram_bytes == weights_bytes(model) // 2
    assert workload.nbytes(COMPUTE_FORMAT[plan.blocks[0].compute_dtype]) \
        == weights_bytes(model)
    assert own_paths(workload) == kept
    assert plan.streamed(), "half the weights cannot all stay resident"
    assert {b.format for b in plan.blocks} <= {"BF16", "F16", "F32"}
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected)
    assert_restored(model, state)
    assert torch.equal(call(model, example), expected)


def _quantized(b):
    """The loose tensors resident, the rest quantized: streamed (dequant on compute, then on copy) and
    resident-quantized, in Q8_0 and FP8."""
    if b.name.endswith(".loose"):
        return "resident", "BF16", "compute"
    label = b.name.split(".", 1)[1]
    return {"blocks.0": ("streamed", "Q8_0", "compute"), "blocks.1": ("streamed", "FP8", "copy"),
            "proj_out": ("resident-quantized", "Q8_0", "compute")}.get(label, ("streamed", "FP8", "compute"))


def roundtripped(model, workload, plan) -> None:
    """The model's tensors in the main dtype replaced by their storage format's round trip (what the runtime
    computes with); the kept ones left as they are."""
    for bp in plan.blocks:
        spec = workload.by_name[bp.name]
        base = common_module(block_paths(spec))
        for (name, _), fmt, own in zip(spec.tensors, spec.stored_formats(bp.format), spec.tensor_own_dtypes,
                                       strict=True):
            if own is None:
                t = dict(chain(model.named_parameters(), model.named_buffers()))[f"{base}.{name}" if base else name]
                t.data = fmt.roundtrip(t.data).to(t.dtype)


def test_a_quantized_plan_quantizes_only_the_main_dtype_and_keeps_fp32_tensors_exact():
    model, example = wan()
    expected = call(model, example)
    state = state_of(model)
    built = module_workload(model, example, name=type(model).__name__, compute_dtype="bf16").workload
    blocks = [BlockPlan(b.name, placement, fmt, "bf16", dequant_on=on)
              for b in built.blocks for placement, fmt, on in [_quantized(b)]]
    free = build_plan(PlanRequest(built, PROFILE, Budget(2**30), compute_dtype="bf16"), "test", blocks, Execution())
    budget = Budget(free.prediction.peak_total_bytes)  # exactly what the simulator counts: the ledger must fit it
    plan = build_plan(PlanRequest(built, PROFILE, budget, compute_dtype="bf16"), "test", blocks, Execution())
    with residency.attach(model, vram=plan.budget.vram_bytes, profile=PROFILE, backend="cpu", example_inputs=example,
                          plan=plan) as rt:
        got = call(model, example)
        assert_ledger_is_the_prediction(rt)
        stored = {(b, e.name): (e.format, e.own_dtype) for b, blob in rt.store.blobs.items()
                  for e in blob.layout.entries}
    assert_restored(model, state)
    # a kept fp32 matrix in an FP8 block is stored as F32; the main dtype's matrices take the block's format
    embed = f"{built.name}.patch_embedding+condition_embedder"
    assert stored[(embed, "condition_embedder.time_embedder.linear_1.weight")] == ("F32", "fp32")
    assert stored[(embed, "patch_embedding.weight")][0] == "FP8"
    assert stored[(f"{built.name}.blocks.0", "scale_shift_table")] == ("F32", "fp32")
    assert stored[(f"{built.name}.blocks.0", "attn1.to_q.weight")] == ("Q8_0", None)
    rel = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert 0 < rel <= QUANTIZED_REL_ERROR, rel
    roundtripped(model, built, plan)  # the plain model on the stored values: the same numbers
    assert torch.equal(got, call(model, example))


def test_kept_tensors_count_at_their_own_size_in_every_format():
    model, example = wan()
    w = module_workload(model, example, name="wan", compute_dtype="bf16").workload
    assert w.extra["own_dtype_tensors"] == {"fp32": len(kept_names(model))}
    for b in w.blocks:
        kept = [s for (_, s), own in zip(b.tensors, b.tensor_own_dtypes, strict=True) if own]
        f32 = sum(FORMATS["F32"].nbytes(s) for s in kept)
        rest = [(n, s) for (n, s), own in zip(b.tensors, b.tensor_own_dtypes, strict=True) if not own]
        for fmt in ("BF16", "Q8_0", "FP8"):
            plain = type(b)(b.name, b.component, tuple(rest), b.tokens, b.flops_per_token)
            assert b.nbytes(fmt) == f32 + plain.nbytes(fmt)
            assert b.quantized_weights(fmt) == plain.quantized_weights(fmt)
    assert workload_from_dict(json.loads(json.dumps(workload_to_dict(w)))).fingerprint() == w.fingerprint()
    one_dtype = module_workload(model.to(torch.bfloat16), example, name="wan", compute_dtype="bf16").workload
    # a one-dtype model keeps only its floating buffers (the rope tables) apart, in that dtype: never quantized
    buffers = {n for n, _ in model.named_buffers() if _.is_floating_point()}
    kept_one = [(b, n, d) for b in one_dtype.blocks for n, d in b.own_dtypes]
    assert kept_one and all(d == "bf16" for _, _, d in kept_one) and "own_dtype_tensors" not in one_dtype.extra
    assert all(any(p.endswith(f".{n}") or p == n for p in buffers) for _, n, _ in kept_one)
    assert one_dtype.fingerprint() != w.fingerprint()


def test_a_pipeline_of_components_in_several_dtypes_keeps_each_tensors_own():
    """A Wan pipeline as loaded: the text encoder and the transformer in bf16 (the transformer's kept modules
    fp32), the VAE in fp32. The main dtype of the tiny pipeline's bytes is fp32 (its VAE is the largest); the
    bf16 tensors keep bf16 under an F32 plan: the video is the plain pipeline's, bit for bit."""
    from test_pipeline_attach import PROFILE as PIPE_PROFILE
    from test_pipeline_attach import WAN_CALL, make_plan, tiny_wan, video

    from residency.attach_pipeline import attach_built, pipeline_workload

    pipe = tiny_wan()
    as_from_pretrained(pipe.transformer, torch.bfloat16)
    as_from_pretrained(pipe.text_encoder, torch.bfloat16)
    expected = video(pipe)
    state = state_of(pipe.transformer) + state_of(pipe.text_encoder) + state_of(pipe.vae)
    built = pipeline_workload(pipe, WAN_CALL)
    assert built.compute_dtype == "fp32"
    kept = {f"{c}.{n}" for c in ("transformer", "text_encoder") for n, t in
            chain(getattr(pipe, c).named_parameters(), getattr(pipe, c).named_buffers()) if t.dtype == torch.bfloat16}
    buffers = {f"{c}.{n}" for c in ("transformer", "text_encoder", "vae") for n, t in getattr(pipe, c).named_buffers()
               if t.is_floating_point()}  # every floating buffer keeps its dtype too (never quantized)
    assert own_paths(built.workload) == kept | buffers
    encoder = built.workload.by_name["text_encoder.shared"]  # all bf16 (the embedding): its activations too
    assert encoder.activation_bytes("fp32") == encoder.activation_bytes("bf16") > 0
    plan = make_plan(built, 2**26, lambda b: ("resident" if b.name == "transformer.loose" else "streamed", "F32",
                                              "session"), profile=PIPE_PROFILE)
    with attach_built(built, Budget(2**26), profile=PIPE_PROFILE, plan=plan) as rt:
        got = video(rt)
        held = dict(rt.runtime.ledger.snapshot().current_bytes)
        predicted = peak_bytes(built.workload, rt.plan, PIPE_PROFILE)
        assert held == {k: predicted.get(k, 0) for k in held}  # the simulator lists graph_pool only when graphed
    assert np.array_equal(got, expected)
    for _, t, ptr, dtype, value in state:
        assert t.data_ptr() == ptr and t.dtype == dtype and torch.equal(t, value)


def test_kept_fp32_tensors_carry_their_own_error_and_width_in_the_cost_model():
    # An fp32 norm kept beside bf16 weights is exact (no BF16 error) and is read at 4 bytes an element.
    from residency.simulate.costs import compute_s
    from residency.simulate.quality import block_error, format_error

    model, example = wan()
    w = module_workload(model, example, name="wan", compute_dtype="bf16").workload
    mixed = [b for b in w.blocks if b.own_dtypes and len(b.own_dtypes) < len(b.tensors)]
    assert mixed
    profile = flat_profile(backend="cpu", tflops=1e6, memory_gbps=1e-3)  # the memory roof decides the time
    assert w.extra["weights_dtype"] == "bf16"
    fp32_held = dataclasses.replace(w, extra={k: v for k, v in w.extra.items() if k != "weights_dtype"})
    for b in mixed:
        kept = sum(n for n, own in zip((int(torch.Size(s).numel()) for _, s in b.tensors), b.tensor_own_dtypes,
                                        strict=True) if own)
        plain = type(b)(b.name, b.component, b.tensors, b.tokens, b.flops_per_token)  # same tensors, no kept dtype
        one = dataclasses.replace(fp32_held, blocks=tuple(plain if x.name == b.name else x for x in w.blocks))
        # against fp32 weights (a catalog entry's), BF16 storage: the kept tensors take no error, the others BF16's
        expected = (b.params - kept) * format_error("BF16") / b.params
        assert block_error(fp32_held, b.name, "BF16") == pytest.approx(expected)
        assert block_error(fp32_held, b.name, "BF16") < block_error(one, b.name, "BF16")
        # against the bf16 weights the model holds, BF16 storage is exact, Q8_0 is not
        assert block_error(w, b.name, "BF16") == 0.0 < block_error(w, b.name, "Q8_0")
        bp = BlockPlan(b.name, "resident", "BF16", "bf16", "session", "compute")
        # the memory roof reads the kept tensors at fp32's width: at least 2 bytes an element more than at bf16
        # (more where the block's activations follow its kept dtype too)
        extra_s = 2 * kept / (profile.device_memory_gbps * 1e9)
        got = compute_s(b, bp, profile, 0, False, "bf16", 1) - compute_s(plain, bp, profile, 0, False, "bf16", 1)
        assert got >= extra_s * (1 - 1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_plan_that_stores_a_models_weights_in_their_own_dtype_loses_no_quality(dtype):
    """Quality loss is against the weights as the model holds them: a bf16 model kept in BF16 is bit for bit
    itself (it read 0.0133, BF16's error against fp32 weights it never had); quantized, it loses some."""
    from dataclasses import replace

    from sim_helpers import flat_profile

    from residency.simulate import predict

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).eval().to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    with residency.attach(model, profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x) as rt:
        assert rt.workload.extra["weights_dtype"] == {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                       torch.float32: "fp32"}[dtype]
        assert all(bp.placement == "resident" for bp in rt.plan.blocks)
        assert rt.plan.prediction.quality_loss == 0.0
        q8 = replace(rt.plan, blocks=tuple(replace(bp, format="Q8_0") for bp in rt.plan.blocks))
        assert predict(rt.workload, q8, rt.profile).prediction.quality_loss > 0
