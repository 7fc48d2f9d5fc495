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


def assert_same_graph(first, second, atol: float = 1e-12, exact: bool = False) -> None:
    """Every tensor field of two GradGraphs agrees (floats to ``atol``, integers exactly).

    ``exact``: every field the graphs hold (extra ones too: ``y``, ``zoo_id``, ``loss``), the same keys,
    dtypes and values bit for bit — what a cache round trip must give back.
    """
    if exact:
        assert sorted(first.keys()) == sorted(second.keys())
        for key in first.keys():
            if isinstance(first[key], torch.Tensor):
                assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
            else:
                assert first[key] == second[key], key
        return
    for key in GRAPH_TENSORS:
        a, b = first[key], second[key]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(a, b), key
    assert first.param_names == second.param_names and first.param_shapes == second.param_shapes


def renumbered(graph, node_order: torch.Tensor | None = None, edge_order: torch.Tensor | None = None):
    """The same graph with new node ``i`` = old node ``node_order[i]`` and its edges listed in
    ``edge_order`` (either may be ``None``: kept as it is)."""
    import gradgraph

    fields = {key: value for key, value in graph}
    if edge_order is not None:
        for key in ("edge_attr", "edge_kind", "edge_param", "edge_param_pos"):
            fields[key] = graph[key][edge_order]
        fields["edge_index"] = graph.edge_index[:, edge_order]
    if node_order is not None:
        new_number = torch.empty_like(node_order)
        new_number[node_order] = torch.arange(len(node_order))
        for key, value in graph:
            if key != "edge_index" and isinstance(value, torch.Tensor) and graph.is_node_attr(key):
                fields[key] = value[node_order]
        fields["edge_index"] = new_number[fields["edge_index"]]
    return gradgraph.GradGraph(**fields)


def with_edges(graph, pairs: Sequence[tuple[int, int]], param: int, weight: float = 1.0):
    """``graph`` with edges ``src -> dst`` of the kind of its first edge appended, each of weight
    ``weight``: read as entries of parameter ``param`` at position 0, or parameter-free (structural)
    for ``param = -1``."""
    import gradgraph

    fields = {key: value for key, value in graph}
    extra = torch.tensor(pairs, dtype=torch.long).T
    count = extra.shape[1]
    fields["edge_index"] = torch.cat([graph.edge_index, extra], dim=1)
    fields["edge_attr"] = torch.cat([graph.edge_attr, torch.full((count, graph.edge_attr.shape[1]), weight,
                                                                 dtype=graph.edge_attr.dtype)])
    position = 0 if param >= 0 else -1
    for key, fill in (("edge_param", param), ("edge_param_pos", position), ("edge_kind", int(graph.edge_kind[0]))):
        fields[key] = torch.cat([graph[key], torch.full((count,), fill, dtype=graph[key].dtype)])
    return gradgraph.GradGraph(**fields)



def learned_rule(variant: str, schedule: bool = False):
    """A float64 :class:`~gradgraph.optim.LearnedUpdate` of ``variant`` (``"gradmetanet"``, ``"deepsets"``
    or ``"sgdm"``; Adam's direction in ``F`` but the SGDM one) whose learned term is not zero."""
    from gradgraph.optim import LearnedUpdate, MetaModelConfig

    torch.manual_seed(0)
    config = MetaModelConfig(use_gradmetanet=variant == "gradmetanet", residual_adam=variant != "sgdm",
                             learned_term=variant != "sgdm", schedule=schedule)
    meta = LearnedUpdate(config).double()
    if meta.mlp is not None:
        with torch.no_grad():  # the last layer starts at zero with Adam's direction in F
            meta.mlp[-1].weight.normal_(0, 0.1)
    return meta
