"""Shared hypothesis strategies, model builders and graph comparisons for the test suite."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from gradgraph import Sine

def cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-datapoint cross-entropy ``[b]`` (the ``loss_fn`` form ``to_graph`` takes)."""
    return F.cross_entropy(output, targets, reduction="none")


ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "sine": Sine,
    "none": None,
}


def build_mlp(
    widths: Sequence[int],
    activations: Sequence[str],
    biases: Sequence[bool],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """An ``nn.Sequential`` MLP; ``activations[l]`` follows Linear ``l`` (the last one too)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=biases[index]))
        factory = ACTIVATIONS[activations[index]]
        if factory is not None:
            layers.append(factory())
    return nn.Sequential(*layers).to(dtype)


@st.composite
def mlp_specs(draw, max_depth: int = 5, max_width: int = 40, output_width: int | None = None):
    """``(widths, activations, biases, seed)`` for a random MLP; the last layer has no activation
    unless drawn so; ``output_width`` pins the output size."""
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    if output_width is not None:
        widths[-1] = output_width
    names = sorted(ACTIVATIONS)
    activations = [draw(st.sampled_from(names)) for _ in range(depth - 1)]
    activations.append(draw(st.sampled_from(["none", "none", "tanh", "sigmoid", "identity"])))
    biases = [draw(st.booleans()) for _ in range(depth)]
    seed = draw(st.integers(0, 2**16))
    return widths, activations, biases, seed


GRAPH_TENSORS = (
    "x", "edge_index", "edge_attr", "act", "grad", "layer", "node_kind", "edge_kind", "activation", "perm_group",
    "perm_block", "perm_tie", "position", "node_param", "node_param_pos", "edge_param", "edge_param_pos",
    "component_sample",
)


def assert_same_graph(first, second, atol: float = 1e-12) -> None:
    """Every tensor field of two GradGraphs agrees (floats to ``atol``, integers exactly)."""
    for key in GRAPH_TENSORS:
        a, b = first[key], second[key]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(a, b), key
    assert first.param_names == second.param_names and first.param_shapes == second.param_shapes
