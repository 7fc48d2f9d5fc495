"""The readers of a model's structure and the deprecated entry points (issue 27's restructure).

``mlp_layers`` reads a chain from the trace (the reader of every conversion): the layers and
labels it finds must be the graph's, and what is no chain is refused by module path. The
former per-family entry points are aliases of ``to_graph`` that warn. Each test fails on a
reader that labels by module type alone (the custom forwards) or accepts any trace (the
refusals), and on aliases that convert differently or stay silent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph import UnsupportedModuleError
from gradgraph.convert import mlp_layers
from gradgraph.graph import ActivationKind, NodeKind
from gradgraph.modules import Sine

DTYPE = torch.float64


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)


class Tanh(TwoLayers):
    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class MethodRelu(TwoLayers):
    def forward(self, x):
        return self.second(self.first(x).relu())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.second(x + torch.relu(self.first(x)))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.relu(self.layer(x)))


class Scaled(TwoLayers):
    def forward(self, x):
        return self.second(2 * torch.relu(self.first(x)))


class TwoActivations(TwoLayers):
    def forward(self, x):
        return self.second(torch.tanh(torch.relu(self.first(x))))


CHAINS = {
    "sequential": (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4, 5), Sine(),
                                         nn.Linear(5, 2)),
                   [("0", ActivationKind.RELU), ("3", ActivationKind.SINE), ("5", ActivationKind.IDENTITY)]),
    "nested": (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh")),
                                     nn.Linear(4, 2, bias=False), nn.LeakyReLU()),
               [("0.0", ActivationKind.GELU), ("1", ActivationKind.LEAKY_RELU)]),
    "tanh_forward": (Tanh, [("first", ActivationKind.TANH), ("second", ActivationKind.IDENTITY)]),
    "method_relu": (MethodRelu, [("first", ActivationKind.RELU), ("second", ActivationKind.IDENTITY)]),
}


@pytest.mark.parametrize("case", sorted(CHAINS))
def test_mlp_layers_reads_the_layers_and_labels_the_graph_has(case):
    build, expected = CHAINS[case]
    torch.manual_seed(0)
    model = build().to(DTYPE).eval()
    layers = mlp_layers(model)
    assert [(layer.name, layer.activation) for layer in layers] == expected
    assert all(layer.linear is dict(model.named_modules())[layer.name] for layer in layers)
    graph = gradgraph.to_graph(model, torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,)),
                               lambda output, target: F.cross_entropy(output, target, reduction="none"))
    hidden = [int(kind) for kind in graph.activation[graph.node_kind == int(NodeKind.HIDDEN)].unique()]
    assert sorted(hidden) == sorted({int(kind) for _, kind in expected[:-1]})


@pytest.mark.parametrize(("build", "where", "reason"), [
    (Residual, "Tensor.add", "combines neurons"),
    (Shared, "layer", "called more than once"),
    (Scaled, "first", "elementwise op other than one named activation"),
    (TwoActivations, "first", "elementwise op other than one named activation"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "1", "combines neurons"),
    (lambda: nn.Sequential(nn.ReLU()), "", "contains no nn.Linear"),
])
def test_mlp_layers_refuses_what_is_no_chain_by_module(build, where, reason):
    with pytest.raises(UnsupportedModuleError, match=reason) as refusal:
        mlp_layers(build())
    assert refusal.value.path == where


def test_mlp_layers_refuses_active_dropout():
    with pytest.raises(UnsupportedModuleError, match="call model.eval"):
        mlp_layers(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)))


@pytest.mark.parametrize("alias", ["convert_mlp", "convert_attention", "convert_traced"])
def test_the_former_entry_points_warn_and_give_to_graphs_graph(alias):
    torch.manual_seed(1)
    if alias == "convert_attention":
        model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).to(DTYPE).eval()  # sequence-first
        inputs = torch.randn(5, 3, 8, dtype=DTYPE)

        def loss_fn(output, target):
            return output.pow(2).sum((0, 2))
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
        inputs = torch.randn(3, 3, dtype=DTYPE)

        def loss_fn(output, target):
            return output.pow(2).sum(1)
    expected = gradgraph.to_graph(model, inputs, None, loss_fn)
    with pytest.warns(DeprecationWarning, match=f"{alias} is deprecated; use gradgraph.to_graph"):
        graph = getattr(gradgraph.convert, alias)(model, inputs, targets=None, loss_fn=loss_fn)
    for key in ("edge_index", "act", "grad", "edge_attr", "x", "perm_group", "node_kind"):
        assert torch.equal(graph[key], expected[key]), key


def test_convert_traced_closure_warns_and_gives_convert_closures_graph():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(3, 3, dtype=DTYPE)
    expected, _ = gradgraph.convert_closure(model, lambda: model(inputs).pow(2).sum(1))
    with pytest.warns(DeprecationWarning, match="convert_traced_closure is deprecated"):
        graph, losses = gradgraph.convert.convert_traced_closure(model, lambda: model(inputs).pow(2).sum(1))
    assert torch.equal(graph.act, expected.act) and torch.equal(graph.grad, expected.grad) and losses.shape == (3,)
