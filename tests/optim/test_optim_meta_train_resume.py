"""``MetaTrainer.state_dict`` / ``load_state_dict``: a trainer saved mid-run (through ``torch.save``) and loaded into
a fresh one — built from another global seed, so nothing but the checkpoint can make them agree — holds exactly
the saved state and then continues bit-for-bit like the uninterrupted trainer: every tensor, both random
streams, the outer Adam state, the running mean of the relative clip, the first-passage survival, the PES
accumulators, the restart phases and seeds, the counters and the log (float64).

Written for the mutation run of ``optim/meta_train.py`` (issue 31; docs/mutation.md, runs optim 13-14): each test
names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch

from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task
from optim_tasks import tiny_task


def _task() -> Task:
    return tiny_task(validation=True)


def _config(**options) -> MetaTrainConfig:
    config = dict(estimator="tbptt", num_particles=3, truncation=2, horizon=4, grad_clip=0.5, grad_clip_relative=2.0,
                  meta_loss="first-passage", target_loss=0.6, temperature=0.2, scalars_first=2, outer_lr=0.05,
                  scalar_lr=0.1, seed=3)
    config.update(options)
    return MetaTrainConfig(**config)


def _trainer(global_seed: int, **options) -> MetaTrainer:
    torch.manual_seed(global_seed)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, schedule=True)).double()
    return MetaTrainer(rule, _task(), _config(**options))


def _saved(trainer: MetaTrainer) -> dict[str, Any]:
    """The checkpoint as a user keeps it: written with ``torch.save`` and read back."""
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assert_same(found: Any, expected: Any, where: str = "checkpoint") -> None:
    """Equal to the bit: tensors of the same dtype, shape and values, NaN equal to NaN, the same keys and lengths;
    a log line's ``seconds`` (wall time) is not compared."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor), where
        assert found.dtype == expected.dtype and found.shape == expected.shape, where
        assert torch.equal(found, expected) or (
            found.is_floating_point() and torch.equal(found.isnan(), expected.isnan())
            and torch.equal(found.nan_to_num(), expected.nan_to_num())), where
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and set(found) == set(expected), (where, set(found) ^ set(expected))
        for key in expected:
            if key != "seconds":
                _assert_same(found[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(found, (list, tuple)) and len(found) == len(expected), where
        for index, (mine, theirs) in enumerate(zip(found, expected)):
            _assert_same(mine, theirs, f"{where}[{index}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(found, float) and math.isnan(found), where
    else:
        assert type(found) is type(expected) and found == expected, (where, found, expected)


def _assert_resumes_exactly(options: dict[str, Any], before: int, after: int) -> MetaTrainer:
    straight = _trainer(0, **options)
    for _ in range(before):
        straight.step()
    checkpoint = _saved(straight)
    for _ in range(after):
        straight.step()

    resumed = _trainer(1, **options)  # another global seed: another initial meta-model
    assert not all(torch.equal(a, b) for a, b in zip(resumed.meta_model.parameters(), straight.meta_model.parameters()))
    resumed.load_state_dict(copy.deepcopy(checkpoint))
    _assert_same(resumed.state_dict(), checkpoint)  # the inverse of state_dict
    for _ in range(after):
        resumed.step()
    _assert_same(resumed.state_dict(), straight.state_dict(), "resumed")
    for a, b in zip(resumed.meta_model.parameters(), straight.meta_model.parameters()):
        assert torch.equal(a, b)
    return straight


def test_a_tbptt_trainer_saved_mid_run_resumes_bit_for_bit():
    """TBPTT, three runs on the batched path, held-out batches, the first-passage meta-loss (the survival), both
    clips (the running mean), two scalars-first steps: saved after 3 outer steps — past the scalars-first stage and
    a restart of every run — and resumed for 3 more, which restart runs again from new seeds.

    Kills ``load_state_dict`` 99, 102 (the count of skipped truncations not restored; the numbers are run optim
    16's, after the checkpoint fix) and, with the PES test, every mutant of ``state_dict`` and ``load_state_dict`` that
    drops or misreads an entry (runs optim 13-14 killed them with this file in ``gg``'s list)."""
    straight = _assert_resumes_exactly({}, before=3, after=3)
    assert straight.mean_grad_norm is not None and straight.next_model_seed > 1_030_003
    assert (straight.survival < 1).any() and straight.outer_steps == 6


def test_a_pes_trainer_on_the_graph_path_saved_mid_run_resumes_bit_for_bit():
    """PES, two pairs, each particle's network converted on its batch (``batched=False``: the models are used),
    the mean log loss: the accumulated perturbations and the perturbation stream come back with the rest."""
    straight = _assert_resumes_exactly(dict(estimator="pes", num_particles=4, batched=False, meta_loss="log-loss",
                                            target_loss=None, sigma=0.05), before=2, after=2)
    assert straight.pes is not None and straight.pes.accumulated.abs().sum() > 0


def test_a_checkpoint_of_another_configuration_is_refused_by_its_differences_and_nothing_is_loaded():
    """The refusal names every differing field with both values, and the trainer is left as it was.

    Kills ``load_state_dict`` 1, 4, 7, 13-31 (the configurations not compared, the fields' ``config.`` prefix
    lost or misspelt, the message changed)."""
    saved = _saved(_trainer(0, horizon=6, sigma=0.02))
    trainer = _trainer(1)
    before = copy.deepcopy(trainer.state_dict())
    with pytest.raises(GradGraphError) as refused:
        trainer.load_state_dict(saved)
    assert str(refused.value) == ("MetaTrainer.load_state_dict: the checkpoint is of another configuration "
                                  "(config.horizon: checkpoint 6, this trainer 4; "
                                  "config.sigma: checkpoint 0.02, this trainer 0.01)")
    _assert_same(trainer.state_dict(), before)


def test_a_checkpoint_from_before_the_survival_the_divergence_count_and_the_running_mean_loads():
    """Checkpoints written before the first-passage meta-loss, the divergence count and the relative clip have no
    ``survival``, ``diverged_truncations`` or ``mean_grad_norm``: they load, the survival stays the fresh trainer's
    (every run alive), the count is zero and the relative clip has no reference yet; the rest is the checkpoint's.
    And those three are restored when present (a count of 2 set by hand).

    Kills ``state_dict`` 35, 36 (the count written under another key) and ``load_state_dict`` 100, 101, 103-106
    (read under another key or with another default)."""
    straight = _trainer(0)
    straight.step()
    straight.step()
    straight.diverged_truncations = 2
    checkpoint = _saved(straight)
    assert checkpoint["diverged_truncations"] == 2 and checkpoint["mean_grad_norm"] is not None

    resumed = _trainer(1)
    resumed.load_state_dict(copy.deepcopy(checkpoint))
    assert resumed.diverged_truncations == 2 and resumed.mean_grad_norm == checkpoint["mean_grad_norm"]

    old = {key: value for key, value in checkpoint.items()
           if key not in ("survival", "diverged_truncations", "mean_grad_norm")}
    resumed = _trainer(1)
    resumed.diverged_truncations = 5
    resumed.mean_grad_norm = 7.0
    resumed.load_state_dict(copy.deepcopy(old))
    assert resumed.diverged_truncations == 0 and resumed.mean_grad_norm is None
    assert torch.equal(resumed.survival, torch.ones(3, dtype=resumed.survival.dtype))
    _assert_same({key: value for key, value in resumed.state_dict().items() if key in old}, old)


def test_one_checkpoint_loaded_into_two_trainers_resumes_both_exactly():
    """A checkpoint read once and loaded into two trainers one after the other (two continuations of one saved
    run): the first one's training does not write into the checkpoint, so the second resumes exactly as well.

    Failed before the fix: ``load_state_dict`` handed the checkpoint's outer Adam state to ``torch.optim.Adam``,
    which keeps those tensors and updates them in place (its step counts and moments), so the checkpoint had moved
    on by the first trainer's steps and the second trainer resumed with them — a silently different meta-model.
    Kills ``load_state_dict`` 51 (``copy.copy``: the same tensors in a new dict; run optim 16's numbers)."""
    straight = _trainer(0)
    for _ in range(2):
        straight.step()
    checkpoint = _saved(straight)
    kept = copy.deepcopy(checkpoint)
    straight.step()
    straight.step()
    for _ in range(2):
        resumed = _trainer(1)
        resumed.load_state_dict(checkpoint)
        resumed.step()
        resumed.step()
        _assert_same(checkpoint, kept)
        _assert_same(resumed.state_dict(), straight.state_dict(), "resumed")
