"""The learned optimizer's benchmark (issue 29): MNIST-1D generated locally, the robust target,
the control row, tuning on validation seeds only, bootstrap intervals, the cosine row."""

from __future__ import annotations

import math
import random
import socket
import statistics

import numpy as np
import pytest
import torch

from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.learned_optimizer import benchmark
from gradgraph_lab.tasks.learned_optimizer.benchmark import (
    Curve,
    bootstrap_interval,
    cosine_adam,
    first_passage,
    log_grid,
    reference_target,
    score_run,
    smooth,
)

pytest.importorskip("mnist1d")


def test_mnist1d_is_generated_locally_without_the_network(monkeypatch, tmp_path):
    """Every socket connection and every ``requests`` call fails: generation must not need one.
    The package's global random streams (numpy, random) are left as they were."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d generation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    from gradgraph_lab.tasks.learned_optimizer.mnist1d import generate_mnist1d, mnist1d_split

    np.random.seed(7)
    random.seed(7)
    expected_numpy, expected_python = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    x_train, y_train, x_test, y_test = generate_mnist1d(80, 20)
    assert (np.random.rand(), random.random()) == (expected_numpy, expected_python)
    assert x_train.shape == (80, 40) and x_test.shape == (20, 40) and x_train.dtype == torch.float32
    assert set(y_train.tolist()) <= set(range(10)) and y_train.dtype == torch.long
    again = generate_mnist1d(80, 20)
    assert all(torch.equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))  # deterministic
    cached = mnist1d_split(80, 20, cache_root=str(tmp_path))  # generated, written, then read back
    assert len(list(tmp_path.glob("mnist1d-*.pt"))) == 1
    mnist1d_split.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(cached, mnist1d_split(80, 20, cache_root=str(tmp_path))))
    mnist1d_split.cache_clear()
    with pytest.raises(GradGraphError, match="multiple of 10"):
        generate_mnist1d(81, 20)


def test_the_mnist1d_tasks_are_the_issue_s_mlps():
    from gradgraph_lab.tasks.learned_optimizer.command import TASKS
    from gradgraph_lab.tasks.learned_optimizer.tasks import MNIST1D_TASKS, TASK_NAMES, make_mlp

    assert tuple(TASKS) == TASK_NAMES  # the parser's copy of the names
    widths, activation = MNIST1D_TASKS["mnist1d"]
    model = make_mlp(widths, 0, activation)
    assert [m.weight.shape for m in model if isinstance(m, torch.nn.Linear)] == [(32, 40), (10, 32)]


# ---------------------------------------------------------------------- the metric


def _curve(losses, every=10, seconds_per_step=0.001):
    steps = [i * every for i in range(len(losses))]
    return Curve(steps, list(losses), seconds_per_step, seconds=[s * seconds_per_step for s in steps])


def test_smooth_is_a_trailing_mean():
    values = [5.0, 3.0, 4.0, 1.0, 2.0]
    window = 3
    expected = [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
    assert smooth(values, window) == pytest.approx(expected, rel=1e-12)
    assert smooth(values, 1) == values
    with pytest.raises(GradGraphError, match="window"):
        smooth(values, 0)


def test_the_target_is_the_minimum_of_the_smoothed_mean_curve_and_runs_are_scored_by_first_passage():
    runs = [_curve([3.0, 2.0, 1.0, 0.8, 0.9]), _curve([3.0, 2.2, 1.4, 1.0, 0.7])]
    target = reference_target(runs, window=2)
    mean = [statistics.fmean(column) for column in zip(*(r.test_loss for r in runs))]
    smoothed = smooth(mean, 2)
    assert target.loss == pytest.approx(min(smoothed), rel=1e-12)
    own_firsts = [next(run.steps[i] for i, v in enumerate(smooth(run.test_loss, 2)) if v <= target.loss)
                  for run in runs]
    assert target.step == statistics.median(own_firsts)  # the runs' median first passage, not the mean's
    early = reference_target(runs, window=2, until=20)  # L* over the first 20 steps only
    assert early.loss == pytest.approx(min(smoothed[:3]), rel=1e-12)
    flat = [_curve([3.0, 2.0, 1.0, 1.0, 1.0]), _curve([3.0, 2.0, 1.5, 1.5, 1.5]), _curve([3.0, 2.0, 1.6, 1.6, 1.6])]
    fallback = reference_target(flat, window=1)  # only one of three runs reaches the mean's minimum
    assert fallback.from_mean_curve and fallback.step == 20 and not target.from_mean_curve
    fast = _curve([3.0, 1.0, 0.8, 0.7, 0.7])
    index = first_passage(fast, target)
    assert index == next(i for i, v in enumerate(smooth(fast.test_loss, 2)) if v <= target.loss)
    score = score_run(fast, target, steps=40)
    assert score.reached and score.ratio == pytest.approx(target.step / fast.steps[index])
    assert score.seconds == pytest.approx(fast.seconds[index])
    never = score_run(_curve([3.0, 2.9, 2.8, 2.7, 2.6]), target, steps=40)
    assert not never.reached and never.ratio == target.step / 40 and math.isinf(never.seconds)


def test_bootstrap_interval_brackets_the_statistic_and_uses_the_usual_median():
    values = [0.9, 1.1, 1.0, 1.3, 0.7, 1.2, 0.95, 1.05]
    median, low, high = bootstrap_interval(values, "median")
    assert median == pytest.approx(statistics.median(values))  # mean of the two middle values
    assert low <= median <= high and low >= min(values) and high <= max(values)
    mean, low, high = bootstrap_interval(values, "mean")
    assert mean == pytest.approx(statistics.fmean(values)) and low < mean < high
    assert bootstrap_interval([1.0] * 5, "mean")[1:] == (1.0, 1.0)
    wider = bootstrap_interval(values[:4], "mean")
    assert wider[2] - wider[1] > high - low  # fewer runs, a wider interval


def test_cosine_adam_decays_its_rate_to_zero_over_the_budget():
    model = torch.nn.Linear(2, 1)
    optimizer = cosine_adam(0.1, 10)(model)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert rates == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------- the protocol on a cheap config


@pytest.fixture(scope="module")
def cheap_result():
    """Digits, 100 steps, 16 test and 48 reference seeds, a 3-value grid: ~20 s on one core."""
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    return benchmark.benchmark_task(get_task("digits"), {}, steps=100, seeds=list(range(16)), tuning_seeds=[100],
                                    adam_grid=log_grid(-3, -1.5, 3), window=3, eval_every=2, progress=False)


# The cheap benchmark run takes ~20 s: slow, and one worker runs both tests that read it, once.
@pytest.mark.slow
@pytest.mark.xdist_group("learned-optimizer-cheap-benchmark")
def test_the_control_scores_one_within_its_interval(cheap_result):
    """Adam at the target's own rate on fresh seeds: 1.00 inside the median's 95% interval
    (the headline statistic: N is the reference runs' median first passage, so half of the
    control's ratios lie on each side of 1). It fails with N read off the mean curve instead
    (measured on this config: median 1.20 [1.03, 1.48]); the benchmark before issue 29
    (target = one seed's best on a 360-image set) scored Adam against itself 0.80–0.83 with
    8/20 reaching (docs/learned_optimizer.md). The mean of N/n is not checked: by Jensen's
    inequality it lies above 1 for any spread of n (measured 1.04–1.08 here)."""
    row = cheap_result.summary()["adam"]
    assert row["median_low"] <= 1.0 <= row["median_high"]
    assert row["mean_high"] >= 1.0
    assert row["reached"] >= row["runs"] // 2


def test_tuning_uses_validation_runs_only_and_the_target_its_own_seeds(monkeypatch):
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    bench = get_task("digits")
    calls = []
    original = benchmark.train_curve

    def recording(task, optimizer, seed, steps, eval_every=None):
        calls.append(("validation" if task is bench.validation else "test", seed))
        return original(task, optimizer, seed, steps, eval_every)

    monkeypatch.setattr(benchmark, "train_curve", recording)
    result = benchmark.benchmark_task(bench, {}, steps=4, seeds=[0, 1], tuning_seeds=[100, 101],
                                      adam_grid=[1e-3, 1e-2], sgd_grid=[1e-2, 1e-1], progress=False)
    validation_seeds = {seed for where, seed in calls if where == "validation"}
    test_seeds = {seed for where, seed in calls if where == "test"}
    assert validation_seeds == {100, 101}
    assert test_seeds == {0, 1} | set(result.reference_seeds) and not set(result.reference_seeds) & {0, 1}
    assert sum(where == "validation" for where, _ in calls) == 3 * 2 * 2  # adam, cosine, sgdm: 2 rates × 2 seeds
    assert set(result.curves) == {"adam", "adam-cosine", "sgdm"}
    with pytest.raises(GradGraphError, match="overlap"):
        benchmark.benchmark_task(bench, {}, steps=2, seeds=[0], tuning_seeds=[100], adam_grid=[1e-3, 1e-2],
                                 reference_seeds=[0], progress=False)


# The cheap benchmark run takes ~20 s: slow, and one worker runs both tests that read it, once.
@pytest.mark.slow
@pytest.mark.xdist_group("learned-optimizer-cheap-benchmark")
def test_the_table_reports_intervals_reached_runs_and_time_to_the_target(cheap_result):
    from gradgraph_lab.tasks.learned_optimizer.run import format_table

    table = format_table([cheap_result])
    assert "adam (control)" in table and "adam-cosine" in table and "95% CI" in table
    summary = cheap_result.summary()
    assert set(summary["adam"]) >= {"step_reduction_median", "median_low", "median_high", "reached",
                                    "seconds_to_target_median", "seconds_per_step", "vs_cosine_median"}
    header, rule, *rows = table.splitlines()[2:5]
    assert "vs cosine Adam, paired" in header and header.count("|") == rule.count("|") == rows[-1].count("|")
    assert summary["adam-cosine"]["vs_cosine_median"] == 1.0


def test_the_paired_comparison_with_cosine_adam_is_the_median_of_per_seed_step_ratios():
    """``against``: per seed ``n_cosine / n_row`` (an unreached run counted at the budget), then
    the median and its bootstrap interval; a row against itself is exactly 1. Fails if the
    ratio is inverted, unpaired (sorted before dividing) or an unreached run is dropped."""
    RunScore = benchmark.RunScore
    result = benchmark.TaskResult(task="toy", steps=100, seeds=[0, 1, 2])
    result.curves = {"adam-cosine": [None] * 3, "mine": [None] * 3}
    steps = {"adam-cosine": [60, 90, 80], "mine": [30, None, 40]}
    result.scores = lambda: {row: [RunScore(1.0, n is not None, n, 0.0) for n in values]
                             for row, values in steps.items()}
    pairs = result.against("adam-cosine")
    assert pairs["adam-cosine"] == (1.0, 1.0, 1.0)
    median, low, high = pairs["mine"]
    assert median == pytest.approx(2.0)  # ratios 60/30 = 2, 90/100 = 0.9 (unreached: the budget), 80/40 = 2
    assert low == pytest.approx(0.9) and high == pytest.approx(2.0)
