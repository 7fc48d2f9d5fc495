"""per_graph_parameters: one forward over a batch of graphs equals one call per graph with its own parameters."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch_geometric.data import Batch

from gradgraph import GradGraphError, to_graph
from gradgraph.nn import GradMetaNet
from gradgraph.optim.per_graph import per_graph_parameters


def _graphs(count: int) -> list:
    graphs = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        graphs.append(to_graph(model, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none")))
    return graphs


def test_one_batched_forward_equals_a_call_per_graph_with_its_own_parameters():
    torch.manual_seed(0)
    net = GradMetaNet(8, component_channels=4, num_component_layers=1, num_node_layers=1, product_channels=4,
                      edge_out_channels=3, node_out_channels=3, graph_out_channels=2).double()
    graphs = _graphs(3)
    sets = []
    for index in range(3):  # three different parameter sets (every tensor perturbed)
        generator = torch.Generator().manual_seed(10 + index)
        sets.append({name: p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                     for name, p in net.named_parameters()})
    stacked = {name: torch.stack([own[name] for own in sets]) for name in sets[0]}
    with per_graph_parameters(net, stacked, 3) as batched:
        out = batched(Batch.from_data_list(graphs))
    edges = graphs[0].edge_index.shape[1]
    nodes = graphs[0].num_nodes
    for index, (graph, own) in enumerate(zip(graphs, sets)):
        alone = functional_call(net, own, (Batch.from_data_list([graph]),))
        torch.testing.assert_close(out.edge[index * edges:(index + 1) * edges], alone.edge, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.node[index * nodes:(index + 1) * nodes], alone.node, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.graph[index:index + 1], alone.graph, rtol=1e-12, atol=1e-14)
    assert not any("forward" in vars(module) for module in net.modules())  # restored after the block
    plain = net(Batch.from_data_list(graphs[:1]))
    torch.testing.assert_close(plain.edge, functional_call(net, dict(net.named_parameters()),
                                                           (Batch.from_data_list(graphs[:1]),)).edge)


def test_refuses_what_it_cannot_run_per_graph():
    module = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    stacked = {name: torch.stack([p.detach()] * 2) for name, p in module.named_parameters()}
    with pytest.raises(GradGraphError, match=r"1 \(LayerNorm\) holds parameters"):
        with per_graph_parameters(module, stacked, 2):
            pass
    assert "forward" not in vars(module[0])  # the Linear patched before the refusal is restored
    linear = nn.Linear(3, 2)
    stacked = {name: torch.stack([p.detach()] * 2) for name, p in linear.named_parameters()}
    with per_graph_parameters(linear, stacked, 2):
        with pytest.raises(GradGraphError, match=r"shape \(3, 3\).*not graph-major over 2"):
            linear(torch.randn(3, 3))
    with pytest.raises(GradGraphError, match="missing \\['bias'\\]"):
        with per_graph_parameters(linear, {"weight": stacked["weight"]}, 2):
            pass
    with pytest.raises(GradGraphError, match="expected"):
        with per_graph_parameters(linear, {name: value[:1] for name, value in stacked.items()}, 2):
            pass


def test_an_input_that_is_not_graph_major_is_refused_naming_its_module_in_full():
    """A ``Linear`` (the module itself: named by its class) and an ``Embedding`` inside a
    ``Sequential`` (named by its path) refuse an input whose first axis is not ``G`` row blocks,
    and an embedding a 0-d index; messages in full. Checked against
    ``x__linear__mutmut_8`` and ``x__embedding__mutmut_6`` (the owner passed as ``None``: the
    message named no module), run with ``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``."""
    linear = nn.Linear(3, 2).double()
    stacked = {name: torch.stack([p.detach()] * 2) for name, p in linear.named_parameters()}
    with per_graph_parameters(linear, stacked, 2):
        with pytest.raises(GradGraphError, match="^" + re.escape(
                "per_graph_parameters: Linear (Linear) got an input of shape (3, 3) whose first axis is not "
                "graph-major over 2 graphs") + "$"):
            linear(torch.randn(3, 3, dtype=torch.float64))
    table = nn.Sequential(nn.Embedding(4, 2))
    stacked = {"0.weight": torch.randn(3, 4, 2)}
    with per_graph_parameters(table, stacked, 3):
        with pytest.raises(GradGraphError, match="^" + re.escape(
                "per_graph_parameters: 0 (Embedding) got an input of shape (4,) whose first axis is not "
                "graph-major over 3 graphs") + "$"):
            table(torch.tensor([0, 1, 2, 3]))
        with pytest.raises(GradGraphError, match="^" + re.escape(
                "per_graph_parameters: 0 (Embedding) got an input of shape () whose first axis is not "
                "graph-major over 3 graphs") + "$"):
            table(torch.tensor(1))
        looked_up = table(torch.tensor([[0, 3], [1, 1], [2, 0]]))  # graph g's rows read table g
    expected = torch.stack([stacked["0.weight"][g][index] for g, index in enumerate([[0, 3], [1, 1], [2, 0]])])
    assert torch.equal(looked_up, expected)
