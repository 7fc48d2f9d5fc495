"""The paper's step-reduction benchmark (§7.2), made able to tell (issue 29), and its baselines.

Seeds (initialisation ``s`` and batch stream ``10_000 + s``): **test** ``0 … n-1``;
**reference** ``300, 301, …`` (Adam's target; never scored); **tuning** ``100, 101, …`` (on
the task's *validation* split, never the test set); meta-training draws its own from
1,000,000 on and the validation protocol of meta-training uses ``200, …``. So every scored run
starts from an initialisation and sees a batch order that neither meta-training nor the
tuning saw.

1. **Tuning.** Adam's learning rate on a 20-value log grid (``1e-4 … 1e-1``, as the paper),
   and the peak rate of Adam with a cosine decay to 0 over the budget (the CLI's grid:
   ``1e-3 … 1``), each chosen on the validation split over the tuning seeds: lowest minimum of the seed-averaged, smoothed
   validation curve (the same statistic as the target below).
2. **The target** (:func:`reference_target`). Adam at its tuned rate trains on the reference
   seeds (twice as many as the test seeds by default: they are cheap and their noise is not in
   the intervals); their test-loss curves are averaged and smoothed with a trailing moving
   average of ``window`` evaluations (:func:`smooth`). ``L*`` is the minimum of that curve
   over the first ``target_fraction`` (80%) of the budget, and ``N`` the median over the
   reference runs of their first step whose own smoothed curve is ``≤ L*``. Why not the
   per-seed best of one curve (the benchmark until issue 29): that minimum sits on the noise
   of one run, so Adam run again at its own rate scored 0.80-0.83 against it. Why ``N`` from
   the runs and not from the mean curve: a noisy curve first dips below a level earlier than
   its mean does, so the mean curve's crossing step made Adam score 1.1-1.2 against itself
   (measured on digits, interval above 1); the median first passage of runs like the scored
   ones is what the control is compared with. Why 80%: Adam tuned for its lowest loss is
   still improving at the end of its budget, and a level reached only at the last step
   leaves a run a little slower than the mean no room to reach it. Adam's tuning uses the
   same 80% budget (its score is that ``L*``); the cosine row is tuned over the full budget
   it is scored on.
3. **Scoring** (:func:`score_run`). Every optimizer trains on the test seeds; ``n_s`` is the
   first step whose smoothed test loss (the same trailing window) is ``≤ L*``; the step
   reduction is ``N / n_s`` (the paper's metric); a run that never gets there within the
   full budget scores ``N / steps``, an upper bound, and is counted as not reached. Per optimizer: median and
   mean over seeds, each with a 95% percentile-bootstrap interval (:func:`bootstrap_interval`),
   runs reaching, the wall-clock training time to reach ``L*`` (median, evaluation
   excluded), time per step.
4. **Rows.** ``adam`` is the control: Adam at the reference's own rate on the test seeds; it
   must score 1.00 within its median's interval, else the benchmark cannot tell. (The mean
   of ``N / n_s`` lies above 1 for the control too — Jensen's inequality, ``E[N/n] ≥ N/E[n]`` —
   so read a row's mean against the control's mean; the median is the headline.) ``adam-cosine`` is
   the stronger reference (tuned cosine decay); ``sgdm`` (momentum 0.9, tuned on ``1e-3 … 1``)
   and the learned optimizers (``deepsets``, ``gradmetanet``) are scored the same way.

The step budget should be the meta-training horizon: a learned rule reads the step through
its time features and was never trained past its horizon.

The inner loop here is not :func:`gradgraph_lab.tasks.training.fit`: that loop trains a
metanetwork with Adam by epochs and keeps the best-on-validation weights, while this one is
the *object* of the measurement — any optimizer, one step per batch of a stream, the test
loss every ``eval_every`` steps — and must not select weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedOptimizer, LearnedUpdate
from gradgraph_lab.tasks.learned_optimizer.tasks import BenchmarkTask

__all__ = ["REFERENCE_SEEDS_FROM", "TUNING_SEEDS_FROM", "Curve", "RunScore", "Target", "TaskResult", "benchmark_task",
           "bootstrap_interval", "cosine_adam", "first_passage", "log_grid", "mean_curve", "reference_target",
           "score_run", "target_loss", "smooth", "step_reduction", "train_curve", "tune_learning_rate"]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

#: seeds of the learning-rate tuning (on the validation split) and of the reference runs (module docstring).
TUNING_SEEDS_FROM = 100
REFERENCE_SEEDS_FROM = 300


@dataclass
class Curve:
    """Test loss along one training run.

    Attributes:
        steps: evaluation steps (0 = before training).
        test_loss: test loss at those steps.
        seconds_per_step: mean wall time of a training step (evaluation excluded).
        diverged: the training loss became non-finite (the run stopped there).
        seconds: cumulative training seconds (evaluation excluded) at each evaluation step.
    """

    steps: list[int]
    test_loss: list[float]
    seconds_per_step: float
    diverged: bool = False
    seconds: list[float] = field(default_factory=list)

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


def cosine_adam(lr: float, steps: int) -> OptimizerFactory:
    """Adam whose rate decays as ``lr · (1 + cos(π t / steps)) / 2`` from ``lr`` at step 0 to 0 at ``steps``.

    The schedule advances after every ``optimizer.step()`` (a step post-hook), so the
    benchmark's loop needs no scheduler of its own.
    """

    def make(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
        optimizer.register_step_post_hook(lambda *_: schedule.step())
        return optimizer

    return make


def train_curve(bench: BenchmarkTask, optimizer: OptimizerFactory | LearnedUpdate, seed: int, steps: int,
                eval_every: int | None = None) -> Curve:
    """Train a fresh model (init ``seed``, batches from ``10_000 + seed``) and record its test loss.

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
    curve_steps, losses, seconds = [0], [bench.test_loss(model)], [0.0]
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
            seconds.append(train_seconds)
    return Curve(curve_steps, losses, train_seconds / max(curve_steps[-1], 1), diverged, seconds)


# ---------------------------------------------------------------------------- the metric


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: entry ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    Trailing (not centred), so a run's smoothed curve at a step uses nothing after it: the
    first passage below a target stays a causal event. ``window = 1`` returns ``values``.

    Raises:
        GradGraphError: ``window < 1``.
    """
    if window < 1:
        raise GradGraphError(f"smooth: window must be >= 1, got {window}")
    # Each window summed afresh (not a running sum): equal inputs give bit-equal outputs, so
    # the first step at a minimum is the same however the curve was reached.
    values = list(values)
    return [math.fsum(values[max(0, index - window + 1): index + 1]) / min(index + 1, window)
            for index in range(len(values))]


def mean_curve(curves: Sequence[Curve]) -> tuple[list[int], list[float]]:
    """``(steps, mean test loss)`` over ``curves`` at the steps of the longest one; a run that
    stopped early (diverged) counts as ``inf`` after its last evaluation.

    Raises:
        GradGraphError: no curves, or curves evaluated at different steps.
    """
    if not curves:
        raise GradGraphError("mean_curve: no curves")
    longest = max(curves, key=lambda c: len(c.steps))
    for curve in curves:
        if curve.steps != longest.steps[:len(curve.steps)]:
            raise GradGraphError("mean_curve: the curves were evaluated at different steps")
    length = len(longest.steps)
    padded = [c.test_loss + [math.inf] * (length - len(c.test_loss)) for c in curves]
    return list(longest.steps), [sum(column) / len(column) for column in zip(*padded)]


@dataclass
class Target:
    """Adam's target: ``L*`` (``loss``), first reached at step ``N`` (``step``: the reference runs'
    median, so it may be a half-integer; the mean curve's step if ``from_mean_curve``);
    ``window`` is the smoothing every scored run gets too."""

    loss: float
    step: float
    window: int
    from_mean_curve: bool = False

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "step": self.step, "window": self.window, "from_mean_curve": self.from_mean_curve}


def target_loss(curves: Sequence[Curve], window: int, until: int | None = None) -> float:
    """``L*``: minimum of the trailing-``window`` smoothed mean of ``curves`` over the steps ``≤ until``
    (``None``: all)."""
    steps, mean = mean_curve(curves)
    smoothed = smooth(mean, window)
    return min(value for step, value in zip(steps, smoothed) if until is None or step <= until)


def reference_target(curves: Sequence[Curve], window: int, until: int | None = None) -> Target:
    """Adam's :class:`Target` from its reference runs (module docstring, point 2).

    ``L*`` = :func:`target_loss`; ``N`` = median over ``curves`` of the first step whose own
    smoothed loss is ``≤ L*`` (a run that never gets there counts as later than any). When
    fewer than half of the runs get there (a tiny budget), ``N`` falls back to the first step
    of the smoothed mean curve at ``L*`` and :attr:`Target.from_mean_curve` says so.
    """
    loss = target_loss(curves, window, until)
    probe = Target(loss, 0, window)
    firsts = [math.inf if (index := first_passage(curve, probe)) is None else curve.steps[index] for curve in curves]
    median = float(_median(torch.tensor(firsts, dtype=torch.float64)))
    if math.isinf(median):
        steps, mean = mean_curve(curves)
        step = next(s for s, value in zip(steps, smooth(mean, window)) if value <= loss)
        return Target(loss, step, window, from_mean_curve=True)
    return Target(loss, median, window)


def first_passage(curve: Curve, target: Target) -> int | None:
    """Index of the first evaluation whose smoothed test loss is ``≤ target.loss`` (``None``: never)."""
    smoothed = smooth(curve.test_loss, target.window)
    return next((index for index, loss in enumerate(smoothed) if loss <= target.loss), None)


@dataclass
class RunScore:
    """One run scored against a :class:`Target`.

    Attributes:
        ratio: ``N / n`` (reached), or the bound ``N / steps`` (not reached).
        reached: whether the smoothed curve got to ``L*`` within the budget.
        step: ``n`` (``None``: not reached).
        seconds: training wall-clock seconds until step ``n`` (``inf``: not reached).
    """

    ratio: float
    reached: bool
    step: int | None
    seconds: float


def score_run(curve: Curve, target: Target, steps: int) -> RunScore:
    """Score ``curve`` against ``target`` with a budget of ``steps`` (module docstring, point 3)."""
    index = first_passage(curve, target)
    if index is None:
        return RunScore(target.step / steps, False, None, math.inf)
    step = curve.steps[index]
    seconds = curve.seconds[index] if curve.seconds else step * curve.seconds_per_step
    return RunScore(target.step / max(step, 1), True, step, seconds)


def step_reduction(reference: Curve, other: Curve, steps: int) -> tuple[float, bool]:
    """Per-seed score against one reference curve (the validation protocol of meta-training):
    ``(N / n, reached)`` with ``N`` the reference's best step, ``n`` the other's first step at that loss."""
    target, best_step = reference.best
    first = other.first_reaching(target)
    if first is None:
        return best_step / steps, False
    return best_step / max(first, 1), True


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median along the last axis, the mean of the two middle values for an even count (``inf`` allowed)."""
    ordered = values.sort(dim=-1).values
    n = ordered.shape[-1]
    low, high = ordered[..., (n - 1) // 2], ordered[..., n // 2]
    return torch.where(low == high, low, (low + high) / 2)


STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"median": _median, "mean": lambda x: x.mean(dim=-1)}


def bootstrap_interval(values: Sequence[float], statistic: str = "median", level: float = 0.95,
                       resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """``(statistic, low, high)``: the statistic of ``values`` and its percentile-bootstrap interval.

    Resamples the runs with replacement ``resamples`` times (a fixed seed, so a table is
    reproducible) and takes the ``(1 ± level) / 2`` quantiles of the statistic.

    Args:
        values: one number per run (``[n]``).
        statistic: ``"median"`` or ``"mean"``.
        level: the interval's coverage.
        resamples: bootstrap resamples.
        seed: the resampling generator's seed.

    Raises:
        GradGraphError: no values, an unknown statistic or a level outside (0, 1).
    """
    if not values:
        raise GradGraphError("bootstrap_interval: no values")
    if statistic not in STATISTICS or not 0 < level < 1:
        raise GradGraphError(f"bootstrap_interval: statistic in {sorted(STATISTICS)} and 0 < level < 1, got "
                             f"{statistic!r}, {level}")
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = STATISTICS[statistic](data[torch.randint(len(data), (resamples, len(data)), generator=generator)])
    ordered = draws.sort().values
    tail = (1 - level) / 2
    low = ordered[int(math.floor(tail * (resamples - 1)))]
    high = ordered[int(math.ceil((1 - tail) * (resamples - 1)))]
    return float(STATISTICS[statistic](data)), float(low), float(high)


def tune_learning_rate(bench: BenchmarkTask, make: Callable[[float], OptimizerFactory], grid: Sequence[float],
                       seeds: Sequence[int], steps: int, eval_every: int | None = None,
                       progress: Callable[[], None] | None = None, window: int = 1
                       ) -> tuple[float, dict[float, float]]:
    """The grid value with the lowest score; also every value's score.

    The score of a rate is the minimum of the trailing-``window`` smoothed mean curve over
    ``seeds`` (:func:`target_loss`, the target's ``L*``; with ``window = 1`` and one seed, the
    best loss); a rate with a diverged run scores ``inf``. Run it on a validation split, never on
    the test set.
    """
    scores = {}
    for lr in grid:
        curves = []
        for seed in seeds:
            curves.append(train_curve(bench, make(lr), seed, steps, eval_every))
            if progress is not None:
                progress()
        scores[lr] = math.inf if any(c.diverged for c in curves) else target_loss(curves, window)
    return min(scores, key=scores.get), scores


# ---------------------------------------------------------------------------- one task


@dataclass
class TaskResult:
    """Everything measured on one task (JSON-serialisable through ``to_dict``).

    Attributes:
        task: its name.
        steps: the budget.
        seeds: test seeds.
        reference_seeds: seeds of the runs the target comes from.
        target: Adam's :class:`Target`.
        tuned: ``{row: tuned learning rate}``.
        grid_scores: ``{row: {lr: validation score}}``.
        reference: the reference runs' curves.
        curves: ``{row: [curve per test seed]}``; ``"adam"`` is the control.
    """

    task: str
    steps: int
    seeds: list[int]
    reference_seeds: list[int] = field(default_factory=list)
    target: Target | None = None
    tuned: dict[str, float] = field(default_factory=dict)
    grid_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    reference: list[Curve] = field(default_factory=list)
    curves: dict[str, list[Curve]] = field(default_factory=dict)

    def scores(self) -> dict[str, list[RunScore]]:
        """``{row: [RunScore per test seed]}`` against the target."""
        assert self.target is not None
        return {name: [score_run(curve, self.target, self.steps) for curve in curves]
                for name, curves in self.curves.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per row: median and mean step reduction with 95% bootstrap intervals, runs reaching,
        median seconds to the target, best test loss, time per step (absolute and vs Adam's), and
        with a cosine row the paired step reduction against it (:meth:`against`)."""
        scores = self.scores()
        cosine = self.against("adam-cosine") if "adam-cosine" in self.curves else {}
        adam_time = None
        if "adam" in self.curves:
            adam_time = sum(c.seconds_per_step for c in self.curves["adam"]) / len(self.curves["adam"])
        rows = {}
        for name, curves in self.curves.items():
            ratios = [score.ratio for score in scores[name]]
            median, median_low, median_high = bootstrap_interval(ratios, "median")
            mean, mean_low, mean_high = bootstrap_interval(ratios, "mean")
            seconds_per_step = sum(c.seconds_per_step for c in curves) / len(curves)
            rows[name] = {
                "step_reduction_median": median, "median_low": median_low, "median_high": median_high,
                "step_reduction_mean": mean, "mean_low": mean_low, "mean_high": mean_high,
                "reached": sum(score.reached for score in scores[name]), "runs": len(curves),
                "diverged": sum(c.diverged for c in curves),
                "seconds_to_target_median": float(_median(torch.tensor([s.seconds for s in scores[name]],
                                                                        dtype=torch.float64))),
                "best_test_loss_mean": sum(c.best[0] for c in curves) / len(curves),
                "seconds_per_step": seconds_per_step,
                "time_vs_adam": math.nan if adam_time is None else seconds_per_step / adam_time,
            }
            if name in cosine:
                rows[name].update(zip(("vs_cosine_median", "vs_cosine_low", "vs_cosine_high"), cosine[name]))
        return rows

    def against(self, reference: str) -> dict[str, tuple[float, float, float]]:
        """Per row: the median over test seeds of ``n_reference / n_row`` (the same seed's first
        steps at ``L*``, a run that never reaches it counted at the budget) and its 95% bootstrap
        interval. The seeds are shared by every row, so the comparison is paired: a seed that is
        slow for every optimizer does not widen it. This is how the target "≥ 1.1x against Adam
        with a tuned cosine schedule" is read."""
        scores = self.scores()

        def steps(row: str) -> list[int]:
            return [score.step if score.reached else self.steps for score in scores[row]]

        base = steps(reference)
        return {name: bootstrap_interval([b / n for b, n in zip(base, steps(name))], "median")
                for name in self.curves}

    def to_dict(self) -> dict[str, Any]:
        scores = self.scores()
        return {
            "task": self.task, "steps": self.steps, "seeds": self.seeds, "reference_seeds": self.reference_seeds,
            "target": None if self.target is None else self.target.to_dict(), "tuned_lr": self.tuned,
            "grid_scores": self.grid_scores, "summary": self.summary(),
            "first_step_reaching": {name: [s.step for s in row] for name, row in scores.items()},
            "reference_curves": [{"steps": c.steps, "test_loss": c.test_loss} for c in self.reference],
            "curves": {name: [{"steps": c.steps, "test_loss": c.test_loss, "seconds": c.seconds,
                               "diverged": c.diverged} for c in curves]
                       for name, curves in self.curves.items()},
        }


def benchmark_task(bench: BenchmarkTask, learned: dict[str, LearnedUpdate], *, steps: int, seeds: Sequence[int],
                   tuning_seeds: Sequence[int], adam_grid: Sequence[float], sgd_grid: Sequence[float] | None = None,
                   cosine: bool = True, cosine_grid: Sequence[float] | None = None,
                   reference_seeds: Sequence[int] | None = None, window: int = 5,
                   target_fraction: float = 0.8, eval_every: int | None = None, progress: bool = True) -> TaskResult:
    """Tune, take Adam's target from the reference seeds, then run every row on ``seeds`` (module docstring).

    Args:
        bench: the task (with a validation split: the tuning runs there).
        learned: ``{label: meta-model}`` learned optimizers to compare (e.g. ``gradmetanet``, ``deepsets``).
        steps: step budget of every run (the meta-training horizon).
        seeds: test seeds (≥ 20 for intervals that mean something).
        tuning_seeds: seeds of the learning-rate grid searches (validation split).
        adam_grid: Adam's grid, also the peak rates of the cosine row.
        sgd_grid: SGD+momentum's grid (``None``: no SGD row).
        cosine: run the tuned cosine-decay Adam row.
        cosine_grid: its peak rates (``None``: ``adam_grid``). A decaying rate tolerates higher
            peaks than a constant one: on MNIST-1D the cosine row's best peak was the top of
            Adam's grid (0.1), so the CLI searches 1e-3..1 for it.
        reference_seeds: seeds of the target's runs (default ``300, …``, twice as many as ``seeds``).
        window: trailing smoothing window in evaluations (:func:`smooth`).
        target_fraction: ``L*`` is the reference mean's minimum over the first
            ``round(target_fraction · steps)`` steps, Adam's tuning runs that long (module
            docstring, point 2).
        eval_every: evaluation period (``None``: the task's).

    Raises:
        GradGraphError: the task has no validation split, the seeds overlap or the fraction is not in (0, 1].
    """
    from tqdm.auto import tqdm

    if bench.validation is None:
        raise GradGraphError(f"benchmark_task: task {bench.task.name!r} has no validation split to tune on")
    reference_seeds = list(reference_seeds) if reference_seeds is not None else [
        REFERENCE_SEEDS_FROM + i for i in range(2 * len(seeds))]
    if set(reference_seeds) & set(seeds):
        raise GradGraphError(f"benchmark_task: reference seeds {reference_seeds} overlap the test seeds {list(seeds)}")
    if not 0 < target_fraction <= 1:
        raise GradGraphError(f"benchmark_task: target_fraction must be in (0, 1], got {target_fraction}")
    target_steps = max(1, round(target_fraction * steps))

    def adam(lr: float) -> OptimizerFactory:
        return lambda model: torch.optim.Adam(model.parameters(), lr=lr)

    def sgdm(lr: float) -> OptimizerFactory:
        return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def cosine_factory(lr: float) -> OptimizerFactory:
        return cosine_adam(lr, steps)

    grids = [("adam", adam, adam_grid, target_steps)]  # (row, factory, grid, tuning budget)
    if cosine:
        grids.append(("adam-cosine", cosine_factory, adam_grid if cosine_grid is None else cosine_grid, steps))
    if sgd_grid is not None:
        grids.append(("sgdm", sgdm, sgd_grid, steps))
    total = sum(len(grid) for _, _, grid, _ in grids) * len(tuning_seeds)
    total += len(reference_seeds) + len(seeds) * (len(grids) + len(learned))
    result = TaskResult(bench.task.name, steps, list(seeds), reference_seeds)
    with tqdm(total=total, desc=f"benchmark {bench.task.name}", unit="run", disable=not progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        factories: dict[str, OptimizerFactory | LearnedUpdate] = {}
        for name, make, grid, budget in grids:
            best, scores = tune_learning_rate(bench.validation, make, grid, tuning_seeds, budget, eval_every, tick,
                                              window)
            result.tuned[name] = best
            result.grid_scores[name] = {f"{lr:.3g}": score for lr, score in scores.items()}
            factories[name] = make(best)
        for seed in reference_seeds:
            result.reference.append(train_curve(bench, factories["adam"], seed, steps, eval_every))
            tick()
        result.target = reference_target(result.reference, window, until=target_steps)
        factories.update(learned)
        for name, optimizer in factories.items():
            result.curves[name] = []
            for seed in seeds:
                result.curves[name].append(train_curve(bench, optimizer, seed, steps, eval_every))
                tick()
    return result
