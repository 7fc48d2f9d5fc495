"""The cache of architecture-only tensors as MLP chains use it (the traced converter's plans):
hits equal fresh builds, architectures never collide, and graphs never share a tensor that
holds values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from strategies import build_mlp, mlp_specs
from torch import nn

import gradgraph
from gradgraph import ActivationKind
from gradgraph.convert import mlp
from gradgraph.convert.layout import make_plan
from gradgraph.convert.assembly import assemble
from gradgraph.convert.plan import PLAN_CACHE, PlanCache, TracePlan
from gradgraph.convert.trace import trace_model
from gradgraph.symmetry import permute_nodes, random_node_factors, random_node_permutation, transform_nodes

#: Fields that depend only on the architecture: every graph of one architecture shares them.
SHARED_FIELDS = (
    "edge_index", "edge_kind", "edge_param", "edge_param_pos", "layer", "node_kind", "activation", "perm_group",
    "perm_block", "perm_tie", "position", "node_param", "node_param_pos",
)
#: Per-call fields: every graph must own these.
VALUE_FIELDS = ("x", "edge_attr", "act", "grad", "component_sample")


def cached_plan() -> TracePlan:
    """The one plan in the cache."""
    assert len(PLAN_CACHE) == 1
    return next(iter(PLAN_CACHE._entries.values()))


def plan_built_afresh(model: nn.Module, inputs: torch.Tensor) -> TracePlan:
    """A plan traced from scratch, bypassing the cache."""
    return make_plan(trace_model(model, inputs, model))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).sum(dim=1)


def convert(model: nn.Module, seed: int = 0, batch: int = 3) -> gradgraph.GradGraph:
    """``to_graph`` of ``model`` on a random batch (in the model's dtype)."""
    first = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    in_features = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    out_features = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    inputs = torch.randn(batch, in_features, generator=generator).to(first.dtype)
    targets = torch.randn(batch, out_features, generator=generator).to(first.dtype)
    return gradgraph.to_graph(model, inputs, targets, squared_error)


def assert_graphs_equal(first: gradgraph.GradGraph, second: gradgraph.GradGraph) -> None:
    """Same keys, and every field equal in value, dtype and shape (lists compared as lists)."""
    assert sorted(first.keys()) == sorted(second.keys())
    for key in first.keys():
        a, b = first[key], second[key]
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key
        else:
            assert a == b, key


def snapshot(graph: gradgraph.GradGraph) -> dict[str, object]:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in graph.items()}


def assert_matches_snapshot(graph: gradgraph.GradGraph, saved: dict[str, object]) -> None:
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(graph[key], value), key
        else:
            assert graph[key] == value, key


@pytest.fixture(autouse=True)
def empty_cache():
    """Every test starts (and leaves) with an empty cache, so hit/miss counts are its own."""
    mlp.clear_structure_cache()
    yield
    mlp.clear_structure_cache()


@settings(max_examples=25, deadline=None)
@given(spec=mlp_specs(max_depth=4, max_width=10))
def test_cache_hit_gives_the_graph_of_a_cache_less_build(spec):
    widths, activations, biases, seed = spec
    mlp.clear_structure_cache()
    model = build_mlp(widths, activations, biases, seed=seed)
    first = convert(model, seed)  # miss: builds the structure
    second = convert(model, seed)  # hit: reuses it
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (1, 1)
    assert_graphs_equal(first, second)

    # a structure built from scratch, bypassing the cache, gives the same graph
    fresh = plan_built_afresh(model, second.act[: widths[0]].T.contiguous())
    uncached = assemble(fresh, dict(model.named_parameters()), second.act, second.grad, second.num_datapoints)
    uncached.loss = second.loss  # the losses come from the objective, which assemble does not see
    assert_graphs_equal(second, uncached)

    # another model of the same architecture hits the cache and still gets its own values
    other = build_mlp(widths, activations, biases, seed=seed + 1)
    third = convert(other, seed)
    assert PLAN_CACHE.hits == 2
    for name, value in third.to_parameters(third.weight, third.bias).items():
        torch.testing.assert_close(value, dict(other.named_parameters())[name].detach(), rtol=0, atol=0)


def test_signatures_separate_widths_biases_and_activations_and_share_dtypes():
    variants = {
        "base": build_mlp([3, 4, 2], ["relu", "none"], [True, True]),
        "activation": build_mlp([3, 4, 2], ["tanh", "none"], [True, True]),
        "bias": build_mlp([3, 4, 2], ["relu", "none"], [False, True]),
        "width": build_mlp([3, 5, 2], ["relu", "none"], [True, True]),
        "dtype": build_mlp([3, 4, 2], ["relu", "none"], [True, True], dtype=torch.float32),
    }
    graphs = {name: convert(model) for name, model in variants.items()}
    # the cached tensors hold only integer labels, so a float32 model of the base
    # architecture reuses the float64 model's structure
    assert PLAN_CACHE.misses == len(variants) - 1 and PLAN_CACHE.hits == 1
    assert len(PLAN_CACHE) == len(variants) - 1
    assert graphs["dtype"].edge_index is graphs["base"].edge_index

    # each graph carries its own architecture, not a neighbour's
    assert graphs["base"].activation[3:7].tolist() == [int(ActivationKind.RELU)] * 4
    assert graphs["activation"].activation[3:7].tolist() == [int(ActivationKind.TANH)] * 4
    assert graphs["base"].node_param[3:7].tolist() == [1, 1, 1, 1]
    assert graphs["bias"].node_param[3:7].tolist() == [-1, -1, -1, -1]
    assert graphs["bias"].param_names == ["0.weight", "2.weight", "2.bias"]
    assert graphs["width"].edge_index.shape == (2, 3 * 5 + 5 * 2)
    assert graphs["dtype"].x.dtype == graphs["dtype"].edge_attr.dtype == torch.float32
    assert graphs["base"].x.dtype == graphs["base"].edge_attr.dtype == torch.float64
    for name, model in variants.items():
        graph = graphs[name]
        params = graph.to_parameters(graph.weight, graph.bias)
        for param_name, param in model.named_parameters():
            assert torch.equal(params[param_name], param.detach()), (name, param_name)


def test_graphs_of_one_architecture_share_only_read_only_structure():
    model = build_mlp([4, 6, 6, 3], ["relu", "tanh", "none"], [True, False, True])
    first, second = convert(model, seed=0), convert(model, seed=1)
    for key in SHARED_FIELDS:
        assert first[key] is second[key], key  # documented: shared, read-only
    for key in VALUE_FIELDS:
        assert first[key].untyped_storage().data_ptr() != second[key].untyped_storage().data_ptr(), key

    saved = snapshot(second)
    first.edge_attr.mul_(-3.0)
    first.x.add_(1.0)
    first.act.zero_()
    first.grad.fill_(2.0)
    first.component_sample.add_(5)
    first.param_names.append("extra")
    first.param_shapes[0][0] = 99
    assert_matches_snapshot(second, saved)
    assert_graphs_equal(convert(model, seed=1), second)  # and later conversions are unaffected


def test_symmetry_actions_on_one_graph_leave_other_graphs_alone():
    model = build_mlp([4, 6, 6, 3], ["relu", "tanh", "none"], [True, True, True])
    first, second = convert(model, seed=0), convert(model, seed=0)
    saved_first, saved_second = snapshot(first), snapshot(second)
    generator = torch.Generator().manual_seed(3)
    permuted = permute_nodes(first, random_node_permutation(first, generator))
    rescaled = transform_nodes(first, random_node_factors(first, generator=generator))
    assert not torch.equal(permuted.edge_attr, first.edge_attr)
    assert not torch.equal(rescaled.edge_attr, first.edge_attr)
    # writing into a permuted graph's values touches neither source nor sibling
    permuted.edge_attr.zero_()
    permuted.x.zero_()
    permuted.act.zero_()
    assert_matches_snapshot(first, saved_first)
    assert_matches_snapshot(second, saved_second)
    assert_graphs_equal(convert(model, seed=0), second)


def test_an_in_place_write_into_shared_structure_does_not_poison_later_conversions():
    model = build_mlp([3, 5, 2], ["relu", "none"], [True, True])
    reference = snapshot(convert(model))
    damaged = convert(model)
    damaged.edge_index[0, 0] = 4  # misuse: the field is documented read-only
    damaged.perm_group.fill_(-1)
    again = convert(model)
    assert PLAN_CACHE.misses == 2  # the damaged entry was noticed and rebuilt
    assert_matches_snapshot(again, reference)
    assert again.edge_index is not damaged.edge_index


def test_cache_is_bounded_and_least_recently_used_goes_first():
    plans = {}
    for name, widths in (("a", [3, 4, 2]), ("b", [3, 4]), ("c", [5, 2]), ("big", [30, 30])):
        model = build_mlp(widths, ["relu"] * (len(widths) - 1), [True] * (len(widths) - 1))
        plans[name] = plan_built_afresh(model, torch.randn(2, widths[0], dtype=torch.float64))
    cache = PlanCache(max_entries=2, max_bytes=10**9)
    cache.put("a", plans["a"])
    cache.put("b", plans["b"])
    assert cache.get("a") is plans["a"]  # a is now the most recently used
    cache.put("c", plans["c"])  # evicts b
    assert len(cache) == 2 and cache.get("a") is plans["a"]
    misses = cache.misses
    assert cache.get("b") is None
    assert cache.misses == misses + 1

    small = PlanCache(max_entries=8, max_bytes=1000)
    assert plans["big"].nbytes > 1000
    small.put("big", plans["big"])  # larger than the budget: used once, not kept
    assert small.get("big") is None
    assert len(small) == 0 and small.nbytes == 0


def test_template_graph_is_never_handed_out_or_changed():
    model = build_mlp([3, 4, 2], ["relu", "none"], [True, True])
    graph = convert(model)
    template = cached_plan().template_on(torch.device("cpu"))
    assert graph is not template
    assert sorted(template.keys()) == sorted(SHARED_FIELDS)
    graph.x = torch.zeros(1)
    graph.new_field = torch.ones(2)
    assert sorted(template.keys()) == sorted(SHARED_FIELDS)
