"""`ComponentDensity`: how crowded each component is among the components of its graph."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph.nn.linear import Linear

__all__ = ["ComponentDensity"]


class ComponentDensity(nn.Module):
    r"""A learned kernel density estimate over the set of components of each graph.

    .. math::
        e_{G,i} = \operatorname{standardise}_{j \in G}\big(\Theta\, u_{G,j}\big)_i
                  \in \mathbb{R}^{H \times d}, \qquad
        \gamma_{G,i,h} = -\tfrac{1}{2} \lVert e_{G,i,h} \rVert^2, \qquad
        \rho_{G,i,h} = \log \frac{1}{B} \sum_{j=1}^{B}
                  \exp\Big(-\frac{\lVert e_{G,i,h} - e_{G,j,h} \rVert^2}{2 \beta_h^2}\Big)

    output :math:`[e_{G,i} \Vert \gamma_{G,i} \Vert \rho_{G,i}]`: per head the embedding,
    its log-density under a Gaussian fit of the set (:math:`\gamma`, up to a constant) and
    under a kernel estimate (:math:`\rho`). ``standardise`` subtracts the mean and divides
    by the standard deviation over the ``B`` components of the graph, channel by channel, so
    the learned bandwidths :math:`\beta_h` are relative to the spread of the set (as in
    Silverman's rule) and one bandwidth serves narrow and wide sets alike. The initial
    bandwidths are spread over scales (``0.1 … 0.8`` by default).

    Why: a mean over the set (all that :class:`ComponentConv` exchanges between components)
    tells a component where the set is, not how many of its neighbours are close to it. The
    pairwise term does: with datapoint weights :math:`\propto p(x_i) / \hat q(x_i)` — a target
    density over a kernel estimate :math:`\hat q` of where the samples fell, i.e.
    :math:`\exp(\gamma - \rho)` for a Gaussian target — a weighted mean
    of per-sample statistics corrects for the sample's own clumping, which plain averaging
    cannot (the curvature task of :mod:`gradgraph_lab.tasks.curvature` measures the effect).

    Equivariant to permutations of the components (every term is a symmetric function of the
    set plus the component's own value) and, fed neuron-pooled states as
    :class:`ComponentReadout` does, invariant to neuron permutations. Cost
    :math:`O(G \cdot B^2 \cdot H d)`.

    Args:
        in_channels: ``F`` of the per-component input (``-1``: inferred on the first call).
        heads: ``H``, independent embeddings and bandwidths.
        head_channels: ``d``, dimension of each embedding.
        bandwidth: initial :math:`\beta_h` (in standard deviations of the set): one value
            for every head, or ``None`` for a geometric spread from 0.1 to 0.8.

    Shapes:
        - **input:** ``u [G, B, F]``
        - **output:** ``[G, B, H·(d+2)]``
    """

    def __init__(
        self, in_channels: int, heads: int = 4, head_channels: int = 2, bandwidth: float | None = None
    ) -> None:
        super().__init__()
        if in_channels == 0 or in_channels < -1:
            raise GradGraphError(f"ComponentDensity: in_channels must be >= 1 (or -1: inferred), got {in_channels}")
        if heads < 1 or head_channels < 1 or (bandwidth is not None and not bandwidth > 0):
            raise GradGraphError(
                f"ComponentDensity: heads and head_channels must be >= 1 and bandwidth > 0, "
                f"got {heads}, {head_channels}, {bandwidth}"
            )
        self.in_channels = in_channels
        self.heads = heads
        self.head_channels = head_channels
        self.initial_bandwidth = bandwidth
        self.embed = Linear(in_channels, heads * head_channels)
        self.log_bandwidth = nn.Parameter(torch.empty(heads))
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        """``H·(d+2)``."""
        return self.heads * (self.head_channels + 2)

    def reset_parameters(self) -> None:
        """Re-initialise the embedding; bandwidths back to their initial value."""
        self.embed.reset_parameters()
        with torch.no_grad():
            if self.initial_bandwidth is None:
                self.log_bandwidth.copy_(torch.linspace(math.log(0.1), math.log(0.8), self.heads)
                                         if self.heads > 1 else torch.full((1,), math.log(0.3)))
            else:
                self.log_bandwidth.fill_(math.log(self.initial_bandwidth))

    def forward(self, u: Tensor) -> Tensor:
        if u.dim() != 3 or (self.in_channels > 0 and u.shape[-1] != self.in_channels):
            raise GradGraphError(
                f"ComponentDensity: expected u [G, B, {self.in_channels if self.in_channels > 0 else 'F'}], "
                f"got {list(u.shape)}"
            )
        num_graphs, num_components, _ = u.shape
        embedded = self.embed(u)
        mean = embedded.mean(dim=1, keepdim=True)
        # The epsilon keeps a set of identical components (std 0) finite; it is tiny next to
        # the spread of any real set.
        std = (embedded - mean).square().mean(dim=1, keepdim=True).add(1e-6).sqrt()
        standardised = (embedded - mean) / std
        heads = standardised.view(num_graphs, num_components, self.heads, self.head_channels).transpose(1, 2)
        # One [G, H, B, B] difference per embedding coordinate rather than a [G, H, B, B, d]
        # tensor: the same sums, without the strided reduction over a short last axis.
        squared_distances = [
            (coordinate[..., :, None] - coordinate[..., None, :]).square() for coordinate in heads.unbind(-1)
        ]
        squared_distance = functools.reduce(torch.add, squared_distances)  # [G, H, B, B]
        scale = (2.0 * self.log_bandwidth).exp()[None, :, None, None]
        log_density = torch.logsumexp(squared_distance / (-2.0 * scale), dim=-1) - math.log(num_components)
        log_gaussian = -0.5 * heads.square().sum(dim=-1)  # [G, H, B]
        return torch.cat([standardised, log_gaussian.transpose(1, 2), log_density.transpose(1, 2)], dim=-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, heads={self.heads}, head_channels={self.head_channels})"
