"""The paper's step-reduction benchmark (§7.2) and its baselines.

For every task and every evaluation seed ``s`` (initialisations ``s = 0, 1, …``, never
used in meta-training, which draws seeds from 1,000,000 on; the batches of seed ``s`` are
the same for every optimizer):

1. Adam, with its learning rate tuned on a grid (lowest best test loss, mean over the
   tuning seeds), trains for ``steps`` steps; ``L_s`` is its best test loss and ``N_s`` the
   step where it first gets there.
2. Every other optimizer trains on the same batches; ``n_s`` is the first step whose test
   loss is ``≤ L_s``. Its step reduction is ``N_s / n_s`` (the paper's metric); a run that
   never reaches ``L_s`` within the budget counts as ``N_s / steps`` — an upper bound — and
   is reported as not reached.
3. Wall-clock seconds per training step, relative to Adam's, on the same machine and run.

Baselines: SGD with momentum 0.9 (learning rate tuned on a grid too), the learned
optimizer without GradMetaNet ("DeepSets"), and ours.

The inner loop here is not :func:`gradgraph_lab.tasks.training.fit`: that loop trains a
metanetwork with Adam by epochs and keeps the best-on-validation weights, while this one is
the *object* of the measurement — any optimizer, one step per batch of a stream, the test
loss after every step — and must not select weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradgraph.optim import LearnedOptimizer, LearnedUpdate
from gradgraph_lab.tasks.learned_optimizer.tasks import BenchmarkTask

__all__ = ["Curve", "TaskResult", "benchmark_task", "log_grid", "step_reduction", "train_curve", "tune_learning_rate"]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Curve:
    """Test loss along one training run.

    Attributes:
        steps: evaluation steps (0 = before training).
        test_loss: test loss at those steps.
        seconds_per_step: mean wall time of a training step (evaluation excluded).
        diverged: the training loss became non-finite (the run stopped there).
    """

    steps: list[int]
    test_loss: list[float]
    seconds_per_step: float
    diverged: bool = False

    @property
    def best(self) -> tuple[float, int]:
        """``(best test loss, first step where it is reached)``."""
        index = min(range(len(self.test_loss)), key=lambda i: (self.test_loss[i], i))
        return self.test_loss[index], self.steps[index]

    def first_reaching(self, target: float) -> int | None:
        """First evaluation step with test loss ``≤ target`` (``None``: never)."""
        return next((step for step, loss in zip(self.steps, self.test_loss) if loss <= target), None)


def log_grid(low: float, high: float, size: int) -> list[float]:
    """``size`` learning rates log-spaced from ``10**low`` to ``10**high`` (the tuning grids)."""
    return torch.logspace(low, high, size, dtype=torch.float64).tolist()


def train_curve(bench: BenchmarkTask, optimizer: OptimizerFactory | LearnedUpdate, seed: int, steps: int,
                eval_every: int | None = None) -> Curve:
    """Train a fresh model (init ``seed``, batches from ``seed``) and record its test loss.

    Runs on the task's device (the models and batches ``bench`` makes live there).

    Args:
        bench: the task.
        optimizer: a factory ``model -> torch.optim.Optimizer`` (backward + step), or a
            :class:`LearnedUpdate` (a :class:`LearnedOptimizer` stepping with a closure).
        seed: initialisation and batch-stream seed.
        steps: training steps.
        eval_every: test-set evaluation period in steps (``None``: the task's :attr:`BenchmarkTask.eval_every`).
    """
    task = bench.task
    eval_every = eval_every or bench.eval_every
    model = task.make_model(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    learned = isinstance(optimizer, LearnedUpdate)
    opt = LearnedOptimizer(model, optimizer) if learned else optimizer(model)
    curve_steps, losses = [0], [bench.test_loss(model)]
    train_seconds = 0.0
    diverged = False
    for step in range(1, steps + 1):
        inputs, targets = task.sample_batch(generator)
        start = time.perf_counter()
        if learned:
            loss = opt.step(lambda: task.loss_fn(model(inputs, **task.forward_kwargs), targets))
        else:
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(inputs, **task.forward_kwargs), targets).mean()
            loss.backward()
            opt.step()
        train_seconds += time.perf_counter() - start
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        if step % eval_every == 0 or step == steps:
            test = bench.test_loss(model)
            if not math.isfinite(test):
                diverged = True
                break
            curve_steps.append(step)
            losses.append(test)
    return Curve(curve_steps, losses, train_seconds / max(curve_steps[-1], 1), diverged)


def tune_learning_rate(bench: BenchmarkTask, make: Callable[[float], OptimizerFactory], grid: Sequence[float],
                       seeds: Sequence[int], steps: int, eval_every: int | None = None,
                       progress: Callable[[], None] | None = None) -> tuple[float, dict[float, float]]:
    """The grid value with the lowest best test loss (mean over ``seeds``); also every value's score."""
    scores = {}
    for lr in grid:
        bests = []
        for seed in seeds:
            curve = train_curve(bench, make(lr), seed, steps, eval_every)
            bests.append(math.inf if curve.diverged else curve.best[0])
            if progress is not None:
                progress()
        scores[lr] = sum(bests) / len(bests)
    return min(scores, key=scores.get), scores


def step_reduction(reference: Curve, other: Curve, steps: int) -> tuple[float, bool]:
    """``(N / n, reached)`` with ``N`` the reference's best step, ``n`` the other's first step at that loss."""
    target, best_step = reference.best
    first = other.first_reaching(target)
    if first is None:
        return best_step / steps, False
    return best_step / max(first, 1), True


@dataclass
class TaskResult:
    """Everything measured on one task (JSON-serialisable through ``to_dict``)."""

    task: str
    steps: int
    seeds: list[int]
    tuned: dict[str, float] = field(default_factory=dict)
    grid_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, list[Curve]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per optimizer: step reduction mean/std, runs reaching Adam's loss, time per step vs Adam."""
        adam = self.curves["adam"]
        adam_time = sum(c.seconds_per_step for c in adam) / len(adam)
        rows = {}
        for name, curves in self.curves.items():
            ratios, reached = [], 0
            for ref, curve in zip(adam, curves):
                ratio, ok = step_reduction(ref, curve, self.steps)
                ratios.append(ratio)
                reached += ok
            mean = sum(ratios) / len(ratios)
            std = (sum((r - mean) ** 2 for r in ratios) / max(len(ratios) - 1, 1)) ** 0.5
            rows[name] = {
                "step_reduction_mean": mean,
                "step_reduction_std": std,
                "reached": reached,
                "runs": len(curves),
                "best_test_loss_mean": sum(c.best[0] for c in curves) / len(curves),
                "seconds_per_step": sum(c.seconds_per_step for c in curves) / len(curves),
                "time_vs_adam": sum(c.seconds_per_step for c in curves) / len(curves) / adam_time,
            }
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "steps": self.steps, "seeds": self.seeds, "tuned_lr": self.tuned,
            "grid_scores": self.grid_scores, "summary": self.summary(),
            "adam_target": [{"loss": c.best[0], "step": c.best[1]} for c in self.curves["adam"]],
            "curves": {name: [{"steps": c.steps, "test_loss": c.test_loss, "diverged": c.diverged} for c in curves]
                       for name, curves in self.curves.items()},
        }


def benchmark_task(bench: BenchmarkTask, learned: dict[str, LearnedUpdate], *, steps: int, seeds: Sequence[int],
                   tuning_seeds: Sequence[int], adam_grid: Sequence[float], sgd_grid: Sequence[float] | None,
                   eval_every: int | None = None, progress: bool = True) -> TaskResult:
    """Tune Adam (and SGD+momentum), then run every optimizer on ``seeds``; see the module docstring.

    Args:
        bench: the task.
        learned: ``{label: meta-model}`` learned optimizers to compare (e.g. ``gradmetanet``, ``deepsets``).
        steps: step budget of every run.
        seeds: evaluation seeds (≥ 5 for the paper's metric).
        tuning_seeds: seeds of the learning-rate grid search.
        adam_grid, sgd_grid: learning-rate grids (``sgd_grid=None`` skips SGD+momentum).
        eval_every: test-set evaluation period (``None``: the task's).
    """
    from tqdm.auto import tqdm

    total = (len(adam_grid) + len(sgd_grid or ())) * len(tuning_seeds)
    total += len(seeds) * (1 + (sgd_grid is not None) + len(learned))
    result = TaskResult(bench.task.name, steps, list(seeds))
    with tqdm(total=total, desc=f"benchmark {bench.task.name}", unit="run", disable=not progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731

        def adam(lr: float) -> OptimizerFactory:
            return lambda model: torch.optim.Adam(model.parameters(), lr=lr)

        def sgdm(lr: float) -> OptimizerFactory:
            return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        factories: dict[str, OptimizerFactory | LearnedUpdate] = {}
        for name, make, grid in (("adam", adam, adam_grid), ("sgdm", sgdm, sgd_grid)):
            if grid is None:
                continue
            best, scores = tune_learning_rate(bench, make, grid, tuning_seeds, steps, eval_every, tick)
            result.tuned[name] = best
            result.grid_scores[name] = {f"{lr:.3g}": score for lr, score in scores.items()}
            factories[name] = make(best)
        factories.update(learned)
        for name, optimizer in factories.items():
            result.curves[name] = []
            for seed in seeds:
                result.curves[name].append(train_curve(bench, optimizer, seed, steps, eval_every))
                tick()
    return result
