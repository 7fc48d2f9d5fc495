"""`GradMetaNet`: the full model, built from the layers of :mod:`gradgraph.nn`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.component_conv import ComponentConv
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import GradGraphConv, resolve_direction
from gradgraph.nn.decoder import EdgeProductDecoder
from gradgraph.nn.linear import Linear
from gradgraph.nn.metanet import GradMetaNetConfig, MetaNetwork, component_inputs
from gradgraph.nn.node_conv import NodeConv
from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.nn.pool import ComponentPool

__all__ = ["GradMetaNet", "LayerFactory", "component_inputs", "outputs_to_parameters"]

#: ``factory(in_channels, out_channels, edge_dim, direction=..., aggr=...) -> GradGraphConv``;
#: a :class:`GradGraphConv` subclass is such a factory.
LayerFactory = Callable[..., GradGraphConv]


class GradMetaNet(MetaNetwork):
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
    feature).

    **Graph-level tasks**: :meth:`for_graph_prediction` builds no per-weight decoder (the
    constructor's defaults do: ``edge_out_channels = node_out_channels = 1``).
    **Input widths** are explicit (``x [N, 1]``, ``edge_attr [E, 1]``, no ``component_x``, as
    :func:`~gradgraph.to_graph` makes them); a graph with other widths gets a
    :class:`~gradgraph.GradGraphError` naming the option to pass, and so does a graph of
    another floating dtype than the model's. ``-1`` infers a width at the first call (then
    run one example through the model before counting or handing out its parameters).

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
        direction: ``"both"`` (messages along and against each edge) or ``"forward"``
            (``flow=`` is its deprecated name).
        aggr: neighbour aggregation of the message layers; the default ``"mean"`` averages a
            neuron's messages along its in-edges and, with ``direction="both"``, separately
            those along its out-edges (so a neuron's scale does not grow with its fan-in).
        pool_aggregations: aggregations of :class:`ComponentPool`.
        product_channels: ``P`` of the decoder's component-wise product.
        component_edge_messages: ``False`` builds the component layers with
            ``edge_messages=False`` (the paper's :math:`L_{\Gamma_b}`, cost :math:`O(N B C_z)`).
        component_layer, node_layer: layer factories (any :class:`GradGraphConv` subclass);
            pass your own layer class to build a GradMetaNet from it.
        node_in_channels, edge_in_channels: columns of ``x`` and ``edge_attr`` (``-1``: inferred
            at the first call).
        component_in_channels: ``F`` of the graphs' ``component_x [N, B, F]`` (0: none; ``-1``:
            inferred at the first call).
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
        direction: str | None = None,
        aggr: str = "mean",
        pool_aggregations: Sequence[str] = ("mean", "std"),
        product_channels: int = 16,
        component_edge_messages: bool = True,
        component_layer: LayerFactory = ComponentConv,
        node_layer: LayerFactory = NodeConv,
        node_in_channels: int = 1,
        edge_in_channels: int = 1,
        component_in_channels: int = 0,
        max_layers: int = 64,
        max_positions: int = 256,
        flow: str | None = None,
    ) -> None:
        super().__init__()
        direction = resolve_direction("GradMetaNet", direction, flow)
        self.check_output_widths("GradMetaNet", num_component_layers, num_node_layers, edge_out_channels,
                                 node_out_channels, graph_out_channels, component_out_channels)
        if component_out_channels and not num_component_layers:
            raise GradGraphError("GradMetaNet: component outputs need num_component_layers >= 1")
        self.hidden_channels = hidden_channels
        self.component_channels = component_channels or hidden_channels
        self.num_component_layers = num_component_layers
        self.num_node_layers = num_node_layers
        self.product_channels = product_channels
        self.component_edge_messages = component_edge_messages
        self.direction = direction
        channels, component_channels = hidden_channels, self.component_channels
        self.build_encoders(
            channels,
            node_in_channels=node_in_channels,
            edge_in_channels=edge_in_channels,
            component_in_channels=component_in_channels,
            max_layers=max_layers,
            max_positions=max_positions,
        )
        self.activation = nn.SiLU()
        self.component_layers = nn.ModuleList()
        if num_component_layers:
            self.build_factor_encoder(component_channels)
            self.node_to_component = Linear(channels, component_channels, bias=False)
            if not component_edge_messages:  # passed only when off: custom factories need not take it
                component_layer = partial(component_layer, edge_messages=False)
            self.component_layers.extend(
                component_layer(component_channels, component_channels, channels, direction=direction, aggr=aggr)
                for _ in range(num_component_layers)
            )
            self.pool = ComponentPool(pool_aggregations)
            self.pool_projection = Linear(len(self.pool.aggregations) * component_channels, channels)
        self.node_layers = nn.ModuleList(
            node_layer(channels, channels, channels, direction=direction, aggr=aggr) for _ in range(num_node_layers)
        )
        decoder = None
        if edge_out_channels or node_out_channels:
            decoder = EdgeProductDecoder(
                channels,
                channels,
                max(edge_out_channels, node_out_channels),
                component_channels=component_channels if num_component_layers else None,
                product_channels=product_channels,
            )
        self.build_heads(
            decoder,
            edge_out_channels=edge_out_channels,
            node_out_channels=node_out_channels,
            graph_channels=channels,
            graph_out_channels=graph_out_channels,
            component_channels=component_channels,
            component_out_channels=component_out_channels,
            density_readout_hidden=hidden_channels,
            component_density_heads=component_density_heads,
        )

    @classmethod
    def from_config(cls, config: GradMetaNetConfig, **options: Any) -> GradMetaNet:
        """The model of ``config``'s sizes; ``options`` are the other constructor arguments
        (output widths, input widths, layer factories, ...).

        Example: ``GradMetaNet.from_config(GradMetaNetConfig(16, num_node_layers=1), graph_out_channels=1)``.
        """
        return cls(
            config.hidden_channels,
            component_channels=config.component_channels,
            num_component_layers=config.num_component_layers,
            num_node_layers=config.num_node_layers,
            product_channels=config.product_channels,
            component_edge_messages=config.component_edge_messages,
            **options,
        )

    @property
    def config(self) -> GradMetaNetConfig:
        """This model's sizes as a :class:`GradMetaNetConfig`."""
        return GradMetaNetConfig(
            hidden_channels=self.hidden_channels,
            component_channels=self.component_channels,
            num_component_layers=self.num_component_layers,
            num_node_layers=self.num_node_layers,
            product_channels=self.product_channels,
            component_edge_messages=self.component_edge_messages,
        )

    def encode_components(self, graph: GradGraph, node_embedding: Tensor) -> Tensor:
        """``z [N, B, C_z]`` from the rank-1 factors (and ``component_x``) and the node embedding."""
        return self.encode_factors(graph) + self.node_to_component(node_embedding)[:, None, :]

    def forward(self, graph: GradGraph | Batch) -> GradMetaNetOutput:
        """Run the model on a graph or a batch; see the class docstring for the stages."""
        self.check_inputs(graph)
        context = GraphContext.from_graph(graph, self.encode_edges(graph))
        node_embedding = self.encode_nodes(graph)
        h = node_embedding
        z = None
        if self.num_component_layers:
            z = self.encode_components(graph, node_embedding)
            for layer in self.component_layers:
                z = z + self.activation(layer(z, context))
            h = h + self.pool_projection(self.pool(z))
        for layer in self.node_layers:
            h = h + self.activation(layer(h, context))
        decoded = self.decoder(h, context, z) if self.decoder is not None else None
        return self.outputs(graph, context, decoded, h, z)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(hidden={self.hidden_channels}, component={self.component_channels}, "
            f"component_layers={self.num_component_layers}, node_layers={self.num_node_layers}, "
            f"direction={self.direction!r}, {self.outputs_repr()})"
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
