"""Model pieces the tasks share (gradgraph_lab.tasks.models), against independent ground truths:
the mean gradient against autograd on the mean loss, per-network outputs against running each
network alone, the GradMetaNet builder against the sizes it was given."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from strategies import build_mlp, mlp_specs
from torch_geometric.data import Batch

import gradgraph
from gradgraph_lab.tasks.models import build_gradmetanet, mean_gradient, per_graph_outputs


def squared_error(output, target):
    return ((output - target) ** 2).sum(dim=1)


def converted(widths, activations, biases, seed, batch=6):
    model = build_mlp(widths, activations, biases, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return model, inputs, targets, gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)


@settings(max_examples=10, deadline=None)
@given(spec=mlp_specs(max_depth=4, max_width=6))
def test_mean_gradient_is_the_gradient_of_the_mean_loss(spec):
    model, inputs, targets, graph = converted(*spec)
    edge, node = mean_gradient(graph.act, graph.grad, graph.edge_index)
    assert edge.shape == (graph.edge_index.shape[1],) and node.shape == (graph.num_nodes,)
    squared_error(model(inputs), targets).mean().backward()
    from_factors = graph.to_parameters(edge, node)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(from_factors[name], parameter.grad, atol=1e-10, rtol=1e-10)


def test_mean_gradient_of_stacked_networks_is_each_networks_own():
    graphs = [converted([3, 4, 2], ["relu", "none"], [True, True], seed)[3] for seed in range(3)]
    act, grad = torch.stack([g.act for g in graphs]), torch.stack([g.grad for g in graphs])  # [G, N, B]
    edge, node = mean_gradient(act, grad, graphs[0].edge_index)
    assert edge.shape == (3, graphs[0].edge_index.shape[1]) and node.shape == (3, graphs[0].num_nodes)
    for index, graph in enumerate(graphs):
        own_edge, own_node = mean_gradient(graph.act, graph.grad, graph.edge_index)
        torch.testing.assert_close(edge[index], own_edge, atol=0, rtol=0)
        torch.testing.assert_close(node[index], own_node, atol=0, rtol=0)


@dataclass
class Sizes:
    hidden_channels: int = 6
    component_channels: int = 3
    num_component_layers: int = 2
    num_node_layers: int = 3
    product_channels: int = 5
    component_edge_messages: bool = False


def test_per_graph_outputs_are_each_networks_outputs_run_alone():
    graphs = [converted([2, 5, 3, 1], ["tanh", "relu", "none"], [True, False, True], seed)[3] for seed in range(4)]
    torch.manual_seed(0)
    net = build_gradmetanet(Sizes()).double().eval()
    with torch.no_grad():
        edge, node = per_graph_outputs(net(Batch.from_data_list(graphs)), len(graphs))
        assert edge.shape == (4, graphs[0].edge_index.shape[1]) and node.shape == (4, graphs[0].num_nodes)
        for index, graph in enumerate(graphs):
            alone = net(graph)
            torch.testing.assert_close(edge[index], alone.edge[:, 0], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(node[index], alone.node[:, 0], atol=1e-12, rtol=1e-12)


def test_build_gradmetanet_takes_every_size_from_the_config():
    sizes = Sizes(component_edge_messages=True)
    net = build_gradmetanet(sizes, component_out_channels=2, edge_out_channels=3)
    assert (net.hidden_channels, net.component_channels) == (6, 3)
    assert len(net.component_layers) == 2 and len(net.node_layers) == 3
    assert all(layer.edge_messages for layer in net.component_layers)
    assert net.decoder.product_channels == 5 and net.edge_out_channels == 3
    assert net.component_readout is not None  # the extra outputs are passed on

    weights_only = build_gradmetanet(Sizes(), components=False)
    assert weights_only.num_component_layers == 0 and len(weights_only.component_layers) == 0
    assert weights_only.decoder.component_channels is None and len(weights_only.node_layers) == 3
    assert not any(layer.edge_messages for layer in build_gradmetanet(Sizes()).component_layers)
