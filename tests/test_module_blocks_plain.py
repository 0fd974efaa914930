"""Plain torch modules cut into blocks with no library declaration: an nn.Sequential of identical layers is a
stack of blocks as a ModuleList of them is, and siblings are grouped only while the group stays small."""

from __future__ import annotations

import torch
from torch import nn

from residency.workload import module_workload


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def block_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    return [b.name.partition(".")[2] for b in module_workload(model, example, name="m").workload.blocks]


def test_a_sequential_of_identical_layers_is_one_block_per_layer():
    model = nn.Sequential(*[mlp(64, 256) for _ in range(6)], nn.Linear(64, 10))
    assert block_names(model, torch.randn(2, 64)) == ["0", "1", "2", "3", "4", "5", "6"]


def test_layers_alike_in_class_but_not_in_shape_are_not_a_stack():
    same = nn.Sequential(*[mlp(64, 256) for _ in range(3)])
    varied = nn.Sequential(mlp(64, 128), mlp(64, 256), mlp(64, 512))  # one class, three shapes
    x = torch.randn(2, 64)
    assert module_workload(same, x, name="m").repeated_from == "ModuleList"  # the undeclared stack rule
    assert module_workload(varied, x, name="m").repeated_from == "none"


class Codec(nn.Module):
    """Two large siblings called once each, then two small ones: the large are never one block."""

    def __init__(self):
        super().__init__()
        self.encoder = mlp(64, 512)
        self.decoder = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64))
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(self.norm(self.decoder(self.encoder(x))))


def test_large_siblings_called_once_each_are_not_grouped_but_small_ones_are():
    assert block_names(Codec(), torch.randn(2, 64)) == ["encoder", "decoder", "norm+out"]


def test_a_batch_of_vectors_counts_its_matmuls_per_row_as_a_sequence_does():
    """(256, 1024) is 256 rows, as (1, 256, 1024) is: its FLOPs are per token, not conditioning FLOPs (one row
    per item), which the cost model charges at the one-row rate (predictions were 12-20x too slow)."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(3)])
    flat, seq = (module_workload(model, x, name="m").workload.blocks[0]
                 for x in (torch.randn(256, 1024), torch.randn(1, 256, 1024)))
    assert flat.fixed_flops == seq.fixed_flops == 0.0 and flat.tokens == seq.tokens == 256
    assert flat.flops_per_token == seq.flops_per_token == 2 * 1024 * 1024


class Towers(nn.Module):
    """Two identical towers, each a ModuleList of layers: the layers are the blocks, not the towers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.layers = nn.ModuleList(mlp(32, 64) for _ in range(3))
        self.b = nn.Module()
        self.b.layers = nn.ModuleList(mlp(32, 64) for _ in range(3))

    def forward(self, x):
        for layer in (*self.a.layers, *self.b.layers):
            x = x + layer(x)
        return x


def test_repeated_children_that_hold_a_stack_are_searched_not_taken_whole():
    assert block_names(Towers(), torch.randn(2, 32)) == [f"{t}.layers.{i}" for t in "ab" for i in range(3)]


def test_the_two_equal_linears_of_one_mlp_are_not_a_stack():
    square = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 64))  # Linear(d, d) twice: one MLP

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 64)
            self.mlp = square

        def forward(self, x):
            return self.mlp(self.embed(x))

    names = block_names(Model(), torch.randn(2, 16))
    assert "mlp.0" not in names and "mlp.2" not in names
