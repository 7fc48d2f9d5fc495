"""Channel-wise sparse products for per-component messages, without ``[E, B, C]`` intermediates.

A per-component message layer computes, for every channel ``c``,

    out[n, i, c] = sum_{edges j -> n} gate[e, c] * x[j, i, c]

which gathered naively materialises an ``[E, B, C]`` tensor (hundreds of MB for a batch of
networks with ``B = 128`` components). Laying the channels out as the diagonal blocks of one
sparse ``[C*N, C*N]`` matrix turns it into a single CSR sparse-dense product (``spmm``),
whose gradient with respect to the gates is a sampled dense-dense product (``sddmm``) and
vice versa. Both are exact reformulations; :class:`~gradgraph.nn.GradGraphConv` uses them
as its fused ``message_and_aggregate`` path and the tests compare them with ``propagate``.

Parallel edges (two edges with the same ``(row, column)``, e.g. a weight edge and a residual
edge between the same neurons) share one stored entry: torch's and cuSPARSE's CSR kernels
assume each ``(row, column)`` pair is stored once, so the pattern merges them, the product
sums their gates into that entry and the sampled product hands each of them its value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ChannelBlockPattern", "channel_spmm", "channel_sddmm"]


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" — the ops we use are stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, (size, size), check_invariants=False)


@dataclass(eq=False)
class ChannelBlockPattern:
    """The sparsity pattern of ``C`` copies of an ``[N, N]`` edge pattern on the diagonal.

    Row ``c*N + r``, column ``c*N + s`` is stored once for every channel ``c`` and distinct
    ``(r, s)`` of the edges (row node ``r``, column node ``s``): ``U <= E`` entries per
    channel, ``U < E`` where edges are parallel. Columns are sorted and distinct within each
    row (a valid CSR matrix for torch's ``check_invariants`` and for cuSPARSE).

    Attributes:
        crow: ``[C*N + 1]`` CSR row pointers.
        col: ``[C*U]`` CSR column indices.
        value_order: ``[C*E]`` the CSR position of every ``(channel, edge)`` in the
            channel-major flattening of ``[C, E]``: parallel edges share a position. Values
            in CSR order are ``per_channel.reshape(-1)`` summed into these positions, and an
            edge's value is ``values_csr[value_order]``.
        row_count: ``[N]`` edges per row node, parallel ones counted each (the in-degree
            for aggregation).
        num_nodes, channels, num_edges: ``N``, ``C``, ``E``.
        transposed: the pattern of the transposed matrix (rows and columns swapped), set by
            :meth:`build_pair`; the backward passes use it instead of transposing a CSR
            matrix, which would sort its entries every time.
        transpose_order: ``[C*U]``, ``values_csr[transpose_order]`` are the values in the
            transposed pattern's CSR order.
    """

    crow: Tensor
    col: Tensor
    value_order: Tensor
    row_count: Tensor
    num_nodes: int
    channels: int
    num_edges: int
    transposed: ChannelBlockPattern | None = None
    transpose_order: Tensor | None = None
    _adjacency: Tensor | None = field(default=None, repr=False)

    @classmethod
    def build_pair(
        cls, rows: Tensor, cols: Tensor, num_nodes: int, channels: int
    ) -> tuple[ChannelBlockPattern, ChannelBlockPattern]:
        """The pattern for ``(rows, cols)`` and its transpose, linked to each other."""
        pattern = cls.build(rows, cols, num_nodes, channels)
        transposed = cls.build(cols, rows, num_nodes, channels)
        for first, second in ((pattern, transposed), (transposed, pattern)):
            # the entry of (channel, edge) in `second` holds what its entry in `first` holds
            # (parallel edges write the same entry twice, with the same value)
            transpose_order = torch.empty_like(first.col)
            transpose_order[second.value_order] = first.value_order
            first.transposed = second
            first.transpose_order = transpose_order
        return pattern, transposed

    def transposed_matrix(self, values: Tensor) -> Tensor:
        """The transpose of ``matrix(values)``, as a CSR matrix of :attr:`transposed`."""
        if self.transposed is None:
            return self.matrix(values).t()
        return self.transposed.matrix(values[self.transpose_order])

    def adjacency(self) -> Tensor:
        """The ``[N, N]`` CSR matrix of one channel block (rows and columns of the edges, values
        the number of edges of each entry, 2 for a pair of parallel edges): the sparse ``adj_t``
        that makes PyG's ``propagate`` call a layer's ``message_and_aggregate``. Its index
        tensors are views of the pattern's."""
        if self._adjacency is None:
            entries = self.col.numel() // self.channels
            counts = torch.bincount(self.value_order[: self.num_edges], minlength=entries)  # channel 0
            self._adjacency = _csr(self.crow[: self.num_nodes + 1], self.col[:entries], counts, self.num_nodes)
        return self._adjacency

    @classmethod
    def build(cls, rows: Tensor, cols: Tensor, num_nodes: int, channels: int) -> ChannelBlockPattern:
        """Pattern for edges ``rows[e], cols[e]`` (``[E]`` each), repeated over ``channels`` blocks;
        parallel edges (the same ``(rows[e], cols[e])``) share one entry."""
        num_edges = rows.numel()
        # sorted distinct (row, column) keys: the entries of one block, in CSR order
        keys, entry = torch.unique(rows * num_nodes + cols, sorted=True, return_inverse=True)
        num_entries = keys.numel()
        offsets = torch.arange(channels, device=rows.device)
        crow = torch.zeros(channels * num_nodes + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.cumsum(torch.bincount(keys // num_nodes, minlength=num_nodes).repeat(channels), dim=0)
        col = (offsets[:, None] * num_nodes + (keys % num_nodes)[None, :]).reshape(-1)
        value_order = (offsets[:, None] * num_entries + entry[None, :]).reshape(-1)
        row_count = torch.bincount(rows, minlength=num_nodes)
        return cls(crow, col, value_order, row_count, num_nodes, channels, num_edges)

    @property
    def size(self) -> int:
        """``C*N``, the side of the block matrix."""
        return self.channels * self.num_nodes

    def to_csr_values(self, per_edge: Tensor) -> Tensor:
        """``[E, C]`` per-edge, per-channel values -> ``[C*U]`` in CSR order (parallel edges summed)."""
        flat = per_edge.t().reshape(-1)
        return flat.new_zeros(self.col.numel()).index_add(0, self.value_order, flat)

    def from_csr_values(self, values: Tensor) -> Tensor:
        """``[C*U]`` values in CSR order -> ``[E, C]`` (each parallel edge gets its entry's value)."""
        return values[self.value_order].view(self.channels, self.num_edges).t()

    def matrix(self, values: Tensor) -> Tensor:
        """The ``[C*N, C*N]`` CSR matrix with ``values`` (CSR order)."""
        return _csr(self.crow, self.col, values, self.size)


def _sampled_product(pattern: ChannelBlockPattern, left: Tensor, right: Tensor) -> Tensor:
    """``(left @ right.T)`` at the pattern's entries: ``[C*U]`` values in CSR order (one per stored entry)."""
    zeros = torch.zeros(pattern.col.numel(), dtype=left.dtype, device=left.device)
    return torch.sparse.sampled_addmm(pattern.matrix(zeros), left, right.t(), beta=0.0).values()


class _ChannelSpmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, dense: Tensor, pattern: ChannelBlockPattern) -> Tensor:
        ctx.save_for_backward(values, dense)
        ctx.pattern = pattern
        return pattern.matrix(values) @ dense

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, dense = ctx.saved_tensors
        pattern = ctx.pattern
        grad_values = grad_dense = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_product(pattern, grad_out.contiguous(), dense)
        if ctx.needs_input_grad[1]:
            grad_dense = pattern.transposed_matrix(values) @ grad_out
        return grad_values, grad_dense, None


class _ChannelSddmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left: Tensor, right: Tensor, pattern: ChannelBlockPattern) -> Tensor:
        ctx.save_for_backward(left, right)
        ctx.pattern = pattern
        return _sampled_product(pattern, left, right)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        left, right = ctx.saved_tensors
        pattern, grad_values = ctx.pattern, grad_values.contiguous()
        grad_left = pattern.matrix(grad_values) @ right if ctx.needs_input_grad[0] else None
        grad_right = pattern.transposed_matrix(grad_values) @ left if ctx.needs_input_grad[1] else None
        return grad_left, grad_right, None


def _blocks(x: Tensor) -> Tensor:
    """``[N, B, C]`` -> ``[C*N, B]`` (channel-major rows)."""
    return x.permute(2, 0, 1).reshape(-1, x.shape[1])


def channel_spmm(pattern: ChannelBlockPattern, gate: Tensor, x: Tensor) -> Tensor:
    """``out[r, i, c] = sum_{entries (r, s)} gate[e, c] * x[s, i, c]``.

    Args:
        pattern: built for the ``(rows, cols)`` of the aggregation and ``C`` channels.
        gate: ``[E, C]`` per-edge, per-channel weights (edge order of the pattern's input).
        x: ``[N, B, C]`` states.

    Returns:
        ``[N, B, C]`` sums over each row node's entries.
    """
    num_nodes, num_components, channels = x.shape
    out = _ChannelSpmm.apply(pattern.to_csr_values(gate), _blocks(x), pattern)
    return out.view(channels, num_nodes, num_components).permute(1, 2, 0)


def channel_sddmm(pattern: ChannelBlockPattern, left: Tensor, right: Tensor) -> Tensor:
    """``out[e, c] = sum_i left[r_e, i, c] * right[s_e, i, c]`` for every pattern entry ``(r_e, s_e)``.

    Args:
        pattern: built for the edges' ``(rows, cols)`` and ``C`` channels.
        left, right: ``[N, B, C]``.

    Returns:
        ``[E, C]`` in the pattern's input edge order.
    """
    return pattern.from_csr_values(_ChannelSddmm.apply(_blocks(left), _blocks(right), pattern))
