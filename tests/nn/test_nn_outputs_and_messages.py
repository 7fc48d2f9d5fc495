"""GradMetaNet's outputs written back per graph, its representation and its error messages,
where the mutation campaign on ``nn/`` found them untested (docs/mutation.md). Messages are
matched in full, as a user reads them. Each test's docstring names the mutants it was checked
against (``mutmut show NAME`` in ``.mutation/nn/``).
"""

from __future__ import annotations

import re

import pytest
import torch
from strategies import build_mlp
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import GradMetaNet, outputs_to_parameters

DTYPE = torch.float64


def graph_of(widths, activations, seed, batch=4):
    model = build_mlp(widths, activations, [True] * len(activations), seed=seed)
    inputs = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return gradgraph.to_graph(model, inputs)


def test_outputs_to_parameters_writes_each_graph_of_a_batch_as_its_own_graph_would():
    """Graph by graph, the Batch's write-back equals ``to_parameters`` of the model's output on
    that graph alone, one output column squeezed and two kept, and with no node output
(checked to fail with the node values read when there are none:
``x_outputs_to_parameters__mutmut_31``); a model without edge outputs
    gets a message naming the option (checked to fail with the message dropped or changed:
    ``x_outputs_to_parameters__mutmut_2``-``4``)."""
    graphs = [graph_of([3, 4, 1], ["relu", "none"], seed=1), graph_of([3, 5, 5, 1], ["tanh", "relu", "none"], seed=2)]
    batch = Batch.from_data_list(graphs)
    for channels in (1, 2):
        torch.manual_seed(0)
        model = GradMetaNet(8, edge_out_channels=channels, node_out_channels=channels).to(DTYPE)
        written = outputs_to_parameters(batch, model(batch))
        assert len(written) == 2
        for graph, values in zip(graphs, written):
            alone = model(graph)
            edge, node = (alone.edge[:, 0], alone.node[:, 0]) if channels == 1 else (alone.edge, alone.node)
            expected = graph.to_parameters(edge, node)
            assert set(values) == set(expected)
            for name, value in expected.items():
                torch.testing.assert_close(values[name], value, atol=1e-12, rtol=0, msg=name)
            [single] = outputs_to_parameters(graph, alone)
            for name, value in expected.items():
                torch.testing.assert_close(single[name], value, atol=0, rtol=0, msg=name)
    # without node outputs only the weights are written (biases get no value)
    edges_only = GradMetaNet(8, edge_out_channels=1, node_out_channels=0).to(DTYPE)
    out = edges_only(batch)
    assert out.node is None
    for graph, values in zip(graphs, outputs_to_parameters(batch, out)):
        expected = graph.to_parameters(edges_only(graph).edge[:, 0], None)
        assert set(values) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(values[name], value, atol=1e-12, rtol=0, msg=name)
    no_edges = GradMetaNet(8, edge_out_channels=0, node_out_channels=0, graph_out_channels=1).to(DTYPE)
    message = "outputs_to_parameters: the model has no edge output (edge_out_channels=0)"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        outputs_to_parameters(batch, no_edges(batch))


def test_reprs_name_every_setting():
    """Whole strings: a changed field name, value or separator fails."""
    from gradgraph.nn import ComponentConv, ComponentPool, InvariantReadout, NodeConv

    assert repr(GradMetaNet(8)) == (
        "GradMetaNet(hidden=8, component=8, component_layers=2, node_layers=2, direction='both', "
        "out=(edge=1, node=1, graph=0, component=0))"
    )
    model = GradMetaNet(8, component_channels=4, num_component_layers=1, num_node_layers=3, direction="forward",
                        graph_out_channels=2, edge_out_channels=0, node_out_channels=0)
    assert repr(model) == (
        "GradMetaNet(hidden=8, component=4, component_layers=1, node_layers=3, direction='forward', "
        "out=(edge=0, node=0, graph=2, component=0))"
    )
    assert repr(ComponentPool(["mean", "max"])) == "ComponentPool(aggregations=['mean', 'max'])"
    assert repr(NodeConv(3, 4, 5, direction="forward")) == (
        "NodeConv(3, 4, edge_dim=5, direction='forward', aggr='mean', edge_messages=True)"
    )
    assert repr(ComponentConv(3, 4, 5)) == (
        "ComponentConv(3, 4, edge_dim=5, direction='both', aggr='mean', edge_messages=True)"
    )
    assert repr(InvariantReadout(4, 2)) == "InvariantReadout(4, 2)"


def test_component_pool_equals_the_direct_formulas_in_the_order_asked():
    """Per neuron, over its components: mean, sum, max and the population standard deviation
    (with the documented 1e-8 under the root), concatenated in the order given."""
    from gradgraph.nn import ComponentPool

    torch.manual_seed(0)
    h = torch.randn(5, 7, 3, dtype=DTYPE)
    direct = {
        "mean": h.mean(1),
        "sum": h.sum(1),
        "max": h.max(1).values,
        "std": (h.var(1, unbiased=False) + 1e-8).sqrt(),
    }
    for order in (["mean", "sum", "max", "std"], ["std", "max"], ["sum"]):
        expected = torch.cat([direct[name] for name in order], dim=-1)
        torch.testing.assert_close(ComponentPool(order)(h), expected, atol=1e-12, rtol=0)
    constant = torch.ones(2, 4, 1, dtype=DTYPE)
    floor = torch.full((2, 1), 1e-4, dtype=DTYPE)  # sqrt(0 + 1e-8)
    torch.testing.assert_close(ComponentPool(["std"])(constant), floor, atol=1e-15, rtol=0)
    for bad in ([], ["median"], ["mean", "median"]):
        message = ("ComponentPool: aggregations must be a non-empty subset of ('mean', 'max', 'std', 'sum'), "
                   f"got {tuple(bad)}")
        with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
            ComponentPool(bad)
    message = "ComponentPool: states must have shape [N, B, C]; got [5, 3]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        ComponentPool()(h[:, 0])


def test_invariant_readout_is_its_mlp_on_each_graphs_mean_and_max():
    """Graph by graph: ``mlp([mean of h, max of h])`` over that graph's nodes; bad shapes get
    one message naming the widths."""
    from gradgraph.nn import InvariantReadout

    torch.manual_seed(1)
    readout = InvariantReadout(3, 2, hidden_channels=5).to(DTYPE)
    h = torch.randn(7, 3, dtype=DTYPE)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    expected = torch.stack([
        readout.mlp(torch.cat([h[batch == g].mean(0), h[batch == g].max(0).values])[None])[0] for g in range(3)
    ])
    torch.testing.assert_close(readout(h, batch, 3), expected, atol=1e-12, rtol=0)
    message = "InvariantReadout: expected h [N, 3] and batch [N]; got [7, 4] and [7]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        readout(torch.randn(7, 4, dtype=DTYPE), batch, 3)


def test_layer_and_model_messages_in_full():
    from gradgraph.nn import ComponentConv, GraphContext, NodeConv

    graph = graph_of([3, 5, 1], ["relu", "none"], seed=3)
    context = GraphContext.from_graph(graph, torch.zeros(graph.edge_index.shape[1], 4, dtype=DTYPE))
    message = (f"NodeConv: node states must have shape [N, C]; got [{graph.num_nodes}, 2, 3] "
               "(use ComponentConv for per-component states [N, B, C])")
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        NodeConv(3, 3, 4).to(DTYPE)(torch.zeros(graph.num_nodes, 2, 3, dtype=DTYPE), context)
    message = "ComponentConv: states must have shape [N, B, C] (neuron, component, channel); got [9, 3]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        ComponentConv(3, 3, 4).to(DTYPE)(torch.zeros(9, 3, dtype=DTYPE), context)
    message = "GradMetaNet: component outputs need num_component_layers >= 1"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        GradMetaNet(8, num_component_layers=0, component_out_channels=1)
