"""`InvariantReadout`: one output vector per graph, invariant to every neuron permutation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MLP, global_max_pool, global_mean_pool

from gradgraph.errors import GradGraphError

__all__ = ["InvariantReadout"]


class InvariantReadout(nn.Module):
    r"""Pool node states over each graph, then an MLP.

    .. math::
        y_G = \mathrm{MLP}\Big(\big[\operatorname{mean}_{n \in G} h_n \,\Vert\, \max_{n \in G} h_n\big]\Big)

    Args:
        in_channels: ``C`` of the node states.
        out_channels: ``k``.
        hidden_channels: MLP width (defaults to ``in_channels``).

    Shapes:
        - **input:** ``h [N, C]``, ``batch [N]``, ``num_graphs``
        - **output:** ``[num_graphs, k]``
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mlp = MLP([2 * in_channels, hidden_channels or in_channels, out_channels], norm=None)

    def reset_parameters(self) -> None:
        """Re-initialise the MLP."""
        self.mlp.reset_parameters()

    def forward(self, h: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        if h.dim() != 2 or h.shape[-1] != self.in_channels or batch.shape != h.shape[:1]:
            raise GradGraphError(
                f"InvariantReadout: expected h [N, {self.in_channels}] and batch [N]; "
                f"got {list(h.shape)} and {list(batch.shape)}"
            )
        pooled = torch.cat(
            [global_mean_pool(h, batch, num_graphs), global_max_pool(h, batch, num_graphs)], dim=-1
        )
        return self.mlp(pooled)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"
