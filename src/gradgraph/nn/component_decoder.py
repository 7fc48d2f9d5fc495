"""`ComponentProductDecoder`: GradMetaNet++'s product layer, applied per component and summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.linear import Linear

__all__ = ["ComponentProductDecoder"]

REDUCTIONS = ("mean", "sum")


def _edge_pre_activation(
    source: Tensor, target: Tensor, edge_term: Tensor, src: Tensor, dst: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(pre, a_j, b_k)``, each ``[e, P, B]``, for one chunk of edges ``j -> k``.

    ``source``/``target`` are ``[N, 2P, B]`` (``[a | u]`` and ``[b | v]``, channel-major so that
    the per-edge term ``w_e`` broadcasts along the contiguous component axis).
    """
    width = edge_term.shape[-1]
    left, right = source.index_select(0, src), target.index_select(0, dst)  # [e, 2P, B]
    left_product, right_product = left[:, :width], right[:, :width]
    linear = torch.add(left[:, width:], right[:, width:]).add_(edge_term[:, :, None])
    return linear.addcmul_(left_product, right_product), left_product, right_product


class _PooledEdgeProduct(torch.autograd.Function):
    r"""``pooled[e] = rho_i silu(a_{j,i} * b_{k,i} + u_{j,i} + v_{k,i} + w_e)`` for every edge ``e = j -> k``.

    Inputs ``source = [a | u]`` and ``target = [b | v]`` are ``[N, B, 2P]``, ``edge_term = w``
    ``[E, P]``; output ``[E, P]``. Edges are processed in chunks in the forward and again in
    the backward, which recomputes each chunk's pre-activations instead of keeping them: only
    the inputs are saved, so the memory held for backward is that of the ``[N, B, 2P]``
    inputs, and every per-edge temporary is one chunk (sized to stay in the CPU cache). The
    backward forms the gradient by hand (one fused ``silu_backward``, two products,
    index-adds onto the nodes) rather than through autograd of slices and gathers, whose
    zero-filled full-size gradient buffers dominated the step. First-order only
    (``once_differentiable``).
    """

    @staticmethod
    def forward(
        ctx, source: Tensor, target: Tensor, edge_term: Tensor, src: Tensor, dst: Tensor, chunk_edges: int,
        reduce_mean: bool,
    ) -> Tensor:
        channel_major = source.transpose(1, 2).contiguous(), target.transpose(1, 2).contiguous()
        pooled = edge_term.new_empty(edge_term.shape)
        for start in range(0, src.numel(), chunk_edges):
            span = slice(start, start + chunk_edges)
            pre, _, _ = _edge_pre_activation(*channel_major, edge_term[span], src[span], dst[span])
            torch.sum(F.silu(pre, inplace=True), dim=2, out=pooled[span])
        if reduce_mean:
            pooled /= source.shape[1]
        ctx.save_for_backward(*channel_major, edge_term, src, dst)
        ctx.chunk_edges = chunk_edges
        ctx.reduce_mean = reduce_mean
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: Tensor) -> tuple[Tensor | None, ...]:
        source, target, edge_term, src, dst = ctx.saved_tensors  # channel-major [N, 2P, B]
        width = edge_term.shape[-1]
        # Contiguous accumulators for a, u, b, v: index_add_ into strided halves is several times slower.
        grad_a, grad_u, grad_b, grad_v = (source.new_zeros(source.shape[0], width, source.shape[2]) for _ in range(4))
        grad_edge_term = torch.empty_like(edge_term)
        grad_pooled = grad_pooled / source.shape[2] if ctx.reduce_mean else grad_pooled
        for start in range(0, src.numel(), ctx.chunk_edges):
            span = slice(start, start + ctx.chunk_edges)
            pre, left, right = _edge_pre_activation(source, target, edge_term[span], src[span], dst[span])
            grad_pre = torch.ops.aten.silu_backward(grad_pooled[span, :, None].expand_as(pre), pre)
            torch.sum(grad_pre, dim=2, out=grad_edge_term[span])
            grad_u.index_add_(0, src[span], grad_pre)
            grad_v.index_add_(0, dst[span], grad_pre)
            grad_a.index_add_(0, src[span], right.mul(grad_pre))
            grad_b.index_add_(0, dst[span], grad_pre.mul_(left))
        grad_source = torch.cat([grad_a, grad_u], dim=1).transpose(1, 2)
        grad_target = torch.cat([grad_b, grad_v], dim=1).transpose(1, 2)
        return grad_source, grad_target, grad_edge_term, None, None, None, None


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
    ``[E, B, P]`` are never kept: edges are processed in chunks, forward and again (recomputed)
    in a hand-written backward, so the memory held for backward is the ``[N, B, 4P]``
    projections, and the transient memory one chunk (by default about
    :meth:`chunk_elements` values per ``[e, B, P]`` tensor: small on the CPU, where a chunk
    that stays in the cache is faster than a large one, large on accelerators, where every
    chunk costs kernel launches). First-order differentiable only.

    Args:
        component_channels: ``C_z`` of the per-component states.
        edge_dim: ``D`` of the edge features.
        out_channels: ``k``, outputs per edge and per node.
        product_channels: ``P``, width of the per-component MLP.
        reduce: ``"mean"`` (default; keeps the scale independent of ``B``) or ``"sum"``.
        chunk_edges: edges per chunk (default: as many as keep one chunk's ``[e, B, P]``
            tensors at about :meth:`chunk_elements` values).

    Shapes:
        - **input:** ``z [N, B, C_z]``, a :class:`GraphContext`
        - **output:** ``(edge [E, k], node [N, k])``
    """

    #: Values per ``[e, B, P]`` tensor of one edge chunk when ``chunk_edges`` is not given, on
    #: an accelerator (16 MiB in float32) and on the CPU (512 KiB: a chunk's few temporaries stay in cache).
    CHUNK_ELEMENTS = 1 << 22
    CHUNK_ELEMENTS_CPU = 1 << 17

    @classmethod
    def chunk_elements(cls, device: torch.device) -> int:
        """Values per ``[e, B, P]`` chunk tensor by default on ``device``."""
        return cls.CHUNK_ELEMENTS_CPU if device.type == "cpu" else cls.CHUNK_ELEMENTS

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
        chunk = 1 if chunk_edges is None else chunk_edges  # None: the default; 0 is refused like any count
        if min(component_channels, edge_dim, out_channels, product_channels, chunk) < 1:
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
        chunk_edges = self.chunk_edges or max(1, self.chunk_elements(z.device) // (z.shape[1] * self.product_channels))
        pooled = _PooledEdgeProduct.apply(source, target, edge_term, src, dst, chunk_edges, self.reduce == "mean")
        edge = self.edge_out(pooled)
        # split, not slicing: the backward of a slice writes a zero-filled full-size gradient per slice.
        node_product_left, node_product_right, node_linear = self.node_in(z).split(self.product_channels, dim=-1)
        node_pre = torch.addcmul(node_linear, node_product_left, node_product_right)
        node = self.node_out(self._reduce(self.activation(node_pre)))
        return edge, node

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.component_channels}, edge_dim={self.edge_dim}, out={self.out_channels}, "
            f"product_channels={self.product_channels}, reduce={self.reduce!r})"
        )
