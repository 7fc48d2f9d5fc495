"""`transform_nodes`' checks of node factors and `admissible_transformations`' structural-edge
rule, on the inputs the orbit tests of `test_symmetry_scaling.py` never give: parameter-free
edges between hidden neurons, factors in (0, 1) on odd neurons, factors on inputs, a float32
graph with float64 factors, messages matched in full.

Each test's docstring names the mutants of the symmetry campaign (docs/mutation.md) it was
checked against, applied by hand.
"""

from __future__ import annotations

import pytest
import torch
from strategies import build_mlp, with_edges

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import admissible_transformations, transform_nodes
from gradgraph.symmetry.scaling import _describe_node


def graph_of(activations, dtype=torch.float64):
    model = build_mlp([3, 4, 4, 1], activations, [True, True, True], seed=2).to(dtype)
    return gradgraph.to_graph(model, torch.randn(5, 3, dtype=dtype))


def test_a_structural_edge_pins_both_of_its_neurons_and_no_other():
    """Checked against ``admissible_transformations`` 9, 10, 14-17 (``edge_param`` not read: the
    edge ignored), 24 (its target marked twice, its source not), 25 and 28 (an end left movable)."""
    graph = graph_of(["relu", "relu", "none"])
    can_scale, _ = admissible_transformations(graph)
    first, second = torch.nonzero(graph.layer == 1).flatten()[0], torch.nonzero(graph.layer == 2).flatten()[1]
    pinned, _ = admissible_transformations(with_edges(graph, [(int(first), int(second))], param=-1))
    expected = can_scale.clone()
    expected[first] = expected[second] = False
    assert bool(can_scale[first]) and bool(can_scale[second])
    assert torch.equal(pinned, expected)


def test_missing_fields_are_named_with_the_function_that_needs_them():
    """Checked against ``admissible_transformations`` 2, 5, 6 and ``_check_node_factors`` 2."""
    graph = graph_of(["relu", "relu", "none"])
    graph.activation = None
    with pytest.raises(GradGraphError) as error:
        admissible_transformations(graph)
    assert str(error.value) == ("admissible_transformations: the graph has no field(s) ['activation']; "
                                "build it with gradgraph.to_graph")
    with pytest.raises(GradGraphError) as error:
        transform_nodes(graph, torch.ones(graph.num_nodes))
    assert str(error.value).startswith("transform_nodes: the graph has no field(s) ['activation']")


def test_each_refused_factor_names_the_node_and_the_rule():
    """A factor on an input, on a neuron pinned by a structural edge, and 0.5 on a tanh neuron.
    Checked against ``_check_node_factors`` 45, 51-54 (the messages) and 58 (``> 1``: a positive
    factor below 1 let through on a neuron that admits only sign flips)."""
    relu = graph_of(["relu", "relu", "none"])
    factors = torch.ones(relu.num_nodes, dtype=torch.float64)
    factors[0] = 2.0
    with pytest.raises(GradGraphError) as error:
        transform_nodes(relu, factors)
    assert str(error.value) == (f"transform_nodes: cannot apply factor 2 to {_describe_node(relu, 0)}: only hidden "
                                "neurons are transformed; inputs, outputs and other node kinds keep factor 1")

    hidden = int(torch.nonzero(relu.layer == 1).flatten()[0])
    other = int(torch.nonzero(relu.layer == 2).flatten()[0])
    pinned = with_edges(relu, [(hidden, other)], param=-1)
    factors = torch.ones(pinned.num_nodes, dtype=torch.float64)
    factors[hidden] = 2.0
    with pytest.raises(GradGraphError) as error:
        transform_nodes(pinned, factors)
    assert str(error.value) == (
        f"transform_nodes: cannot apply factor 2 to {_describe_node(pinned, hidden)}: the neuron touches a structural "
        "edge (no parameter) that cannot absorb the factor, or its activation admits neither scaling nor sign flips")

    tanh = graph_of(["tanh", "tanh", "none"])
    factors = torch.ones(tanh.num_nodes, dtype=torch.float64)
    factors[hidden] = 0.5
    with pytest.raises(GradGraphError, match=r"cannot apply factor 0\.5 to .*a positive factor != 1 needs a "
                                             r"positively homogeneous activation"):
        transform_nodes(tanh, factors)


def test_factors_of_another_dtype_act_in_the_graph_s_dtype():
    """A float32 graph moved by float64 factors stays float32. Checked against
    ``_check_node_factors`` 5 and 7 (the factors left in their own dtype)."""
    graph = graph_of(["relu", "relu", "none"], dtype=torch.float32)
    factors = torch.ones(graph.num_nodes, dtype=torch.float64)
    factors[int(torch.nonzero(graph.layer == 1).flatten()[0])] = 3.0
    moved = transform_nodes(graph, factors)
    assert moved.act.dtype == moved.grad.dtype == moved.edge_attr.dtype == moved.x.dtype == torch.float32
