"""The meta-trainer moves the meta-parameters downhill on a quadratic inner problem.

Inner problem: linear regression (a quadratic loss) trained by the learned rule with a small
learning rate ``α``: a larger ``α`` lowers the loss of the truncation, so the meta-gradient of
``log α`` is negative, and the meta-loss falls as ``α`` rises. Which way is downhill is read
from exact autograd (one TBPTT meta-step moves ``log α`` by Adam's step against its true
gradient); PES must move it the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task

WEIGHTS = torch.tensor([[1.0, -2.0, 0.5, 1.5]])


def quadratic_task() -> Task:
    """``y = w* x``, fitted by ``nn.Linear(4, 1)`` under the squared error (quadratic in the weights)."""

    def make(seed):
        torch.manual_seed(seed)
        return nn.Linear(4, 1)

    def sample(generator):
        x = torch.randn(16, 4, generator=generator)
        return x, x @ WEIGHTS.T

    return Task("quadratic", make, sample, lambda out, y: (out - y).pow(2).sum(-1))


def slow_rule() -> LearnedUpdate:
    """Plain SGD with momentum at a small rate (``α = 0.01``, no learned correction)."""
    torch.manual_seed(0)
    return LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=0.01, beta=1e-3, mu=0.5))


def config(estimator: str, seed: int = 0) -> MetaTrainConfig:
    return MetaTrainConfig(estimator=estimator, num_particles=8, truncation=3, horizon=60, outer_lr=1e-3,
                           scalar_lr=0.05, sigma=0.05, seed=seed)


def meta_loss_of(meta: LearnedUpdate) -> float:
    """The meta-loss of one truncation from the same start, data and particles (no update)."""
    frozen = copy.deepcopy(meta)
    trainer = MetaTrainer(frozen, quadratic_task(), MetaTrainConfig(
        estimator="tbptt", num_particles=8, truncation=3, horizon=60, outer_lr=0.0, scalar_lr=0.0, seed=99))
    return trainer.step()["meta_loss"]


def test_tbptt_sees_a_larger_rate_as_downhill():
    """The premise, from autograd: one TBPTT step raises ``log α``."""
    meta = slow_rule()
    before = float(meta.log_alpha)
    MetaTrainer(meta, quadratic_task(), config("tbptt")).step()
    assert float(meta.log_alpha) > before


@pytest.mark.parametrize("seed", [0, 1])
def test_pes_moves_the_meta_parameters_downhill(seed):
    """A few PES meta-steps raise ``log α`` and lower the meta-loss (evaluated on other data).

    Checked to fail: with the PES estimate's sign flipped (``PES.estimate`` returning minus the
    estimate, or ``MetaTrainer._pes_truncation`` returning it), ``log α`` falls.
    Before this test, every meta-trainer test passed with the sign flipped.
    """
    meta = slow_rule()
    alpha_before, loss_before = float(meta.log_alpha), meta_loss_of(meta)
    trainer = MetaTrainer(meta, quadratic_task(), config("pes", seed))
    for _ in range(4):
        trainer.step()
    assert float(meta.log_alpha) > alpha_before + 0.1, (alpha_before, float(meta.log_alpha))
    assert meta_loss_of(meta) < loss_before
