"""``GradGraph.to_networkx`` on token graphs: each edge's ``mean_grad`` is the gradient of the
mean loss, a datapoint's token components summed before the mean over datapoints."""

from __future__ import annotations

import torch
from torch import nn

import gradgraph

DTYPE = torch.float64


class TokenMLP(nn.Module):
    """``[b, T, d_in]`` tokens through a per-token two-layer MLP, mean-pooled to ``[b, d_out]``."""

    def __init__(self, d_in: int = 3, hidden: int = 4, d_out: int = 2):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, tokens):
        return self.l2(torch.tanh(self.l1(tokens))).mean(1)


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


def test_token_graph_networkx_mean_grad_is_the_mean_loss_gradient():
    """Every weight edge's ``mean_grad`` equals autograd's gradient of the mean loss at its slot.

    With 4 tokens a datapoint, a graph has 4 components per datapoint. Checked to fail: with
    ``_component_param_grads`` returning the per-component products unsummed (its token branch
    skipped), every ``mean_grad`` is a mean over components too, off by the factor 5 (four
    tokens and the pooled component per datapoint).
    """
    torch.manual_seed(0)
    model = TokenMLP().to(DTYPE)
    tokens, targets = torch.randn(5, 4, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    graph = gradgraph.to_graph(model, tokens, targets, squared_error)
    assert int((graph.component_sample == 0).sum()) > 1  # a datapoint has several components (its tokens)

    names = [name for name, _ in model.named_parameters()]
    expected = torch.autograd.grad(squared_error(model(tokens), targets).mean(), list(model.parameters()))
    expected = {name: grad.reshape(-1) for name, grad in zip(names, expected)}

    exported = graph.to_networkx()
    assert exported.number_of_nodes() == graph.num_nodes
    src, dst = graph.edge_index.tolist()
    checked = 0
    for edge, (u, v) in enumerate(zip(src, dst)):
        param = int(graph.edge_param[edge])
        if param < 0:
            continue
        attrs = exported.edges[u, v]
        want = expected[graph.param_names[param]][int(graph.edge_param_pos[edge])]
        assert abs(attrs["mean_grad"] - float(want)) <= 1e-12, (graph.param_names[param], attrs["mean_grad"], float(want))
        assert attrs["weight"] == float(graph.edge_attr[edge, 0])
        assert attrs["kind"] == int(graph.edge_kind[edge]) and "edge_kind" not in attrs
        checked += 1
    assert checked == 3 * 4 + 4 * 2  # every weight of l1 and l2
    for node in range(graph.num_nodes):
        assert exported.nodes[node]["kind"] == int(graph.node_kind[node])
        assert exported.nodes[node]["bias"] == float(graph.x[node, 0])
        assert exported.nodes[node]["layer"] == int(graph.layer[node])
