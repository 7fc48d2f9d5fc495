"""What an experiment's results are and how they are reported: ``results.json`` (written
atomically, with the machine it ran on), mean ± std summaries, the improvement over a
reference, the results table, the learning-curve plot, and merging the results of runs that
differ only in their seeds (one process or machine per seed).

Layout of ``results`` (JSON): ``metric``, ``config``, ``machine`` (platform, CPU, torch,
threads, device, ``world_size``), ``models`` (``{name: entry}``, see
:func:`gradgraph_lab.tasks.experiment.run_seeds`), plus whatever the task adds
(``wall_seconds``, ``data_seconds``...); a merged file adds ``merged_from``.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from gradgraph.datasets.atomic import atomic_write_bytes
from gradgraph_lab.distributed import SINGLE_PROCESS, DistributedContext
from gradgraph.differences import config_differences, describe_differences, jsonable
from gradgraph.errors import GradGraphError

__all__ = [
    "add_improvement",
    "jsonable",
    "machine_info",
    "merge_results",
    "new_results",
    "plot_learning_curves",
    "read_results",
    "results_table",
    "summarize",
    "write_results",
]

#: Per-seed lists of a model's entry, aligned with its ``seeds``.
PER_SEED_FIELDS = ("test_errors", "train_seconds", "best_epochs", "histories")

#: Config fields that may differ between runs that are merged: which seeds and models ran,
#: where and how; not what was trained on or how.
RUN_ONLY_FIELDS = ("seeds", "models", "output_dir", "cache_root", "progress", "device", "resume")
#: Fields of a config's ``train`` that may differ between merged runs: how long each was let
#: run and how it showed progress (a capped run's history says how many epochs it ran).
RUN_ONLY_TRAIN_FIELDS = ("max_seconds", "progress", "description")


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, std)`` of ``values`` (population std; 0 for a single value), in float64."""
    if len(values) == 0:
        raise ValueError("summarize: no values")
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std(unbiased=False)) if len(values) > 1 else 0.0



def add_improvement(results: dict[str, Any], reference: str) -> None:
    """Set every model's ``improvement_pct``: how much lower its mean error is than
    ``reference``'s, in % of the reference's (positive = better)."""
    base = results["models"][reference]["test_error_mean"]
    for entry in results["models"].values():
        entry["improvement_pct"] = 100.0 * (base - entry["test_error_mean"]) / base if base else math.nan


def machine_info(context: DistributedContext | None = None) -> dict[str, Any]:
    """Where a run happened: platform, CPU, core count, torch version and threads, the
    device, and the processes (``world_size``, backend)."""
    context = context or SINGLE_PROCESS
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **context.describe(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_results(metric: str, config: Any, context: DistributedContext | None = None, **extra: Any) -> dict[str, Any]:
    """The skeleton of a ``results.json``: the metric's description, the configuration (a
    dataclass or dict), machine info with ``world_size``, an empty ``models`` dict, ``extra``."""
    context = context or SINGLE_PROCESS
    return {
        "metric": metric,
        "config": jsonable(asdict(config) if is_dataclass(config) else config),
        "machine": machine_info(context),
        "world_size": context.world_size,
        **extra,
        "models": {},
    }


def write_results(results: dict[str, Any], output_dir: Path | str, context: DistributedContext | None = None,
                  *, name: str = "results.json") -> Path:
    """Write ``results`` as JSON to ``output_dir/name`` atomically (temp file + rename), on
    rank 0 only; returns the path (on every rank). NaN/Inf become ``null``."""
    context = context or SINGLE_PROCESS
    path = Path(output_dir) / name
    if context.is_main_process:
        atomic_write_bytes(path, json.dumps(jsonable(results), indent=2).encode())
    return path



def results_table(
    results: dict[str, Any],
    *,
    metric_header: str = "test error",
    reference: str | None = None,
    fixed: Sequence[str] = (),
) -> str:
    """A plain-text table: model, mean ± std of the test error, change against
    ``reference`` (needs :func:`add_improvement`), training seconds per seed (``—`` for the
    ``fixed`` models, which are not trained)."""
    header = ["model", metric_header] + (["vs " + reference] if reference else []) + ["train s/seed"]
    rows = [tuple(header)]
    for name, entry in results["models"].items():
        seconds = entry["train_seconds"]
        row = [entry["label"], f"{entry['test_error_mean']:.4f} ± {entry['test_error_std']:.4f}"]
        if reference:
            row.append("—" if name == reference else f"{entry['improvement_pct']:+.1f}%")
        row.append("—" if name in fixed or not seconds else f"{sum(seconds) / len(seconds):.0f}")
        rows.append(tuple(row))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot_learning_curves(
    results: dict[str, Any],
    path: Path | str,
    *,
    reference: str,
    fixed: Sequence[str] = (),
    title: str = "",
    ylabel: str = "validation error",
    context: DistributedContext | None = None,
) -> None:
    """Learning curves as a PNG (rank 0 only).

    Left: validation error per epoch (mean over seeds, log scale; a band of ± std; over the
    epochs every seed ran, when a time budget stopped seeds at different epochs) of every
    trained model, ``reference`` dashed. Right: the same divided by the reference's error
    (1.0 = no better), for the models whose best mean is within 50% of it. The ``fixed``
    models (no training) other than the reference are dotted horizontal lines.
    """
    if not (context or SINGLE_PROCESS).is_main_process:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = results["models"]
    base = models[reference]["histories"][0][0]["val_error"]
    for index, (name, entry) in enumerate(models.items()):
        histories = entry["histories"]
        color = f"C{index}"  # the same colour for a model in both panels
        if name in fixed and name != reference and histories:
            value = histories[0][0]["val_error"]  # a fixed estimator: one horizontal line
            left.axhline(value, color=color, linestyle=":", label=entry["label"])
            right.axhline(value / base, color=color, linestyle=":", label=entry["label"])
            continue
        if name == reference or not histories or len(histories[0]) <= 1:
            continue
        # Seeds stopped by a time budget ran different numbers of epochs: the curve is drawn
        # over the epochs every seed reached.
        common = min(len(history) for history in histories)
        epochs = [row["epoch"] for row in histories[0][:common]]
        curves = torch.tensor([[row["val_error"] for row in history[:common]] for history in histories])
        mean, spread = curves.mean(0), curves.std(0, unbiased=False)
        for axis, scale in ((left, 1.0), (right, 1.0 / base)):
            if axis is right and float(mean.min()) > 1.5 * base:
                continue
            axis.plot(epochs, mean * scale, label=entry["label"], color=color)
            if len(histories) > 1:
                axis.fill_between(epochs, (mean - spread) * scale, (mean + spread) * scale, alpha=0.2, color=color)
    left.axhline(base, color="black", linestyle="--", label=models[reference]["label"])
    right.axhline(1.0, color="black", linestyle="--", label=models[reference]["label"])
    left.set_yscale("log")
    left.set_ylabel(ylabel)
    right.set_ylabel(f"validation error / {models[reference]['label'].split(' (')[0]}'s")
    for axis in (left, right):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def read_results(path: Path | str) -> dict[str, Any]:
    """The ``results.json`` at ``path``, or in the directory ``path``; a clear error if absent or not JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GradGraphError(f"no results file at {path}") from None
    except json.JSONDecodeError as error:
        raise GradGraphError(f"{path} is not a results.json ({error})") from None


def _comparable(key: str, value: Any) -> Any:
    """A config field as merging compares it: ``train`` without :data:`RUN_ONLY_TRAIN_FIELDS`."""
    if key == "train" and isinstance(value, Mapping):
        return {name: item for name, item in value.items() if name not in RUN_ONLY_TRAIN_FIELDS}
    return value


def _time_budget(part: Mapping[str, Any]) -> float | None:
    train = part.get("config", {}).get("train")
    return train.get("max_seconds") if isinstance(train, Mapping) else None


def merge_results(parts: Sequence[Mapping[str, Any]], *, reference: str,
                  sources: Sequence[str] | None = None) -> dict[str, Any]:
    """One ``results`` from runs of the same experiment that differ only in their seeds or models.

    Typical use: one process (or machine) per seed or model, ``--seed K`` each, then one
    table. Every part must have the same metric and the same config up to
    :data:`RUN_ONLY_FIELDS` (seeds, models, where it ran) and :data:`RUN_ONLY_TRAIN_FIELDS`
    (each run's time budget: the merged config keeps the largest, ``None`` if any run had
    none, and ``merged_from`` every part's). A model's
    per-seed lists (:data:`PER_SEED_FIELDS`) are joined and sorted by seed, and its mean ± std
    recomputed; a seed present in several parts (the deterministic models run seed 0 in every
    part) must have the same test error in each, and is kept once. ``improvement_pct`` is
    recomputed against ``reference``.

    Args:
        parts: the ``results`` dictionaries (e.g. :func:`read_results`), at least one.
        reference: the model the improvement is measured against (it must be in the parts).
        sources: a name per part for messages and ``merged_from`` (default ``part 0, 1, ...``).

    Returns:
        The merged ``results``: the first part's metric, config (``seeds`` = every seed of a
        trained model, ``models`` = every model) and machine; ``models``; ``merged_from`` = per part its source,
        machine, seeds per model, ``wall_seconds``.

    Raises:
        GradGraphError: no parts, different metrics or configs (naming the field and the two
            parts), a repeated seed with different results, or ``reference`` missing.
    """
    if not parts:
        raise GradGraphError("merge_results needs at least one results dictionary")
    names = list(sources) if sources is not None else [f"part {index}" for index in range(len(parts))]
    if len(names) != len(parts):
        raise GradGraphError(f"merge_results: {len(parts)} parts but {len(names)} sources")
    first = parts[0]
    for name, part in zip(names[1:], parts[1:]):
        if part.get("metric") != first.get("metric"):
            raise GradGraphError(f"{name} measures {part.get('metric')!r}, {names[0]} {first.get('metric')!r}: "
                                 "not the same experiment")
        differences = [difference
                       for key in sorted(set(first.get("config", {})) | set(part.get("config", {})))
                       if key not in RUN_ONLY_FIELDS
                       for difference in config_differences(_comparable(key, first["config"].get(key)),
                                                            _comparable(key, part["config"].get(key)), f"config.{key}")]
        if differences:
            raise GradGraphError(f"the configs differ ({describe_differences(differences, names[0] + ' has', name + ' has')}); "
                                 "only runs that differ in their seeds or models can be merged")
    models: dict[str, dict[str, Any]] = {}
    for name, part in zip(names, parts):
        for model, entry in part["models"].items():
            merged = models.setdefault(model, {"entry": entry, "by_seed": {}})
            for index, seed in enumerate(entry["seeds"]):
                row = {field: entry[field][index] for field in PER_SEED_FIELDS}
                if seed in merged["by_seed"]:
                    kept, kept_from = merged["by_seed"][seed]
                    if not math.isclose(kept["test_errors"], row["test_errors"], rel_tol=1e-9, abs_tol=1e-12):
                        raise GradGraphError(
                            f"{model} seed {seed} is in {kept_from} (test error {kept['test_errors']}) and in {name} "
                            f"({row['test_errors']}): the same seed with different results cannot be merged"
                        )
                    continue
                merged["by_seed"][seed] = (row, name)
    if reference not in models:
        raise GradGraphError(f"merge_results: the reference model {reference!r} is in none of the parts "
                             f"(models: {sorted(models)})")
    results = {key: value for key, value in first.items() if key not in ("models", "wall_seconds", "data_seconds")}
    results["models"] = {}
    all_seeds: set[int] = set()
    for model, merged in models.items():
        seeds = sorted(merged["by_seed"])
        entry = {key: value for key, value in merged["entry"].items() if key not in PER_SEED_FIELDS}
        entry["seeds"] = seeds
        for field in PER_SEED_FIELDS:
            entry[field] = [merged["by_seed"][seed][0][field] for seed in seeds]
        entry["test_error_mean"], entry["test_error_std"] = summarize(entry["test_errors"])
        results["models"][model] = entry
        if any(seconds for seconds in entry["train_seconds"]):
            all_seeds.update(seeds)
    results["config"] = {**first.get("config", {}), "seeds": sorted(all_seeds) or [0], "models": list(models)}
    budgets = [_time_budget(part) for part in parts]
    if isinstance(results["config"].get("train"), dict):
        results["config"]["train"] = {**results["config"]["train"],
                                      "max_seconds": None if None in budgets else max(budgets)}
    results["merged_from"] = [
        {"source": name, "machine": part.get("machine"), "wall_seconds": part.get("wall_seconds"),
         "max_seconds": budget, "seeds": {model: entry["seeds"] for model, entry in part["models"].items()}}
        for name, part, budget in zip(names, parts, budgets)
    ]
    add_improvement(results, reference=reference)
    return results
