"""The zoo-accuracy experiment: predict a zoo network's test accuracy from its weights and from its
gradients on a probe batch.

Splits are made of whole networks (all checkpoints of a network in one split): networks
``[0, train)`` train, then validation, then test. Every predictor of
:data:`~gradgraph_lab.tasks.zoo_accuracy.models.MODEL_NAMES` runs once per seed on the same
splits: the statistics baselines are fitted (the seed is the forest's), GradMetaNet is trained
with :func:`gradgraph_lab.tasks.training.fit` (MSE, best epoch on validation). Reported per
seed on the test networks: Kendall tau and R^2 of predicted vs true accuracy, and the MSE
(``test_error``); then mean ± std over seeds, and the metrics of each predictor's seeds averaged
(``ensemble``: the mean of its 5 seeds' predictions). The loop, ``results.json`` and checkpoints are
:mod:`gradgraph_lab.tasks.experiment`'s; :func:`scatter_plot` draws predicted vs true test accuracy
(``zoo_accuracy_scatter.png`` next to ``results.json``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph_lab.distributed import DistributedContext
from gradgraph_lab.tasks import experiment
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun, check_experiment
from gradgraph_lab.tasks.training import LoaderSource, TrainConfig
from gradgraph_lab.tasks.zoo_accuracy.data import ZooConfig, ZooData, load_zoo
from gradgraph_lab.tasks.zoo_accuracy.models import (
    FEATURES_OF,
    GRAPH_MODELS,
    MODEL_LABELS,
    MODEL_NAMES,
    GraphRegressor,
    ModelConfig,
    StatsRegressor,
    graph_inputs,
    statistics,
)

__all__ = ["METRIC", "ZooAccuracyConfig", "Prepared", "build_model", "prepare", "results_table", "run_one",
           "run_zoo_accuracy", "scatter_plot", "stats_features"]

METRIC = ("test accuracy of held-out zoo networks (whole networks held out): Kendall tau and R^2 of predicted vs "
          "true, test_error = mean squared error; mean ± std over seeds")
REFERENCE = "grad_stats"
SCATTER = "zoo_accuracy_scatter.png"


@dataclass
class ZooAccuracyConfig:
    """One zoo-accuracy experiment.

    Attributes:
        zoo: the zoo's recipe.
        num_train, num_val, num_test: split sizes in *networks* (each gives
            ``len(zoo.checkpoint_fractions)`` members).
        train: GradMetaNet's optimiser settings.
        seeds, models, model, output_dir, cache_root, progress, device, resume: as for every
            experiment (:class:`gradgraph_lab.tasks.experiment.ExperimentConfig`).
    """

    zoo: ZooConfig = field(default_factory=ZooConfig)
    num_train: int = 60
    num_val: int = 15
    num_test: int = 25
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, batch_size=16, lr=3e-3))
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    models: tuple[str, ...] = MODEL_NAMES
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: Path = Path("runs/zoo-accuracy")
    cache_root: Path | None = None
    progress: bool = True
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self) -> None:
        check_experiment("ZooAccuracyConfig", "network", models=self.models, known=MODEL_NAMES,
                         splits=(self.num_train, self.num_val, self.num_test), available=self.zoo.num_nets,
                         seeds=self.seeds, device=self.device, hint="raise --nets or shrink the splits")
        self.output_dir = Path(self.output_dir)


# ------------------------------------------------------------------------------- losses
def squared_error(model: nn.Module, batch: Any) -> Tensor:
    """``[G]`` the squared error of the predicted accuracy."""
    return (model(batch) - batch.y).square()[:, 0]


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    """The training loss: the batch's mean squared error."""
    return squared_error(model, batch).mean()


# ------------------------------------------------------------------------------- data
@dataclass
class Prepared:
    """What every predictor reads: the sources of the graph views per split, the statistics tables.

    Attributes:
        data: the zoo.
        members: ``{split: [n] member indices}``.
        sources: ``{view: {split: LoaderSource}}`` for the views the graph models read
            (``"weights"``, ``"grad"``, ``"grad_weights"``; the gradient views' graphs carry
            ``stats [1, F]``, :func:`stats_features`, when a model reads them).
        features: ``{"weights" | "gradients" | "both": [M, F] float64}``.
        predicted: ``{model: {seed: [n_test] predictions}}``, filled as the models run.
    """

    data: ZooData
    members: dict[str, Tensor]
    sources: dict[str, dict[str, LoaderSource]]
    features: dict[str, Tensor]
    predicted: dict[str, dict[int, Tensor]] = field(default_factory=dict)


def stats_features(table: Tensor, train_index: Tensor) -> Tensor:
    r"""``[M, F]`` float32: the gradient statistics on a log scale a network can read,
    :math:`\operatorname{sign}(s) \log(1 + |s| / m)` with ``m`` the column's median magnitude over
    the training members (the norms span orders of magnitude)."""
    scale = table[train_index].abs().median(0).values.clamp_min(1e-12)
    return (table.sign() * torch.log1p(table.abs() / scale)).float()


def prepare(config: ZooAccuracyConfig, data: ZooData) -> Prepared:
    """Split by network, build the graph views the models read (:func:`graph_inputs`) and the statistics tables."""
    checkpoints = config.zoo.num_checkpoints
    bounds = experiment.split_bounds(config.num_train, config.num_val, config.num_test)
    members = {split: torch.arange(start * checkpoints, stop * checkpoints) for split, (start, stop) in bounds.items()}
    graph_models = [GRAPH_MODELS[name] for name in config.models if name in GRAPH_MODELS]
    # the reference (grad_stats) runs first whether requested or not (ExperimentRun.run_models)
    kinds = {kind for kind, _ in (FEATURES_OF[name] for name in {*config.models, REFERENCE} if name in FEATURES_OF)}
    if any(reads_stats for _, _, reads_stats in graph_models):
        kinds.add("gradients")
    tables = {kind: statistics(data.graphs, kind) for kind in ("weights", "gradients") if kinds & {kind, "both"}}
    features = {kind: tables[kind] for kind in kinds if kind != "both"}
    if "both" in kinds:
        features["both"] = torch.cat([tables["weights"], tables["gradients"]], 1)
    sources = {}
    for view in sorted({view for _, view, _ in graph_models}):
        graphs = [graph_inputs(graph, view, pool=not config.model.unpooled) for graph in data.graphs]
        if view != "weights" and "gradients" in features:
            for graph, row in zip(graphs, stats_features(features["gradients"], members["train"])):
                graph.stats = row[None]
        sources[view] = {split: LoaderSource([graphs[int(i)] for i in index]) for split, index in members.items()}
    if not sources:  # the statistics models read only zoo_id: a light view of the graphs
        light = [_ids_only(graph) for graph in data.graphs]
        sources["ids"] = {split: LoaderSource([light[int(i)] for i in index]) for split, index in members.items()}
    return Prepared(data, members, sources, features)


def _ids_only(graph):  # noqa: ANN001, ANN202 - a GradGraph in, a small one out
    light = graph.clone()
    light.act = light.act[:, :1]
    light.grad = light.grad[:, :1]
    light.component_sample = light.component_sample.reshape(-1)[:1]
    return light


def predictions(model: nn.Module, source: LoaderSource, device: torch.device,
                batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """``(predicted [n], true [n])`` accuracies of a source's items, in order (``batch_size`` graphs at a time)."""
    predicted, true = [], []
    model.eval()
    with torch.no_grad():
        for batch in source.batches(batch_size, shuffle=False):
            batch = batch.to(device)
            predicted.append(model(batch)[:, 0].double().cpu())
            true.append(batch.y[:, 0].double().cpu())
    return torch.cat(predicted), torch.cat(true)


def ranking_metrics(predicted: Tensor, true: Tensor) -> dict[str, float]:
    """``{"kendall_tau", "r2"}`` of predicted vs true accuracies (scipy's tau-b, scikit-learn's R^2)."""
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score

    tau = kendalltau(predicted.numpy(), true.numpy()).statistic
    return {"kendall_tau": float(tau), "r2": float(r2_score(true.numpy(), predicted.numpy()))}


# ------------------------------------------------------------------------------- run
def _view_of(name: str, prepared: Prepared) -> str:
    return GRAPH_MODELS[name][1] if name in GRAPH_MODELS else next(iter(prepared.sources))


def build_model(name: str, seed: int, config: ZooAccuracyConfig, prepared: Prepared) -> nn.Module:
    """Predictor ``name`` with ``seed``: a fitted :class:`StatsRegressor` or an untrained
    :class:`GraphRegressor` whose input standardisation is fitted on the training graphs."""
    accuracy = prepared.data.accuracy
    if name in FEATURES_OF:
        kind, regressor = FEATURES_OF[name]
        return StatsRegressor(prepared.features[kind], prepared.members["train"], accuracy, regressor, seed)
    architecture, view, reads_stats = GRAPH_MODELS[name]
    train_graphs = prepared.sources[view]["train"].items
    torch.manual_seed(seed)
    model = GraphRegressor(config.model, offset=float(accuracy[prepared.members["train"]].mean()),
                           architecture=architecture,
                           stats_features=int(train_graphs[0].stats.shape[1]) if reads_stats else 0)
    model.fit_scaling(train_graphs)
    return model


def run_one(name: str, seed: int, config: ZooAccuracyConfig, prepared: Prepared,
            context: DistributedContext) -> SeedRun:
    """Fit or train predictor ``name`` with ``seed``; test it (MSE, Kendall tau, R^2)."""
    model = build_model(name, seed, config, prepared).to(context.device)
    splits = prepared.sources[_view_of(name, prepared)]
    fixed = name in FEATURES_OF
    run = experiment.train_and_test(model, splits, mse_loss, squared_error, config.train, seed=seed, name=name,
                                    progress=config.progress, context=context,
                                    description=repr(model) if fixed else None,
                                    **({} if fixed else experiment.checkpointing(config, name, seed)))
    predicted, true = predictions(model, splits["test"], context.device, max(config.train.batch_size, 16))
    prepared.predicted.setdefault(name, {})[seed] = predicted
    run.metrics = ranking_metrics(predicted, true)
    return run


def ensembles(prepared: Prepared) -> dict[str, dict[str, float]]:
    """``{model: {"kendall_tau", "r2"}}`` of each model's test predictions averaged over its seeds."""
    true = prepared.data.accuracy[prepared.members["test"]]
    return {name: ranking_metrics(torch.stack(list(by_seed.values())).mean(0), true)
            for name, by_seed in prepared.predicted.items()}


def blends(prepared: Prepared, partner: str = REFERENCE) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {"kendall_tau" | "r2": {"mean", "std"}}}`` of the per-seed average of each graph
    model's prediction and ``partner``'s (same seed): does the graph model add to the forest?"""
    if partner not in prepared.predicted:
        return {}
    true = prepared.data.accuracy[prepared.members["test"]]
    out = {}
    for name, by_seed in prepared.predicted.items():
        if name in FEATURES_OF:
            continue
        runs = [ranking_metrics((by_seed[seed] + prepared.predicted[partner][seed]) / 2, true)
                for seed in by_seed if seed in prepared.predicted[partner]]
        out[name] = {key: {"mean": float(torch.tensor([r[key] for r in runs], dtype=torch.float64).mean()),
                           "std": float(torch.tensor([r[key] for r in runs], dtype=torch.float64).std(unbiased=False))}
                     for key in ("kendall_tau", "r2")}
    return out


def scatter_plot(prepared: Prepared, labels: dict[str, str], path: Path, title: str = "") -> None:
    """Predicted vs true test accuracy of the test members, one panel per predictor (its seeds'
    mean prediction; Kendall tau of that mean in the panel title). Writes a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true = prepared.data.accuracy[prepared.members["test"]].numpy()
    names = list(prepared.predicted)
    scores = ensembles(prepared)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        predicted = torch.stack(list(prepared.predicted[name].values())).mean(0).numpy()
        axis.scatter(true, predicted, s=6, alpha=0.6)
        axis.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_title(f"{labels.get(name, name)}\ntau {scores[name]['kendall_tau']:.3f}", fontsize=7)
        axis.set_xlabel("true test accuracy", fontsize=7)
        axis.set_ylabel("predicted", fontsize=7)
        axis.tick_params(labelsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_zoo_accuracy(config: ZooAccuracyConfig, context: DistributedContext | None = None) -> dict[str, Any]:
    """Generate (or load) the zoo, run every predictor for every seed, write ``results.json`` and
    the scatter plot (:func:`scatter_plot`, ``zoo_accuracy_scatter.png``).

    Returns:
        The results dictionary (``output_dir/results.json``): per model the MSE of every seed
        (``test_errors``) and ``metrics.kendall_tau`` / ``metrics.r2`` (values, mean, std), and
        ``ensemble`` (the metrics of the seeds' mean prediction), ``test_predictions`` per seed,
        ``test_accuracy`` (the true values, same order) and ``blends_with_grad_stats``
        (:func:`blends`).
    """
    with ExperimentRun.open(config, METRIC, context) as run:
        data = run.load(load_zoo)
        prepared = prepare(config, data)
        run.start_results(zoo={"members": config.zoo.num_members, "dataset": config.zoo.dataset,
                               "architecture": config.zoo.architecture,
                               "accuracy_min": float(data.accuracy.min()),
                               "accuracy_median": float(data.accuracy.median()),
                               "accuracy_max": float(data.accuracy.max())})
        run.results["prepare_seconds"] = time.perf_counter() - run.start - run.data_seconds
        run.run_models(lambda name, seed: run_one(name, seed, config, prepared, run.context), labels=MODEL_LABELS,
                       baseline=REFERENCE)
        for name, metrics in ensembles(prepared).items():
            run.results["models"][name]["ensemble"] = metrics
            run.results["models"][name]["test_predictions"] = {
                str(seed): values.tolist() for seed, values in prepared.predicted[name].items()}
        run.results["test_accuracy"] = data.accuracy[prepared.members["test"]].tolist()
        run.results["blends_with_" + REFERENCE] = blends(prepared)
        if run.context.is_main_process:
            zoo = config.zoo
            scatter_plot(prepared, MODEL_LABELS, config.output_dir / SCATTER,
                         title=f"{zoo.dataset} {zoo.architecture.upper()} zoo: test members, mean of "
                               f"{len(config.seeds)} seeds")
        return run.finish(reference=REFERENCE)


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: model, Kendall tau, R^2 and MSE (mean ± std over seeds), seconds per seed."""
    header = ("model", "Kendall tau", "R^2", "test MSE", "tau of seed mean", "s/seed")
    rows = [header]
    for entry in results["models"].values():
        metrics = entry["metrics"]
        seconds = entry["train_seconds"]
        rows.append((entry["label"],
                     f"{metrics['kendall_tau']['mean']:.3f} ± {metrics['kendall_tau']['std']:.3f}",
                     f"{metrics['r2']['mean']:.3f} ± {metrics['r2']['std']:.3f}",
                     f"{entry['test_error_mean']:.4f} ± {entry['test_error_std']:.4f}",
                     f"{entry['ensemble']['kendall_tau']:.3f}" if "ensemble" in entry else "—",
                     f"{sum(seconds) / len(seconds):.0f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for name, metrics in results.get("blends_with_" + REFERENCE, {}).items():
        tau = metrics["kendall_tau"]
        lines.append(f"mean of {results['models'][name]['label']} and the gradient-statistics forest (same seed): "
                     f"Kendall tau {tau['mean']:.3f} ± {tau['std']:.3f}")
    return "\n".join(lines)
