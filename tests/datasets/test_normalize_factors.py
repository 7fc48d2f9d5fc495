"""``gradgraph.datasets.NormalizeFactors``: unit RMS per layer, scales kept as log features,
commutes with hidden-neuron and component permutations (float64).

Failing checks: an RMS taken over the whole graph instead of per layer fails the unit-RMS test
(the layers of this MLP have different scales); writing into the input graph's tensors fails the
test that the input is left as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.datasets import NormalizeFactors
from gradgraph.symmetry import permute_components, permute_hidden, random_hidden_perms

DTYPE = torch.float64


def _graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    with torch.no_grad():
        model[2].weight.mul_(30.0)  # layers of very different scales
    inputs = 100 * torch.randn(8, 4, dtype=DTYPE)
    labels = torch.randint(0, 3, (8,))
    loss_fn = lambda output, target: F.cross_entropy(output, target, reduction="none")  # noqa: E731
    return model, gradgraph.to_graph(model, inputs, labels, loss_fn), (inputs, labels, loss_fn)


def _rms(values: torch.Tensor) -> torch.Tensor:
    return values.square().mean().sqrt()


def test_every_layer_and_parameter_has_unit_rms_and_the_input_is_untouched():
    _, graph, _ = _graph()
    before = {key: graph[key].clone() for key in ("act", "grad", "x", "edge_attr")}
    normalised = NormalizeFactors()(graph)
    for key, value in before.items():
        assert torch.equal(graph[key], value), key
    for layer in torch.unique(graph.layer):
        nodes = graph.layer == layer
        for key in ("act", "grad"):
            if _rms(graph[key][nodes]) > 0:
                torch.testing.assert_close(_rms(normalised[key][nodes]), torch.tensor(1.0, dtype=DTYPE))
    for param in torch.unique(graph.edge_param[graph.edge_param >= 0]):
        torch.testing.assert_close(_rms(normalised.edge_attr[graph.edge_param == param, 0]),
                                   torch.tensor(1.0, dtype=DTYPE))
    for param in torch.unique(graph.node_param[graph.node_param >= 0]):
        torch.testing.assert_close(_rms(normalised.x[graph.node_param == param, 0]), torch.tensor(1.0, dtype=DTYPE))
    assert normalised.x.shape == graph.x.shape and normalised.edge_attr.shape == graph.edge_attr.shape


def test_log_scales_recover_the_original_values():
    _, graph, _ = _graph()
    normalised = NormalizeFactors(log_scales=True)(graph)
    assert normalised.x.shape == (graph.num_nodes, 4) and normalised.edge_attr.shape == (graph.edge_index.shape[1], 2)
    torch.testing.assert_close(normalised.act * normalised.x[:, 1:2].exp(), graph.act, rtol=1e-12, atol=0)
    torch.testing.assert_close(normalised.grad * normalised.x[:, 2:3].exp(), graph.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(normalised.edge_attr[:, 0] * normalised.edge_attr[:, 1].exp(), graph.edge_attr[:, 0],
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(normalised.x[:, 0] * normalised.x[:, 3].exp(), graph.x[:, 0], rtol=1e-12, atol=0)


def test_commutes_with_hidden_and_component_permutations():
    model, graph, (inputs, labels, loss_fn) = _graph()
    transform = NormalizeFactors(log_scales=True)
    perms = random_hidden_perms(model, torch.Generator().manual_seed(1))
    permuted_graph = gradgraph.to_graph(permute_hidden(model, perms), inputs, labels, loss_fn)
    expected = permute_hidden(transform(graph), perms)
    got = transform(permuted_graph)
    for key in ("act", "grad", "x", "edge_attr"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12, msg=key)
    order = torch.randperm(graph.num_components, generator=torch.Generator().manual_seed(2))
    shuffled = transform(permute_components(graph, order))
    torch.testing.assert_close(shuffled.act, transform(graph).act[:, order], rtol=0, atol=1e-14)
    torch.testing.assert_close(shuffled.x, transform(graph).x, rtol=0, atol=1e-14)
