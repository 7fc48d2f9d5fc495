"""`EdgeProductDecoder`: one output per weight (edge) and per bias (node), GradMetaNet's L_Prod."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MLP

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.linear import Linear
from gradgraph.nn.sparse import channel_sddmm

__all__ = ["EdgeProductDecoder"]


class EdgeProductDecoder(nn.Module):
    r"""Decode node states into per-edge and per-node outputs.

    For an edge :math:`j \to k` with features :math:`e_{jk}` and a node :math:`n`:

    .. math::
        y_{jk} &= \mathrm{MLP}_E\big([h_j \,\Vert\, h_k \,\Vert\, e_{jk}]\big)
               + \Theta_E \big[\operatorname{mean}_i p_{jk,i} \,\Vert\, \operatorname{mean}_i p_{jk,i}^2\big],
        \qquad p_{jk,i} = (A z_{j,i}) \odot (B z_{k,i}) \\
        y_{n}  &= \mathrm{MLP}_N(h_n)
               + \Theta_N \big[\operatorname{mean}_i q_{n,i} \,\Vert\, \operatorname{mean}_i q_{n,i}^2\big],
        \qquad q_{n,i} = (A' z_{n,i}) \odot (B' z_{n,i})

    :math:`h` are pooled node states ``[N, C]``; :math:`z` are the per-component states
    ``[N, B, C_z]`` before pooling. The first term is GradMetaNet's product layer
    :math:`L_{\text{Prod}}`; the component-wise bilinear product :math:`p_{jk,i}` is the
    form of a per-sample weight gradient (``act[j, i] * grad[k, i]`` when :math:`A z` and
    :math:`B z` pick those channels), and its first and second moments over components give
    direct access to the mean gradient and to the empirical Fisher diagonal
    :math:`\operatorname{mean}_i (\mathrm{act}_{j,i}\,\mathrm{grad}_{k,i})^2` — the
    set-product of GradMetaNet++. Without component states (``component_channels=None``)
    only the MLP terms remain.

    Args:
        in_channels: ``C`` of the pooled node states.
        edge_dim: ``D`` of the edge features.
        out_channels: ``k``, outputs per edge and per node.
        component_channels: ``C_z`` of the per-component states, or ``None``.
        product_channels: ``P``, channels of the bilinear product.
        hidden_channels: width of the MLPs (defaults to ``in_channels``).

    Shapes:
        - **input:** ``h [N, C]``, a :class:`GraphContext`, ``z [N, B, C_z]`` or ``None``
        - **output:** ``(edge [E, k], node [N, k])``
    """

    def __init__(
        self,
        in_channels: int,
        edge_dim: int,
        out_channels: int,
        component_channels: int | None = None,
        product_channels: int = 16,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        hidden_channels = hidden_channels or in_channels
        self.in_channels = in_channels
        self.edge_dim = edge_dim
        self.out_channels = out_channels
        self.component_channels = component_channels
        self.product_channels = product_channels
        self.edge_mlp = MLP([2 * in_channels + edge_dim, hidden_channels, out_channels], norm=None)
        self.node_mlp = MLP([in_channels, hidden_channels, out_channels], norm=None)
        if component_channels is not None:
            self.edge_left = Linear(component_channels, product_channels, bias=False)
            self.edge_right = Linear(component_channels, product_channels, bias=False)
            self.edge_moments = Linear(2 * product_channels, out_channels, bias=False)
            self.node_left = Linear(component_channels, product_channels, bias=False)
            self.node_right = Linear(component_channels, product_channels, bias=False)
            self.node_moments = Linear(2 * product_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter."""
        for module in self.children():
            module.reset_parameters()

    @staticmethod
    def _moments(product: Tensor) -> Tensor:
        return torch.cat([product.mean(dim=1), product.square().mean(dim=1)], dim=-1)

    def forward(self, h: Tensor, context: GraphContext, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if h.dim() != 2 or h.shape != (context.num_nodes, self.in_channels):
            raise GradGraphError(
                f"EdgeProductDecoder: node states must have shape [{context.num_nodes}, {self.in_channels}]; "
                f"got {list(h.shape)}"
            )
        src, dst = context.edge_index
        # index_select rather than h[src]: its backward is an index_add, not a slower index_put.
        endpoints = [h.index_select(0, src), h.index_select(0, dst)]
        edge = self.edge_mlp(torch.cat([*endpoints, context.edge_features], dim=-1))
        node = self.node_mlp(h)
        if self.component_channels is not None:
            if z is None or z.dim() != 3 or z.shape[0] != context.num_nodes or z.shape[2] != self.component_channels:
                shape = None if z is None else list(z.shape)
                raise GradGraphError(
                    f"EdgeProductDecoder: component states must have shape [{context.num_nodes}, B, "
                    f"{self.component_channels}]; got {shape}"
                )
            # Moments of p_{jk,i} = left_j,i * right_k,i as sampled products: no [E, B, P] tensor.
            left, right = self.edge_left(z), self.edge_right(z)
            pattern = context.pattern("backward", self.product_channels)  # rows = sources
            num_components = z.shape[1]
            first = channel_sddmm(pattern, left, right) / num_components
            second = channel_sddmm(pattern, left.square(), right.square()) / num_components
            edge = edge + self.edge_moments(torch.cat([first, second], dim=-1))
            node = node + self.node_moments(self._moments(self.node_left(z) * self.node_right(z)))
        return edge, node

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, edge_dim={self.edge_dim}, out={self.out_channels}, "
            f"component_channels={self.component_channels}, product_channels={self.product_channels})"
        )
