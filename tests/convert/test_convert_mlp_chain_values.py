"""``mlp.py``'s ``_chain_layers``: what run small 2-4 of group ``convert-small`` left not killed (issue 31, a helper
session, branch mut33). A refusal's message in full (what and where); the docstrings name the mutants each kills,
checked with ``MUTANT_UNDER_TEST`` in ``.mutation/convert-small/mutants/``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gradgraph import UnsupportedModuleError
from gradgraph.convert import mlp_layers
from gradgraph.convert.trace import trace_model

DTYPE = torch.float64


class RepeatedHalf(nn.Module):
    """Half of a layer's neurons, each read twice by the next layer (``repeat``): a set made by neither the input nor
    an affine map (a ``merge``) and, unlike a residual sum, a gate or a norm, no ties and no attention op."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))[:, :2].repeat(1, 2))


def test_a_set_made_by_a_repeat_between_two_layers_is_refused_as_neurons_combined():
    """The trace holds the set the repeat makes, with no ties (the premise, checked), and ``mlp_layers`` refuses it as
    neurons combined, naming that set's origin (the input of ``b``). Kills ``_chain_layers`` 6 (``and`` for the
    second ``or``: a set made by another op passed unless the trace also had attention; the refusal came later, as
    "this op is not an nn.Linear applied to the previous layer's output")."""
    model = RepeatedHalf().to(DTYPE)
    trace = trace_model(model, torch.zeros(1, 3, dtype=DTYPE), model)
    assert [neuron_set.created_by for neuron_set in trace.sets] == ["input", "affine", "merge", "affine"]
    assert not trace.ties and not trace.attention
    reason = ("not an MLP chain: a skip connection, gate, norm, concatenation or attention combines neurons (skip "
              "connections, concatenation and parameter access are unsupported)")
    with pytest.raises(UnsupportedModuleError, match="^" + re.escape(
            f"unsupported module at 'b input' of type RepeatedHalf: {reason}") + "$") as refusal:
        mlp_layers(model)
    assert refusal.value.path == "b input" and refusal.value.module_type == "RepeatedHalf"
