"""Position values (a position embedding of constant ids, a parameter added per position) get their
gradient where they join the token values: ops between their making and that join are refused by name,
joins other than an addition too; additions of slope one convert exactly.

Before session 22, ``2.0 * pos(arange(T))``, ``relu(pos)``, ``h - pos`` or ``h * pos`` were refused only by
the summed-gradient check ("a value computed from this parameter reaches the loss through an op whose
gradgraph rule reads it as a constant"), naming no op; each test below that expects a refusal fails on that
code (checked), each that expects a conversion passes on both.
"""

from __future__ import annotations

import re

import pytest
import torch
from strategies import assert_same_graph
from torch import nn
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

T, D = 5, 4
DTYPE = torch.float64
WHERE = r"\S+\.py:\d+ in \S+: "


class Positions(nn.Module):
    """``Linear(3, D)`` of the tokens joined by ``join(h, p)`` to a position embedding ``p = pos(arange(T))``
    (or a ``[T, D]`` parameter), then ``tanh`` and a head."""

    def __init__(self, join, table: str = "embedding") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.join, self.table = join, table
        self.tokens, self.head = nn.Linear(3, D), nn.Linear(D, 2)
        if table == "embedding":
            self.pos = nn.Embedding(T, D)
        else:
            self.pos = nn.Parameter(torch.randn(T, D))

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1])) if self.table == "embedding" else self.pos
        return self.head(torch.tanh(self.join(self.tokens(x), p)))


def loss(output, target):
    return (output - target).pow(2).sum((1, 2))


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(3, T, 3, generator=generator, dtype=DTYPE),
            torch.randn(3, T, 2, generator=generator, dtype=DTYPE))


CHANGED = {
    "scaled": (lambda h, p: h + 2.0 * p, "Tensor.mul"),
    "relu": (lambda h, p: h + torch.relu(p), "torch.relu"),
    "negated": (lambda h, p: h + (-p), "Tensor.neg"),
    "added with alpha": (lambda h, p: torch.add(1.0, p, alpha=2.0) + h, "torch.add"),
    "subtracted from a constant": (lambda h, p: h + (1.0 - p), "Tensor.__rsub__"),
    "exp": (lambda h, p: h + torch.exp(p), "torch.exp"),
    "scaled, then shifted and reshaped": (lambda h, p: h + (2.0 * p + 1.0).unsqueeze(0), "Tensor.mul"),
    # a product with a constant tensor counts whatever its values (a tensor of ones too): a value read from a tensor
    # would hold only for the traced call
    "times a tensor of ones": (lambda h, p: h + p * torch.ones(1, T, D, dtype=p.dtype), "Tensor.mul"),
}
JOINED = {
    "times the tokens": (lambda h, p: h * p, "Tensor.mul"),
    "subtracted from the tokens": (lambda h, p: h - p, "Tensor.sub"),
    "added with alpha": (lambda h, p: torch.add(h, p, alpha=0.5), "torch.add"),
    "a gate of the tokens": (lambda h, p: h * (p + 1.0), "Tensor.mul"),
}
EXACT = {
    "added": lambda h, p: h + p,
    "added on the left": lambda h, p: p + h,
    "plus a constant first": lambda h, p: h + (p + 0.5),
    "tokens subtracted from it": lambda h, p: p - h,
    "torch.add": lambda h, p: torch.add(h, p),
    "reshaped first": lambda h, p: h + p.unsqueeze(0).reshape(1, T, D),
    "times one": lambda h, p: h + 1 * p,
    "divided by one, plus a constant": lambda h, p: h + (p / 1.0 + 2.0),
}


def refusal(join, table="embedding") -> str:
    model = Positions(join, table).to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refused:
        gradgraph.to_graph(model, inputs, targets, loss)
    return str(refused.value)


@pytest.mark.parametrize("change", list(CHANGED))
def test_position_values_changed_before_they_join_the_tokens_are_refused_at_the_join_naming_the_op(change):
    """``h + 2.0 * pos``, ``h + relu(pos)``, ``h + (-pos)``, ``torch.add(1, pos, alpha=2)``, ``h + (1 - pos)``,
    ``exp(pos)``, a scale then a shift and a reshape: an op of slope other than one changed the positions,
    so the gradient read where they join the tokens is not theirs. Refused at the join, naming the op that changed
    them and its line."""
    join, op = CHANGED[change]
    message = refusal(join)
    assert re.match(WHERE + r"Tensor\.add: joins position values \(a position embedding, a parameter added per "
                    rf"position\) that {re.escape(op)} at \S+\.py:\d+ in <lambda> changed before they join the "
                    r"token values", message), message
    assert "Apply the op after adding them (f(h + pos))" in message


@pytest.mark.parametrize("join", list(JOINED))
def test_position_values_joined_to_the_tokens_by_another_op_than_an_addition_are_refused_by_name(join):
    """``h * pos``, ``h - pos``, ``torch.add(h, pos, alpha=0.5)``, ``h * (pos + 1)``: the positions join the
    tokens with a slope other than one. Refused at the join, naming it. (A ``[T, D]`` parameter joined so is
    refused by the affine rules, in their own words, before it is a position value.)"""
    make, op = JOINED[join]
    message = refusal(make)
    assert re.match(WHERE + re.escape(f"{op}: joins position values (a position embedding, a parameter added "
                                      "per position) to the token values by another op than an addition"),
                    message), message


@pytest.mark.parametrize("join", ["times the tokens", "subtracted from the tokens"])
def test_a_parameter_per_position_joined_by_another_op_than_an_addition_is_refused_naming_the_op(join):
    """The same joins with a ``[T, D]`` parameter: refused by the affine rules, naming the op."""
    make, op = JOINED[join]
    assert re.match(WHERE + re.escape(f"{op}: "), refusal(make, table="parameter"))


@pytest.mark.parametrize("join", list(EXACT))
def test_position_values_added_with_slope_one_convert_exactly(join):
    """``h + pos``, ``pos + h``, ``h + (pos + 0.5)``, ``pos - h``, ``torch.add(h, pos)``, a reshape first,
    ``1 * pos``, ``pos / 1 + 2``: the gradient where they join is theirs. Per-sample gradients equal a
    per-datapoint autograd loop at 1e-10, and a sampled element of the inferred group keeps the function
    (float64)."""
    model = Positions(EXACT[join]).to(DTYPE)
    inputs, targets = batch()
    assert_matches_autograd_loop(model, inputs, targets, loss)
    assert_group_keeps_function(model, inputs, targets, loss)


@pytest.mark.parametrize("change", list(CHANGED))
def test_position_values_changed_before_they_join_are_refused_naming_the_op_wherever_it_ran(change):
    """The refusal of ``test_position_values_changed_before_they_join_the_tokens_are_refused_at_the_join_naming_the_op``
    with the op's frame matched as any frame: under mutmut the innermost frame of a rule is mutmut's trampoline, so
    that test (which asserts ``in <lambda>``) fails on every mutant and ``gg``'s ``convert-elementwise`` list deselects
    it; this one keeps the op's name, the join and the advice, matched in full, in the list."""
    join, op = CHANGED[change]
    message = refusal(join)
    assert re.fullmatch(WHERE + r"Tensor\.add: joins position values \(a position embedding, a parameter added per "
                        rf"position\) that {re.escape(op)} at \S+\.py:\d+ in \S+ changed before they join the token "
                        r"values \(2\.0 \* pos, relu\(pos\)\): their gradient is read where they join the tokens, "
                        r"which that op would leave out\. Apply the op after adding them \(f\(h \+ pos\)\), or fold a "
                        r"constant scale into the embedding's table", message), message


DIVIDED = {
    "one divided by them": (lambda h, p: h + 1.0 / p, "Tensor.__rdiv__"),
    "one divided by them, plus a constant": (lambda h, p: h + (1 / p + 2.0), "Tensor.__rdiv__"),
    "divided by one, floored": (lambda h, p: h + torch.div(p, 1, rounding_mode="floor"), "torch.div"),
    "divided by one, truncated": (lambda h, p: h + torch.div(p, 1.0, rounding_mode="trunc"), "torch.div"),
}


@pytest.mark.parametrize("change", list(DIVIDED))
def test_position_values_divided_into_one_or_rounded_before_they_join_are_refused_naming_the_op(change):
    """``1 / pos`` (slope ``-1 / pos**2``; torch calls it ``Tensor.__rdiv__`` with ``pos`` first, which the r-op swap
    puts on the right) and ``torch.div(pos, 1, rounding_mode="floor" | "trunc")`` (slope 0): a division by the
    number 1 passes its left operand with slope one only without a rounding mode. Refused at the join, naming the
    op. Kills ``_slope_one`` 24, 25 (the side or the rounding mode read with ``or``), 28-30 (the rounding mode's key
    misspelt) and ``binary`` 27-29 (``__rdiv__`` misspelt in the swap: ``pos`` read as the left operand)."""
    join, op = DIVIDED[change]
    message = refusal(join)
    assert re.match(WHERE + r"Tensor\.add: joins position values \(a position embedding, a parameter added per "
                    rf"position\) that {re.escape(op)} at \S+\.py:\d+ in \S+ changed before they join the token "
                    r"values", message), message


_PER_FEATURE = torch.tensor([0.1, -0.5, 0.3, 0.9], dtype=DTYPE)
_PER_POSITION = torch.linspace(-1.0, 1.0, T, dtype=DTYPE)[:, None]
SHIFTED = {
    "a constant per feature added": (lambda h, p: h + (p + _PER_FEATURE), False),
    "added on the left": (lambda h, p: h + (_PER_FEATURE + p), False),
    "subtracted": (lambda h, p: h + (p - _PER_FEATURE), False),
    "added, then joined on the left": (lambda h, p: (p + _PER_FEATURE) + h, False),
    "after a product with one": (lambda h, p: h + (1 * p + _PER_FEATURE), False),
    "a constant per position, alike for every feature": (lambda h, p: h + (p + _PER_POSITION), True),
    "a number": (lambda h, p: h + (p + 0.25), True),
}


@pytest.mark.parametrize("shift", list(SHIFTED))
def test_a_constant_per_feature_added_to_position_values_fixes_the_joined_set(shift):
    """``h + (pos + c)`` with ``c`` one number per feature: ``tanh(h + pos + c)`` treats each hidden feature its own
    way, so no permutation of the token features (with the table's columns) keeps the function. Before the fix
    (branch mut45, issue 31; present since position values joined the tokens) ``unary`` checked an op's constants only
    for values of a datapoint (``meta.comps is not None``): the constant added to position values was never looked at,
    and the group moved the 4 hidden features; its sampled element changed every output (by up to 0.26). A silent
    false symmetry. Now the constant pins the table's set, and the join fixes the tokens' set with it. A constant per
    position alike for every feature, or a number, still keeps the symmetry (4 features moved). Exact per-sample
    gradients against a per-datapoint autograd loop at 1e-10 either way (float64)."""
    join, symmetric = SHIFTED[shift]
    model = Positions(join).to(DTYPE)
    inputs, targets = batch()
    assert_matches_autograd_loop(model, inputs, targets, loss)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, loss)
    assert (moved > 0) == symmetric, moved


@pytest.mark.parametrize("join", list(JOINED))
def test_position_values_joined_by_another_op_than_an_addition_are_refused_with_the_whole_advice(join):
    """The refusal of ``h * pos``, ``h - pos``, ``torch.add(h, pos, alpha=0.5)``, ``h * (pos + 1)`` matched in full:
    what was joined, how, and what to write instead. Kills ``binary`` 204-207 of run elementwise 26 (its last two
    lines misspelt)."""
    make, op = JOINED[join]
    message = refusal(make)
    assert re.fullmatch(WHERE + re.escape(f"{op}: joins position values (a position embedding, a parameter added per "
                                          "position) to the token values by another op than an addition (h * pos, "
                                          "h - pos), whose gradient gradgraph does not read; add them (h + pos), then "
                                          "apply the op"), message), message


_KEEP = torch.tensor([[True], [False], [True], [True], [False]])
MASKED = {
    "torch.where, the positions selected": (lambda h, p: h + torch.where(_KEEP, p, 0.0), "torch.where"),
    "torch.where, the positions second": (lambda h, p: h + torch.where(_KEEP, 0.5, p), "torch.where"),
    "masked_fill": (lambda h, p: h + p.masked_fill(_KEEP, 0.0), "Tensor.masked_fill"),
}


@pytest.mark.parametrize("mask", list(MASKED))
def test_position_values_masked_before_they_join_are_refused_naming_the_mask(mask):
    """``h + torch.where(keep, pos, 0)``, ``h + pos.masked_fill(keep, 0)`` with a constant mask over the positions:
    a mask zeroes the positions' gradient where it drops them, which the join would not read. Refused at the join,
    naming the mask op (the name ``mask_op`` hands ``unary``). Kills ``mask_op`` 59 and 93 of run elementwise 27
    (``unary`` handed the name ``None``: since session 22 ``unary`` writes the op's name into the position values'
    change, so the mutants fail with an AttributeError; runs elementwise 5-12 listed them equivalent, the name being
    read then only by ``need_neurons``)."""
    join, op = MASKED[mask]
    message = refusal(join)
    assert re.match(WHERE + r"Tensor\.add: joins position values \(a position embedding, a parameter added per "
                    rf"position\) that {re.escape(op)} at \S+\.py:\d+ in \S+ changed before they join the token "
                    r"values", message), message


def test_a_constant_added_to_position_values_is_read_again_on_a_replay():
    """``h + (pos + c)``: the check of ``c`` is a guard of the plan. Converted twice, the second a replay, the graphs
    are the same (the joined set fixed); with ``c`` made alike for every feature in place, the guard fails, the model is
    traced again and the set is free (tokens' and table's 4 neurons each in a group). Fails before the fix of
    ``unary`` (branch mut45): the first graph's set was free."""
    shift = torch.tensor([0.1, -0.5, 0.3, 0.9], dtype=DTYPE)
    model = Positions(lambda h, p: h + (p + shift)).to(DTYPE)
    inputs, targets = batch()
    PLAN_CACHE.clear()
    first = gradgraph.to_graph(model, inputs, targets, loss)
    assert_same_graph(gradgraph.to_graph(model, inputs, targets, loss), first)
    assert int((first.perm_group >= 0).sum()) == 0
    shift.fill_(0.2)
    assert int((gradgraph.to_graph(model, inputs, targets, loss).perm_group >= 0).sum()) == 8
