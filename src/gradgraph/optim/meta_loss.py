"""Meta-losses: how a truncation's held-out losses become the number meta-training minimises.

Both take the held-out losses of a truncation, ``losses [T, P]`` (inner step ``t`` of the
truncation, particle ``p``), and return one meta-loss per particle ``[P]``; lower is better.

* :func:`mean_log_loss` (``"log-loss"``) — ``mean_t log L_t``: rewards being low at every
  step, including far below any target and after the run has overfit.
* :func:`time_above_target` (``"time-above-target"``) — ``mean_t σ((log L_t − log L*) / τ)``,
  a smooth count of the steps spent above a target loss ``L*``. With ``L*`` tuned Adam's
  best held-out loss, it is the benchmark's metric in expectation: the number of steps
  before an inner run reaches Adam's best, smoothed so that a small change of the rule
  changes it a little (the sigmoid; ``τ → 0`` is the indicator ``L_t > L*``). The
  comparison is in log space so that ``τ`` is a relative gap: ``L_t = L* e^τ`` costs
  ``σ(1) ≈ 0.73`` of a step, ``L_t = L*`` half a step, ``L_t = L* e^{-τ}`` 0.27.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError

__all__ = ["META_LOSSES", "mean_log_loss", "meta_loss", "time_above_target"]

#: names of the meta-losses (:attr:`gradgraph.optim.MetaTrainConfig.meta_loss`).
META_LOSSES = ("log-loss", "time-above-target")


def _check(losses: Tensor, where: str) -> None:
    if losses.dim() != 2:
        raise GradGraphError(f"{where}: losses must be [steps, particles], got shape {tuple(losses.shape)}")


def mean_log_loss(losses: Tensor) -> Tensor:
    """``[T, P] -> [P]``: ``mean_t log max(L_t, 1e-8)``."""
    _check(losses, "mean_log_loss")
    return torch.log(losses.clamp_min(1e-8)).mean(dim=0)


def time_above_target(losses: Tensor, target: float, temperature: float = 0.25) -> Tensor:
    """``[T, P] -> [P]``: ``mean_t σ((log L_t − log target) / temperature)``, the smoothed
    fraction of the truncation's steps whose loss is above ``target``.

    Args:
        losses: held-out losses ``[T, P]`` (positive).
        target: ``L* > 0``, e.g. tuned Adam's best held-out loss on the task.
        temperature: ``τ > 0``, the relative gap over which a step goes from counted to not.

    Raises:
        GradGraphError: ``target`` or ``temperature`` not positive and finite, or ``losses`` not 2-D.
    """
    _check(losses, "time_above_target")
    if not (math.isfinite(target) and target > 0):
        raise GradGraphError(f"time_above_target: target must be a positive loss, got {target}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise GradGraphError(f"time_above_target: temperature must be > 0, got {temperature}")
    gap = torch.log(losses.clamp_min(1e-8)) - math.log(target)
    return torch.sigmoid(gap / temperature).mean(dim=0)


def meta_loss(name: str, losses: Tensor, target: float | None = None, temperature: float = 0.25) -> Tensor:
    """``[T, P] -> [P]``: the meta-loss called ``name`` (:data:`META_LOSSES`).

    Raises:
        GradGraphError: unknown ``name``, or ``"time-above-target"`` without a ``target``.
    """
    if name == "log-loss":
        return mean_log_loss(losses)
    if name == "time-above-target":
        if target is None:
            raise GradGraphError("meta-loss 'time-above-target' needs a target loss (tuned Adam's best held-out loss)")
        return time_above_target(losses, target, temperature)
    raise GradGraphError(f"unknown meta-loss {name!r}; choose one of {META_LOSSES}")
