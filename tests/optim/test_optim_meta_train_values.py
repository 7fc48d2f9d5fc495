"""``MetaTrainer``'s outer step (``apply_meta_gradient``: all-reduce, the scalars-first mask, the absolute and the
relative clip and its running mean, reset when every meta-parameter starts training) and its restarts
(``_restart_finished``: which runs restart, from which seed, with which state), against the formulas written out
(float64).

Written for the mutation run of ``optim/meta_train.py`` (issue 31; docs/mutation.md, run optim 12): each test
names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task

DOUBLE = torch.float64


def _task() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def sample(generator: torch.Generator):
        x = torch.randn(5, 3, generator=generator, dtype=DOUBLE)
        return x, (x[:, 0] > 0).long()

    return Task("tiny", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"))


def _trainer(**options) -> MetaTrainer:
    config = dict(estimator="tbptt", num_particles=2, truncation=1, horizon=6, grad_clip=None)
    config.update(options)
    torch.manual_seed(0)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, schedule=True)).double()
    return MetaTrainer(rule, _task(), MetaTrainConfig(**config))


def _flat(trainer: MetaTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.meta_model.parameters()])


def _plain_steps(trainer: MetaTrainer) -> None:
    """The outer optimiser replaced by SGD at rate 1 on the same parameters: a step moves the meta-parameters by
    minus the gradient handed to it, so the clipped gradient can be read off (Adam's first step cannot show a
    scale)."""
    trainer.outer = torch.optim.SGD(list(trainer.meta_model.parameters()), lr=1.0)


def _direction(trainer: MetaTrainer, seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randn(_flat(trainer).numel(), generator=generator, dtype=DOUBLE)
    return flat * (scale / float(flat.norm()))


def _moved_by(trainer: MetaTrainer, flat_grad: torch.Tensor) -> tuple[float, torch.Tensor]:
    before = _flat(trainer).clone()
    norm = trainer.apply_meta_gradient(flat_grad)
    return norm, before - _flat(trainer)


def test_the_outer_step_clips_at_the_absolute_norm_then_at_a_multiple_of_the_running_mean():
    """``grad_clip = 5``, ``grad_clip_relative = 2``: a first estimate of norm 4 passes whole (no mean yet) and
    starts the mean at 4; one of norm 3 passes (below 2 × 4), mean 0.9·4 + 0.1·3 = 3.9; one of norm 30 leaves with
    norm ``min(30, 5, 2 × 3.9) = 5`` (the relative clip, applied after the absolute one, sees the norm 5 it left:
    below 7.8, no further cut), and the mean follows the raw norm, 0.9·3.9 + 0.1·30 = 6.51; a fourth of norm 30
    with ``grad_clip = 100`` leaves with 2 × 6.51. Each returned norm is the raw one; the moves are the clipped
    gradients exactly.

    Failed before the fix (main): the relative clip scaled by ``2 × 3.9 / 30`` the gradient the absolute one had
    already cut to 5, a step of norm 1.3 — both cuts compounded. Kills ``apply_meta_gradient`` 7 (the running mean
    reset at every step of a run without a scalars-first stage), 16, 17 (the absolute clip's scale inverted), 18
    (the norm it left not passed on), 21, 23 (the relative scale inverted, or read without the mean), 30, 32-36
    (the mean not updated as documented) and 43, 44 (gradients left on the meta-parameters)."""
    trainer = _trainer(grad_clip=5.0, grad_clip_relative=2.0)
    _plain_steps(trainer)
    means = [4.0, 0.9 * 4.0 + 0.1 * 3.0]
    means += [0.9 * means[1] + 0.1 * 30.0]
    means += [0.9 * means[2] + 0.1 * 30.0]
    for seed, (norm_in, moved_norm, mean) in enumerate([(4.0, 4.0, means[0]), (3.0, 3.0, means[1]),
                                                        (30.0, 5.0, means[2]), (30.0, 2 * means[2], means[3])]):
        if seed == 3:
            trainer.config.grad_clip = 100.0
        gradient = _direction(trainer, seed, norm_in)
        norm, moved = _moved_by(trainer, gradient)
        assert math.isclose(norm, norm_in, rel_tol=1e-12)
        torch.testing.assert_close(moved, gradient * (moved_norm / norm_in), rtol=1e-10, atol=1e-13)
        assert math.isclose(trainer.mean_grad_norm, mean, rel_tol=1e-12)
        assert all(p.grad is None for p in trainer.meta_model.parameters())  # none left for the next backward


def test_the_outer_step_reduces_first_and_masks_the_scalars_first_stage():
    """``all_reduce`` (here: halve) is applied before anything else; while ``outer_steps < scalars_first`` only the
    scalars' entries move (the norm returned is the masked one); at the first step on everything the relative
    clip's running mean starts again (``None``, then that step's norm), so a step ten times the scalars-only
    norms is not cut.

    Kills ``apply_meta_gradient`` 6, 8 (the mean not reset at the first step on everything), 9 (reset to ``""``)."""
    calls = []

    def halve(flat: torch.Tensor) -> torch.Tensor:
        calls.append(flat.clone())
        return flat / 2

    trainer = _trainer(grad_clip_relative=2.0, scalars_first=1)
    trainer.all_reduce = halve
    _plain_steps(trainer)
    mask = trainer.scalar_mask
    assert mask.any() and not mask.all()
    gradient = _direction(trainer, 0, 6.0)
    norm, moved = _moved_by(trainer, gradient)
    assert len(calls) == 1 and torch.equal(calls[0], gradient)
    masked = gradient / 2 * mask
    assert math.isclose(norm, float(masked.norm()), rel_tol=1e-12)
    torch.testing.assert_close(moved, masked, rtol=1e-10, atol=1e-13)
    assert math.isclose(trainer.mean_grad_norm, norm, rel_tol=1e-12)
    trainer.outer_steps = 1  # as end_step counts it: the first step on every meta-parameter
    big = _direction(trainer, 1, 20.0 * norm)
    norm, moved = _moved_by(trainer, big)
    assert math.isclose(norm, 10.0 * float(masked.norm()), rel_tol=1e-12)
    torch.testing.assert_close(moved, big / 2, rtol=1e-10, atol=1e-13)
    assert math.isclose(trainer.mean_grad_norm, norm, rel_tol=1e-12)


def _model_params(task: Task, seed: int) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in task.make_model(seed).named_parameters()}


def test_runs_at_their_horizon_restart_from_new_seeds_in_problem_order_and_the_others_keep_everything():
    """Three runs (TBPTT) at first restarts 2, 4, 6 (``(k + 1) · 6 // 3``, staggered), at inner steps 2, 3, 7:
    runs 0 and 2 restart — run 0 from the next unused seed, run 2 from the one after —, their parameters are the
    seeded model's, their state zero (step 0), their survival 1, inner step 0 and next restart a full horizon
    (6) away; run 1 keeps its parameters, state, survival, step and restart exactly; the parameter tensors held
    before are not written into (a truncation's rollback holds them).

    Kills ``_restart_finished`` 8 (a seed drawn for every problem, restarting or not: the seeds drift), 26 (the
    restarted runs keep their state and the others get a fresh one)."""
    trainer = _trainer(num_particles=3)
    assert trainer.restart_at.tolist() == [2, 4, 6]
    trainer.inner_step = torch.tensor([2, 3, 7])
    trainer.survival = torch.tensor([0.5, 0.4, 0.3], dtype=trainer.survival.dtype)
    trainer.state.step = torch.tensor([2, 3, 7])
    trainer.state.momentum = {name: torch.ones_like(value) for name, value in trainer.state.momentum.items()}
    held = {name: value.clone() for name, value in trainer.params.items()}
    held_tensors = dict(trainer.params)
    seed = trainer.next_model_seed
    done = trainer._restart_finished()
    assert done.tolist() == [True, False, True]
    assert trainer.next_model_seed == seed + 2
    for index, fresh in ((0, _model_params(trainer.task, seed)), (2, _model_params(trainer.task, seed + 1))):
        for name in trainer.names:
            assert torch.equal(trainer.params[name][index], fresh[name]), (index, name)
            assert torch.equal(dict(trainer.models[index].named_parameters())[name].detach(), fresh[name])
            assert not trainer.state.momentum[name][index].any()
    for name in trainer.names:
        assert torch.equal(trainer.params[name][1], held[name][1])
        assert torch.equal(held_tensors[name], held[name])  # not written in place
        assert trainer.state.momentum[name][1].eq(1).all()
    assert trainer.state.step.tolist() == [0, 3, 0]
    assert torch.equal(trainer.survival, torch.tensor([1.0, 0.4, 1.0], dtype=trainer.survival.dtype))
    assert trainer.inner_step.tolist() == [0, 3, 0]
    assert trainer.restart_at.tolist() == [6, 4, 6]
    assert not trainer._restart_finished().any()  # nothing more to restart: no seed used
    assert trainer.next_model_seed == seed + 2


def test_a_pes_pair_restarts_together_from_one_seed():
    """PES, two pairs (particles ``p`` and ``p + 2``): first restarts at 3 and 6 per problem; at inner step 3 the
    first pair restarts, both particles from the same new seed (common random numbers), the second pair not."""
    trainer = _trainer(estimator="pes", num_particles=4)
    assert trainer.restart_at.tolist() == [3, 6, 3, 6]
    trainer.inner_step = torch.tensor([3, 3, 3, 3])
    seed = trainer.next_model_seed
    held = {name: value.clone() for name, value in trainer.params.items()}
    assert trainer._restart_finished().tolist() == [True, False, True, False]
    assert trainer.next_model_seed == seed + 1
    fresh = _model_params(trainer.task, seed)
    for name in trainer.names:
        assert torch.equal(trainer.params[name][0], fresh[name]) and torch.equal(trainer.params[name][2], fresh[name])
        assert torch.equal(trainer.params[name][1], held[name][1]) and torch.equal(trainer.params[name][3], held[name][3])
    assert trainer.restart_at.tolist() == [6, 6, 6, 6] and trainer.inner_step.tolist() == [0, 3, 0, 3]


def test_a_diverged_truncation_rolls_every_run_back_and_restarts_the_named_problems_where_they_stand():
    """A truncation that raises (here a stand-in that moves the runs and then reports run 1 diverged): ``estimate``
    returns ``(nan, None)``, every run's parameters, state and inner step are the ones it started from, run 1's
    next restart is its current step (it restarts at the next estimate, the others keep their phases) and the
    count of skipped truncations goes up by one. An error that names no run (``NonFiniteFactorError``, or
    ``_NonFiniteMetaLoss`` without ``particles``) restarts all of them.

    Kills ``estimate`` 20 (``getattr`` without its default: ``NonFiniteFactorError`` has no ``particles``), 24, 25,
    28 (the all-runs mask of an unnamed error lost) and 55 (the count set to 1, not counted)."""
    from gradgraph.errors import NonFiniteFactorError
    from gradgraph.optim.meta_train import _NonFiniteMetaLoss

    trainer = _trainer(num_particles=3)
    trainer.inner_step = torch.tensor([1, 1, 0])
    raised = [_NonFiniteMetaLoss("run 1", torch.tensor([False, True, False])), NonFiniteFactorError("a factor"),
              _NonFiniteMetaLoss("all")]
    named = [[False, True, False], [True] * 3, [True] * 3]
    entered = []

    def diverging():
        entered.append((trainer.params, trainer.state, trainer.inner_step, trainer.restart_at.clone()))
        trainer.params = {name: value + 1 for name, value in trainer.params.items()}
        trainer.inner_step = trainer.inner_step + 1
        raise raised.pop(0)

    trainer._tbptt_truncation = diverging
    for count, diverged in enumerate(named, start=1):
        loss, estimate = trainer.estimate()
        assert math.isnan(loss) and estimate is None
        params, state, inner_step, restart_at = entered[-1]
        assert trainer.params is params and trainer.state is state and trainer.inner_step is inner_step
        expected = [int(step) if flag else int(at) for flag, step, at in zip(diverged, inner_step, restart_at)]
        assert trainer.restart_at.tolist() == expected, count
        assert trainer.diverged_truncations == count
    assert [at.tolist() for *_, at in entered[:2]] == [[2, 4, 6], [2, 6, 6]]  # run 1 restarted before the second


def test_pes_perturbations_restart_with_their_pair_and_a_diverged_truncation_is_undone():
    """PES, two pairs. At the first restart of pair 0 its accumulated perturbation starts again at zero before the
    truncation runs (pair 1's is kept); a truncation that perturbs and then reports particle 3 (pair 1) diverged is
    undone for every pair (the perturbation it drew never acted on a kept run) and pair 1's accumulation restarts;
    both particles of pair 1 restart where they stand.

    Kills ``estimate`` 6 (the restarted pairs' perturbations not reset before the truncation)."""
    from gradgraph.optim.meta_train import _NonFiniteMetaLoss

    trainer = _trainer(estimator="pes", num_particles=4)
    pes = trainer.pes
    trainer.inner_step = torch.tensor([3, 1, 3, 1])  # pair 0 (particles 0, 2) at its first restart, 3
    pes.accumulated = torch.ones_like(pes.accumulated)
    seen = []

    def truncation():
        seen.append(pes.accumulated.clone())
        return 0.5, torch.zeros(pes.dim, dtype=DOUBLE)

    trainer._pes_truncation = truncation
    assert trainer.estimate()[0] == 0.5
    assert not seen[0][0].any() and seen[0][1].eq(1).all()

    pes.accumulated = torch.full_like(pes.accumulated, 2.0)

    def diverging():
        pes.perturb(trainer.flat_meta_parameters())
        raise _NonFiniteMetaLoss("particle 3", torch.tensor([False, False, False, True]))

    trainer._pes_truncation = diverging
    loss, estimate = trainer.estimate()
    assert math.isnan(loss) and estimate is None
    torch.testing.assert_close(pes.accumulated[0], torch.full_like(pes.accumulated[0], 2.0), rtol=0, atol=1e-15)
    assert not pes.accumulated[1].any()
    assert trainer.restart_at.tolist() == [6, 1, 6, 1]
