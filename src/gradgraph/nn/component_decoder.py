"""`ComponentProductDecoder`: GradMetaNet++'s product layer, applied per component and summed."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import Linear

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext

__all__ = ["ComponentProductDecoder"]

REDUCTIONS = ("mean", "sum")


class ComponentProductDecoder(nn.Module):
    r"""One output per weight (edge) and per bias (node) from per-component states, without pooling first.

    For an edge :math:`j \to k` with features :math:`e_{jk}`, a node :math:`n`, and the
    per-component states :math:`z_{n,i}`:

    .. math::
        y_{jk} &= \Theta_E\, \rho_i\, \sigma\big((A z_{j,i}) \odot (B z_{k,i})
                  + U z_{j,i} + V z_{k,i} + W e_{jk} + b\big) \\
        y_{n}  &= \Theta_N\, \rho_i\, \sigma\big((A' z_{n,i}) \odot (B' z_{n,i}) + U' z_{n,i} + b'\big)

    with :math:`\rho_i` the mean (or, ``reduce="sum"``, the sum: the paper's form) over the
    ``B`` components and :math:`\sigma` = SiLU. This is GradMetaNet++'s product layer
    (Gelberg et al., 2025): an MLP applied to the two endpoint states *per datapoint*, then
    summed over datapoints, so a per-sample quantity such as the per-sample gradient
    :math:`\mathrm{act}_{j,i}\,\mathrm{grad}_{k,i}` (the product term) can be transformed
    nonlinearly before it is aggregated. :class:`EdgeProductDecoder` is the pooled
    counterpart (its product enters only through its first two moments). Equivariant to
    hidden-neuron permutations (outputs move with edges and nodes) and invariant to the
    order of the components.

    **Cost:** time :math:`O((E + N) \cdot B \cdot P)`. The per-component pre-activations
    ``[E, B, P]`` are never kept: edges are processed in chunks under activation
    checkpointing, so the memory held for backward is the ``[N, B, 4P]`` projections, and the
    transient memory one chunk (by default about :attr:`CHUNK_ELEMENTS` values per tensor).

    Args:
        component_channels: ``C_z`` of the per-component states.
        edge_dim: ``D`` of the edge features.
        out_channels: ``k``, outputs per edge and per node.
        product_channels: ``P``, width of the per-component MLP.
        reduce: ``"mean"`` (default; keeps the scale independent of ``B``) or ``"sum"``.
        chunk_edges: edges per checkpointed chunk (default: as many as keep one chunk's
            ``[e, B, 2P]`` tensors at about :attr:`CHUNK_ELEMENTS` values).

    Shapes:
        - **input:** ``z [N, B, C_z]``, a :class:`GraphContext`
        - **output:** ``(edge [E, k], node [N, k])``
    """

    #: Values per ``[e, B, 2P]`` tensor of one edge chunk when ``chunk_edges`` is not given (16 MiB in float32).
    CHUNK_ELEMENTS = 1 << 22

    def __init__(
        self,
        component_channels: int,
        edge_dim: int,
        out_channels: int,
        product_channels: int = 16,
        *,
        reduce: str = "mean",
        chunk_edges: int | None = None,
    ) -> None:
        super().__init__()
        if reduce not in REDUCTIONS:
            raise GradGraphError(f"ComponentProductDecoder: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if min(component_channels, edge_dim, out_channels, product_channels, chunk_edges or 1) < 1:
            raise GradGraphError("ComponentProductDecoder: channel counts and chunk_edges must be >= 1")
        self.component_channels = component_channels
        self.edge_dim = edge_dim
        self.out_channels = out_channels
        self.product_channels = product_channels
        self.reduce = reduce
        self.chunk_edges = chunk_edges
        # [A | U] for the source end, [B | V] for the destination end, one matmul each.
        self.edge_source = Linear(component_channels, 2 * product_channels, bias=False)
        self.edge_target = Linear(component_channels, 2 * product_channels, bias=False)
        self.edge_features = Linear(edge_dim, product_channels)
        self.edge_out = Linear(product_channels, out_channels)
        self.node_in = Linear(component_channels, 3 * product_channels)
        self.node_out = Linear(product_channels, out_channels)
        self.activation = nn.SiLU()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter."""
        for module in self.children():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _reduce(self, values: Tensor) -> Tensor:
        return values.mean(dim=1) if self.reduce == "mean" else values.sum(dim=1)

    def _edge_chunk(self, source: Tensor, target: Tensor, edge_term: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        """``rho_i sigma(pre_{jk,i})`` ``[e, P]`` for one chunk of edges."""
        width = self.product_channels
        left, right = source.index_select(0, src), target.index_select(0, dst)  # [e, B, 2P]
        pre = left[..., :width] * right[..., :width] + left[..., width:] + right[..., width:] + edge_term[:, None, :]
        return self._reduce(self.activation(pre))

    def forward(self, z: Tensor, context: GraphContext) -> tuple[Tensor, Tensor]:
        """Decode ``z [N, B, C_z]`` into ``(edge [E, k], node [N, k])``."""
        if z.dim() != 3 or z.shape[0] != context.num_nodes or z.shape[2] != self.component_channels:
            raise GradGraphError(
                f"ComponentProductDecoder: component states must have shape [{context.num_nodes}, B, "
                f"{self.component_channels}]; got {list(z.shape)}"
            )
        if context.edge_features.shape[-1] != self.edge_dim:
            raise GradGraphError(
                f"ComponentProductDecoder: edge features have {context.edge_features.shape[-1]} channels, "
                f"the decoder was built for edge_dim={self.edge_dim}"
            )
        source, target = self.edge_source(z), self.edge_target(z)
        edge_term = self.edge_features(context.edge_features)
        src, dst = context.edge_index
        chunk_edges = self.chunk_edges or max(1, self.CHUNK_ELEMENTS // (z.shape[1] * 2 * self.product_channels))
        chunks = []
        for start in range(0, src.numel(), chunk_edges):
            span = slice(start, start + chunk_edges)
            arguments = (source, target, edge_term[span], src[span], dst[span])
            if torch.is_grad_enabled():
                chunks.append(checkpoint(self._edge_chunk, *arguments, use_reentrant=False))
            else:
                chunks.append(self._edge_chunk(*arguments))
        pooled = torch.cat(chunks) if chunks else z.new_zeros((0, self.product_channels))
        edge = self.edge_out(pooled)
        width = self.product_channels
        node_pre = self.node_in(z)
        node_pre = node_pre[..., :width] * node_pre[..., width : 2 * width] + node_pre[..., 2 * width :]
        node = self.node_out(self._reduce(self.activation(node_pre)))
        return edge, node

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.component_channels}, edge_dim={self.edge_dim}, out={self.out_channels}, "
            f"product_channels={self.product_channels}, reduce={self.reduce!r})"
        )
