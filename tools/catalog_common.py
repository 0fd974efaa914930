"""Shared pieces of the external-model catalog generators: tensors of a block, counted FLOPs, T5 encoders.

Every model is instantiated on the meta device, so a 12B model costs no memory and no download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

CATALOG_SCHEMA_VERSION = 1
ACT_BYTES = 2  # activation coefficients are stated at a 2-byte compute dtype
FLOP_TOLERANCE = 0.02  # analytic vs counted FLOPs: relative disagreement that fails generation


def tensors(parts: Sequence[tuple[str, nn.Module | nn.Parameter]]) -> list[list[Any]]:
    """What a checkpoint stores of a block made of `parts` (prefix, module or bare parameter), torch shapes.

    Prefixes keep the checkpoint's own key paths, e.g. `context_embedder.weight` inside `transformer.embed`.
    """
    out = []
    for prefix, part in parts:
        if isinstance(part, nn.Parameter):
            out.append([prefix, list(part.shape)])
            continue
        for name, t in part.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                out.append([f"{prefix}.{name}" if prefix else name, list(t.shape)])
    return out


def count_flops(run: Callable[[], Any]) -> tuple[float, dict[str, float], Any]:
    """(total FLOPs, FLOPs per module path, result) of `run()` under FlopCounterMode (works on meta).

    SDPA is pinned to the math backend: FlopCounterMode has no formula for CPU's fused flash kernel and
    would count its attention as 0 FLOPs.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = run()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module, result


def module_flops(per_module: dict[str, float], root: str, path: str) -> float:
    """Counted FLOPs of the submodule `path` of the root class `root` (0 when it ran no matmul/conv)."""
    return per_module.get(f"{root}.{path}" if path else root, 0.0)


def check_flops(what: str, analytic: float, counted: float, rel: float = FLOP_TOLERANCE) -> None:
    """Fail generation when the documented formula and torch's count disagree: the catalog would lie."""
    if abs(analytic - counted) > rel * max(abs(counted), 1.0):
        raise AssertionError(f"{what}: analytic {analytic:.6g} FLOPs vs counted {counted:.6g}")


def block_flops(entry: dict, context_frames: int = 0) -> float:
    """FLOPs of one call of a catalog block entry: the formula of residency.workload.BlockSpec.flops."""
    t = entry["tokens"]
    ctx = context_frames * entry.get("context_tokens_per_frame", 0)
    return (entry.get("fixed_flops", 0.0) + entry.get("flops_per_token", 0.0) * t
            + entry.get("self_attn_flops_per_token_pair", 0.0) * t * t
            + entry.get("context_attn_flops_per_token_pair", 0.0) * t * ctx)


def check_sdpa_context_flops(width: int, heads: int, tokens: int, context_tokens: int) -> None:
    """Attention of `tokens` queries over themselves plus cached keys costs 4·width per (query, key) pair."""
    head_dim = width // heads
    q = torch.empty(1, heads, tokens, head_dim, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(1, heads, tokens + context_tokens, head_dim, device="meta", dtype=torch.bfloat16)
    counted, _, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv))
    check_flops("attention over cached context", 4.0 * width * tokens * (tokens + context_tokens), counted)


def conv_entries(component: str, module: nn.Module, groups: Sequence[tuple[str, Sequence[str]]],
                 run: Callable[[], Any]) -> list[dict]:
    """VAE blocks: FLOPs counted on the meta device between each block's first and last submodule.

    `groups` are (block suffix, submodule paths of `module` the block runs, in order); 'tokens' are the
    block's output pixels (all frames of the call). The resolution is fixed per entry, so the quadratic
    part of a mid-block's spatial attention is folded into flops_per_token at that size.
    """
    counter = FlopCounterMode(display=False)
    marks: dict[str, float] = {}
    widest: dict[str, int] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for suffix, paths in groups:
        def pre(mod, args, suffix=suffix):
            marks[suffix + ":start"] = counter.get_total_flops()
            widest[suffix] = _elements(args[0].shape) if args else 0

        def post(mod, args, out, suffix=suffix, last=paths[-1]):
            widest[suffix] = max(widest[suffix], _elements(out.shape))
            if mod is module.get_submodule(last):
                marks[suffix + ":end"] = counter.get_total_flops()
                out_shapes[suffix] = tuple(out.shape)
        hooks.append(module.get_submodule(paths[0]).register_forward_pre_hook(pre))
        for path in paths:
            hooks.append(module.get_submodule(path).register_forward_hook(post))
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:  # see count_flops
            run()
    finally:
        for h in hooks:
            h.remove()
    entries = []
    for suffix, paths in groups:
        pixels = _pixels(out_shapes[suffix])
        entries.append({
            "name": f"{component}.{suffix}", "component": component,
            "tensors": tensors([(p, module.get_submodule(p)) for p in paths]), "tokens": pixels,
            "flops_per_token": (marks[suffix + ":end"] - marks[suffix + ":start"]) / pixels,
            # input + output + one intermediate of the widest size live at once
            "activation_bytes_per_token": 3 * widest[suffix] * ACT_BYTES / pixels,
        })
    check_flops(f"{component} blocks vs the whole run", sum(block_flops(e) for e in entries),
                float(counter.get_total_flops()))
    return entries


def _pixels(shape: tuple[int, ...]) -> int:
    """Output pixels of a (B, C, H, W) or (B, C, T, H, W) tensor, all frames of the call."""
    n = 1
    for d in shape[2:]:
        n *= d
    return n


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def t5_encoder_entries(component: str, model: nn.Module, tokens: int) -> list[dict]:
    """Blocks of a T5 / umT5 encoder (T5EncoderModel or UMT5EncoderModel, gated-GELU FFN) at `tokens`.

    Per layer and token: q, k, v, o (4·d·inner) and wi_0, wi_1, wo (3·d·d_ff) matmuls, ×2 FLOPs each;
    self-attention scores and the weighted sum cost 4·inner per token pair (inner = heads·d_kv).
    """
    c = model.config
    d, inner, d_ff = c.d_model, c.num_heads * c.d_kv, c.d_ff
    layer_flops_per_token = 2.0 * (4 * d * inner + 3 * d * d_ff)
    encoder = model.encoder
    entries = [{
        # the lookup costs no FLOPs; its bytes are the point (a 256k-row vocabulary is 2 GB at BF16)
        "name": f"{component}.embed", "component": component,
        "tensors": tensors([("embed_tokens", encoder.embed_tokens)]), "tokens": tokens,
        "flops_per_token": 0.0, "activation_bytes_per_token": d * ACT_BYTES,
    }]
    for i, block in enumerate(encoder.block):
        entries.append({
            "name": f"{component}.blocks.{i}", "component": component,
            "tensors": tensors([("", block)]), "tokens": tokens,
            "flops_per_token": layer_flops_per_token,
            "self_attn_flops_per_token_pair": 4.0 * inner,
            # x, residual, q/k/v, both gated-FFN halves, and T5's eager (heads × tokens) score rows per token
            "activation_bytes_per_token": (2 * d + 3 * inner + 2 * d_ff + c.num_heads * tokens) * ACT_BYTES,
        })
    entries.append({
        "name": f"{component}.final_norm", "component": component,
        "tensors": tensors([("final_layer_norm", encoder.final_layer_norm)]), "tokens": tokens,
        "flops_per_token": 0.0, "activation_bytes_per_token": 2 * d * ACT_BYTES,
    })
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    total, per_module, _ = count_flops(lambda: model(input_ids=ids))
    root = type(model).__name__
    check_flops(f"{component} layer 0", block_flops(entries[1]), module_flops(per_module, root, "encoder.block.0"))
    check_flops(f"{component} encoder", sum(block_flops(e) for e in entries), total)
    return entries


def transformer_pass(blocks: Sequence[dict], per_step: bool, kv: str, purpose: str) -> dict:
    return {"blocks": [b["name"] for b in blocks], "per_step": per_step, "kv": kv, "purpose": purpose}


def params_by_component(blocks: Sequence[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in blocks:
        n = 0
        for _, shape in b["tensors"]:
            p = 1
            for dim in shape:
                p *= dim
            n += p
        out[b["component"]] = out.get(b["component"], 0) + n
    return out
