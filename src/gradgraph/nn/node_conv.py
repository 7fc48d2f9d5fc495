"""`NodeConv`: equivariant message passing on one state vector per neuron."""

from __future__ import annotations

from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import GradGraphConv

__all__ = ["NodeConv"]


class NodeConv(GradGraphConv):
    r"""Message passing on node states ``h [N, C]`` after the component axis is pooled away.

    .. math::
        h'_n = \Theta_{\text{self}} h_n
             + \bigoplus_{j \to n} \gamma_{\rightarrow}(e_{jn}) \odot \Theta_{\rightarrow} h_j
             + \bigoplus_{n \to k} \gamma_{\leftarrow}(e_{nk}) \odot \Theta_{\leftarrow} h_k
             + \Theta_{\text{layer}} \operatorname{mean}_{m \in \ell(n)} h_m
             + \Theta_{\text{graph}} \operatorname{mean}_{m \in G(n)} h_m

    (the equation of :class:`GradGraphConv`), the graph-aware counterpart of GradMetaNet's
    DeepSets layers :math:`L_\Gamma`: besides the set terms it sends messages along the
    network's own weights, gated by the weight value and the edge kind.

    Args:
        in_channels, out_channels, edge_dim, direction, aggr: see :class:`GradGraphConv`.

    Shapes:
        - **input:** ``h [N, C]``, a :class:`GraphContext`
        - **output:** ``[N, C']``
    """

    def forward(self, h: Tensor, context: GraphContext) -> Tensor:
        if h.dim() != 2:
            raise GradGraphError(
                f"NodeConv: node states must have shape [N, C]; got {list(h.shape)} "
                "(use ComponentConv for per-component states [N, B, C])"
            )
        return super().forward(h, context)
