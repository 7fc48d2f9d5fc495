"""The zoo-accuracy experiment: the digits MLP zoo, its predictors' symmetry, the CLI's tiny run.

Failing checks: a statistic that reads a neuron by its position (say the first hidden unit's
weights) instead of a whole layer's distribution breaks the invariance test; splits cut by zoo
member instead of by network put checkpoints of one network on both sides and fail the split
test; a zoo whose networks drew from the global random stream would not train twice the same.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

import gradgraph
from gradgraph.symmetry import permute_hidden, random_hidden_perms
from gradgraph_lab import cli
from gradgraph_lab.tasks.zoo_accuracy import MODEL_NAMES, preset, run_zoo_accuracy
from gradgraph_lab.tasks.zoo_accuracy.data import load_digits_split, load_zoo, train_network
from gradgraph_lab.tasks.zoo_accuracy.models import (
    GraphRegressor,
    ModelConfig,
    gradient_features,
    graph_inputs,
    weight_features,
)
from gradgraph_lab.tasks.zoo_accuracy.run import prepare

TINY = preset("tiny").zoo


def _cross_entropy(output, labels):
    return F.cross_entropy(output, labels, reduction="none")


def test_a_network_trains_the_same_twice_and_keeps_every_checkpoint():
    digits = load_digits_split(TINY)
    first, second = train_network(TINY, 2, digits), train_network(TINY, 2, digits)
    assert len(first) == TINY.num_checkpoints
    for a, b in zip(first, second):
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), name
    assert not all(torch.equal(x, y) for x, y in zip(first[0].parameters(), first[-1].parameters()))


def test_predictors_are_invariant_to_hidden_neuron_permutations_float64():
    digits = load_digits_split(TINY)
    model = train_network(TINY, 1, digits)[-1].double()
    probe, labels = digits.pool_x[:TINY.probe_size].double(), digits.pool_y[:TINY.probe_size]
    permuted = permute_hidden(model, random_hidden_perms(model, torch.Generator().manual_seed(0)))
    assert not torch.equal(model[0].weight, permuted[0].weight)
    graphs = [gradgraph.to_graph(net, probe, labels, _cross_entropy) for net in (model, permuted)]
    for features in (weight_features, gradient_features):
        torch.testing.assert_close(features(graphs[1]), features(graphs[0]), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    regressor = GraphRegressor(ModelConfig(hidden_channels=8, component_channels=4), offset=0.5).double()
    for with_weights in (False, True):
        inputs = [graph_inputs(graph, with_weights, dtype=torch.float64) for graph in graphs]
        for graph in inputs:
            graph.y = torch.zeros(1, 1, dtype=torch.float64)
        regressor.fit_scaling(inputs)
        with torch.no_grad():
            outputs = [regressor(Batch.from_data_list([graph])) for graph in inputs]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)


def test_splits_hold_whole_networks(tmp_path):
    config = replace(preset("tiny"), cache_root=tmp_path)
    data = load_zoo(config.zoo, cache_root=tmp_path, progress=False)
    prepared = prepare(config, data)
    nets = {split: set(data.net_of[index].tolist()) for split, index in prepared.members.items()}
    assert nets == {"train": {0, 1, 2}, "val": {3}, "test": {4, 5}}
    assert all(len(index) == len(nets[split]) * TINY.num_checkpoints for split, index in prepared.members.items())
    torch.testing.assert_close(data.accuracy, torch.cat([graph.y[:, 0] for graph in data.graphs]))


def test_the_tiny_run_reports_every_predictor(tmp_path, capsys):
    code = cli.main(["zoo-accuracy", "--preset", "tiny", "--output-dir", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["models"]) == set(MODEL_NAMES)
    for entry in results["models"].values():
        assert set(entry["metrics"]) == {"kendall_tau", "r2"}
        assert len(entry["metrics"]["r2"]["values"]) == len(entry["seeds"])
    printed = capsys.readouterr().out
    assert "Kendall tau" in printed and "GradMetaNet on gradients + weights" in printed


def test_cnn_zoo_statistics_are_invariant_to_channel_permutations_float64():
    """A zoo CNN's hidden channels permuted (conv ``k``'s output channels and conv ``k+1``'s input
    channels, or the head's columns) keep its function; every statistic stays put."""
    zoo = preset("tiny-cnn").zoo
    digits = load_digits_split(zoo)
    model = train_network(zoo, 0, digits)[-1].double()
    probe, labels = digits.pool_x[:zoo.probe_size].double(), digits.pool_y[:zoo.probe_size]
    permuted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    convs = [module for module in permuted if isinstance(module, torch.nn.Conv2d)]
    head = [module for module in permuted if isinstance(module, torch.nn.Linear)]
    assert len(convs) == 3 and len(head) == 1
    with torch.no_grad():
        for layer, following in zip(convs, [*convs[1:], head[0]]):
            order = torch.randperm(layer.out_channels, generator=generator)
            layer.weight.copy_(layer.weight[order])
            layer.bias.copy_(layer.bias[order])
            following.weight.copy_(following.weight[:, order])
    torch.testing.assert_close(permuted(probe), model(probe), rtol=0, atol=1e-12)
    graphs = [gradgraph.to_graph(net, probe, labels, _cross_entropy) for net in (model, permuted)]
    assert not torch.equal(graphs[0].edge_attr, graphs[1].edge_attr)
    for features in (weight_features, gradient_features):
        torch.testing.assert_close(features(graphs[1]), features(graphs[0]), rtol=1e-12, atol=1e-12)


def test_the_tiny_cnn_zoo_runs_the_statistics_baselines(tmp_path):
    config = replace(preset("tiny-cnn"), models=("grad_stats", "weight_stats"), output_dir=tmp_path / "out",
                     cache_root=tmp_path / "cache")
    results = run_zoo_accuracy(config)
    assert set(results["models"]) == {"grad_stats", "weight_stats"}
    assert results["zoo"]["members"] == config.zoo.num_members
