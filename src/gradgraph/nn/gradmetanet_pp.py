"""`GradMetaNetPlusPlus`: attention across components and neurons, no pooling, a per-component product decoder."""

from __future__ import annotations

from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.component_attention import ComponentAttention
from gradgraph.nn.component_decoder import ComponentProductDecoder
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import resolve_direction
from gradgraph.nn.gradmetanet import LayerFactory
from gradgraph.nn.metanet import MetaNetwork
from gradgraph.nn.neuron_attention import NeuronAttention
from gradgraph.nn.output import GradMetaNetOutput

__all__ = ["GradMetaNetPlusPlus"]


class GradMetaNetPlusPlus(MetaNetwork):
    r"""GradMetaNet++ (Gelberg et al., NeurIPS 2025) on GradGraphs.

    .. math::
        \Phi = (\text{decoder}, \text{readouts}) \circ
               \big(\sigma \circ L_{\text{neurons}} \circ \sigma \circ L_{\text{components}}\big)^{\times K}
               \circ \text{encode}

    1. **encode** (as in :class:`GradMetaNet`): per neuron :math:`n` and component :math:`i`,
       :math:`z_{n,i} = \Theta_a [\mathrm{act}_{n,i}, \mathrm{grad}_{n,i} \Vert c_{n,i}]
       + \Theta_x [x_n \Vert p_n]`, :math:`p` the :class:`PositionalEncoding`; edge features
       :math:`\Theta_e\,\mathrm{edge\_attr} + q_e`, :math:`q` the :class:`EdgeKindEncoding`.
    2. ``num_layers`` blocks, each a residual :class:`ComponentAttention` (every neuron's
       components attend to each other) then a residual :class:`NeuronAttention` (per
       component, every graph's neurons attend to each other): ``z [N, B, C]`` throughout —
       unlike :class:`GradMetaNet` the component axis is never pooled away.
    3. :class:`ComponentProductDecoder` (one output per weight and bias, an MLP per
       component summed over components), :class:`InvariantReadout` on the component mean
       of ``z`` (one output per graph) and :class:`ComponentReadout` (one per graph and
       component).

    Equivariant to hidden-neuron permutations (and to attention-head permutations of a
    transformer source network) and invariant to the order of the components; component
    outputs move with the components (:func:`gradgraph.testing.assert_equivariant`).

    **Cost** per block: :math:`O(N B^2 C)` for the component attention and
    :math:`O(G B N_{\max}^2 C)` for the neuron attention (see the layers), against
    :math:`O(N B C^2)` of a :class:`ComponentConv`; the decoder is :math:`O((E+N) B P)`.
    Keep ``C`` modest when ``B`` or the networks are large.

    Args:
        hidden_channels: ``C``, width of the per-component states.
        num_layers: ``K`` blocks (component attention + neuron attention).
        heads: attention heads of both layers.
        edge_messages: the attention layers also pass per-component messages along the
            network's weights (:class:`GradGraphConv`'s edge terms, cost :math:`O(E B C)`).
        direction, aggr: of those messages; see :class:`GradGraphConv` (``flow=`` is
            ``direction``'s deprecated name).
        edge_out_channels, node_out_channels, graph_out_channels, component_out_channels:
            output widths; 0 drops that output (returned as ``None``).
        component_density_heads: heads of the :class:`ComponentDensity` inside the
            component readout (0: none).
        product_channels: ``P`` of the decoder's per-component MLP.
        decoder_reduce: ``"mean"`` or ``"sum"`` over components in the decoder.
        component_layer, neuron_layer: layer factories
            ``(in_channels, out_channels, edge_dim, direction=..., aggr=..., heads=..., edge_messages=...)``.
        node_in_channels, edge_in_channels, component_in_channels: input widths, as
            :class:`GradMetaNet` (``-1``: inferred at the first call).
        max_layers, max_positions: sizes of the positional-encoding tables.

    Shapes:
        - **input:** a :class:`~gradgraph.GradGraph` or a ``Batch`` of them (shared ``B``)
        - **output:** :class:`GradMetaNetOutput` with ``edge [E, k_e]``, ``node [N, k_n]``,
          ``graph [G, k_g]``, ``component [G, B, k_c]``
    """

    def __init__(
        self,
        hidden_channels: int = 16,
        *,
        num_layers: int = 2,
        heads: int = 2,
        edge_messages: bool = False,
        direction: str | None = None,
        aggr: str = "mean",
        edge_out_channels: int = 1,
        node_out_channels: int = 1,
        graph_out_channels: int = 0,
        component_out_channels: int = 0,
        component_density_heads: int = 0,
        product_channels: int = 16,
        decoder_reduce: str = "mean",
        component_layer: LayerFactory = ComponentAttention,
        neuron_layer: LayerFactory = NeuronAttention,
        node_in_channels: int = 1,
        edge_in_channels: int = 1,
        component_in_channels: int = 0,
        max_layers: int = 64,
        max_positions: int = 256,
        flow: str | None = None,
    ) -> None:
        super().__init__()
        direction = resolve_direction("GradMetaNetPlusPlus", direction, flow)
        if hidden_channels < 1:
            raise GradGraphError(f"GradMetaNetPlusPlus: hidden_channels must be >= 1, got {hidden_channels}")
        self.check_output_widths("GradMetaNetPlusPlus", num_layers, edge_out_channels, node_out_channels,
                                 graph_out_channels, component_out_channels)
        channels = hidden_channels
        self.hidden_channels = channels
        self.num_layers = num_layers
        self.heads = heads
        self.direction = direction
        self.build_encoders(
            channels,
            node_in_channels=node_in_channels,
            edge_in_channels=edge_in_channels,
            component_in_channels=component_in_channels,
            max_layers=max_layers,
            max_positions=max_positions,
        )
        self.build_factor_encoder(channels)
        self.activation = nn.SiLU()
        options = dict(direction=direction, aggr=aggr, heads=heads, edge_messages=edge_messages)
        self.component_layers = nn.ModuleList(
            component_layer(channels, channels, channels, **options) for _ in range(num_layers)
        )
        self.neuron_layers = nn.ModuleList(
            neuron_layer(channels, channels, channels, **options) for _ in range(num_layers)
        )
        decoder = None
        if edge_out_channels or node_out_channels:
            decoder = ComponentProductDecoder(
                channels, channels, max(edge_out_channels, node_out_channels), product_channels, reduce=decoder_reduce
            )
        self.build_heads(
            decoder,
            edge_out_channels=edge_out_channels,
            node_out_channels=node_out_channels,
            graph_channels=channels,
            graph_out_channels=graph_out_channels,
            component_channels=channels,
            component_out_channels=component_out_channels,
            density_readout_hidden=channels,
            component_density_heads=component_density_heads,
        )

    def encode(self, graph: GradGraph | Batch) -> tuple[Tensor, GraphContext]:
        """``z [N, B, C]`` from the factors, ``component_x``, node features and positions; and the context."""
        self.check_inputs(graph)
        context = GraphContext.from_graph(graph, self.encode_edges(graph))
        node_embedding = self.encode_nodes(graph)
        return self.encode_factors(graph) + node_embedding[:, None, :], context

    def forward(self, graph: GradGraph | Batch) -> GradMetaNetOutput:
        """Run the model on a graph or a batch; see the class docstring for the stages."""
        z, context = self.encode(graph)
        for component_layer, neuron_layer in zip(self.component_layers, self.neuron_layers):
            z = z + self.activation(component_layer(z, context))
            z = z + self.activation(neuron_layer(z, context))
        decoded = self.decoder(z, context) if self.decoder is not None else None
        return self.outputs(graph, context, decoded, z.mean(dim=1), z)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(hidden={self.hidden_channels}, layers={self.num_layers}, heads={self.heads}, "
            f"direction={self.direction!r}, {self.outputs_repr()})"
        )
