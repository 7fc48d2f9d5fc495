"""``MetaTrainer``'s outer step (``apply_meta_gradient``: all-reduce, the scalars-first mask, the absolute and the
relative clip and its running mean, reset when every meta-parameter starts training) and its restarts
(``_restart_finished``: which runs restart, from which seed, with which state), against the formulas written out
(float64).

Written for the mutation run of ``optim/meta_train.py`` (issue 31; docs/mutation.md, run optim 12): each test
names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch_geometric.data import Batch

from gradgraph.convert import to_graph
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task
from optim_tasks import tiny_task

DOUBLE = torch.float64


def _task() -> Task:
    return tiny_task(validation=False)


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


def _validated_task() -> Task:
    """``_task`` with held-out batches of their own size (7) and rule (the second input's sign)."""
    task = _task()

    def validation(generator: torch.Generator):
        x = torch.randn(7, 3, generator=generator, dtype=DOUBLE)
        return x, (x[:, 1] > 0).long()

    return Task(task.name, task.make_model, task.sample_batch, task.loss_fn, sample_validation=validation)


def _truncation_by_hand(trainer: MetaTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor], object, list, object]:
    """One TBPTT truncation of ``trainer`` written out: every particle's mean gradient by autograd on its own
    network (a loop over particles), the rule applied to all of them, the next training batch drawn from a copy of
    the data stream (one per problem, handed to each of its particles), the held-out batch after it (if the task
    has them, else the training batch), each particle's held-out mean loss. Returns ``(losses [T, P], params,
    state, batches, generator)`` — the parameters and state still carry the meta-parameters' history."""
    task, config = trainer.task, trainer.config
    problems, particles = trainer.num_problems, config.num_particles
    generator = torch.Generator()
    generator.set_state(trainer.data_generator.get_state())

    def draw(sample):
        per_problem = [sample(generator) for _ in range(problems)]
        return [per_problem[p % problems] for p in range(particles)]

    network = task.make_model(0)  # the architecture; its weights are set to each particle's before use
    names = [name for name, p in network.named_parameters()]
    params = {name: value.detach().clone() for name, value in trainer.params.items()}
    state, batches, terms, kwargs = trainer.state, trainer.batches, [], task.forward_kwargs
    for _ in range(config.truncation):
        grads, graphs = {name: [] for name in names}, []
        for p in range(particles):
            leaves = {name: params[name][p].detach().clone().requires_grad_() for name in names}
            inputs, targets = batches[p]
            loss = task.loss_fn(torch.func.functional_call(network, leaves, (inputs,), kwargs), targets).mean()
            for name, grad in zip(names, torch.autograd.grad(loss, [leaves[name] for name in names])):
                grads[name].append(grad)
            if trainer.meta_model.needs_graph:  # GradMetaNet reads each particle's graph on its batch
                with torch.no_grad():
                    for name, value in network.named_parameters():
                        value.copy_(leaves[name])
                graphs.append(to_graph(network, inputs, targets, task.loss_fn, forward_kwargs=kwargs))
        batch = Batch.from_data_list(graphs) if graphs else None
        params, state = trainer.meta_model(params, {name: torch.stack(g) for name, g in grads.items()}, state,
                                           batch, graphs[0] if graphs else None)
        batches = draw(task.sample_batch)
        held = draw(task.sample_validation) if task.sample_validation is not None else batches
        terms.append(torch.stack([
            task.loss_fn(torch.func.functional_call(network, {name: params[name][p] for name in names},
                                                    (held[p][0],), kwargs), held[p][1]).mean()
            for p in range(particles)]))
    return torch.stack(terms), params, state, batches, generator


def _meta_gradient(trainer: MetaTrainer, meta_loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(meta_loss, list(trainer.meta_model.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(trainer.meta_model.parameters(), grads)])


def _check_truncation(trainer: MetaTrainer, losses, params, state, batches, generator, meta_loss, survival) -> None:
    inner_step = trainer.inner_step.clone()
    expected_grad = _meta_gradient(trainer, meta_loss)
    loss, flat_grad = trainer.estimate()
    assert math.isclose(loss, float(meta_loss.detach()), rel_tol=1e-12)
    assert expected_grad.abs().sum() > 0
    assert flat_grad.dtype == DOUBLE
    torch.testing.assert_close(flat_grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in trainer.meta_model.parameters())
    for name, value in params.items():
        assert not trainer.params[name].requires_grad
        torch.testing.assert_close(trainer.params[name], value.detach(), rtol=1e-12, atol=1e-14)
    assert not trainer.state.momentum[next(iter(params))].requires_grad
    torch.testing.assert_close(trainer.state.tensors(), state.detach().tensors(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(trainer.survival, survival, rtol=1e-12, atol=1e-14)
    assert not trainer.survival.requires_grad
    assert torch.equal(trainer.inner_step, inner_step + trainer.config.truncation)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(trainer.batches, batches))
    assert torch.equal(trainer.data_generator.get_state(), generator.get_state())


def _tbptt(task: Task, gradmetanet: bool = False, **options) -> MetaTrainer:
    config = dict(estimator="tbptt", num_particles=3, truncation=3, horizon=12, grad_clip=None, seed=4)
    config.update(options)
    torch.manual_seed(0)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=gradmetanet, schedule=True)).double()
    return MetaTrainer(rule, task, MetaTrainConfig(**config))


def test_a_tbptt_truncation_is_the_mean_log_loss_of_the_unrolled_runs_and_its_gradient():
    """TBPTT, three runs of three steps, on the batched path and on the per-network graph path, with and without
    held-out batches: the returned meta-loss is ``mean_p mean_t log L_t`` of the losses unrolled by hand
    (:func:`_truncation_by_hand`), the estimate its gradient with respect to every meta-parameter (autograd through
    the unroll, the batch gradients as data), and the runs move on to the unrolled parameters, state, batches
    and data stream, detached, their inner steps three further.

    Kills ``_tbptt_truncation`` 52, 53 (the meta-parameters left holding zero gradients, not none)."""
    for batched in (True, False):
        for task in (_task(), _validated_task()):
            trainer = _tbptt(task, batched=batched)
            assert (trainer.chain is not None) == batched
            trainer.step()  # the runs are under way, their state not the initial one
            losses, params, state, batches, generator = _truncation_by_hand(trainer)
            meta_loss = torch.log(losses).mean(dim=0).mean()
            _check_truncation(trainer, losses, params, state, batches, generator, meta_loss, trainer.survival.clone())


def test_a_tbptt_truncation_of_the_first_passage_meta_loss_carries_the_survival():
    """``"first-passage"``: ``S_t = min(S_{t-1}, σ((log L_t − log L*) / τ))`` from the survival the runs carry
    (set here to 0.9, 0.3, 1), the meta-loss ``mean_p mean_t S_t`` and the new survival ``S_T`` (detached),
    written out step by step.

    Kills ``_meta_loss`` 17, 21 (the carried survival not handed to ``first_passage``: every run starts the
    truncation alive)."""
    trainer = _tbptt(_validated_task(), meta_loss="first-passage", target_loss=0.7, temperature=0.3)
    trainer.step()
    trainer.survival = torch.tensor([0.9, 0.3, 1.0], dtype=DOUBLE)
    losses, params, state, batches, generator = _truncation_by_hand(trainer)
    survival, curve = trainer.survival.clone(), []
    for step_losses in losses:
        survival = torch.minimum(survival, torch.sigmoid((torch.log(step_losses) - math.log(0.7)) / 0.3))
        curve.append(survival)
    meta_loss = torch.stack(curve).mean(dim=0).mean()
    assert (survival < torch.tensor([0.9, 0.3, 1.0], dtype=DOUBLE)).any()
    _check_truncation(trainer, losses, params, state, batches, generator, meta_loss, survival.detach())


def test_one_particles_state_is_its_row_of_every_field_and_the_rows_concatenate_back():
    """``_slice_state(state, p, P)`` (PES's per-particle rule calls): row ``p`` of the step, of every momentum and of
    the momenta, and particle ``p``'s ``N`` rows of the factor EMAs ``[P·N, B, 12]`` (rows ``p·N … p·N + N − 1``);
    ``_cat_states`` of the ``P`` slices is the state again, field by field. Without factor EMAs both keep
    ``None``.

    Kills ``_cat_states`` 2, 16, 18 (the second state read for the keys: a list of one fails); run optim 15 ran
    with this test in the file and left no ``_slice_state`` survivor."""
    from gradgraph.optim.meta_model import OptimizerState
    from gradgraph.optim.meta_train import _cat_states, _slice_state

    generator = torch.Generator().manual_seed(5)
    particles, nodes = 3, 2
    state = OptimizerState(
        step=torch.tensor([4, 7, 9]),
        momentum={"a": torch.randn(3, 2, 5, generator=generator, dtype=DOUBLE),
                  "b": torch.randn(3, 4, generator=generator, dtype=DOUBLE)},
        momenta={"a": torch.randn(3, 2, 5, 7, generator=generator, dtype=DOUBLE),
                 "b": torch.randn(3, 4, 7, generator=generator, dtype=DOUBLE)},
        factor_emas=torch.randn(particles * nodes, 2, 12, generator=generator, dtype=DOUBLE),
    )
    slices = [_slice_state(state, p, particles) for p in range(particles)]
    for p, one in enumerate(slices):
        assert one.step.tolist() == [state.step[p].item()]
        for field in ("momentum", "momenta"):
            assert set(getattr(one, field)) == {"a", "b"}
            for name, value in getattr(state, field).items():
                assert torch.equal(getattr(one, field)[name], value[p:p + 1])
        assert torch.equal(one.factor_emas, torch.stack([state.factor_emas[p * nodes + n] for n in range(nodes)]))
    again = _cat_states(slices)
    assert torch.equal(again.step, state.step)
    for field in ("momentum", "momenta"):
        assert set(getattr(again, field)) == {"a", "b"}
        for name, value in getattr(state, field).items():
            assert torch.equal(getattr(again, field)[name], value)
    assert torch.equal(again.factor_emas, state.factor_emas)

    alone = _cat_states(slices[1:2])  # the concatenation of one state is that state
    assert torch.equal(alone.step, slices[1].step) and torch.equal(alone.factor_emas, slices[1].factor_emas)
    for field in ("momentum", "momenta"):
        assert set(getattr(alone, field)) == {"a", "b"}
        assert all(torch.equal(value, getattr(slices[1], field)[name]) for name, value in getattr(alone, field).items())

    plain = OptimizerState(step=state.step, momentum=state.momentum, momenta=state.momenta)
    assert _slice_state(plain, 1, particles).factor_emas is None
    assert _cat_states([_slice_state(plain, p, particles) for p in range(particles)]).factor_emas is None


def test_the_log_line_of_an_outer_step_holds_the_documented_numbers():
    """``end_step`` counts the outer step and appends (and returns) the line ``outer_step``, ``meta_loss``,
    ``grad_norm``, the rule's ``α``, ``β``, ``μ`` as floats, the schedule as a list (only where the rule has one)
    and ``seconds``. Run optim 15 ran with this test in the file and left no ``end_step`` survivor."""
    trainer = _trainer()
    trainer.outer_steps = 4
    rule = trainer.meta_model
    line = trainer.end_step(0.25, 1.5, 3.0)
    expected = {"outer_step": 5, "meta_loss": 0.25, "grad_norm": 1.5, "alpha": float(rule.alpha.detach()),
                "beta": float(rule.beta.detach()), "mu": float(rule.mu.detach()), "seconds": 3.0,
                "schedule": rule.schedule.detach().tolist()}
    assert line == expected and all(type(line[key]) is type(value) for key, value in expected.items())
    assert len(expected["schedule"]) > 1 and len({expected["alpha"], expected["beta"], expected["mu"]}) == 3
    assert trainer.outer_steps == 5 and trainer.history == [expected]
    plain = MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False)).double(), _task(),
                        MetaTrainConfig(estimator="tbptt", num_particles=2, truncation=1, horizon=6))
    assert "schedule" not in plain.end_step(math.nan, math.nan, 0.0) and plain.outer_steps == 1


def _check_fresh_trainer(trainer: MetaTrainer, rule: LearnedUpdate, task: Task, config: MetaTrainConfig,
                         problems: int) -> None:
    particles = config.num_particles
    first_seed = 1_000_000 + 10_000 * config.seed
    assert trainer.task is task and trainer.config is config and trainer.meta_model is rule
    assert trainer.num_problems == problems and trainer.next_model_seed == first_seed + problems
    assert len(trainer.models) == particles and len({id(m) for m in trainer.models}) == particles
    names = [name for name, _ in task.make_model(0).named_parameters()]
    assert trainer.names == names and trainer.device == torch.device("cpu")
    for p in range(particles):
        seeded = _model_params(task, first_seed + p % problems)
        for name in names:
            assert torch.equal(dict(trainer.models[p].named_parameters())[name].detach(), seeded[name])
            assert torch.equal(trainer.params[name][p], seeded[name])
    assert all(not value.requires_grad for value in trainer.params.values())
    # the outer Adam: every non-scalar meta-parameter at outer_lr, the scalars at scalar_lr, torch's defaults else
    assert type(trainer.outer) is torch.optim.Adam
    others, scalars = trainer.outer.param_groups
    scalar_ids = {id(p) for p in rule.scalar_parameters}
    assert [id(p) for p in scalars["params"]] == [id(p) for p in rule.scalar_parameters]
    assert [id(p) for p in others["params"]] == [id(p) for p in rule.parameters() if id(p) not in scalar_ids]
    assert others["lr"] == config.outer_lr and scalars["lr"] == config.scalar_lr
    assert others["betas"] == (0.9, 0.999) and others["eps"] == 1e-8 and others["weight_decay"] == 0
    # the data stream: seeded with config.seed, one training batch per problem drawn, handed to its particles
    stream = torch.Generator().manual_seed(config.seed)
    drawn = [task.sample_batch(stream) for _ in range(problems)]
    assert torch.equal(trainer.data_generator.get_state(), stream.get_state())
    for p, (inputs, targets) in enumerate(trainer.batches):
        assert torch.equal(inputs, drawn[p % problems][0]) and torch.equal(targets, drawn[p % problems][1])
    # the runs: zero state, staggered first restarts (k + 1) H // K, step 0, alive, nothing counted yet
    assert trainer.state.step.tolist() == [0] * particles and trainer.state.factor_emas is None
    assert all(not value.any() for value in trainer.state.momentum.values())
    assert all(value.shape[-1] == 7 and not value.any() for value in trainer.state.momenta.values())
    assert trainer.restart_at.tolist() == [(p % problems + 1) * config.horizon // problems for p in range(particles)]
    assert trainer.inner_step.dtype == torch.long and trainer.inner_step.tolist() == [0] * particles
    assert torch.equal(trainer.survival, torch.ones(particles))
    assert trainer.outer_steps == 0 and trainer.diverged_truncations == 0 and trainer.history == []
    assert trainer.mean_grad_norm is None and trainer._chain_graphs is None
    mask = torch.cat([torch.full((p.numel(),), id(p) in scalar_ids) for p in rule.parameters()])
    assert trainer.scalar_mask.dtype == torch.bool and torch.equal(trainer.scalar_mask, mask)
    assert (trainer.chain is not None) == (config.batched and not task.forward_kwargs)


def test_a_fresh_trainer_holds_the_documented_initial_state():
    """TBPTT (three problems, one per run; and a single run) and PES (two pairs: problems of particles ``p`` and
    ``p + 2`` shared): the models from the seeds ``1 000 000 + 10 000 · seed + k``, their parameters stacked, the
    outer Adam's two groups and rates, the data stream and first batches, the zero state, the staggered restarts,
    the counters, the scalars mask, the batched path where it applies; PES's perturbations seeded with
    ``seed + 7``, in the meta-parameters' dtype, zero, and none for TBPTT.

    Kills ``__init__`` 26, 48, 125 (the device, the names or the batched path read off the second run's model:
    a single run fails); run optim 15 ran with the rest of this test in the file."""
    for estimator, particles, problems in (("tbptt", 3, 3), ("tbptt", 1, 1), ("pes", 4, 2)):
        for batched in (True, False):
            config = MetaTrainConfig(estimator=estimator, num_particles=particles, truncation=2, horizon=10,
                                     seed=2, outer_lr=0.003, scalar_lr=0.02, sigma=0.04, batched=batched)
            torch.manual_seed(0)
            rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, schedule=True)).double()
            task = _validated_task()
            trainer = MetaTrainer(rule, task, config)
            _check_fresh_trainer(trainer, rule, task, config, problems)
            if estimator == "tbptt":
                assert trainer.pes is None
                continue
            pes, dim = trainer.pes, sum(p.numel() for p in rule.parameters())
            assert (pes.num_pairs, pes.dim, pes.sigma) == (2, dim, 0.04)
            assert pes.accumulated.dtype == DOUBLE and pes.accumulated.shape == (2, dim) and not pes.accumulated.any()
            assert torch.equal(pes.generator.get_state(), torch.Generator().manual_seed(2 + 7).get_state())


class _Tempered(nn.Module):
    """An MLP whose forward takes a keyword (``temperature``, dividing the logits): a task's ``forward_kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.net(x) / temperature


def _tempered_task() -> Task:
    """``_validated_task`` with ``forward_kwargs={"temperature": 3.0}`` (no batched path then)."""
    task = _validated_task()

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _Tempered().double()

    return Task(task.name, make, task.sample_batch, task.loss_fn, forward_kwargs={"temperature": 3.0},
                sample_validation=task.sample_validation)


def _regression_task() -> Task:
    """Targets with a trailing axis ``[b, 2]``, a squared error per datapoint."""
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def sample(generator: torch.Generator):
        x = torch.randn(5, 3, generator=generator, dtype=DOUBLE)
        return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], dim=1)

    def validation(generator: torch.Generator):
        x = torch.randn(6, 3, generator=generator, dtype=DOUBLE)
        return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], dim=1)

    return Task("regression", make, sample, lambda out, y: ((out - y) ** 2).sum(dim=1), sample_validation=validation)


def _ragged_task(problems: int, calls: list[int]) -> Task:
    """``_validated_task`` whose training batches have 5, 4, 6, 5, 4, ... datapoints, one size per inner step (the
    ``problems`` batches of a step are drawn one after another; ``calls[0]`` counts the draws)."""
    task = _validated_task()

    def sample(generator: torch.Generator):
        size = (5, 4, 6)[calls[0] // problems % 3]
        calls[0] += 1
        x = torch.randn(size, 3, generator=generator, dtype=DOUBLE)
        return x, (x[:, 0] > 0).long()

    return Task(task.name, task.make_model, sample, task.loss_fn, sample_validation=task.sample_validation)


def test_a_tbptt_truncation_of_a_task_with_forward_keywords_or_vector_targets_is_the_unroll_written_out():
    """As the mean-log-loss test, for a model called with ``forward_kwargs`` (the per-network path: the keyword
    reaches the gradients and the held-out losses) and for regression targets ``[b, 2]`` (on both paths: the
    batched path's held-out losses reshape them with their trailing axis).

    Kills ``_losses`` 29, 31 (the targets flattened without their trailing axis), 49, 53 (the held-out losses
    without ``forward_kwargs``) and ``_graphs`` 15, 20 (the conversion without them: other gradients)."""
    cases = [(_tempered_task(), True), (_regression_task(), True), (_regression_task(), False)]
    for task, batched in cases:
        trainer = _tbptt(task, batched=batched)
        assert (trainer.chain is not None) == (batched and not task.forward_kwargs)
        trainer.step()
        losses, params, state, batches, generator = _truncation_by_hand(trainer)
        meta_loss = torch.log(losses).mean(dim=0).mean()
        _check_truncation(trainer, losses, params, state, batches, generator, meta_loss, trainer.survival.clone())


def test_a_gradmetanet_tbptt_truncation_is_the_unroll_written_out_on_both_paths():
    """GradMetaNet reads every particle's graph on its batch (here converted by hand, ``to_graph`` per particle and
    ``Batch.from_data_list``); on the batched path the graphs' structure is built once and built again when the
    training batches change size (4-6 datapoints): the meta-loss, the estimate, the new parameters and state (the
    factor EMAs with them) are the unroll's.

    Kills ``_batched_gradients`` 6 (the structure rebuilt when it matches and kept when the batch size changed)."""
    calls = [0]
    for task, batched in ((_validated_task(), True), (_validated_task(), False), (_ragged_task(3, calls), True)):
        trainer = _tbptt(task, gradmetanet=True, batched=batched, truncation=2)
        trainer.step()
        drawn = calls[0]
        losses, params, state, batches, generator = _truncation_by_hand(trainer)
        calls[0] = drawn  # the trainer draws the same batches again
        assert state.factor_emas is not None
        meta_loss = torch.log(losses).mean(dim=0).mean()
        _check_truncation(trainer, losses, params, state, batches, generator, meta_loss, trainer.survival.clone())


def _poisoned_validation_task(problems: int, poisoned: int) -> Task:
    """``_validated_task`` whose held-out batches of problem ``poisoned`` hold a NaN input (its training batches are
    finite): that run's held-out loss is NaN at every step, the others' finite."""
    task, calls = _validated_task(), [0]

    def validation(generator: torch.Generator):
        x, y = task.sample_validation(generator)
        if calls[0] % problems == poisoned:
            x[0, 0] = math.nan
        calls[0] += 1
        return x, y

    return Task(task.name, task.make_model, task.sample_batch, task.loss_fn, sample_validation=validation)


def _assert_only_run_restarts(trainer: MetaTrainer, run: int) -> None:
    """``estimate`` gives ``(nan, None)``, every run is back where the truncation started, the one named run is
    due to restart where it stands, the others keep their restarts; the meta-parameters have no gradient."""
    params = {name: value.clone() for name, value in trainer.params.items()}
    inner_step, restart_at = trainer.inner_step.clone(), trainer.restart_at.clone()
    loss, estimate = trainer.estimate()
    assert math.isnan(loss) and estimate is None and trainer.diverged_truncations == 1
    assert torch.equal(trainer.inner_step, inner_step)
    for name, value in params.items():  # NaN where they were
        assert torch.equal(trainer.params[name].isnan(), value.isnan())
        assert torch.equal(trainer.params[name].nan_to_num(), value.nan_to_num())
    expected = restart_at.clone()
    expected[run] = inner_step[run]
    assert trainer.restart_at.tolist() == expected.tolist()
    assert all(p.grad is None for p in trainer.meta_model.parameters())


def test_a_run_whose_held_out_loss_is_not_finite_restarts_alone():
    """Three runs; run 1's held-out batches hold a NaN (its training is finite): the truncation is skipped and run
    1 alone restarts (the non-finite losses name it), on both paths.

    Kills ``_meta_loss`` 2, 4 (finiteness over all losses or per step: a mask of the wrong shape), 7, 8, 9 (the
    runs not named: all restart), 10 (the finite runs named instead)."""
    for batched in (True, False):
        trainer = _tbptt(_poisoned_validation_task(3, 1), batched=batched)
        _assert_only_run_restarts(trainer, 1)


def test_a_gradmetanet_run_whose_parameters_are_not_finite_restarts_alone_on_both_paths():
    """GradMetaNet, three runs, run 2's parameters NaN from the start: its gradients and factors are not finite —
    the batched path names it from its gradients and its graph's ``act``/``grad``, the per-network path from the
    conversion's refusal — and it alone restarts.

    Kills ``_batched_gradients`` 54, 55 (the factors' check over all runs at once: one bad run restarts all) and
    ``_graphs`` 21, 22, 25, 28, 29, 31-33 (the run's index not marked, or no mask handed on)."""
    for batched in (True, False):
        trainer = _tbptt(_validated_task(), gradmetanet=True, batched=batched, truncation=2)
        trainer.params = {name: value.clone() for name, value in trainer.params.items()}
        trainer.params[trainer.names[0]][2] = math.nan
        _assert_only_run_restarts(trainer, 2)


def test_a_meta_parameter_the_truncation_does_not_reach_gets_a_zero_estimate():
    """A meta-model with a parameter no step reads (registered on the rule, e.g. a head kept for later): the
    estimate holds zeros in its place (autograd leaves its ``grad`` unset) and the rest is the unroll's gradient.

    Kills ``_tbptt_truncation`` 47, 49 (an unset ``grad`` read as a tensor)."""
    task = _task()
    torch.manual_seed(0)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, schedule=True)).double()
    rule.register_parameter("unread", nn.Parameter(torch.ones(3, dtype=DOUBLE)))
    trainer = MetaTrainer(rule, task, MetaTrainConfig(estimator="tbptt", num_particles=2, truncation=2, horizon=8,
                                                      grad_clip=None))
    losses, params, state, batches, generator = _truncation_by_hand(trainer)
    meta_loss = torch.log(losses).mean(dim=0).mean()
    _check_truncation(trainer, losses, params, state, batches, generator, meta_loss, trainer.survival.clone())
    trainer.step()  # and the outer step takes it
    assert torch.equal(rule.unread.detach(), torch.ones(3, dtype=DOUBLE))


def test_an_outer_step_logs_its_own_wall_time():
    """``step`` is ``estimate`` → ``apply_meta_gradient`` → ``end_step``, and the line's ``seconds`` is the time the
    step took: positive and within the wall time measured around it.

    Kills ``step`` 10, 14 (no time, or the clock's sum for its difference)."""
    trainer = _trainer()
    before = time.perf_counter()
    line = trainer.step()
    elapsed = time.perf_counter() - before
    assert type(line["seconds"]) is float and 0 < line["seconds"] <= elapsed
    assert trainer.outer_steps == 1 and trainer.history == [line] and line["grad_norm"] > 0
