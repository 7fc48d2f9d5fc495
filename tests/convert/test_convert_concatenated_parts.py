"""Ops over a concatenation ``cat([h1, h2])`` keep the symmetry of each part.

A norm, a per-feature scale or shift, or a second reader's copy of ``cat([h1, h2])`` is a new set of
neurons tied to the concatenated ones. Made as *one* set tied to two source sets, the layout cannot
express it (a tie pairs a set with a set) and fixes both parts: the inferred group was trivial,
though each part permutes on its own (the norm's statistic and the per-feature ops are symmetric
in all their features). Now the new neurons are one set per part (``sets_per_run``). Each case
here is exact (float64, torch.func) and its inferred group keeps the function and maps the graph;
the orbit count fails on the old code (no orbit at all). The convolutional cases (a DenseNet block's
BatchNorm and ReLU copies) are in ``test_convert_conv.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

import gradgraph

DTYPE = torch.float64


def cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


class TwoBranches(nn.Module):
    """Two hidden sets (widths 4 and 5) concatenated, then ``op`` over the concatenation."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.first, self.second, self.head = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(9, 3)
        if op == "layer norm":
            self.norm = nn.LayerNorm(9)
        elif op == "rms norm":
            self.norm = nn.RMSNorm(9)
        elif op in ("scale", "shift"):
            self.value = nn.Parameter(torch.rand(9) + 0.5)

    def forward(self, x):
        h = torch.cat([torch.relu(self.first(x)), torch.tanh(self.second(x))], dim=-1)
        if self.op in ("layer norm", "rms norm"):
            return self.head(self.norm(h))
        if self.op == "scale":
            return self.head(h * self.value)
        if self.op == "shift":
            return self.head(torch.tanh(h + self.value))
        # two readers that want different versions of the concatenation as their act: a copy
        return self.head(torch.relu(h)) + self.head(torch.sigmoid(h))


@pytest.mark.parametrize("op", ["layer norm", "rms norm", "scale", "shift", "two readers"])
def test_an_op_over_a_concatenation_keeps_each_part_permutable(op):
    torch.manual_seed(19)
    model = TwoBranches(op).to(DTYPE)
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=3)
    assert moved > 0
    assert len(set(graph.perm_group.tolist()) - {-1}) == 2  # the two hidden sets, each with its copies


@pytest.mark.parametrize("join", ["stack", "cat"])
def test_odd_and_even_features_rejoined_rotated_keep_one_value_per_neuron(join):
    """GPT-J's ``rotate_every_two``: ``stack((-x2, x1), -1).flatten(-2)`` of the odd and even
    features (and its ``cat`` form) is a new version of the set, each neuron in one part: exact,
    with a group that keeps the function. Checked to fail before for ``stack``: refused ("joins two
    versions of the same neurons")."""

    class Rotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            odd, even = h[..., 1::2], h[..., ::2]
            rotated = torch.stack((-odd, even), dim=-1).flatten(-2) if join == "stack" else torch.cat((-odd, even), -1)
            return self.b(h * 0.5 + rotated)

    torch.manual_seed(40)
    model, inputs, targets = Rotated().to(DTYPE), torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=2)


def test_a_neuron_in_two_parts_of_a_stack_is_refused():
    """``stack((h, -h))`` holds each neuron twice: gradgraph has one value per neuron, so it refuses by name."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(torch.stack((h, -h), dim=-1).flatten(-2))

    with pytest.raises(gradgraph.UnsupportedModuleError, match="one neuron in two parts"):
        gradgraph.to_graph(Twice().to(DTYPE), torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,)), cross_entropy)
