"""Residual and gate edges of the traced converter, checked through gradients on a gated
residual MLP (a second model besides the attention block's edge count).

For ``r = h + down(p)`` the RESIDUAL edge ``h_j -> r_j`` stands for the identity weight of the
skip, so its rank-1 component ``act[h_j] * grad[r_j]`` is the per-sample gradient of a scale
``alpha_j`` on the skip (``r = alpha * h + down(p)`` at ``alpha = 1``). For ``p = a * b`` the
GATE edge ``a_j -> b_j`` pairs the factors: ``grad[b_j] = act[a_j] * dL/dp_j``, with ``dL/dp``
the gradient of a shift ``delta`` added to the product. Both are computed here by autograd on
a model that exposes ``alpha`` and ``delta``, independently of the converter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads

import gradgraph
from gradgraph import EdgeKind

DTYPE = torch.float64


class GatedResidual(nn.Module):
    """``head(h + down(silu(gate(h)) * up(h)))`` with ``h = tanh(inp(x))``; ``x`` is
    ``[b, d_in]`` or ``[b, T, d_in]`` (tokens, mean-pooled before the head).

    ``alpha`` (``[*x.shape[:-1], d]``) scales the skip and ``delta`` (``[*x.shape[:-1], hidden]``)
    is added to the product; the defaults (ones, zeros) leave the function as written, and
    the converter sees the forward without them.
    """

    def __init__(self, d_in: int = 3, d: int = 4, hidden: int = 5):
        super().__init__()
        self.inp, self.gate, self.up = nn.Linear(d_in, d), nn.Linear(d, hidden), nn.Linear(d, hidden)
        self.down, self.head = nn.Linear(hidden, d), nn.Linear(d, 2)

    def forward(self, x, alpha=None, delta=None):
        h = torch.tanh(self.inp(x))
        p = F.silu(self.gate(h)) * self.up(h)
        if delta is not None:
            p = p + delta
        r = (h if alpha is None else alpha * h) + self.down(p)
        out = self.head(r)
        return out.mean(1) if x.dim() == 3 else out


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


def edges_of(graph, kind):
    src, dst = graph.edge_index[:, graph.edge_kind == kind]
    return src, dst


@pytest.mark.parametrize("tokens", [False, True], ids=["datapoints", "tokens"])
def test_residual_and_gate_edge_components_are_gradients(tokens):
    """Checked to fail: with the residual / gate edges' pairs reversed or shifted by one
    position (in ``binary``, ``convert/trace/rules_elementwise.py``), or with one of the two
    edge sets dropped, the comparisons below (or the edge counts) fail."""
    torch.manual_seed(3)
    model = GatedResidual().to(DTYPE)
    shape = (5, 3, 3) if tokens else (5, 3)
    inputs, targets = torch.randn(*shape, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    assert_exact_per_sample_grads(model, inputs, targets, squared_error)  # the factors themselves
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)

    alpha = torch.ones(*shape[:-1], 4, dtype=DTYPE, requires_grad=True)
    delta = torch.zeros(*shape[:-1], 5, dtype=DTYPE, requires_grad=True)
    # datapoints do not interact: the summed loss's gradient at a datapoint's own alpha/delta is its own
    d_alpha, d_delta = torch.autograd.grad(squared_error(model(inputs, alpha, delta), targets).sum(), (alpha, delta))

    names = graph.param_names
    src, dst = edges_of(graph, EdgeKind.RESIDUAL)
    assert src.numel() == 4
    # which component holds which (datapoint, token): matched by the value of h itself
    with torch.no_grad():
        h = torch.tanh(model.inp(inputs)).reshape(-1, 4)  # [b·T, d], rows (datapoint, token)
    h_nodes = src[graph.position[src].argsort()]
    component_of = [int(torch.nonzero((graph.act[h_nodes].T - row).abs().amax(1) < 1e-14)[0, 0]) for row in h]
    assert len(set(component_of)) == h.shape[0]

    for u, v in zip(src.tolist(), dst.tolist()):
        assert names[int(graph.node_param[u])] == "inp.bias" and names[int(graph.node_param[v])] == "down.bias"
        j = int(graph.position[v])
        assert int(graph.position[u]) == j
        per_component = (graph.act[u] * graph.grad[v])[component_of]  # rows (datapoint, token)
        torch.testing.assert_close(per_component, d_alpha[..., j].reshape(-1), atol=1e-12, rtol=0)

    src, dst = edges_of(graph, EdgeKind.GATE)
    assert src.numel() == 5
    for u, v in zip(src.tolist(), dst.tolist()):
        assert names[int(graph.node_param[u])] == "gate.bias" and names[int(graph.node_param[v])] == "up.bias"
        j = int(graph.position[v])
        assert int(graph.position[u]) == j
        expected = graph.act[u, component_of] * d_delta[..., j].reshape(-1)
        torch.testing.assert_close(graph.grad[v, component_of], expected, atol=1e-12, rtol=0)
