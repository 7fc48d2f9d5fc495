"""``PadRules.join_as_pad`` (``trace/rules_pad.py``, new in session 19: ``cat([h, zeros])`` along the features is
the constant ``F.pad`` it equals), checked where run pad 3 (group ``convert-pad``, issue 31) showed it unchecked by
the group's list. Mutant numbers are run pad 3's (``mutmut show NAME`` in ``.mutation/convert-pad/``); each test
names the mutants it kills, each checked with ``MUTANT_UNDER_TEST=NAME``.

A conversion is float64 against torch.func's per-sample gradients at 1e-10 (``traced_models``); a refusal is
checked by the words a user reads after the location.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from traced_models import assert_exact_per_sample_grads

import gradgraph
from gradgraph.convert import UnsupportedOperationError

DTYPE = torch.float64


def squared(output, _targets):
    return output.pow(2).flatten(1).sum(1)


class Joined(nn.Module):
    """``op(self, x)``: ``Linear(3, 4)``s ``a`` and ``b``, a position table ``pos`` ``[3, 4]``, a parameter ``p``,
    ``Linear(6, 2)`` ``out``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.b, self.pos = nn.Linear(3, 4), nn.Linear(3, 4), nn.Embedding(3, 4)
        self.p = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.op(self, x)


REFUSALS = {
    # join_as_pad 9: two neuron parts around a constant are no pad of one value
    "two neuron values around zeros": (
        lambda self, x: self.out(torch.tanh(torch.cat([self.a(x)[:, :2], torch.zeros(x.shape[0], 2),
                                                       self.b(x)[:, :2]], -1))), (5, 3),
        ": torch.cat: concatenating neuron values with constants (for transformers models, call them with "
        "use_cache=False)"),
    # join_as_pad 66: a position table (no datapoint) joined with zeros is no pad of neuron values
    "a position table and zeros": (
        lambda self, x: self.out(torch.tanh(torch.cat([self.a(x)[..., :3], torch.zeros(x.shape[0], 3, 3)], -1)
                                            + torch.cat([self.pos(torch.arange(3))[:, :3], torch.zeros(3, 3)], -1)))
        .sum(1), (5, 3, 3),
        ": torch.cat: concatenating values that do not depend on the input"),
    # join_as_pad 67: the pad rule's refusal names the cat
    "flattened tokens and zeros": (
        lambda self, x: torch.cat([torch.tanh(self.a(x)).flatten(1), torch.zeros(x.shape[0], 2)], 1), (5, 3, 3),
        ": torch.cat: pads axis 1 of a value of shape [5, 12], along which both the neurons and the components "
        "vary; gradgraph pads a feature axis that holds the same neurons at every datapoint and position"),
    # join_as_pad 5: a parameter joined with zeros is the caller's refusal, not a pad
    "a parameter and zeros": (
        lambda self, x: self.a(x) * torch.cat([self.p[:2], torch.zeros(2)]), (5, 3),
        ": torch.cat: joins the parameter 'p' with a constant of shape [2], whose entries belong to no datapoint "
        "and no parameter; make it a parameter of the joined shape (the constant's entries then get gradients you "
        "can ignore), or join the results of the ops instead"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_joins_with_constants_that_are_no_pad_of_one_neuron_value_are_refused_by_name(case):
    """Two neuron values around a constant, a position table (no datapoint) joined with zeros, a parameter joined with
    zeros: refused as joins, with the words of ``shape_op``; a join of flattened tokens (components along the joined
    axis) refused by the pad rule, naming the cat. Kills ``join_as_pad`` 5 (one tracked part that is no neuron value
    read as one: ``AttributeError``), 9 (a join of two neuron values and a constant taken as done, the output left
    untracked), 66 (a pad the pad rule does not read taken as done), 67 (the pad rule's op ``None``)."""
    op, shape, message = REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(Joined(op).to(DTYPE), torch.randn(*shape, dtype=DTYPE), None, squared)
    assert str(error.value).endswith(message), str(error.value)


class PaddedByOneZero(nn.Module):
    """``Linear(3, 4)``, tanh, ``cat([h, zeros(1, 1)])`` along the features (a batch of one), ``Linear(5, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.tanh(self.a(x)), torch.zeros(1, 1, dtype=x.dtype)], -1))


def test_zeros_of_one_element_joined_to_one_datapoints_features_are_a_pad():
    """``cat([h, zeros(1, 1)])`` for a batch of one: the constant has a single entry, its fill. Kills ``join_as_pad``
    23 (the fill read as the constant's second entry: ``IndexError``)."""
    gradgraph.convert.clear_structure_cache()
    assert_exact_per_sample_grads(PaddedByOneZero().to(DTYPE), torch.randn(1, 3, dtype=DTYPE), None, squared)


class ZeroTimesJoined(nn.Module):
    """``cat([h, zeros, 0 * h])`` along the features of ``h = tanh(a(x))``, then ``Linear(12, 2)``: two neuron parts
    (the second all zero in value) and a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(12, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(torch.cat([h, torch.zeros(x.shape[0], 4, dtype=x.dtype), 0 * h], -1))


def test_a_join_of_two_neuron_values_and_zeros_is_refused_even_where_one_of_them_is_zero_in_value():
    """``cat([h, zeros, 0 * h])``: two tracked parts, so no pad of one value, whatever their values; refused as a
    join of neuron values with constants. Kills ``join_as_pad`` 5 (``and`` for ``or``: with two tracked parts the
    first is read as the padded value, and ``0 * h``, equal to the zeros' fill, as constant padding: the output's
    last four features are then a pad, ``a``'s gradient through them dropped from the graph)."""
    gradgraph.convert.clear_structure_cache()
    torch.manual_seed(0)
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(ZeroTimesJoined().to(DTYPE), torch.randn(5, 3, dtype=DTYPE), None, squared)
    assert str(error.value).endswith(": torch.cat: concatenating neuron values with constants (for transformers "
                                     "models, call them with use_cache=False)"), str(error.value)
