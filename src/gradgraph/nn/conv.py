"""`GradGraphConv`: the base class of gradgraph's message layers (and of yours)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.nn.context import GraphContext
from gradgraph.nn.linear import Linear
from gradgraph.nn.sparse import ChannelBlockPattern, channel_spmm

__all__ = ["DIRECTIONS", "FLOWS", "GradGraphConv", "resolve_direction"]

#: Values of a layer's ``direction``: messages along the edges only, or along and against them.
DIRECTIONS = ("forward", "both")
#: Deprecated alias of :data:`DIRECTIONS` (the option was called ``flow``).
FLOWS = DIRECTIONS


def resolve_direction(owner: str, direction: str | None, flow: str | None) -> str:
    """The message ``direction`` of ``owner``, accepting the deprecated ``flow=`` spelling.

    ``flow`` was this option's name before it was renamed: PyG's ``MessagePassing`` uses
    ``flow`` for another thing (``"source_to_target"`` / ``"target_to_source"``).

    Raises:
        GradGraphError: both given, or a value outside :data:`DIRECTIONS` (naming ``owner``).
    """
    if flow is not None:
        if direction is not None:
            raise GradGraphError(f"{owner}: pass direction= only (flow= is its deprecated name)")
        if flow not in DIRECTIONS:
            raise GradGraphError(
                f"{owner}: flow={flow!r} is not supported: gradgraph layers take direction= "
                f"(one of {DIRECTIONS}), not PyG's flow ('source_to_target' / 'target_to_source')"
            )
        warnings.warn(
            f"{owner}: flow= is deprecated, use direction={flow!r} (PyG's flow means something else)",
            FutureWarning,
            stacklevel=3,
        )
        direction = flow
    direction = "both" if direction is None else direction
    if direction not in DIRECTIONS:
        raise GradGraphError(f"{owner}: direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def _fuses_its_own_message(cls: type) -> bool:
    """Whether ``cls.message_and_aggregate`` is defined where ``cls.message`` is, or below it:
    a subclass that redefines only :meth:`GradGraphConv.message` must not get the fused kernel
    of the base message."""

    def owner(name: str) -> type:
        return next(klass for klass in cls.__mro__ if name in vars(klass))

    return issubclass(owner("message_and_aggregate"), owner("message"))


class GradGraphConv(MessagePassing):
    r"""Equivariant message passing on node states of GradGraphs; subclass it for your own layer.

    Node states are ``h [N, C]`` (one vector per neuron) or ``h [N, B, C]`` (one vector per
    neuron and component); every operation here acts on the last axis and treats the
    component axis pointwise, so a layer is automatically equivariant to reordering the
    components. The base layer computes

    .. math::
        h'_n = \Theta_{\text{self}} h_n
             + \bigoplus_{j \to n} \gamma_{\rightarrow}(e_{jn}) \odot \Theta_{\rightarrow} h_j
             + \bigoplus_{n \to k} \gamma_{\leftarrow}(e_{nk}) \odot \Theta_{\leftarrow} h_k
             + \Theta_{\text{layer}} \operatorname{mean}_{m \in \ell(n)} h_m
             + \Theta_{\text{graph}} \operatorname{mean}_{m \in G(n)} h_m

    where :math:`\bigoplus` is the aggregation (``aggr``), :math:`\gamma(e)` a learned linear
    gate of the edge features (so the weight value and edge kind modulate messages),
    :math:`\ell(n)` the nodes of ``n``'s layer in its graph and :math:`G(n)` its graph.
    Means over nodes are taken per component when ``h`` has a component axis. With
    ``direction="forward"`` the backward term (messages from ``k`` back to ``n``) is left out.

    Nothing in it depends on node identity, so it is equivariant to every permutation of
    nodes that preserves edges, edge features, layers and graphs — in particular to
    permutations of hidden neurons.

    Messages of per-component states ``[N, B, C]`` go through PyG's fused path,
    :meth:`message_and_aggregate` (one sparse product, no ``[E, B, C]`` tensor); those of
    ``[N, C]`` states through :meth:`message` and the aggregation.

    **Writing your own layer.** Subclass and override :meth:`message` (what one edge sends;
    ``x_j`` is ``[E, C]`` or ``[E, B, C]``, ``gate`` ``[E, C]``) — your layer then always
    gathers and scatters, unless you also override :meth:`message_and_aggregate` —, or
    override :meth:`forward` entirely and call :meth:`propagate_both` for the gather/scatter. Never
    use absolute node indices or positions of hidden neurons: that breaks the symmetry, and
    :func:`gradgraph.testing.assert_equivariant` will tell you so.

    Args:
        in_channels: ``C`` of the input states.
        out_channels: ``C'`` of the output states.
        edge_dim: ``D`` of ``context.edge_features``.
        direction: ``"both"`` (messages along and against every edge) or ``"forward"``.
            (Called ``flow`` before; ``flow=`` still works with a ``FutureWarning``. It is
            not PyG's ``flow``, which this layer does not take.)
        aggr: aggregation over neighbours (``"mean"``, ``"sum"``, ``"max"``, ...).
        edge_messages: ``False`` drops both edge terms (and their parameters), leaving a
            DeepSets-style layer over each graph's neurons.

    Shapes:
        - **input:** ``h [N, C]`` or ``[N, B, C]``, a :class:`GraphContext`
        - **output:** ``[N, C']`` or ``[N, B, C']``
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        edge_dim: int,
        *,
        direction: str | None = None,
        aggr: str = "mean",
        edge_messages: bool = True,
        flow: str | None = None,
        **kwargs: Any,
    ) -> None:
        direction = resolve_direction(type(self).__name__, direction, flow)
        super().__init__(aggr=aggr, node_dim=0, **kwargs)
        # PyG set fuse because message_and_aggregate is implemented; the kernel sums or
        # averages the base message only.
        self.fuse = self.fuse and self.aggr in ("sum", "add", "mean") and _fuses_its_own_message(type(self))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.edge_dim = edge_dim
        self.direction = direction
        self.edge_messages = edge_messages
        self.lin_self = Linear(in_channels, out_channels)
        if edge_messages:
            self.lin_forward = Linear(in_channels, out_channels, bias=False)
            self.gate_forward = Linear(edge_dim, out_channels)
        if edge_messages and direction == "both":
            self.lin_backward = Linear(in_channels, out_channels, bias=False)
            self.gate_backward = Linear(edge_dim, out_channels)
        self.lin_layer = Linear(in_channels, out_channels, bias=False)
        self.lin_graph = Linear(in_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter."""
        super().reset_parameters()
        for module in self.children():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _check(self, h: Tensor, context: GraphContext) -> None:
        if h.dim() not in (2, 3) or h.shape[0] != context.num_nodes or h.shape[-1] != self.in_channels:
            raise GradGraphError(
                f"{type(self).__name__}: node states must have shape [N, C] or [N, B, C] with "
                f"N={context.num_nodes}, C={self.in_channels}; got {list(h.shape)}"
            )
        if context.edge_features.shape[-1] != self.edge_dim:
            raise GradGraphError(
                f"{type(self).__name__}: edge features have {context.edge_features.shape[-1]} channels, "
                f"the layer was built for edge_dim={self.edge_dim}"
            )

    def propagate_both(self, h: Tensor, context: GraphContext) -> Tensor:
        """The two edge terms of the equation: forward messages plus (with ``direction="both"``) backward ones."""
        if not self.edge_messages:
            return torch.zeros((*h.shape[:-1], self.out_channels), dtype=h.dtype, device=h.device)
        out = self._propagate_direction("forward", self.lin_forward(h), self.gate_forward(context.edge_features), context)
        if self.direction == "both":
            out = out + self._propagate_direction(
                "backward", self.lin_backward(h), self.gate_backward(context.edge_features), context
            )
        return out

    def uses_fused_aggregation(self, x: Tensor) -> bool:
        """Whether :meth:`propagate` runs :meth:`message_and_aggregate` (PyG's fused path) for ``x``.

        PyG fuses a layer that implements ``message_and_aggregate`` (its ``fuse`` flag) when
        ``propagate`` is given a sparse adjacency; this layer gives it one for per-component
        states ``[N, B, C]``, where gathering would materialise an ``[E, B, C]`` tensor, and
        an ``edge_index`` otherwise. ``fuse`` is off for other aggregations than sum/mean and
        for a subclass that redefines :meth:`message` without redefining
        :meth:`message_and_aggregate` (the fused kernel computes the base message only).
        """
        return bool(self.fuse) and x.dim() == 3

    def _propagate_direction(self, direction: str, x: Tensor, gate: Tensor, context: GraphContext) -> Tensor:
        if self.uses_fused_aggregation(x):
            pattern = context.pattern(direction, x.shape[-1])
            return self.propagate(pattern.adjacency(), x=x, gate=gate, pattern=pattern)
        edge_index = context.edge_index if direction == "forward" else context.edge_index.flip(0)
        # pattern=None: PyG's generated propagate takes every argument of message_and_aggregate.
        return self.propagate(edge_index, x=x, gate=gate, pattern=None, size=(context.num_nodes, context.num_nodes))

    def message(self, x_j: Tensor, gate: Tensor) -> Tensor:
        """What edge ``j -> n`` sends: ``x_j [E, (B,) C']`` gated by ``gate [E, C']``."""
        return x_j * gate.view(gate.shape[0], *([1] * (x_j.dim() - 2)), gate.shape[-1])

    def message_and_aggregate(
        self, adj_t: Tensor, x: Tensor, gate: Tensor, pattern: ChannelBlockPattern | None = None
    ) -> Tensor:
        r""":meth:`message` and the sum/mean aggregation in one sparse product, for ``x [N, B, C']``.

        :math:`\text{out}_{n,i,c} = \bigoplus_{j \to n} \text{gate}_{e,c}\, x_{j,i,c}` computed as
        one CSR product with the channels as diagonal blocks
        (:func:`~gradgraph.nn.sparse.channel_spmm`): no ``[E, B, C']`` message tensor, forward
        or backward. PyG calls it from :meth:`propagate` when given a sparse adjacency.

        Args:
            adj_t: ``[N, N]`` sparse CSR adjacency, rows are the receiving nodes
                (:meth:`ChannelBlockPattern.adjacency` of ``pattern``); PyG dispatches on it.
            x: ``[N, B, C']`` states of the sending nodes.
            gate: ``[E, C']`` per-edge gates, in the edge order of ``context.edge_index``.
            pattern: the channel-block pattern of ``adj_t`` for ``C'`` channels (``None``
                only on the unfused path, where this method is not called).

        Returns:
            ``[N, B, C']``.
        """
        out = channel_spmm(pattern, gate, x)
        if self.aggr == "mean":
            out = out / pattern.row_count.clamp(min=1).to(out.dtype)[:, None, None]
        return out

    def group_means(self, h: Tensor, context: GraphContext) -> Tensor:
        """The per-layer and per-graph mean terms, broadcast back to ``[N, (B,) C']``."""
        layer_mean = scatter(h, context.layer_group, dim=0, dim_size=context.num_layer_groups, reduce="mean")
        graph_mean = scatter(h, context.node_batch, dim=0, dim_size=context.num_graphs, reduce="mean")
        return self.lin_layer(layer_mean)[context.layer_group] + self.lin_graph(graph_mean)[context.node_batch]

    def forward(self, h: Tensor, context: GraphContext) -> Tensor:
        """Apply the layer's equation (see the class docstring) to ``h [N, (B,) C]``."""
        self._check(h, context)
        out = self.lin_self(h) + self.group_means(h, context)
        return out + self.propagate_both(h, context) if self.edge_messages else out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, edge_dim={self.edge_dim}, "
            f"direction={self.direction!r}, aggr={self.aggr!r}, edge_messages={self.edge_messages})"
        )
