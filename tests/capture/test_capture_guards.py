"""capture's guards and closure helpers: each refusal names what was wrong, in full.

Written for the survivors of the first mutmut run over ``capture.py`` (docs/mutation.md): the
messages were matched by a word or not at all, the closure helpers were reached only by the
optimizer's tests, and an unused recorded tensor's zero gradient was never looked at.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradgraph
from gradgraph import GradGraphError, NonFiniteFactorError
from gradgraph.capture import (
    Recorder,
    check_closure_losses,
    check_finite,
    check_materialised,
    closure_inputs,
    per_datapoint_objective,
)

DTYPE = torch.float64


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


class Scaled(nn.Module):
    """``scale * lin(x)``; ``scale`` is a keyword of the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, inputs, scale=1.0):
        return scale * self.lin(inputs)


class Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_messages_of_the_recorder_and_the_objective():
    recorder = Recorder()
    x = torch.randn(2, 3, requires_grad=True)
    recorder.record("x", x)
    with pytest.raises(GradGraphError, match=exactly(
            "'x' was recorded twice in one forward pass; modules that are called more than once (shared weights) "
            "are not supported")):
        recorder.record("x", x)
    output = torch.randn(4, 2)
    with pytest.raises(GradGraphError, match=exactly("targets were given but no loss_fn; pass loss_fn or drop targets")):
        per_datapoint_objective(output, torch.zeros(4), None, 4)
    with pytest.raises(GradGraphError, match=exactly(
            "output mode (loss_fn=None) needs one scalar output per datapoint, shape [4] or [4, 1]; the model "
            "returned [4, 2]. Pass a per-datapoint loss_fn instead.")):
        per_datapoint_objective(output, None, None, 4)
    with pytest.raises(GradGraphError, match=exactly(
            "loss_fn must return one unreduced loss per datapoint, shape [4]; got float. Use reduction='none' and "
            "reduce any feature dimensions yourself.")):
        per_datapoint_objective(output, None, lambda out, t: 1.0, 4)
    torch.testing.assert_close(per_datapoint_objective(output[:, :1], None, None, 4), output[:, 0])


def test_check_finite_counts_the_bad_values():
    check_finite("act", torch.ones(2, 2))
    bad = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [3.0, 4.0]])
    with pytest.raises(NonFiniteFactorError, match=exactly(
            "grad has 2 non-finite value(s) (shape [3, 2]); check the inputs, the loss and the model's weights")):
        check_finite("grad", bad)


def test_check_materialised_names_the_model():
    check_materialised(nn.Linear(2, 2), "to_graph")
    with pytest.raises(GradGraphError, match=exactly(
            "to_graph: Linear has parameters on the 'meta' device (shapes without values); materialise and load "
            "its weights first (model.to_empty(device=...) + load_state_dict)")):
        check_materialised(nn.Linear(2, 2, device="meta"), "to_graph")


def test_closure_inputs_positional_by_keyword_and_refused():
    model, x = Scaled(), torch.randn(4, 3)
    inputs, rest, kwargs = closure_inputs(model, False, (x, 2.0), {"scale": 3.0})
    assert inputs is x and rest == (2.0,) and kwargs == {"scale": 3.0}
    inputs, rest, kwargs = closure_inputs(model, False, (), {"inputs": x, "scale": 3.0})
    assert inputs is x and rest == () and kwargs == {"scale": 3.0}
    with pytest.raises(GradGraphError, match=exactly(
            "the closure called Scaled twice; gradgraph converts one forward per closure call")):
        closure_inputs(model, True, (x,), {})
    with pytest.raises(GradGraphError, match=exactly(
            "the closure must call Scaled with the input tensor as its first argument (positionally or as "
            "inputs=...); got positional ['float'] and keywords ['scale']")):
        closure_inputs(model, False, (1.0,), {"scale": 3.0})
    with pytest.raises(GradGraphError, match=exactly(
            "the closure must call Scaled with the input tensor as its first argument (positionally or as "
            "inputs=...); got positional [] and keywords ['x']")):
        closure_inputs(model, False, (), {"x": x})


def test_check_closure_losses():
    check_closure_losses(torch.zeros(4), 4)
    for losses, got in [(torch.zeros(4, 1), "[4, 1]"), (torch.zeros(3), "[3]"), (torch.zeros(()), "[]"),
                        (1.0, "float")]:
        with pytest.raises(GradGraphError, match=exactly(
                "the closure must return the per-datapoint losses, shape [4] (e.g. cross_entropy(..., "
                f"reduction='none')), without calling backward; it returned {got}")):
            check_closure_losses(losses, 4)


def test_capture_passes_forward_kwargs_and_refuses_tuples():
    torch.manual_seed(0)
    model = Scaled().to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    plain = gradgraph.capture(model, x, modules=["lin"])
    scaled = gradgraph.capture(model, x, modules=["lin"], forward_kwargs={"scale": 3.0})
    torch.testing.assert_close(scaled.grads["lin:output"], 3 * plain.grads["lin:output"], atol=1e-14, rtol=0)
    with pytest.raises(GradGraphError, match=exactly("the model returned tuple; expected a Tensor")):
        gradgraph.capture(Pair(), x)
    wrapped = nn.Sequential(Pair())
    with pytest.raises(GradGraphError, match=exactly("module '0' returned tuple, expected a Tensor")):
        gradgraph.capture(wrapped, x, modules=["0"])


def test_a_recorded_tensor_the_output_does_not_use_gets_a_zero_gradient():
    model = Scaled().to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)

    def forward(inputs, recorder):
        recorder.record("unused", inputs * 2, grad=True)
        return model(inputs)

    recorded = gradgraph.capture(model, x, forward=forward)
    assert torch.equal(recorded.grads["unused"], torch.zeros(4, 3, dtype=DTYPE))


class Starred(nn.Module):
    """A forward with no first parameter a call could name."""

    def forward(self, *inputs):
        return inputs[0]


def test_closure_inputs_of_forwards_with_one_parameter_or_none_to_name():
    """Written for the survivors of the second capture.py run: ``_first_parameter_name`` on a
    one-parameter forward (``nn.Linear``'s ``input``) and on ``forward(*inputs)`` (no name, so
    no hint in the message)."""
    x = torch.randn(2, 3)
    inputs, rest, kwargs = closure_inputs(nn.Linear(3, 1), False, (), {"input": x})
    assert inputs is x and rest == () and kwargs == {}
    with pytest.raises(GradGraphError, match=exactly(
            "the closure must call Starred with the input tensor as its first argument; got positional [] and "
            "keywords ['inputs']")):
        closure_inputs(Starred(), False, (), {"inputs": x})
