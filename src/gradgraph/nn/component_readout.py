"""`ComponentReadout`: one output per graph and component (e.g. a weight for every datapoint)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MLP
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError

__all__ = ["ComponentReadout"]


class ComponentReadout(nn.Module):
    r"""Pool per-component states over each graph's neurons, then an MLP per component.

    .. math::
        y_{G,i} = \mathrm{MLP}\Big(\big[\operatorname{mean}_{n \in G} z_{n,i} \,\Vert\,
                  \max_{n \in G} z_{n,i} \,\Vert\, \operatorname{mean}_{n \in F(G)} z_{n,i}\big]\Big)

    where :math:`F(G)` are the graph's *fixed* neurons (``perm_group == -1``: inputs and
    outputs), pooled separately because they carry what a datapoint is — its input and the
    network's output on it — which a pool over all neurons would dilute. Invariant to
    neuron permutations (pools over sets of neurons that permutations preserve) and
    equivariant to component permutations (the MLP acts on every component alone; the
    states ``z`` already mix information across the set). A softmax of ``y`` over ``i``
    gives datapoint weights, e.g. to reweight per-sample statistics.

    Args:
        in_channels: ``C_z`` of the per-component states.
        out_channels: ``k``.
        hidden_channels: MLP width (defaults to ``in_channels``).

    Shapes:
        - **input:** ``z [N, B, C_z]``, ``batch [N]``, ``num_graphs``, ``fixed [N]`` bool
        - **output:** ``[num_graphs, B, k]``
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mlp = MLP([3 * in_channels, hidden_channels or in_channels, out_channels], norm=None)

    def reset_parameters(self) -> None:
        """Re-initialise the MLP."""
        self.mlp.reset_parameters()

    def forward(self, z: Tensor, batch: Tensor, num_graphs: int, fixed: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[-1] != self.in_channels or batch.shape != z.shape[:1] or fixed.shape != z.shape[:1]:
            raise GradGraphError(
                f"ComponentReadout: expected z [N, B, {self.in_channels}], batch [N] and fixed [N]; "
                f"got {list(z.shape)}, {list(batch.shape)} and {list(fixed.shape)}"
            )
        mean = scatter(z, batch, dim=0, dim_size=num_graphs, reduce="mean")
        maximum = scatter(z, batch, dim=0, dim_size=num_graphs, reduce="max")
        # Graphs without fixed neurons get zeros here (scatter of nothing).
        fixed_mean = scatter(z[fixed], batch[fixed], dim=0, dim_size=num_graphs, reduce="mean")
        return self.mlp(torch.cat([mean, maximum, fixed_mean], dim=-1))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"
