"""`ComponentPool`: remove the component axis with symmetric aggregations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError

__all__ = ["ComponentPool", "POOL_AGGREGATIONS"]

POOL_AGGREGATIONS = ("mean", "max", "std", "sum")


class ComponentPool(nn.Module):
    r"""Pool per-component states to one vector per neuron: ``[N, B, C] -> [N, k C]``.

    .. math::
        h_n = \big\Vert_{\rho \in \text{aggregations}} \rho_{i}\, h_{n,i}

    with each :math:`\rho` a symmetric function over the components (mean, max, standard
    deviation, sum), so the result is invariant to the order of the components. This is
    GradMetaNet's :math:`L_{\text{Pool}}`. In a batch all graphs share ``B``, so pooling is
    per node and needs no batch vector.

    Args:
        aggregations: names from ``("mean", "max", "std", "sum")``; outputs are
            concatenated in this order.

    Shapes:
        - **input:** ``[N, B, C]``
        - **output:** ``[N, len(aggregations) * C]``
    """

    def __init__(self, aggregations: Sequence[str] = ("mean",)) -> None:
        super().__init__()
        aggregations = tuple(aggregations)
        unknown = [name for name in aggregations if name not in POOL_AGGREGATIONS]
        if not aggregations or unknown:
            raise GradGraphError(f"ComponentPool: aggregations must be a non-empty subset of {POOL_AGGREGATIONS}, got {aggregations}")
        self.aggregations = aggregations

    def reset_parameters(self) -> None:
        """Nothing to reset: pooling has no parameters."""

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() != 3:
            raise GradGraphError(f"ComponentPool: states must have shape [N, B, C]; got {list(h.shape)}")
        pooled = []
        for name in self.aggregations:
            if name == "mean":
                pooled.append(h.mean(dim=1))
            elif name == "sum":
                pooled.append(h.sum(dim=1))
            elif name == "max":
                pooled.append(h.amax(dim=1))
            else:  # std; the epsilon keeps the gradient finite when all components agree
                # Written out rather than h.var(dim=1): the same population variance, but
                # torch's strided var and its backward over a middle dim take twice as long.
                centred = h - h.mean(dim=1, keepdim=True)
                pooled.append((centred.square().mean(dim=1) + 1e-8).sqrt())
        return torch.cat(pooled, dim=-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(aggregations={list(self.aggregations)})"
