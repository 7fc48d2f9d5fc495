"""`NeuronAttention`: multi-head self-attention across the neurons of every graph."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import to_dense_batch

from gradgraph.errors import GradGraphError
from gradgraph.nn.component_attention import MultiHeadConv
from gradgraph.nn.context import GraphContext

__all__ = ["NeuronAttention"]


class NeuronAttention(MultiHeadConv):
    r"""GradMetaNet++'s attention across the neurons of every graph (per component when there is a component axis).

    For neuron :math:`n` of graph :math:`G(n)` (and component :math:`i`, omitted below), with
    :math:`H` heads of width :math:`d`:

    .. math::
        h'_{n} = \Theta_{\text{self}} h_{n}
               + \Theta_O \big\Vert_{t=1}^{H} \sum_{m \in G(n)} \operatorname{softmax}_{m}\!\Big(
                 \tfrac{\langle Q_t h_{n},\, K_t h_{m} \rangle}{\sqrt d}\Big) V_t h_{m}
               + \Theta_{\text{layer}} \operatorname{mean}_{m \in \ell(n)} h_{m}
               + \Theta_{\text{graph}} \operatorname{mean}_{m \in G(n)} h_{m}
               \;(+\ \text{the edge terms of :class:`GradGraphConv` if ``edge_messages``})

    The attention runs over the set of a graph's neurons: no index of a neuron enters, so
    it is equivariant to every permutation of the neurons within a graph, in particular of
    hidden neurons (and heads of the source network). What a neuron may know about where it
    sits comes from its state, i.e. from :class:`PositionalEncoding` (layer, kind, and an
    index for input/output neurons only). With per-component states every component
    attends separately, so the layer is also equivariant to permuting the components.

    Graphs of a batch are padded with :func:`torch_geometric.utils.to_dense_batch` and
    padded neurons masked out of the keys; a batch of graphs of one size, in order (one
    architecture: :meth:`GraphContext.nodes_per_graph`) is only viewed as ``[G, n, ...]``, with
    no mask and no read-back of which neurons are real. Attention runs in
    :func:`torch.nn.functional.scaled_dot_product_attention`. **Cost:** with ``G`` graphs of
    at most :math:`N_{\max}` neurons, time :math:`O(G B N_{\max}^2 H d + N B C C')`;
    memory: the padded ``[G, B, H, N_max, d]`` queries, keys, values and output, plus what
    the SDPA kernel keeps (with a mask usually the math path: the
    :math:`[G B, H, N_{\max}, N_{\max}]` weights). Quadratic in the neurons of a graph:
    meant for networks of up to a few thousand neurons.

    Args:
        in_channels, out_channels, edge_dim, direction, aggr: see :class:`GradGraphConv`.
        heads: ``H``.
        head_channels: ``d`` (defaults to ``max(1, in_channels // heads)``).
        edge_messages: keep the messages along the edges of :class:`GradGraphConv`.

    Shapes:
        - **input:** ``h [N, C]`` or ``[N, B, C]``, a :class:`GraphContext` (nodes sorted by graph, as
          in a PyG ``Batch``)
        - **output:** ``[N, C']`` or ``[N, B, C']``
    """

    def attend(self, h: Tensor, context: GraphContext) -> Tensor:
        r"""The attention term alone: ``h [N, (B,) C] -> [N, (B,) C']``."""
        batch = context.node_batch
        per_graph = context.nodes_per_graph()
        if per_graph:
            # Graphs of one size, in order (one architecture): [N, ...] is a view of [G, n, ...];
            # no padding, no key mask, no gather of the real neurons at the end.
            dense, mask = h.view(context.num_graphs, per_graph, *h.shape[1:]), None
        elif batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
            raise GradGraphError(
                f"{type(self).__name__}: nodes must be sorted by graph (context.node_batch), as in a PyG Batch"
            )
        else:
            # dense [G, N_max, (B,) C]; mask [G, N_max] marks real neurons.
            dense, mask = to_dense_batch(h, batch, batch_size=context.num_graphs)
        per_component = h.dim() == 3
        sequences = dense.transpose(1, 2) if per_component else dense[:, None]  # [G, S, N_max, C]
        num_graphs, num_sets, max_nodes = sequences.shape[:3]

        def heads_first(values: Tensor) -> Tensor:  # [G, S, N_max, H*d] -> [G*S, H, N_max, d]
            values = values.reshape(num_graphs * num_sets, max_nodes, self.heads, self.head_channels)
            return values.transpose(1, 2)

        query, key, value = (heads_first(lin(sequences)) for lin in (self.lin_query, self.lin_key, self.lin_value))
        key_mask = None
        if mask is not None:
            key_mask = mask[:, None, None, None, :].expand(num_graphs, num_sets, 1, 1, max_nodes).flatten(0, 1)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        attended = attended.transpose(1, 2).reshape(num_graphs, num_sets, max_nodes, -1)
        attended = attended.transpose(1, 2) if per_component else attended[:, 0]  # [G, N_max, (B,) H*d]
        return self.lin_out(attended.reshape(h.shape[0], *attended.shape[2:]) if mask is None else attended[mask])

    def forward(self, h: Tensor, context: GraphContext) -> Tensor:
        """Apply the layer's equation to ``h [N, (B,) C]``."""
        self._check(h, context)
        out = self.lin_self(h) + self.group_means(h, context) + self.attend(h, context)
        return out + self.propagate_both(h, context) if self.edge_messages else out

