"""`EdgeProductDecoder`'s orientation: an edge j -> k reads the source j on the left of its
product and in the first slot of its MLP, the destination k on the right and second.

The case is asymmetric: with the left map picking a component's ``act`` and the right map
its ``grad``, the first moment of an edge's product is its weight's mean gradient
``mean_i act[j, i] * grad[k, i]`` -- checked against autograd of the mean loss, which knows
nothing of the decoder -- while the swapped reading ``act[k] * grad[j]`` is another number.
"""

from __future__ import annotations

import torch
from strategies import build_mlp

import gradgraph
from gradgraph.nn import EdgeProductDecoder, GraphContext

DTYPE = torch.float64


def squared_error(output, target):
    return (output - target).pow(2).sum(1)


def test_decoder_reads_source_left_and_destination_right():
    """Checked to fail: with ``context.pattern("backward", ...)`` in ``EdgeProductDecoder.forward``
    changed to ``"forward"`` (the product read destination-left) or the MLP's endpoints
    ``[h[src], h[dst]]`` swapped, the outputs below are wrong."""
    model = build_mlp([3, 4, 2], ["tanh", "none"], [True, True], seed=5)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(6, 3, generator=generator, dtype=DTYPE)
    targets = torch.randn(6, 2, generator=generator, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)
    context = GraphContext.from_graph(graph, torch.zeros(graph.edge_index.shape[1], 1, dtype=DTYPE))

    decoder = EdgeProductDecoder(1, 1, 1, component_channels=3, product_channels=1, hidden_channels=2).double()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        # product terms: left picks act (channel 0), right picks grad (channel 1); node: grad times 1
        decoder.edge_left.weight[0, 0] = 1.0
        decoder.edge_right.weight[0, 1] = 1.0
        decoder.edge_moments.weight[0, 0] = 1.0  # the first moment only
        decoder.node_left.weight[0, 1] = 1.0
        decoder.node_right.weight[0, 2] = 1.0
        decoder.node_moments.weight[0, 0] = 1.0
        # MLP term: relu(h_src - h_dst) - relu(h_dst - h_src) = h_src - h_dst
        first, last = decoder.edge_mlp.lins[0], decoder.edge_mlp.lins[-1]
        first.weight[0, :2] = torch.tensor([1.0, -1.0])
        first.weight[1, :2] = torch.tensor([-1.0, 1.0])
        last.weight[0] = torch.tensor([1.0, -1.0])

    z = torch.stack([graph.act, graph.grad, torch.ones_like(graph.act)], dim=-1)  # [N, B, 3]
    h = graph.layer.to(DTYPE)[:, None] * 10.0 + graph.position.to(DTYPE)[:, None]  # [N, 1], distinct per node
    edge, node = decoder(h, context, z)

    expected = torch.autograd.grad(squared_error(model(inputs), targets).mean(), list(model.parameters()))
    expected = {name: value.reshape(-1) for (name, _), value in zip(model.named_parameters(), expected)}
    src, dst = graph.edge_index
    product_part = edge[:, 0] - (h[src, 0] - h[dst, 0])
    for e in range(graph.edge_index.shape[1]):
        name = graph.param_names[int(graph.edge_param[e])]
        assert abs(float(product_part[e]) - float(expected[name][int(graph.edge_param_pos[e])])) < 1e-12
    # the MLP term by itself: source first (h_src - h_dst is -10 + a position difference)
    with torch.no_grad():
        mlp_only = decoder.edge_mlp(torch.cat([h[src], h[dst], context.edge_features], dim=-1))[:, 0]
    torch.testing.assert_close(mlp_only, h[src, 0] - h[dst, 0], atol=1e-12, rtol=0)
    has_bias = graph.node_param >= 0
    for n in torch.nonzero(has_bias).flatten().tolist():
        name = graph.param_names[int(graph.node_param[n])]
        assert abs(float(node[n, 0]) - float(expected[name][int(graph.node_param_pos[n])])) < 1e-12
