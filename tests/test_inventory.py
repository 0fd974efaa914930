"""Tensors grouped into blocks and components; bytes per format follow the sizing rule."""

import pytest

from residency.inventory import TensorInfo, block_of, group_tensors


@pytest.mark.parametrize(
    "name,component,block",
    [
        ("dit.blocks.7.attn.qkv.weight", "dit", "dit.blocks.7"),
        ("vae.decoder.blocks.0.conv.weight", "vae", "vae.decoder.blocks.0"),
        ("blk.3.attn_q.weight", "blk", "blk.3"),
        ("double_blocks.12.img_mlp.0.weight", "double_blocks", "double_blocks.12"),
        ("dit.x_embed.proj.weight", "dit", "dit.x_embed"),
        ("token_embd.weight", "model", "token_embd"),
    ],
)
def test_block_of_ends_at_the_first_numbered_segment(name, component, block):
    assert block_of(name) == (component, block)


def _t(name, shape, fmt="F32"):
    import math

    return TensorInfo(name, shape, fmt, math.prod(shape) * 4)


def test_grouping_keeps_execution_order_and_sums_bytes():
    inv = group_tensors("m", [
        _t("dit.embed.weight", (256, 64)),
        _t("dit.blocks.0.w", (256, 256)),
        _t("dit.blocks.0.norm", (256,)),
        _t("dit.blocks.1.w", (256, 256)),
        _t("vae.decoder.blocks.0.w", (64, 256)),
    ])
    assert [b.name for b in inv.blocks] == ["dit.embed", "dit.blocks.0", "dit.blocks.1", "vae.decoder.blocks.0"]
    assert inv.components == ["dit", "vae"]
    assert inv.stored_bytes == 4 * (256 * 64 + 256 * 256 * 2 + 256 + 64 * 256)
    assert inv.largest_block().name == "dit.blocks.0"
    # Q8_0: 34 bytes per 32 weights for the matrix; the norm vector falls back to BF16.
    assert inv.blocks[1].bytes_as("Q8_0") == 256 * 256 // 32 * 34 + 256 * 2


def test_numbered_blocks_follow_their_numbers_where_their_list_is_first_seen():
    """A safetensors header lists names as text: layers.0, layers.1, layers.10, layers.11, layers.2 … The table's
    range of like blocks read "layers.0–9 (×12)" for layers 0 to 11."""
    names = ["embed.weight", *sorted(f"layers.{i}.weight" for i in range(12)), "head.weight", "blocks.9.w",
             "blocks.10.w"]
    inv = group_tensors("x", [TensorInfo(n, (4,), "F32", 16) for n in names])
    assert [b.name for b in inv.blocks] == ["embed", *(f"layers.{i}" for i in range(12)), "head", "blocks.9",
                                           "blocks.10"]
