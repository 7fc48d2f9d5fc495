"""The CNN zoos (Small CNN Zoo recipe, digits and MNIST-1D) and the graph predictors added for them.

Failing checks: a recipe that draws dropout masks from the global random stream trains
differently twice; a first-zoo field that leaks into the cache hash orphans every MLP cache; a
pooled view that averages over positions instead of summing loses the exact bias gradients; a
view or model that reads a channel by its index breaks the float64 invariance tests.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

import gradgraph
from gradgraph.errors import GradGraphError
from gradgraph.symmetry import permute_hidden, random_hidden_perms
from gradgraph_lab import cli
from gradgraph_lab.tasks.zoo_accuracy import preset
from gradgraph_lab.tasks.zoo_accuracy.data import ZooConfig, load_images
from gradgraph_lab.tasks.zoo_accuracy.graph_models import GraphRegressor, ModelConfig, graph_inputs, pool_components
from gradgraph_lab.tasks.zoo_accuracy.models import GRAPH_MODELS
from gradgraph_lab.tasks.zoo_accuracy.recipe import _initialise, build_network, sample_recipe, train_network


def _cross_entropy(output, labels):
    return F.cross_entropy(output, labels, reduction="none")


def _permute_channels(model, seed=1):
    """A zoo CNN with its hidden channels permuted: conv k's output rows and bias, conv k+1's (or
    the head's) input columns. Modules sit at the indices of the convolutions and the Linear."""
    permuted = copy.deepcopy(model)
    convs = [m for m in permuted if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    head = [m for m in permuted if isinstance(m, torch.nn.Linear)][0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, following in zip(convs, [*convs[1:], head]):
            order = torch.randperm(layer.out_channels, generator=generator)
            layer.weight.copy_(layer.weight[order])
            layer.bias.copy_(layer.bias[order])
            following.weight.copy_(following.weight[:, order])
    return permuted


def test_the_first_zoos_cache_hash_is_unchanged():
    """The MLP zoo's cache directory name is the hash of its old fields: the new recipe fields at
    their first-zoo values are left out, any other value is in."""
    config = ZooConfig()
    old = {key: value for key, value in asdict(config).items()
           if key not in ("architecture", "dataset", "optimizers", "inits", "dropout_range", "test_size")}
    assert config.hash_fields() == old
    assert replace(config, optimizers=("adam",)).hash_fields()["optimizers"] == ("adam",)
    assert replace(config, dataset="mnist1d", test_size=10).hash_fields()["dataset"] == "mnist1d"


def test_the_cnn_recipe_draws_every_option_and_trains_the_same_twice():
    zoo = preset("cnn").zoo
    recipes = [sample_recipe(zoo, net) for net in range(60)]
    assert {r["optimizer"] for r in recipes} == {"sgd", "adam", "rmsprop"}
    assert {r["init"] for r in recipes} == {"default", "normal", "orthogonal"}
    assert {r["activation"] for r in recipes} == {"relu", "tanh"}
    assert all(0 <= r["dropout"] <= 0.5 for r in recipes) and max(r["dropout"] for r in recipes) > 0.3
    tiny = preset("tiny-cnn").zoo
    data = load_images(tiny)
    net = next(n for n in range(20) if sample_recipe(tiny, n)["dropout"] > 0)
    first, second = train_network(tiny, net, data), train_network(tiny, net, data)
    assert not any(m.training for m in first)
    assert any(isinstance(m, torch.nn.Dropout) for m in first[0])
    for a, b in zip(first, second):
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)


def test_orthogonal_and_normal_initialisations():
    model = build_network((3, 5, 4), "relu", input_shape=(1, 40))
    _initialise(model, "orthogonal", 1.0, torch.Generator().manual_seed(0))
    for layer in (model[0], model[2], model[4], model[-1]):
        matrix = layer.weight.reshape(layer.weight.shape[0], -1).double()
        small = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        torch.testing.assert_close(small, torch.eye(small.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    _initialise(model, "normal", 2.0, torch.Generator().manual_seed(0))
    assert float(model[2].weight.detach().std()) == pytest.approx(2.0 / (3 * 3) ** 0.5, rel=0.35)


def test_mnist1d_cnn_zoo_uses_the_labs_generator_and_one_d_convolutions():
    zoo = preset("tiny-mnist1d-cnn").zoo
    data = load_images(zoo)
    assert data.pool_x.shape == (200, 1, 40) and data.test_x.shape == (100, 1, 40)
    model = train_network(zoo, 0, data)[-1]
    assert isinstance(model[0], torch.nn.Conv1d) and model(data.test_x).shape == (100, 10)
    with pytest.raises(GradGraphError, match="mnist1d"):
        ZooConfig(dataset="mnist1d", test_size=0)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_pooled_components_keep_the_exact_per_sample_bias_gradients_float64(dataset):
    zoo = preset("tiny-mnist1d-cnn" if dataset == "mnist1d" else "tiny-cnn").zoo
    data = load_images(zoo)
    model = train_network(zoo, 0, data)[-1].double()
    graph = gradgraph.to_graph(model, data.pool_x[:5].double(), data.pool_y[:5], _cross_entropy)
    assert graph.num_components > 5
    pooled = pool_components(graph)
    assert pooled.act.shape == (graph.num_nodes, 5) and pooled.component_x.shape == (graph.num_nodes, 5, 2)
    per_sample = graph.per_sample_grads()
    for name in graph.param_names:
        if not name.endswith("bias"):
            continue
        slot = graph.node_param == graph.param_names.index(name)
        # every channel's bias gradient of datapoint d is the sum of its grad over d's positions
        mine = torch.zeros(5, len(per_sample[name][0]), dtype=torch.float64)
        mine[:, graph.node_param_pos[slot]] = pooled.grad[slot].T
        torch.testing.assert_close(mine, per_sample[name], rtol=1e-10, atol=1e-12)


def _regressors(unpooled=False):
    config = ModelConfig(hidden_channels=8, component_channels=4, stats_channels=4, pp_datapoints=2,
                         unpooled=unpooled, train_components=3)
    for name, (architecture, view, reads_stats) in GRAPH_MODELS.items():
        torch.manual_seed(0)
        yield name, view, GraphRegressor(config, 0.5, architecture, stats_features=3 if reads_stats else 0).double()


def _outputs_agree(graphs, unpooled=False):
    for name, view, regressor in _regressors(unpooled):
        inputs = [graph_inputs(graph, view, dtype=torch.float64, pool=not unpooled) for graph in graphs]
        for graph in inputs:
            graph.y = torch.zeros(1, 1, dtype=torch.float64)
            graph.stats = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
        regressor.fit_scaling(inputs)
        for training in (False, True):  # training: both read the same random subset of components
            regressor.train(training)
            outputs = []
            for graph in inputs:
                torch.manual_seed(7)
                with torch.no_grad():
                    outputs.append(regressor(Batch.from_data_list([graph])))
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12, msg=f"{name} {training}")


@pytest.mark.parametrize("unpooled", [False, True])
@pytest.mark.parametrize("preset_name", ["tiny-cnn", "tiny-mnist1d-cnn"])
def test_every_graph_predictor_is_invariant_to_cnn_channel_permutations_float64(preset_name, unpooled):
    zoo = preset(preset_name).zoo
    data = load_images(zoo)
    model = train_network(zoo, 1, data)[-1].double()
    permuted = _permute_channels(model)
    probe, labels = data.pool_x[:zoo.probe_size].double(), data.pool_y[:zoo.probe_size]
    torch.testing.assert_close(permuted(probe), model(probe), rtol=0, atol=1e-12)
    graphs = [gradgraph.to_graph(net, probe, labels, _cross_entropy) for net in (model, permuted)]
    assert not torch.equal(graphs[0].edge_attr, graphs[1].edge_attr)
    _outputs_agree(graphs, unpooled)


def test_every_graph_predictor_is_invariant_to_mlp_hidden_permutations_float64():
    zoo = preset("tiny").zoo
    data = load_images(zoo)
    model = train_network(zoo, 1, data)[-1].double()
    permuted = permute_hidden(model, random_hidden_perms(model, torch.Generator().manual_seed(0)))
    probe, labels = data.pool_x[:zoo.probe_size].double(), data.pool_y[:zoo.probe_size]
    torch.testing.assert_close(permuted(probe), model(probe), rtol=0, atol=1e-12)
    graphs = [gradgraph.to_graph(net, probe, labels, _cross_entropy) for net in (model, permuted)]
    assert not torch.equal(graphs[0].edge_attr, graphs[1].edge_attr)  # the permutation moved the weights
    _outputs_agree(graphs)


def test_the_weights_view_carries_no_gradient_information():
    zoo = preset("tiny").zoo
    data = load_images(zoo)
    model = train_network(zoo, 1, data)[-1]
    graph = gradgraph.to_graph(model, data.pool_x[:8], data.pool_y[:8], _cross_entropy)
    other = gradgraph.to_graph(model, data.pool_x[8:16], data.pool_y[8:16], _cross_entropy)
    first, second = graph_inputs(graph, "weights"), graph_inputs(other, "weights")
    for key in ("x", "edge_attr", "act", "grad"):
        assert torch.equal(first[key], second[key]), key


def test_the_tiny_mnist1d_cnn_run_writes_results_and_the_scatter_plot(tmp_path):
    code = cli.main(["zoo-accuracy", "--preset", "tiny-mnist1d-cnn", "--output-dir", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache"), "--quiet", "--models", "grad_stats",
                     "metanet_weights", "gradmetanet_pp_grad"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["models"]) == {"grad_stats", "metanet_weights", "gradmetanet_pp_grad"}
    assert results["zoo"]["dataset"] == "mnist1d"
    assert all("ensemble" in entry for entry in results["models"].values())
    assert (tmp_path / "out" / "zoo_accuracy_scatter.png").stat().st_size > 1000


def test_the_unpooled_view_keeps_every_position_and_reads_each_datapoints_exact_quantities():
    zoo = preset("tiny-mnist1d-cnn").zoo
    data = load_images(zoo)
    model = train_network(zoo, 0, data)[-1].double()
    graph = gradgraph.to_graph(model, data.pool_x[:3].double(), data.pool_y[:3], _cross_entropy)
    unpooled = graph_inputs(graph, "grad", dtype=torch.float64, pool=False)
    pooled = graph_inputs(graph, "grad", dtype=torch.float64)
    positions = graph.num_components // 3
    assert positions == 20 and unpooled.act.shape == (graph.num_nodes, 60) and pooled.act.shape[1] == 3
    assert unpooled.component_x.shape == (graph.num_nodes, 60, 4)
    sample = graph.component_sample.reshape(-1)
    # the factors are the normalised graph's, unsummed; summing them per datapoint gives the pooled view
    torch.testing.assert_close(pool_components(unpooled).grad, pooled.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unpooled.component_x[..., 3], unpooled.grad.abs(), rtol=0, atol=0)
    for column, exact in ((0, graph.loss.log()), (1, graph.per_sample_grad_norms().log())):
        torch.testing.assert_close(unpooled.component_x[0, :, column], exact[sample], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pooled.component_x[0, :, column], exact, rtol=1e-12, atol=1e-12)


def test_training_reads_a_random_subset_of_components_and_evaluation_all():
    zoo = preset("tiny").zoo
    data = load_images(zoo)
    model = train_network(zoo, 0, data)[-1].double()
    graph = graph_inputs(gradgraph.to_graph(model, data.pool_x[:8].double(), data.pool_y[:8], _cross_entropy), "grad",
                         dtype=torch.float64)
    graph.y = torch.zeros(1, 1, dtype=torch.float64)
    batch = Batch.from_data_list([graph, graph.clone()])
    torch.manual_seed(0)
    regressor = GraphRegressor(ModelConfig(hidden_channels=8, component_channels=4, train_components=3), 0.5).double()
    regressor.eval()
    with torch.no_grad():
        everything = regressor(batch)
        torch.manual_seed(5)
        chosen = torch.randperm(8)[:3]
        subset = batch.clone()
        subset.act, subset.grad = batch.act[:, chosen], batch.grad[:, chosen]
        subset.component_x, subset.component_sample = batch.component_x[:, chosen], batch.component_sample[:, chosen]
        on_subset = regressor(subset)
        regressor.train()
        torch.manual_seed(5)
        trained_view = regressor(batch)
    torch.testing.assert_close(trained_view, on_subset, rtol=0, atol=0)  # training reads exactly that subset
    assert not torch.allclose(trained_view, everything)  # ... and evaluation all eight
    with pytest.raises(GradGraphError, match="train_components"):
        ModelConfig(train_components=-1)


def test_the_cli_runs_gradmetanet_on_unpooled_components_of_a_subset(tmp_path, monkeypatch):
    seen = {}
    original = GraphRegressor.subsample_components

    def spy(batch, keep):
        seen.setdefault("shapes", []).append((batch.act.shape[1], keep))
        return original(batch, keep)

    monkeypatch.setattr(GraphRegressor, "subsample_components", staticmethod(spy))
    code = cli.main(["zoo-accuracy", "--preset", "tiny-cnn", "--output-dir", str(tmp_path / "out"), "--cache-dir",
                     str(tmp_path / "cache"), "--quiet", "--models", "gradmetanet_grad", "--unpooled",
                     "--train-components", "5"])
    assert code == 0
    # the tiny digits CNNs: 4 probe datapoints x 16 positions, 5 of them read per training step
    assert seen["shapes"] and set(seen["shapes"]) == {(64, 5)}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"]["gradmetanet_grad"]


def test_the_default_preset_is_the_fast_comparison_and_full_has_every_predictor():
    from gradgraph_lab.tasks.zoo_accuracy.models import MODEL_NAMES

    default, full = preset("default"), preset("full")
    assert default.model.train_components == 16 and full.model.train_components == 0
    assert set(full.models) == set(MODEL_NAMES)
    assert {"grad_stats", "weight_stats", "all_stats", "grad_stats_boost", "metanet_weights",
            "gradmetanet_grad_stats"} == set(default.models)
    assert default.zoo == full.zoo and default.seeds == full.seeds == (0, 1, 2, 3, 4)
