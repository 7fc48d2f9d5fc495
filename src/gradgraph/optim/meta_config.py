"""What meta-training runs on and how: :class:`Task`, :class:`MetaTrainConfig`, :data:`PAPER_PROTOCOL`.

Split from :mod:`gradgraph.optim.meta_train` (which re-exports every name), so the trainer's
module holds the trainer only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.capture import LossFn
from gradgraph.errors import GradGraphError
from gradgraph.optim.meta_loss import META_LOSSES, TARGET_META_LOSSES

__all__ = ["ESTIMATORS", "PAPER_PROTOCOL", "MetaTrainConfig", "Task", "relative_clip_scale"]

ESTIMATORS = ("tbptt", "pes")


@dataclass
class Task:
    """A family of inner training problems for meta-training and benchmarks.

    Attributes:
        name: a label.
        make_model: ``seed -> nn.Module``, a freshly initialised network (each seed its own
            initialisation; meta-training draws seeds from ``1_000_000`` on, so benchmarks
            that use small seeds start from initialisations never seen in meta-training).
        sample_batch: ``generator -> (inputs [b, ...], targets)``, one training batch.
        loss_fn: ``(output, targets) -> [b]`` the per-datapoint loss.
        forward_kwargs: extra keyword arguments of the model's forward (e.g. a mask).
        sample_validation: ``generator -> (inputs, targets)``, a batch of held-out data the
            inner runs never train on. If given, the meta-loss is the loss on it (so
            meta-training rewards generalisation, not memorising a small training set);
            otherwise the loss on the next training batch (the paper's choice).
    """

    name: str
    make_model: Callable[[int], nn.Module]
    sample_batch: Callable[[torch.Generator], tuple[Tensor, Any]]
    loss_fn: LossFn
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_validation: Callable[[torch.Generator], tuple[Tensor, Any]] | None = None


@dataclass
class MetaTrainConfig:
    """How to meta-train.

    Attributes:
        estimator: ``"tbptt"`` or ``"pes"`` (module docstring).
        num_particles: inner runs in flight (even for PES: pairs).
        truncation: inner steps per meta-update.
        horizon: inner steps before a particle restarts from a fresh initialisation.
        outer_lr: Adam learning rate of the meta-parameters.
        scalar_lr: Adam learning rate of ``log α``, ``log β``, ``logit μ``.
        sigma: PES perturbation scale.
        grad_clip: clip of the meta-gradient's norm at this absolute value (``None``: none).
            Beware: PES estimates have norms ~100 on the digits task, so a clip at 1 turns every
            outer step into a unit vector (issue 29); prefer ``grad_clip_relative``.
        grad_clip_relative: clip the norm at this multiple of the running mean of the previous
            outer steps' norms (:func:`relative_clip_scale`): outliers are cut, typical steps
            pass untouched; ``None``: off. Applied after ``grad_clip``.
        seed: seeds data, initialisations and perturbations.
        meta_loss: ``"log-loss"`` (mean log held-out loss over the truncation, the paper's),
            ``"time-above-target"`` (smoothed fraction of steps whose held-out loss is above
            ``target_loss``) or ``"first-passage"`` (smoothed probability of not yet having been
            below ``target_loss``, carried across truncations and reset at restarts; the
            benchmark's metric); :mod:`gradgraph.optim.meta_loss`.
        target_loss: ``L*`` of the target meta-losses (e.g. tuned Adam's best held-out loss).
        temperature: ``τ`` of the target meta-losses (a relative gap, log space).
        batched: step all particles as one batched computation where it applies — a plain MLP
            (:func:`gradgraph.optim.fused.mlp_chain`) without forward keyword arguments, any
            variant: closed-form batched gradients (and, for GradMetaNet, the graphs filled from
            them over a structure converted once) instead of a ``to_graph`` per particle, and
            (PES) the meta-model run once over all particles with per-particle meta-parameters
            (:func:`gradgraph.optim.batched.vmapped_update`). Same updates as the general path
            (tested to 1e-10 in float64); anything else takes the general path.
        scalars_first: the first this-many outer steps train only the meta-model's scalars
            (:attr:`~gradgraph.optim.LearnedUpdate.scalar_parameters`: ``α``, ``β``, ``μ`` and the
            schedule): PES perturbs only them, so their estimate carries none of the noise of
            the thousands of MLP and GradMetaNet weights (the variance of an ES estimate grows
            with the number of perturbed coordinates); the other meta-parameters stay where
            they start. Then every meta-parameter trains.
    """

    estimator: str = "pes"
    num_particles: int = 8
    truncation: int = 10
    horizon: int = 400
    outer_lr: float = 1e-3
    scalar_lr: float = 1e-2
    sigma: float = 0.01
    grad_clip: float | None = 1.0
    grad_clip_relative: float | None = None
    seed: int = 0
    meta_loss: str = "log-loss"
    target_loss: float | None = None
    temperature: float = 0.25
    batched: bool = True
    scalars_first: int = 0

    def __post_init__(self) -> None:
        if self.meta_loss not in META_LOSSES:
            raise GradGraphError(f"MetaTrainConfig.meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        if self.meta_loss in TARGET_META_LOSSES and not (self.target_loss is not None and self.target_loss > 0):
            raise GradGraphError(
                f"MetaTrainConfig.meta_loss {self.meta_loss!r} needs target_loss > 0, got {self.target_loss}"
            )
        if self.grad_clip_relative is not None and not self.grad_clip_relative > 0:
            raise GradGraphError(f"MetaTrainConfig.grad_clip_relative must be > 0, got {self.grad_clip_relative}")
        if self.scalars_first < 0:
            raise GradGraphError(f"MetaTrainConfig.scalars_first must be >= 0, got {self.scalars_first}")
        if self.estimator not in ESTIMATORS:
            raise GradGraphError(f"MetaTrainConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.num_particles < 1 or self.truncation < 1 or self.horizon < self.truncation:
            raise GradGraphError(
                "MetaTrainConfig needs num_particles >= 1, truncation >= 1, horizon >= truncation; got "
                f"{self.num_particles}, {self.truncation}, {self.horizon}"
            )
        if self.estimator == "pes" and self.num_particles % 2:
            raise GradGraphError(f"PES needs an even number of particles (antithetic pairs), got {self.num_particles}")

    @classmethod
    def paper(cls, **overrides: Any) -> "MetaTrainConfig":
        """The paper's protocol (:data:`PAPER_PROTOCOL`) with ``overrides``."""
        return cls(**{**PAPER_PROTOCOL, **overrides})


#: The paper's meta-training protocol (issue 29): antithetic PES with 16 pairs (32 inner runs),
#: truncations of 50 steps, a 500-step horizon (= the MNIST-1D benchmark's budget), outer Adam at
#: 1e-4 (scalars 1e-3), and a clip that only cuts outliers (3× the running mean norm) instead of
#: normalising every step. The meta-loss stays the paper's mean log loss here (the library has no
#: target to compare with); the lab's ``--preset paper`` uses ``"first-passage"`` with tuned Adam's ``L*``.
PAPER_PROTOCOL: dict[str, Any] = {
    "estimator": "pes", "num_particles": 32, "truncation": 50, "horizon": 500, "outer_lr": 1e-4,
    "scalar_lr": 1e-3, "sigma": 0.01, "grad_clip": None, "grad_clip_relative": 3.0, "meta_loss": "log-loss",
}


def relative_clip_scale(norm: float, mean_norm: float | None, multiple: float) -> float:
    """The factor a meta-gradient of norm ``norm`` is scaled by: ``min(1, multiple · mean_norm / norm)``.

    ``mean_norm`` is the running mean of earlier norms (``None`` before the first step: no clip).
    """
    if mean_norm is None or not math.isfinite(norm) or norm <= multiple * mean_norm:
        return 1.0
    return multiple * mean_norm / norm
