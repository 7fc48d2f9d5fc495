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
* :func:`first_passage` (``"first-passage"``) — ``mean_t S_t`` with
  ``S_t = min(S_{t−1}, σ((log L_t − log L*) / τ)) = σ((min_{s≤t} log L_s − log L*) / τ)``: the
  smoothed indicator that the run has not yet been below ``L*`` by step ``t`` (``τ → 0``: 1
  before the first step below ``L*``, 0 from it on). ``S`` is carried from one truncation to
  the next and reset to 1 when the run restarts, so the sum of the truncations' meta-losses
  over a whole run is, as ``τ → 0``, the first step below ``L*`` (divided by the truncation
  length): the benchmark's metric, and unlike the time above the target it stops counting once
  the run got there — a curve that reaches ``L*`` early and drifts back up is not charged
  again, and loss far below ``L*`` earns nothing more.

  Until December 2026 the recurrence was a running *product*, ``S_t = S_{t−1} · σ(…)``. Its
  factor is below 1 above the target too (``σ(x) ≈ 1`` only for ``x ≫ 1``, i.e. a loss many
  times ``τ`` above ``L*``), so ``S`` decayed geometrically within a few steps of a restart
  whether or not the run got near ``L*`` (at ``τ = 0.25`` and a loss 30% above ``L*``, by half
  every two steps): the meta-loss measured only the first steps of every run and was ``0`` for
  the rest (measured: every member of a task-family run at ``0.000`` for most outer steps,
  while its validation runs never reached ``L*``). The running minimum does not decay above
  the target and has the same ``τ → 0`` limit. The ``mnist1d-mlp`` files were meta-trained with
  the product form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError

__all__ = ["META_LOSSES", "first_passage", "mean_log_loss", "meta_loss", "time_above_target"]

#: names of the meta-losses (:attr:`gradgraph.optim.MetaTrainConfig.meta_loss`).
META_LOSSES = ("log-loss", "time-above-target", "first-passage")
#: the meta-losses that compare against a target loss ``L*``.
TARGET_META_LOSSES = ("time-above-target", "first-passage")


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
    return _above(losses, target, temperature, "time_above_target").mean(dim=0)


def _above(losses: Tensor, target: float, temperature: float, where: str) -> Tensor:
    """``[T, P]``: ``σ((log L_t − log target) / τ)``, the smooth indicator of ``L_t > target``."""
    _check(losses, where)
    if not (math.isfinite(target) and target > 0):
        raise GradGraphError(f"{where}: target must be a positive loss, got {target}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise GradGraphError(f"{where}: temperature must be > 0, got {temperature}")
    gap = torch.log(losses.clamp_min(1e-8)) - math.log(target)
    return torch.sigmoid(gap / temperature)


def first_passage(losses: Tensor, target: float, temperature: float = 0.25,
                  survival: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``[T, P] -> ([P], [P])``: ``(mean_t S_t, S_T)`` with ``S_t = min(S_{t−1}, σ((log L_t − log target) / τ))``.

    ``S_t = σ((min_{s≤t} log L_s − log target) / τ)`` is the smoothed indicator that the run has
    not been below ``target`` at any step up to ``t``; ``τ → 0`` makes it 1 before the first
    step with ``L_t < target`` and 0 from that step on, so ``T · mean_t S_t`` counts the
    truncation's steps before the first passage. It falls only when the run reaches a new
    lowest loss (the module docstring says why not a product).

    Args:
        losses: held-out losses ``[T, P]`` (positive).
        target: ``L* > 0``.
        temperature: ``τ > 0``.
        survival: ``[P]`` ``S`` at the end of the previous truncation of each run (1 for a
            run that just (re)started); ``None``: all ones.

    Returns:
        The meta-loss ``[P]`` and ``S`` after the last step ``[P]``, to carry into the next
        truncation (detach it there: the truncation boundary).

    Raises:
        GradGraphError: bad ``target`` / ``temperature``, ``losses`` not 2-D, or ``survival`` not ``[P]``.
    """
    above = _above(losses, target, temperature, "first_passage")
    if survival is None:
        survival = torch.ones_like(above[0])
    if survival.shape != above.shape[1:]:
        raise GradGraphError(f"first_passage: survival must have shape {list(above.shape[1:])}, "
                             f"got {list(survival.shape)}")
    # σ is increasing, so the running minimum of σ(gap) is σ of the running minimum of the log loss.
    curve = torch.minimum(survival.to(above.dtype)[None], torch.cummin(above, dim=0).values)  # [T, P]: S_1 … S_T
    return curve.mean(dim=0), curve[-1]


def meta_loss(name: str, losses: Tensor, target: float | None = None, temperature: float = 0.25,
              survival: Tensor | None = None) -> Tensor:
    """``[T, P] -> [P]``: the meta-loss called ``name`` (:data:`META_LOSSES`); ``survival`` is
    :func:`first_passage`'s carried state (use :func:`first_passage` itself to get its new value).

    Raises:
        GradGraphError: unknown ``name``, or a target meta-loss without a ``target``.
    """
    if name == "log-loss":
        return mean_log_loss(losses)
    if name in TARGET_META_LOSSES and target is None:
        raise GradGraphError(f"meta-loss {name!r} needs a target loss (tuned Adam's best held-out loss)")
    if name == "time-above-target":
        return time_above_target(losses, target, temperature)
    if name == "first-passage":
        return first_passage(losses, target, temperature, survival)[0]
    raise GradGraphError(f"unknown meta-loss {name!r}; choose one of {META_LOSSES}")
