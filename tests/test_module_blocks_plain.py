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


class Stages(nn.Module):
    """Stages × layers: a ModuleList of ModuleLists, the inner layers called by the root's loop."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.ModuleList([nn.Linear(64, 64) for _ in range(3)]) for _ in range(2)])

    def forward(self, x):
        for stage in self.stages:
            for layer in stage:
                x = torch.tanh(layer(x))
        return x


def test_a_modulelist_of_modulelists_is_cut_to_its_layers():
    """The inner ModuleLists were taken as the blocks, and a ModuleList is never called: "the forward called none
    of the model's blocks"."""
    assert block_names(Stages(), torch.randn(2, 64)) == [f"stages.{s}.{i}" for s in range(2) for i in range(3)]


class Parts(nn.Module):
    """Layers used as containers: the root calls each layer's parts, never the layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.layers = nn.ModuleList(_Layer() for _ in range(4))
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer.mlp(layer.norm(x))
        return self.head(x)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.mlp = mlp(64, 256)

    def forward(self, x):  # never called by Parts
        return x + self.mlp(self.norm(x))


def test_layers_whose_parts_the_parent_calls_are_cut_into_those_parts_and_stream():
    """Left whole, each never-called layer's weights were read from the loose block: every layer resident, so a
    budget below the weights fitted nothing."""
    from sim_helpers import flat_profile

    import residency

    model, x = Parts().eval(), torch.randn(2, 5, 8)
    parts = [f"layers.{i}.{p}" for i in range(4) for p in ("norm", "mlp")]
    assert block_names(model, x) == ["embed", *parts, "head"]
    expected = model(x)
    weights = sum(p.numel() * 4 for p in model.parameters())
    with residency.attach(model, vram=weights // 2, profile=flat_profile(backend="cpu"), backend="cpu",
                          example_inputs=x) as rt, torch.inference_mode():
        assert {bp.name.partition(".")[2] for bp in rt.plan.streamed()} & set(parts)
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)  # F32: the thread count alone differs


def test_an_example_the_model_cannot_run_on_is_a_residency_error_saying_how_to_give_one():
    """A list given as the example was taken as positional arguments: the model's own TypeError, raw."""
    import pytest

    from residency.errors import ResidencyError

    class ListIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

        def forward(self, xs):
            x = torch.cat(xs, 0)
            for layer in self.layers:
                x = layer(x)
            return x

    xs = [torch.randn(2, 64), torch.randn(3, 64)]
    with pytest.raises(ResidencyError, match=r"m did not run on the example inputs \(TypeError: .*positional") as e:
        module_workload(ListIn(), xs, name="m")
    assert "([t1, t2],)" in e.value.hint
    assert block_names(ListIn(), (xs,)) == [f"layers.{i}" for i in range(4)]
