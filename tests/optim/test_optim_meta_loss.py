"""Meta-losses of meta-training: the smoothed time above a target, and its use in MetaTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradgraph import GradGraphError
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task
from gradgraph.optim.meta_loss import first_passage, mean_log_loss, meta_loss, time_above_target


def _curve(start: float, rate: float, floor: float, steps: int) -> torch.Tensor:
    """``[steps]`` a loss curve ``floor + (start − floor) e^{−rate t}`` (float64)."""
    t = torch.arange(steps, dtype=torch.float64)
    return floor + (start - floor) * torch.exp(-rate * t)


def test_time_above_target_ranks_the_curve_that_reaches_the_target_first_better():
    target, steps = 0.1, 120
    fast = _curve(2.3, 0.15, 0.09, steps)       # reaches 0.1 early, then stays just below
    slow = _curve(2.3, 0.06, 0.002, steps)      # reaches 0.1 later, but ends far lower
    first = [int((c <= target).nonzero()[0]) for c in (fast, slow)]
    assert first[0] < first[1]
    losses = torch.stack([fast, slow], dim=1)   # [T, 2]
    scores = time_above_target(losses, target, temperature=0.05)
    assert scores[0] < scores[1]
    # The mean log loss prefers the slow curve's lower floor: it does not measure the metric.
    logs = mean_log_loss(losses)
    assert logs[1] < logs[0]


@pytest.mark.parametrize("seed", range(3))
def test_time_above_target_tends_to_the_fraction_of_steps_above_the_target(seed):
    g = torch.Generator().manual_seed(seed)
    target = 0.3
    # Keep every loss at least 5% away from the target so the limit is reached at small τ.
    gaps = torch.rand(50, 4, generator=g, dtype=torch.float64) * 2 + 0.05
    signs = torch.where(torch.rand(50, 4, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    losses = target * torch.exp(signs * gaps)
    counted = (losses > target).to(torch.float64).mean(dim=0)
    assert torch.allclose(time_above_target(losses, target, temperature=1e-3), counted, atol=1e-12)
    assert not torch.allclose(time_above_target(losses, target, temperature=1.0), counted, atol=1e-2)


@settings(max_examples=30, deadline=None)
@given(log_loss=st.floats(-5, 2), log_target=st.floats(-4, 1), temperature=st.floats(0.05, 2.0))
def test_time_above_target_is_smooth(log_loss, log_target, temperature):
    """Derivative ``σ'(x)/(τ L)``: finite, positive, bounded by ``1/(4τL)``, matching finite differences."""
    loss = torch.tensor([[math.exp(log_loss)]], dtype=torch.float64, requires_grad=True)
    target = math.exp(log_target)
    value = time_above_target(loss, target, temperature)
    (grad,) = torch.autograd.grad(value.sum(), loss)
    x = (log_loss - log_target) / temperature
    sigmoid = 1 / (1 + math.exp(-x))
    expected = sigmoid * (1 - sigmoid) / (temperature * loss.item())
    assert grad.item() == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert 0 <= grad.item() <= 1 / (4 * temperature * loss.item()) * (1 + 1e-12)
    assert torch.autograd.gradcheck(lambda value: time_above_target(value, target, temperature),
                                    (loss.detach().requires_grad_(),))


def test_meta_loss_dispatches_and_rejects_bad_input():
    losses = torch.tensor([[0.5, 0.2], [0.3, 0.1]])
    assert torch.equal(meta_loss("log-loss", losses), mean_log_loss(losses))
    assert torch.equal(meta_loss("time-above-target", losses, 0.25, 0.5), time_above_target(losses, 0.25, 0.5))
    with pytest.raises(GradGraphError, match="unknown meta-loss"):
        meta_loss("steps", losses)
    with pytest.raises(GradGraphError, match="needs a target"):
        meta_loss("time-above-target", losses)
    with pytest.raises(GradGraphError, match="target must be"):
        time_above_target(losses, 0.0)
    with pytest.raises(GradGraphError, match="temperature"):
        time_above_target(losses, 0.1, temperature=0.0)
    with pytest.raises(GradGraphError, match=r"\[steps, particles\]"):
        time_above_target(losses[0], 0.1)
    with pytest.raises(GradGraphError, match="target_loss"):
        MetaTrainConfig(meta_loss="time-above-target")
    with pytest.raises(GradGraphError, match="meta_loss"):
        MetaTrainConfig(meta_loss="nope")


def _tiny_task() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def sample(generator: torch.Generator):
        return torch.randn(6, 5, generator=generator), torch.randint(0, 3, (6,), generator=generator)

    return Task("tiny", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                sample_validation=sample)


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_meta_trainer_minimises_the_configured_meta_loss(estimator, monkeypatch):
    """The trainer's meta-loss is the configured function of the truncation's held-out losses [T, P]."""
    from gradgraph.optim import meta_train

    seen = []
    real = meta_train.compute_meta_loss

    def spy(name, losses, target, temperature):
        seen.append((name, tuple(losses.shape), target, temperature))
        return real(name, losses, target, temperature)

    monkeypatch.setattr(meta_train, "compute_meta_loss", spy)
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False))
    before = [p.detach().clone() for p in meta.parameters()]
    config = MetaTrainConfig(estimator=estimator, num_particles=2, truncation=3, horizon=4, outer_lr=1e-2,
                             meta_loss="time-above-target", target_loss=1.0, temperature=0.5)
    trainer = MetaTrainer(meta, _tiny_task(), config)
    lines = [trainer.step() for _ in range(2)]
    assert seen == [("time-above-target", (3, 2), 1.0, 0.5)] * 2
    assert all(0 < line["meta_loss"] < 1 for line in lines)  # a fraction of steps
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, meta.parameters()))


def test_meta_run_targets_tuned_adams_best_validation_loss(tmp_path, monkeypatch):
    """``--meta-loss time-above-target``: L* is the protocol's Adam best validation loss (mean over seeds), recorded."""
    from gradgraph_lab.tasks.learned_optimizer import meta as meta_run
    from gradgraph_lab.tasks.learned_optimizer.benchmark import Curve
    from gradgraph_lab.tasks.learned_optimizer.selection import ValidationProtocol

    reference = [Curve([0, 5, 10], [2.0, 0.3, 0.5], 0.0), Curve([0, 5, 10], [2.0, 0.6, 0.1], 0.0)]
    protocol = ValidationProtocol(None, [200, 201], 10, 0.01, {}, reference)
    monkeypatch.setattr(meta_run, "validation_protocol", lambda bench, **kwargs: protocol)
    monkeypatch.setattr(meta_run, "_choose_start", lambda config, protocol: (0.01, {"0.01": 1.0}))
    targets = []
    real_build = meta_run._build

    def build(config, context, bench, beta, target_loss):
        trainer = real_build(config, context, bench, beta, target_loss)
        targets.append(trainer.config.target_loss)
        return trainer

    monkeypatch.setattr(meta_run, "_build", build)
    config = meta_run.MetaRunConfig(variant="deepsets", minutes=10, max_outer_steps=1, num_particles=2, truncation=2,
                                    horizon=4, select_every=0, out_dir=str(tmp_path), progress=False,
                                    meta_loss="time-above-target", temperature=0.3)
    trainer = meta_run.run_meta_training(config, export=tmp_path / "export.pt")
    assert targets == [pytest.approx(0.2)] and trainer.config.temperature == 0.3
    assert json.loads((tmp_path / "history.json").read_text())["target_loss"] == pytest.approx(0.2)
    exported = torch.load(tmp_path / "export.pt", weights_only=False)
    assert exported["provenance"]["meta_loss_target"] == pytest.approx(0.2)
    assert exported["provenance"]["run_config"]["meta_loss"] == "time-above-target"


# ---------------------------------------------------------------------- probes of the validation protocol


def test_scheduled_adam_steps_at_the_scheduled_rate():
    from gradgraph_lab.tasks.learned_optimizer.probes import SCHEDULES, scheduled_adam

    torch.manual_seed(0)
    model, reference = nn.Linear(3, 2), nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    schedule = SCHEDULES["linear to 0 at T"]
    opt = scheduled_adam(0.1, schedule, 4)(model)
    for t in range(5):
        ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1 * schedule(t, 4))
        if t:
            ref_opt.load_state_dict({**ref_opt.state_dict(), "state": state})
        x = torch.randn(4, 3)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        state = ref_opt.state_dict()["state"]
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.equal(a, b), t
    assert opt.param_groups[0]["lr"] == 0.0  # step 4 of 4: the schedule has reached 0


def test_perturbation_scores_score_perturbed_copies_and_restore_the_rule(monkeypatch):
    from gradgraph_lab.tasks.learned_optimizer import probes

    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, residual_adam=True))
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    seen = []

    def score(protocol, meta_model):
        seen.append(torch.cat([p.detach().reshape(-1) for p in meta_model.parameters()]))
        return {"score": 0.0}

    monkeypatch.setattr(probes, "score_meta_model", score)
    rows = probes.perturbation_scores(None, rule, sigma=0.01, draws=3)
    assert len(rows) == 4 and len(seen) == 4
    offsets = [(s - seen[0]) for s in seen[1:]]
    assert all(0.005 < float(o.std()) < 0.02 for o in offsets)  # N(0, 0.01²) draws, all different
    assert not torch.equal(offsets[0], offsets[1])
    for key, value in rule.state_dict().items():
        assert torch.equal(value, before[key])


def test_tensor_rate_adam_gives_each_tensor_its_factor_last_match_winning():
    from gradgraph_lab.tasks.learned_optimizer.probes import tensor_rate_adam

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = tensor_rate_adam(0.1, {"weight": 2.0, "0.weight": 3.0})(model)
    rates = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    expected = {"0.weight": 0.3, "0.bias": 0.1, "2.weight": 0.2, "2.bias": 0.1}
    assert {name: rates[id(p)] for name, p in model.named_parameters()} == pytest.approx(expected)


# ---------------------------------------------------------------------- first passage


def _survival_by_definition(losses: list[float], target: float, temperature: float, start: float = 1.0) -> list[float]:
    """``S_t = min(S_{t-1}, σ((log L_t − log L*) / τ))``, one step at a time in plain Python."""
    survival, curve = start, []
    for loss in losses:
        survival = min(survival, 1 / (1 + math.exp(-(math.log(loss) - math.log(target)) / temperature)))
        curve.append(survival)
    return curve


def test_first_passage_equals_its_definition_on_a_hand_made_curve():
    """The curve crosses L* = 1 at step 3, comes back above at step 4 and goes below again:
    the exact (τ → 0) meta-loss counts the 2 steps before the FIRST passage, not the 3 steps
    above L* that time_above_target counts (it would fail this: 3/6 ≠ 2/6)."""
    curve = [2.0, 1.5, 0.9, 1.2, 0.5, 0.4]
    losses = torch.tensor(curve, dtype=torch.float64)[:, None]
    exact, survival = first_passage(losses, 1.0, temperature=1e-4)
    steps_above_before_first_passage = next(i for i, loss in enumerate(curve) if loss < 1.0)
    assert exact.item() == pytest.approx(steps_above_before_first_passage / len(curve), abs=1e-12)
    assert survival.item() == pytest.approx(0.0, abs=1e-12)
    assert time_above_target(losses, 1.0, temperature=1e-4).item() == pytest.approx(3 / 6, abs=1e-12)
    # A finite temperature: the running minimum of the smoothed "still above" indicators, step by step.
    smoothed, _ = first_passage(losses, 1.0, temperature=0.3)
    expected = _survival_by_definition(curve, 1.0, 0.3)
    assert smoothed.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_first_passage_carries_its_survival_across_truncations_and_restarts_at_one():
    """Two truncations with the carried survival give the single long truncation's S_t; a run
    that restarts (survival 1) is scored as new."""
    curve = [3.0, 2.0, 1.4, 1.1, 0.95, 1.05, 0.8, 0.7]
    losses = torch.tensor(curve, dtype=torch.float64)[:, None]
    whole, end = first_passage(losses, 1.0, 0.2)
    first, carried = first_passage(losses[:3], 1.0, 0.2)
    second, end_split = first_passage(losses[3:], 1.0, 0.2, survival=carried)
    assert (3 * first + 5 * second).item() == pytest.approx(8 * whole.item(), rel=1e-12)
    assert end_split.item() == pytest.approx(end.item(), rel=1e-12)
    fresh, _ = first_passage(losses[3:], 1.0, 0.2, survival=torch.ones(1, dtype=torch.float64))
    assert fresh.item() == pytest.approx(sum(_survival_by_definition(curve[3:], 1.0, 0.2)) / 5, rel=1e-12)
    with pytest.raises(GradGraphError, match="survival must have shape"):
        first_passage(losses, 1.0, 0.2, survival=torch.ones(2, dtype=torch.float64))


def test_first_passage_does_not_decay_while_the_run_stays_above_the_target():
    """A run that stays 30% above L* for 100 steps has not passed: S stays at σ(log 1.3 / τ) ≈ 0.74
    (τ = 0.25), and a step that reaches a new low lowers it to that step's value, no further.
    Fails with the running product of the first version (S ≈ 1e-13 after 100 such steps: every
    run looked as if it had passed within a few steps of its restart)."""
    losses = torch.full((100, 1), 1.3, dtype=torch.float64)
    value, survival = first_passage(losses, 1.0, 0.25)
    level = 1 / (1 + math.exp(-math.log(1.3) / 0.25))
    assert value.item() == pytest.approx(level, rel=1e-12) and survival.item() == pytest.approx(level, rel=1e-12)
    lower = torch.tensor([[1.3], [1.1], [1.2], [1.25]], dtype=torch.float64)
    _, after = first_passage(lower, 1.0, 0.25)
    assert after.item() == pytest.approx(1 / (1 + math.exp(-math.log(1.1) / 0.25)), rel=1e-12)


def test_meta_trainer_carries_the_first_passage_survival_and_resets_it_at_restart():
    torch.manual_seed(0)
    config = MetaTrainConfig(estimator="pes", num_particles=4, truncation=2, horizon=4, meta_loss="first-passage",
                             target_loss=0.5, temperature=0.1)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, residual_adam=True))
    trainer = MetaTrainer(meta, _tiny_task(), config)
    trainer.step()
    assert (trainer.survival < 1).all() and (trainer.survival > 0).all()
    carried = trainer.survival.clone()
    restarting = trainer.inner_step >= trainer.restart_at  # the staggered first restart: problem 0
    assert restarting.any() and not restarting.all()
    trainer._restart_finished()
    assert torch.equal(trainer.survival[restarting], torch.ones(int(restarting.sum())))
    assert torch.equal(trainer.survival[~restarting], carried[~restarting])
    trainer.step()
    # A probability of "not yet below" only falls along a run that did not restart.
    assert (trainer.survival[~restarting] <= carried[~restarting]).all()
