"""`ComponentReadout`: one output per graph and component (e.g. a weight for every datapoint)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MLP
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import equal_blocks
from gradgraph.nn.density import ComponentDensity

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

    With ``density_heads > 0`` the pooled vector :math:`u_{G,i}` (the bracket above) is
    extended by :class:`ComponentDensity` of the set :math:`\{u_{G,j}\}_j` before the MLP,
    so the output can depend on how crowded component :math:`i` is among its graph's
    components — which a mean over the set cannot express.

    Args:
        in_channels: ``C_z`` of the per-component states.
        out_channels: ``k``.
        hidden_channels: MLP width (defaults to ``in_channels``).
        density_heads: heads of the optional :class:`ComponentDensity` (0: none).
        density_head_channels: its embedding dimension per head.

    Shapes:
        - **input:** ``z [N, B, C_z]``, ``batch [N]``, ``num_graphs``, ``fixed [N]`` bool
        - **output:** ``[num_graphs, B, k]``
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | None = None,
        *,
        density_heads: int = 0,
        density_head_channels: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.density = (
            ComponentDensity(3 * in_channels, density_heads, density_head_channels) if density_heads > 0 else None
        )
        mlp_in = 3 * in_channels + (self.density.out_channels if self.density is not None else 0)
        self.mlp = MLP([mlp_in, hidden_channels or in_channels, out_channels], norm=None)

    def reset_parameters(self) -> None:
        """Re-initialise the MLP (and the density estimator)."""
        self.mlp.reset_parameters()
        if self.density is not None:
            self.density.reset_parameters()

    def forward(
        self, z: Tensor, batch: Tensor, num_graphs: int, fixed: Tensor, nodes_per_graph: int | None = None
    ) -> Tensor:
        """Pool and read out; ``nodes_per_graph`` is :meth:`GraphContext.nodes_per_graph` when the
        caller knows it (``None``: checked here, which reads ``batch`` back from the device)."""
        if z.dim() != 3 or z.shape[-1] != self.in_channels or batch.shape != z.shape[:1] or fixed.shape != z.shape[:1]:
            raise GradGraphError(
                f"ComponentReadout: expected z [N, B, {self.in_channels}], batch [N] and fixed [N]; "
                f"got {list(z.shape)}, {list(batch.shape)} and {list(fixed.shape)}"
            )
        per_graph = equal_blocks(batch, num_graphs) if nodes_per_graph is None else nodes_per_graph
        if per_graph:
            # Every graph has the same number of nodes, in order (a batch of one architecture):
            # a reshape turns the pools into plain reductions, whose max backward is about
            # half the cost of scatter's, and the fixed-neuron mean into a masked sum, which
            # (unlike indexing with the mask) reads nothing back from the device.
            blocks = z.view(num_graphs, per_graph, *z.shape[1:])
            mean, maximum = blocks.mean(dim=1), blocks.amax(dim=1)
            fixed_weight = fixed.view(num_graphs, per_graph).to(z.dtype)
            fixed_sum = torch.einsum("gn,gn...->g...", fixed_weight, blocks)
            # Graphs without fixed neurons get zeros, as from the scatter below.
            fixed_mean = fixed_sum / fixed_weight.sum(dim=1).clamp_min(1.0).view(-1, *([1] * (z.dim() - 1)))
        else:
            mean = scatter(z, batch, dim=0, dim_size=num_graphs, reduce="mean")
            maximum = scatter(z, batch, dim=0, dim_size=num_graphs, reduce="max")
            # Graphs without fixed neurons get zeros here (scatter of nothing).
            fixed_mean = scatter(z[fixed], batch[fixed], dim=0, dim_size=num_graphs, reduce="mean")
        pooled = torch.cat([mean, maximum, fixed_mean], dim=-1)
        if self.density is not None:
            pooled = torch.cat([pooled, self.density(pooled)], dim=-1)
        return self.mlp(pooled)

    def __repr__(self) -> str:
        density = f", density_heads={self.density.heads}" if self.density is not None else ""
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}{density})"
