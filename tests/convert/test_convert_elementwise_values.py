"""The rules of ``trace/rules_elementwise.py`` and ``trace/rules_conv.py`` changed after their
mutation runs (a gate over blocks, per-channel parameters on feature maps, one new set per part of
a concatenation), checked by value: what runs convert 8-9 (docs/mutation.md) found unchecked.

Every conversion is float64 against torch.func's per-sample gradients (1e-10); the inferred group
is written out neuron by neuron (``perm_group``: ``-1`` fixed, else the id of the set a neuron
permutes with) and a sampled element of it must keep the function and map the graph to the
permuted model's graph. Each test names the mutants it kills (``mutmut show NAME`` in
``.mutation/convert-elementwise/`` or ``.mutation/convert-conv/``), each checked with
``MUTANT_UNDER_TEST=NAME``.
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


def fixed(count):
    return [-1] * count


def blocks(*sizes, first=0):
    """Consecutive ids, one per block: ``blocks(4, 4) == [a]*4 + [a+1]*4`` with ``a = first``."""
    return [first + index for index, size in enumerate(sizes) for _ in range(size)]


def convert_exactly(model, inputs, targets, seeds=range(3)):
    """The graph (exact against torch.func) and the most nodes a sampled group element moved
    (each sample keeps the function and maps the graph)."""
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    moved = max(assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=seed)[0] for seed in seeds)
    return graph, moved


class HeadGate(nn.Module):
    """Per-head weights (a softmax over 3 heads) times each head's 4 channels; ``gate_first``
    writes the gate as the product's first operand."""

    def __init__(self, gate_first: bool) -> None:
        super().__init__()
        self.gate_first = gate_first
        self.values, self.gate, self.out = nn.Linear(4, 12), nn.Linear(4, 3), nn.Linear(12, 3)

    def forward(self, x):
        values = torch.tanh(self.values(x)).view(-1, 3, 4)
        weights = torch.softmax(self.gate(x), -1).unsqueeze(-1)
        gated = weights * values if self.gate_first else values * weights
        return self.out(gated.reshape(-1, 12))


@pytest.mark.parametrize("gate_first", [False, True], ids=["values * gate", "gate * values"])
def test_a_head_gate_cuts_the_values_and_the_product_into_its_heads(gate_first):
    """``block_gate``: the 12 values permute within each head's 4 (cut where the gate changes), the
    product is tied to them (the same cuts), the gate's 3 neurons are fixed. Either operand order."""
    torch.manual_seed(33)
    model = HeadGate(gate_first).to(DTYPE)
    graph, moved = convert_exactly(model, torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)))
    # input 4 | values 12 | gate 3 | product 12 | output 3 (the gate's nodes after the values': traced first)
    expected = fixed(4) + blocks(4, 4, 4) + fixed(3) + blocks(4, 4, 4) + fixed(3)
    assert graph.perm_group.tolist() == expected
    assert moved > 0


class SelfGate(nn.Module):
    """A block gated by one of its own neurons: ``h * h[:, :1]``; permuting ``h`` would move the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h * h[:, :1])


def test_a_block_gated_by_one_of_its_own_neurons_is_fixed():
    """The operands share neurons: no block gate, both operands fixed (the product too)."""
    torch.manual_seed(34)
    graph, moved = convert_exactly(SelfGate().to(DTYPE), torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,)))
    assert (graph.perm_group == -1).all() and moved == 0
