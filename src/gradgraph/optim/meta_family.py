"""Meta-training one learned optimizer on a family of tasks (several architectures at once).

The batched path of :class:`~gradgraph.optim.MetaTrainer` steps all its particles as one
computation, which needs one architecture. A *task family* (widths, depths, activations,
batch sizes) is meta-trained by :class:`TaskFamilyTrainer`: one ``MetaTrainer`` per member
task, all sharing the same :class:`~gradgraph.optim.LearnedUpdate`, each with
``num_particles / len(tasks)`` particles of its own (each member batched on its own
architecture). Every outer step each member runs one truncation and estimates the gradient
of its own meta-loss (:meth:`MetaTrainer.estimate`); the family's outer step follows their
mean (members whose truncation diverged are left out), so the meta-loss it descends is

.. math::
    \\mathcal{L}(\\theta) = \\frac{1}{M} \\sum_{m=1}^{M} \\mathcal{L}_m(\\theta),

the mean of the members' meta-losses (with a target meta-loss, each member compares with its
own target ``L*_m``: losses of different tasks are not on one scale). The outer Adam, the
clips and ``all_reduce`` are the first member's (:meth:`MetaTrainer.apply_meta_gradient`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.optim.meta_config import MetaTrainConfig, Task
from gradgraph.optim.meta_model import LearnedUpdate
from gradgraph.optim.meta_train import MetaTrainer

__all__ = ["TaskFamilyTrainer"]

#: member ``m``'s seed is ``config.seed + MEMBER_SEED_STRIDE · m`` (its own initialisations, data and
#: perturbations; ranks of a ``torchrun`` run are 1000 apart, so the two never meet below 100 members)
MEMBER_SEED_STRIDE = 10


class TaskFamilyTrainer:
    """Meta-trains ``meta_model`` on several tasks at once (module docstring).

    Args:
        meta_model: the :class:`LearnedUpdate` to train (in place; shared by the members).
        tasks: the member tasks (``M >= 1``; each its own architecture, data and loss).
        config: the family's :class:`MetaTrainConfig`; ``num_particles`` is the total, split evenly
            (``num_particles / M`` each, even for PES).
        targets: ``[M]`` each member's ``target_loss`` (``L*`` of the target meta-losses); ``None``:
            ``config.target_loss`` for every member.
        all_reduce: as :class:`MetaTrainer`'s (applied once, to the family's mean estimate).

    Attributes:
        members: the ``M`` :class:`MetaTrainer` s.
        history: one log line per outer step: the mean meta-loss, the norm, the scalars and
            ``member_meta_losses`` ``[M]`` (``nan`` where a member's truncation diverged).
    """

    def __init__(self, meta_model: LearnedUpdate, tasks: Sequence[Task], config: MetaTrainConfig | None = None,
                 targets: Sequence[float | None] | None = None,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        config = config or MetaTrainConfig()
        tasks = list(tasks)
        if not tasks:
            raise GradGraphError("TaskFamilyTrainer: the family has no task")
        per_member, rest = divmod(config.num_particles, len(tasks))
        if rest or (config.estimator == "pes" and per_member % 2):
            raise GradGraphError(
                f"TaskFamilyTrainer: {config.num_particles} particles do not split into {len(tasks)} equal groups"
                + (" of an even size (PES pairs)" if config.estimator == "pes" else ""))
        targets = [config.target_loss] * len(tasks) if targets is None else list(targets)
        if len(targets) != len(tasks):
            raise GradGraphError(f"TaskFamilyTrainer: {len(targets)} targets for {len(tasks)} tasks")
        self.config = config
        self.meta_model = meta_model
        self.tasks = tasks
        self.members = [
            MetaTrainer(meta_model, task,
                        replace(config, num_particles=per_member, seed=config.seed + MEMBER_SEED_STRIDE * index,
                                target_loss=target),
                        all_reduce=all_reduce if index == 0 else None)
            for index, (task, target) in enumerate(zip(tasks, targets))
        ]
        self.history: list[dict[str, Any]] = []

    @property
    def outer_steps(self) -> int:
        """Outer steps taken (every member counts the same)."""
        return self.members[0].outer_steps

    @property
    def diverged_truncations(self) -> int:
        """Member truncations skipped because an inner run diverged, over all members."""
        return sum(member.diverged_truncations for member in self.members)

    def step(self) -> dict[str, Any]:
        """One truncation of every member and one outer step along their mean estimate; returns its log line."""
        start = time.perf_counter()
        losses, estimates = [], []
        for member in self.members:
            loss, estimate = member.estimate()
            losses.append(loss)
            if estimate is not None:
                estimates.append(estimate)
        lead = self.members[0]
        norm = math.nan if not estimates else lead.apply_meta_gradient(torch.stack(estimates).mean(dim=0))
        finite = [loss for loss in losses if not math.isnan(loss)]
        meta_loss = sum(finite) / len(finite) if finite else math.nan
        seconds = time.perf_counter() - start
        for member, loss in zip(self.members[1:], losses[1:]):
            member.end_step(loss, norm, seconds)
        line = {**lead.end_step(meta_loss, norm, seconds), "member_meta_losses": losses}
        self.history.append(line)
        return line

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: every member's :meth:`MetaTrainer.state_dict` (the first
        holds the outer Adam) and the family's log; ``meta_config``, ``meta_model`` and ``outer_steps`` as in a
        :class:`MetaTrainer`'s, so what reads a meta-model off a checkpoint reads either."""
        lead = self.members[0].state_dict()
        return {"members": [lead] + [member.state_dict() for member in self.members[1:]], "history": self.history,
                **{key: lead[key] for key in ("meta_config", "meta_model", "outer_steps")}}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the trainer must be built with the same tasks and config)."""
        members = checkpoint.get("members")
        if members is None or len(members) != len(self.members):
            raise GradGraphError(
                f"TaskFamilyTrainer.load_state_dict: the checkpoint holds "
                f"{'no family' if members is None else f'{len(members)} members'}, this family {len(self.members)}")
        for member, state in zip(self.members, members):
            member.load_state_dict(state)
        self.history = list(checkpoint["history"])
