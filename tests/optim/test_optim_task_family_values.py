"""TaskFamilyTrainer's log lines, all-reduce, all-diverged step and messages, against the members run alone
(float64).

Written for the survivors of the mutation run of ``optim/meta_family.py`` (issue 31; docs/mutation.md,
run optim 5): each test names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in
``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.optim import MetaTrainer, TaskFamilyTrainer
from gradgraph.optim.meta_family import MEMBER_SEED_STRIDE
from test_optim_task_family import FAMILY, _config, _flat, _rule


def _alone(rule, config, all_reduce=None) -> list[MetaTrainer]:
    """The members as the family builds them, each run on its own (the ground truth)."""
    return [MetaTrainer(copy.deepcopy(rule), task,
                        replace(config, num_particles=config.num_particles // len(FAMILY),
                                seed=config.seed + MEMBER_SEED_STRIDE * index),
                        all_reduce=all_reduce if index == 0 else None)
            for index, task in enumerate(FAMILY)]


def test_the_family_applies_all_reduce_once_to_the_mean_and_logs_every_member():
    """One step of a two-member family against its members run alone: ``all_reduce`` is called once,
    on the mean of the two estimates, and the outer step follows what it returns; the family's line
    holds the mean of the members' meta-losses, the norm of the reduced estimate and the step's wall
    time, and every other member's own history line its own meta-loss, that norm and that time.

    Kills ``TaskFamilyTrainer.__init__`` 48, 52, 63, 65, 66 (the first member built without
    ``all_reduce``: no call), ``step`` 23 (the sum times the count for the mean), 25, 26, 42 (the
    seconds ``None`` or ``perf_counter() + start``), 33, 34, 35 (another member's line without its
    loss, the norm or the time), 41 (the family's line without the norm)."""
    config = _config()
    rule = _rule()
    reference = copy.deepcopy(rule)
    calls: list[Tensor] = []

    def all_reduce(flat: Tensor) -> Tensor:  # a stand-in for averaging over processes: halves
        calls.append(flat.clone())
        return flat / 2

    family = TaskFamilyTrainer(rule, FAMILY, config, all_reduce=all_reduce)
    alone = _alone(reference, config)
    results = [trainer.estimate() for trainer in alone]
    losses = [loss for loss, _ in results]
    mean = (results[0][1] + results[1][1]) / 2
    assert losses[0] != losses[1]
    before = time.perf_counter()
    line = family.step()
    wall = time.perf_counter() - before

    assert len(calls) == 1
    torch.testing.assert_close(calls[0], mean, rtol=1e-12, atol=1e-14)
    norm = alone[0].apply_meta_gradient(mean / 2)  # the outer step along the reduced mean
    torch.testing.assert_close(_flat(rule), _flat(alone[0].meta_model), rtol=1e-12, atol=1e-14)
    assert line["member_meta_losses"] == pytest.approx(losses, rel=1e-12)
    assert line["meta_loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-12)
    assert line["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert isinstance(line["seconds"], float) and 0 < line["seconds"] <= wall
    other = family.members[1].history[-1]
    assert other["meta_loss"] == pytest.approx(losses[1], rel=1e-12)
    assert other["grad_norm"] == line["grad_norm"] and other["seconds"] == line["seconds"]
    assert family.members[0].history[-1] == {key: value for key, value in line.items()
                                             if key != "member_meta_losses"}


def test_a_step_where_every_member_diverged_takes_no_outer_step():
    """Both members' truncations diverge: no estimate, so no outer step (the rule unchanged), and the
    line's meta-loss and norm are ``nan`` — not a crash on an empty stack or an empty mean.

    Kills ``TaskFamilyTrainer.step`` 10 (``apply_meta_gradient`` of an empty stack) and 22 (the mean
    of no finite loss)."""
    rule = _rule()
    before = _flat(rule).clone()
    family = TaskFamilyTrainer(rule, FAMILY, _config())
    for member in family.members:
        first = next(iter(member.params))
        member.params = {name: value.clone() for name, value in member.params.items()}
        member.params[first][0] = math.nan
    line = family.step()
    assert math.isnan(line["meta_loss"]) and math.isnan(line["grad_norm"])
    assert all(math.isnan(loss) for loss in line["member_meta_losses"])
    assert family.diverged_truncations == 2 and family.outer_steps == 1
    assert torch.equal(_flat(rule), before)


def test_the_family_keeps_the_config_and_tasks_it_was_given():
    """Kills ``TaskFamilyTrainer.__init__`` 41, 43 (``self.config`` / ``self.tasks`` set to ``None``)."""
    config = _config()
    family = TaskFamilyTrainer(_rule(), tuple(FAMILY), config)
    assert family.config is config
    assert isinstance(family.tasks, list) and len(family.tasks) == 2
    assert all(kept is task for kept, task in zip(family.tasks, FAMILY))


@pytest.mark.parametrize("particles, estimator, tasks, message", [
    (8, "pes", [], "TaskFamilyTrainer: the family has no task"),
    (6, "pes", FAMILY, "TaskFamilyTrainer: 6 particles do not split into 2 equal groups of an even size (PES pairs)"),
    (3, "tbptt", FAMILY, "TaskFamilyTrainer: 3 particles do not split into 2 equal groups"),
])
def test_a_family_that_cannot_be_split_is_refused_with_the_whole_message(particles, estimator, tasks, message):
    """The messages in full (the existing test matches a part of each).

    Kills ``TaskFamilyTrainer.__init__`` 7, 8 (the no-task message changed), 25, 32 (the PES clause,
    or ``XXXX``, appended for TBPTT), 27 (``pes pairs``)."""
    with pytest.raises(GradGraphError) as error:
        TaskFamilyTrainer(_rule(), tasks, _config(num_particles=particles, estimator=estimator))
    assert str(error.value) == message


def test_a_checkpoint_that_is_no_family_s_is_refused_by_name():
    """A single MetaTrainer's checkpoint (no ``members``) loaded into a family.

    Kills ``TaskFamilyTrainer.load_state_dict`` 9 (``len(None)``: a TypeError), 11, 12 (the words
    changed)."""
    family = TaskFamilyTrainer(_rule(), FAMILY, _config())
    with pytest.raises(GradGraphError) as error:
        family.load_state_dict(family.members[0].state_dict())
    assert str(error.value) == "TaskFamilyTrainer.load_state_dict: the checkpoint holds no family, this family 2"
