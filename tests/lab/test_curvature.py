"""The curvature experiment: exact targets, the on-disk cache, and the pipeline end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch_geometric.data import Batch

import gradgraph_lab.data.curvature as curvature_data
from gradgraph_lab.cli import main
from gradgraph_lab.data import InputFamily, SirenZooConfig, fisher_diagonal, load_curvature_data, make_siren, sample_inputs
from gradgraph_lab.data.curvature import net_generator
from gradgraph_lab.data.siren_zoo import siren_graph, standard_estimate
from gradgraph.errors import GradGraphError
from gradgraph.nn import GradMetaNetPlusPlus, GraphContext
from gradgraph_lab.tasks.curvature import (
    DETERMINISTIC_MODELS,
    MODEL_NAMES,
    CurvatureConfig,
    CurvatureSource,
    KernelImportanceEstimator,
    normalised_l2,
    preset,
    reweighted_estimate,
    run_curvature,
)

TINY_ZOO = SirenZooConfig(num_nets=7, hidden=(3, 2), num_inputs=5, num_target_points=9, shard_size=3)


def fisher_by_double_loop(model: torch.nn.Module, points: torch.Tensor) -> dict[str, torch.Tensor]:
    """E_x[(df/dθ)²] with one autograd call per point, summed over points by hand."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for point in points:
        output = model(point[None])[0, 0]
        grads = torch.autograd.grad(output, list(params.values()))
        for name, grad in zip(params, grads):
            total[name] += grad.square()
    return {name: value / len(points) for name, value in total.items()}


def test_fisher_diagonal_from_factors_equals_a_double_loop():
    generator = torch.Generator().manual_seed(3)
    model = make_siren((3, 4), generator=generator)
    points = sample_inputs(InputFamily(), 0.7, 11, generator=generator)
    graph = siren_graph(model, points)
    edge, node = fisher_diagonal(graph)
    from_factors = graph.to_parameters(edge, node)
    reference = fisher_by_double_loop(model, points)
    assert from_factors.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(from_factors[name], reference[name], rtol=1e-12, atol=1e-12)
    # The batched standard estimator is the same formula on a stack of graphs.
    batched_edge, batched_node = standard_estimate(graph.act[None], graph.grad[None], graph.edge_index)
    torch.testing.assert_close(batched_edge[0], edge, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(batched_node[0], node, rtol=1e-12, atol=0.0)


def test_cached_targets_are_the_fisher_of_independent_points(tmp_path):
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    index = 4
    # Replay network 4's random draws in the documented order: weights, p, 5 seen points, 9 target points.
    generator = net_generator(TINY_ZOO.seed, index)
    model = make_siren(TINY_ZOO.hidden, generator=generator)
    p = float(torch.rand((), generator=generator, dtype=torch.float64))
    seen = sample_inputs(TINY_ZOO.family, p, TINY_ZOO.num_inputs, generator=generator)
    target_points = sample_inputs(TINY_ZOO.family, p, TINY_ZOO.num_target_points, generator=generator)
    assert abs(float(data.p[index]) - p) < 1e-6
    graph = data.graph(index)
    reference = fisher_by_double_loop(model, target_points)
    cached = graph.to_parameters(graph.target_edge, graph.target_node)
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name].float(), rtol=1e-5, atol=1e-6)
    # The model input holds the gradients at the *other* points.
    seen_grads = graph.per_sample_grads()
    params = dict(model.named_parameters())
    for row, point in enumerate(seen):
        grads = torch.autograd.grad(model(point[None])[0, 0], list(params.values()))
        for name, grad in zip(params, grads):
            torch.testing.assert_close(seen_grads[name][row], grad.float(), rtol=1e-5, atol=1e-5)


def test_second_load_reads_the_cache_without_generating(tmp_path, monkeypatch):
    first = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("a complete cache must not be regenerated")

    monkeypatch.setattr(curvature_data, "draw_network", fail)
    second = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    for name in ("act", "grad", "weight", "bias", "target_edge", "target_node", "p"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    # A different configuration is a different cache directory.
    with pytest.raises(GradGraphError, match="model 0 of the zoo: the builder failed: a complete cache"):
        load_curvature_data(replace(TINY_ZOO, seed=1), cache_root=tmp_path, progress=False)


def test_the_zoo_is_a_model_zoo_whose_cached_graphs_equal_fresh_ones(tmp_path):
    """The curvature zoo is a :class:`ModelZoo` case: its shards hold GradGraphs (loadable with
    ``weights_only=True``) equal to a fresh conversion of the drawn network on its own points."""
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    (directory,) = tmp_path.iterdir()
    shard = torch.load(directory / "processed" / "shard-00001.pt", weights_only=True)
    draw = curvature_data.draw_network(TINY_ZOO, 4)
    fresh = siren_graph(draw.siren, draw.inputs)
    cached = shard["graphs"][1]  # models 3-5
    assert int(cached.zoo_id) == 4 and "y" not in cached
    for key in ("act", "grad", "x", "edge_attr"):
        assert cached[key].dtype == torch.float32
        assert torch.equal(cached[key], fresh[key].float()), key
    assert torch.equal(cached.edge_index, fresh.edge_index)
    edge, node = fisher_diagonal(siren_graph(draw.siren, draw.target_points))
    assert torch.equal(cached.target_edge, edge.float()) and torch.equal(cached.target_node, node.float())
    assert torch.equal(data.act[4], cached.act) and torch.equal(data.target_node[4], cached.target_node)


def test_a_killed_run_is_resumed_not_read_as_complete(tmp_path, monkeypatch):
    reference = load_curvature_data(TINY_ZOO, cache_root=tmp_path / "fresh", progress=False)
    root = tmp_path / "killed"
    load_curvature_data(TINY_ZOO, cache_root=root, progress=False)
    (directory,) = root.iterdir()
    processed = directory / "processed"
    # Simulate a kill during shard 2: a half-written temp file and no shard; and a truncated
    # shard 1 under its final name (e.g. copied by a tool that is not atomic).
    (processed / "shard-00002.pt").unlink()
    (processed / ".shard-00002.pt.abc.tmp").write_bytes(b"partial")
    shard = processed / "shard-00001.pt"
    shard.write_bytes(shard.read_bytes()[:100])

    generated = []
    original = curvature_data.draw_network

    def counting(config, index):
        generated.append(index)
        return original(config, index)

    monkeypatch.setattr(curvature_data, "draw_network", counting)
    resumed = load_curvature_data(TINY_ZOO, cache_root=root, progress=False)
    assert generated == [3, 4, 5, 6]  # only the broken and the missing shard are rebuilt
    assert not list(processed.glob("*.tmp")) and not list(processed.glob(".*.tmp"))
    for name in ("act", "grad", "weight", "bias", "target_edge", "target_node", "p"):
        assert torch.equal(getattr(resumed, name), getattr(reference, name)), name
    for index in range(3):
        assert ((processed / f"shard-{index:05d}.pt").read_bytes()
                == (tmp_path / "fresh" / directory.name / "processed" / f"shard-{index:05d}.pt").read_bytes())


def test_standard_estimator_error_is_the_metric_of_mean_squares(tmp_path):
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    source = CurvatureSource(data)
    batch = source.batch(torch.arange(len(data)))
    per_sample = batch.per_sample_grads()
    torch.testing.assert_close(per_sample.square().mean(-1), batch.standard, rtol=1e-5, atol=1e-7)
    error = normalised_l2(batch.standard, batch.target)
    manual = (batch.standard - batch.target).norm(dim=1) / batch.target.norm(dim=1)
    torch.testing.assert_close(error, manual)


def test_reweighted_estimate_equals_weighting_every_per_sample_gradient(tmp_path):
    """The sparse (no [G, P, B] tensor) path against the definition, values and gradients."""
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    source = CurvatureSource(data)
    batch = source.batch(torch.tensor([4, 0, 2]))
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, TINY_ZOO.num_inputs, source.num_param_kinds, generator=generator, requires_grad=True)
    weights = scores.softmax(dim=1)
    per_sample = batch.per_sample_grads().square()  # [G, P, B]
    direct = torch.stack(
        [
            torch.stack([(per_sample[g, p] * weights[g, :, source.param_kind[p]]).sum() for p in range(per_sample.shape[1])])
            for g in range(3)
        ]
    )
    fast = reweighted_estimate(batch, weights)
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-7)
    cotangent = torch.randn(fast.shape, generator=generator)
    (grad_fast,) = torch.autograd.grad(fast, scores, cotangent, retain_graph=True)
    (grad_direct,) = torch.autograd.grad(direct, scores, cotangent)
    torch.testing.assert_close(grad_fast, grad_direct, rtol=1e-5, atol=1e-7)
    # Uniform weights give back the standard estimator.
    uniform = torch.full_like(weights, 1.0 / TINY_ZOO.num_inputs)
    torch.testing.assert_close(reweighted_estimate(batch, uniform), batch.standard, rtol=1e-5, atol=1e-7)


def test_zoo_batches_share_one_context_structure_equal_to_a_fresh_collation(tmp_path):
    """GraphBatcher marks its batches as one architecture: the GraphContext structure is built
    once per batch size and is what a plain collation computes; models give the same outputs."""
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    source = CurvatureSource(data)
    first, second = (source.batch(torch.tensor(index)).graphs() for index in ([0, 1, 2], [4, 3, 5]))
    first_context, second_context = GraphContext.from_graph(first), GraphContext.from_graph(second)
    assert second_context.cache is first_context.cache and second_context.layer_group is first_context.layer_group
    assert second_context.nodes_per_graph() == data.template.num_nodes
    plain = Batch.from_data_list(second.to_data_list())
    plain_context = GraphContext.from_graph(plain)
    assert plain_context.cache is not first_context.cache
    for field in ("edge_index", "node_batch", "layer_group"):
        assert torch.equal(getattr(second_context, field), getattr(plain_context, field))
    torch.manual_seed(0)
    model = GradMetaNetPlusPlus(4, component_out_channels=2, component_density_heads=2)
    for memo_batch, plain_batch in ((second, plain), (first, Batch.from_data_list(first.to_data_list()))):
        for fast, reference in zip(model(memo_batch), model(plain_batch)):
            torch.testing.assert_close(fast, reference, rtol=0.0, atol=0.0)


def test_kernel_importance_weights_follow_their_formula_and_ignore_datapoint_order(tmp_path):
    data = load_curvature_data(TINY_ZOO, cache_root=tmp_path, progress=False)
    source = CurvatureSource(data)
    batch = source.batch(torch.arange(len(data)))
    estimator = KernelImportanceEstimator(0.3)
    weights = estimator.weights(batch)
    x = data.act[:, 0, :].double()  # the single input neuron's act row is x
    z = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    sample_density = torch.exp(-((z[:, :, None] - z[:, None, :]) ** 2) / (2 * 0.3**2)).mean(-1)
    expected = torch.exp(-0.5 * z**2) / sample_density
    torch.testing.assert_close(weights.double(), expected / expected.sum(1, keepdim=True), rtol=1e-5, atol=1e-7)
    per_sample = batch.per_sample_grads().square()
    torch.testing.assert_close(estimator(batch), (per_sample * weights[:, None, :]).sum(-1), rtol=1e-5, atol=1e-7)
    order = torch.randperm(TINY_ZOO.num_inputs, generator=torch.Generator().manual_seed(1))
    shuffled = source.batch(torch.arange(len(data)))
    shuffled.act, shuffled.grad = batch.act[..., order], batch.grad[..., order]
    torch.testing.assert_close(estimator(shuffled), estimator(batch), rtol=1e-5, atol=1e-7)
    fitted = KernelImportanceEstimator.fitted(source)
    errors = {h: float(normalised_l2(KernelImportanceEstimator(h)(batch), batch.target).mean())
              for h in KernelImportanceEstimator.BANDWIDTHS}
    assert errors[fitted.bandwidth] == min(errors.values())


def test_pipeline_smoke_writes_results_and_reuses_the_cache(tmp_path, monkeypatch):
    config = replace(preset("tiny"), output_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    results = run_curvature(config)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "curvature.png").stat().st_size > 0
    assert set(written["models"]) == set(MODEL_NAMES)
    for name, entry in written["models"].items():
        assert len(entry["test_errors"]) == 1 and entry["test_error_mean"] >= 0
        if name not in DETERMINISTIC_MODELS:
            assert len(entry["histories"][0]) == config.train.epochs + 1
    assert written["models"]["standard"]["improvement_pct"] == 0.0
    assert results["models"]["gradmetanet"]["test_error_mean"] == written["models"]["gradmetanet"]["test_error_mean"]

    monkeypatch.setattr(curvature_data, "draw_network", lambda *a: pytest.fail("cache was not reused"))
    run_curvature(replace(config, models=("standard",)))


@pytest.mark.slow  # a command-line end-to-end run
def test_cli_runs_the_tiny_preset(tmp_path, capsys):
    code = main(
        ["curvature", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
         "--models", "standard", "mlp_concat", "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "standard estimator" in out and "MLP on concatenated gradients" in out and "vs standard" in out
    assert (tmp_path / "o" / "results.json").exists()


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(GradGraphError, match="splits need"):
        CurvatureConfig(zoo=SirenZooConfig(num_nets=10), num_train=8, num_val=2, num_test=2)
    with pytest.raises(GradGraphError, match="CurvatureConfig: unknown model"):
        CurvatureConfig(models=("gradmetanet", "nope"))
    with pytest.raises(GradGraphError, match="num_nets"):
        SirenZooConfig(num_nets=0)
    with pytest.raises(GradGraphError, match="min_width"):
        InputFamily(min_width=0.0)
    with pytest.raises(GradGraphError, match="p must lie"):
        sample_inputs(InputFamily(), 1.5, 3)
    with pytest.raises(GradGraphError, match="unknown curvature preset"):
        preset("huge")


@pytest.mark.slow  # a command-line end-to-end run
def test_cli_nets_flag_resizes_zoo_and_splits(tmp_path):
    code = main(
        ["curvature", "--preset", "tiny", "--nets", "10", "--epochs", "1", "--output-dir", str(tmp_path / "o"),
         "--cache-dir", str(tmp_path / "c"), "--models", "standard", "--quiet"]
    )
    assert code == 0
    config = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert config["zoo"]["num_nets"] == 10
    assert config["num_train"] + config["num_val"] + config["num_test"] == 10
