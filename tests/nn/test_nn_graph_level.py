"""Graph-level use of GradMetaNet / GradMetaNet++: no per-weight heads unless asked, parameters
that exist before a first forward, and clear errors for graphs the model was not built for."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import GradMetaNet, GradMetaNetConfig, GradMetaNetPlusPlus
from gradgraph.testing import assert_equivariant
from strategies import build_mlp


def mlp_graph(seed: int, widths=(3, 5, 4, 2), dtype=torch.float64) -> gradgraph.GradGraph:
    model = build_mlp(list(widths), ["relu", "tanh", "none"][: len(widths) - 1], [True] * (len(widths) - 1), seed=seed)
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, widths[0], generator=generator, dtype=dtype)
    targets = torch.randn(5, widths[-1], generator=generator, dtype=dtype)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))


@pytest.mark.parametrize("model_class", [GradMetaNet, GradMetaNetPlusPlus])
def test_graph_prediction_builds_no_per_weight_heads_unless_asked(model_class):
    """Fails if ``for_graph_prediction`` keeps the constructor's default edge/node heads."""
    graphs = [mlp_graph(0), mlp_graph(1, widths=(3, 6, 2))]
    model = model_class.for_graph_prediction(3, 8).double()
    assert model.decoder is None and model.readout is not None
    out = model(Batch.from_data_list(graphs))
    assert out.edge is None and out.node is None and out.graph.shape == (2, 3)
    errors = assert_equivariant(model, graphs, num_trials=2, atol=1e-9, rtol=1e-9)
    assert "node permutation" in errors
    asked = model_class.for_graph_prediction(3, 8, edge_out_channels=2)
    assert asked.decoder is not None and asked.edge_out_channels == 2 and asked.node_out_channels == 0
    with pytest.raises(GradGraphError, match="graph_out_channels must be >= 1"):
        model_class.for_graph_prediction(0)


@pytest.mark.parametrize("model_class", [GradMetaNet, GradMetaNetPlusPlus])
def test_parameters_exist_before_a_first_forward(model_class):
    """Counting parameters and building an optimizer work right after construction, and the
    first forward adds none. Fails with lazy input layers (``Linear(-1, ...)``, the old default):
    ``numel()`` of an uninitialised parameter raises."""
    model = model_class(8, graph_out_channels=1)
    count = sum(parameter.numel() for parameter in model.parameters())
    torch.optim.Adam(model.parameters())
    model.double()(mlp_graph(2))
    assert sum(parameter.numel() for parameter in model.parameters()) == count
    lazy = model_class(8, node_in_channels=-1)  # PyG's lazy opt-in: inferred at the first call
    with pytest.raises(ValueError):
        sum(parameter.numel() for parameter in lazy.parameters())


def test_gradmetanet_config_builds_the_same_model_and_round_trips():
    """``from_config`` takes every size from the config and ``.config`` gives it back."""
    config = GradMetaNetConfig(12, component_channels=5, num_component_layers=3, num_node_layers=1,
                               product_channels=7, component_edge_messages=False)
    model = GradMetaNet.from_config(config, graph_out_channels=2)
    assert model.config == config
    assert len(model.component_layers) == 3 and len(model.node_layers) == 1
    assert not any(layer.edge_messages for layer in model.component_layers)
    assert model.decoder.product_channels == 7 and model.readout.out_channels == 2


@pytest.mark.parametrize("model_class", [GradMetaNet, GradMetaNetPlusPlus])
def test_graphs_the_model_was_not_built_for_get_a_clear_error(model_class):
    """A float64 graph into a float32 model (and the reverse), and extra feature columns, are a
    GradGraphError naming the field and what to do. Fails without the check: torch raises a
    bare ``mat1 and mat2`` RuntimeError deep in a Linear."""
    graph = mlp_graph(3)
    with pytest.raises(GradGraphError, match=r"graph.x is torch.float64 but the model's parameters are torch.float32"):
        model_class(8)(graph)
    with pytest.raises(GradGraphError, match=r"torch.float32 but the model's parameters are torch.float64"):
        model_class(8).double()(mlp_graph(3, dtype=torch.float32))
    wider = graph.clone()
    wider.edge_attr = torch.cat([graph.edge_attr, graph.edge_attr], dim=1)
    with pytest.raises(GradGraphError, match=r"edge_attr has 2 feature columns .* pass edge_in_channels=2"):
        model_class(8).double()(wider)
    assert model_class(8, edge_in_channels=2).double()(wider).edge.shape == (graph.edge_index.shape[1], 1)
    with pytest.raises(GradGraphError, match="input widths must be"):
        model_class(8, node_in_channels=0)
