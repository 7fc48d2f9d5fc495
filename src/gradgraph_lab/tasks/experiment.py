"""What every experiment shares: the process/device set-up, the split bounds, training and
testing one model for one seed, the loop over models and seeds. How results are summarised,
written (``results.json``, atomically), tabled, plotted and merged is
:mod:`gradgraph_lab.tasks.results` (re-exported here).

A task (curvature, INR editing) supplies only how to build one model and how to load its
data; the rest is here, so all tasks report the same way::

    def run_one(name: str, seed: int) -> SeedRun:
        torch.manual_seed(seed)
        model = build_model(name, ...).to(run.context.device)
        return train_and_test(model, splits, loss_fn, error_fn, config.train, seed=seed, name=name,
                              progress=config.progress, context=run.context)

    with ExperimentRun.open(config, metric="...", context=context) as run:
        data = run.load(load_zoo)                           # timed: results["data_seconds"]
        splits = ...                                        # split_bounds(...) for the ranges
        run.start_results()
        run.run_models(run_one, labels=LABELS, baseline="standard", deterministic=("standard",))
        results = run.finish(reference="standard")          # rank 0 writes results.json, atomically
    print(results_table(results, metric_header="test error", reference="standard"))

The lower-level pieces (:func:`new_results`, :func:`run_seeds`, :func:`add_improvement`,
:func:`write_results`) stay public for tasks with another shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph_lab.distributed import SINGLE_PROCESS, DistributedContext, init_distributed, resolve_device
from gradgraph_lab.tasks.results import (
    RUN_ONLY_FIELDS,
    RUN_ONLY_TRAIN_FIELDS,
    add_improvement,
    jsonable,
    machine_info,
    merge_results,
    new_results,
    plot_learning_curves,
    read_results,
    results_table,
    summarize,
    write_results,
)
from gradgraph_lab.tasks.training import BatchSource, FitResult, TrainConfig, evaluate, fit

__all__ = [
    "check_experiment",
    "checkpointing",
    "DEVICE_CHOICES",
    "ExperimentConfig",
    "ExperimentRun",
    "SeedRun",
    "add_improvement",
    "init_distributed",
    "jsonable",
    "machine_info",
    "merge_results",
    "new_results",
    "open_context",
    "plot_learning_curves",
    "read_results",
    "resolve_device",
    "results_table",
    "run_seeds",
    "split_bounds",
    "summarize",
    "train_and_test",
    "write_results",
]

#: Values of every task's ``--device`` flag.
DEVICE_CHOICES = ("cpu", "cuda", "auto")


@dataclass
class SeedRun:
    """One model trained (or fitted) with one seed and tested.

    Attributes:
        seed: the training seed.
        test_error: mean per-item test error.
        fit: the training curve (a one-row history for models without training).
        parameters: number of the model's parameters.
        description: ``repr`` of a model worth recording (fixed estimators), else ``None``.
        metrics: further test metrics of the run (``{"kendall_tau": 0.9}``); :func:`run_seeds`
            reports each one's per-seed values, mean and std.
    """

    seed: int
    test_error: float
    fit: FitResult
    parameters: int = 0
    description: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def check_experiment(
    config_name: str,
    item: str,
    *,
    models: Sequence[str],
    known: Sequence[str],
    splits: tuple[int, int, int],
    available: int,
    seeds: Sequence[int],
    device: str | None = None,
    hint: str = "shrink the splits",
) -> None:
    """The checks every experiment config makes: a known device, known models, non-empty
    splits that fit in the data set, at least one seed. Raises :class:`GradGraphError` naming
    the field.

    Args:
        config_name: the dataclass, for messages (``"CurvatureConfig"``).
        item: what one datapoint of the experiment is (``"network"``, ``"INR"``).
        models / known: the requested and the available model names.
        splits: ``(train, val, test)`` sizes; ``available``: how many items exist.
        seeds: the training seeds.
        device: one of :data:`DEVICE_CHOICES` or ``cuda:K`` (``None``: not checked).
        hint: what to do when the splits do not fit.
    """
    if device is not None and device not in DEVICE_CHOICES and not str(device).startswith("cuda:"):
        raise GradGraphError(f"{config_name}.device must be one of {DEVICE_CHOICES} or cuda:K, got {device!r}")
    unknown = [name for name in models if name not in known]
    if unknown:
        raise GradGraphError(f"{config_name}: unknown model(s) {unknown}; choose from {tuple(known)}")
    train, val, test = splits
    if min(train, val, test) < 1:
        raise GradGraphError(f"every split needs >= 1 {item}, got train={train}, val={val}, test={test}")
    if train + val + test > available:
        raise GradGraphError(f"splits need {train + val + test} {item}s but there are {available}; {hint}")
    if not seeds:
        raise GradGraphError(f"{config_name}.seeds must hold at least one seed")


def split_bounds(num_train: int, num_val: int, num_test: int) -> dict[str, tuple[int, int]]:
    """``{"train": (0, a), "val": (a, a + b), "test": (a + b, a + b + c)}``: the
    ``[start, stop)`` ranges of consecutive train, validation and test splits of sizes
    ``a, b, c`` (items after ``a + b + c`` are unused)."""
    return {
        "train": (0, num_train),
        "val": (num_train, num_train + num_val),
        "test": (num_train + num_val, num_train + num_val + num_test),
    }


def _how_it_ran(fit_result: FitResult) -> str:
    """``best epoch 7 of 9, resumed from epoch 4, stopped by the time budget`` (the parts that apply)."""
    last = fit_result.history[-1]["epoch"] if fit_result.history else 0
    parts = [f"best epoch {fit_result.best_epoch} of {last}"]
    if fit_result.resumed_from is not None:
        parts.append(f"resumed from epoch {fit_result.resumed_from}")
    if fit_result.stopped_by_budget:
        parts.append("stopped by the time budget")
    return ", ".join(parts)


def run_seeds(
    run_one: Callable[[int], SeedRun],
    seeds: Sequence[int],
    *,
    label: str,
    name: str | None = None,
    context: DistributedContext | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Run ``run_one(seed)`` for every seed and summarise.

    Args:
        run_one: trains and tests one model for one seed (seeding is its job).
        seeds: the seeds, in order.
        label: the model's name in tables and plots.
        name: its short name in the per-seed log lines (default: ``label``).
        context: the processes; only rank 0 logs.
        log: print one line per seed.

    Returns:
        The model's ``results["models"]`` entry: ``label``, ``test_errors`` (one per seed),
        ``test_error_mean``, ``test_error_std``, ``train_seconds``, ``best_epochs``,
        ``histories``, ``parameters``, ``description``, ``seeds``; and ``metrics``
        (``{name: {"values": per seed, "mean", "std"}}``) for the runs' :attr:`SeedRun.metrics`.
    """
    context = context or SINGLE_PROCESS
    runs: list[SeedRun] = []
    for seed in seeds:
        run = run_one(seed)
        runs.append(run)
        if log and context.is_main_process:
            print(f"  {name or label:<17} seed {seed}: test error {run.test_error:.4f} "
                  f"({_how_it_ran(run.fit)}, {run.fit.seconds:.0f}s)", flush=True)
    errors = [run.test_error for run in runs]
    mean, std = summarize(errors)
    return {
        "label": label,
        "seeds": [run.seed for run in runs],
        "test_error_mean": mean,
        "test_error_std": std,
        "test_errors": errors,
        "train_seconds": [run.fit.seconds for run in runs],
        "best_epochs": [run.fit.best_epoch for run in runs],
        "histories": [run.fit.history for run in runs],
        "parameters": runs[-1].parameters,
        "description": runs[-1].description,
        "metrics": {key: dict(zip(("mean", "std"), summarize(values)), values=values)
                    for key in runs[0].metrics for values in [[run.metrics[key] for run in runs]]},
    }


def train_and_test(
    model: nn.Module,
    splits: Mapping[str, BatchSource],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    error_fn: Callable[[nn.Module, Any], Tensor],
    train: TrainConfig,
    *,
    seed: int,
    name: str,
    progress: bool = True,
    context: DistributedContext | None = None,
    description: str | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    identity: Mapping[str, Any] | None = None,
) -> SeedRun:
    """Train ``model`` on ``splits["train"]`` (best epoch on ``splits["val"]``), test it on
    ``splits["test"]``: the body of every task's per-seed run.

    A model without trainable parameters (a fixed estimator) is not trained: its history is
    one row, epoch 0, with its validation error.

    Args:
        model: built and seeded by the caller, on ``context.device``.
        splits: ``"train"``, ``"val"`` and ``"test"`` sources.
        loss_fn: ``(model, batch) -> scalar`` training loss; ``error_fn``: ``(model, batch) -> [G]``
            per-item error (selects the epoch kept, and is the reported test error).
        train: optimiser settings; its ``seed``, ``progress`` and ``description``
            (``"<name> seed <seed>"``) are set here.
        seed, name: the run's seed and the model's short name.
        progress: a tqdm bar (rank 0 only).
        context: the processes and device.
        description: recorded in the results (e.g. the ``repr`` of a fixed estimator).
        checkpoint, resume, identity: the training's checkpoint file, whether to continue from
            it, and what must match to do so (:func:`gradgraph_lab.tasks.training.fit`;
            :func:`checkpointing` gives all three for a task's config).

    Returns:
        The :class:`SeedRun`: mean per-item test error, the fit, the parameter count.
    """
    if not any(parameter.requires_grad for parameter in model.parameters()):
        val_error = float(evaluate(model, splits["val"], error_fn, context=context).mean())
        fit_result = FitResult(history=[{"epoch": 0, "train_loss": math.nan, "val_error": val_error, "seconds": 0.0}],
                               best_val_error=val_error)
    else:
        train = replace(train, seed=seed, progress=progress, description=f"{name} seed {seed}")
        fit_result = fit(model, splits["train"], splits["val"], loss_fn, error_fn, train, context=context,
                         checkpoint=checkpoint, resume=resume, identity=identity)
    test_errors = evaluate(model, splits["test"], error_fn, context=context)
    return SeedRun(seed=seed, test_error=float(test_errors.mean()), fit=fit_result,
                   parameters=sum(parameter.numel() for parameter in model.parameters()), description=description)


#: Training settings that may change between a run and its resumption (:func:`checkpointing`):
#: those merged runs may differ in, the epoch count (a run can be extended), and the seed
#: (per run, and checked by ``fit`` itself).
RESUMABLE_TRAIN_FIELDS = (*RUN_ONLY_TRAIN_FIELDS, "epochs", "seed")


def checkpointing(config: "ExperimentConfig", name: str, seed: int) -> dict[str, Any]:
    """The checkpoint arguments of :func:`train_and_test` for model ``name`` and ``seed``.

    Every learned run writes ``<output_dir>/checkpoints/<name>-seed<seed>.pt`` after each
    epoch; with ``config.resume`` it continues from that file. The file must have been written
    by the same experiment: the same config up to where and how it runs (:data:`RUN_ONLY_FIELDS`)
    and the epoch count and time budget (:data:`RESUMABLE_TRAIN_FIELDS`), which a resumed run
    may change.

    Returns:
        ``{"checkpoint": Path, "resume": bool, "identity": dict}``.
    """
    settings = jsonable(asdict(config) if is_dataclass(config) else dict(vars(config)))
    identity = {key: value for key, value in settings.items() if key not in RUN_ONLY_FIELDS}
    if isinstance(identity.get("train"), dict):
        identity["train"] = {key: value for key, value in identity["train"].items()
                             if key not in RESUMABLE_TRAIN_FIELDS}
    return {"checkpoint": Path(config.output_dir) / "checkpoints" / f"{name}-seed{seed}.pt",
            "resume": bool(getattr(config, "resume", False)),
            "identity": {"config": identity, "model": name, "seed": seed}}


@contextmanager
def open_context(device: str, context: DistributedContext | None = None) -> Iterator[DistributedContext]:
    """The processes and device of one experiment run.

    A ``context`` passed in is yielded as it is and left open: its opener closes it (the CLI
    opens one to print a header first). Without one, it is opened here with
    :func:`init_distributed` (``torchrun``'s environment sets the ranks; alone: one process on
    ``device``) and torn down on exit, also when the run fails.
    """
    if context is not None:
        yield context
        return
    context = init_distributed(device)
    try:
        yield context
    finally:
        context.teardown()


class ExperimentConfig(Protocol):
    """The fields :class:`ExperimentRun` reads from a task's config dataclass."""

    zoo: Any
    cache_root: Path | None
    progress: bool
    device: str
    seeds: tuple[int, ...]
    models: tuple[str, ...]
    output_dir: Path
    resume: bool


_Data = TypeVar("_Data")


class ExperimentRun:
    """One run of an experiment: its processes, its clock, its ``results`` and where they go.

    Open it with :meth:`open` (a context manager: it owns the processes unless given a
    context), then :meth:`load` the data, :meth:`start_results`, :meth:`run_models` and
    :meth:`finish`.

    Attributes:
        config: the task's config (:class:`ExperimentConfig`).
        metric: the description of the reported error, for ``results.json``.
        context: the processes and device.
        start: ``time.perf_counter()`` when the run began (wall time counts from here).
        data_seconds: seconds :meth:`load` took.
        results: the ``results.json`` dictionary once :meth:`start_results` made it.
    """

    def __init__(self, config: ExperimentConfig, metric: str, context: DistributedContext) -> None:
        self.config = config
        self.metric = metric
        self.context = context
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.results: dict[str, Any] = {}

    @classmethod
    @contextmanager
    def open(cls, config: ExperimentConfig, metric: str,
             context: DistributedContext | None = None) -> Iterator["ExperimentRun"]:
        """A run of ``config`` inside :func:`open_context` (``config.device`` when ``context`` is ``None``)."""
        with open_context(config.device, context) as opened:
            yield cls(config, metric, opened)

    def load(self, loader: Callable[..., _Data]) -> _Data:
        """``loader(config.zoo, cache_root=, progress=, context=)`` (progress bars on rank 0 only), timed."""
        start = time.perf_counter()
        data = loader(self.config.zoo, cache_root=self.config.cache_root,
                      progress=self.config.progress and self.context.is_main_process, context=self.context)
        self.data_seconds = time.perf_counter() - start
        return data

    def start_results(self, **extra: Any) -> dict[str, Any]:
        """:func:`new_results` for this run, with ``data_seconds`` and ``extra``."""
        self.results = new_results(self.metric, self.config, self.context, data_seconds=self.data_seconds, **extra)
        return self.results

    def run_models(
        self,
        run_one: Callable[[str, int], SeedRun],
        *,
        labels: Mapping[str, str],
        baseline: str,
        deterministic: Sequence[str] = (),
    ) -> None:
        """Every model of ``config.models`` for every seed of ``config.seeds`` into ``results["models"]``.

        ``baseline`` runs first, requested or not; ``deterministic`` models (no training
        randomness) run once, with seed 0. After each model, ``wall_seconds`` is updated and
        ``results.json`` rewritten, so an interrupted run keeps the models it finished.

        Args:
            run_one: ``(name, seed) -> SeedRun`` (see :func:`train_and_test`).
            labels: every model's name in tables and plots.
            baseline: the model that always runs first.
            deterministic: models run with one seed.
        """
        names = [baseline, *[name for name in self.config.models if name != baseline]]
        for name in names:
            self.results["models"][name] = run_seeds(
                lambda seed, name=name: run_one(name, seed),
                self.config.seeds if name not in deterministic else (0,),
                label=labels[name],
                name=name,
                context=self.context,
                log=self.config.progress,
            )
            self.results["wall_seconds"] = time.perf_counter() - self.start
            write_results(self.results, self.config.output_dir, self.context)

    def finish(self, reference: str) -> dict[str, Any]:
        """Set ``improvement_pct`` against ``reference`` and the final ``wall_seconds``, write
        ``results.json`` (rank 0, atomically); returns ``results``."""
        add_improvement(self.results, reference=reference)
        self.results["wall_seconds"] = time.perf_counter() - self.start
        write_results(self.results, self.config.output_dir, self.context)
        return self.results


