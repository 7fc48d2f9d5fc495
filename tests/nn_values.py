"""What the nn value tests share: small float64 MLP graphs and the pieces of hand computations.

``tests/nn/test_nn_*_values.py`` check layers against their equations written out by hand; they
build their inputs and write ``x W^T + b`` with these (one copy, not one per file)."""

from __future__ import annotations

import torch
from torch_geometric.data import Batch

import gradgraph
from strategies import build_mlp


def mlp_graph(seed: int, widths=(3, 4, 5, 2), batch: int = 4) -> gradgraph.GradGraph:
    """float64 graph of a small MLP (hidden neurons of in- and out-degree > 1), ``batch`` components."""
    model = build_mlp(list(widths), ["tanh", "relu", "none"][: len(widths) - 1], [True] * (len(widths) - 1), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))


def two_graphs(batch: int = 4) -> Batch:
    """A Batch of two MLP graphs of different widths and depths (the padded, masked paths)."""
    return Batch.from_data_list([mlp_graph(0, batch=batch), mlp_graph(1, widths=(2, 3, 2), batch=batch)])


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter (biases included) drawn afresh, so no term is zero by its initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T (+ b)`` written out for a PyG/torch Linear."""
    out = x @ module.weight.T
    return out + module.bias if module.bias is not None else out


AGGREGATE = {
    "mean": lambda messages: messages.mean(0),
    "sum": lambda messages: messages.sum(0),
    "max": lambda messages: messages.max(0).values,
}


def hand_conv(layer, h: torch.Tensor, graph, edge_features: torch.Tensor) -> torch.Tensor:
    """:class:`~gradgraph.nn.GradGraphConv`'s equation node by node (also the terms the attention
    layers share with it): self term, per-(graph, layer) and per-graph
    means, and the gated messages aggregated (``aggr``; no message: 0) over the in-edges and,
    with ``direction="both"``, the out-edges."""
    src, dst = graph.edge_index
    batch = graph.batch if getattr(graph, "batch", None) is not None else torch.zeros(h.shape[0], dtype=torch.long)
    aggregate = AGGREGATE[layer.aggr]
    out = torch.zeros(*h.shape[:-1], layer.out_channels, dtype=h.dtype)
    for n in range(h.shape[0]):
        same_graph = (batch == batch[n]).nonzero().flatten()
        same_layer = ((batch == batch[n]) & (graph.layer == graph.layer[n])).nonzero().flatten()
        term = linear(layer.lin_self, h[n])
        term = term + linear(layer.lin_layer, h[same_layer].mean(0)) + linear(layer.lin_graph, h[same_graph].mean(0))
        if layer.edge_messages:
            incoming = (dst == n).nonzero().flatten().tolist()
            if incoming:
                term = term + aggregate(torch.stack(
                    [linear(layer.lin_forward, h[src[e]]) * linear(layer.gate_forward, edge_features[e])
                     for e in incoming]
                ))
            outgoing = (src == n).nonzero().flatten().tolist()
            if outgoing and layer.direction == "both":
                term = term + aggregate(torch.stack(
                    [linear(layer.lin_backward, h[dst[e]]) * linear(layer.gate_backward, edge_features[e])
                     for e in outgoing]
                ))
        out[n] = term
    return out
