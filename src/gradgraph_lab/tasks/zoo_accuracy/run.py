"""The zoo-accuracy experiment: predict a digits MLP's test accuracy from its weights and from its
gradients on a probe batch.

Splits are made of whole networks (all checkpoints of a network in one split): networks
``[0, train)`` train, then validation, then test. Every predictor of
:data:`~gradgraph_lab.tasks.zoo_accuracy.models.MODEL_NAMES` runs once per seed on the same
splits: the statistics baselines are fitted (the seed is the forest's), GradMetaNet is trained
with :func:`gradgraph_lab.tasks.training.fit` (MSE, best epoch on validation). Reported per
seed on the test networks: Kendall tau and R^2 of predicted vs true accuracy, and the MSE
(``test_error``); then mean ± std over seeds. The loop, ``results.json`` and checkpoints are
:mod:`gradgraph_lab.tasks.experiment`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph_lab.distributed import DistributedContext
from gradgraph_lab.tasks import experiment
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun, check_experiment
from gradgraph_lab.tasks.training import LoaderSource, TrainConfig
from gradgraph_lab.tasks.zoo_accuracy.data import DigitsZooConfig, ZooData, load_zoo
from gradgraph_lab.tasks.zoo_accuracy.models import (
    FEATURES_OF,
    MODEL_LABELS,
    MODEL_NAMES,
    GraphRegressor,
    ModelConfig,
    StatsRegressor,
    graph_inputs,
    statistics,
)

__all__ = ["METRIC", "ZooAccuracyConfig", "Prepared", "build_model", "prepare", "preset", "results_table", "run_one",
           "run_zoo_accuracy"]

METRIC = ("test accuracy of held-out digits MLPs (whole networks held out): Kendall tau and R^2 of predicted vs "
          "true, test_error = mean squared error; mean ± std over seeds")
REFERENCE = "grad_stats"


@dataclass
class ZooAccuracyConfig:
    """One zoo-accuracy experiment.

    Attributes:
        zoo: the digits MLP zoo.
        num_train, num_val, num_test: split sizes in *networks* (each gives
            ``len(zoo.checkpoint_fractions)`` members).
        train: GradMetaNet's optimiser settings.
        seeds, models, model, output_dir, cache_root, progress, device, resume: as for every
            experiment (:class:`gradgraph_lab.tasks.experiment.ExperimentConfig`).
    """

    zoo: DigitsZooConfig = field(default_factory=DigitsZooConfig)
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


def preset(name: str) -> ZooAccuracyConfig:
    """Named configurations.

    * ``default`` — 100 networks x 4 checkpoints (60 / 15 / 25 networks), probe batch 64,
      GradMetaNet 15 epochs, 5 seeds, every predictor (docs/zoo.md: its wall time on 2 cores).
    * ``paper`` — 1000 networks x 4 checkpoints (700 / 100 / 200), 100 epochs, 5 seeds.
    * ``tiny`` — a seconds-long smoke run for tests.
    """
    if name == "default":
        return ZooAccuracyConfig()
    if name == "paper":
        return ZooAccuracyConfig(zoo=DigitsZooConfig(num_nets=1000), num_train=700, num_val=100, num_test=200,
                                 train=TrainConfig(epochs=100, batch_size=32, lr=1e-3),
                                 model=ModelConfig(hidden_channels=64, component_channels=16, num_component_layers=2))
    if name == "tiny":
        return ZooAccuracyConfig(
            zoo=DigitsZooConfig(num_nets=6, min_width=4, max_width=6, steps_choices=(10, 20),
                                checkpoint_fractions=(0.5, 1.0), probe_size=8, shard_size=4),
            num_train=3, num_val=1, num_test=2, train=TrainConfig(epochs=1, batch_size=4, lr=1e-3), seeds=(0,),
            model=ModelConfig(hidden_channels=8, component_channels=4, num_node_layers=1), progress=False)
    raise GradGraphError(f"unknown zoo-accuracy preset {name!r}; choose default, paper or tiny")


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
    """What every predictor reads: the sources of both graph views per split, the statistics tables.

    Attributes:
        data: the zoo.
        members: ``{split: [n] member indices}``.
        sources: ``{"grad" | "grad_weights": {split: LoaderSource}}``.
        features: ``{"weights" | "gradients" | "both": [M, F] float64}``.
    """

    data: ZooData
    members: dict[str, Tensor]
    sources: dict[str, dict[str, LoaderSource]]
    features: dict[str, Tensor]


def prepare(config: ZooAccuracyConfig, data: ZooData) -> Prepared:
    """Split by network, build the two graph views (:func:`graph_inputs`) and the statistics tables."""
    checkpoints = config.zoo.num_checkpoints
    bounds = experiment.split_bounds(config.num_train, config.num_val, config.num_test)
    members = {split: torch.arange(start * checkpoints, stop * checkpoints) for split, (start, stop) in bounds.items()}
    sources = {}
    for view, with_weights in (("grad", False), ("grad_weights", True)):
        graphs = [graph_inputs(graph, with_weights) for graph in data.graphs]
        sources[view] = {split: LoaderSource([graphs[int(i)] for i in index]) for split, index in members.items()}
    kinds = {kind for kind, _ in (FEATURES_OF[name] for name in config.models if name in FEATURES_OF)}
    tables = {kind: statistics(data.graphs, kind) for kind in ("weights", "gradients")
              if kinds & {kind, "both"}}
    features = {kind: tables[kind] for kind in kinds if kind != "both"}
    if "both" in kinds:
        features["both"] = torch.cat([tables["weights"], tables["gradients"]], 1)
    return Prepared(data, members, sources, features)


def predictions(model: nn.Module, source: LoaderSource, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(predicted [n], true [n])`` accuracies of a source's items, in order."""
    predicted, true = [], []
    model.eval()
    with torch.no_grad():
        for batch in source.batches(64, shuffle=False):
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
def build_model(name: str, seed: int, config: ZooAccuracyConfig, prepared: Prepared) -> nn.Module:
    """Predictor ``name`` with ``seed``: a fitted :class:`StatsRegressor` or an untrained
    :class:`GraphRegressor` whose input widths are set by one forward on training graphs."""
    accuracy = prepared.data.accuracy
    if name in FEATURES_OF:
        kind, regressor = FEATURES_OF[name]
        return StatsRegressor(prepared.features[kind], prepared.members["train"], accuracy, regressor, seed)
    torch.manual_seed(seed)
    model = GraphRegressor(config.model, offset=float(accuracy[prepared.members["train"]].mean()))
    view = "grad_weights" if name == "gradmetanet_grad_weights" else "grad"
    model.fit_scaling(prepared.sources[view]["train"].items)
    with torch.no_grad():  # GradMetaNet's input layers take their widths from a first batch
        model(next(prepared.sources[view]["train"].batches(2, shuffle=False)))
    return model


def run_one(name: str, seed: int, config: ZooAccuracyConfig, prepared: Prepared,
            context: DistributedContext) -> SeedRun:
    """Fit or train predictor ``name`` with ``seed``; test it (MSE, Kendall tau, R^2)."""
    model = build_model(name, seed, config, prepared).to(context.device)
    view = "grad_weights" if name == "gradmetanet_grad_weights" else "grad"
    splits = prepared.sources[view]
    fixed = name in FEATURES_OF
    run = experiment.train_and_test(model, splits, mse_loss, squared_error, config.train, seed=seed, name=name,
                                    progress=config.progress, context=context,
                                    description=repr(model) if fixed else None,
                                    **({} if fixed else experiment.checkpointing(config, name, seed)))
    run.metrics = ranking_metrics(*predictions(model, splits["test"], context.device))
    return run


def run_zoo_accuracy(config: ZooAccuracyConfig, context: DistributedContext | None = None) -> dict[str, Any]:
    """Generate (or load) the zoo, run every predictor for every seed, write ``results.json``.

    Returns:
        The results dictionary (``output_dir/results.json``): per model the MSE of every seed
        (``test_errors``) and ``metrics.kendall_tau`` / ``metrics.r2`` (values, mean, std).
    """
    with ExperimentRun.open(config, METRIC, context) as run:
        data = run.load(load_zoo)
        prepared = prepare(config, data)
        run.start_results(zoo={"members": config.zoo.num_members,
                               "accuracy_min": float(data.accuracy.min()),
                               "accuracy_median": float(data.accuracy.median()),
                               "accuracy_max": float(data.accuracy.max())})
        run.run_models(lambda name, seed: run_one(name, seed, config, prepared, run.context), labels=MODEL_LABELS,
                       baseline=REFERENCE)
        return run.finish(reference=REFERENCE)


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: model, Kendall tau, R^2 and MSE (mean ± std over seeds), seconds per seed."""
    header = ("model", "Kendall tau", "R^2", "test MSE", "s/seed")
    rows = [header]
    for entry in results["models"].values():
        metrics = entry["metrics"]
        seconds = entry["train_seconds"]
        rows.append((entry["label"],
                     f"{metrics['kendall_tau']['mean']:.3f} ± {metrics['kendall_tau']['std']:.3f}",
                     f"{metrics['r2']['mean']:.3f} ± {metrics['r2']['std']:.3f}",
                     f"{entry['test_error_mean']:.4f} ± {entry['test_error_std']:.4f}",
                     f"{sum(seconds) / len(seconds):.0f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
