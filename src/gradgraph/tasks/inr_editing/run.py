"""The INR-editing experiment (GradMetaNet, Gelberg et al. 2025, §7.3): configuration, runs,
results table, ``results.json`` and a picture of the edits.

For each model of :data:`~gradgraph.tasks.inr_editing.models.MODEL_NAMES` and each training
seed: train on the training INRs with :func:`gradgraph.tasks.training.fit` (loss: MSE between
the edited INR's rendering and the dilated image on the full grid), keep the epoch with the
lowest validation MSE, report the test MSE (mean over test INRs; then mean ± std over seeds).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.data.cache import atomic_write_bytes
from gradgraph.data.curvature import GraphBatcher
from gradgraph.data.inr_zoo import InrZoo, InrZooConfig, load_inr_zoo
from gradgraph.errors import GradGraphError
from gradgraph.tasks.inr_editing.data import InrBatch, InrSource, mse_per_inr
from gradgraph.tasks.inr_editing.models import (
    MODEL_LABELS,
    MODEL_NAMES,
    EditModelConfig,
    FeatureScales,
    build_model,
    describe,
)
from gradgraph.tasks.training import FitResult, TrainConfig, evaluate, fit

__all__ = ["InrEditConfig", "edit_loss", "edit_error", "plot_edits", "preset", "results_table", "run_inr_editing"]

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
        device: where training runs (``"cpu"``, ``"cuda"``, ...).
        num_pictures: test digits shown in the picture.
        output_dir: where ``results.json`` and ``inr_edits.png`` go.
        cache_root: zoo cache (``None``: ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``).
        progress: progress bars and per-run lines.
    """

    zoo: InrZooConfig = field(default_factory=InrZooConfig)
    num_train: int = 1200
    num_val: int = 297
    num_test: int = 300
    split_seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, batch_size=32, lr=3e-3))
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = MODEL_NAMES
    model: EditModelConfig = field(default_factory=lambda: EditModelConfig(
        hidden_channels=16, component_channels=8, num_node_layers=2, product_channels=4))
    device: str = "cpu"
    num_pictures: int = 6
    output_dir: Path = Path("runs/inr-edit")
    cache_root: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.models if name not in MODEL_NAMES]
        if unknown:
            raise GradGraphError(f"unknown INR-editing model(s) {unknown}; choose from {MODEL_NAMES}")
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise GradGraphError(
                f"every split needs >= 1 INR, got train={self.num_train}, val={self.num_val}, test={self.num_test}"
            )
        needed = self.num_train + self.num_val + self.num_test
        if needed > self.zoo.num_images:
            raise GradGraphError(
                f"splits need {needed} INRs but the zoo has {self.zoo.num_images}; shrink the splits"
            )
        if not self.seeds:
            raise GradGraphError("InrEditConfig.seeds must hold at least one seed")
        self.output_dir = Path(self.output_dir)


def preset(name: str) -> InrEditConfig:
    """Named configurations.

    * ``default`` — every digit (1200 / 297 / 300), 16×16 grid, small models (``C = 16``,
      ``C_z = 8``, 2 node layers), 4 epochs, Adam 3e-3, batch 32, 3 seeds, all seven
      models: the README's run, sized for ≤ 10 minutes on 2 CPU cores once the zoo is cached.
    * ``paper`` — the same data, the full-size models (``C = 32``, ``C_z = 16``, 3 node
      layers), 100 epochs at Adam 1e-3 (the paper trains 150K steps with AdamW on a zoo
      ~30× larger), 5 seeds.
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
def make_splits(config: InrEditConfig, zoo: InrZoo) -> dict[str, InrSource]:
    """Train / val / test sources on ``config.device`` (one shared graph batcher)."""
    order = torch.randperm(len(zoo), generator=torch.Generator().manual_seed(config.split_seed))
    bounds = {
        "train": (0, config.num_train),
        "val": (config.num_train, config.num_train + config.num_val),
        "test": (config.num_train + config.num_val, config.num_train + config.num_val + config.num_test),
    }
    splits: dict[str, InrSource] = {}
    batcher: GraphBatcher | None = None
    for name, (start, stop) in bounds.items():
        splits[name] = InrSource.from_zoo(zoo, order[start:stop], device=config.device, batcher=batcher)
        batcher = splits[name].batcher
    return splits


def train_one(name: str, seed: int, config: InrEditConfig, splits: dict[str, InrSource],
              scales: FeatureScales) -> tuple[nn.Module, dict[str, Any]]:
    """Build and train model ``name`` with seed ``seed``; return it (best-validation weights) and its record."""
    torch.manual_seed(seed)
    model = build_model(name, scales, config.model, int(splits["train"].act.shape[-1])).to(config.device)
    if not any(p.requires_grad for p in model.parameters()):
        val_error = float(evaluate(model, splits["val"], edit_error).mean())
        fit_result = FitResult(history=[{"epoch": 0, "train_loss": math.nan, "val_error": val_error, "seconds": 0.0}],
                               best_val_error=val_error)
    else:
        train = replace(config.train, seed=seed, progress=config.progress, description=f"{name} seed {seed}")
        fit_result = fit(model, splits["train"], splits["val"], edit_loss, edit_error, train)
    test_error = float(evaluate(model, splits["test"], edit_error).mean())
    record = {"seed": seed, "test_mse": test_error, "fit": asdict(fit_result)}
    if config.progress:
        print(f"  {name:<18} seed {seed}: test MSE {test_error:.5f} "
              f"(best epoch {fit_result.best_epoch}, {fit_result.seconds:.0f}s)", flush=True)
    return model, record


def summarise(runs: list[dict[str, Any]], name: str, model: nn.Module) -> dict[str, Any]:
    """One model's entry of results.json: test MSE per seed, mean and (population) std."""
    values = torch.tensor([run["test_mse"] for run in runs], dtype=torch.float64)
    return {
        "label": MODEL_LABELS[name],
        "test_mse_mean": float(values.mean()),
        "test_mse_std": float(values.std(unbiased=False)) if len(values) > 1 else 0.0,
        "test_mse": values.tolist(),
        "seeds": [run["seed"] for run in runs],
        "train_seconds": [run["fit"]["seconds"] for run in runs],
        "best_epochs": [run["fit"]["best_epoch"] for run in runs],
        "histories": [run["fit"]["history"] for run in runs],
        "parameters": sum(p.numel() for p in model.parameters()),
        "description": describe(model),
    }


def write_results(results: dict[str, Any], path: Path) -> None:
    """``results.json``, written atomically (never half-written after an interrupt)."""
    atomic_write_bytes(path, json.dumps(_jsonable(results), indent=2).encode())


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: model, test MSE (×1e-2) mean ± std, change against ``no_edit`` and ``weight_space``."""
    models = results["models"]
    floor = models["no_edit"]["test_mse_mean"]
    reference = models.get("weight_space", {}).get("test_mse_mean")
    rows = [("model", "name", "test MSE ×1e-2", "vs no_edit", "vs weight_space", "train s/seed")]
    for name, entry in models.items():
        seconds = entry["train_seconds"]
        mean = entry["test_mse_mean"]
        rows.append((
            entry["label"],
            name,
            f"{100 * mean:.3f} ± {100 * entry['test_mse_std']:.3f}",
            "—" if name == "no_edit" else f"{100 * (floor - mean) / floor:+.1f}%",
            "—" if reference is None or name in ("no_edit", "weight_space") else
            f"{100 * (reference - mean) / reference:+.1f}%",
            "—" if name in DETERMINISTIC_MODELS else f"{sum(seconds) / len(seconds):.0f}",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


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
def run_inr_editing(config: InrEditConfig) -> dict[str, Any]:
    """Build (or load) the zoo, train every model for every seed, write results.json and the picture.

    Returns:
        The results dictionary written to ``output_dir/results.json``: per model the test
        MSE of every seed, their mean and std, training seconds, best epochs and learning
        curves; the zoo's fit quality (PSNR) and the wall time.
    """
    start = time.perf_counter()
    zoo = load_inr_zoo(config.zoo, cache_root=config.cache_root, progress=config.progress)
    data_seconds = time.perf_counter() - start
    splits = make_splits(config, zoo)
    scales = FeatureScales.measure(splits["train"])
    models = ["no_edit", *[name for name in config.models if name != "no_edit"]]
    results: dict[str, Any] = {
        "metric": "MSE between the edited INR's rendering and the dilated image on the full "
        f"{config.zoo.resolution}x{config.zoo.resolution} grid (pixels in [0, 1]), mean over test INRs; "
        "mean ± std over training seeds",
        "config": _jsonable(asdict(config)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": config.device},
        "zoo": {"num_inrs": len(zoo), "psnr_mean": float(zoo.psnr.mean()), "psnr_min": float(zoo.psnr.min()),
                "seconds": data_seconds},
        "models": {},
    }
    test = splits["test"]
    shown = test.batch(torch.arange(min(config.num_pictures, len(test)), device=test.device))
    edited: dict[str, Tensor] = {}
    shown_mse: dict[str, Tensor] = {}
    for name in models:
        runs, model = [], None
        for seed in config.seeds if name not in DETERMINISTIC_MODELS else (0,):
            model, record = train_one(name, seed, config, splits, scales)
            runs.append(record)
        results["models"][name] = summarise(runs, name, model)
        with torch.no_grad():  # the picture shows the last seed's model
            model.eval()
            rendering = shown.render(*model(shown))
            edited[name] = rendering.cpu()
            shown_mse[name] = mse_per_inr(rendering, shown.target).cpu()
        results["wall_seconds"] = time.perf_counter() - start
        config.output_dir.mkdir(parents=True, exist_ok=True)
        write_results(results, config.output_dir / "results.json")  # after every model: partial results survive
    results["targets"] = _targets(results["models"])
    results["wall_seconds"] = time.perf_counter() - start
    write_results(results, config.output_dir / "results.json")
    plot_edits(test, shown.render().cpu(), edited, config.zoo.resolution, config.output_dir / "inr_edits.png",
               shown_mse)
    return results


def _targets(models: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, checked: gradmetanet ≥ 20% below weight_space, and below probing."""
    checks: dict[str, Any] = {}
    for suffix in ("", "_sign"):
        grad, weights, probe = (models.get(f"{base}{suffix}") for base in ("gradmetanet", "weight_space", "probing"))
        if grad is None or weights is None:
            continue
        reduction = 100 * (weights["test_mse_mean"] - grad["test_mse_mean"]) / weights["test_mse_mean"]
        checks[f"gradmetanet{suffix}_vs_weight_space{suffix}_pct"] = reduction
        checks[f"gradmetanet{suffix}_20pct_met"] = reduction >= 20.0
        if probe is not None:
            checks[f"gradmetanet{suffix}_beats_probing{suffix}"] = grad["test_mse_mean"] < probe["test_mse_mean"]
    return checks


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
