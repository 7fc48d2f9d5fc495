"""`ComponentConv`: message passing on per-neuron, per-component states ``[N, B, C]``."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import GradGraphConv
from gradgraph.nn.linear import Linear

__all__ = ["ComponentConv"]


class ComponentConv(GradGraphConv):
    r"""GradMetaNet's layer over (neuron x component) states, with messages along the weights.

    For neuron :math:`n` and component :math:`i` (a datapoint, or a datapoint x token):

    .. math::
        h'_{n,i} = \Theta_{\text{self}} h_{n,i}
                 + \Theta_{\text{set}} \operatorname{mean}_{i'} h_{n,i'}
                 + \bigoplus_{j \to n} \gamma_{\rightarrow}(e_{jn}) \odot \Theta_{\rightarrow} h_{j,i}
                 + \bigoplus_{n \to k} \gamma_{\leftarrow}(e_{nk}) \odot \Theta_{\leftarrow} h_{k,i}
                 + \Theta_{\text{layer}} \operatorname{mean}_{m \in \ell(n)} h_{m,i}
                 + \Theta_{\text{graph}} \operatorname{mean}_{m \in G(n)} h_{m,i}
                 + \Theta_{\text{all}} \operatorname{mean}_{m \in G(n),\, i'} h_{m,i'}

    The pointwise, set-mean, layer-mean and graph-mean terms are the "interactions across
    sets" layer :math:`L_{\Gamma_b}` of GradMetaNet (Gelberg et al., 2025); the two edge
    terms add the network's connectivity: a message along edge :math:`j \to n` is computed
    per component and gated by a learned linear function :math:`\gamma` of the edge's
    features (weight value, edge kind). Every term is equivariant to permutations of
    hidden neurons and of components; the cost is :math:`O((N + E) \cdot B \cdot C')`.

    With ``edge_messages=False`` the two edge terms are dropped: exactly the paper's
    :math:`L_{\Gamma_b}`, cost :math:`O(N \cdot B \cdot C')` — useful when ``E \gg N`` and
    connectivity can enter later through node layers and the decoder.

    Args:
        in_channels, out_channels, edge_dim, direction, aggr: see :class:`GradGraphConv`.
        edge_messages: keep the per-component messages along the edges (see
            :class:`GradGraphConv`).

    Shapes:
        - **input:** ``h [N, B, C]``, a :class:`GraphContext`
        - **output:** ``[N, B, C']``
    """

    def __init__(self, in_channels: int, out_channels: int, edge_dim: int, **kwargs: Any) -> None:
        super().__init__(in_channels, out_channels, edge_dim, **kwargs)
        self.lin_set = Linear(in_channels, out_channels, bias=False)
        self.lin_all = Linear(in_channels, out_channels, bias=False)
        self.reset_parameters()

    def forward(self, h: Tensor, context: GraphContext) -> Tensor:
        if h.dim() != 3:
            raise GradGraphError(
                f"ComponentConv: states must have shape [N, B, C] (neuron, component, channel); got {list(h.shape)}"
            )
        self._check(h, context)
        set_mean = h.mean(dim=1, keepdim=True)
        # The all-mean term is the graph mean of the set means (no second scatter over B).
        all_mean = self.group_means_of_set(set_mean, context)
        out = self.lin_self(h) + self.lin_set(set_mean) + self.group_means(h, context) + all_mean
        return out + self.propagate_both(h, context) if self.edge_messages else out

    def group_means_of_set(self, set_mean: Tensor, context: GraphContext) -> Tensor:
        """:math:`\\Theta_{\\text{all}}` times the per-graph mean of ``set_mean [N, 1, C]``."""
        graph_mean = scatter(set_mean, context.node_batch, dim=0, dim_size=context.num_graphs, reduce="mean")
        return self.lin_all(graph_mean)[context.node_batch]

