"""`canonicalize`'s refusals and its zero-norm neuron, which the orbit tests of
`test_symmetry_scaling.py` (random weights: no zero rows, forward-only edges) never reach.

Each test's docstring names the mutants of the symmetry campaign (docs/mutation.md) it was
checked against, applied by hand.
"""

from __future__ import annotations

import torch
import pytest
from strategies import build_mlp, with_edges

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import canonicalize, random_node_factors, transform_nodes
from gradgraph.symmetry.scaling import _describe_node


def relu_graph():
    model = build_mlp([3, 4, 4, 1], ["relu", "relu", "none"], [True, True, True], seed=2)
    return model, gradgraph.to_graph(model, torch.randn(5, 3, dtype=torch.float64))


def test_a_graph_without_a_field_it_needs_is_refused_naming_it():
    """Checked against ``canonicalize`` 2, 5, 6 (the function's name in the message)."""
    _, graph = relu_graph()
    graph.layer = None
    with pytest.raises(GradGraphError) as error:
        canonicalize(graph)
    assert str(error.value) == "canonicalize: the graph has no field(s) ['layer']; build it with gradgraph.to_graph"


def test_an_edge_into_a_movable_neuron_from_its_own_or_a_later_layer_is_refused_naming_the_first():
    """An edge between two neurons of one layer (and a later one from the last hidden layer back
    into the first): no forward order. The message names the first such edge, its target and its
    source's layer. Checked against ``canonicalize`` 15 (``>=`` -> ``>``: a same-layer edge let
    through), 16-19 and 21-28 (the check or its message broken), 20 (the second edge named)."""
    _, graph = relu_graph()
    hidden = torch.nonzero(graph.layer == 1).flatten().tolist()
    later = torch.nonzero(graph.layer == 2).flatten().tolist()
    same_layer, backwards = (hidden[0], hidden[1]), (later[0], hidden[2])
    # read as entries of a parameter: a parameter-free edge would pin its neurons, and they would not be movable
    broken = with_edges(graph, [same_layer, backwards], param=0, weight=0.5)
    first = graph.edge_index.shape[1]
    expected = (f"canonicalize: edge {first} enters {_describe_node(broken, hidden[1])} from node {hidden[0]} "
                f"of layer 1, not an earlier layer; cannot canonicalise in forward order")
    with pytest.raises(GradGraphError) as error:
        canonicalize(broken)
    assert str(error.value) == expected


def test_a_neuron_whose_incoming_weights_and_bias_are_all_zero_keeps_factor_one():
    """Its incoming vector has norm 0: no scale is defined, so it is left as it is (as the
    docstring says), and every factor stays finite. Checked against ``canonicalize`` 88
    (``norm >= 0``: the factor 1/0)."""
    model, _ = relu_graph()
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = 0.0
    graph = gradgraph.to_graph(model, torch.randn(5, 3, dtype=torch.float64))
    result = canonicalize(graph)
    assert bool(torch.isfinite(result.node_factors).all())
    dead = int(torch.nonzero(graph.layer == 1).flatten()[1])
    assert float(result.node_factors[dead]) == 1.0
