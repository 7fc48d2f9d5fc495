"""The INR-editing experiment (GradMetaNet, Gelberg et al. 2025, §7.3): configuration, runs,
results table, ``results.json`` and a picture of the edits.

For each model of :data:`~gradgraph_lab.tasks.inr_editing.models.MODEL_NAMES` and each training
seed: train on the training INRs with :func:`gradgraph_lab.tasks.training.fit` (loss: MSE between
the edited INR's rendering and the dilated image on the full grid), keep the epoch with the
lowest validation MSE, report the test MSE (mean over test INRs; then mean ± std over seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph_lab.data.curvature import GraphBatcher
from gradgraph_lab.data.inr_zoo import InrZoo, InrZooConfig, load_inr_zoo
from gradgraph_lab.distributed import DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks import experiment
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun, check_experiment
from gradgraph_lab.tasks.inr_editing.data import InrBatch, InrSource, mse_per_inr
from gradgraph_lab.tasks.inr_editing.models import (
    MODEL_LABELS,
    DEFAULT_MODELS,
    MODEL_NAMES,
    EditModelConfig,
    FeatureScales,
    build_model,
    describe,
)
from gradgraph_lab.tasks.training import TrainConfig

__all__ = ["METRIC", "InrEditConfig", "edit_error", "edit_loss", "make_splits", "plot_edits", "preset", "reference_model", "results_table",
           "run_inr_editing", "run_one"]

#: Models without learned parameters: evaluated once, not once per seed.
DETERMINISTIC_MODELS = ("no_edit",)


@dataclass
class InrEditConfig:
    """One INR-editing experiment.

    Attributes:
        zoo: the INR zoo (its size must cover train + val + test).
        num_train, num_val, num_test: split sizes (INRs ``[0, train)`` train, then val, then
            test, after a fixed shuffle of the zoo by ``split_seed``).
        split_seed: seed of that shuffle.
        train: optimiser settings (seed and description are set per run).
        seeds: training seeds; every learned model is trained once per seed.
        models: which of :data:`MODEL_NAMES` to run (``no_edit`` is always included).
        model: model sizes.
        device: ``cpu``, ``cuda``, ``cuda:K`` or ``auto`` (CUDA when available); with
            ``torchrun`` each rank uses its local GPU.
        num_pictures: test digits shown in the picture.
        output_dir: where ``results.json``, ``inr_edits.png`` and ``inr_learning_curves.png`` go.
        cache_root: zoo cache (``None``: ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``).
        progress: progress bars and per-run lines.
        resume: continue the training runs from their checkpoints in
            ``output_dir/checkpoints`` (written after every epoch; see
            :func:`gradgraph_lab.tasks.experiment.checkpointing`).
    """

    zoo: InrZooConfig = field(default_factory=InrZooConfig)
    num_train: int = 1200
    num_val: int = 297
    num_test: int = 300
    split_seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, batch_size=32, lr=3e-3))
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = DEFAULT_MODELS
    model: EditModelConfig = field(default_factory=lambda: EditModelConfig(
        hidden_channels=16, component_channels=8, num_node_layers=2, product_channels=4))
    device: str = "cpu"
    num_pictures: int = 6
    output_dir: Path = Path("runs/inr-edit")
    cache_root: Path | None = None
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        check_experiment("InrEditConfig", "INR", models=self.models, known=MODEL_NAMES,
                         splits=(self.num_train, self.num_val, self.num_test), available=self.zoo.num_images,
                         seeds=self.seeds, device=self.device)
        self.output_dir = Path(self.output_dir)


def preset(name: str) -> InrEditConfig:
    """Named configurations.

    * ``default`` — every digit (1200 / 297 / 300), 16×16 grid, small models (``C = 16``,
      ``C_z = 8``, 2 node layers), 4 epochs, Adam 3e-3, batch 32, 3 seeds, the seven models of
      :data:`DEFAULT_MODELS`: the README's run, 7 min 33 s wall on the quiet 2-core machine from
      a fresh cache (see the README).
    * ``paper`` — the same data, the full-size models (``C = 32``, ``C_z = 16``, 3 node
      layers), 100 epochs at Adam 1e-3 (the paper trains 150K steps with AdamW on MNIST's
      far larger zoo of 70k INRs), 5 seeds.
    * ``tiny`` — a seconds-long smoke run for tests.
    """
    if name == "default":
        return InrEditConfig()
    if name == "paper":
        return InrEditConfig(train=TrainConfig(epochs=100, batch_size=32, lr=1e-3), seeds=(0, 1, 2, 3, 4),
                             model=EditModelConfig())
    if name == "tiny":
        return InrEditConfig(
            zoo=InrZooConfig(num_images=12, resolution=8, hidden=(8, 8), fit_steps=30, num_probe_points=16,
                             shard_size=5),
            num_train=6,
            num_val=3,
            num_test=3,
            train=TrainConfig(epochs=1, batch_size=4, lr=1e-3),
            seeds=(0,),
            model=EditModelConfig(hidden_channels=8, component_channels=4, num_component_layers=1,
                                  num_node_layers=1, product_channels=2),
            num_pictures=2,
            progress=False,
        )
    raise GradGraphError(f"unknown inr-edit preset {name!r}; choose default, paper or tiny")


# ----------------------------------------------------------------------------- loss
def edit_error(model: nn.Module, batch: InrBatch) -> Tensor:
    """``[G]`` MSE between the edited INR's rendering and the edited image, per INR."""
    weight, bias = model(batch)
    return mse_per_inr(batch.render(weight, bias), batch.target)


def edit_loss(model: nn.Module, batch: InrBatch) -> Tensor:
    """The training loss: :func:`edit_error` averaged over the batch."""
    return edit_error(model, batch).mean()


# ----------------------------------------------------------------------------- pieces
def make_splits(config: InrEditConfig, zoo: InrZoo, device: torch.device | str = "cpu") -> dict[str, InrSource]:
    """Train / val / test sources on ``device`` (one shared graph batcher)."""
    order = torch.randperm(len(zoo), generator=torch.Generator().manual_seed(config.split_seed))
    bounds = experiment.split_bounds(config.num_train, config.num_val, config.num_test)
    splits: dict[str, InrSource] = {}
    batcher: GraphBatcher | None = None
    for name, (start, stop) in bounds.items():
        splits[name] = InrSource.from_zoo(zoo, order[start:stop], device=device, batcher=batcher)
        batcher = splits[name].batcher
    return splits


def run_one(name: str, seed: int, config: InrEditConfig, splits: dict[str, InrSource], scales: FeatureScales,
            context: DistributedContext, trained: dict[str, nn.Module]) -> SeedRun:
    """Build model ``name`` with ``seed``, train it (if it learns) and test it; the model
    (best-validation weights) is left in ``trained[name]``."""
    torch.manual_seed(seed)
    model = build_model(name, scales, config.model, int(splits["train"].act.shape[-1])).to(context.device)
    seed_run = experiment.train_and_test(model, splits, edit_loss, edit_error, config.train, seed=seed, name=name,
                                         progress=config.progress, context=context, description=describe(model),
                                         **experiment.checkpointing(config, name, seed))
    trained[name] = model
    return seed_run


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: model, test MSE mean ± std over seeds, change against ``weight_space``
    (when it ran; else against ``no_edit``), training seconds per seed."""
    return experiment.results_table(results, metric_header="test MSE", reference=reference_model(results),
                                    fixed=DETERMINISTIC_MODELS)


def reference_model(results: dict[str, Any]) -> str:
    """The model improvements are measured against: ``weight_space`` when it ran, else ``no_edit``."""
    return "weight_space" if "weight_space" in results["models"] else "no_edit"


@torch.no_grad()
def plot_edits(zoo_source: InrSource, images: Tensor, edited: dict[str, Tensor], resolution: int, path: Path,
               mse: dict[str, Tensor] | None = None) -> None:
    """A PNG grid: one row per test digit; columns: the INR as fit, the dilated target, each model's edit.

    Args:
        zoo_source: the test INRs shown (first ``K``), for the original rendering and targets.
        images: ``[K, R²]`` renderings of the unedited INRs.
        edited: ``{model name: [K, R²]}`` renderings of each model's edited INRs.
        resolution: ``R``.
        path: where the PNG goes.
        mse: optional ``{model name: [K]}`` per-digit MSE, printed over each picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = images.shape[0]
    columns = [("INR (original)", images), ("target: dilated", zoo_source.target[:count])]
    columns += [(name, values) for name, values in edited.items()]
    figure, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.7 * count), squeeze=False)
    for column, (title, values) in enumerate(columns):
        for row in range(count):
            axis = axes[row, column]
            axis.imshow(values[row].reshape(resolution, resolution).float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if mse is not None and title in mse:
                axis.set_xlabel(f"{100 * float(mse[title][row]):.2f}", fontsize=7)
            if row == 0:
                axis.set_title(title, fontsize=7)
    figure.suptitle("INR editing (3×3 dilation), test digits; numbers: MSE ×1e-2", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- run
METRIC = "MSE between the edited INR's rendering and the dilated image on the full grid (pixels in [0, 1]), " \
         "mean over test INRs; mean ± std over training seeds"


def run_inr_editing(config: InrEditConfig, context: DistributedContext | None = None) -> dict[str, Any]:
    """Build (or load) the zoo, train every model for every seed, write results.json and the pictures.

    Args:
        config: the experiment.
        context: the processes and device; by default opened from the environment
            (``torchrun`` sets it; alone: one process on ``config.device``) and closed at the end.

    Returns:
        The results dictionary written to ``output_dir/results.json`` (by rank 0): per model
        the test MSE of every seed (``test_errors``), their mean and std
        (``test_error_mean``, ``test_error_std``), the change against ``weight_space`` in %
        (``improvement_pct``), training seconds, best epochs and learning curves; the zoo's
        fit quality (PSNR), the issue's targets checked, and the wall time.
    """
    with ExperimentRun.open(config, METRIC, context) as run:
        zoo = run.load(load_inr_zoo)
        splits = make_splits(config, zoo, run.context.device)
        scales = FeatureScales.measure(splits["train"])
        run.start_results(zoo={"num_inrs": len(zoo), "resolution": config.zoo.resolution,
                               "psnr_mean": float(zoo.psnr.mean()), "psnr_min": float(zoo.psnr.min())})
        trained: dict[str, nn.Module] = {}
        run.run_models(
            lambda name, seed: run_one(name, seed, config, splits, scales, run.context, trained),
            labels=MODEL_LABELS, baseline="no_edit", deterministic=DETERMINISTIC_MODELS,
        )
        run.results["targets"] = _targets(run.results["models"])
        results = run.finish(reference=reference_model(run.results))
        if run.context.is_main_process:
            _pictures(config, splits["test"], trained, results)
        return results


def _pictures(config: InrEditConfig, test: InrSource, trained: dict[str, nn.Module], results: dict[str, Any]) -> None:
    """``inr_edits.png`` (the last seed's model of each kind on a few test digits) and ``inr_learning_curves.png``."""
    shown = test.batch(torch.arange(min(config.num_pictures, len(test)), device=test.device))
    edited: dict[str, Tensor] = {}
    shown_mse: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, model in trained.items():
            model.eval()
            rendering = shown.render(*model(shown))
            edited[name] = rendering.cpu()
            shown_mse[name] = mse_per_inr(rendering, shown.target).cpu()
    plot_edits(test, shown.render().cpu(), edited, config.zoo.resolution, config.output_dir / "inr_edits.png",
               shown_mse)
    experiment.plot_learning_curves(results, config.output_dir / "inr_learning_curves.png", reference="no_edit",
                                    fixed=DETERMINISTIC_MODELS, title="INR editing (3x3 dilation): validation MSE",
                                    ylabel="validation MSE")


def _targets(models: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, checked: gradmetanet ≥ 20% below weight_space, and below probing."""
    checks: dict[str, Any] = {}
    for suffix in ("", "_sign"):
        grad, weights, probe = (models.get(f"{base}{suffix}") for base in ("gradmetanet", "weight_space", "probing"))
        if grad is None or weights is None:
            continue
        reduction = 100 * (weights["test_error_mean"] - grad["test_error_mean"]) / weights["test_error_mean"]
        checks[f"gradmetanet{suffix}_vs_weight_space{suffix}_pct"] = reduction
        checks[f"gradmetanet{suffix}_20pct_met"] = reduction >= 20.0
        if probe is not None:
            checks[f"gradmetanet{suffix}_beats_probing{suffix}"] = grad["test_error_mean"] < probe["test_error_mean"]
    return checks
