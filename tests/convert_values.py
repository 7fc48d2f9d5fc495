"""Helpers of the per-function value tests of ``convert/`` (``tests/convert/test_convert_*_values.py``):
a model's output as its own loss, its conversion checked exact, a refusal matched in full, and the models
that more than one rule's tests read (the affine rule's and ``spread_positions``' refusals)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from traced_models import assert_exact_per_sample_grads


def squared(output: torch.Tensor, _targets) -> torch.Tensor:
    """``[b]``: the squared norm of each datapoint's output (output mode without a target)."""
    return output.pow(2).flatten(1).sum(1)


def exact(model, inputs, **options):
    """Convert afresh (no cached plan) and check every per-sample gradient against torch.func; the graph."""
    gradgraph.convert.clear_structure_cache()
    return assert_exact_per_sample_grads(model, inputs, None, squared, **options)


def refused(model, inputs, message, **options):
    """``to_graph`` refuses with exactly ``message`` after the location (``file:line in function``)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + re.escape(message) + "$"):
        gradgraph.to_graph(model, inputs, None, squared, **options)


class TokenMixing(nn.Module):
    """A Linear over the token axis of ``[b, 4, 2]`` values: each row of the transposed ``[b, 2, 4]``
    holds one neuron four times (the components do not differ along it: only the rows do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.out = nn.Linear(3, 2), nn.Linear(4, 4), nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(self.mix(h.transpose(1, 2)).transpose(1, 2)).sum(1)


class UnboundPositions(nn.Module):
    """A position table over ``arange`` read by an affine map before it joins any token value."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.proj(self.positions(torch.arange(ids.shape[1]))))).sum(1)


class TwiceFlattened(nn.Module):
    """``m.repeat(1, 2, 1, 1).flatten(1)`` read by a Linear: each channel at each position twice. (``cat([m, m], 1)``
    converts since session 19: its second part is a tied copy, tests/convert/test_convert_repeated_parts.py.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(2 * 3 * 16, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        return self.head(m.repeat(1, 2, 1, 1).flatten(1))
