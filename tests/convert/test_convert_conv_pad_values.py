"""A constant ``F.pad`` that is not of a channel map's spatial axes: the trace's pad rule
(``ConvRules.pads_positions``) leaves it to the other rules, which refuse it as an op without a rule
(a pad of features) or as an op on a parameter (a padded kernel), in those words.

Written for the survivors of run convert 14 (docs/mutation.md, ``pads_positions`` after it accepted
the raw input image); each test's docstring names the mutants it was checked against
(``MUTANT_UNDER_TEST=NAME`` in ``.mutation/convert-conv/mutants/``: the test failed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradgraph

DTYPE = torch.float64


def squared_error(output, target):
    return ((output - target) ** 2).sum(1)


class PadSlots(nn.Module):
    """``Linear -> unsqueeze(-1) -> F.pad`` of that new axis (a constant slot beside each feature) ``-> Linear``:
    neither the neurons nor the components vary along the padded axis, and axis 1 holds tokens, not channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.pad(self.a(x).unsqueeze(-1), (1, 0)).flatten(2)).sum(1)


class PadKernel(nn.Module):
    """A convolution whose kernel is a parameter padded by one tap (``F.pad`` of the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.kernel = nn.Linear(3, 3), nn.Parameter(torch.randn(2, 3, 2))

    def forward(self, x):
        return F.conv1d(self.a(x.transpose(1, 2)).transpose(1, 2), F.pad(self.kernel, (1, 0))).sum(-1)


def refusal(model, inputs) -> str:
    torch.manual_seed(0)
    model = model.to(DTYPE)
    targets = torch.randn(inputs.shape[0], 2, dtype=DTYPE)
    try:
        gradgraph.to_graph(model, inputs, targets, squared_error)
    except gradgraph.UnsupportedModuleError as error:
        return str(error)
    raise AssertionError("converted")


def test_a_constant_pad_of_a_new_axis_of_token_features_is_an_op_without_a_rule():
    """``F.pad`` of a new last axis of ``[b, T, d, 1]`` token features: refused as "no rule for this op", naming the
    layer its result reaches. Checked against ``xǁConvRulesǁpads_positions__mutmut_51`` (``Raw or
    floating``: every floating value taken for a channel map, refused instead as one that "does not hold
    channels on axis 1") and ``62`` (the non-channel-map case answered ``True``: the same), each applied by
    hand (session 18: the pad of the feature axis this test used before converts since ``trace/rules_pad.py``)."""
    torch.manual_seed(0)
    message = refusal(PadSlots(), torch.randn(3, 4, 3, dtype=DTYPE))
    assert "torch.nn.functional.pad: gradgraph has no rule for this op, and its result reaches " \
           "torch.nn.functional.linear with the parameter 'b.weight'" in message, message


def test_a_padded_kernel_is_an_op_on_a_parameter_without_a_rule():
    """``F.pad`` of a convolution's weight: refused as an op on the parameter ``kernel`` that has no
    rule. Checked against ``xǁConvRulesǁpads_positions__mutmut_54`` (``and`` for the first ``or``:
    ``meta.comps`` read of a parameter, an ``AttributeError`` out of the trace), ``51`` and ``62`` (the
    parameter "used where gradgraph expects neuron values")."""
    torch.manual_seed(0)
    message = refusal(PadKernel(), torch.randn(3, 3, 5, dtype=DTYPE))
    assert "torch.nn.functional.pad: this op uses the parameter 'kernel', and gradgraph has no rule for it" \
           in message, message
