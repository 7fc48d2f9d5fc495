"""GradMetaNet's wiring, where equivariance cannot see a mistake.

Every test here passes for an equivariant model that is wired wrongly in one way — dropped
backward messages, a cut pooled path, another aggregation — unless it checks that path
by its behaviour; each docstring names the bug it was checked to fail on.
"""

from __future__ import annotations

import pytest
import torch

import gradgraph
from gradgraph.nn import ComponentConv, GradGraphConv, GradMetaNet, GraphContext
from strategies import build_mlp


def mlp_graph(seed: int = 0, widths=(3, 4, 5, 2)) -> gradgraph.GradGraph:
    """float64 graph of a small MLP with hidden neurons of in- and out-degree > 1."""
    model = build_mlp(list(widths), ["tanh", "relu", "none"][: len(widths) - 1], [True] * (len(widths) - 1), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(6, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(6, widths[-1], generator=generator, dtype=torch.float64)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))


def without_group_means(model: GradMetaNet) -> GradMetaNet:
    """Zero the per-layer and per-graph mean terms of every message layer, so that a node hears
    another node only along the edges (the means reach every node of the graph)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, GradGraphConv):
                layer.lin_layer.weight.zero_()
                layer.lin_graph.weight.zero_()
            if isinstance(layer, ComponentConv):
                layer.lin_all.weight.zero_()
    return model


def perturbed_node(graph: gradgraph.GradGraph, node: int) -> gradgraph.GradGraph:
    """``graph`` with the bias and the factors of ``node`` (only) changed."""
    changed = graph.clone()
    changed.x = graph.x.clone()
    changed.act, changed.grad = graph.act.clone(), graph.grad.clone()
    changed.x[node] += 1.0
    changed.act[node] += 1.0
    changed.grad[node] -= 0.5
    return changed


@pytest.mark.parametrize("direction", ["both", "forward"])
def test_a_node_hears_its_successors_only_with_both_directions(direction):
    """A hidden neuron's output changes when a successor changes iff ``direction="both"``;
    its predecessors reach it either way.

    Checked to fail when the backward-direction messages are dropped from
    ``GradGraphConv.propagate_both`` (then ``"both"`` computes ``"forward"``)."""
    graph = mlp_graph()
    src, dst = graph.edge_index
    hidden = int(dst[(graph.layer[dst] == 1)][0])  # a neuron of the first hidden layer
    successor = int(dst[src == hidden][0])
    predecessor = int(src[dst == hidden][0])
    torch.manual_seed(0)
    model = without_group_means(GradMetaNet(8, direction=direction, graph_out_channels=0).double())
    with torch.no_grad():
        before = model(graph).node[hidden]
        after_successor = model(perturbed_node(graph, successor)).node[hidden]
        after_predecessor = model(perturbed_node(graph, predecessor)).node[hidden]
    assert (after_predecessor - before).abs().max() > 1e-6
    moved = (after_successor - before).abs().max()
    if direction == "both":
        assert moved > 1e-6
    else:
        assert moved <= 1e-12


def test_pooled_component_states_reach_the_node_states():
    """The component stage feeds the nodes through the pool: with no per-weight decoder (which
    reads the component states itself) the graph output still moves with ``act``/``grad``, and
    the node states entering the first node layer do.

    Checked to fail when ``h + pool_projection(pool(z))`` becomes ``h`` in
    ``GradMetaNet.forward`` (the component layers then reach nothing but the decoder)."""
    graph = mlp_graph(1)
    torch.manual_seed(1)
    model = GradMetaNet.for_graph_prediction(2, 8).double()
    assert model.decoder is None
    seen = []
    model.node_layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    changed = graph.clone()
    changed.act = graph.act * 1.5
    changed.grad = graph.grad * 0.5
    with torch.no_grad():
        before, after = model(graph).graph, model(changed).graph
    assert (after - before).abs().max() > 1e-6
    assert (seen[1] - seen[0]).abs().max() > 1e-6


@pytest.mark.parametrize("states", ["node", "component"])
def test_default_aggregation_is_the_documented_mean(states):
    """GradMetaNet's layers average their messages by default (``aggr="mean"``, as its
    docstring and :class:`GradGraphConv`'s say): each neuron's forward term is the mean over
    its in-edges and its backward term the mean over its out-edges, checked against a loop.

    Checked to fail when GradMetaNet's default ``aggr`` is changed to ``"sum"`` (or ``"max"``)."""
    graph = mlp_graph(2)
    torch.manual_seed(2)
    model = GradMetaNet(6).double()
    layer = model.node_layers[0] if states == "node" else model.component_layers[0]
    edge_features = torch.randn(graph.edge_index.shape[1], layer.edge_dim, dtype=torch.float64)
    context = GraphContext.from_graph(graph, edge_features)
    shape = (graph.num_nodes, layer.in_channels) if states == "node" else \
        (graph.num_nodes, graph.num_components, layer.in_channels)
    h = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        got = layer.propagate_both(h, context)
        forward, backward = layer.lin_forward(h), layer.lin_backward(h)
        gate_forward, gate_backward = layer.gate_forward(edge_features), layer.gate_backward(edge_features)
    expected = torch.zeros_like(got)
    for node in range(graph.num_nodes):
        incoming = (graph.edge_index[1] == node).nonzero().flatten().tolist()
        outgoing = (graph.edge_index[0] == node).nonzero().flatten().tolist()
        if incoming:
            expected[node] += torch.stack([forward[graph.edge_index[0, e]] * gate_forward[e] for e in incoming]).mean(0)
        if outgoing:
            expected[node] += torch.stack([backward[graph.edge_index[1, e]] * gate_backward[e] for e in outgoing]).mean(0)
    assert max(torch.bincount(graph.edge_index[1])) > 1  # a sum would differ
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_hidden_neurons_carry_no_position_term():
    """A hidden neuron's positional encoding is exactly its layer, depth and kind embeddings —
    the ``1[fixed]`` indicator of :class:`PositionalEncoding` — and a fixed neuron's adds its
    position's row. Checked to fail with the ``* fixed`` mask removed from ``forward`` (hidden
    neurons then all get position row 0, an equivariant change no symmetry test can see)."""
    from gradgraph.nn import PositionalEncoding

    graph = mlp_graph(3)
    encoding = PositionalEncoding(5).double()
    with torch.no_grad():
        got = encoding(graph)
        layer, layers_to_end, _, fixed = encoding.table_indices(graph)
        base = encoding.layer(layer) + encoding.depth(layers_to_end) + encoding.kind(graph.node_kind)
    hidden = graph.perm_group >= 0
    assert hidden.any() and fixed.any()
    torch.testing.assert_close(got[hidden], base[hidden], atol=0, rtol=0)
    torch.testing.assert_close(got[~hidden], base[~hidden] + encoding.position.weight[graph.position[~hidden]],
                               atol=1e-15, rtol=0)
