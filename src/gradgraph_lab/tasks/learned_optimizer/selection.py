"""The benchmark's protocol on the validation split: tuning meta-training's start and selecting its checkpoint.

Meta-training's own loss (a truncation's held-out loss) is a noisy, short-horizon proxy
of what the benchmark measures, and following it has made the starting rule worse
(README). So meta-training is judged by the benchmark's own protocol, run on the
*validation* split of the task (inner runs train on 80% of the training set; the loss is
measured on the other 20%; never the test set) from initialisations used neither by the
benchmark (seeds ``0…``) nor by meta-training (``1,000,000…``):

1. :func:`validation_protocol` tunes Adam's learning rate on a grid (lowest minimum of the
   seed-averaged validation curve over the selection seeds, as the benchmark's
   ``tune_learning_rate``; until issue 29 the mean of the per-seed bests) and keeps its
   curves as the reference: ``L_s``, ``N_s`` per seed.
2. :func:`score_meta_model` runs a learned update rule on the same seeds and batches and
   scores it with the benchmark's step reduction ``N_s / n_s`` (unreached: ``N_s / steps``),
   averaged over seeds; ties are broken by the mean best validation loss.

The meta-training run scores its starting rule (outer step 0) and then every
``select_every`` outer steps, and exports the best-scoring meta-model, so the shipped
optimizer is never worse than its start on validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate
from gradgraph_lab.tasks.learned_optimizer.benchmark import (
    Curve,
    OptimizerFactory,
    step_reduction,
    train_curve,
    tune_learning_rate,
)
from gradgraph_lab.tasks.learned_optimizer.tasks import BenchmarkTask

__all__ = ["SELECTION_SEEDS_FROM", "ValidationProtocol", "model_copy", "score_meta_model", "score_runs",
           "validation_protocol"]

#: selection seeds are ``200, 201, …``: the benchmark evaluates ``0…`` and tunes on ``100…``.
SELECTION_SEEDS_FROM = 200


@dataclass
class ValidationProtocol:
    """Tuned Adam on the validation split: the reference a learned rule is scored against.

    Attributes:
        bench: the validation benchmark (:attr:`BenchmarkTask.validation`).
        seeds: initialisation / batch-stream seeds.
        steps: step budget of every run.
        adam_lr: Adam's tuned learning rate.
        grid_scores: ``{lr: minimum of the seed-averaged validation curve}`` of the grid.
        reference: tuned Adam's curve on every seed.
    """

    bench: BenchmarkTask
    seeds: list[int]
    steps: int
    adam_lr: float
    grid_scores: dict[float, float]
    reference: list[Curve]


def validation_protocol(bench: BenchmarkTask, *, seeds: Sequence[int], steps: int,
                        grid: Sequence[float]) -> ValidationProtocol:
    """Tune Adam on ``bench.validation`` and record its reference curves.

    Args:
        bench: a benchmark task with a validation split.
        seeds: selection seeds (e.g. ``range(200, 205)``).
        steps: step budget (the meta-training horizon is a natural choice).
        grid: Adam learning rates to try.

    Runs on the task's device (:attr:`BenchmarkTask.device`).

    Raises:
        GradGraphError: the task has no validation split.
    """
    if bench.validation is None:
        raise GradGraphError(f"task {bench.task.name!r} has no validation split to tune or select on")
    validation = bench.validation

    def adam(lr: float):
        return lambda model: torch.optim.Adam(model.parameters(), lr=lr)

    lr, scores = tune_learning_rate(validation, adam, grid, list(seeds), steps)
    reference = [train_curve(validation, adam(lr), seed, steps) for seed in seeds]
    return ValidationProtocol(validation, list(seeds), steps, lr, scores, reference)


def score_runs(protocol: ValidationProtocol, optimizer: OptimizerFactory | LearnedUpdate) -> dict[str, float]:
    """Train with ``optimizer`` (a ``model -> Optimizer`` factory or a learned rule) on the
    protocol's seeds and score it with the benchmark's step reduction.

    Returns:
        ``{"step_reduction": mean over seeds (a diverged run counts 0), "reached": runs reaching
        Adam's best, "best_loss": mean best validation loss, "diverged": diverged runs}``.
    """
    ratios, reached, bests, diverged = [], 0, [], 0
    for seed, reference in zip(protocol.seeds, protocol.reference):
        curve = train_curve(protocol.bench, optimizer, seed, protocol.steps)
        ratio, ok = step_reduction(reference, curve, protocol.steps)
        ratios.append(0.0 if curve.diverged else ratio)
        reached += ok and not curve.diverged
        bests.append(curve.best[0])
        diverged += curve.diverged
    return {"step_reduction": sum(ratios) / len(ratios), "reached": reached, "best_loss": sum(bests) / len(bests),
            "diverged": diverged}


def score_meta_model(protocol: ValidationProtocol, meta_model: LearnedUpdate) -> dict[str, float]:
    """Run ``meta_model`` under ``protocol``; higher ``score`` is better (on the task's device).

    Returns:
        :func:`score_runs`' numbers and ``"score"`` = ``step_reduction - 1e-3 · best_loss``, so
        equal reductions prefer the lower loss.
    """
    was_training = meta_model.training
    meta_model.eval()
    try:
        scores = score_runs(protocol, meta_model)
    finally:
        meta_model.train(was_training)
    return {"score": scores["step_reduction"] - 1e-3 * scores["best_loss"], **scores}


def model_copy(meta_model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``meta_model``'s state dict (a selection candidate)."""
    return {key: value.detach().clone() for key, value in meta_model.state_dict().items()}
