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
