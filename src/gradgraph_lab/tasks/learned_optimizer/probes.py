"""Probes of the validation protocol (:mod:`~gradgraph_lab.tasks.learned_optimizer.selection`).

* :func:`perturbation_scores` — the validation score of a rule and of the same rule with
  its meta-parameters perturbed by ``N(0, σ²)`` (PES's σ): how far the score moves when
  the rule barely changes, i.e. the noise floor that selecting candidates by that score
  works against.
* :func:`schedule_scores` — Adam with a learning-rate schedule on the same protocol: what a
  rule that learns only a schedule (the time features allow it) could gain.
* :func:`tensor_rate_scores` — Adam with its rate multiplied per tensor (by name): what a rule
  that learns only per-layer step sizes could gain.

``python -m gradgraph_lab.tasks.learned_optimizer.probes [--task charlm]`` runs them on the task's
validation protocol (digits: one core, a few minutes) and prints one line per rule.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import torch

from gradgraph.optim import LearnedUpdate, MetaModelConfig
from gradgraph_lab.tasks.learned_optimizer.benchmark import OptimizerFactory, log_grid
from gradgraph_lab.tasks.learned_optimizer.selection import (
    SELECTION_SEEDS_FROM,
    ValidationProtocol,
    score_meta_model,
    score_runs,
    validation_protocol,
)
from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

__all__ = ["SCHEDULES", "TENSOR_RATES", "perturbation_scores", "schedule_scores", "scheduled_adam",
           "tensor_rate_adam", "tensor_rate_scores"]

#: ``(step t, budget T) -> learning-rate factor``.
Schedule = Callable[[int, int], float]
SCHEDULES: dict[str, Schedule] = {
    "constant": lambda t, total: 1.0,
    "linear to 0 at T": lambda t, total: max(0.0, 1 - t / total),
    "cosine to 0 at T": lambda t, total: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)),
    "linear to 0 at T/2": lambda t, total: max(0.0, 1 - 2 * t / total),
    "x0.1 after T/3": lambda t, total: 1.0 if 3 * t < total else 0.1,
}

#: per-tensor rate multipliers: ``{label: {parameter-name substring: factor}}`` (last match wins).
TENSOR_RATES: dict[str, dict[str, float]] = {
    "first layer x3": {"embed": 3.0, "0.weight": 3.0, "0.bias": 3.0},
    "first layer x3, last x2": {"embed": 3.0, "0.weight": 3.0, "0.bias": 3.0, "head": 2.0},
    "biases x3": {"bias": 3.0},
    "norms x3": {"norm": 3.0},
    "attention x2": {"self_attn": 2.0},
}


class _ScheduledAdam(torch.optim.Adam):
    """Adam whose learning rate at step ``t`` is ``lr · schedule(t, total)``."""

    def __init__(self, params, lr: float, schedule: Schedule, total: int) -> None:
        super().__init__(params, lr=lr)
        self.base_lr, self.schedule, self.total, self.steps_done = lr, schedule, total, 0

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            group["lr"] = self.base_lr * self.schedule(self.steps_done, self.total)
        self.steps_done += 1
        return super().step(closure)


def scheduled_adam(lr: float, schedule: Schedule, total: int) -> OptimizerFactory:
    """``model -> Adam`` whose rate at step ``t`` (from 0) is ``lr · schedule(t, total)``."""
    return lambda model: _ScheduledAdam(model.parameters(), lr, schedule, total)


def schedule_scores(protocol: ValidationProtocol, rates: Sequence[float],
                    schedules: dict[str, Schedule] = SCHEDULES) -> list[dict[str, float | str]]:
    """Score scheduled Adam on ``protocol`` like a learned rule (mean step reduction over its seeds).

    Returns:
        One ``{"lr", "schedule", "step_reduction", "reached", "best_loss"}`` per rate and schedule.
    """
    return [{"lr": lr, "schedule": name, **score_runs(protocol, scheduled_adam(lr, schedule, protocol.steps))}
            for lr in rates for name, schedule in schedules.items()]


def tensor_rate_adam(lr: float, factors: dict[str, float]) -> OptimizerFactory:
    """``model -> Adam`` whose rate for a parameter is ``lr`` times the factor of the last
    substring of ``factors`` its name contains (1 if none)."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            factor = next((f for key, f in reversed(factors.items()) if key in name), 1.0)
            groups.setdefault(factor, []).append(parameter)
        return torch.optim.Adam([{"params": params, "lr": lr * factor} for factor, params in groups.items()])

    return make


def tensor_rate_scores(protocol: ValidationProtocol, lr: float,
                       rates: dict[str, dict[str, float]] = TENSOR_RATES) -> list[dict[str, float | str]]:
    """Score Adam at ``lr`` with per-tensor multipliers (:data:`TENSOR_RATES`) on ``protocol``.

    Returns:
        One ``{"lr", "tensors", "step_reduction", "reached", "best_loss"}`` per entry of ``rates``.
    """
    return [{"lr": lr, "tensors": label, **score_runs(protocol, tensor_rate_adam(lr, factors))}
            for label, factors in rates.items()]


def perturbation_scores(protocol: ValidationProtocol, rule: LearnedUpdate, sigma: float, draws: int,
                        seed: int = 1) -> list[dict[str, float]]:
    """``score_meta_model`` of ``rule`` (first row) and of ``draws`` copies of it with every
    meta-parameter perturbed by ``N(0, sigma²)`` (the rule itself is left unchanged)."""
    base = {name: p.detach().clone() for name, p in rule.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    rows = [score_meta_model(protocol, rule)]
    try:
        for _ in range(draws):
            with torch.no_grad():
                for name, p in rule.named_parameters():
                    p.copy_(base[name] + sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
            rows.append(score_meta_model(protocol, rule))
    finally:
        with torch.no_grad():
            for name, p in rule.named_parameters():
                p.copy_(base[name])
    return rows


def _row(label: str, row: dict) -> str:
    return (f"{label:<48s} step reduction {row['step_reduction']:.3f} ({row['reached']}/5 reached), "
            f"best validation loss {row['best_loss']:.4f}")


#: per task: the validation protocol's budget, the constant rates probed, the start's αβ.
_TASK_DEFAULTS = {
    "digits": {"steps": 300, "rates": [0.021544346900318846, 0.0214, 0.0217, 0.045, 0.0464, 0.048, 0.1],
               "start_lr": 0.0464},
    "charlm": {"steps": 120, "rates": [0.00464159, 0.0068, 0.01, 0.0215443], "start_lr": 0.00464159},
}


def main(argv: Sequence[str] | None = None) -> None:
    """The probes on a task's validation protocol (seeds 200–204; digits 300 steps, charlm 120), printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(_TASK_DEFAULTS), default="digits")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="constant Adam rates (default: the task's)")
    parser.add_argument("--start-lr", type=float, default=None,
                        help="the start's αβ (the rate meta-training's --start tuned-adam chose on validation)")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.01)
    args = parser.parse_args(argv)
    defaults = _TASK_DEFAULTS[args.task]
    rates, start_lr = args.rates or defaults["rates"], args.start_lr or defaults["start_lr"]
    torch.set_num_threads(1)
    begin = time.perf_counter()
    protocol = validation_protocol(get_task(args.task), seeds=range(SELECTION_SEEDS_FROM, SELECTION_SEEDS_FROM + 5),
                                   steps=defaults["steps"], grid=log_grid(-4, -1, 10))
    bests = [curve.best[0] for curve in protocol.reference]
    print(f"validation-tuned Adam: lr {protocol.adam_lr:.6g}, best validation loss per seed "
          f"{[round(b, 4) for b in bests]}, mean {sum(bests) / len(bests):.4f}", flush=True)
    for row in schedule_scores(protocol, rates, {"constant": SCHEDULES["constant"]}):
        print(_row(f"Adam lr {row['lr']:.6g} constant", row), flush=True)
    decays = {name: schedule for name, schedule in SCHEDULES.items() if name != "constant"}
    for row in schedule_scores(protocol, sorted({protocol.adam_lr, start_lr, 2 * start_lr}), decays):
        print(_row(f"Adam lr {row['lr']:.6g} {row['schedule']}", row), flush=True)
    for row in tensor_rate_scores(protocol, start_lr):
        print(_row(f"Adam lr {row['lr']:.6g} {row['tensors']}", row), flush=True)
    torch.manual_seed(0)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=0.1, beta=start_lr / 0.1, residual_adam=True))
    for index, row in enumerate(perturbation_scores(protocol, rule, args.sigma, args.draws)):
        print(_row("start (DeepSets form)" if index == 0 else f"start + N(0, {args.sigma:g}²), draw {index}", row),
              flush=True)
    print(f"wall {time.perf_counter() - begin:.0f}s")


if __name__ == "__main__":
    main()
