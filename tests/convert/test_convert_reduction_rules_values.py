"""The rules of ``trace/rules_reduction.py`` (``_dims``, ``reduction``, ``separate_parts``, ``softmax``) and the
functions of ``trace/rules_elementwise.py`` new or changed in session 19 (``merge_stacked``, ``merged_set``,
``binary``'s count of a same-neuron op, ``mask_op``'s fill check, ``comparison``, ``masks_compared_neurons``,
``check_constant_operands``), checked by value: what the survivors of runs elementwise 5- showed unchecked
(docs/mutation.md).

Every conversion is float64 against torch.func's per-sample gradients at 1e-10; a sampled element of the
inferred group must keep the function and map the graph to the permuted model's graph. Each test names the
mutants it kills (``mutmut show NAME`` in ``.mutation/convert-elementwise/``; ``reduction`` for
``gradgraph.convert.trace.rules_reduction.xǁReductionRulesǁreduction__mutmut_N``), each checked with
``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from convert_values import convert_exactly, exact, squared
from gradgraph.convert import UnsupportedOperationError
from traced_models import assert_group_keeps_function

DTYPE = torch.float64


def _inputs(batch=6, features=3, seed=3):
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


class StackedKeepdim(nn.Module):
    """Two layers' outputs stacked along a middle axis and summed with ``keepdim=True``: ``[b, 1, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h1 = torch.tanh(self.a(x))
        h2 = torch.tanh(self.b(h1))
        return self.out(torch.stack([h1, h2], 1).sum(1, keepdim=True).flatten(1))


def test_a_stacked_sum_with_keepdim_is_exact_and_moves_both_values_together():
    torch.manual_seed(0)
    model = StackedKeepdim().to(DTYPE)
    graph = exact(model, _inputs())
    _, _, perm = assert_group_keeps_function(model, _inputs(), None, squared, seed=5)
    shifts = [perm[first:first + 4] - first for first in (3, 7)]
    assert bool((shifts[0] != torch.arange(4)).any()) and torch.equal(shifts[0], shifts[1])
    assert int((graph.edge_kind == int(gradgraph.EdgeKind.RESIDUAL)).sum()) == 8


# ------------------------------------------------------------------------------- mask_op, operands by keyword
KEYWORD_MASKS = {
    # torch.where's and masked_fill's operands passed by keyword, as Python allows
    "where, other by keyword": lambda h, mask: torch.where(mask, h, other=0.5),
    "where, input and other by keyword": lambda h, mask: torch.where(mask, input=h, other=-0.25),
    "where, all by keyword": lambda h, mask: torch.where(condition=mask, input=h, other=-0.25),
    "masked_fill, mask and value by keyword": lambda h, mask: h.masked_fill(mask=mask, value=0.5),
    "torch.masked_fill, all by keyword": lambda h, mask: torch.masked_fill(input=h, mask=mask, value=0.5),
}


class KeywordMasked(nn.Module):
    """``Linear(3, 4) -> tanh -> op(h, mask) -> Linear(4, 2)``, the mask constant: per feature or alike for all."""

    def __init__(self, op: str, per_feature: bool) -> None:
        super().__init__()
        self.op = KEYWORD_MASKS[op]
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        mask = torch.tensor([True, False, True, False]) if per_feature else torch.ones(4, dtype=torch.bool)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.a(x)), self.mask))


@pytest.mark.parametrize("per_feature", [False, True], ids=["alike", "per feature"])
@pytest.mark.parametrize("op", sorted(KEYWORD_MASKS))
def test_a_mask_with_its_operands_by_keyword_is_exact_and_checks_the_mask(op, per_feature):
    """Before the fix (run elementwise 5) ``mask_op`` read the operands by position only: every case here failed
    with ``IndexError: tuple index out of range`` (a GradGraphError "failed on inputs")."""
    torch.manual_seed(0)
    model = KeywordMasked(op, per_feature).to(DTYPE)
    exact(model, _inputs())
    _, _, perm = assert_group_keeps_function(model, _inputs(), None, squared, seed=5)
    moved = bool((perm[3:7] != torch.arange(3, 7)).any())
    assert moved != per_feature


def _refusal(model, inputs):
    """The words of ``to_graph``'s refusal (an UnsupportedOperationError, nothing else)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(model, inputs, None, squared)
    return str(error.value)


REACHES_OUT = ", and its result reaches torch.nn.functional.linear with the parameter 'out.weight' at "
COMPARED = "a comparison of neuron values, read otherwise than as a mask of the same neurons"


# ------------------------------------------------------------------------------ comparison
class Compare(nn.Module):
    """The comparison made inside a submodule (``cmp``), so a refusal names its module."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use

    def forward(self, h, g):
        if self.use == "two neurons":  # h <= g: a boolean of two neuron values, masking h
            return h.masked_fill(h <= g, 0.0)
        return (h > 0.1).to(h.dtype)  # "read": one neuron value's comparison read as a value


class Compared(nn.Module):
    def __init__(self, use: str) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.cmp = Compare(use)

    def forward(self, x):
        return self.out(self.cmp(torch.tanh(self.a(x)), torch.tanh(self.b(x))))


@pytest.mark.parametrize("use", ["two neurons", "read"])
def test_a_comparison_read_otherwise_than_as_a_mask_of_its_neurons_is_refused_where_it_was_made(use):
    """``h <= g`` (two neuron values) has no rule; ``(h > c)`` read by a Linear is no mask: each refused with the
    comparison's own op, reason, location and module. Kills ``comparison`` 2, 7-16 (two neurons), 51, 52 (the
    comparison's location and module)."""
    torch.manual_seed(0)
    text = _refusal(Compared(use).to(DTYPE), _inputs())
    op, reason = ("Tensor.le", "gradgraph has no rule for this op") if use == "two neurons" \
        else ("Tensor.gt", COMPARED)
    assert re.match(r"\S+:\d+ in \S+ \(module 'cmp'\): " + re.escape(f"{op}: {reason}{REACHES_OUT}"), text), text
    assert text.endswith("(module 'out'). Write it with supported ops, register it with "
                         "gradgraph.convert.register_elementwise if it is elementwise, or register a converter for "
                         "the whole module"), text


# --------------------------------------------------------------------------- masks_compared_neurons
MISUSED = {
    # h.to(comparison): h converted to the comparison's dtype (float32: a new tensor), no cast of the comparison
    "h.to(comparison)": lambda h, p: h * h.to((h > 0).float()),
    # the comparison as where's value, not its condition
    "where's value": lambda h, p: torch.where(torch.ones(4, dtype=torch.bool), h, (h > 0).to(h.dtype)),
}
PARAMETER = {
    # a parameter selected by where's mask of h, or masked by it: refused as a parameter reached by the comparison
    "where selects a parameter": (lambda h, p: torch.where(h > 0, h, p), "torch.where"),
    "a parameter masked": (lambda h, p: p.masked_fill(h <= 0, 0.0) + h, "Tensor.masked_fill"),
}


class Misused(nn.Module):
    def __init__(self, use, parameter: bool = True) -> None:
        super().__init__()
        self.use = use
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.p = nn.Parameter(torch.linspace(-1.0, 1.0, 4)) if parameter else None

    def forward(self, x):
        return self.out(self.use(torch.tanh(self.a(x)), self.p))


@pytest.mark.parametrize("use", sorted(MISUSED))
def test_a_comparison_used_otherwise_than_as_the_mask_of_its_neurons_is_refused(use):
    """Only ``h.masked_fill(h <= c, v)``, ``torch.where(h > c, h, v)`` (by position) and ``h * cast(h > c)`` are
    masks of the compared neurons; anything else is refused by the comparison's name (not a crash). Kills
    ``masks_compared_neurons`` 16 (``h.to(comparison)`` read as a cast), 56 (the comparison as where's value)."""
    torch.manual_seed(0)
    text = _refusal(Misused(MISUSED[use]).to(DTYPE), _inputs())
    assert f": {COMPARED}{REACHES_OUT}" in text, text


@pytest.mark.parametrize("use", sorted(PARAMETER))
def test_a_parameter_selected_or_masked_by_a_comparison_is_refused_naming_the_parameter(use):
    """A parameter with a comparison: refused where it meets the comparison, naming the parameter. Kills
    ``masks_compared_neurons`` 32 (a third operand let through), 33 (no neuron operand: an IndexError)."""
    torch.manual_seed(0)
    op, model = PARAMETER[use][1], Misused(PARAMETER[use][0]).to(DTYPE)
    text = _refusal(model, _inputs())
    assert f": {COMPARED}, and its result reaches {op} with the parameter 'p' at " in text, text


BY_KEYWORD = {
    "masked_fill, the fill by keyword": lambda h, p: h.masked_fill(h <= 0.1, value=0.5),
    "masked_fill, mask and fill by keyword": lambda h, p: h.masked_fill(mask=h <= 0.1, value=0.5),
    "where, other by keyword": lambda h, p: torch.where(h > 0.1, h, other=0.5),
    "where, every operand by keyword": lambda h, p: torch.where(condition=h > 0.1, input=h, other=0.5),
}


@pytest.mark.parametrize("use", sorted(BY_KEYWORD))
def test_a_mask_by_its_own_comparison_with_operands_by_keyword_is_exact(use):
    """``h.masked_fill(h <= c, value=v)``, ``h.masked_fill(mask=h <= c, value=v)``, ``torch.where(h > c, h,
    other=v)``: exact, with a group that moves the masked neurons. The last three were refused until session 20
    (the tracer handed the rule the positional operands only). Kills ``masks_compared_neurons`` 49 (and, before
    the keywords were read, 46-48, 57: an IndexError)."""
    torch.manual_seed(0)
    model = Misused(BY_KEYWORD[use], parameter=False).to(DTYPE)
    exact(model, _inputs())
    _, _, perm = assert_group_keeps_function(model, _inputs(), None, squared, seed=5)
    assert bool((perm[3:7] != torch.arange(3, 7)).any())


# ------------------------------------------------------------------------------------ merge_stacked
class StackedInput(nn.Module):
    """The input (the first set: node ids from 0) stacked with a layer's first three features and maxed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(torch.stack([x, torch.tanh(self.a(x))[..., :3]], -1).amax(-1)))


@pytest.mark.parametrize("batch", [6, 1])
def test_the_input_stacked_with_a_layer_is_merged_and_a_batch_of_one_too(batch):
    """The input's neurons (node 0 among them) are neurons like any: merged, one GATE edge from each stacked
    neuron; a batch of one datapoint too (the slices' axis is not the batch's). Kills ``merge_stacked`` 27, 28
    (node 0 taken for a statistic) and, with ``StackedKeepdim`` on one datapoint, 23 (the batch read as the
    stacked axis)."""
    torch.manual_seed(0)
    graph = exact(StackedInput().to(DTYPE), _inputs(batch))
    assert int((graph.edge_kind == int(gradgraph.EdgeKind.GATE)).sum()) == 6
    graph = exact(StackedKeepdim().to(DTYPE), _inputs(batch))
    assert int((graph.edge_kind == int(gradgraph.EdgeKind.RESIDUAL)).sum()) == 8


NOT_MERGED = {
    # a slice that is a statistic (node -1): no neurons to merge
    "a statistic stacked last": lambda m, x: (lambda h: torch.stack([h, h.sum(-1, keepdim=True).expand_as(h)],
                                                                    -1).sum(-1))(m.a(x)),
    "a statistic stacked first": lambda m, x: (lambda h: torch.stack([h.sum(-1, keepdim=True).expand_as(h), h],
                                                                     -1).sum(-1))(m.a(x)),
    # a slice that holds one neuron twice at one component
    "a slice with a neuron twice": lambda m, x: torch.stack([torch.tanh(m.a(x)).repeat(1, 2), m.b(x)], -1).sum(-1),
    # a value stacked with itself reordered: the slices share neurons
    "a value with itself reordered": lambda m, x: (lambda h: torch.stack([h, h.flip(-1)], -1).amax(-1))(m.a(x)),
    # tokens of one set stacked with tokens of two (one per token): a neuron of the first slice pairs with two
    "a slice of two sets": lambda m, x: torch.stack(
        [torch.tanh(m.a(x)), torch.cat([m.c(x[:, :1]), m.d(x[:, 1:])], 1)], -1).sum(-1),
}


class NotMerged(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        width = 8 if "twice" in case else 4
        self.a, self.b, self.c, self.d = nn.Linear(3, 4), nn.Linear(3, 8), nn.Linear(3, 4), nn.Linear(3, 4)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(NOT_MERGED[self.case](self, x))


@pytest.mark.parametrize("case", sorted(NOT_MERGED))
def test_stacked_values_that_are_no_distinct_sets_of_neurons_are_not_merged(case):
    """The merge applies only where every slice holds neurons, one per feature at a component, the slices pair
    one to one and share no set; else the reduction is over part of the features, refused by name. Kills
    ``merge_stacked`` 21, 22, 26, 36 (a statistic), 45 (a neuron twice), 61 and, where the later checks do not
    catch it, 52, 58 (a neuron paired with two), 68 (shared neurons)."""
    torch.manual_seed(0)
    inputs = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE) if "two sets" in case \
        else _inputs()
    text = _refusal(NotMerged(case).to(DTYPE), inputs)
    op = "Tensor.amax" if "reordered" in case else "Tensor.sum"
    assert f": {op}: a reduction over part of the features{REACHES_OUT}" in text, text


class WhereTableByKeyword(nn.Module):
    """``torch.where(mask, h, other=table)``: the fill value by keyword, one per neuron (a table) or a parameter."""

    def __init__(self, fill: str) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("mask", torch.tensor([[True], [False], [True]]))
        table = torch.tensor([0.0, 5.0, -3.0, 1.0])
        self.table = nn.Parameter(table) if fill == "parameter" else None
        if fill != "parameter":
            self.register_buffer("fill", table)

    def forward(self, x):
        fill = self.table if self.table is not None else self.fill
        return self.out(torch.where(self.mask, torch.tanh(self.a(x)), other=fill)).sum(1)


def test_a_fill_value_by_keyword_is_checked_as_one_by_position():
    """A table per neuron given as ``other=`` pins the set (``torch.where``'s value tells the neurons apart); a
    parameter given so is refused by name. Kills ``mask_op`` 8, 9 (the keyword misspelt: the table not read)."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    model = WhereTableByKeyword("table").to(DTYPE)
    exact(model, inputs)
    _, _, perm = assert_group_keeps_function(model, inputs, None, squared, seed=4)
    assert torch.equal(perm[3:7], torch.arange(3, 7))
    text = _refusal(WhereTableByKeyword("parameter").to(DTYPE), inputs)
    assert text.endswith(": torch.where: the parameter 'table' is a value the op selects (torch.where's value or "
                         "masked_fill's fill value), which gradgraph has no rank-1 terms for; it reads a parameter "
                         "added to neurons (a bias) or multiplied with them (a scale): write h + b or h * s"), text


class FrozenMask(nn.Module):
    """``h.masked_fill(mask=m, value=0.5)`` with the mask held as a frozen boolean ``nn.Parameter`` (as a model
    loaded whole may hold one), alike for all features or per feature."""

    def __init__(self, per_feature: bool) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        mask = torch.tensor([True, False, True, False]) if per_feature else torch.ones(4, dtype=torch.bool)
        self.m = nn.Parameter(mask, requires_grad=False)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)).masked_fill(mask=self.m, value=0.5))


@pytest.mark.parametrize("per_feature", [False, True], ids=["alike", "per feature"])
def test_a_mask_held_as_a_frozen_boolean_parameter_is_no_selected_value(per_feature):
    """``masked_fill``'s mask is no value the op selects: a frozen boolean parameter as the mask converts exactly
    (the set moved only where the mask is alike for all features), where a parameter as the fill is refused. Kills
    ``mask_op`` 10 (the mask read as a selected value: refused as "the parameter 'm' is a value the op
    selects")."""
    torch.manual_seed(0)
    model, inputs = FrozenMask(per_feature).to(DTYPE), _inputs()
    gradgraph.convert.clear_structure_cache()
    per_sample = gradgraph.to_graph(model, inputs, None, squared).per_sample_grads()
    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert set(trained) <= set(per_sample) and set(trained) == {"a.weight", "a.bias", "out.weight", "out.bias"}
    for index in range(inputs.shape[0]):  # torch.func cannot take the boolean parameter: a per-datapoint loop
        model.zero_grad()
        squared(model(inputs[index:index + 1]), None).sum().backward()
        for name, param in trained.items():
            torch.testing.assert_close(per_sample[name][index], param.grad, atol=1e-10, rtol=0, msg=name)
    _, _, perm = assert_group_keeps_function(model, _inputs(), None, squared, seed=5)
    assert bool((perm[3:7] != torch.arange(3, 7)).any()) != per_feature


# ------------------------------------------------------------------------------------------ softmax
SOFTMAXES = {
    # [b, F, 2]: the features on axis 1, a copy along axis 2. The axis by position: over the features, or none
    "h.softmax(1)": lambda h: h.softmax(1),
    "torch.softmax(h, 1)": lambda h: torch.softmax(h, 1),
    "h.softmax(2)": lambda h: h.softmax(2),
    # no dim on a 3-axis value: PyTorch's implicit choice is axis 0 (the datapoints), not the features on axis 1
    "F.softmax(h)": lambda h: F.softmax(h),
}


class Softmaxed(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = SOFTMAXES[op]
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.a(x)).unsqueeze(-1).expand(-1, -1, 2)).sum(-1))


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("op", sorted(SOFTMAXES))
def test_a_softmax_is_over_the_axis_given_by_position_or_pytorchs_implicit_one(op):
    """``h.softmax(1)`` of ``[b, F, 2]`` is over the features (exact); ``h.softmax(2)`` over the copies and
    ``F.softmax(h)`` (PyTorch's implicit axis 0 for three axes: the datapoints) are not, refused. Kills
    ``softmax`` 15, 19 (the positional axis ignored: the last taken), 24, 26, 31 (the implicit axis 1)."""
    torch.manual_seed(0)
    model = Softmaxed(op).to(DTYPE)
    if op.endswith("1)"):
        exact(model, _inputs())
        return
    name = "torch.nn.functional.softmax" if op.startswith("F.") else "Tensor.softmax"
    text = _refusal(model, _inputs())
    assert f": {name}: a softmax across positions or part of the features{REACHES_OUT}" in text, text


# ------------------------------------------------------------------------------------- pools over positions
class PooledTokens(nn.Module):
    """Tokens ``[b, T, 3]``: the input itself pooled over the tokens (its neurons from node 0), or a statistic
    (a sum over the features) pooled so and read by a Linear."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.a = nn.Linear(3, 4) if what == "statistic" else None
        self.out = nn.Linear(3 if what == "input" else 1, 2)

    def forward(self, x):
        if self.what == "input":
            return self.out(torch.tanh(x.mean(1)))
        return self.out(torch.tanh(self.a(x)).sum(-1, keepdim=True).mean(1))


def test_the_input_pooled_over_tokens_is_exact_and_a_pooled_statistic_refused():
    """The input's neurons (node 0 among them) pooled over the tokens are neurons; a statistic pooled is opaque,
    refused by name where a Linear reads it. Kills ``reduction`` 259, 260 (node 0 taken for a statistic), 261-263,
    269-272 (the pooled statistic's refusal)."""
    torch.manual_seed(0)
    inputs = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    graph = exact(PooledTokens("input").to(DTYPE), inputs)
    assert graph.num_nodes == 3 + 3 + 2  # the input, its pooled copy, the output
    text = _refusal(PooledTokens("statistic").to(DTYPE), inputs)
    assert re.match(r"\S+:\d+ in \S+: Tensor\.mean: pooling a statistic \(a sum or norm over the features\) over "
                    r"positions" + re.escape(REACHES_OUT), text), text


# ------------------------------------------------------------------------- binary: a same-neuron op counted
class SquaredAfterTwo(nn.Module):
    """``v * v`` where ``v = tanh(sin(a(x)))``: the set is SINE with one more elementwise op (the tanh) before
    the product, which counts a second."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        v = torch.tanh(torch.sin(self.a(x)))
        return self.out(v * v)


def test_a_product_of_a_value_with_itself_adds_to_the_count_of_elementwise_ops():
    """The set's label stays OTHER after the product (its count of elementwise ops grows, from 1 to 2). Kills
    ``binary`` 280 (the count decreased: 1 - 1 = 0, the set labelled SINE again, the symmetry of a sine trusted)."""
    torch.manual_seed(0)
    graph = exact(SquaredAfterTwo().to(DTYPE), _inputs())
    hidden = graph.node_kind == int(gradgraph.NodeKind.HIDDEN)
    assert int(hidden.sum()) == 4
    assert bool((graph.activation[hidden] == int(gradgraph.ActivationKind.OTHER)).all())


# ------------------------------------------------------------------- the input read by a reduction or a mask
READS_OF_THE_INPUT = {
    "Tensor.sum": lambda x: x.transpose(0, 2).sum(-1),
    "Tensor.masked_fill": lambda x: x.transpose(0, 2).masked_fill(torch.tensor([True, False, True, False, True]), 0.0),
}


class ReadsTheInput(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = READS_OF_THE_INPUT[op]
        self.out = nn.Linear(1, 2)

    def forward(self, x):
        return self.out(self.op(x)[..., :1].sum(0).sum(0, keepdim=True).expand(x.shape[0], 1))


@pytest.mark.parametrize("op", sorted(READS_OF_THE_INPUT))
def test_the_input_read_with_its_datapoints_last_is_refused_naming_the_op(op):
    """``x.transpose(0, 2)`` puts the datapoints on the last axis, where the rule that reads the raw input first
    expects its features: refused, naming the op that read it. Kills ``reduction`` 5 and ``mask_op`` 91
    (``need_neurons``' op name ``None``)."""
    text = _refusal(ReadsTheInput(op).to(DTYPE), torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1),
                                                            dtype=DTYPE))
    assert text.endswith(f": {op}: the input's features are not its last axis"), text


# Brief mut39 (issue 31, run elementwise 14: the not-killed survivors of run elementwise 6, same numbers; the file is
# unchanged since)


class TableOrderScale(nn.Module):
    """Token and position embeddings summed, tanh, ``Linear(4, 3)``, summed over the tokens, times ``1 + k`` where
    ``k`` is the index of the position table's largest column sum (``table.sum(0).argmax()``, as a Python float or
    as a tensor): the output depends on the order of the table's features, so its set may not be permuted."""

    def __init__(self, as_float: bool) -> None:
        super().__init__()
        self.as_float = as_float
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, ids):
        table = self.pos(torch.arange(ids.shape[1]))
        k = table.sum(0).argmax()
        scale = 1.0 + (float(k) if self.as_float else k)
        return self.out(torch.tanh(self.tok(ids) + table)).sum(1) * scale


@pytest.mark.parametrize("as_float", [True, False], ids=["float", "tensor"])
def test_a_reduction_of_a_position_table_pins_the_tables_set(as_float):
    """A reduction of values of no datapoint (a position table's column sums) is opaque and pins their sets: here the
    argmax of those sums scales the output, so a permutation of the table's features changes the function. Kills
    ``reduction`` 21 (the opaque value made without the table's meta: nothing pinned, and the sampled permutation
    of the embeddings' set changed the outputs)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    graph, moved = convert_exactly(TableOrderScale(as_float).to(DTYPE), ids, targets)
    assert moved == 0


class FlattenedPool(nn.Module):
    """``h = tanh(Linear(3, 2)(x))`` of ``[b, S, T, 3]`` inputs, flattened to ``[b, S, T * 2]`` (the last axis holds
    the two neurons at each of the ``T`` positions), a mean (or sum) over ``S``, ``Linear(T * 2, 3)``."""

    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.mean = mean
        self.a, self.out = nn.Linear(3, 2), nn.Linear(4, 3)

    def forward(self, x):
        flat = torch.tanh(self.a(x)).flatten(2)
        return self.out(flat.mean(1) if self.mean else flat.sum(1))


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_a_pool_of_values_whose_last_axis_holds_neurons_and_positions_is_exact(mean):
    """The pooled ``[b, T * 2]`` value's neurons vary along its last axis, so it is no value of one neuron per
    position (the trailing axis of one feature is not added) and pools as a row of ``T * 2`` places. Kills
    ``reduction`` 277 (``or`` for the last ``and``), 287 (the neurons' variation read on the second-last axis):
    each read it as one neuron per place, and the pool was refused ("pooling that does not keep one neuron per
    feature") where it converts exactly."""
    torch.manual_seed(0)
    inputs = torch.randn(5, 2, 2, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    convert_exactly(FlattenedPool(mean).to(DTYPE), inputs, targets)


class ScaledByItsTotal(nn.Module):
    """``h = tanh(Linear(3, 1)(x))`` of a batch of one ``[1, T, 3]``, times its sum over every place (a 0-d value:
    the one datapoint's one neuron pooled over all its positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h * h.reshape(-1).sum()


def test_a_pool_to_a_zero_dimensional_value_is_exact():
    """A pool to a 0-d value has no last axis to read: ``one_neuron`` is false, and the pooled value is opaque, not
    read by any rule with a parameter. Kills ``reduction`` 277, 279 (``varies_along`` of axis -1 of a 0-d value:
    an ``IndexError``)."""
    torch.manual_seed(0)
    exact(ScaledByItsTotal().to(DTYPE), torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE))


class PooledReadTwice(nn.Module):
    """``p = tanh(Linear(3, 4)(x)).mean(1)`` read by ``Linear(4, 3)`` and, through tanh, by another ``Linear(4, 3)``
    (``reads_tanh_first``: the tanh's reader called first): two versions of the pooled neurons, each an act."""

    def __init__(self, reads_tanh_first: bool) -> None:
        super().__init__()
        self.reads_tanh_first = reads_tanh_first
        self.a, self.p, self.q = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        pooled = torch.tanh(self.a(x)).mean(1)
        if self.reads_tanh_first:
            return self.q(torch.tanh(pooled)) + self.p(pooled)
        return self.p(pooled) + self.q(torch.tanh(pooled))


@pytest.mark.parametrize("reads_tanh_first", [False, True], ids=["pooled first", "tanh first"])
def test_a_pooled_value_and_its_tanh_both_read_are_exact(reads_tanh_first):
    """The pooled value is version 0 of its new set, its tanh version 1, so the second reader's ``fix_act`` finds
    the other version as the act and splits a copy off. Kills ``reduction`` 371 (the pooled value made version 1,
    which the tanh's ``next_version`` gives again: the two values passed for one act, and the conversion's
    gradient check refused the wrong graph)."""
    torch.manual_seed(0)
    inputs = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    graph, moved = convert_exactly(PooledReadTwice(reads_tanh_first).to(DTYPE), inputs, targets)
    assert moved > 0
