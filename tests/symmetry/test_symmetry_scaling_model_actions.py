"""`rescale_hidden` / `flip_hidden` on a model and `transform_nodes` on a graph with
``component_x``: the inputs the orbit tests of `test_symmetry_scaling.py` never give (a zero
scale, a float32 model with float64 factors, the model path's messages, a graph carrying
extra component features), messages matched in full.

Written for the survivors of the `scaling.py` run of mutation campaign 3 (docs/mutation.md);
each test's docstring names the mutants it was checked against (run on each with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/symmetry/mutants/``: the test failed).
"""

from __future__ import annotations

import re

import pytest
import torch
from strategies import build_mlp

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import admissible_transformations, canonicalize, flip_hidden, rescale_hidden, transform_nodes

DTYPE = torch.float64


def tanh_relu_model(dtype=DTYPE):
    """``Linear(2, 4) -> Tanh -> Linear(4, 3) -> ReLU -> Linear(3, 1)``."""
    return build_mlp([2, 4, 3, 1], ["tanh", "relu", "none"], [True, True, True], seed=3, dtype=dtype)


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_a_zero_scale_is_refused_by_rescale_hidden_on_a_model_and_on_its_graph():
    """A zero scale would zero a neuron's incoming weights and divide its outgoing ones by 0;
    ``rescale_hidden`` refuses it before anything else, with its own message on both routes.
    Checked against ``x_rescale_hidden__mutmut_5`` (``<= 0`` made ``< 0``: the model path then
    returned a model with infinite weights, the graph path raised ``transform_nodes``' message)
    and ``8`` (the message changed)."""
    model = tanh_relu_model()
    graph = gradgraph.to_graph(model, torch.randn(3, 2, dtype=DTYPE))
    zero = torch.tensor([1.0, 0.0, 2.0], dtype=DTYPE)
    message = "rescale_hidden: scales must be > 0; use flip_hidden for signs"
    with pytest.raises(GradGraphError, match=full(message)):
        rescale_hidden(model, [None, zero])
    with pytest.raises(GradGraphError, match=full(message)):
        rescale_hidden(graph, [None, zero])


def test_flip_hidden_on_a_model_names_itself_in_every_message():
    """The model path's messages start with the action's name (the ``what`` passed down to the
    layer checks). Checked against ``x_flip_hidden__mutmut_13`` (the sign message changed),
    ``25`` (``what`` passed as ``None``), ``29``, ``30`` (the name misspelt)."""
    model = tanh_relu_model()
    ones = torch.ones(3, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=full("flip_hidden: signs must be +1 or -1")):
        flip_hidden(model, [None, 2 * ones])
    message = (
        "flip_hidden: cannot flip the signs of the neurons of '2' (Linear(in_features=4, out_features=3, "
        "bias=True)): its activation RELU is not odd (only IDENTITY, TANH, SINE are)"
    )
    with pytest.raises(GradGraphError, match=full(message)):
        flip_hidden(model, [None, -ones])
    with pytest.raises(GradGraphError, match=full("flip_hidden: factors for '0' must have shape [4], got [3]")):
        flip_hidden(model, [ones, None])
    with pytest.raises(GradGraphError, match=full("flip_hidden: expected 2 factor tensors (one per hidden "
                                                  "layer), got 3")):
        flip_hidden(model, [None, None, None])
    # and an admissible flip is the same function
    flipped = flip_hidden(model, [-torch.ones(4, dtype=DTYPE), None])
    inputs = torch.randn(5, 2, dtype=DTYPE)
    torch.testing.assert_close(flipped(inputs), model(inputs), atol=1e-12, rtol=0)


def test_a_float32_model_rescaled_with_float64_factors_rounds_as_its_graph_does():
    """The factors are cast to the model's dtype before they are applied, as ``transform_nodes``
    casts node factors to the graph's, so ``to_graph(rescale_hidden(model, s))`` and
    ``rescale_hidden(to_graph(model), s)`` hold the same float32 weights bit for bit. Checked
    against ``x__transform_model__mutmut_6`` (``dtype = None``) and ``12`` (``None`` passed as the
    dtype to ``_check_layer_factors``): the float64 factors were then applied in float64 and
    rounded once, and some weights differed in their last bit."""
    model = build_mlp([3, 16, 16, 1], ["relu", "relu", "none"], [True, True, True], seed=5, dtype=torch.float32)
    inputs = torch.randn(4, 3)
    generator = torch.Generator().manual_seed(0)
    scales = [torch.exp(torch.randn(16, dtype=DTYPE, generator=generator)) for _ in range(2)]
    assert any(not torch.equal(s, s.float().double()) for s in scales)  # not exact in float32
    of_model = gradgraph.to_graph(rescale_hidden(model, scales), inputs)
    on_graph = rescale_hidden(gradgraph.to_graph(model, inputs), scales)
    assert of_model.edge_attr.dtype == torch.float32
    assert torch.equal(of_model.edge_attr[:, 0], on_graph.edge_attr[:, 0])
    assert torch.equal(of_model.x[:, 0], on_graph.x[:, 0])


def test_a_graph_with_component_x_is_refused_by_every_scale_action():
    """``component_x`` holds features with no known scale action, so moving a graph that has it
    would be silently wrong: ``transform_nodes`` and ``canonicalize`` refuse it, with one message.
    Checked against ``x__apply_factors__mutmut_1``, ``6``, ``7`` (the attribute not read: the
    graph transformed, its ``component_x`` copied unchanged) and ``9``-``13`` (the message
    dropped or changed)."""
    graph = gradgraph.to_graph(tanh_relu_model(), torch.randn(3, 2, dtype=DTYPE))
    graph.component_x = torch.randn(graph.num_nodes, graph.num_components, 2, dtype=DTYPE)
    message = (
        "cannot rescale or flip a graph with component_x: its features have no defined scale/sign action; "
        "drop component_x (or transform it yourself) first"
    )
    factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=full(message)):
        transform_nodes(graph, factors)
    with pytest.raises(GradGraphError, match=full(message)):
        canonicalize(graph)
    del graph.component_x
    assert torch.equal(transform_nodes(graph, factors).edge_attr, graph.edge_attr)


def test_a_graph_without_the_optional_fields_is_checked_and_described_without_them():
    """``edge_param``, ``node_param``, ``param_names`` and ``position`` are optional (a graph built
    by hand may lack them; ``Data`` raises ``AttributeError`` for a missing key, only ``batch`` reads
    as ``None``): without ``edge_param`` every edge counts as a parameter, and a refusal's message
    leaves out the module and the position. Checked against ``x_admissible_transformations__mutmut_14``,
    ``x__describe_node__mutmut_29``, ``x__module_of_node__mutmut_6``, ``25``, ``38`` (``getattr``
    without its default: an ``AttributeError``), listed as equivalent before this test."""
    graph = gradgraph.to_graph(tanh_relu_model(), torch.randn(3, 2, dtype=DTYPE))
    can_scale, can_flip = admissible_transformations(graph)
    bare = graph.clone()
    del bare.edge_param
    assert all(torch.equal(a, b) for a, b in zip(admissible_transformations(bare), (can_scale, can_flip)))
    factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    factors[0] = 2.0
    reason = "only hidden neurons are transformed; inputs, outputs and other node kinds keep factor 1"
    relu = int(torch.nonzero(can_scale)[0])
    relu_factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    relu_factors[relu] = -1.0
    flip_reason = "a negative factor needs an odd activation (IDENTITY, TANH, SINE)"
    del bare.node_param  # the module is then read from nowhere
    with pytest.raises(GradGraphError, match=full(
            f"transform_nodes: cannot apply factor -1 to node {relu} (position {int(graph.position[relu])}, "
            f"kind HIDDEN, activation RELU): {flip_reason}")):
        transform_nodes(bare, relu_factors)
    del bare.param_names, bare.position
    with pytest.raises(GradGraphError, match=full(
            f"transform_nodes: cannot apply factor 2 to node 0 (kind INPUT, activation IDENTITY): {reason}")):
        transform_nodes(bare, factors)
