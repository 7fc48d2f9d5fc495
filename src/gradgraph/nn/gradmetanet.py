"""`GradMetaNet`: the full model, built from the layers of :mod:`gradgraph.nn`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import Linear

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.component_conv import ComponentConv
from gradgraph.nn.component_readout import ComponentReadout
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import FLOWS, GradGraphConv
from gradgraph.nn.decoder import EdgeProductDecoder
from gradgraph.nn.edge_encoding import EdgeKindEncoding
from gradgraph.nn.encoding import PositionalEncoding
from gradgraph.nn.node_conv import NodeConv
from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.nn.pool import ComponentPool
from gradgraph.nn.readout import InvariantReadout
from gradgraph.nn.dtype_check import check_graph_dtype

__all__ = ["GradMetaNet", "LayerFactory", "outputs_to_parameters"]

#: ``factory(in_channels, out_channels, edge_dim, flow=..., aggr=...) -> GradGraphConv``;
#: a :class:`GradGraphConv` subclass is such a factory.
LayerFactory = Callable[..., GradGraphConv]


def component_inputs(graph: GradGraph | Batch, model: str) -> Tensor:
    """``[N, B, 2 + F]``: ``act`` and ``grad`` of every neuron and component, then ``component_x``.

    Raises:
        GradGraphError: naming ``model`` if ``act``/``grad`` are not both ``[N, B]`` or
            ``component_x`` is not ``[N, B, F]``.
    """
    if graph.act.shape != graph.grad.shape or graph.act.dim() != 2:
        raise GradGraphError(
            f"{model}: act and grad must both be [N, B]; got {list(graph.act.shape)} and {list(graph.grad.shape)}"
        )
    factors = torch.stack([graph.act, graph.grad], dim=-1)
    extra = getattr(graph, "component_x", None)
    if extra is not None:
        if extra.dim() != 3 or extra.shape[:2] != graph.act.shape:
            raise GradGraphError(
                f"{model}: component_x must have shape [N, B, F] = [{graph.act.shape[0]}, "
                f"{graph.act.shape[1]}, F]; got {list(extra.shape)}"
            )
        factors = torch.cat([factors, extra.to(factors.dtype)], dim=-1)
    return factors


class GradMetaNet(nn.Module):
    r"""GradMetaNet (Gelberg et al., NeurIPS 2025) on GradGraphs.

    .. math::
        \Phi = (\text{decoder}, \text{readout}) \circ (\sigma \circ L_{\text{node}})^{\times M}
               \circ L_{\text{Pool}} \circ (\sigma \circ L_{\text{comp}})^{\times K} \circ \text{encode}

    1. **encode**: per neuron :math:`n` and component :math:`i`,
       :math:`z_{n,i} = \Theta_a [\mathrm{act}_{n,i}, \mathrm{grad}_{n,i} \Vert c_{n,i}] + \Theta_x [x_n \Vert p_n]`
       with :math:`p_n` the :class:`PositionalEncoding` and :math:`c` the graph's optional
       ``component_x [N, B, F]`` (extra per-component features); edge features
       :math:`e = \Theta_e\, \mathrm{edge\_attr} + q_e` with :math:`q_e` the
       :class:`EdgeKindEncoding`. (Kinds enter through :math:`p` and :math:`q`; ``x`` and
       ``edge_attr`` carry values: bias and weight, plus whatever a task appends.)
    2. ``num_component_layers`` residual :class:`ComponentConv` layers on ``z [N, B, C_z]``.
    3. :class:`ComponentPool` over components, projected to ``C`` and added to the node
       embedding: ``h [N, C]``.
    4. ``num_node_layers`` residual :class:`NodeConv` layers on ``h``.
    5. :class:`EdgeProductDecoder` (one output per weight and per bias, using ``h`` and
       the last ``z``), :class:`InvariantReadout` (one output per graph) and
       :class:`ComponentReadout` (one output per graph and component, from the last ``z``).

    Every stage is equivariant to hidden-neuron permutations and invariant to the order of
    the components, so per-edge/per-node outputs move with the neurons and graph outputs do
    not move (:func:`gradgraph.testing.assert_equivariant` checks it). With
    ``num_component_layers=0`` the model never reads ``act``/``grad``: a plain graph
    metanetwork on whatever ``x``/``edge_attr`` carry (e.g. a mean gradient appended as a
    feature). Input widths of ``x`` and ``edge_attr`` are inferred on the first call.

    Args:
        hidden_channels: ``C``, width of node states.
        component_channels: ``C_z``, width of per-component states (default ``C``). Cost
            grows as :math:`(N+E) \cdot B \cdot C_z`, so keep it modest for large ``B``.
        num_component_layers: ``K`` (0 skips the component stage).
        num_node_layers: ``M``.
        edge_out_channels, node_out_channels, graph_out_channels, component_out_channels:
            output widths; 0 drops that output (it is returned as ``None``). Component
            outputs need ``num_component_layers >= 1``.
        component_density_heads: heads of the :class:`ComponentDensity` inside the
            component readout (0: none): lets component outputs depend on how crowded each
            component is among its graph's components, not only on set means.
        flow: ``"both"`` (messages along and against each edge) or ``"forward"``.
        aggr: neighbour aggregation of the message layers.
        pool_aggregations: aggregations of :class:`ComponentPool`.
        product_channels: ``P`` of the decoder's component-wise product.
        component_layer, node_layer: layer factories (any :class:`GradGraphConv` subclass);
            pass your own layer class to build a GradMetaNet from it.
        max_layers, max_positions: sizes of the positional-encoding tables.

    Shapes:
        - **input:** a :class:`~gradgraph.GradGraph` or a ``Batch`` of them (shared ``B``)
        - **output:** :class:`GradMetaNetOutput` with ``edge [E, k_e]``, ``node [N, k_n]``,
          ``graph [G, k_g]``, ``component [G, B, k_c]``
    """

    def __init__(
        self,
        hidden_channels: int = 32,
        *,
        component_channels: int | None = None,
        num_component_layers: int = 2,
        num_node_layers: int = 2,
        edge_out_channels: int = 1,
        node_out_channels: int = 1,
        graph_out_channels: int = 0,
        component_out_channels: int = 0,
        component_density_heads: int = 0,
        flow: str = "both",
        aggr: str = "mean",
        pool_aggregations: Sequence[str] = ("mean", "std"),
        product_channels: int = 16,
        component_layer: LayerFactory = ComponentConv,
        node_layer: LayerFactory = NodeConv,
        max_layers: int = 64,
        max_positions: int = 256,
    ) -> None:
        super().__init__()
        if flow not in FLOWS:
            raise GradGraphError(f"GradMetaNet: flow must be one of {FLOWS}, got {flow!r}")
        sizes = (num_component_layers, num_node_layers, edge_out_channels, node_out_channels)
        if min(*sizes, graph_out_channels, component_out_channels) < 0:
            raise GradGraphError("GradMetaNet: layer counts and output widths must be >= 0")
        if component_out_channels and not num_component_layers:
            raise GradGraphError("GradMetaNet: component outputs need num_component_layers >= 1")
        self.hidden_channels = hidden_channels
        self.component_channels = component_channels or hidden_channels
        self.num_component_layers = num_component_layers
        self.num_node_layers = num_node_layers
        self.flow = flow
        channels, component_channels = hidden_channels, self.component_channels
        self.edge_encoder = Linear(-1, channels)
        self.edge_kind_encoding = EdgeKindEncoding(channels)
        self.node_encoder = Linear(-1, channels)
        self.positional_encoding = PositionalEncoding(channels, max_layers=max_layers, max_positions=max_positions)
        self.activation = nn.SiLU()
        self.component_layers = nn.ModuleList()
        if num_component_layers:
            self.factor_encoder = Linear(-1, component_channels)
            self.node_to_component = Linear(channels, component_channels, bias=False)
            self.component_layers.extend(
                component_layer(component_channels, component_channels, channels, flow=flow, aggr=aggr)
                for _ in range(num_component_layers)
            )
            self.pool = ComponentPool(pool_aggregations)
            self.pool_projection = Linear(len(self.pool.aggregations) * component_channels, channels)
        self.node_layers = nn.ModuleList(
            node_layer(channels, channels, channels, flow=flow, aggr=aggr) for _ in range(num_node_layers)
        )
        self.decoder = None
        if edge_out_channels or node_out_channels:
            self.decoder = EdgeProductDecoder(
                channels,
                channels,
                max(edge_out_channels, node_out_channels),
                component_channels=component_channels if num_component_layers else None,
                product_channels=product_channels,
            )
        self.edge_out_channels = edge_out_channels
        self.node_out_channels = node_out_channels
        self.readout = InvariantReadout(channels, graph_out_channels) if graph_out_channels else None
        self.component_readout = (
            ComponentReadout(
                component_channels,
                component_out_channels,
                hidden_channels if component_density_heads else None,
                density_heads=component_density_heads,
            )
            if component_out_channels
            else None
        )

    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def encode_components(self, graph: GradGraph, node_embedding: Tensor) -> Tensor:
        """``z [N, B, C_z]`` from the rank-1 factors (and ``component_x``) and the node embedding."""
        return self.factor_encoder(component_inputs(graph, "GradMetaNet")) \
            + self.node_to_component(node_embedding)[:, None, :]

    def forward(self, graph: GradGraph | Batch) -> GradMetaNetOutput:
        """Run the model on a graph or a batch; see the class docstring for the stages."""
        check_graph_dtype(self, graph)
        edge_features = self.edge_encoder(graph.edge_attr) + self.edge_kind_encoding(graph)
        context = GraphContext.from_graph(graph, edge_features)
        node_embedding = self.node_encoder(graph.x) + self.positional_encoding(graph)
        h = node_embedding
        z = None
        if self.num_component_layers:
            z = self.encode_components(graph, node_embedding)
            for layer in self.component_layers:
                z = z + self.activation(layer(z, context))
            h = h + self.pool_projection(self.pool(z))
        for layer in self.node_layers:
            h = h + self.activation(layer(h, context))
        edge = node = None
        if self.decoder is not None:
            edge, node = self.decoder(h, context, z)
            edge = edge[:, : self.edge_out_channels] if self.edge_out_channels else None
            node = node[:, : self.node_out_channels] if self.node_out_channels else None
        graph_out = self.readout(h, context.node_batch, context.num_graphs) if self.readout is not None else None
        component_out = None
        if self.component_readout is not None:
            fixed = graph.perm_group < 0
            component_out = self.component_readout(z, context.node_batch, context.num_graphs, fixed,
                                                   context.nodes_per_graph())
        return GradMetaNetOutput(edge=edge, node=node, graph=graph_out, component=component_out)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(hidden={self.hidden_channels}, component={self.component_channels}, "
            f"component_layers={self.num_component_layers}, node_layers={self.num_node_layers}, "
            f"flow={self.flow!r}, out=(edge={self.edge_out_channels}, node={self.node_out_channels}, "
            f"graph={self.readout.out_channels if self.readout is not None else 0}, "
            f"component={self.component_readout.out_channels if self.component_readout is not None else 0}))"
        )


def outputs_to_parameters(graph: GradGraph | Batch, output: GradMetaNetOutput) -> list[dict[str, Tensor]]:
    """Write a model's per-edge/per-node outputs back into each source network's weight space.

    Args:
        graph: the GradGraph or Batch the model was run on.
        output: its :class:`GradMetaNetOutput`; ``edge [E, k]`` is required, ``node`` optional.

    Returns:
        One ``{parameter name: Tensor[*shape, k]}`` per graph (``k`` squeezed when 1), as
        :meth:`GradGraph.to_parameters` returns it.
    """
    if output.edge is None:
        raise GradGraphError("outputs_to_parameters: the model has no edge output (edge_out_channels=0)")

    def squeeze(values: Tensor | None) -> Tensor | None:
        return values[:, 0] if values is not None and values.shape[-1] == 1 else values

    if not isinstance(graph, Batch):
        return [graph.to_parameters(squeeze(output.edge), squeeze(output.node))]
    edge_graph = graph.batch[graph.edge_index[0]]
    results = []
    for index, single in enumerate(graph.to_data_list()):
        node_mask = graph.batch == index
        edge_mask = edge_graph == index
        node_values = squeeze(output.node[node_mask]) if output.node is not None else None
        results.append(single.to_parameters(squeeze(output.edge[edge_mask]), node_values))
    return results
