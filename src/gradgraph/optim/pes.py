"""Persistent evolution strategies (PES), antithetic and truncated (Vicol et al., 2021).

An unrolled computation is split into truncations; each truncation of every particle runs
with meta-parameters ``θ ± ε`` (``ε ~ N(0, σ² I)``, one per antithetic pair) from that
particle's own persistent inner state. PES keeps, per pair, the sum ``ξ`` of all
perturbations since its inner run started; the estimate

.. math::
    \\hat g = \\frac{1}{2 N \\sigma^2} \\sum_{i=1}^{N} \\xi_i \\,(L_i^+ - L_i^-)

is an unbiased estimate of the gradient of the Gaussian-smoothed loss of the whole unroll
so far, although every truncation only sees its own losses ``L^±``. When a pair's inner
runs restart, its ``ξ`` is reset to zero.

The estimator only sees flat parameter vectors and losses, so splitting the pairs across
processes is a matter of each process owning a slice of pairs and all-reducing ``ĝ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError

__all__ = ["PES"]


class PES:
    """Antithetic truncated PES over a flat meta-parameter vector.

    Args:
        num_pairs: ``N`` antithetic pairs (``2N`` particles: rows ``0..N-1`` are ``θ + ξ``-side,
            rows ``N..2N-1`` the mirrored ones).
        dim: length of the meta-parameter vector.
        sigma: standard deviation of the perturbations.
        generator: random stream of the perturbations (a CPU generator: the perturbations
            are drawn on the CPU and moved to ``device``, so they do not depend on the device).
        dtype, device: of the accumulated perturbations and the estimates (the meta-parameters').

    Use per truncation: ``thetas = pes.perturb(theta)`` (``[2N, dim]``), unroll every
    particle with its row, then ``grad = pes.estimate(losses)`` with ``losses [2N]`` the
    sum (or mean) of each particle's losses in this truncation, then ``pes.reset(mask)``
    for pairs whose inner runs restart.
    """

    def __init__(self, num_pairs: int, dim: int, sigma: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_pairs < 1 or dim < 1 or not sigma > 0:
            raise GradGraphError(f"PES needs num_pairs >= 1, dim >= 1, sigma > 0; got {num_pairs}, {dim}, {sigma}")
        self.num_pairs, self.dim, self.sigma = num_pairs, dim, sigma
        self.generator = generator
        self.accumulated = torch.zeros(num_pairs, dim, dtype=dtype, device=device)
        self._epsilon: Tensor | None = None

    def perturb(self, theta: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[dim] -> [2N, dim]``: ``θ + ε_i`` for the pairs' first halves, ``θ − ε_i`` for the second.

        ``mask [dim]`` (bool), if given, perturbs only the coordinates where it is true (``ε``
        is zero elsewhere): the estimate is then the gradient of the loss smoothed along those
        coordinates only, zero on the others, and free of the others' noise. The same random
        numbers are drawn either way.
        """
        if theta.shape != (self.dim,):
            raise GradGraphError(f"PES.perturb: theta must have shape [{self.dim}], got {list(theta.shape)}")
        if mask is not None and mask.shape != (self.dim,):
            raise GradGraphError(f"PES.perturb: mask must have shape [{self.dim}], got {list(mask.shape)}")
        epsilon = torch.randn(self.num_pairs, self.dim, generator=self.generator, dtype=self.accumulated.dtype)
        self._epsilon = epsilon.to(self.accumulated.device) * self.sigma
        if mask is not None:
            self._epsilon = self._epsilon * mask.to(self._epsilon.device, self._epsilon.dtype)
        self.accumulated = self.accumulated + self._epsilon
        dtype = theta.dtype
        theta = theta.detach().to(self.accumulated.dtype)
        return torch.cat([theta + self._epsilon, theta - self._epsilon]).to(dtype)

    def estimate(self, losses: Tensor) -> Tensor:
        """``[2N] -> [dim]`` the PES gradient estimate for this truncation."""
        if self._epsilon is None:
            raise GradGraphError("PES.estimate called before perturb")
        if losses.shape != (2 * self.num_pairs,):
            raise GradGraphError(f"PES.estimate: losses must have shape [{2 * self.num_pairs}], got {list(losses.shape)}")
        difference = (losses[: self.num_pairs] - losses[self.num_pairs:]).to(self.accumulated.dtype)
        self._epsilon = None
        return (self.accumulated * difference[:, None]).sum(0) / (2 * self.num_pairs * self.sigma**2)

    def undo(self) -> None:
        """Take back the last :meth:`perturb` (its truncation was discarded, e.g. an inner run
        diverged and the runs went back to where it started): ``ξ`` loses that ``ε``."""
        if self._epsilon is None:
            raise GradGraphError("PES.undo called without a perturbation to take back")
        self.accumulated = self.accumulated - self._epsilon
        self._epsilon = None

    def reset(self, pairs: Tensor) -> None:
        """Zero ``ξ`` of the pairs where ``pairs [N]`` (bool) is true: their inner runs restart."""
        self.accumulated = torch.where(pairs[:, None], torch.zeros_like(self.accumulated), self.accumulated)

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated perturbations (for checkpoints)."""
        return {"accumulated": self.accumulated.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.accumulated = state["accumulated"].to(self.accumulated.device, copy=True)
