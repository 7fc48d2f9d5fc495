"""``gradgraph learned-optimizer``: the benchmark run (tables, plot, ``results.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradgraph.datasets.atomic import atomic_write_bytes
from gradgraph_lab.distributed import resolve_device
from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate, load_pretrained, meta_model_from_checkpoint
from gradgraph_lab.tasks.learned_optimizer.benchmark import TUNING_SEEDS_FROM, TaskResult, benchmark_task, log_grid
from gradgraph_lab.tasks.experiment import machine_info, write_results
from gradgraph_lab.tasks.learned_optimizer.tasks import TASK_NAMES, get_task

__all__ = ["PRETRAINED_FOR_TASK", "BenchmarkConfig", "format_table", "load_meta_model", "pretrained_for", "run_benchmark"]

#: rows of the table besides the target's reference runs: ``adam`` (the control), ``adam-cosine``, ``sgdm``
#: (SGD + momentum, tuned) and the learned optimizers: ``learned-sgdm`` (the paper's SGDM variant: only
#: α, μ and a schedule meta-learned), ``deepsets``, ``gradmetanet``
#: (:mod:`~gradgraph_lab.tasks.learned_optimizer.benchmark`).
OPTIMIZERS = ("adam", "adam-cosine", "sgdm", "learned-sgdm", "deepsets", "gradmetanet")
#: the learned rows, each with the :class:`BenchmarkConfig` field naming its file.
LEARNED_ROWS = {"learned-sgdm": "learned_sgdm", "deepsets": "deepsets", "gradmetanet": "gradmetanet"}

#: the shipped GradMetaNet meta-model each task is benchmarked with when none is named (the
#: DeepSets variant's file adds ``-deepsets``, the learned SGDM's ``-sgdm``). Every MLP task uses the
#: main task's files (MNIST-1D, issue 29): the wide and tanh MLPs and digits are held out from them.
PRETRAINED_FOR_TASK = {"mnist1d": "mnist1d-mlp", "mnist1d-wide": "mnist1d-mlp", "mnist1d-tanh": "mnist1d-mlp",
                       "digits": "mnist1d-mlp", "digits-wide": "mnist1d-mlp", "charlm": "charlm-transformer"}


@dataclass
class BenchmarkConfig:
    """One benchmark run.

    Attributes:
        tasks: task names (:data:`TASK_NAMES`).
        optimizers: which of :data:`OPTIMIZERS` to run besides Adam (always run: it is the reference).
        gradmetanet, deepsets, learned_sgdm: meta-model of each learned variant: a shipped name
            (``"digits-mlp"``) or the path of an export / trainer checkpoint, used on every
            task; ``None``: each task's shipped file (:func:`pretrained_for`).
        steps: step budget of every run (the paper protocol's meta-training horizon,
            :data:`gradgraph.optim.PAPER_PROTOCOL`; a rule meta-trained with a shorter horizon is
            tested past it).
        seeds: test seeds ``0 .. seeds-1`` (initialisations and batch orders unseen in
            meta-training); the target's reference runs use as many seeds from 300 on.
        tuning_seeds: seeds of the learning-rate searches (``100, 101, …``, on the validation split).
        grid_size: learning rates per grid (Adam: 1e-4..1e-1, the cosine row's peak and SGD+momentum:
            1e-3..1, log-spaced; the paper's 20).
        window: trailing smoothing window of every curve, in evaluations (``benchmark.smooth``).
        target_fraction: Adam's tuning and reference runs get this fraction of ``steps``
            (``benchmark`` module docstring: so that the control can score below 1).
        out_dir: where ``results.json``, ``results.md`` and ``loss_vs_step.png`` go.
        progress: tqdm bars.
        device: ``--device`` value (:func:`gradgraph_lab.distributed.resolve_device`): every model,
            batch, test set and learned optimizer runs there.
    """

    tasks: tuple[str, ...] = ("mnist1d",)
    optimizers: tuple[str, ...] = ("adam", "adam-cosine", "gradmetanet")
    gradmetanet: str | None = None
    deepsets: str | None = None
    learned_sgdm: str | None = None
    steps: int = 500
    seeds: int = 20
    tuning_seeds: int = 3
    grid_size: int = 20
    window: int = 5
    target_fraction: float = 0.8
    out_dir: str = "runs/learned-optimizer/benchmark"
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_NAMES] + [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise GradGraphError(f"unknown task/optimizer {unknown}; tasks: {TASK_NAMES}, optimizers: {OPTIMIZERS}")
        if self.steps < 1 or self.seeds < 1 or self.tuning_seeds < 1 or self.grid_size < 2 or self.window < 1:
            raise GradGraphError("BenchmarkConfig needs steps, seeds, tuning_seeds, window >= 1 and grid_size >= 2")


def load_meta_model(spec: str) -> LearnedUpdate:
    """A shipped meta-model by name, or one from an export / trainer checkpoint file."""
    path = Path(spec)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if checkpoint.get("kind") == "meta-training":  # a checkpoint written by run_meta_training
            checkpoint = checkpoint["state"]["trainer"]
        return meta_model_from_checkpoint(checkpoint)
    return load_pretrained(spec)


def pretrained_for(task: str, variant: str) -> str:
    """The shipped meta-model ``task`` is benchmarked with by default (:data:`PRETRAINED_FOR_TASK`)."""
    name = PRETRAINED_FOR_TASK[task]
    return name if variant == "gradmetanet" else f"{name}-{variant.removeprefix('learned-')}"


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark; write ``results.json``, ``results.md`` and ``loss_vs_step.png``; return the results."""
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, LearnedUpdate] = {}
    meta_models: dict[str, dict[str, str]] = {}
    results: list[TaskResult] = []
    for task_name in config.tasks:
        bench = get_task(task_name, device)
        learned = {}
        for variant, field_name in LEARNED_ROWS.items():
            if variant in config.optimizers:
                spec = getattr(config, field_name) or pretrained_for(task_name, variant)
                if spec not in loaded:
                    loaded[spec] = load_meta_model(spec).to(device)
                learned[variant] = loaded[spec]
                meta_models.setdefault(task_name, {})[variant] = spec
        results.append(benchmark_task(
            bench, learned, steps=config.steps, seeds=list(range(config.seeds)),
            tuning_seeds=[TUNING_SEEDS_FROM + i for i in range(config.tuning_seeds)],
            adam_grid=log_grid(-4, -1, config.grid_size),
            sgd_grid=log_grid(-3, 0, config.grid_size) if "sgdm" in config.optimizers else None,
            cosine="adam-cosine" in config.optimizers, cosine_grid=log_grid(-3, 0, config.grid_size),
            window=config.window, target_fraction=config.target_fraction,
            progress=config.progress,
        ))
    payload = {"config": asdict(config), "meta_models": meta_models, "device": str(device), "machine": machine_info(),
               "world_size": 1, "tasks": [r.to_dict() for r in results]}
    write_results(payload, out_dir)  # atomic: an interrupted run never leaves half a file
    table = format_table(results)
    atomic_write_bytes(out_dir / "results.md", (table + "\n").encode())
    _plot(results, out_dir / "loss_vs_step.png")
    return payload


def format_table(results: list[TaskResult]) -> str:
    """A markdown table per task: Adam's target, then per row the step reduction ``N / n``
    (median and mean, 95% bootstrap intervals), runs reaching ``L*``, median training time to
    ``L*``, time per step and best test loss."""
    lines = []
    for result in results:
        target = result.target
        lines += [f"**{result.task}**: {result.steps} steps, {len(result.seeds)} test seeds; target L* = "
                  f"{target.loss:.4f} (minimum of the mean of Adam's {len(result.reference_seeds)} reference runs, lr "
                  f"{result.tuned['adam']:.3g}, trailing mean over {target.window} evaluations), N = {target.step:g} "
                  + ("(the mean curve's step: fewer than half of the runs reached L*)" if target.from_mean_curve
                     else "(the reference runs' median first step at L*)"), "",
                  "| optimizer | lr | reached L* | step reduction, median [95% CI] | mean [95% CI] | "
                  "time to L* (median) | time/step | vs Adam | best test loss (mean) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        summary = result.summary()
        if "adam-cosine" in result.curves:  # the paired comparison with the stronger reference row
            lines[-2] += " vs cosine Adam, paired median [95% CI] |"
            lines[-1] += "---|"
        for name, row in summary.items():
            lr = f"{result.tuned[name]:.3g}" if name in result.tuned else "learned"
            bound = "≤ " if row["reached"] < row["runs"] else ""  # unreached runs count N / steps, a bound
            seconds = row["seconds_to_target_median"]
            lines.append(
                f"| {name}{' (control)' if name == 'adam' else ''} | {lr} | {row['reached']}/{row['runs']} | "
                f"{row['step_reduction_median']:.2f} [{row['median_low']:.2f}, {row['median_high']:.2f}] | "
                f"{bound}{row['step_reduction_mean']:.2f} [{row['mean_low']:.2f}, {row['mean_high']:.2f}] | "
                f"{'not reached' if math.isinf(seconds) else f'{seconds:.2f} s'} | "
                f"{row['seconds_per_step'] * 1e3:.2f} ms | {row['time_vs_adam']:.1f}× | "
                f"{row['best_test_loss_mean']:.4f} |"
                + (f" {row['vs_cosine_median']:.2f} [{row['vs_cosine_low']:.2f}, {row['vs_cosine_high']:.2f}] |"
                   if "vs_cosine_median" in row else "")
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def _plot(results: list[TaskResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for axis, result in zip(axes[0], results):
        for name, curves in result.curves.items():
            length = min(len(c.test_loss) for c in curves)
            steps = curves[0].steps[:length]
            mean = torch.tensor([c.test_loss[:length] for c in curves]).mean(0)
            axis.plot(steps, mean.tolist(), label=name)
        axis.axhline(result.target.loss, color="gray", linestyle=":", label="target L* (Adam's reference)")
        axis.set_title(result.task)
        axis.set_xlabel("step")
        axis.set_ylabel("test loss")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
