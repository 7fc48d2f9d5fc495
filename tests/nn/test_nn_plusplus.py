"""GradMetaNet++: exact equivariance of every new layer (neurons, components, heads, mixed batches),
sensitivity of the check, agreement with direct reference computations, the curvature CLI."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_mlp, mlp_specs
from torch import nn
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph_lab.cli import main
from gradgraph.nn import (
    ComponentAttention,
    ComponentProductDecoder,
    GradMetaNet,
    GradMetaNetOutput,
    GradMetaNetPlusPlus,
    GraphContext,
    NeuronAttention,
)
from gradgraph.symmetry import random_transformer_permutation, transformer_node_permutation
from gradgraph.testing import assert_equivariant

TOLERANCE = dict(atol=1e-9, rtol=1e-9)


def squared_error(output, target):
    return ((output - target) ** 2).sum(dim=1)


def mlp_graph(widths, activations, biases, seed, batch=5):
    model = build_mlp(widths, activations, biases, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)


def transformer_graph(seed: int = 0) -> gradgraph.GradGraph:
    """A TransformerEncoderLayer (2 heads) on inputs [b=3, T=4, d=8]: 12 components."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True).double()
    inputs = torch.randn(3, 4, 8, dtype=torch.float64)
    return gradgraph.to_graph(layer, inputs, loss_fn=lambda out, _: out.pow(2).sum((1, 2)))


def hidden_widths():
    """MLP specs with a hidden layer of width >= 2, so a permutation can move something."""
    return mlp_specs(max_depth=4, max_width=6).filter(lambda spec: len(spec[0]) > 2 and max(spec[0][1:-1]) >= 2)


class OneLayer(nn.Module):
    """The layer under test between GradMetaNet++'s encoder and its decoder and readouts.

    ``per_neuron=True`` feeds the layer node states ``[N, C]`` (the component mean) and
    adds its output back to every component.
    """

    def __init__(self, layer: nn.Module, channels: int = 6, per_neuron: bool = False) -> None:
        super().__init__()
        self.net = GradMetaNetPlusPlus(channels, num_layers=0, graph_out_channels=2, component_out_channels=2)
        self.layer = layer
        self.per_neuron = per_neuron

    def forward(self, graph) -> GradMetaNetOutput:
        z, context = self.net.encode(graph)
        if self.per_neuron:
            z = z + self.layer(z.mean(dim=1), context)[:, None, :]
        else:
            z = self.layer(z, context)
        edge, node = self.net.decoder(z, context)
        graph_out = self.net.readout(z.mean(dim=1), context.node_batch, context.num_graphs)
        component = self.net.component_readout(z, context.node_batch, context.num_graphs, graph.perm_group < 0)
        return GradMetaNetOutput(edge=edge, node=node, graph=graph_out, component=component)


def layers(channels: int = 6) -> dict[str, nn.Module]:
    return {
        "component attention": ComponentAttention(channels, channels, channels, heads=2, head_channels=3),
        "component attention + edge messages": ComponentAttention(
            channels, channels, channels, heads=3, direction="forward"
        ),
        "neuron attention": NeuronAttention(
            channels, channels, channels, heads=2, head_channels=2, edge_messages=False
        ),
        "neuron attention + edge messages": NeuronAttention(channels, channels, channels, heads=1),
    }


# ----------------------------------------------------------------------------- equivariance
@settings(max_examples=6, deadline=None)
@given(spec_a=hidden_widths(), spec_b=hidden_widths(), per_neuron=st.booleans())
def test_every_new_layer_is_equivariant_on_mixed_mlp_batches(spec_a, spec_b, per_neuron):
    graphs = [mlp_graph(*spec_a), mlp_graph(*spec_b)]
    for name, layer in layers().items():
        if per_neuron and "component" in name:
            continue  # component attention needs the component axis
        errors = assert_equivariant(OneLayer(layer, per_neuron=per_neuron), graphs, num_trials=2, **TOLERANCE)
        assert set(errors) == {"node permutation", "component permutation"}, name


@settings(max_examples=5, deadline=None)
@given(spec_a=hidden_widths(), spec_b=hidden_widths(), heads=st.integers(1, 3), edge_messages=st.booleans())
def test_gradmetanet_plusplus_is_equivariant_on_mixed_mlp_batches(spec_a, spec_b, heads, edge_messages):
    graphs = [mlp_graph(*spec_a), mlp_graph(*spec_b), mlp_graph(*spec_a)]
    model = GradMetaNetPlusPlus(
        6, num_layers=2, heads=heads, edge_messages=edge_messages, graph_out_channels=2,
        component_out_channels=3, component_density_heads=2, product_channels=5,
    )
    assert_equivariant(model, graphs, num_trials=2, **TOLERANCE)


def test_gradmetanet_plusplus_is_equivariant_on_transformer_graphs():
    graph = transformer_graph()
    model = GradMetaNetPlusPlus(6, num_layers=1, heads=2, graph_out_channels=1, component_out_channels=1)
    # hidden neurons (FFN, per-head query/key and value dims: every perm_group) and components
    assert_equivariant(model, graph, num_trials=2, **TOLERANCE)
    # attention heads of the source network, with their query/key and value/output dims
    assert_equivariant(
        model,
        graph,
        num_trials=2,
        node_permutation=lambda batch, generator: transformer_node_permutation(
            graph, random_transformer_permutation(graph, generator)
        ),
        check_components=False,
        **TOLERANCE,
    )
    # and on a mixed batch of a transformer graph and an MLP graph (different B is not allowed,
    # so the MLP gets 12 datapoints like the transformer's 3 x 4 tokens)
    mixed = [graph, mlp_graph([3, 5, 2], ["relu", "none"], [True, True], seed=4, batch=12)]
    for layer in layers().values():
        assert_equivariant(OneLayer(layer), mixed, num_trials=1, **TOLERANCE)


def test_attention_works_as_gradmetanet_component_and_node_layers():
    """The new layers are GradGraphConv factories: GradMetaNet takes them as its layers."""
    graphs = [mlp_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=1),
              mlp_graph([2, 4, 3], ["sine", "none"], [True, False], seed=2)]
    model = GradMetaNet(6, component_layer=ComponentAttention, node_layer=NeuronAttention, graph_out_channels=1)
    assert isinstance(model.component_layers[0], ComponentAttention)
    assert isinstance(model.node_layers[0], NeuronAttention)
    assert_equivariant(model, graphs, num_trials=2, **TOLERANCE)


# ----------------------------------------------------------------------------- sensitivity
class IndexLeakingNeuronAttention(NeuronAttention):
    """Deliberately broken: keys see each neuron's index within its graph."""

    def attend(self, h, context):
        start = torch.searchsorted(context.node_batch, context.node_batch)
        index = (torch.arange(h.shape[0]) - start).to(h.dtype)
        shape = (-1,) + (1,) * (h.dim() - 1)
        return super().attend(h + 0.1 * index.view(shape), context)


class OrderLeakingComponentAttention(ComponentAttention):
    """Deliberately broken: a positional encoding of the components (their order in the set)."""

    def attend(self, h):
        order = torch.linspace(0, 1, h.shape[1], dtype=h.dtype)[None, :, None]
        return super().attend(h + order)


def test_the_check_fails_for_attention_that_sees_neuron_indices():
    graph = mlp_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=1)
    broken = GradMetaNetPlusPlus(6, num_layers=1, neuron_layer=IndexLeakingNeuronAttention)
    with pytest.raises(AssertionError, match="node permutation"):
        assert_equivariant(broken, [graph], **TOLERANCE)
    with pytest.raises(AssertionError, match="node permutation"):
        assert_equivariant(broken, transformer_graph(), **TOLERANCE)


def test_the_check_fails_for_attention_that_sees_component_order():
    graph = mlp_graph([3, 6, 2], ["relu", "none"], [True, True], seed=2)
    broken = GradMetaNetPlusPlus(6, num_layers=1, component_layer=OrderLeakingComponentAttention)
    with pytest.raises(AssertionError, match="component permutation"):
        assert_equivariant(broken, [graph], **TOLERANCE)


# ----------------------------------------------------------------------------- references
def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v for one head, one set: [L, d] each -> [L, d], by explicit exp and sums."""
    query, key, value = query.detach(), key.detach(), value.detach()
    scores = [[float(query[i] @ key[j]) / math.sqrt(query.shape[1]) for j in range(key.shape[0])]
              for i in range(query.shape[0])]
    out = torch.zeros_like(query)
    for i, row in enumerate(scores):
        top = max(row)
        weights = [math.exp(s - top) for s in row]
        total = sum(weights)
        for j, weight in enumerate(weights):
            out[i] += weight / total * value[j]
    return out


def heads_of(lin: nn.Module, states: torch.Tensor, heads: int, width: int) -> list[torch.Tensor]:
    projected = lin(states)
    return [projected[..., t * width : (t + 1) * width] for t in range(heads)]


def test_component_attention_equals_a_direct_reference_computation():
    torch.manual_seed(0)
    graph = mlp_graph([2, 3, 1], ["tanh", "none"], [True, True], seed=5, batch=4)
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 3, dtype=torch.float64))
    layer = ComponentAttention(5, 4, 3, heads=2, head_channels=3, edge_messages=False).double()
    h = torch.randn(graph.num_nodes, 4, 5, dtype=torch.float64)
    expected = torch.zeros(graph.num_nodes, 4, 2 * 3, dtype=torch.float64)
    for n in range(graph.num_nodes):
        qs, ks, vs = (heads_of(lin, h[n], 2, 3) for lin in (layer.lin_query, layer.lin_key, layer.lin_value))
        expected[n] = torch.cat([reference_attention(q, k, v) for q, k, v in zip(qs, ks, vs)], dim=-1)
    torch.testing.assert_close(layer.attend(h), layer.lin_out(expected), atol=1e-12, rtol=1e-12)
    # the rest of the equation: self term plus per-layer and per-graph means
    layer_mean = torch.stack([h[graph.layer == graph.layer[n]].mean(0) for n in range(graph.num_nodes)])
    rest = layer.lin_self(h) + layer.lin_layer(layer_mean) + layer.lin_graph(h.mean(0, keepdim=True))
    torch.testing.assert_close(layer(h, context), rest + layer.lin_out(expected), atol=1e-12, rtol=1e-12)


def test_neuron_attention_equals_a_direct_reference_per_graph_and_component():
    torch.manual_seed(1)
    graphs = [mlp_graph([2, 3, 1], ["tanh", "none"], [True, True], seed=6, batch=3),
              mlp_graph([1, 4, 2, 1], ["relu", "sine", "none"], [True, False, True], seed=7, batch=3)]
    batch = Batch.from_data_list(graphs)
    context = GraphContext.from_graph(batch, torch.randn(batch.edge_index.shape[1], 2, dtype=torch.float64))
    layer = NeuronAttention(4, 5, 2, heads=2, head_channels=2).double()
    per_component = torch.randn(batch.num_nodes, 3, 4, dtype=torch.float64)
    for h in (per_component, torch.randn(batch.num_nodes, 4, dtype=torch.float64)):
        expected = torch.zeros(*h.shape[:-1], 4, dtype=torch.float64)
        for g in range(2):
            nodes = torch.nonzero(batch.batch == g).flatten()
            sets = [h[nodes]] if h.dim() == 2 else [h[nodes, i] for i in range(h.shape[1])]
            for i, states in enumerate(sets):
                qs, ks, vs = (heads_of(lin, states, 2, 2) for lin in (layer.lin_query, layer.lin_key, layer.lin_value))
                out = torch.cat([reference_attention(q, k, v) for q, k, v in zip(qs, ks, vs)], dim=-1)
                if h.dim() == 2:
                    expected[nodes] = out
                else:
                    expected[nodes, i] = out
        torch.testing.assert_close(layer.attend(h, context), layer.lin_out(expected), atol=1e-12, rtol=1e-12)


def test_component_product_decoder_equals_a_per_edge_per_component_loop():
    torch.manual_seed(2)
    graph = mlp_graph([2, 3, 2], ["relu", "none"], [True, True], seed=8, batch=3)
    edge_features = torch.randn(graph.edge_index.shape[1], 2, dtype=torch.float64)
    context = GraphContext.from_graph(graph, edge_features)
    z = torch.randn(graph.num_nodes, 3, 4, dtype=torch.float64)
    for reduce in ("mean", "sum"):
        decoder = ComponentProductDecoder(4, 2, 3, product_channels=5, reduce=reduce, chunk_edges=4).double()
        edge, node = decoder(z, context)
        P = 5
        silu = torch.nn.functional.silu
        rho = (lambda values: values.mean(0)) if reduce == "mean" else (lambda values: values.sum(0))
        for e, (j, k) in enumerate(graph.edge_index.t().tolist()):
            per_component = []
            for i in range(3):
                left, right = decoder.edge_source(z[j, i]), decoder.edge_target(z[k, i])
                pre = left[:P] * right[:P] + left[P:] + right[P:] + decoder.edge_features(edge_features[e])
                per_component.append(silu(pre))
            expected = decoder.edge_out(rho(torch.stack(per_component)))
            torch.testing.assert_close(edge[e], expected, atol=1e-12, rtol=1e-12)
        for n in range(graph.num_nodes):
            pre = decoder.node_in(z[n])
            value = rho(silu(pre[:, :P] * pre[:, P : 2 * P] + pre[:, 2 * P :]))
            torch.testing.assert_close(node[n], decoder.node_out(value), atol=1e-12, rtol=1e-12)


def test_chunked_checkpointed_decoder_has_the_same_values_and_gradients():
    torch.manual_seed(3)
    graph = mlp_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=9)
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 2, dtype=torch.float64))
    whole = ComponentProductDecoder(4, 2, 2, product_channels=3).double()
    chunked = ComponentProductDecoder(4, 2, 2, product_channels=3, chunk_edges=7).double()
    chunked.load_state_dict(whole.state_dict())
    z = torch.randn(graph.num_nodes, 5, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for decoder in (whole, chunked):
        edge, node = decoder(z, context)
        (grad,) = torch.autograd.grad((edge.square().sum() + node.sum()), z)
        results.append((edge, node, grad))
    for first, second in zip(*results):
        torch.testing.assert_close(first, second, atol=1e-12, rtol=1e-12)


def direct_edge_decoder(decoder: ComponentProductDecoder, z: torch.Tensor, context: GraphContext) -> torch.Tensor:
    """The decoder's edge output by plain autograd ops over all edges at once (gathers, no chunks)."""
    P = decoder.product_channels
    src, dst = context.edge_index
    left, right = decoder.edge_source(z)[src], decoder.edge_target(z)[dst]  # [E, B, 2P]
    pre = left[..., :P] * right[..., :P] + left[..., P:] + right[..., P:] + decoder.edge_features(
        context.edge_features)[:, None, :]
    activated = torch.nn.functional.silu(pre)
    return decoder.edge_out(activated.mean(1) if decoder.reduce == "mean" else activated.sum(1))


@pytest.mark.parametrize("chunk_edges", [1, 5, None])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_hand_written_decoder_backward_equals_autograd_of_the_direct_formula(chunk_edges, reduce):
    """Values and gradients (states, edge features, every parameter) of the chunked edge path
    with its hand-written backward against autograd of the unchunked formula, in float64."""
    torch.manual_seed(4)
    graphs = [mlp_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=10, batch=4),
              mlp_graph([2, 4, 1], ["sine", "none"], [False, True], seed=11, batch=4)]
    batch = Batch.from_data_list(graphs)
    edge_features = torch.randn(batch.edge_index.shape[1], 3, dtype=torch.float64, requires_grad=True)
    context = GraphContext.from_graph(batch, edge_features)
    decoder = ComponentProductDecoder(5, 3, 2, product_channels=3, reduce=reduce, chunk_edges=chunk_edges).double()
    z = torch.randn(batch.num_nodes, 4, 5, dtype=torch.float64, requires_grad=True)
    fast, _ = decoder(z, context)
    direct = direct_edge_decoder(decoder, z, context)
    torch.testing.assert_close(fast, direct, **TOLERANCE)
    cotangent = torch.randn_like(fast)
    inputs = [z, edge_features, *decoder.parameters()]
    grads_fast = torch.autograd.grad(fast, inputs, cotangent, allow_unused=True)
    grads_direct = torch.autograd.grad(direct, inputs, cotangent, allow_unused=True)
    for grad_fast, grad_direct in zip(grads_fast, grads_direct):
        if grad_direct is None:  # the node path's parameters
            assert grad_fast is None
        else:
            torch.testing.assert_close(grad_fast, grad_direct, **TOLERANCE)


def test_neuron_attention_on_one_architecture_skips_padding_with_the_same_result():
    """A batch of one architecture takes the unpadded path (nodes_per_graph > 0); values and
    gradients equal the padded, masked path's, for per-component and per-neuron states."""
    torch.manual_seed(5)
    graphs = [mlp_graph([2, 4, 3, 1], ["tanh", "relu", "none"], [True, True, True], seed=seed, batch=3)
              for seed in (12, 13, 14)]
    batch = Batch.from_data_list(graphs)
    context = GraphContext.from_graph(batch, torch.randn(batch.edge_index.shape[1], 2, dtype=torch.float64))
    assert context.nodes_per_graph() == graphs[0].num_nodes
    padded = context._replace(cache={"nodes_per_graph": 0})
    layer = NeuronAttention(4, 5, 2, heads=2, head_channels=3).double()
    for shape in ((batch.num_nodes, 3, 4), (batch.num_nodes, 4)):
        h = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        fast, reference = layer(h, context), layer(h, padded)
        torch.testing.assert_close(fast, reference, **TOLERANCE)
        cotangent = torch.randn_like(fast)
        (grad_fast,) = torch.autograd.grad(fast, h, cotangent)
        (grad_reference,) = torch.autograd.grad(reference, h, cotangent)
        torch.testing.assert_close(grad_fast, grad_reference, **TOLERANCE)


def test_nodes_per_graph_only_for_equal_graphs_in_order():
    same = [mlp_graph([2, 3, 1], ["tanh", "none"], [True, True], seed=seed, batch=2) for seed in (1, 2)]
    assert GraphContext.from_graph(Batch.from_data_list(same)).nodes_per_graph() == same[0].num_nodes
    assert GraphContext.from_graph(same[0]).nodes_per_graph() == same[0].num_nodes
    mixed = same + [mlp_graph([2, 4, 1], ["tanh", "none"], [True, True], seed=3, batch=2)]
    assert GraphContext.from_graph(Batch.from_data_list(mixed)).nodes_per_graph() == 0
    # Six nodes in three graphs, but of sizes 2, 3, 1: not a view of [3, 2].
    uneven = GraphContext(edge_index=torch.zeros(2, 0, dtype=torch.long), edge_features=torch.zeros(0, 1),
                          node_batch=torch.tensor([0, 0, 1, 1, 1, 2]), num_graphs=3,
                          layer_group=torch.zeros(6, dtype=torch.long), num_layer_groups=1, cache={})
    assert uneven.nodes_per_graph() == 0


# ----------------------------------------------------------------------------- errors, repr, CLI
def test_bad_inputs_raise_clear_errors():
    graph = mlp_graph([2, 3, 1], ["tanh", "none"], [True, True], seed=5, batch=4)
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 3, dtype=torch.float64))
    with pytest.raises(GradGraphError, match="ComponentAttention: states must have shape"):
        ComponentAttention(5, 4, 3).double()(torch.randn(graph.num_nodes, 5, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="heads and head_channels"):
        NeuronAttention(4, 4, 3, heads=0)
    with pytest.raises(GradGraphError, match="ComponentProductDecoder: component states"):
        ComponentProductDecoder(4, 3, 1).double()(torch.randn(graph.num_nodes, 2, 5, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="reduce"):
        ComponentProductDecoder(4, 3, 1, reduce="max")
    unsorted = context._replace(node_batch=torch.tensor([1, 0] + [1] * (graph.num_nodes - 2)), num_graphs=2)
    with pytest.raises(GradGraphError, match="sorted by graph"):
        NeuronAttention(4, 4, 3).double().attend(torch.randn(graph.num_nodes, 4, dtype=torch.float64), unsorted)
    with pytest.raises(GradGraphError, match="direction"):
        GradMetaNetPlusPlus(4, direction="sideways")
    modules = (GradMetaNetPlusPlus(4, heads=2), NeuronAttention(4, 4, 3), ComponentProductDecoder(4, 3, 1))
    text = "".join(repr(module) for module in modules)
    assert "heads=2" in text and "reduce='mean'" in text


def test_curvature_cli_accepts_gradmetanet_pp(tmp_path, capsys):
    code = main(
        ["curvature", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
         "--models", "standard", "gradmetanet_pp", "--quiet"]
    )
    assert code == 0
    assert "GradMetaNet++" in capsys.readouterr().out
    assert (tmp_path / "o" / "results.json").exists()


def test_default_curvature_preset_runs_the_headline_models_and_every_model_is_one_flag_away():
    from gradgraph_lab.tasks.curvature import DEFAULT_MODELS, MODEL_NAMES, CurvatureConfig, preset

    config = preset("default")
    assert config.models == DEFAULT_MODELS == ("standard", "kernel_importance", "gradmetanet")
    assert config.num_train + config.num_val + config.num_test == config.zoo.num_nets
    assert "gradmetanet_pp" in MODEL_NAMES
    assert CurvatureConfig(models=MODEL_NAMES).models == MODEL_NAMES
