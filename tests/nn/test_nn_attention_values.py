"""GradMetaNet++'s attention layers and model by value: :class:`ComponentAttention`,
:class:`NeuronAttention` and :class:`GradMetaNetPlusPlus` against a hand computation of their
documented equations in float64 (explicit softmax sums over the set, node and edge loops; no
call of the code under test for the part being checked), every message matched in full.

Written for the mutation run of the ``nn-attention`` group (``./gg mutate nn-attention``, see
docs/mutation.md) and in its test list from the group's first full run (run nn 10): a docstring
names the survivors it was checked to kill, with ``MUTANT_UNDER_TEST=NAME`` in
``.mutation/nn-attention/mutants/``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch_geometric.data import Batch

from gradgraph import GradGraphError
from gradgraph.nn import ComponentAttention, GradMetaNetPlusPlus, GraphContext, NeuronAttention
from nn_values import hand_conv, linear, mlp_graph, randomize, two_graphs

DTYPE = torch.float64
EXACT = dict(atol=1e-12, rtol=1e-12)


def hand_attention(layer, states: torch.Tensor) -> torch.Tensor:
    r"""``Θ_O ‖_t Σ_m softmax_m(<Q_t h_n, K_t h_m> / sqrt d) V_t h_m`` over one set ``states [L, C]``,
    by explicit exponentials and sums, head by head."""
    d = layer.head_channels
    query, key, value = (linear(lin, states) for lin in (layer.lin_query, layer.lin_key, layer.lin_value))
    heads = []
    for t in range(layer.heads):
        q, k, v = (x[:, t * d : (t + 1) * d] for x in (query, key, value))
        out = torch.zeros(states.shape[0], d, dtype=states.dtype)
        for n in range(states.shape[0]):
            scores = [float(q[n] @ k[m]) / math.sqrt(d) for m in range(states.shape[0])]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for m, weight in enumerate(weights):
                out[n] += weight / sum(weights) * v[m]
        heads.append(out)
    return linear(layer.lin_out, torch.cat(heads, dim=-1))


def hand_component_attention(layer, h: torch.Tensor, graph, edge_features: torch.Tensor) -> torch.Tensor:
    """:class:`ComponentAttention`'s equation: every neuron's components attend to each other."""
    attention = torch.stack([hand_attention(layer, h[n]) for n in range(h.shape[0])])
    return hand_conv(layer, h, graph, edge_features) + attention


def hand_neuron_attention(layer, h: torch.Tensor, graph, edge_features: torch.Tensor) -> torch.Tensor:
    """:class:`NeuronAttention`'s equation: per graph (and component), the graph's neurons attend to each other."""
    batch = graph.batch if getattr(graph, "batch", None) is not None else torch.zeros(h.shape[0], dtype=torch.long)
    attention = torch.zeros(*h.shape[:-1], layer.out_channels, dtype=h.dtype)
    for g in batch.unique().tolist():
        nodes = (batch == g).nonzero().flatten()
        if h.dim() == 2:
            attention[nodes] = hand_attention(layer, h[nodes])
        else:
            for i in range(h.shape[1]):
                attention[nodes, i] = hand_attention(layer, h[nodes, i])
    return hand_conv(layer, h, graph, edge_features) + attention


def states_and_features(graph, shape_tail, edge_dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(graph.num_nodes, *shape_tail, generator=generator, dtype=DTYPE)
    edge_features = torch.randn(graph.edge_index.shape[1], edge_dim, generator=generator, dtype=DTYPE)
    return h, edge_features


# ----------------------------------------------------------------------------- ComponentAttention
@pytest.mark.parametrize(("direction", "aggr"), [("both", "mean"), ("forward", "mean"), ("both", "sum")])
@pytest.mark.parametrize("edge_messages", [True, False])
def test_component_attention_equals_its_equation_node_by_node(direction, aggr, edge_messages):
    """:class:`ComponentAttention` on a Batch of two graphs of different shapes is its documented
    equation, every term by hand: self term, attention across each neuron's components, the
    per-(graph, layer) and per-graph means, and (``edge_messages``) the averaged gated messages
    along and (``direction="both"``) against the edges."""
    graph = two_graphs(batch=4)
    layer = randomize(ComponentAttention(5, 3, 2, heads=2, head_channels=3, direction=direction, aggr=aggr,
                                         edge_messages=edge_messages).double(), 1)
    h, edge_features = states_and_features(graph, (4, 5), 2, seed=2)
    with torch.no_grad():
        got = layer(h, GraphContext.from_graph(graph, edge_features))
        expected = hand_component_attention(layer, h, graph, edge_features)
    assert got.shape == (graph.num_nodes, 4, 3)
    torch.testing.assert_close(got, expected, **EXACT)


# ----------------------------------------------------------------------------- NeuronAttention
@pytest.mark.parametrize("per_component", [True, False])
@pytest.mark.parametrize("edge_messages", [True, False])
@pytest.mark.parametrize("graphs", ["mixed", "one architecture", "single"])
def test_neuron_attention_equals_its_equation_node_by_node(graphs, edge_messages, per_component):
    """:class:`NeuronAttention` is its documented equation, every term by hand, on the three
    paths of :meth:`NeuronAttention.attend`: graphs of different sizes (padded, keys masked),
    a batch of one architecture (a view, no mask) and a single graph; for per-component
    states ``[N, B, C]`` (each component attends separately) and per-neuron states ``[N, C]``.

    Checked to kill ``NeuronAttention.forward`` 6 (the attention term subtracted), a survivor
    of the stopped run nn 9 (``test_nn_plusplus.py`` checks ``attend`` alone by value)."""
    if graphs == "mixed":
        graph = two_graphs(batch=3)
    elif graphs == "one architecture":
        graph = Batch.from_data_list([mlp_graph(seed, widths=(2, 3, 2), batch=3) for seed in (3, 4, 5)])
    else:
        graph = mlp_graph(6, batch=3)
    layer = randomize(NeuronAttention(4, 3, 2, heads=2, head_channels=2, edge_messages=edge_messages).double(), 7)
    h, edge_features = states_and_features(graph, (3, 4) if per_component else (4,), 2, seed=8)
    context = GraphContext.from_graph(graph, edge_features)
    with torch.no_grad():
        got = layer(h, context)
        expected = hand_neuron_attention(layer, h, graph, edge_features)
    assert got.shape == (*h.shape[:-1], 3)
    torch.testing.assert_close(got, expected, **EXACT)


# ----------------------------------------------------------------------------- GradMetaNetPlusPlus
def hand_model(model: GradMetaNetPlusPlus, graph) -> dict[str, torch.Tensor | None]:
    """The model's stages composed by hand from its own submodules (each checked by value in its
    own group): the encodings, ``num_layers`` residual blocks ``z + silu(L(z))`` (component
    attention, then neuron attention), the decoder's outputs cut to their widths, the invariant
    readout of the component mean and the component readout of ``z``."""
    silu = torch.nn.functional.silu
    edge_features = linear(model.edge_encoder, graph.edge_attr) + model.edge_kind_encoding(graph)
    context = GraphContext.from_graph(graph, edge_features)
    node_embedding = linear(model.node_encoder, graph.x) + model.positional_encoding(graph)
    factors = torch.stack([graph.act, graph.grad], dim=-1)
    z = linear(model.factor_encoder, factors) + node_embedding[:, None, :]
    for k in range(model.num_layers):
        z = z + silu(hand_component_attention(model.component_layers[k], z, graph, edge_features))
        z = z + silu(hand_neuron_attention(model.neuron_layers[k], z, graph, edge_features))
    out: dict[str, torch.Tensor | None] = {"edge": None, "node": None, "graph": None, "component": None}
    if model.decoder is not None:
        edge, node = model.decoder(z, context)
        out["edge"] = edge[:, : model.edge_out_channels] if model.edge_out_channels else None
        out["node"] = node[:, : model.node_out_channels] if model.node_out_channels else None
    if model.readout is not None:
        out["graph"] = model.readout(z.mean(dim=1), graph.batch, graph.num_graphs)
    if model.component_readout is not None:
        out["component"] = model.component_readout(z, graph.batch, graph.num_graphs, graph.perm_group < 0)
    return out


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_layers=1, heads=3, edge_messages=True, direction="forward", aggr="sum", edge_out_channels=2,
             node_out_channels=3, graph_out_channels=2, component_out_channels=2, component_density_heads=1,
             product_channels=5, decoder_reduce="sum"),
        dict(edge_messages=True, edge_out_channels=0, node_out_channels=2, graph_out_channels=1,
             component_out_channels=3),
    ],
    ids=["defaults", "every option", "node head only"],
)
def test_gradmetanet_plusplus_forward_is_its_stages_composed_by_hand(options):
    """Every output of :class:`GradMetaNetPlusPlus` on a Batch of two graphs equals its stages
    composed by hand (see :func:`hand_model`; the attention layers by their equations), and the
    constructor hands each option to the part that reads it: width, heads, direction, ``aggr``
    and ``edge_messages`` to both attention layers of every block, ``product_channels`` and
    ``decoder_reduce`` to the decoder, ``component_density_heads`` to the component readout.

    Checked to kill ``GradMetaNetPlusPlus.encode`` 10 and ``forward`` 8, 15 (a term subtracted
    instead of added), survivors of the stopped run nn 9."""
    graph = two_graphs(batch=3)
    model = randomize(GradMetaNetPlusPlus(6, **options).double(), 9)
    with torch.no_grad():
        got = model(graph)
        expected = hand_model(model, graph)
    for name, value in expected.items():
        if value is None:
            assert getattr(got, name) is None, name
        else:
            torch.testing.assert_close(getattr(got, name), value, **EXACT, msg=name)
    heads = options.get("heads", 2)
    for layer in [*model.component_layers, *model.neuron_layers]:
        assert (layer.in_channels, layer.out_channels, layer.edge_dim, layer.heads, layer.head_channels) == (
            6, 6, 6, heads, max(1, 6 // heads))
        assert layer.direction == options.get("direction", "both")
        assert layer.aggr == options.get("aggr", "mean")
        assert layer.edge_messages == options.get("edge_messages", False)
    assert len(model.component_layers) == len(model.neuron_layers) == options.get("num_layers", 2)
    assert [type(layer) for layer in model.component_layers] == [ComponentAttention] * model.num_layers
    assert [type(layer) for layer in model.neuron_layers] == [NeuronAttention] * model.num_layers
    decoder = model.decoder
    assert (decoder.component_channels, decoder.edge_dim, decoder.out_channels, decoder.product_channels,
            decoder.reduce) == (6, 6, max(options.get("edge_out_channels", 1), options.get("node_out_channels", 1)),
                                options.get("product_channels", 16), options.get("decoder_reduce", "mean"))
    density_heads = options.get("component_density_heads", 0)
    if model.component_readout is not None:
        readout = model.component_readout
        assert (readout.in_channels, readout.out_channels) == (6, options["component_out_channels"])
        assert (readout.density is None) == (density_heads == 0)
        if density_heads:
            assert readout.density.heads == density_heads
    if model.readout is not None:
        assert (model.readout.in_channels, model.readout.out_channels) == (6, options["graph_out_channels"])


# ----------------------------------------------------------------------------- sizes, reprs, messages
def test_head_width_defaults_to_the_documented_split_of_the_input_channels():
    """``head_channels`` defaults to ``max(1, in_channels // heads)``; one head of width one is allowed."""
    assert NeuronAttention(5, 3, 2, heads=2).head_channels == 2
    assert NeuronAttention(7, 3, 2, heads=3).head_channels == 2
    assert ComponentAttention(1, 3, 2, heads=3).head_channels == 1
    layer = ComponentAttention(4, 3, 2, heads=1, head_channels=1)
    assert (layer.heads, layer.head_channels) == (1, 1)
    assert [tuple(lin.weight.shape) for lin in (layer.lin_query, layer.lin_key, layer.lin_value, layer.lin_out)] == [
        (1, 4), (1, 4), (1, 4), (3, 1)]
    assert all(lin.bias is None for lin in (layer.lin_query, layer.lin_key, layer.lin_value, layer.lin_out))
    default = NeuronAttention(6, 3, 2)
    assert (default.heads, default.head_channels, default.direction, default.aggr, default.edge_messages) == (
        2, 3, "both", "mean", True)


def test_reprs_in_full():
    """Whole strings: a changed field name, value or separator fails."""
    assert repr(NeuronAttention(4, 3, 2, heads=2, head_channels=5, direction="forward", edge_messages=False)) == (
        "NeuronAttention(4, 3, edge_dim=2, heads=2, head_channels=5, direction='forward', edge_messages=False)"
    )
    assert repr(ComponentAttention(4, 3, 2)) == (
        "ComponentAttention(4, 3, edge_dim=2, heads=2, head_channels=2, direction='both', edge_messages=True)"
    )
    assert repr(GradMetaNetPlusPlus(6)) == (
        "GradMetaNetPlusPlus(hidden=6, layers=2, heads=2, direction='both', out=(edge=1, node=1, graph=0, component=0))"
    )
    assert repr(GradMetaNetPlusPlus(5, num_layers=1, heads=3, direction="forward", edge_out_channels=0,
                                    graph_out_channels=2, component_out_channels=4)) == (
        "GradMetaNetPlusPlus(hidden=5, layers=1, heads=3, direction='forward', "
        "out=(edge=0, node=1, graph=2, component=4))"
    )


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_messages_in_full_and_boundaries_accepted():
    """Every refusal of the group's code with its whole message; the smallest legal values pass."""
    graph = mlp_graph(0, batch=3)
    context = GraphContext.from_graph(graph, torch.zeros(graph.edge_index.shape[1], 2, dtype=DTYPE))
    for heads, head_channels in ((0, None), (2, 0), (-1, 3)):
        shown = 1 if head_channels is None else head_channels
        with pytest.raises(GradGraphError, match=full(
                f"NeuronAttention: heads and head_channels must be >= 1, got heads={heads}, head_channels={shown}")):
            NeuronAttention(4, 4, 2, heads=heads, head_channels=head_channels)
    with pytest.raises(GradGraphError, match=full(
            "ComponentAttention: heads and head_channels must be >= 1, got heads=2, head_channels=0")):
        ComponentAttention(4, 4, 2, head_channels=0)
    message = ("ComponentAttention: states must have shape [N, B, C] (neuron, component, channel); "
               f"got [{graph.num_nodes}, 4]")
    with pytest.raises(GradGraphError, match=full(message)):
        ComponentAttention(4, 3, 2).double()(torch.zeros(graph.num_nodes, 4, dtype=DTYPE), context)
    unsorted = context._replace(node_batch=torch.tensor([1, 0] + [1] * (graph.num_nodes - 2)), num_graphs=2)
    message = "NeuronAttention: nodes must be sorted by graph (context.node_batch), as in a PyG Batch"
    with pytest.raises(GradGraphError, match=full(message)):
        NeuronAttention(4, 4, 2).double()(torch.zeros(graph.num_nodes, 4, dtype=DTYPE), unsorted)
    with pytest.raises(GradGraphError, match=full("GradMetaNetPlusPlus: hidden_channels must be >= 1, got 0")):
        GradMetaNetPlusPlus(0)
    with pytest.raises(GradGraphError, match=full(
            "GradMetaNetPlusPlus: layer counts and output widths must be >= 0, got (2, 1, -1, 0, 0)")):
        GradMetaNetPlusPlus(4, node_out_channels=-1)
    with pytest.raises(GradGraphError, match=full(
            "GradMetaNetPlusPlus: direction must be one of ('forward', 'both'), got 'sideways'")):
        GradMetaNetPlusPlus(4, direction="sideways")
    tiny = GradMetaNetPlusPlus(1, num_layers=1, heads=1).double()
    assert tiny(graph).edge.shape == (graph.edge_index.shape[1], 1)


def test_two_nodes_out_of_graph_order_are_refused():
    """The smallest unsorted batch, two nodes in graphs ``[1, 0]``, is refused (not padded by a
    ``to_dense_batch`` that assumes sorted nodes), and so is ``[0, 1, 0]`` (out of order after
    node 0); one node, or two in order, pass.

    Checked to kill ``NeuronAttention.attend`` 12 (``batch.numel() > 2``) and 16 (each node
    compared with node 0 only, ``batch[:+1]``)."""
    layer = NeuronAttention(2, 2, 1, heads=1, edge_messages=False).double()

    def context(node_batch: list[int], num_graphs: int) -> GraphContext:
        n = len(node_batch)
        return GraphContext(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 1, dtype=DTYPE),
                            torch.tensor(node_batch), num_graphs, torch.tensor(node_batch), num_graphs)

    h = torch.randn(2, 2, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=full(
            "NeuronAttention: nodes must be sorted by graph (context.node_batch), as in a PyG Batch")):
        layer.attend(h, context([1, 0], 2))
    with pytest.raises(GradGraphError, match=full(  # a later node before its predecessor, not before node 0
            "NeuronAttention: nodes must be sorted by graph (context.node_batch), as in a PyG Batch")):
        layer.attend(torch.cat([h, h[:1]]), context([0, 1, 0], 2))
    assert layer.attend(h, context([0, 1], 2)).shape == (2, 2)
    assert layer.attend(h[:1], context([0], 1)).shape == (1, 2)
    one = context([0, 0, 1], 2)  # sorted, of unequal sizes: padded, masked
    torch.testing.assert_close(layer.attend(torch.cat([h, h[:1]]), one)[2], linear(layer.lin_out, linear(
        layer.lin_value, h[0])), **EXACT)


def test_constructor_defaults_and_the_deprecated_flow():
    """``GradMetaNetPlusPlus()`` is built with the defaults of its signature (a changed default
    changes every checkpoint's shapes): ``C = 16``, 2 blocks of 2 heads, no edge messages,
    positional tables of 64 layers and 256 positions, input widths 1, 1 and 0; ``flow=`` still
    sets the direction, with its FutureWarning.

    Checked to kill ``GradMetaNetPlusPlus.__init__`` 1, 18, 19 (defaults 17, 65, 257) and 23
    (``flow`` not passed on), survivors of run nn 10."""
    model = GradMetaNetPlusPlus()
    assert (model.hidden_channels, model.num_layers, model.heads, model.direction) == (16, 2, 2, "both")
    encoding = model.positional_encoding
    assert (encoding.channels, encoding.max_layers, encoding.max_positions) == (16, 64, 256)
    assert (model.node_in_channels, model.edge_in_channels, model.component_in_channels) == (1, 1, 0)
    assert (model.decoder.product_channels, model.decoder.reduce, model.decoder.out_channels) == (16, "mean", 1)
    assert model.readout is None and model.component_readout is None
    assert all(not layer.edge_messages and layer.aggr == "mean" for layer in model.component_layers)
    with_density = GradMetaNetPlusPlus(4, component_out_channels=1)
    assert with_density.component_readout.density is None
    with pytest.warns(FutureWarning, match=full(
            "GradMetaNetPlusPlus: flow= is deprecated, use direction='forward' (PyG's flow means something else)")):
        old = GradMetaNetPlusPlus(4, flow="forward")
    assert old.direction == "forward" and all(layer.direction == "forward" for layer in old.neuron_layers)
