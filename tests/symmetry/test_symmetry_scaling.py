"""Scale and sign symmetries: actions on models and graphs, canonicalisation, ScaleEquivariant.

Ground truths are independent of the code under test: the network function, torch.func
per-sample gradients of the transformed model, and conversion of the transformed model.
Quantities that scale by a factor are compared in the units of the untransformed graph
(divided by the known factor), so a 1e-10 tolerance means 1e-10 of the natural scale of
every row, whatever the factor (1e-3 ... 1e3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_mlp, mlp_specs
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch_geometric.data import Batch
from torch_geometric.nn import MessagePassing, global_mean_pool

import gradgraph
from gradgraph import GradGraphError
from gradgraph.graph import NUM_EDGE_KINDS, NUM_NODE_KINDS
from gradgraph.nn import GradMetaNetOutput, ScaleEquivariant
from gradgraph.symmetry import (
    admissible_transformations,
    canonicalize,
    edge_permutation,
    flip_hidden,
    flip_nodes,
    hidden_factors_to_node_factors,
    move_values,
    permute_nodes,
    random_node_factors,
    random_node_permutation,
    rescale_hidden,
    rescale_nodes,
    transform_nodes,
)

HOMOGENEOUS = ("relu", "leaky_relu", "identity")
ODD = ("tanh", "sine", "identity")
SLOT_KEYS = (
    "edge_index", "layer", "node_kind", "edge_kind", "activation", "perm_group", "position",
    "node_param", "node_param_pos", "edge_param", "edge_param_pos", "component_sample",
)


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).sum(dim=1)


@st.composite
def symmetric_mlps(draw, activations: tuple[str, ...], max_depth: int = 4, max_width: int = 6):
    """``(model, inputs, targets)``: an MLP whose hidden activations all come from ``activations``."""
    depth = draw(st.integers(2, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    hidden = [draw(st.sampled_from(activations)) for _ in range(depth - 1)]
    biases = [draw(st.booleans()) for _ in range(depth)]
    seed = draw(st.integers(0, 2**16))
    model = build_mlp(widths, hidden + ["none"], biases, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, 5))
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    return model, inputs, targets


def hidden_sizes(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [linear.out_features for linear in linears[:-1]]


def log_uniform_scales(sizes: list[int], seed: int) -> list[Tensor]:
    """Scales in [1e-3, 1e3], the extremes always present."""
    generator = torch.Generator().manual_seed(seed)
    scales = [10.0 ** (6 * torch.rand(size, generator=generator, dtype=torch.float64) - 3) for size in sizes]
    scales[0][0] = 1e-3
    scales[-1][-1] = 1e3
    return scales


def random_signs(sizes: list[int], seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.where(torch.rand(size, generator=generator) < 0.5, -1.0, 1.0).double() for size in sizes]


def per_sample_grads(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, y):
        return squared_error(functional_call(model, p, (x[None],)), y[None])[0]

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def close_in_units(actual: Tensor, expected: Tensor, units: Tensor, tol: float = 1e-10) -> None:
    """``actual == expected`` measured in ``units`` (broadcast): both are divided by it first."""
    torch.testing.assert_close(actual / units, expected / units, atol=tol, rtol=tol)


# ------------------------------------------------------------------------- actions
@settings(max_examples=25, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["scale", "flip"]), seed=st.integers(0, 10_000))
def test_actions_preserve_function_and_transform_factors_and_gradients(data, kind, seed):
    model, inputs, targets = data.draw(symmetric_mlps(HOMOGENEOUS if kind == "scale" else ODD))
    sizes = hidden_sizes(model)
    factors = log_uniform_scales(sizes, seed) if kind == "scale" else random_signs(sizes, seed)
    action = rescale_hidden if kind == "scale" else flip_hidden
    transformed = action(model, factors)

    # 1. the network function does not change
    torch.testing.assert_close(transformed(inputs), model(inputs), atol=1e-10, rtol=1e-10)

    # 2. converting the transformed model == transforming the graph
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)
    converted = gradgraph.to_graph(transformed, inputs, targets, loss_fn=squared_error)
    acted = action(graph, factors)
    node_factors = hidden_factors_to_node_factors(graph, factors)
    for key in SLOT_KEYS:
        assert torch.equal(converted[key], acted[key]), key
    src, dst = graph.edge_index
    # weights and biases are products, so they agree elementwise
    torch.testing.assert_close(converted.edge_attr, acted.edge_attr, atol=0, rtol=1e-12)
    torch.testing.assert_close(converted.x, acted.x, atol=0, rtol=1e-12)
    torch.testing.assert_close(acted.edge_attr[:, 0], graph.edge_attr[:, 0] * node_factors[dst] / node_factors[src])
    # act scales by t, grad by 1/t; compared per row in the untransformed graph's units
    column = node_factors[:, None]
    close_in_units(converted.act, acted.act, column)
    close_in_units(converted.grad, acted.grad, 1 / column)
    close_in_units(converted.act, graph.act * column, column)
    close_in_units(converted.grad, graph.grad / column, 1 / column)

    # 3. per-sample gradients (torch.func on the transformed model) transform as
    #    dL/dW_kj * t_j / t_k and dL/db_k / t_k
    reference = per_sample_grads(model, inputs, targets)
    after = per_sample_grads(transformed, inputs, targets)
    from_graph = acted.per_sample_grads()
    names = linear_names(model)
    layer_factors = [torch.ones(model.get_submodule(names[0]).in_features, dtype=torch.float64), *factors,
                     torch.ones(model.get_submodule(names[-1]).out_features, dtype=torch.float64)]
    for index, name in enumerate(names):
        into, out_of = layer_factors[index + 1], layer_factors[index]
        weight_units = (out_of[None, :] / into[:, None])[None]
        close_in_units(after[f"{name}.weight"], reference[f"{name}.weight"] * weight_units, weight_units)
        close_in_units(from_graph[f"{name}.weight"], after[f"{name}.weight"], weight_units)
        if f"{name}.bias" in reference:
            bias_units = (1 / into)[None]
            close_in_units(after[f"{name}.bias"], reference[f"{name}.bias"] * bias_units, bias_units)
            close_in_units(from_graph[f"{name}.bias"], after[f"{name}.bias"], bias_units)


def test_graph_actions_on_a_batch_act_graph_by_graph():
    inputs = torch.randn(4, 3, dtype=torch.float64)
    graphs = [
        gradgraph.to_graph(build_mlp([3, 4, 1], ["relu", "none"], [True, True], seed=1), inputs),
        gradgraph.to_graph(build_mlp([3, 2, 3, 1], ["tanh", "identity", "none"], [False, True, True], seed=2), inputs),
    ]
    batch = Batch.from_data_list(graphs)
    factors = random_node_factors(batch, generator=torch.Generator().manual_seed(0))
    moved = transform_nodes(batch, factors)
    offset = 0
    for graph, result in zip(graphs, moved.to_data_list()):
        expected = transform_nodes(graph, factors[offset : offset + graph.num_nodes])
        offset += graph.num_nodes
        for key in ("x", "edge_attr", "act", "grad"):
            assert torch.equal(result[key], expected[key]), key
    # scalable nodes got a scale, flippable-only nodes a sign, the others kept 1
    can_scale, can_flip = admissible_transformations(batch)
    assert bool((factors[can_scale].abs() != 1).all())
    assert bool((factors[can_flip & ~can_scale].abs() == 1).all())
    assert bool((factors[~(can_scale | can_flip)] == 1).all())


def test_inadmissible_transformations_raise_naming_the_layer():
    model = build_mlp([2, 3, 3, 3, 1], ["relu", "tanh", "gelu", "none"], [True, True, True, True])
    inputs = torch.randn(4, 2, dtype=torch.float64)
    graph = gradgraph.to_graph(model, inputs)
    ones = torch.ones(3, dtype=torch.float64)
    with pytest.raises(GradGraphError, match=r"rescale the neurons of '2'.*TANH is not positively homogeneous"):
        rescale_hidden(model, [None, 2 * ones, None])
    with pytest.raises(GradGraphError, match=r"rescale the neurons of '4'.*GELU"):
        rescale_hidden(model, [None, None, 2 * ones])
    with pytest.raises(GradGraphError, match=r"flip the signs of the neurons of '0'.*RELU is not odd"):
        flip_hidden(model, [-ones, None, None])
    with pytest.raises(GradGraphError, match="scales must be > 0"):
        rescale_hidden(model, [-ones, None, None])
    with pytest.raises(GradGraphError, match="signs must be \\+1 or -1"):
        flip_hidden(model, [None, 2 * ones, None])
    with pytest.raises(GradGraphError, match="one per hidden layer"):
        rescale_hidden(model, [ones])
    with pytest.raises(GradGraphError, match=r"factors for '2' must have shape \[3\]"):
        rescale_hidden(model, [None, torch.ones(2), None])
    # the same on the graph: nodes 0-1 inputs, 2-4 ReLU, 5-7 Tanh, 8-10 GELU, 11 output
    def factors_at(node: int, value: float) -> Tensor:
        factors = torch.ones(graph.num_nodes, dtype=torch.float64)
        factors[node] = value
        return factors

    with pytest.raises(GradGraphError, match=r"node 6 \(module '2', position 1, kind HIDDEN, activation TANH\)"):
        rescale_nodes(graph, factors_at(6, 3.0))
    with pytest.raises(GradGraphError, match=r"node 3 .*activation RELU.*needs an odd activation"):
        flip_nodes(graph, factors_at(3, -1.0))
    with pytest.raises(GradGraphError, match=r"node 9 .*GELU"):
        transform_nodes(graph, factors_at(9, 2.0))
    with pytest.raises(GradGraphError, match=r"node 0 .*kind INPUT.*only hidden neurons"):
        transform_nodes(graph, factors_at(0, 2.0))
    with pytest.raises(GradGraphError, match=r"node 11 .*kind OUTPUT"):
        transform_nodes(graph, factors_at(11, -1.0))
    with pytest.raises(GradGraphError, match="finite and nonzero"):
        transform_nodes(graph, factors_at(3, 0.0))
    with pytest.raises(GradGraphError, match=r"shape \[N\] with N=12, got \[11\]"):
        transform_nodes(graph, torch.ones(11))
    # admissible ones pass
    transform_nodes(graph, factors_at(3, 5.0))
    flip_nodes(graph, factors_at(7, -1.0))


# ------------------------------------------------------------------ canonicalisation
def random_graph(spec, batch: int = 4) -> gradgraph.GradGraph:
    widths, activations, biases, seed = spec
    model = build_mlp(widths, activations, biases, seed=seed)
    inputs = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return gradgraph.to_graph(model, inputs)


def assert_same_canonical(first, second) -> None:
    """Canonical graphs agree; act/grad per row relative to the row's scale."""
    for key in SLOT_KEYS:
        assert torch.equal(first.graph[key], second.graph[key]), key
    for key in ("x", "edge_attr"):
        torch.testing.assert_close(first.graph[key], second.graph[key], atol=1e-10, rtol=1e-10)
    for key in ("act", "grad"):
        rows = first.graph[key].abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
        close_in_units(first.graph[key], second.graph[key], rows)


@settings(max_examples=30, deadline=None)
@given(spec=mlp_specs(max_depth=5, max_width=8, output_width=1), seed=st.integers(0, 10_000))
def test_canonicalize_is_invariant_on_the_orbit(spec, seed):
    graph = random_graph(spec)
    factors = random_node_factors(graph, generator=torch.Generator().manual_seed(seed))
    moved = transform_nodes(graph, factors)
    canonical, canonical_moved = canonicalize(graph), canonicalize(moved)
    assert_same_canonical(canonical, canonical_moved)
    # the factors compose: t_canon(moved) * t == t_canon(graph)
    torch.testing.assert_close(canonical_moved.node_factors * factors, canonical.node_factors, atol=0, rtol=1e-12)
    # and the canonical graph is what the factors say
    for key in ("x", "edge_attr", "act", "grad"):
        assert torch.equal(canonical.graph[key], transform_nodes(graph, canonical.node_factors)[key])

    # the representative satisfies the documented rules
    can_scale, can_flip = admissible_transformations(graph)
    src, dst = graph.edge_index
    weight, bias = canonical.graph.edge_attr[:, 0], canonical.graph.x[:, 0]
    squared = torch.zeros(graph.num_nodes, dtype=torch.float64).index_add_(0, dst, weight**2) + bias**2
    torch.testing.assert_close(squared[can_scale], torch.ones_like(squared[can_scale]), atol=1e-12, rtol=0)
    for node in torch.nonzero(can_flip).flatten().tolist():
        entries = torch.cat([weight[dst == node], bias[node : node + 1]])
        assert float(entries[int(entries.abs().argmax())]) > 0
    # nodes that admit nothing keep factor 1
    assert bool((canonical.node_factors[~(can_scale | can_flip)] == 1).all())


def test_canonicalize_on_a_batch_and_under_permutations():
    inputs = torch.randn(5, 3, dtype=torch.float64)
    graphs = [
        gradgraph.to_graph(
            build_mlp([3, 4, 4, 1], ["relu", "leaky_relu", "none"], [True, False, True], seed=3), inputs
        ),
        gradgraph.to_graph(build_mlp([3, 5, 2, 1], ["sine", "identity", "none"], [True, True, True], seed=4), inputs),
        gradgraph.to_graph(build_mlp([3, 3, 1], ["gelu", "none"], [True, True], seed=5), inputs),
    ]
    batch = Batch.from_data_list(graphs)
    result = canonicalize(batch)
    offset = 0
    for graph, canonical in zip(graphs, result.graph.to_data_list()):
        single = canonicalize(graph)
        assert torch.equal(canonical.edge_attr, single.graph.edge_attr)
        assert torch.equal(canonical.act, single.graph.act)
        assert torch.equal(result.node_factors[offset : offset + graph.num_nodes], single.node_factors)
        offset += graph.num_nodes
    # canonicalising commutes with permuting hidden neurons (so wrapped models stay
    # permutation-equivariant)
    node_perm = random_node_permutation(batch, torch.Generator().manual_seed(1))
    permuted = canonicalize(permute_nodes(batch, node_perm))
    expected = permute_nodes(result.graph, node_perm)
    for key in ("x", "edge_attr", "act", "grad"):
        torch.testing.assert_close(permuted.graph[key], expected[key], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(permuted.node_factors, move_values(result.node_factors, node_perm), atol=0, rtol=1e-14)


def test_canonicalize_tie_break_is_documented_and_sign_invariant():
    # a tanh neuron whose two incoming weights tie in magnitude with opposite signs: the
    # first edge (graph order) decides, for the neuron and for its flipped copy alike
    model = build_mlp([2, 1, 1], ["tanh", "none"], [False, True])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.5, 0.5]]))
    graph = gradgraph.to_graph(model, torch.randn(3, 2, dtype=torch.float64))
    canonical = canonicalize(graph)
    assert canonical.graph.edge_attr[:2, 0].tolist() == [0.5, -0.5]
    flipped = canonicalize(flip_hidden(graph, [torch.tensor([-1.0])]))
    assert torch.equal(flipped.graph.edge_attr, canonical.graph.edge_attr)
    # an all-zero incoming vector is left alone (no representative exists)
    with torch.no_grad():
        model[0].weight.zero_()
    zero = canonicalize(gradgraph.to_graph(model, torch.randn(3, 2, dtype=torch.float64)))
    assert bool((zero.node_factors == 1).all())


# --------------------------------------------------------------------- the wrapper
class MixingConv(MessagePassing):
    r"""A small message layer for the tests: mixes weights, biases and act/grad statistics.

    .. math::
        h_k' = \tanh\Big(\Theta_s h_k + \sum_{j \to k} \tanh(\Theta_f [h_j, e_{jk}])
              \;[+ \sum_{k \to m} \tanh(\Theta_b [h_m, e_{km}])]\Big)

    The bracketed backward term is present when ``flow="both"``. Nothing in it is
    scale-equivariant; only permutation-equivariant.
    """

    def __init__(self, channels: int, edge_channels: int, flow: str) -> None:
        super().__init__(aggr="add")
        self.both = flow == "both"
        self.self_lin = nn.Linear(channels, channels)
        self.forward_lin = nn.Linear(channels + edge_channels, channels)
        self.backward_lin = nn.Linear(channels + edge_channels, channels) if self.both else None

    def forward(self, h: Tensor, edge_index: Tensor, edge_feat: Tensor) -> Tensor:
        out = self.self_lin(h) + self.propagate(edge_index, h=h, edge_feat=edge_feat, lin=self.forward_lin)
        if self.both:
            out = out + self.propagate(edge_index.flip(0), h=h, edge_feat=edge_feat, lin=self.backward_lin)
        return torch.tanh(out)

    def message(self, h_j: Tensor, edge_feat: Tensor, lin: nn.Linear) -> Tensor:
        return torch.tanh(lin(torch.cat([h_j, edge_feat], dim=-1)))


class TinyModel(nn.Module):
    """Two MixingConv layers; outputs edge [E, 4], node [N, 2], graph [G, 3]."""

    def __init__(self, flow: str, channels: int = 8) -> None:
        super().__init__()
        node_in = (1 + NUM_NODE_KINDS) + 5
        edge_in = (1 + NUM_EDGE_KINDS) + 1
        self.encode = nn.Linear(node_in, channels)
        self.convs = nn.ModuleList([MixingConv(channels, edge_in, flow) for _ in range(2)])
        self.edge_head = nn.Linear(2 * channels + edge_in, 4)
        self.node_head = nn.Linear(channels, 2)
        self.graph_head = nn.Linear(channels, 3)

    def forward(self, graph) -> GradMetaNetOutput:
        act, grad_ = graph.act, graph.grad
        moments = [act.mean(1), grad_.mean(1), (act * grad_).mean(1), (act**2).mean(1), (grad_**2).mean(1)]
        stats = torch.stack(moments, dim=1)
        node_kind = F.one_hot(graph.node_kind, NUM_NODE_KINDS).to(stats.dtype)
        h = torch.tanh(self.encode(torch.cat([graph.x, node_kind, stats], dim=1)))
        src, dst = graph.edge_index
        edge_kind = F.one_hot(graph.edge_kind, NUM_EDGE_KINDS).to(stats.dtype)
        mean_grad = (act[src] * grad_[dst]).mean(1, keepdim=True)
        edge_feat = torch.cat([graph.edge_attr, edge_kind, mean_grad], dim=1)
        for conv in self.convs:
            h = conv(h, graph.edge_index, edge_feat)
        batch = getattr(graph, "batch", None)
        if batch is None:
            batch = torch.zeros(graph.num_nodes, dtype=torch.long)
        return GradMetaNetOutput(
            edge=self.edge_head(torch.cat([h[src], h[dst], edge_feat], dim=1)),
            node=self.node_head(h),
            graph=self.graph_head(global_mean_pool(h, batch)),
        )

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


EDGE_RULES = ["gradient", "weight", ("gradient", 2), "invariant"]
EDGE_EXPONENTS = torch.tensor([-1.0, 1.0, -2.0, 0.0], dtype=torch.float64)
NODE_RULES = ["weight", "gradient"]
NODE_EXPONENTS = torch.tensor([1.0, -1.0], dtype=torch.float64)


def graphs_for(activation: str) -> Batch:
    inputs = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    targets = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    specs = [([3, 4, 3, 2], [activation, activation, "none"], [True, True, True], 11),
             ([3, 5, 2], [activation, "none"], [False, True], 12)]
    graphs = [gradgraph.to_graph(build_mlp(*spec[:3], seed=spec[3]), inputs, targets, loss_fn=squared_error)
              for spec in specs]
    return Batch.from_data_list(graphs)


def equivariance_error(model: nn.Module, batch: Batch, seed: int) -> float:
    """Largest relative deviation from the declared transformation over all outputs.

    Deviations are measured in each output's canonical units (|canonical factor ratio|^e),
    so entries near zero neither hide nor inflate errors.
    """
    factors = random_node_factors(batch, generator=torch.Generator().manual_seed(seed))
    moved = transform_nodes(batch, factors)
    with torch.no_grad():
        before, after = model(batch), model(moved)
    src, dst = batch.edge_index
    # expected: edge y * (t_dst / t_src)^e, node y * t^e, graph unchanged
    expected_edge = before.edge * (factors[dst] / factors[src])[:, None] ** EDGE_EXPONENTS
    expected_node = before.node * factors[:, None] ** NODE_EXPONENTS
    canonical = canonicalize(moved).node_factors
    edge_units = (canonical[src] / canonical[dst]).abs()[:, None] ** EDGE_EXPONENTS
    node_units = (1 / canonical).abs()[:, None] ** NODE_EXPONENTS
    errors = [
        ((after.edge - expected_edge).abs() / (expected_edge.abs() + 1e-2 * edge_units)).max(),
        ((after.node - expected_node).abs() / (expected_node.abs() + 1e-2 * node_units)).max(),
        ((after.graph - before.graph).abs() / (before.graph.abs() + 1e-2)).max(),
    ]
    return float(max(errors))


def wrap(model: nn.Module) -> ScaleEquivariant:
    return ScaleEquivariant(model, edge=EDGE_RULES, node=NODE_RULES, graph="invariant")


@pytest.mark.parametrize("flow", ["forward", "both"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sine", "identity"])
def test_wrapper_outputs_transform_as_declared(flow, activation):
    torch.manual_seed(0)
    wrapped = wrap(TinyModel(flow).double())
    batch = graphs_for(activation)
    for seed in range(3):
        assert equivariance_error(wrapped, batch, seed) <= 1e-8


@pytest.mark.parametrize("flow", ["forward", "both"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_without_the_wrapper_the_model_is_not_scale_equivariant(flow, activation):
    torch.manual_seed(0)
    plain = TinyModel(flow).double()
    assert equivariance_error(plain, graphs_for(activation), seed=0) > 1e-3


def test_a_wrong_rule_is_caught_by_the_same_check():
    torch.manual_seed(0)
    # declares every edge channel invariant: the gradient-like channels then fail the check
    wrong = ScaleEquivariant(TinyModel("both").double(), edge="invariant", node=NODE_RULES)
    assert equivariance_error(wrong, graphs_for("relu"), seed=0) > 1e-3


def test_wrapper_keeps_permutation_equivariance():
    torch.manual_seed(0)
    wrapped = wrap(TinyModel("both").double())
    batch = graphs_for("relu")
    node_perm = random_node_permutation(batch, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, after = wrapped(batch), wrapped(permute_nodes(batch, node_perm))
    torch.testing.assert_close(after.edge, move_values(before.edge, edge_permutation(batch, node_perm)),
                               atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(after.node, move_values(before.node, node_perm), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(after.graph, before.graph, atol=1e-10, rtol=1e-8)


def test_wrapper_conventions_and_errors():
    torch.manual_seed(0)
    inner = TinyModel("forward").double()
    wrapped = ScaleEquivariant(inner, edge=("gradient", 2), node="gradient")
    assert "ScaleEquivariant(TinyModel(" in repr(wrapped) and "edge=('gradient', 2)" in repr(wrapped)
    before = inner.encode.weight.clone()
    wrapped.reset_parameters()
    assert not torch.equal(before, inner.encode.weight)
    batch = graphs_for("relu")
    assert wrapped(batch).edge.shape == (batch.edge_index.shape[1], 4)  # one rule for all channels
    with pytest.raises(GradGraphError, match="graph outputs can only be 'invariant'"):
        ScaleEquivariant(inner, graph="gradient")
    with pytest.raises(GradGraphError, match="unknown output rule 'bias'"):
        ScaleEquivariant(inner, edge="bias")
    with pytest.raises(GradGraphError, match="2 edge rules declared for a edge output with 4 channels"):
        ScaleEquivariant(inner, edge=["weight", "gradient"])(batch)
    with pytest.raises(GradGraphError, match="returned a node output but no node rule"):
        ScaleEquivariant(inner, node=None)(batch)

    class ReturnsTuple(nn.Module):
        def forward(self, graph):
            return graph.act, None

    with pytest.raises(GradGraphError, match="must return gradgraph.nn.GradMetaNetOutput"):
        ScaleEquivariant(ReturnsTuple())(batch)


# ------------------------------------------------------------- with GradMetaNet itself
def gradmetanet(flow: str) -> nn.Module:
    try:
        from gradgraph.nn import GradMetaNet
    except ImportError:
        pytest.skip("gradgraph.nn.GradMetaNet is not available")
    torch.manual_seed(0)
    return GradMetaNet(8, num_component_layers=1, num_node_layers=2, edge_out_channels=4,
                       node_out_channels=2, graph_out_channels=3, direction=flow).double()


@pytest.mark.parametrize(
    ("flow", "activation"), [("forward", "relu"), ("both", "relu"), ("forward", "tanh"), ("both", "sine")]
)
def test_wrapped_gradmetanet_is_scale_equivariant(flow, activation):
    wrapped = wrap(gradmetanet(flow))
    assert equivariance_error(wrapped, graphs_for(activation), seed=0) <= 1e-8


@pytest.mark.parametrize("flow", ["forward", "both"])
def test_plain_gradmetanet_is_not_scale_equivariant(flow):
    assert equivariance_error(gradmetanet(flow), graphs_for("relu"), seed=0) > 1e-3


# ------------------------------------------------- transformer feed-forward neurons
def test_transformer_ffn_neurons_rescale_like_mlp_neurons():
    """ReLU FFN hidden neurons of an attention block admit the same action (and only they do)."""
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True).double().eval()
    inputs = torch.randn(3, 5, 4, dtype=torch.float64)
    targets = torch.randn(3, 5, 4, dtype=torch.float64)

    def loss(output: Tensor, target: Tensor) -> Tensor:
        return ((output - target) ** 2).sum((1, 2))

    try:
        graph = gradgraph.to_graph(block, inputs, targets, loss_fn=loss)
    except gradgraph.UnsupportedModuleError:
        pytest.skip("no attention converter registered")
    can_scale, can_flip = admissible_transformations(graph)
    ffn = graph.node_kind == int(gradgraph.NodeKind.FFN_HIDDEN)
    assert torch.equal(can_scale, ffn) and not bool(can_flip.any())
    nodes = torch.nonzero(ffn).flatten()
    nodes = nodes[torch.argsort(graph.position[nodes])]
    scales = log_uniform_scales([len(nodes)], seed=3)[0]
    node_factors = torch.ones(graph.num_nodes, dtype=torch.float64)
    node_factors[nodes] = scales
    rescaled = copy.deepcopy(block)
    with torch.no_grad():
        rescaled.linear1.weight.mul_(scales[:, None])
        rescaled.linear1.bias.mul_(scales)
        rescaled.linear2.weight.div_(scales[None, :])
    torch.testing.assert_close(rescaled(inputs), block(inputs), atol=1e-10, rtol=1e-10)
    converted = gradgraph.to_graph(rescaled, inputs, targets, loss_fn=loss)
    acted = transform_nodes(graph, node_factors)
    torch.testing.assert_close(converted.edge_attr, acted.edge_attr, atol=0, rtol=1e-12)
    torch.testing.assert_close(converted.x, acted.x, atol=0, rtol=1e-12)
    close_in_units(converted.act, acted.act, node_factors[:, None])
    close_in_units(converted.grad, acted.grad, 1 / node_factors[:, None])
    assert_same_canonical(canonicalize(graph), canonicalize(acted))
    # attention neurons (e.g. queries) are not transformed by this module
    query = int(torch.nonzero(graph.node_kind == int(gradgraph.NodeKind.QUERY))[0])
    node_factors = torch.ones(graph.num_nodes, dtype=torch.float64)
    node_factors[query] = 2.0
    with pytest.raises(GradGraphError, match=f"node {query} .*kind QUERY"):
        transform_nodes(graph, node_factors)
