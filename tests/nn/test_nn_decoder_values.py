""":class:`EdgeProductDecoder`'s node output by value and its shape checks in full.

Written for the mutation run of the ``nn-decoder`` group (``./gg mutate nn-decoder``, see
docs/mutation.md); each docstring names what it was checked to kill, with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/nn-decoder/mutants/``.
"""

from __future__ import annotations

import re

import pytest
import torch
from strategies import build_mlp

import gradgraph
from gradgraph.nn import EdgeProductDecoder, GraphContext


def graph_and_context():
    model = build_mlp([3, 4, 2], ["tanh", "none"], [True, True], seed=1)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))
    edge_features = torch.randn(graph.edge_index.shape[1], 2, generator=generator, dtype=torch.float64)
    return graph, GraphContext.from_graph(graph, edge_features)


def test_node_output_is_mlp_plus_moments_of_the_componentwise_product():
    """``y_n = MLP_N(h_n) + Theta_N [mean_i q_{n,i} || mean_i q_{n,i}^2]`` with
    ``q = (A' z) * (B' z)``, node by node with random maps (no map picks a channel of ones).

    Checked to kill ``EdgeProductDecoder.forward`` 87 (the product made a quotient)."""
    graph, context = graph_and_context()
    torch.manual_seed(2)
    decoder = EdgeProductDecoder(3, 2, 2, component_channels=4, product_channels=3).double()
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(graph.num_nodes, 3, generator=generator, dtype=torch.float64)
    z = torch.randn(graph.num_nodes, graph.num_components, 4, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        _, node = decoder(h, context, z)
        for n in range(graph.num_nodes):
            q = (z[n] @ decoder.node_left.weight.T) * (z[n] @ decoder.node_right.weight.T)  # [B, P]
            moments = torch.cat([q.mean(0), (q**2).mean(0)])
            expected = decoder.node_mlp(h[n][None])[0] + moments @ decoder.node_moments.weight.T
            torch.testing.assert_close(node[n], expected, atol=1e-12, rtol=1e-12)


def test_shape_errors_name_the_expected_and_the_given_shapes():
    """Node states of the wrong node count or width, and component states that are missing,
    not 3-D, of the wrong node count or width, each alone, are refused in full.

    Checked to kill ``EdgeProductDecoder.forward`` 1, 5, 6 (the node-state check and message)
    and 30, 31, 40, 42, 44 (the component-state check and the shape it prints)."""
    graph, context = graph_and_context()
    decoder = EdgeProductDecoder(3, 2, 1, component_channels=4).double()
    N, B = graph.num_nodes, graph.num_components
    h = torch.zeros(N, 3, dtype=torch.float64)
    z = torch.zeros(N, B, 4, dtype=torch.float64)
    for bad in (torch.zeros(N - 1, 3, dtype=torch.float64), torch.zeros(N, 2, dtype=torch.float64)):
        message = f"EdgeProductDecoder: node states must have shape [{N}, 3]; got {list(bad.shape)}"
        with pytest.raises(gradgraph.GradGraphError, match=f"^{re.escape(message)}$"):
            decoder(bad, context, z)
    for bad in (None, z[:, 0], z[1:], z[..., :3]):
        shape = None if bad is None else list(bad.shape)
        message = f"EdgeProductDecoder: component states must have shape [{N}, B, 4]; got {shape}"
        with pytest.raises(gradgraph.GradGraphError, match=f"^{re.escape(message)}$"):
            decoder(h, context, bad)


def test_decoder_is_built_as_its_equation_with_documented_defaults():
    """The product maps ``A, B, A', B'`` and the moment maps ``Theta_E, Theta_N`` are bias-free
    (the equation has no bias there; the MLPs carry the biases), the MLPs have no normalisation
    layer, ``product_channels`` defaults to 16, and ``repr`` names every setting.

    Checked to kill ``EdgeProductDecoder.__init__`` 1 (another default), 5, 6 (``edge_dim`` /
    ``out_channels`` not kept), 19 (the node MLP with PyG's default batch norm) and the twelve
    mutants giving a product or moment map a bias (27, 28, 35, 36, 43, 46, 53, 54, 61, 62,
    69, 72)."""
    decoder = EdgeProductDecoder(3, 2, 5, component_channels=4)
    assert decoder.product_channels == 16
    for name in ("edge_left", "edge_right", "node_left", "node_right"):
        layer = getattr(decoder, name)
        assert (layer.in_channels, layer.out_channels, layer.bias) == (4, 16, None)
    for name in ("edge_moments", "node_moments"):
        layer = getattr(decoder, name)
        assert (layer.in_channels, layer.out_channels, layer.bias) == (32, 5, None)
    assert not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in decoder.modules())
    assert decoder.node_mlp.channel_list == [3, 3, 5] and decoder.edge_mlp.channel_list == [8, 3, 5]
    assert repr(decoder) == "EdgeProductDecoder(3, edge_dim=2, out=5, component_channels=4, product_channels=16)"
