"""The learned step-size schedule and the scalars-first PES stage (issue 29).

``MetaModelConfig(schedule=True)`` multiplies the whole step by ``s(t) = exp(w · τ_t)``;
``MetaTrainConfig(scalars_first=K)`` perturbs and trains only the scalars for ``K`` outer steps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import PES, LearnedOptimizer, LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task
from gradgraph.optim.features import time_features
from strategies import learned_rule


def _task() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()

    def sample(generator: torch.Generator):
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    return Task("tiny64", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                sample_validation=sample)


def _steps(meta: LearnedUpdate, steps: int) -> list[dict[str, torch.Tensor]]:
    """The parameter changes of ``steps`` steps of ``meta`` on a fixed model and batch sequence."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    optimizer = LearnedOptimizer(model, meta)
    generator = torch.Generator().manual_seed(4)
    changes = []
    for _ in range(steps):
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=generator)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
        changes.append({name: p.detach() - before[name] for name, p in model.named_parameters()})
    return changes


@pytest.mark.parametrize("variant", ["gradmetanet", "deepsets", "sgdm"])
def test_the_schedule_scales_every_step_by_exp_of_w_dot_the_time_features(variant):
    """With ``w = 0`` the rule is the rule without a schedule, step for step; with ``w`` set, step
    ``t``'s change is that of the unscheduled rule times ``exp(w · τ_t)`` (the first step: every
    later state is the same, since the schedule touches only the parameter update, not the
    moments). Fails if the schedule multiplies anything but the step, or uses another time."""
    plain, scheduled = learned_rule(variant, schedule=False), learned_rule(variant, schedule=True)
    assert scheduled.schedule is not None and any(p is scheduled.schedule for p in scheduled.scalar_parameters)
    for old, new in zip(_steps(plain, 2), _steps(scheduled, 2)):
        for name in old:
            torch.testing.assert_close(new[name], old[name], rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        scheduled.schedule.copy_(torch.linspace(-0.5, 0.7, scheduled.schedule.numel(), dtype=torch.float64))
    factor = torch.exp(time_features(torch.tensor([1]), torch.float64) @ scheduled.schedule.detach())[0]
    assert abs(float(factor) - 1) > 0.1
    first_plain, first_scheduled = _steps(plain, 1)[0], _steps(scheduled, 1)[0]
    for name in first_plain:
        torch.testing.assert_close(first_scheduled[name], factor * first_plain[name], rtol=1e-12, atol=1e-15)
    later = scheduled.step_scale(torch.tensor([1, 50, 400]), torch.float64)
    assert len(set(later.tolist())) == 3  # the factor depends on the step


def test_the_schedule_is_off_in_files_written_before_it():
    from gradgraph.optim import load_pretrained

    meta = load_pretrained("digits-mlp")
    assert meta.config.schedule is False and meta.schedule is None
    assert MetaModelConfig.from_dict(MetaModelConfig(schedule=True).to_dict()).schedule is True


def test_pes_perturbs_only_the_masked_coordinates():
    """A masked perturbation is zero off the mask, the same numbers on it; so is the estimate."""
    theta = torch.zeros(6, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False, False, True])
    masked = PES(3, 6, 0.1, torch.Generator().manual_seed(0), dtype=torch.float64)
    full = PES(3, 6, 0.1, torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, full_rows = masked.perturb(theta, mask), full.perturb(theta)
    assert (rows[:, ~mask] == 0).all()
    torch.testing.assert_close(rows[:, mask], full_rows[:, mask], rtol=0, atol=0)
    estimate = masked.estimate(torch.arange(6, dtype=torch.float64))
    assert (estimate[~mask] == 0).all() and (estimate[mask] != 0).all()
    with pytest.raises(GradGraphError, match=r"mask must have shape \[6\]"):
        masked.perturb(theta, mask[:4])


@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_the_scalars_first_stage_trains_only_the_scalars_then_everything(estimator):
    """For ``scalars_first`` outer steps the MLP and GradMetaNet weights stay where they start and
    the scalars (α, β, μ, the schedule) move; the next step moves the rest. Fails without the
    mask on PES's perturbation or on the applied gradient."""
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=True, residual_adam=True, schedule=True)).double()
    trainer = MetaTrainer(meta, _task(), MetaTrainConfig(estimator=estimator, num_particles=4, truncation=3, horizon=9,
                                                         outer_lr=1e-2, scalar_lr=1e-2, scalars_first=2))
    start = trainer.flat_meta_parameters().clone()
    scalars = trainer.scalar_mask
    assert int(scalars.sum()) == 3 + meta.schedule.numel()
    for _ in range(2):
        assert trainer.scalars_only
        trainer.step()
    moved = trainer.flat_meta_parameters() != start
    assert not moved[~scalars].any() and moved[scalars].all()
    if estimator == "pes":  # only the scalars were perturbed, so their estimate carries no other noise
        assert (trainer.pes.accumulated[:, ~scalars] == 0).all() and (trainer.pes.accumulated[:, scalars] != 0).all()
    assert not trainer.scalars_only
    trainer.step()
    assert (trainer.flat_meta_parameters() != start)[~scalars].any()
    with pytest.raises(GradGraphError, match="scalars_first"):
        MetaTrainConfig(scalars_first=-1)


def test_a_learned_decay_reaches_a_quadratic_s_minimum_faster_than_a_constant_rate():
    """The schedule is a real degree of freedom of the step: on a noisy quadratic a decaying
    ``s(t)`` (w on the slow time features negative) ends nearer the minimum than ``s = 1`` at the
    same start rate (SGD's noise floor is proportional to the step size)."""
    def run(weights: torch.Tensor) -> float:
        torch.manual_seed(0)
        meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, learned_term=False, alpha=0.05, mu=0.5,
                                             schedule=True)).double()
        with torch.no_grad():
            meta.schedule.copy_(weights)
        model = nn.Linear(4, 1, bias=False).double()
        optimizer = LearnedOptimizer(model, meta)
        generator = torch.Generator().manual_seed(1)
        for _ in range(300):
            x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
            y = x.sum(dim=1, keepdim=True) + torch.randn(16, 1, generator=generator, dtype=torch.float64)
            optimizer.step(lambda: (model(x) - y).square().squeeze(-1))
        return float((model.weight.detach() - 1).square().sum())

    decay = torch.zeros(11, dtype=torch.float64)
    # tanh(t − 1) is ~1 from t = 3 on, tanh(t / 100 − 1) rises from −0.74 to 0.96 at t = 300: s is
    # ~1 at t = 3, 0.24 at t = 100 and 0.035 at t = 300.
    decay[0], decay[4] = -1.5, -2.0
    assert run(decay) < 0.5 * run(torch.zeros(11, dtype=torch.float64))
    assert math.isfinite(run(decay))


def test_a_staged_run_starts_from_another_rule_s_scalars_and_schedule(tmp_path):
    """``init_from``: a GradMetaNet rule starts with a learned SGDM file's α, μ and schedule (the
    parameters both have), keeps its own β and weights; a tuned start is refused (it would reset β);
    a file with nothing in common is refused by name."""
    from gradgraph_lab.tasks.learned_optimizer.meta import MetaRunConfig, copy_meta_parameters

    torch.manual_seed(0)
    sgdm = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, learned_term=False, schedule=True))
    with torch.no_grad():
        sgdm.log_alpha.fill_(-1.5)
        sgdm.logit_mu.fill_(1.2)
        sgdm.schedule.copy_(torch.linspace(-1, 1, 11))
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=True, residual_adam=True, schedule=True, beta=0.001))
    before = {name: p.detach().clone() for name, p in rule.named_parameters()}
    assert sorted(copy_meta_parameters(sgdm, rule)) == ["log_alpha", "logit_mu", "schedule"]
    for name, p in rule.named_parameters():
        expected = dict(sgdm.named_parameters()).get(name, before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert rule.beta.item() == pytest.approx(0.001)
    with pytest.raises(GradGraphError, match="start='fixed'"):
        MetaRunConfig(init_from="x.pt")
    with pytest.raises(GradGraphError, match="no meta-parameter of the file matches"):
        copy_meta_parameters(nn.Linear(2, 2), rule)
