"""GradGraph batching and networkx export; permutation actions on models and graphs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_same_graph, build_mlp, mlp_specs
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import (
    edge_permutation,
    move_values,
    permute_components,
    permute_hidden,
    permute_nodes,
    random_hidden_perms,
    random_node_permutation,
)

def output_graph(model: nn.Module, inputs: torch.Tensor) -> gradgraph.GradGraph:
    return gradgraph.to_graph(model, inputs)


def random_graph(widths, activations, biases, seed, batch=5):
    widths = list(widths[:-1]) + [1]
    model = build_mlp(widths, activations, biases, seed=seed)
    inputs = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, inputs, gradgraph.to_graph(model, inputs)


@settings(max_examples=30, deadline=None)
@given(spec=mlp_specs(max_depth=5, max_width=12), seed=st.integers(0, 1000))
def test_converting_a_permuted_model_gives_the_permuted_graph(spec, seed):
    model, inputs, graph = random_graph(*spec)
    perms = random_hidden_perms(model, torch.Generator().manual_seed(seed))
    permuted_model = permute_hidden(model, perms)

    torch.testing.assert_close(permuted_model(inputs), model(inputs), atol=1e-12, rtol=0)
    assert_same_graph(gradgraph.to_graph(permuted_model, inputs), permute_hidden(graph, perms))


@settings(max_examples=20, deadline=None)
@given(spec=mlp_specs(max_depth=4, max_width=10), seed=st.integers(0, 1000))
def test_random_node_permutation_is_a_symmetry_of_the_graph(spec, seed):
    _, _, graph = random_graph(*spec)
    node_perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
    permuted = permute_nodes(graph, node_perm)
    # Per-sample gradients are the same multiset: each moved edge keeps its gradient.
    src, dst = graph.edge_index
    edge_grads = graph.act[src] * graph.grad[dst]
    src, dst = permuted.edge_index
    moved = move_values(edge_grads, edge_permutation(graph, node_perm))
    torch.testing.assert_close(permuted.act[src] * permuted.grad[dst], moved, atol=1e-14, rtol=0)
    # Fixed nodes (inputs, outputs) do not move.
    fixed = graph.perm_group < 0
    assert torch.equal(node_perm[fixed], torch.nonzero(fixed).flatten())


def test_non_symmetries_are_rejected():
    model = build_mlp([2, 3, 3, 1], ["relu", "tanh", "none"], [True, True, True])
    graph = output_graph(model, torch.randn(4, 2, dtype=torch.float64))
    swap_layers = torch.arange(graph.num_nodes)
    swap_layers[[2, 5]] = swap_layers[[5, 2]]  # a neuron of hidden layer 1 with one of layer 2
    with pytest.raises(GradGraphError, match="different 'layer'"):
        permute_nodes(graph, swap_layers)
    with pytest.raises(GradGraphError, match="permutation of range"):
        permute_nodes(graph, torch.zeros(graph.num_nodes, dtype=torch.long))
    with pytest.raises(GradGraphError, match="one per hidden layer"):
        permute_hidden(model, [torch.arange(3)])
    with pytest.raises(GradGraphError, match="permutation of range\\(3\\)"):
        permute_hidden(model, [torch.arange(3), torch.tensor([0, 0, 1])])


def test_permuting_components_changes_nothing_but_order():
    model = build_mlp([3, 4, 1], ["relu", "none"], [True, True])
    graph = output_graph(model, torch.randn(6, 3, dtype=torch.float64))
    perm = torch.randperm(6)
    permuted = permute_components(graph, perm)
    assert torch.equal(permuted.act, graph.act[:, perm]) and torch.equal(permuted.grad, graph.grad[:, perm])
    assert torch.equal(permuted.component_sample, perm)
    for name, value in graph.per_sample_grads().items():
        # components remember their datapoint, so per-sample gradients stay indexed by datapoint
        torch.testing.assert_close(permuted.per_sample_grads()[name], value, atol=0, rtol=0)
        torch.testing.assert_close(permuted.mean_grad()[name], graph.mean_grad()[name], atol=1e-14, rtol=0)
    with pytest.raises(GradGraphError, match="permutation of range\\(6\\)"):
        permute_components(graph, torch.arange(5))


def test_batches_of_different_architectures_round_trip():
    inputs = torch.randn(7, 3, dtype=torch.float64)
    graphs = [
        output_graph(build_mlp([3, 5, 1], ["relu", "none"], [True, True], seed=1), inputs),
        output_graph(build_mlp([3, 2, 4, 1], ["tanh", "sine", "none"], [False, True, True], seed=2), inputs),
        output_graph(build_mlp([3, 1], ["none"], [False], seed=3), inputs),
    ]
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == 3
    assert batch.act.shape == (sum(g.num_nodes for g in graphs), 7)
    assert batch.component_sample.shape == (3, 7)
    # edge_index is shifted per graph, slot indices are not
    assert int(batch.edge_index.max()) == batch.num_nodes - 1
    assert torch.equal(batch.edge_param_pos, torch.cat([g.edge_param_pos for g in graphs]))
    for original, restored in zip(graphs, batch.to_data_list()):
        assert_same_graph(original, restored, atol=0)
        for name, value in original.per_sample_grads().items():
            assert torch.equal(restored.per_sample_grads()[name], value)
    loaded = next(iter(DataLoader(graphs, batch_size=3)))
    assert torch.equal(loaded.edge_index, batch.edge_index)
    with pytest.raises(GradGraphError, match="to_data_list"):
        batch.per_sample_grads()
    # a node permutation of a batch shuffles each graph's hidden neurons separately
    node_perm = random_node_permutation(batch, torch.Generator().manual_seed(0))
    assert torch.equal(batch.batch[node_perm], batch.batch)
    permute_nodes(batch, node_perm)


def test_networkx_export_counts_and_attributes():
    model = build_mlp([3, 4, 2], ["relu", "none"], [True, False])
    graph = gradgraph.to_graph(
        model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64),
        loss_fn=lambda out, target: ((out - target) ** 2).sum(1),
    )
    exported = graph.to_networkx()
    assert exported.number_of_nodes() == 9 and exported.number_of_edges() == 3 * 4 + 4 * 2
    assert exported.nodes[4]["bias"] == pytest.approx(float(model[0].bias[1]))
    assert exported.nodes[4]["layer"] == 1
    weight = exported.edges[0, 3]["weight"]
    assert weight == pytest.approx(float(model[0].weight[0, 0]))
    mean_grad = graph.mean_grad()["0.weight"][0, 0]
    assert exported.edges[0, 3]["mean_grad"] == pytest.approx(float(mean_grad))


def test_edge_components_are_the_rank_one_factors():
    model = build_mlp([2, 3, 1], ["tanh", "none"], [True, True])
    graph = output_graph(model, torch.randn(4, 2, dtype=torch.float64))
    components = graph.edge_components()
    src, dst = graph.edge_index
    assert torch.equal(components[..., 0], graph.act[src]) and torch.equal(components[..., 1], graph.grad[dst])
    per_sample = graph.per_sample_grads()
    first_layer = (components[..., 0] * components[..., 1])[:6].T.reshape(4, 3, 2)
    torch.testing.assert_close(first_layer, per_sample["0.weight"], atol=0, rtol=0)


def test_to_parameters_validates_shapes():
    model = build_mlp([2, 3, 1], ["tanh", "none"], [True, True])
    graph = output_graph(model, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(GradGraphError, match=r"edge_values must have shape \[E\] or \[E, k\] with E=9, got \[8\]"):
        graph.to_parameters(torch.zeros(8))
    with pytest.raises(GradGraphError, match="node_values"):
        graph.to_parameters(torch.zeros(9), torch.zeros(3))


def test_graphs_sharing_an_architectures_tensors_share_their_weight_blocks_until_one_is_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    first, second = (gradgraph.to_graph(model, inputs, targets, loss_fn) for _ in range(2))
    assert first.edge_param is second.edge_param  # one plan: the structure tensors are shared
    assert first._parameter_blocks() is second._parameter_blocks()
    # a structure tensor changed in place (its version moves) is not trusted to match any more
    third = gradgraph.to_graph(model, inputs, targets, loss_fn)
    third.edge_param_pos.add_(0)
    assert third._parameter_blocks() is not first._parameter_blocks()
    for got, expected in ((second.per_sample_grads(), first.per_sample_grads()),
                          (third.mean_grad(), first.mean_grad())):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0)
