"""A statistic of the batch made under ``torch.no_grad()`` inside ``forward`` (``Tracer.cut_gradient``,
``Tracer.lift_reattached``, ``Tracer.cut_in_output``), with the words of each refusal matched up to the source
location (under mutmut the location is its trampoline's frame, so it is not matched).

The refusals guard a silent wrong answer: on the code before session 25 each refused model here converted, every
per-sample gradient differing from the datapoint's own (``test_convert_safety.py`` checks the difference). Each
converting model is compared with each datapoint's gradient computed on it alone (float64, 1e-12).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from convert_values import HalfErfinv
from torch import nn

import gradgraph

DTYPE = torch.float64
REFUSAL = ("the model's output: is made from values of the datapoints whose gradient was cut ({how} at {where}): a "
           "statistic of the batch made so (out / out.detach().abs().max()) couples the 6 datapoints where autograd "
           "sees a constant, and gradgraph cannot tell it from one of a datapoint alone, so every per-sample gradient "
           "could be silently wrong. Compute the output with gradient (no detach or torch.no_grad()), or convert one "
           "datapoint at a time")


class Tailed(nn.Module):
    """``tail(head(tanh(inp(x))), model)``."""

    def __init__(self, tail) -> None:
        super().__init__()
        self.inp, self.head, self.tail = nn.Linear(3, 6), nn.Linear(6, 4), tail

    def forward(self, x):
        return self.tail(self.head(torch.tanh(self.inp(x))), self)


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def batch(b: int = 6):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, generator=generator, dtype=DTYPE), torch.randint(0, 4, (b,), generator=generator)


def refusal_of(tail) -> str:
    torch.manual_seed(0)
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(Tailed(tail).to(DTYPE), inputs, targets, cross_entropy)
    return str(refusal.value).split(" in Tailed.forward: ", 1)[-1].split(": ", 1)[-1]


def assert_each_datapoints_own_gradient(tail, b: int = 6) -> None:
    torch.manual_seed(0)
    model = Tailed(tail).to(DTYPE)
    inputs, targets = batch(b)
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    params = list(model.parameters())
    for i in range(b):
        alone = torch.autograd.grad(cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), params)
        for k, (name, _) in enumerate(model.named_parameters()):
            torch.testing.assert_close(graph.per_sample_grads()[name][i], alone[k], atol=1e-12, rtol=0, msg=name)


def over_the_largest_under_no_grad(output, model):
    with torch.no_grad():
        largest = output.abs().max()
    return output / largest


def over_the_detached_largest_under_no_grad(output, model):
    with torch.no_grad():
        largest = output.detach().abs().max()
    return output / largest


def matches(message: str, how: str) -> bool:
    pattern = re.escape(REFUSAL).replace(re.escape("{how}"), re.escape(how)).replace(re.escape("{where}"), ".+?")
    return re.fullmatch(pattern, message) is not None


def test_a_statistic_of_the_batch_under_no_grad_is_refused_naming_the_op_and_how():
    """The op that made the statistic is named with ``under torch.no_grad()``; a ``detach`` before it keeps the first
    cut's name (the value was cut there already)."""
    message = refusal_of(over_the_largest_under_no_grad)
    assert matches(message, "Tensor.max under torch.no_grad()"), message
    message = refusal_of(over_the_detached_largest_under_no_grad)
    assert matches(message, "Tensor.detach"), message


def test_one_datapoint_and_a_statistic_of_each_datapoint_with_a_rule_under_no_grad_convert_exactly():
    """With one datapoint the batch's statistic is the datapoint's own; an op with a rule under ``no_grad`` (each
    row's largest entry) keeps neuron values of each datapoint, which are not marked: both convert exactly."""
    assert_each_datapoints_own_gradient(over_the_largest_under_no_grad, b=1)

    def over_each_rows_largest(output, model):
        with torch.no_grad():
            largest = output.abs().amax(-1, keepdim=True)
        return output / largest

    assert_each_datapoints_own_gradient(over_each_rows_largest)


def test_a_custom_function_returned_as_the_output_or_read_again_converts_exactly():
    """A custom ``autograd.Function``'s opaque forward value is made without gradient, then given a ``grad_fn``: as
    the model's output (lifted by ``cut_in_output``) or read by a later op (lifted where it is read) it converts
    exactly; an op without a rule under ``no_grad`` on the Function's output is refused again (a fresh cut)."""
    assert_each_datapoints_own_gradient(lambda output, model: HalfErfinv.apply(torch.tanh(output)))
    assert_each_datapoints_own_gradient(lambda output, model: output * HalfErfinv.apply(torch.tanh(output)))

    def over_its_largest(output, model):
        value = HalfErfinv.apply(torch.tanh(output))
        with torch.no_grad():
            largest = value.abs().max()
        return value / largest

    message = refusal_of(over_its_largest)  # abs has no rule for an opaque value: the first op without gradient
    assert matches(message, "Tensor.abs under torch.no_grad()"), message
