"""GradMetaNet's wiring by value: each layer and the model's forward pass against a hand
computation in float64 (loops over nodes and edges, no call of the code under test for the
part being checked).

Written for the mutation run of the ``nn-wiring`` group (``./gg mutate nn-wiring``, see
docs/mutation.md): each docstring names the mutants it was checked to kill, with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/nn-wiring/mutants/``.
"""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import gradgraph
from gradgraph.nn import ComponentConv, GradMetaNet, GraphContext, NodeConv
from nn_values import linear, mlp_graph, randomize, two_graphs


def hand_layer(layer, h: torch.Tensor, graph: Batch, edge_features: torch.Tensor, components: bool) -> torch.Tensor:
    """The equation of :class:`ComponentConv` (``components``) or :class:`NodeConv`, node by
    node: self term, (set and all-mean terms), layer and graph means over the node's own graph
    and layer, and the mean of the gated messages over its in-edges and over its out-edges."""
    src, dst = graph.edge_index
    batch = graph.batch
    out = torch.zeros(*h.shape[:-1], layer.out_channels, dtype=h.dtype)
    for n in range(h.shape[0]):
        same_graph = (batch == batch[n]).nonzero().flatten()
        same_layer = ((batch == batch[n]) & (graph.layer == graph.layer[n])).nonzero().flatten()
        term = linear(layer.lin_self, h[n])
        term = term + linear(layer.lin_layer, h[same_layer].mean(0)) + linear(layer.lin_graph, h[same_graph].mean(0))
        if components:
            term = term + linear(layer.lin_set, h[n].mean(0, keepdim=True))
            term = term + linear(layer.lin_all, h[same_graph].mean(dim=(0, 1)))
        if layer.edge_messages:
            incoming = (dst == n).nonzero().flatten().tolist()
            if incoming:
                term = term + torch.stack(
                    [linear(layer.lin_forward, h[src[e]]) * linear(layer.gate_forward, edge_features[e]) for e in incoming]
                ).mean(0)
            outgoing = (src == n).nonzero().flatten().tolist()
            if outgoing and layer.direction == "both":
                term = term + torch.stack(
                    [linear(layer.lin_backward, h[dst[e]]) * linear(layer.gate_backward, edge_features[e]) for e in outgoing]
                ).mean(0)
        out[n] = term
    return out


@pytest.mark.parametrize("edge_messages", [True, False])
@pytest.mark.parametrize("direction", ["both", "forward"])
def test_component_conv_equals_its_equation_node_by_node(direction, edge_messages):
    """:class:`ComponentConv` on a Batch of two graphs of different shapes is its documented
    equation, every term computed by hand: per-neuron set mean over the components, per-graph
    mean over neurons and components (the all-mean term), per-(graph, layer) and per-graph
    means, and the averaged gated messages along and against the edges.

    Checked to kill ``ComponentConv.forward`` mutants that drop or re-route a term and
    ``group_means_of_set`` mutants (the all-mean taken over the wrong axis, without
    ``dim_size``, or as a sum; see docs/mutation.md for the list)."""
    graph = two_graphs()
    layer = randomize(ComponentConv(3, 4, 2, direction=direction, edge_messages=edge_messages).double(), 3)
    generator = torch.Generator().manual_seed(4)
    h = torch.randn(graph.num_nodes, graph.num_components, 3, generator=generator, dtype=torch.float64)
    edge_features = torch.randn(graph.edge_index.shape[1], 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        got = layer(h, GraphContext.from_graph(graph, edge_features))
        expected = hand_layer(layer, h, graph, edge_features, components=True)
    assert got.shape == (graph.num_nodes, graph.num_components, 4)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("direction", ["both", "forward"])
def test_node_conv_equals_its_equation_node_by_node(direction):
    """:class:`NodeConv` on ``[N, C]`` states of a Batch is its documented equation (no set
    terms), every term by hand; and it refuses per-component states with its own message.

    Checked to kill ``NodeConv.forward``'s mutants of its shape check (the whole layer
    is the base class's, covered by the nn-conv group)."""
    graph = two_graphs()
    layer = randomize(NodeConv(3, 4, 2, direction=direction).double(), 5)
    generator = torch.Generator().manual_seed(6)
    h = torch.randn(graph.num_nodes, 3, generator=generator, dtype=torch.float64)
    edge_features = torch.randn(graph.edge_index.shape[1], 2, generator=generator, dtype=torch.float64)
    context = GraphContext.from_graph(graph, edge_features)
    with torch.no_grad():
        got = layer(h, context)
        expected = hand_layer(layer, h, graph, edge_features, components=False)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(gradgraph.GradGraphError, match=r"^NodeConv: node states must have shape \[N, C\]; got "
                       r"\[\d+, 4, 3\] \(use ComponentConv for per-component states \[N, B, C\]\)$"):
        layer(h[:, None, :].expand(-1, 4, -1), context)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@pytest.mark.parametrize("num_component_layers", [2, 0])
def test_gradmetanet_forward_is_its_documented_composition(num_component_layers):
    """:meth:`GradMetaNet.forward` is the composition its docstring states, stage by stage
    with the model's own encoders, layers and heads but the wiring written out here:
    ``z = encode_factors + node_to_component(x_emb)``; ``z += silu(layer(z))`` per component
    layer; ``h = x_emb + pool_projection([mean_i z, std_i z])``; ``h += silu(layer(h))``
    per node layer; decoder on ``(h, z)``; readout on ``h``.

    Checked to kill the ``GradMetaNet.forward`` / ``encode_components`` mutants that cut a
    residual, drop the node embedding from ``z``, pool the wrong states or hand the decoder
    the wrong ones."""
    graph = two_graphs()
    torch.manual_seed(7)
    model = randomize(GradMetaNet(5, num_component_layers=num_component_layers, num_node_layers=2,
                                  graph_out_channels=2).double(), 8)
    with torch.no_grad():
        got = model(graph)
        context = GraphContext.from_graph(graph, model.encode_edges(graph))
        x_emb = model.encode_nodes(graph)
        h, z = x_emb, None
        if num_component_layers:
            z = model.encode_factors(graph) + linear(model.node_to_component, x_emb)[:, None, :]
            for layer in model.component_layers:
                z = z + silu(layer(z, context))
            mean = z.mean(dim=1)
            std = ((z - z.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).add(1e-8).sqrt()
            h = x_emb + linear(model.pool_projection, torch.cat([mean, std], dim=-1))
        for layer in model.node_layers:
            h = h + silu(layer(h, context))
        expected = model.outputs(graph, context, model.decoder(h, context, z), h, z)
    for name in ("edge", "node", "graph"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-12, rtol=1e-12)
    assert got.component is None


def test_gradmetanet_defaults_are_the_documented_ones():
    """``GradMetaNet()`` is built as its signature documents: hidden and component width 32,
    two component layers and two node layers of ``direction="both"`` and ``aggr="mean"``,
    pooled by mean and std into a ``2 * 32 -> 32`` projection, a decoder with 16 product
    channels, one edge and one node output, no graph or component output, component edge
    messages on, positional tables of 64 layers and 256 positions.

    Checked to kill the ``GradMetaNet.__init__`` mutants that change a default argument or
    pass another value on to a layer (see docs/mutation.md)."""
    model = GradMetaNet()
    assert (model.hidden_channels, model.component_channels) == (32, 32)
    assert (model.num_component_layers, model.num_node_layers, model.product_channels) == (2, 2, 16)
    assert model.direction == "both" and model.component_edge_messages is True
    assert (model.edge_out_channels, model.node_out_channels) == (1, 1)
    assert model.readout is None and model.component_readout is None
    assert (model.node_encoder.in_channels, model.edge_encoder.in_channels, model.component_in_channels) == (1, 1, 0)
    assert (model.factor_encoder.in_channels, model.factor_encoder.out_channels) == (2, 32)
    assert (model.positional_encoding.max_layers, model.positional_encoding.max_positions) == (64, 256)
    assert model.pool.aggregations == ("mean", "std")
    assert (model.pool_projection.in_channels, model.pool_projection.out_channels) == (64, 32)
    assert model.pool_projection.bias is not None and model.node_to_component.bias is None
    assert isinstance(model.activation, torch.nn.SiLU)
    for layer in [*model.component_layers, *model.node_layers]:
        assert (layer.in_channels, layer.out_channels, layer.edge_dim) == (32, 32, 32)
        assert layer.direction == "both" and layer.aggr == "mean" and layer.edge_messages
    assert all(isinstance(layer, ComponentConv) for layer in model.component_layers)
    assert all(isinstance(layer, NodeConv) for layer in model.node_layers)
    assert len(model.component_layers) == 2 and len(model.node_layers) == 2
    assert model.decoder.product_channels == 16
    assert model.decoder.out_channels == 1 and model.decoder.component_channels == 32


def test_gradmetanet_passes_its_options_to_every_layer():
    """Non-default options reach the layers they name: ``component_channels`` the component
    layers and the pool projection, ``direction="forward"`` and ``aggr="sum"`` every message
    layer, ``component_edge_messages=False`` only the component layers, ``product_channels`` the
    decoder, the output widths the heads, the table sizes the positional encoding.

    Checked to kill the ``GradMetaNet.__init__`` mutants that pass a fixed or wrong value on."""
    model = GradMetaNet(6, component_channels=4, num_component_layers=3, num_node_layers=1, direction="forward",
                        aggr="sum", pool_aggregations=("max", "sum", "mean"), product_channels=5,
                        component_edge_messages=False, edge_out_channels=2, node_out_channels=3,
                        graph_out_channels=2, component_out_channels=1, max_layers=7, max_positions=9)
    assert (model.hidden_channels, model.component_channels, model.product_channels) == (6, 4, 5)
    assert model.direction == "forward" and model.component_edge_messages is False
    assert len(model.component_layers) == 3 and len(model.node_layers) == 1
    for layer in model.component_layers:
        assert (layer.in_channels, layer.out_channels, layer.edge_dim) == (4, 4, 6)
        assert layer.direction == "forward" and layer.aggr == "sum" and not layer.edge_messages
    for layer in model.node_layers:
        assert (layer.in_channels, layer.out_channels, layer.edge_dim) == (6, 6, 6)
        assert layer.direction == "forward" and layer.aggr == "sum" and layer.edge_messages
    assert model.pool.aggregations == ("max", "sum", "mean")
    assert (model.pool_projection.in_channels, model.pool_projection.out_channels) == (12, 6)
    assert (model.node_to_component.in_channels, model.node_to_component.out_channels) == (6, 4)
    assert model.decoder.product_channels == 5 and model.decoder.out_channels == 3
    assert model.decoder.component_channels == 4 and model.decoder.in_channels == model.decoder.edge_dim == 6
    assert (model.edge_out_channels, model.node_out_channels) == (2, 3)
    assert (model.readout.in_channels, model.readout.out_channels) == (6, 2)
    assert (model.component_readout.in_channels, model.component_readout.out_channels) == (4, 1)
    assert model.component_readout.density is None
    assert (model.positional_encoding.max_layers, model.positional_encoding.max_positions) == (7, 9)
    assert model.positional_encoding.channels == model.node_encoder.out_channels == 6
    assert model.config == gradgraph.nn.GradMetaNetConfig(6, component_channels=4, num_component_layers=3,
                                                         num_node_layers=1, product_channels=5,
                                                         component_edge_messages=False)


def test_invariant_readout_gives_one_row_per_graph_counted_not_inferred():
    """``num_graphs`` is the number of output rows even where the last graphs own no node (a
    caller's graph count, e.g. a Batch whose last graph has had its nodes masked away): their
    rows are the MLP of zero pools, and the other rows are unchanged.

    Checked to kill ``InvariantReadout.forward`` 20, 23, 26, 29 (``num_graphs`` dropped from, or
    ``None`` in, ``global_mean_pool`` / ``global_max_pool``: the row count then comes from
    ``batch.max() + 1``)."""
    from gradgraph.nn import InvariantReadout

    readout = randomize(InvariantReadout(3, 2, hidden_channels=4).double(), 9)
    h = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    batch = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        got = readout(h, batch, 4)
        expected = torch.stack([
            readout.mlp(torch.cat([h[batch == g].mean(0), h[batch == g].max(0).values])[None])[0] for g in range(2)
        ] + [readout.mlp(torch.zeros(1, 6, dtype=torch.float64))[0]] * 2)
    assert got.shape == (4, 2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_gradmetanet_names_itself_in_direction_errors_and_warnings():
    """A bad ``direction`` and the deprecated ``flow=`` are reported as GradMetaNet's, in full.

    Checked to kill ``GradMetaNet.__init__`` 19 and 25 (the owner passed to
    ``resolve_direction`` as ``None`` / ``"XXGradMetaNetXX"``)."""
    import re
    import warnings

    message = "GradMetaNet: direction must be one of ('forward', 'both'), got 'sideways'"
    with pytest.raises(gradgraph.GradGraphError, match=f"^{re.escape(message)}$"):
        GradMetaNet(4, direction="sideways")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GradMetaNet(4, flow="forward")
    assert model.direction == "forward"
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        "GradMetaNet: flow= is deprecated, use direction='forward' (PyG's flow means something else)"
    ]


@pytest.mark.parametrize("position", range(6))
def test_gradmetanet_refuses_each_negative_count_or_width_naming_all_six(position):
    """Each of ``num_component_layers, num_node_layers, edge_out_channels, node_out_channels,
    graph_out_channels, component_out_channels`` set to -1 alone is refused, and the message
    names GradMetaNet and lists the six values in that order.

    Checked to kill ``GradMetaNet.__init__`` 28-39 (the owner or one of the widths left out
    of ``check_output_widths``)."""
    import re

    names = ["num_component_layers", "num_node_layers", "edge_out_channels", "node_out_channels",
             "graph_out_channels", "component_out_channels"]
    values = [1, 1, 1, 1, 1, 1]
    values[position] = -1
    message = f"GradMetaNet: layer counts and output widths must be >= 0, got {tuple(values)}"
    with pytest.raises(gradgraph.GradGraphError, match=f"^{re.escape(message)}$"):
        GradMetaNet(4, **dict(zip(names, values)))


@pytest.mark.parametrize("direction", ["both", "forward"])
def test_component_conv_has_one_bias_as_its_equation(direction):
    """The set and all-mean maps of :class:`ComponentConv` are bias-free, as in its equation
    (one bias, :math:`\\Theta_{\\text{self}}`'s, plus the gates'): a bias there would only
    duplicate ``lin_self``'s. And GradMetaNet's component layers built with
    ``component_edge_messages=False`` carry ``edge_messages=False`` itself (their repr says so).

    Checked to kill ``ComponentConv.__init__`` 14, 15, 22, 23 (``bias=True`` or the default
    for ``lin_set`` / ``lin_all``) and ``GradMetaNet.__init__`` 86 (``edge_messages=None``)."""
    layer = ComponentConv(3, 4, 2, direction=direction)
    biases = {name for name, _ in layer.named_parameters() if name.endswith("bias")}
    gates = {"gate_forward.bias", "gate_backward.bias"} if direction == "both" else {"gate_forward.bias"}
    assert biases == {"lin_self.bias"} | gates
    model = GradMetaNet(4, num_component_layers=1, component_edge_messages=False)
    assert model.component_layers[0].edge_messages is False
    assert repr(model.component_layers[0]).endswith("edge_messages=False)")


@pytest.mark.parametrize("density_heads", [0, 2])
def test_the_component_readout_mlp_is_as_wide_as_documented(density_heads):
    """``build_heads``: with density heads the component readout's MLP is ``hidden_channels`` wide (GradMetaNet
    passes its node width as ``density_readout_hidden``), without them ``component_channels`` wide (the
    readout's default); the MLP reads the three pooled moments and the density's embedding. Kills
    ``GradMetaNet.__init__`` 149 (``None`` passed: the width falls back to ``component_channels``)."""
    from gradgraph.nn import GradMetaNet

    model = GradMetaNet(hidden_channels=12, component_channels=5, component_out_channels=3,
                        component_density_heads=density_heads, edge_out_channels=0, node_out_channels=0)
    linears = list(model.component_readout.mlp.lins)  # PyG's MLP: its Linear layers in order
    density = model.component_readout.density
    assert linears[0].in_channels == 3 * 5 + (density.out_channels if density_heads else 0)
    assert linears[0].out_channels == (12 if density_heads else 5) == linears[1].in_channels
    assert linears[-1].out_channels == 3
