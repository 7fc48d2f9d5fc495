"""`ComponentAttention`: multi-head self-attention across the components of every neuron."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import GradGraphConv
from gradgraph.nn.linear import Linear

__all__ = ["ComponentAttention", "MultiHeadConv", "check_heads"]


def check_heads(layer: str, heads: int, head_channels: int) -> None:
    """Raise a :class:`GradGraphError` naming ``layer`` unless ``heads`` and ``head_channels`` are >= 1."""
    if heads < 1 or head_channels < 1:
        raise GradGraphError(
            f"{layer}: heads and head_channels must be >= 1, got heads={heads}, head_channels={head_channels}"
        )


class MultiHeadConv(GradGraphConv):
    """A :class:`GradGraphConv` with ``H`` heads of width ``d``: bias-free query, key, value
    projections ``C -> H·d`` and an output projection ``H·d -> C'``. The base of
    :class:`ComponentAttention` and :class:`~gradgraph.nn.NeuronAttention`, which differ only in
    which axis they attend over; a subclass implements ``forward``.

    Args:
        in_channels, out_channels, edge_dim: as :class:`GradGraphConv`.
        heads: ``H``.
        head_channels: ``d`` (defaults to ``max(1, in_channels // heads)``).
        **kwargs: passed to :class:`GradGraphConv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        edge_dim: int,
        *,
        heads: int = 2,
        head_channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_heads(type(self).__name__, heads, 1 if head_channels is None else head_channels)
        head_channels = head_channels or max(1, in_channels // heads)
        super().__init__(in_channels, out_channels, edge_dim, **kwargs)
        self.heads = heads
        self.head_channels = head_channels
        self.lin_query = Linear(in_channels, heads * head_channels, bias=False)
        self.lin_key = Linear(in_channels, heads * head_channels, bias=False)
        self.lin_value = Linear(in_channels, heads * head_channels, bias=False)
        self.lin_out = Linear(heads * head_channels, out_channels, bias=False)
        self.reset_parameters()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, edge_dim={self.edge_dim}, "
            f"heads={self.heads}, head_channels={self.head_channels}, direction={self.direction!r}, "
            f"edge_messages={self.edge_messages})"
        )


class ComponentAttention(MultiHeadConv):
    r"""GradMetaNet++'s attention across the components (datapoints, or datapoint x token) of every neuron.

    For neuron :math:`n` and component :math:`i`, with :math:`H` heads of width :math:`d`:

    .. math::
        h'_{n,i} = \Theta_{\text{self}} h_{n,i}
                 + \Theta_O \big\Vert_{t=1}^{H} \sum_{i'} \operatorname{softmax}_{i'}\!\Big(
                   \tfrac{\langle Q_t h_{n,i},\, K_t h_{n,i'} \rangle}{\sqrt d}\Big) V_t h_{n,i'}
                 + \Theta_{\text{layer}} \operatorname{mean}_{m \in \ell(n)} h_{m,i}
                 + \Theta_{\text{graph}} \operatorname{mean}_{m \in G(n)} h_{m,i}
                 \;(+\ \text{the edge terms of :class:`GradGraphConv` if ``edge_messages``})

    The attention term replaces :class:`ComponentConv`'s set mean
    :math:`\operatorname{mean}_{i'} h_{n,i'}` (the case of constant attention scores): each
    component looks at the others of the same neuron with weights that depend on both, so
    pairwise structure of the set (which datapoints are alike) is expressible in one layer.
    No positional term enters, so the layer is equivariant to permutations of the
    components; nothing depends on a neuron's index, so it is equivariant to permutations
    of hidden neurons (and of attention heads of the source network, which act on neurons).

    Computed with :func:`torch.nn.functional.scaled_dot_product_attention` with the
    ``N`` neurons as its batch axis. **Cost:** time :math:`O(N B^2 H d + N B C C')`;
    memory for backward: the ``[N, H, B, d]`` queries, keys, values and output, plus what
    the SDPA kernel keeps (flash / memory-efficient kernels: :math:`O(N H B)`; the math
    fallback, e.g. float64 on CPU, the :math:`[N, H, B, B]` attention weights).

    Args:
        in_channels, out_channels, edge_dim, direction, aggr: see :class:`GradGraphConv`.
        heads: ``H``.
        head_channels: ``d`` (defaults to ``max(1, in_channels // heads)``).
        edge_messages: keep the per-component messages along the edges of
            :class:`GradGraphConv` (cost :math:`O(E B C')`).

    Shapes:
        - **input:** ``h [N, B, C]``, a :class:`GraphContext`
        - **output:** ``[N, B, C']``
    """

    def _split_heads(self, values: Tensor) -> Tensor:
        """``[S, L, H*d] -> [S, H, L, d]``."""
        return values.unflatten(-1, (self.heads, self.head_channels)).transpose(1, 2)

    def attend(self, h: Tensor) -> Tensor:
        r"""The attention term :math:`\Theta_O \Vert_t \ldots` alone: ``h [N, B, C] -> [N, B, C']``."""
        query, key, value = (self._split_heads(lin(h)) for lin in (self.lin_query, self.lin_key, self.lin_value))
        attended = F.scaled_dot_product_attention(query, key, value)  # [N, H, B, d]
        return self.lin_out(attended.transpose(1, 2).flatten(-2))

    def forward(self, h: Tensor, context: GraphContext) -> Tensor:
        """Apply the layer's equation to ``h [N, B, C]``."""
        if h.dim() != 3:
            raise GradGraphError(
                f"{type(self).__name__}: states must have shape [N, B, C] (neuron, component, channel); "
                f"got {list(h.shape)}"
            )
        self._check(h, context)
        out = self.lin_self(h) + self.group_means(h, context) + self.attend(h)
        return out + self.propagate_both(h, context) if self.edge_messages else out

