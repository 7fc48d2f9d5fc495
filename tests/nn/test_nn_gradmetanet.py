"""GradMetaNet: exact equivariance, sensitivity of the check, extension API, error paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_mlp, mlp_specs
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import (
    ComponentConv,
    ComponentPool,
    EdgeKindEncoding,
    EdgeProductDecoder,
    GradGraphConv,
    GradMetaNet,
    GraphContext,
    NodeConv,
    PositionalEncoding,
    outputs_to_parameters,
)
from gradgraph.symmetry import (
    edge_permutation,
    hidden_perms_to_node_permutation,
    move_values,
    permute_hidden,
    random_hidden_perms,
)
from gradgraph.testing import assert_equivariant


def squared_error(output, target):
    return ((output - target) ** 2).sum(dim=1)


def random_graph(widths, activations, biases, seed, batch=5):
    model = build_mlp(widths, activations, biases, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return model, inputs, targets, gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)


def hidden_widths():
    """MLP specs with at least one hidden layer of width >= 2, so a permutation can move something."""
    return mlp_specs(max_depth=4, max_width=7).filter(lambda spec: len(spec[0]) > 2 and max(spec[0][1:-1]) >= 2)


@settings(max_examples=12, deadline=None)
@given(spec_a=hidden_widths(), spec_b=hidden_widths(), direction=st.sampled_from(["both", "forward"]))
def test_gradmetanet_is_equivariant_on_mixed_batches(spec_a, spec_b, direction):
    graphs = [random_graph(*spec_a)[3], random_graph(*spec_b)[3]]
    model = GradMetaNet(8, num_component_layers=2, num_node_layers=1, graph_out_channels=2, component_out_channels=2, direction=direction)
    errors = assert_equivariant(model, graphs, num_trials=2, atol=1e-9, rtol=1e-9)
    assert set(errors) == {"node permutation", "component permutation"}


@settings(max_examples=8, deadline=None)
@given(spec=hidden_widths())
def test_permuting_the_source_network_permutes_the_outputs(spec):
    """Convert a permuted network (not a permuted graph): outputs move with its neurons."""
    widths, activations, biases, seed = spec
    model, inputs, targets, graph = random_graph(widths, activations, biases, seed)
    perms = random_hidden_perms(model, torch.Generator().manual_seed(seed))
    permuted_model = permute_hidden(model, perms)
    permuted_graph = gradgraph.to_graph(permuted_model, inputs, targets, loss_fn=squared_error)
    node_perm = hidden_perms_to_node_permutation(graph, perms)

    net = GradMetaNet(8, graph_out_channels=1).double()
    with torch.no_grad():
        out, out_permuted = net(graph), net(permuted_graph)
    torch.testing.assert_close(out_permuted.edge, move_values(out.edge, edge_permutation(graph, node_perm)), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_permuted.node, move_values(out.node, node_perm), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_permuted.graph, out.graph, atol=1e-9, rtol=1e-9)
    # and in weight space: the per-weight output is the permuted parameter dict
    params, params_permuted = outputs_to_parameters(graph, out)[0], outputs_to_parameters(permuted_graph, out_permuted)[0]
    expected = dict(permute_hidden_outputs(model, params, perms))
    for name, value in params_permuted.items():
        torch.testing.assert_close(value, expected[name], atol=1e-9, rtol=1e-9)


def permute_hidden_outputs(model, params, perms):
    """Apply hidden permutations to a parameter-shaped dict by loading it into a copy of the model."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            parameter.copy_(params[name])
    permuted = permute_hidden(clone, perms)
    return {name: parameter.detach() for name, parameter in permuted.named_parameters()}


class IndexLeakingConv(NodeConv):
    """Deliberately broken: adds each node's absolute index, which hidden neurons must not see."""

    def forward(self, h, context):
        index = torch.arange(h.shape[0], dtype=h.dtype)[:, None]
        return super().forward(h, context) + index


class ComponentOrderConv(ComponentConv):
    """Deliberately broken: weights components by their position in the set."""

    def forward(self, h, context):
        order = torch.linspace(0, 1, h.shape[1], dtype=h.dtype)[None, :, None]
        return super().forward(h, context) * (1 + order)


def test_assert_equivariant_fails_for_a_layer_that_sees_neuron_indices():
    graph = random_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=1)[3]
    broken = GradMetaNet(8, node_layer=IndexLeakingConv)
    with pytest.raises(AssertionError, match="node permutation"):
        assert_equivariant(broken, [graph])


@pytest.mark.parametrize("seed", range(12))
def test_assert_equivariant_redraws_an_identity_permutation_and_refuses_a_graph_that_cannot_move(seed):
    # one hidden layer of two neurons: half the draws are the identity, which proves nothing
    pair = random_graph([3, 2, 2], ["relu", "none"], [True, True], seed=seed)[3]
    errors = assert_equivariant(GradMetaNet(4), [pair], num_trials=3, seed=seed, atol=1e-9, rtol=1e-9)
    assert set(errors) == {"node permutation", "component permutation"}
    rigid = random_graph([3, 2], ["none"], [True], seed=seed)[3]  # no hidden neuron: nothing may move
    with pytest.raises(GradGraphError, match="moved no node in 32 draws"):
        assert_equivariant(GradMetaNet(4), [rigid], seed=seed)


class ComponentOrderReadout(torch.nn.Module):
    """Deliberately broken: component outputs that do not move with the components."""

    def __init__(self):
        super().__init__()
        self.net = GradMetaNet(8, component_out_channels=1)

    def forward(self, graph):
        out = self.net(graph)
        return out._replace(component=out.component.mean(dim=1, keepdim=True) + torch.linspace(0, 1, out.component.shape[1], dtype=out.component.dtype)[None, :, None])


def test_assert_equivariant_fails_for_component_outputs_that_ignore_the_order():
    graph = random_graph([3, 6, 2], ["relu", "none"], [True, True], seed=2)[3]
    with pytest.raises(AssertionError, match="component permutation.*'component'"):
        assert_equivariant(ComponentOrderReadout(), [graph])


def test_set_only_component_layers_have_no_edge_parameters_and_ignore_weights():
    graph = random_graph([3, 6, 2], ["relu", "none"], [True, True], seed=12)[3]
    layer = ComponentConv(3, 4, 5, edge_messages=False).double()
    assert not any("forward" in name or "backward" in name for name, _ in layer.named_parameters())
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 5, dtype=torch.float64))
    rewired = context._replace(edge_index=context.edge_index.flip(0))
    h = torch.randn(graph.num_nodes, graph.num_components, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(h, context), layer(h, rewired), atol=0, rtol=0)
    assert "edge_messages=False" in repr(layer)


def test_assert_equivariant_fails_for_a_layer_that_sees_component_order():
    graph = random_graph([3, 6, 2], ["relu", "none"], [True, True], seed=2)[3]
    broken = GradMetaNet(8, component_layer=ComponentOrderConv)
    with pytest.raises(AssertionError, match="component permutation"):
        assert_equivariant(broken, [graph])


class GatedMLPConv(GradGraphConv):
    """A user-style custom layer: messages from an MLP of source state and edge gate."""

    def message(self, x_j, gate):
        return torch.tanh(x_j) * gate.view(gate.shape[0], *([1] * (x_j.dim() - 2)), -1)


def test_custom_layer_builds_a_gradmetanet_and_passes_the_check():
    graphs = [random_graph([2, 5, 4, 3], ["sine", "relu", "none"], [True, False, True], seed=s)[3] for s in (3, 4)]
    model = GradMetaNet(8, component_layer=GatedMLPConv, node_layer=GatedMLPConv, graph_out_channels=1)
    assert all(isinstance(layer, GatedMLPConv) for layer in model.component_layers)
    assert_equivariant(model, graphs)


def test_outputs_have_documented_shapes_and_write_back_per_graph():
    graphs = [random_graph([3, 4, 2], ["relu", "none"], [True, True], seed=5)[3], random_graph([3, 6, 6, 2], ["tanh", "relu", "none"], [True, False, True], seed=6)[3]]
    batch = Batch.from_data_list(graphs)
    model = GradMetaNet(8, edge_out_channels=2, node_out_channels=2, graph_out_channels=3, component_out_channels=4).double()
    out = model(batch)
    assert out.component.shape == (2, batch.act.shape[1], 4)
    assert out.edge.shape == (batch.edge_index.shape[1], 2)
    assert out.node.shape == (batch.num_nodes, 2)
    assert out.graph.shape == (2, 3)
    params = outputs_to_parameters(batch, out)
    assert set(params[1]) == {"0.weight", "0.bias", "2.weight", "4.weight", "4.bias"}
    assert params[1]["2.weight"].shape == (6, 6, 2)
    # graph by graph gives the same numbers as the batch
    single = model(graphs[0])
    torch.testing.assert_close(single.edge, out.edge[: graphs[0].edge_index.shape[1]])
    no_heads = GradMetaNet(8, edge_out_channels=0, node_out_channels=0, graph_out_channels=1).double()(batch)
    assert no_heads.edge is None and no_heads.node is None and no_heads.graph.shape == (2, 1)


def test_component_features_are_read_moved_and_checked():
    graphs = [random_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=s)[3] for s in (13, 14)]
    for graph in graphs:
        graph.component_x = torch.randn(graph.num_nodes, graph.num_components, 3, dtype=torch.float64)
    model = GradMetaNet(8, graph_out_channels=1, component_out_channels=1, component_in_channels=3)
    assert_equivariant(model, graphs)
    out = model.double()(graphs[0])
    changed = graphs[0].clone()
    changed.component_x = torch.randn_like(changed.component_x)
    assert not torch.allclose(model(changed).edge, out.edge)
    changed.component_x = changed.component_x[:, :, :2]
    with pytest.raises(GradGraphError, match="component_x has 2 feature columns .* component_in_channels=3"):
        model(changed)
    changed.component_x = torch.zeros(3, 3, 3, dtype=torch.float64)
    with pytest.raises(GradGraphError, match="component_x must have shape"):
        model(changed)
    with pytest.raises(GradGraphError, match="component_x"):
        gradgraph.symmetry.rescale_nodes(graphs[0], torch.ones(graphs[0].num_nodes, dtype=torch.float64))


def test_without_component_layers_the_model_never_reads_the_factors():
    graph = random_graph([3, 5, 2], ["relu", "none"], [True, True], seed=7)[3]
    model = GradMetaNet(8, num_component_layers=0).double()
    out = model(graph)
    scrambled = graph.clone()
    scrambled.act = torch.randn_like(graph.act)
    scrambled.grad = torch.randn_like(graph.grad)
    torch.testing.assert_close(model(scrambled).edge, out.edge, atol=0, rtol=0)


def test_layers_reject_bad_shapes_and_options():
    graph = random_graph([3, 5, 2], ["relu", "none"], [True, True], seed=8)[3]
    context = GraphContext.from_graph(graph, torch.zeros(graph.edge_index.shape[1], 4, dtype=torch.float64))
    with pytest.raises(GradGraphError, match=r"\[N, B, C\]"):
        ComponentConv(3, 3, 4).double()(torch.zeros(graph.num_nodes, 3, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="NodeConv"):
        NodeConv(3, 3, 4).double()(torch.zeros(graph.num_nodes, 2, 3, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="N=10, C=3"):
        NodeConv(3, 3, 4).double()(torch.zeros(7, 3, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="edge_dim=5"):
        NodeConv(3, 3, 5).double()(torch.zeros(graph.num_nodes, 3, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="direction must be one of"):
        GradMetaNet(8, direction="sideways")
    with pytest.raises(GradGraphError, match="component outputs need"):
        GradMetaNet(8, num_component_layers=0, component_out_channels=1)
    with pytest.raises(GradGraphError, match="aggregations"):
        ComponentPool(["median"])
    with pytest.raises(GradGraphError, match="component states"):
        EdgeProductDecoder(3, 4, 1, component_channels=2).double()(torch.zeros(graph.num_nodes, 3, dtype=torch.float64), context)
    with pytest.raises(GradGraphError, match="max_positions"):
        PositionalEncoding(4, max_positions=2)(graph)
    with pytest.raises(GradGraphError, match="max_layers"):
        PositionalEncoding(4, max_layers=2)(graph)
    with pytest.raises(GradGraphError, match="edge_features has"):
        GraphContext.from_graph(graph, torch.zeros(3, 4))


def test_repr_names_the_configuration():
    assert "direction='forward'" in repr(NodeConv(3, 4, 5, direction="forward"))
    assert "component_layers=2" in repr(GradMetaNet(8))
    assert "aggregations=['mean', 'max']" in repr(ComponentPool(["mean", "max"]))


def test_flow_is_a_deprecated_name_of_direction_and_never_pyg_s_flow():
    """``flow=`` (the old name) still builds the same layer, with a FutureWarning; PyG's own
    flow values are refused rather than silently meaning something else."""
    with pytest.warns(FutureWarning, match="direction='forward'"):
        old = NodeConv(3, 4, 5, flow="forward")
    assert old.direction == "forward" and not hasattr(old, "lin_backward")
    with pytest.warns(FutureWarning):
        assert GradMetaNet(8, flow="forward").direction == "forward"
    with pytest.raises(GradGraphError, match="not PyG's flow"):
        NodeConv(3, 4, 5, flow="target_to_source")
    with pytest.raises(GradGraphError, match="direction= only"):
        GradMetaNet(8, direction="both", flow="forward")
    assert NodeConv(3, 4, 5).flow == "source_to_target"  # PyG's attribute keeps PyG's meaning


class PlainGatedConv(ComponentConv):
    """The same message as the base class, but overriding message() forces propagate()."""

    def message(self, x_j, gate):
        return x_j * gate[:, None, :]


@pytest.mark.parametrize("aggr", ["mean", "sum"])
@pytest.mark.parametrize("direction", ["both", "forward"])
def test_fused_sparse_messages_equal_propagate(aggr, direction):
    graphs = [random_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=s)[3] for s in (9, 10)]
    batch = Batch.from_data_list(graphs)
    context = GraphContext.from_graph(batch, torch.randn(batch.edge_index.shape[1], 4, dtype=torch.float64))
    fused = ComponentConv(3, 5, 4, direction=direction, aggr=aggr).double()
    plain = PlainGatedConv(3, 5, 4, direction=direction, aggr=aggr).double()
    plain.load_state_dict(fused.state_dict())
    h = torch.randn(batch.num_nodes, batch.act.shape[1], 3, dtype=torch.float64, requires_grad=True)
    assert fused.uses_fused_aggregation(h) and not plain.uses_fused_aggregation(h)
    out_fused, out_plain = fused(h, context), plain(h, context)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-12, rtol=1e-12)
    weights = torch.randn_like(out_fused)
    grads_fused = torch.autograd.grad((out_fused * weights).sum(), [h, *fused.parameters()])
    grads_plain = torch.autograd.grad((out_plain * weights).sum(), [h, *plain.parameters()])
    for got, expected in zip(grads_fused, grads_plain):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-11)


class DoubledFusedConv(ComponentConv):
    """Redefines the message and its fused kernel together: stays on the fused path."""

    def message(self, x_j, gate):
        return 2 * super().message(x_j, gate)

    def message_and_aggregate(self, adj_t, x, gate, pattern):
        return 2 * super().message_and_aggregate(adj_t, x, gate, pattern)


def test_fused_path_is_pyg_s_message_and_aggregate():
    """The fused kernel runs as PyG's ``message_and_aggregate`` from ``propagate`` (its hooks see
    it); a layer that redefines only ``message`` never gets it (fails if ``fuse`` ignores an
    overridden message: PlainGatedConv would then be summed by the base kernel), and one that
    redefines both keeps it."""
    graph = random_graph([3, 6, 5, 2], ["relu", "tanh", "none"], [True, True, True], seed=9)[3]
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 4, dtype=torch.float64))
    h = torch.randn(graph.num_nodes, graph.act.shape[1], 3, dtype=torch.float64)
    calls = []
    for layer_class in (ComponentConv, PlainGatedConv, DoubledFusedConv):
        layer = layer_class(3, 5, 4).double()
        layer.register_message_and_aggregate_forward_hook(lambda module, inputs, out: calls.append(type(module)))
        layer(h, context)
    assert calls == [ComponentConv, ComponentConv, DoubledFusedConv, DoubledFusedConv]  # forward + backward terms
    assert not NodeConv(3, 5, 4).uses_fused_aggregation(h[:, 0]) and not ComponentConv(3, 5, 4, aggr="max").fuse
    doubled, plain = DoubledFusedConv(3, 5, 4).double(), PlainGatedConv(3, 5, 4).double()
    plain.load_state_dict(doubled.state_dict())
    x, gate = doubled.lin_forward(h), doubled.gate_forward(context.edge_features)
    torch.testing.assert_close(doubled._propagate_direction("forward", x, gate, context),
                               2 * plain._propagate_direction("forward", x, gate, context), atol=1e-12, rtol=1e-12)


def test_decoder_product_moments_equal_the_dense_formula():
    graph = random_graph([3, 6, 2], ["relu", "none"], [True, True], seed=11)[3]
    context = GraphContext.from_graph(graph, torch.randn(graph.edge_index.shape[1], 4, dtype=torch.float64))
    decoder = EdgeProductDecoder(5, 4, 2, component_channels=3, product_channels=4).double()
    h = torch.randn(graph.num_nodes, 5, dtype=torch.float64)
    z = torch.randn(graph.num_nodes, graph.num_components, 3, dtype=torch.float64)
    edge, _ = decoder(h, context, z)
    src, dst = graph.edge_index
    product = decoder.edge_left(z)[src] * decoder.edge_right(z)[dst]
    moments = torch.cat([product.mean(1), product.square().mean(1)], dim=-1)
    expected = decoder.edge_mlp(torch.cat([h[src], h[dst], context.edge_features], dim=-1)) + decoder.edge_moments(moments)
    torch.testing.assert_close(edge, expected, atol=1e-12, rtol=1e-12)


def small_transformer_graph(seed: int = 0) -> gradgraph.GradGraph:
    """A TransformerEncoderLayer's graph: every EdgeKind but LINEAR occurs in it."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True).double()
    inputs = torch.randn(3, 4, 8, dtype=torch.float64)
    return gradgraph.to_graph(layer, inputs, loss_fn=lambda out, _: out.pow(2).sum((1, 2)))


def test_edge_kind_encoding_equals_a_linear_map_of_the_one_hot_kind():
    """Graphs carry kinds as integers; the embedding must be exactly what a Linear on
    ``[edge_attr, one-hot(edge_kind)]`` computed when the one-hot sat in edge_attr."""
    graph = small_transformer_graph()
    assert graph.edge_attr.shape == (graph.edge_index.shape[1], 1)
    channels = 6
    joint = torch.nn.Linear(1 + len(gradgraph.EdgeKind), channels).double()
    model = GradMetaNet(channels, num_component_layers=0, num_node_layers=0).double()
    model(graph)  # materialise the lazy encoder
    with torch.no_grad():
        model.edge_encoder.weight.copy_(joint.weight[:, :1])
        model.edge_encoder.bias.copy_(joint.bias)
        model.edge_kind_encoding.kind.weight.copy_(joint.weight[:, 1:].T)
    one_hot = torch.nn.functional.one_hot(graph.edge_kind, len(gradgraph.EdgeKind)).double()
    expected = joint(torch.cat([graph.edge_attr, one_hot], dim=1))
    encoded = model.edge_encoder(graph.edge_attr) + model.edge_kind_encoding(graph)
    torch.testing.assert_close(encoded, expected, rtol=1e-14, atol=1e-14)


def test_gradmetanet_tells_edge_kinds_apart():
    graph = small_transformer_graph()
    torch.manual_seed(0)
    model = GradMetaNet(8, num_component_layers=1, num_node_layers=1, graph_out_channels=2).double()
    before = model(graph)
    relabelled = graph.clone()
    residual = relabelled.edge_kind == gradgraph.EdgeKind.RESIDUAL
    assert residual.any()
    relabelled.edge_kind = torch.where(residual, int(gradgraph.EdgeKind.FFN_IN), relabelled.edge_kind)
    after = model(relabelled)
    # same weights, same factors: only the kind label moved, and the outputs must notice
    assert not torch.allclose(before.graph, after.graph, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before.edge[residual], after.edge[residual], rtol=1e-6, atol=1e-6)
    errors = assert_equivariant(model, graph, num_trials=2, atol=1e-9, rtol=1e-9)
    assert set(errors) == {"node permutation", "component permutation"}


def test_edge_kind_encoding_rejects_unknown_kinds():
    graph = small_transformer_graph()
    encoding = EdgeKindEncoding(4)
    assert repr(encoding) == f"EdgeKindEncoding(4, kinds={len(gradgraph.EdgeKind)})"
    assert encoding(graph).shape == (graph.edge_index.shape[1], 4)
    graph.edge_kind = graph.edge_kind.clone()
    graph.edge_kind[5] = len(gradgraph.EdgeKind)
    with pytest.raises(GradGraphError, match=rf"EdgeKindEncoding: edge_kind must lie in \[0, {len(gradgraph.EdgeKind)}\)"):
        encoding(graph)


def test_kind_tables_load_checkpoints_from_before_kinds_were_appended():
    from gradgraph.nn import PositionalEncoding

    for module, key in ((EdgeKindEncoding(4), "kind.weight"), (PositionalEncoding(4), "kind.weight")):
        state = {name: value.clone() for name, value in module.state_dict().items()}
        old_rows = state[key][:-3] + 1.0  # a checkpoint saved with three kinds fewer
        state[key] = old_rows
        before = module.kind.weight.detach().clone()
        module.load_state_dict(state)
        torch.testing.assert_close(module.kind.weight[:-3], old_rows)
        torch.testing.assert_close(module.kind.weight[-3:], before[-3:])
        with pytest.raises(RuntimeError):  # a table of another width is still an error
            module.load_state_dict({**state, key: torch.zeros(2, 5)})
