"""The curvature experiment: configuration, presets, training runs, results table and plot.

For each model of :data:`~gradgraph_lab.tasks.curvature.models.MODEL_NAMES` and each training
seed: train on the training networks with :func:`gradgraph_lab.tasks.training.fit` (loss: the
per-network relative squared error), keep the epoch with the lowest validation error, report
the test error (normalised l2, mean over test networks; then mean ± std over seeds). The
loop over models and seeds, ``results.json`` and the plot are :mod:`gradgraph_lab.tasks.experiment`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph_lab.data.curvature import CurvatureData, GraphBatcher, SirenZooConfig, load_curvature_data
from gradgraph_lab.distributed import DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks import experiment
from gradgraph_lab.tasks.curvature.data import CurvatureBatch, CurvatureSource, normalised_l2, relative_squared_error
from gradgraph_lab.tasks.curvature.models import (
    DEFAULT_MODELS,
    DETERMINISTIC_MODELS,
    MODEL_LABELS,
    MODEL_NAMES,
    ModelConfig,
    build_model,
)
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun, check_experiment
from gradgraph_lab.tasks.training import TrainConfig

__all__ = [
    "METRIC",
    "CurvatureConfig",
    "curvature_error",
    "curvature_loss",
    "make_splits",
    "plot_learning_curves",
    "preset",
    "results_table",
    "run_curvature",
    "run_one",
]

METRIC = (
    "normalised l2 per network, ||pred - F|| / ||F|| over all weights and biases, "
    "averaged over test networks; mean ± std over training seeds"
)


# ----------------------------------------------------------------------------- config
@dataclass
class CurvatureConfig:
    """One curvature experiment.

    Attributes:
        zoo: the SIREN zoo (its size must cover train + val + test).
        num_train, num_val, num_test: split sizes (networks ``[0, train)`` train, then val,
            then test; networks are i.i.d., so a fixed split is a random one).
        train: optimiser settings (the seed field is overridden per run).
        seeds: training seeds; every learned model is trained once per seed.
        models: which of :data:`MODEL_NAMES` to run (``standard`` is always included).
        model: model sizes.
        output_dir: where ``results.json`` and ``curvature.png`` go.
        cache_root: dataset cache (``None``: ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``).
        progress: tqdm bars.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available); with ``torchrun``
            each rank takes ``cuda:LOCAL_RANK``.
        resume: continue the training runs from their checkpoints in
            ``output_dir/checkpoints`` (written after every epoch; see
            :func:`gradgraph_lab.tasks.experiment.checkpointing`).
    """

    zoo: SirenZooConfig = field(default_factory=lambda: SirenZooConfig(num_nets=1000))
    num_train: int = 640
    num_val: int = 160
    num_test: int = 200
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=32, lr=3e-3))
    seeds: tuple[int, ...] = (0, 1)
    models: tuple[str, ...] = MODEL_NAMES
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: Path = Path("runs/curvature")
    cache_root: Path | None = None
    progress: bool = True
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self) -> None:
        check_experiment("CurvatureConfig", "network", models=self.models, known=MODEL_NAMES,
                         splits=(self.num_train, self.num_val, self.num_test), available=self.zoo.num_nets,
                         seeds=self.seeds, device=self.device, hint="raise --nets or shrink the splits")
        self.output_dir = Path(self.output_dir)


def preset(name: str) -> CurvatureConfig:
    """Named configurations.

    * ``default`` — the README's main-job run: 2000 networks (1280 / 320 / 400), 15 epochs,
      Adam 3e-3, batch 32, 1 seed, and only the models the result is about
      (:data:`DEFAULT_MODELS`: the standard estimator, the hand-built ``kernel_importance``
      reference, GradMetaNet; the rest is one ``--models`` flag away). GradMetaNet's
      learning curve has a step after a few hundred Adam steps (when its datapoint weights
      start to matter); this preset spends its budget on passing it — twice the networks
      and one seed instead of two — rather than on baselines, so the first result a user
      sees is GradMetaNet ahead of both references (measured: +26.0% against
      ``kernel_importance``'s +22.7%; README).
    * ``paper`` — GradMetaNet's scale: 3000 networks (2000 / 500 / 500), Adam 1e-3,
      batch 32, 100 epochs, 5 seeds.
    * ``tiny`` — a seconds-long smoke run for tests.
    """
    if name == "default":
        return CurvatureConfig(
            zoo=SirenZooConfig(num_nets=2000),
            num_train=1280,
            num_val=320,
            num_test=400,
            train=TrainConfig(epochs=15, batch_size=32, lr=3e-3),
            seeds=(0,),
            models=DEFAULT_MODELS,
        )
    if name == "paper":
        return CurvatureConfig(
            zoo=SirenZooConfig(num_nets=3000),
            num_train=2000,
            num_val=500,
            num_test=500,
            train=TrainConfig(epochs=100, batch_size=32, lr=1e-3),
            seeds=(0, 1, 2, 3, 4),
        )
    if name == "tiny":
        return CurvatureConfig(
            zoo=SirenZooConfig(num_nets=12, hidden=(4, 4), num_inputs=8, num_target_points=16, shard_size=5),
            num_train=6,
            num_val=3,
            num_test=3,
            train=TrainConfig(epochs=1, batch_size=4, lr=1e-3),
            seeds=(0,),
            model=ModelConfig(hidden_channels=8, component_channels=4, product_channels=4, mlp_hidden=8),
            progress=False,
        )
    raise GradGraphError(f"unknown curvature preset {name!r}; choose default, paper or tiny")


# ----------------------------------------------------------------------------- loss
def curvature_loss(model: nn.Module, batch: CurvatureBatch) -> Tensor:
    """The training loss: the relative squared error ``‖pred − F‖² / ‖F‖²`` averaged over the batch."""
    return relative_squared_error(model(batch), batch.target).mean()


def curvature_error(model: nn.Module, batch: CurvatureBatch) -> Tensor:
    """``[G]`` the reported error ``‖pred − F‖₂ / ‖F‖₂`` per network."""
    return normalised_l2(model(batch), batch.target)


# ----------------------------------------------------------------------------- run
def make_splits(config: CurvatureConfig, data: CurvatureData) -> dict[str, CurvatureSource]:
    """Train / val / test sources: networks ``[0, train)``, then val, then test (one shared graph batcher)."""
    batcher = GraphBatcher(data.template)
    bounds = experiment.split_bounds(config.num_train, config.num_val, config.num_test)
    return {name: CurvatureSource(data.subset(torch.arange(*span)), batcher) for name, span in bounds.items()}


def run_one(name: str, seed: int, config: CurvatureConfig, splits: dict[str, CurvatureSource],
            context: DistributedContext) -> SeedRun:
    """Build model ``name`` with ``seed``, train it (if it learns), and test it."""
    torch.manual_seed(seed)
    model = build_model(name, splits["train"], config.model).to(context.device)
    return experiment.train_and_test(model, splits, curvature_loss, curvature_error, config.train, seed=seed,
                                     name=name, progress=config.progress, context=context,
                                     description=repr(model) if name in DETERMINISTIC_MODELS else None,
                                     **experiment.checkpointing(config, name, seed))


def run_curvature(config: CurvatureConfig, context: DistributedContext | None = None) -> dict[str, Any]:
    """Generate (or load) the zoo, train every model for every seed, write results and a plot.

    Args:
        config: the experiment.
        context: the processes and device; by default opened from the environment
            (``torchrun`` sets it; alone: one process on ``config.device``) and closed at the end.

    Returns:
        The results dictionary written to ``output_dir/results.json`` (by rank 0): per model
        the test error of every seed, their mean and std, the improvement over the standard
        estimator in % of its error, training seconds, best epochs and learning curves;
        ``world_size`` and the machine.
    """
    with ExperimentRun.open(config, METRIC, context) as run:
        data = run.load(load_curvature_data)
        splits = make_splits(config, data.to(run.context.device))
        run.start_results()
        run.run_models(lambda name, seed: run_one(name, seed, config, splits, run.context), labels=MODEL_LABELS,
                       baseline="standard", deterministic=DETERMINISTIC_MODELS)
        results = run.finish(reference="standard")
        plot_learning_curves(results, config.output_dir / "curvature.png", context=run.context)
        return results


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: model, test error mean ± std, improvement over the standard estimator."""
    return experiment.results_table(
        results, metric_header="test error (norm. l2)", reference="standard", fixed=DETERMINISTIC_MODELS
    )


def plot_learning_curves(results: dict[str, Any], path: Path, context: DistributedContext | None = None) -> None:
    """Learning curves as a PNG: left, validation error per epoch (mean over seeds, log
    scale) of every learned model with the standard estimator dashed; right, the same
    relative to the standard estimator (1.0 = no improvement), for the models within 50% of it.
    Fixed estimators other than the standard one are dotted horizontal lines."""
    experiment.plot_learning_curves(
        results,
        path,
        reference="standard",
        fixed=DETERMINISTIC_MODELS,
        title="Fisher-diagonal estimation from 128 SIREN gradients (mean over seeds)",
        ylabel="validation error  ||pred - F|| / ||F||",
        context=context,
    )
