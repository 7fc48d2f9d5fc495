"""The rules of ``trace/rules_elementwise.py`` that runs elementwise 1-3 mutated (``binary`` and its helpers,
``with_parameter``, the reductions, ``separate_parts``, ``mask_op``, ``norm``), checked by value: what their
survivors showed unchecked (docs/mutation.md). Mutant numbers are run elementwise 1's (the code before the two
fixes below), ``binary`` 254-496 run elementwise 3's, ``mask_op`` run elementwise 2's (after its fix).

Every conversion is float64 against torch.func's per-sample gradients (or a per-datapoint autograd loop) at
1e-10; the inferred group is written out neuron by neuron (``perm_group``: ``-1`` fixed, else the id of the
set a neuron permutes with) and a sampled element of it must keep the function and map the graph to the
permuted model's graph; a refusal is checked by the words a user reads. Each test names the mutants it kills
(``mutmut show NAME`` in ``.mutation/convert-elementwise/``), each checked with ``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import batch, convert_exactly, cross_entropy, squared
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.graph import EdgeKind

DTYPE = torch.float64


def fixed(count):
    return [-1] * count


# ------------------------------------------------------------------------------------------- mask_op
MASKS = {
    # one entry per feature (a mask over the 4 neurons of the tanh set), or one entry for all of them
    "per feature": torch.tensor([True, False, True, False]),
    "all": torch.ones(4, dtype=torch.bool),
    "none": torch.zeros(4, dtype=torch.bool),
}
MASK_OPS = {
    "masked_fill": lambda h, mask: h.masked_fill(mask, 0.5),
    "torch.masked_fill": lambda h, mask: torch.masked_fill(h, mask, -0.25),
    "masked_fill, value by keyword": lambda h, mask: h.masked_fill(mask, value=0.5),
    "where, neurons first": lambda h, mask: torch.where(mask, h, 0.5),
    "where, neurons second": lambda h, mask: torch.where(mask, -0.25, h),
    "where of a tensor": lambda h, mask: torch.where(mask, h, torch.full((4,), 0.5, dtype=DTYPE)),
}


class Masked(nn.Module):
    """``Linear(3, 4) -> tanh -> op(h, mask) -> Linear(4, 3)``: the tanh set's 4 neurons masked."""

    def __init__(self, op: str, mask: torch.Tensor) -> None:
        super().__init__()
        self.op = MASK_OPS[op]
        self.first, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.first(x)), self.mask))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("op", MASK_OPS)
def test_a_mask_that_differs_between_features_fixes_the_set_and_one_that_does_not_keeps_it(op, mask):
    """``masked_fill`` and ``torch.where`` with one constant operand are elementwise ops of the neurons
    (exact); a mask that differs between the set's neurons breaks their permutation symmetry (the set
    fixed), one alike for all of them keeps it. Kills ``mask_op`` (the WHERE test, the operands, the
    condition's check, the mask passed to ``check_constant``)."""
    model = Masked(op, MASKS[mask]).to(DTYPE)
    graph, moved = convert_exactly(model, *batch(5, 3))
    expected = fixed(3) + (fixed(4) if mask == "per feature" else [0] * 4) + fixed(3)
    assert graph.perm_group.tolist() == expected
    assert (moved == 0) == (mask == "per feature")


class MaskedTokens(nn.Module):
    """Tokens ``[b, T, 3] -> Linear(3, 4) -> tanh``, masked along the tokens only (a padding mask,
    ``[T, 1]``) or along the tokens and the features (``[T, 4]``), pooled over the tokens."""

    def __init__(self, op: str, per_feature: bool) -> None:
        super().__init__()
        self.op = MASK_OPS[op]
        self.first, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        mask = torch.tensor([[True, False, False, True], [False, False, True, True], [True, True, False, False]])
        self.register_buffer("mask", mask if per_feature else mask[:, :1])

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.first(x)), self.mask).sum(1))


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("op", ["masked_fill", "where, neurons first", "where, neurons second"])
def test_a_padding_mask_over_the_tokens_keeps_the_features_permutable(op, per_feature):
    """A mask that varies along the tokens only is alike for every neuron of the set (permutable);
    one that also varies along the features fixes it."""
    graph, moved = convert_exactly(MaskedTokens(op, per_feature).to(DTYPE), *batch(4, 3, 3))
    assert graph.perm_group.tolist()[3:7] == (fixed(4) if per_feature else [0] * 4)
    assert (moved == 0) == per_feature


class MaskedConstant(nn.Module):
    """A constant (no neurons) masked, then added to the neurons: no rule output to make."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.first, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.register_buffer("mask", torch.tensor([True, False, True, False]))
        self.register_buffer("table", torch.linspace(-1.0, 1.0, 4, dtype=DTYPE))

    def forward(self, x):
        constant = self.table.masked_fill(self.mask, 2.0) if self.op == "masked_fill" \
            else torch.where(self.mask, self.table, 2.0)
        return self.out(torch.tanh(self.first(x)) + constant)


@pytest.mark.parametrize("op", ["masked_fill", "where"])
def test_a_masked_constant_added_to_the_neurons_is_exact(op):
    """``masked_fill`` / ``where`` of constants only: a constant, which differs between the features it is
    added to (the set fixed)."""
    graph, _ = convert_exactly(MaskedConstant(op).to(DTYPE), *batch(5, 3))
    assert graph.perm_group.tolist() == fixed(10)


def test_where_between_two_neuron_values_is_refused_by_name():
    """``torch.where(mask, h, h * h)``: no rule says which neuron holds which value; the refusal names the op
    and why when the result reaches the next layer."""

    class TwoValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
            self.register_buffer("mask", torch.tensor([True, False, True, False]))

        def forward(self, x):
            h = torch.tanh(self.first(x))
            return self.out(torch.where(self.mask, h, h * h))

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"torch\.where: where\(\) between several neuron values, "
                                                        r"and its result reaches torch\.nn\.functional\.linear"):
        gradgraph.to_graph(TwoValues().to(DTYPE), *batch(5, 3), cross_entropy)


PARAMETER_MASK_OPS = {
    "where, parameter second": lambda h, mask, p, q: torch.where(mask, h, p),
    "where, parameter first": lambda h, mask, p, q: torch.where(mask, p, h),
    "masked_fill with a parameter": lambda h, mask, p, q: h.masked_fill(mask, q),
    "masked_fill with a parameter by keyword": lambda h, mask, p, q: h.masked_fill(mask, value=q),
}


@pytest.mark.parametrize("op", PARAMETER_MASK_OPS)
def test_a_parameter_selected_by_where_or_filled_in_is_refused_by_name(op):
    """A parameter as a value of ``torch.where`` or as ``masked_fill``'s fill value is no bias or scale of the
    neurons: the rule read the op as elementwise in the neurons alone, so the parameter's gradient was lost, and
    the conversion failed with a bare ``KeyError: 'p'`` from its own gradient check (or, with the parameter also
    used elsewhere, a gradient mismatch). It is refused by name, as ``h - p`` is (run elementwise 2 then: kills
    ``mask_op`` 3, 8, 10, 12-14, the fill value by keyword, and 24, 28-33, the words)."""

    class WithParameter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
            self.p, self.q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(()))
            self.register_buffer("mask", torch.tensor([True, False, True, False]))

        def forward(self, x):
            return self.out(PARAMETER_MASK_OPS[op](torch.tanh(self.first(x)), self.mask, self.p, self.q))

    gradgraph.convert.clear_structure_cache()
    name, op_name = ("q", "Tensor.masked_fill") if "masked_fill" in op else ("p", "torch.where")
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(WithParameter().to(DTYPE), *batch(5, 3), cross_entropy)
    assert str(error.value).endswith(
        f": {op_name}: the parameter '{name}' is a value the op selects (torch.where's value or masked_fill's fill "
        "value), which gradgraph has no rank-1 terms for; it reads a parameter added to neurons (a bias) or "
        "multiplied with them (a scale): write h + b or h * s"), str(error.value)


# ------------------------------------------------------------------------------------- binary's refusals
class TwoSets(nn.Module):
    """Two neuron values ``h = tanh(a(x))``, ``g = sigmoid(b(x))`` (and a parameter ``v``) combined by ``op``."""

    def __init__(self, op, parameter: bool = True) -> None:
        super().__init__()
        self.op = op
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)
        if parameter:
            self.v = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.out(self.op(self, torch.tanh(self.a(x)), torch.sigmoid(self.b(x))))


REFUSALS = {
    "copies": (lambda self, h, g: (h[:, None, :] + g[:, None, :].expand(-1, 2, -1)).sum(1),
               "Tensor.add: copies values of one position over a new axis (a broadcast or expand of a [.., 1, ..] "
               "axis), so one neuron would hold several values at one datapoint position; apply the op before adding "
               "the axis, or add it with a Linear"),
    "parameter subtracted": (lambda self, h, g: h - self.v,
                             "Tensor.sub: the parameter 'v' is subtracted, divided by, an exponent, a bound or scaled "
                             "by alpha; gradgraph reads a parameter added to neurons (a bias) or multiplied with them "
                             "(a scale): write h + b or h * s"),
    "another datapoint's value": (lambda self, h, g: h + g[torch.tensor([1, 2, 3, 4, 0])],
                                  "Tensor.add: combines values of different datapoints (a value gathered from another "
                                  "graph or row of the batch), so one datapoint's loss would depend on another's"),
    "partly not neurons, on the left": (
        lambda self, h, g: torch.cat([g[:, :2], g[:, :2].mean(-1, keepdim=True).expand(-1, 2)], -1) + h,
        "Tensor.add: combines neurons with values that are partly not neurons"),
    "outer product": (lambda self, h, g: (h[:, :, None] * g[:, None, :]).sum(-1),
                      "Tensor.mul: combines values broadcast from both sides (an outer product of neuron values), so "
                      "no neuron holds one value per datapoint position"),
    "partly not neurons": (lambda self, h, g: h + torch.cat([g[:, :2], g[:, :2].mean(-1, keepdim=True).expand(-1, 2)],
                                                            -1),
                           "Tensor.add: combines neurons with values that are partly not neurons"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_binary_refusals_name_the_op_and_say_why_in_full(case):
    """The words a user reads, in full, after the op's name. Kills ``check_no_copies`` 6, 10, 12-16,
    ``parameter_operand_refused`` 1, 7, 8 (the op name ``None``, the words changed) and ``binary`` 106, 215,
    223-231 (values of two datapoints combined: the check dropped, its words), 285 (partly not neurons on the
    left), 337-344 (the outer product's words)."""
    op, message = REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(TwoSets(op).to(DTYPE), *batch(5, 3), cross_entropy)
    assert str(error.value).endswith(f": {message}"), str(error.value)  # (under mutmut the frame is its trampoline)


class TokensAndPositions(nn.Module):
    """Tokens ``[b, T, 3] -> tanh(Linear(3, 4))`` and a position table ``pos(arange(T))`` (neurons that do not
    depend on the input), combined by ``op`` and pooled over the tokens."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.pos, self.out = nn.Linear(3, 4), nn.Embedding(3, 4), nn.Linear(4, 3)
        self.v = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.out(self.op(self, torch.tanh(self.a(x)), self.pos(torch.arange(x.shape[1]))).sum(1))


REACHES = ", and its result reaches torch.nn.functional.linear with the parameter 'out.weight' at "
INPUT_FREE_REFUSALS = {
    "parameter times positions": (lambda self, h, p: h + p * self.v,
                                  "Tensor.mul: arithmetic between a parameter and values that do not depend on the "
                                  "input"),
    "positions times positions": (lambda self, h, p: h + p * p,
                                  "Tensor.mul: arithmetic on two values that do not depend on the input"),
    "mean of positions": (lambda self, h, p: h + p.mean(0),
                          "Tensor.mean: a reduction of values that do not depend on the input" + REACHES),
    "sum over everything": (lambda self, h, p: h + h.sum(),
                            "Tensor.sum: a reduction over datapoints" + REACHES),
    "mean over everything": (lambda self, h, p: h * torch.mean(h),
                             "torch.mean: a reduction over datapoints" + REACHES),
}


@pytest.mark.parametrize("case", INPUT_FREE_REFUSALS)
def test_ops_on_values_of_no_datapoint_are_refused_with_the_ops_name_and_why(case):
    """A parameter or a second value combined with neurons of no datapoint (a position table), a reduction of
    them, and a reduction over every axis (the datapoints too, ``dim`` left out): refused at the op, by name, with
    why. Kills ``with_parameter`` 5-10, ``reduction`` 8, 11-17 (the opaque result unmarked, its op name or reason
    changed), ``_dims`` 16, 17 (no ``dim``: every axis)."""
    op, message = INPUT_FREE_REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(TokensAndPositions(op).to(DTYPE), *batch(5, 3, 3), cross_entropy)
    text = str(error.value)
    assert (f": {message}" in text) if REACHES in message else text.endswith(f": {message}"), text


# ---------------------------------------------------------------------------------------------- reduction
class Pooled(nn.Module):
    """Tokens ``[b, T, 3] -> tanh(Linear(3, 4))`` pooled over the tokens by ``op``, then ``Linear(4, 3)``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.a(x))))


POOLINGS = {
    "max values": lambda h: h.max(1).values,
    "min by keyword": lambda h: h.min(dim=1)[0],
    "max with keepdim": lambda h: h.max(1, keepdim=True).values.squeeze(1),
    "mean, keepdim by position": lambda h: h.mean(1, True).squeeze(1),
    "torch.sum, keepdim by position": lambda h: torch.sum(h, 1, True)[:, 0],
    "amax, keepdim by position": lambda h: h.amax(1, True).squeeze(1),
    "sum, keepdim False by position": lambda h: h.sum(1, False),
}


@pytest.mark.parametrize("op", POOLINGS)
def test_a_pool_over_the_tokens_with_its_indices_or_keepdim_by_position_is_a_tied_copy(op):
    """A max / min over the tokens (its values; the indices left unused) and a pool with ``keepdim`` passed by
    position: one pooled neuron per feature, tied to the pooled set (both permute together). Kills ``reduction``
    25-27, 38, 42, 45, 46 (the values of a max with indices refused, unpacked from ``None`` or their indices
    marked wrongly), 59, 61, 64, 66, 69, 71 (``keepdim`` by position read as ``False``)."""
    graph, moved = convert_exactly(Pooled(POOLINGS[op]).to(DTYPE), *batch(5, 3, 3))
    assert graph.perm_group.tolist() == fixed(3) + [0] * 8 + fixed(3)
    assert moved > 0


@pytest.mark.parametrize("use", ["added", "gathered by"])
def test_the_indices_of_a_max_are_refused_where_they_reach_a_layer(use):
    """The indices of a max depend on the values (a cached plan replayed on other inputs would read other
    elements): refused by name where they reach a layer. Kills ``reduction`` 39-41, 43, 44, 47, 48."""

    def op(h):
        if use == "added":
            return h.max(1).values + h.max(1).indices.to(h.dtype)
        return torch.gather(h, 1, h.max(1, keepdim=True).indices).squeeze(1)

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(Pooled(op).to(DTYPE), *batch(5, 3, 3), cross_entropy)
    assert ": Tensor.max: the indices of a max/min" + REACHES in str(error.value), str(error.value)


def test_a_sum_over_one_token_at_the_output_leaves_the_output_neurons_act_the_output():
    """One token (``[b, 1, 3]``) summed at the end: the same values, a new version of the output set, whose act
    (read from its newest value, no layer reads it) is the model's output. Kills ``reduction`` 152 (that
    value not observed)."""
    model = Pooled(lambda h: h).to(DTYPE)
    model.forward = lambda x: model.out(torch.tanh(model.a(x))).sum(1)
    inputs, targets = batch(5, 1, 3)
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    torch.testing.assert_close(graph.act[-3:].T, model(inputs).detach(), atol=1e-12, rtol=0)


REDUCTION_REFUSALS = {
    "over tokens and features": (lambda h: h.mean((1, 2))[:, None].expand(-1, 4),
                                 "Tensor.mean: a reduction over features and positions together"),
    "sum of each part": (lambda h: h.view(*h.shape[:2], 2, 2).sum(-1).repeat(1, 1, 2).sum(1),
                         "Tensor.sum: a reduction over part of the features"),
    "log-sum-exp over tokens": (lambda h: h.logsumexp(1), "Tensor.logsumexp: a reduction over positions other "
                                "than sum/mean/max/min/norm"),
    "variance over tokens": (lambda h: torch.var(h, 1), "torch.var: a reduction over positions other than "
                             "sum/mean/max/min/norm"),
}


@pytest.mark.parametrize("case", REDUCTION_REFUSALS)
def test_reductions_with_no_rule_are_refused_by_name_where_they_reach_a_layer(case):
    """A reduction over the features and the tokens together, a sum of part of the features (no statistic a norm
    takes), and a reduction over the tokens that is no pool: refused at the op, by name, with why. Kills
    ``reduction`` 156, 203 (both axes read as one of them), 161, 164-173 (the part's sum made a statistic, its
    refusal's words), 209-219."""
    op, message = REDUCTION_REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(Pooled(op).to(DTYPE), *batch(5, 3, 3), cross_entropy)
    assert f": {message}" + REACHES in str(error.value), str(error.value)


def test_pooled_rows_that_hold_other_neurons_are_refused():
    """Tokens of two sets (``cat([h1, h2])`` along the tokens) pooled in halves: one half's row holds ``h1``'s
    neurons, the other's ``h2``'s, so no pooled neuron holds one value per row; refused by name. Kills
    ``reduction`` 244, 251-260."""

    class TwoSetsOfTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            both = torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.c(x))], 1)
            return self.out(both.view(x.shape[0], 2, x.shape[1], 4).mean(2).sum(1))

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(TwoSetsOfTokens().to(DTYPE), *batch(5, 3, 3), cross_entropy)
    assert ": Tensor.mean: pooling that does not keep one neuron per feature" + REACHES in str(error.value)


class OneNeuronPerToken(nn.Module):
    """One neuron per token, ``tanh(Linear(3, 1))`` squeezed to ``[b, T]``, pooled by ``op``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.out = nn.Linear(3, 1), nn.Linear(1, 3)

    def forward(self, x):
        return self.op(self, torch.tanh(self.a(x)).squeeze(-1))


ONE_NEURON_POOLS = {
    # pooled to [b], then a Linear of its one feature
    "mean to [b]": (lambda self, h: self.out(h.mean(1).unsqueeze(-1)), 3 + 1 + 1 + 3),
    # the tokens pooled in pairs to [b, 2], each pair a row of its own (the Linear's outputs pooled too)
    "max of pairs": (lambda self, h: self.out(h.view(h.shape[0], 2, 2).amax(2).unsqueeze(-1)).sum(1),
                      3 + 1 + 1 + 3 + 3),
    # pooled to [b] after a Linear and a sum of its features, the regression's output: that sum is a statistic
    # (no neuron), and a statistic pooled over the tokens is opaque (its pooled set had an edge from node -1,
    # tests/convert/test_convert_pooled_statistics.py), fine after the last parameterised op: no pooled set
    "sum to [b]": (lambda self, h: torch.tanh(self.out(h.unsqueeze(-1))).sum(-1).mean(1), 3 + 1 + 3),
}


@pytest.mark.parametrize("batch_size", [5, 2, 1])
@pytest.mark.parametrize("case", ONE_NEURON_POOLS)
def test_a_pool_of_one_neuron_per_token_is_one_pooled_neuron(case, batch_size):
    """A value of one neuron on ``[b, T]`` pooled over the tokens: its last axis left holds datapoints (or
    positions), not features. The rule read it as the feature row, so the pool made one neuron per datapoint
    (per position): a graph whose nodes grew with the batch (12 nodes for 5 datapoints, 9 for 2, in "sum to
    [b]"), and a Linear of the pooled value refused ("applied to an axis that holds positions or datapoints").
    Now one pooled neuron, tied to the pooled one, the same graph for every batch size (one datapoint too: run
    elementwise 4's ``reduction`` 261, the positions read off the datapoint axis), exact."""
    op, num_nodes = ONE_NEURON_POOLS[case]
    inputs, targets = batch(batch_size, 4, 3)
    if case == "sum to [b]":
        targets = torch.randn(batch_size, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        gradgraph.convert.clear_structure_cache()
        graph = assert_exact_per_sample_grads(OneNeuronPerToken(op).to(DTYPE), inputs, targets,
                                              lambda out, y: (out - y) ** 2)
    else:
        graph, _ = convert_exactly(OneNeuronPerToken(op).to(DTYPE), inputs, targets)
    assert graph.num_nodes == num_nodes
    # the pooled neuron is tied to the one it pools (a set of one), or the output's (fixed)
    assert graph.perm_group[[3, 4]].tolist() == [0, 0] if case != "sum to [b]" else int(graph.edge_index.min()) >= 0


# ------------------------------------------------------------------------------------------------- norm
class RMSNormed(nn.Module):
    """``Linear(3, 4) -> tanh -> norm(h) -> Linear(4, 3)``, the norm written as ``op(h, weight)``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(4))

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.a(x)), self.weight))


NORMS_BY_POSITION = {
    # torch.rms_norm is a builtin: a __torch_function__ mode gets its arguments as the caller wrote them
    "torch.rms_norm, weight and eps by position": lambda h, w: torch.rms_norm(h, (4,), w, 0.5),
    "torch.rms_norm, weight by position": lambda h, w: torch.rms_norm(h, [4], w),
    "torch.rms_norm, eps by keyword": lambda h, w: torch.rms_norm(h, [4], w, eps=0.5),
    "F.rms_norm": lambda h, w: F.rms_norm(h, (4,), w, 0.5),
}


@pytest.mark.parametrize("op", NORMS_BY_POSITION)
def test_norms_with_their_weight_and_eps_given_by_position_are_exact(op):
    """``torch.rms_norm(h, shape, weight, eps)`` hands the rule its weight and ``eps`` by position (a large
    ``eps``, 0.5, so one read wrongly shows in every gradient). Kills ``norm`` 14, 16, 18 (the weight by position
    dropped or read at another place), 24 (``eps`` read as a bias), 34, 37, 39, 40, 42 (``eps`` by position
    dropped or read at another place)."""
    graph, moved = convert_exactly(RMSNormed(NORMS_BY_POSITION[op]).to(DTYPE), *batch(5, 3))
    assert graph.num_nodes == 3 + 4 + 4 + 3


class HeadNormMLP(nn.Module):
    """``Linear(3, n)`` viewed ``[b, *heads, d]``, an RMS norm of each head's ``d`` features (its weight per
    feature of every head, ``w.view(heads, d)``, so each head permutes on its own), ReLU, ``Linear(n, 3)``."""

    def __init__(self, heads: tuple[int, ...], d: int) -> None:
        super().__init__()
        self.shape = (*heads, d)
        n = math.prod(self.shape)
        self.a, self.out = nn.Linear(3, n), nn.Linear(n, 3)
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(n))

    def forward(self, x):
        h = F.rms_norm(self.a(x).view(x.shape[0], *self.shape), self.shape[-1:], eps=0.25)
        return self.out(torch.relu(h * self.weight.view(self.shape)).reshape(x.shape[0], -1))


@pytest.mark.parametrize("batch_size", [6, 1])
@pytest.mark.parametrize("heads, d", [((3,), 4), ((2, 3), 2)])
def test_a_norm_of_each_head_keeps_each_heads_features_apart(heads, d, batch_size):
    """The statistic of each head's features: a permutation may move features within a head only. Each head is a
    block of its own in the affine output, the norm and the scale (tied: the same block ids), also with heads on
    two axes (``[b, 2, 3, d]``). Kills ``norm`` 176-178 (the kept / reduced axes of ``separate_parts`` read off
    other places of the neuron axes) and ``separate_parts`` 3, 13, 14, 34, 36, 37 (one part separated, or parts
    read along the wrong axis; a batch of one datapoint: 13, 14, the parts read off datapoint 1)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(HeadNormMLP(heads, d).to(DTYPE), *batch(batch_size, 3))
    parts = math.prod(heads)
    blocks = [part for part in range(parts) for _ in range(d)]
    assert graph.perm_group.tolist() == fixed(3) + blocks * 3 + fixed(3)
    assert moved > 0


class NormOf(nn.Module):
    """Tokens ``[b, T, 3] -> tanh(Linear(3, 4))``, then ``op`` (a norm), summed over the tokens."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.out, self.pos = nn.Linear(3, 4), nn.Linear(4, 3), nn.Embedding(3, 4)
        self.weight = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("table", torch.linspace(-1.0, 2.0, 4, dtype=DTYPE))

    def forward(self, x):
        return self.out(self.op(self, torch.tanh(self.a(x))).sum(1))


NORM_REFUSALS = {
    "a constant with a weight": (lambda self, h: h + F.layer_norm(self.table, (4,), self.weight),
                                 "torch.nn.functional.layer_norm: its input is not computed from the model input"),
    "over two axes": (lambda self, h: F.layer_norm(h, (3, 4)),
                      "torch.nn.functional.layer_norm: normalized_shape (3, 4); gradgraph supports norms over the last "
                      "axis"),
    "over the tokens": (lambda self, h: F.layer_norm(h.transpose(1, 2), (3,)).transpose(1, 2),
                        "torch.nn.functional.layer_norm: a norm whose last axis is not the features of its input"),
    "of a position table": (lambda self, h: h + F.rms_norm(self.pos(torch.arange(h.shape[1])), (4,)),
                            "torch.nn.functional.rms_norm: a norm whose last axis is not the features of its input"),
}


@pytest.mark.parametrize("case", NORM_REFUSALS)
def test_norms_with_no_rule_are_refused_by_name_and_why(case):
    """A norm of a constant with a learned weight, over two axes, over the tokens, and of a position table: refused at
    the norm, by name, with why. Kills ``norm`` 54, 55, 57-60, 63-69, 78, 89, 94-99."""
    op, message = NORM_REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(NormOf(op).to(DTYPE), *batch(5, 3, 3), cross_entropy)
    assert f": {message}" in str(error.value), str(error.value)


NORM_WEIGHT_REFUSALS = {
    "a buffer as the weight": (lambda self, h: F.rms_norm(h, (4,), self.table),
                               "torch.nn.functional.rms_norm: its weight is not a parameter of the model"),
    "a buffer as the bias": (lambda self, h: F.layer_norm(h, (4,), self.weight, self.table),
                             "torch.nn.functional.layer_norm: its bias is not a parameter of the model"),
}


@pytest.mark.parametrize("case", NORM_WEIGHT_REFUSALS)
def test_a_norms_weight_or_bias_that_is_no_parameter_is_refused_by_its_role(case):
    """A buffer as a norm's weight or bias: refused with the op's name and which of the two it is. Kills ``norm``
    226, 227, 231, 232, 241, 242, 246, 247."""
    op, message = NORM_WEIGHT_REFUSALS[case]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(NormOf(op).to(DTYPE), *batch(5, 3, 3), cross_entropy)
    assert f": {message}" in str(error.value), str(error.value)


# ----------------------------------------------------------------------------------------- binary's operands
BY_KEYWORD = {
    "torch.add(h, other=g)": lambda h, g: torch.add(h, other=g),
    "torch.mul(h, other=g)": lambda h, g: torch.mul(h, other=g),
    "torch.sub(h, other=g)": lambda h, g: torch.sub(h, other=g),
}


@pytest.mark.parametrize("op", BY_KEYWORD)
def test_a_second_operand_given_by_keyword_is_read(op):
    """``torch.add(h, other=g)``: a builtin hands a ``__torch_function__`` mode its arguments as the caller wrote
    them, so ``other`` comes by keyword. Kills ``binary`` 4, 6, 8-10 (``args[1]`` read regardless, or ``other``
    looked up under another key)."""
    model = TwoSets(lambda self, h, g: BY_KEYWORD[op](h, g), parameter=False).to(DTYPE)
    graph, moved = convert_exactly(model, *batch(5, 3))
    assert graph.num_nodes == 3 + 4 + 4 + 4 + 3
    assert moved > 0


class ScaledPixels(nn.Module):
    """Integer pixels cast to float and scaled by a learned gain, the gain written first (``gain * pixels``)."""

    def __init__(self, gain_first: bool) -> None:
        super().__init__()
        self.gain_first = gain_first
        self.gain = nn.Parameter(torch.rand(6) + 0.5)
        self.net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, images):
        pixels = images.flatten(1).to(DTYPE) / 255
        return self.net(self.gain * pixels if self.gain_first else pixels * self.gain)


@pytest.mark.parametrize("gain_first", [True, False])
def test_integer_pixels_scaled_by_a_parameter_on_either_side_are_the_input_neurons(gain_first):
    """Input features cast from integers and multiplied by a parameter: the cast value is the input's neurons
    whichever side the parameter is on. Kills ``binary`` 37 (the right operand's partner not passed, so a cast
    value on the right stayed data and the product was refused as arithmetic on a parameter)."""
    gradgraph.convert.clear_structure_cache()
    images = torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = ScaledPixels(gain_first).to(DTYPE)
    graph = assert_matches_autograd_loop(model, images, torch.tensor([0, 2, 1, 2]), cross_entropy)
    assert graph.num_nodes == 6 + 6 + 4 + 3


class ScaledBy(nn.Module):
    """``Linear(3, 4) -> tanh -> h * scale(w) -> Linear(4, 3)``: a scale computed from the parameter ``w``."""

    def __init__(self, scale) -> None:
        super().__init__()
        self.scale = scale
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.w = nn.Parameter(0.3 * torch.randn(4))

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) * self.scale(self.w))


ONE_PLUS_WEIGHT = {
    "w + 1": lambda w: w + 1,
    "1 + w": lambda w: 1 + w,
    "w.add(1.0)": lambda w: w.add(1.0),
    "torch.add(w, 1)": lambda w: torch.add(w, 1),
}


@pytest.mark.parametrize("scale", ONE_PLUS_WEIGHT)
def test_a_scale_written_one_plus_weight_stands_for_the_weight_in_each_spelling(scale):
    """Gemma's ``(1 + w)`` scale, written each way torch hands it to the mode (``__add__``, the reflected
    ``__radd__`` with the number on the left, ``Tensor.add``, ``torch.add``): the op stands for ``w``, exact.
    Kills ``binary`` 48, 49 (the number looked for on the parameter's side) and 59-64 (the names)."""
    graph, _ = convert_exactly(ScaledBy(ONE_PLUS_WEIGHT[scale]).to(DTYPE), *batch(5, 3))
    assert graph.num_nodes == 3 + 4 + 4 + 3


PARAMETER_ARITHMETIC = {
    "Tensor.mul": lambda w: w * 2,
    "Tensor.add": lambda w: w + torch.ones(4, dtype=DTYPE),
    "torch.add": lambda w: torch.add(w, 1, alpha=2),
}


@pytest.mark.parametrize("scale", PARAMETER_ARITHMETIC)
def test_other_arithmetic_on_a_parameter_alone_is_refused_by_name(scale):
    """Only a number added to a parameter (alpha 1) stands for it; a product (``w * 2``), a tensor added, or
    ``alpha`` is arithmetic on the parameter, refused with the op's name and what gradgraph reads. Kills
    ``binary`` 53-55, 74, 75 (``alpha`` looked up under another key), 85-92 (the refusal's words)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(ScaledBy(PARAMETER_ARITHMETIC[scale]).to(DTYPE), *batch(5, 3), cross_entropy)
    message = (f": {scale}: arithmetic on parameters inside the forward (other than as a weight, a bias, a scale, a "
               "position embedding or a constant added to a scale)")
    assert str(error.value).endswith(message), str(error.value)


# ------------------------------------------------------------------------------------------- combined_set
def test_a_product_with_itself_reordered_is_a_new_set_fed_by_both_operands():
    """``o * o[:, [0, 0, 1]]`` at the output: the operands do not pair neuron for neuron, so the product is a new
    pinned set, one neuron per neuron of ``o``, with one GATE edge from each operand neuron that meets it
    (written out: ``o0 -> c0, c1``, ``o1 -> c1, c2``, ``o2 -> c2``), and its act is the model's output. Kills
    ``combined_set`` 40 (the second operand's edges dropped) and 68 (the product not observed)."""

    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            o = self.b(torch.tanh(self.a(x)))
            return o * o[:, [0, 0, 1]]

    model = Reordered().to(DTYPE)
    inputs, targets = batch(5, 3)
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    assert graph.num_nodes == 3 + 4 + 3 + 3
    into = graph.edge_index[1] >= 10
    edges = sorted(zip(graph.edge_index[0][into].tolist(), graph.edge_index[1][into].tolist()))
    assert edges == [(7, 10), (7, 11), (8, 11), (8, 12), (9, 12)]
    assert set(graph.edge_kind[into].tolist()) == {int(EdgeKind.GATE)}
    torch.testing.assert_close(graph.act[-3:].T, model(inputs).detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("constant_first", [True, False])
def test_a_constant_alike_for_every_feature_keeps_the_set_on_either_side(constant_first):
    """``c * h`` and ``h * c`` with a constant alike for every feature: an elementwise op of the neurons, the
    set free to permute; the constant, not the neurons, is checked for variation whichever side it is on.
    Kills ``binary`` 130 (the neurons checked as the constant)."""
    constant = torch.full((4,), 0.5, dtype=DTYPE)
    op = (lambda self, h, g: constant * h) if constant_first else (lambda self, h, g: h * constant)

    class OneSet(TwoSets):
        def forward(self, x):
            return self.out(self.op(self, torch.tanh(self.a(x)), None))

    model = OneSet(op, parameter=False).to(DTYPE)
    del model.b
    graph, moved = convert_exactly(model, *batch(5, 3))
    assert graph.perm_group.tolist() == fixed(3) + [0] * 4 + fixed(3)
    assert moved > 0


def test_a_position_table_on_the_left_of_a_sum_is_bound_to_the_tokens():
    """``pos(arange(T)) + h``: the table's rows (no datapoint) bound to the tokens of the value on the right,
    as ``h + pos`` is. Kills ``binary`` 167, 170, 171 (the left operand's components read though it has none, or
    it is not bound)."""
    model = TokensAndPositions(lambda self, h, p: p + h).to(DTYPE)
    del model.v
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, *batch(5, 3, 3), cross_entropy)
    right = TokensAndPositions(lambda self, h, p: h + p).to(DTYPE)
    right.load_state_dict(model.state_dict(), strict=False)
    del right.v
    gradgraph.convert.clear_structure_cache()
    assert graph.num_nodes == gradgraph.to_graph(right, *batch(5, 3, 3), cross_entropy).num_nodes


def test_two_values_each_copied_over_a_new_axis_and_summed_back_are_exact():
    """``h`` and ``g`` each expanded over a new axis of 2 (the same shape, so no broadcast in the op) and summed
    back over it: exact. Kills ``binary`` 199 (every op checked for copies as if broadcast: refused)."""
    model = TwoSets(lambda self, h, g: (h[:, None, :].expand(-1, 2, -1) + g[:, None, :].expand(-1, 2, -1)).sum(1),
                    parameter=False).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_exact_per_sample_grads(model, *batch(5, 3), cross_entropy)


class WithInput(nn.Module):
    """``h = tanh(Linear(3, 4)(x))`` combined with the input ``x`` (or a statistic of ``h``) by ``op``."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.op(torch.tanh(self.a(x)), x))


STATISTIC_OR_NODE_ZERO = {
    # an RMS norm written with its statistic first: the product lives in h's neurons (no new set)
    "statistic first": (lambda h, x: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * h, 3 + 4 + 3),
    "statistic second": (lambda h, x: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), 3 + 4 + 3),
    # the input's first feature (node 0) gating h: a gate, a new set tied to h (node 0 is a neuron, not a statistic)
    "node 0 first": (lambda h, x: x[:, :1] * h, 3 + 4 + 4 + 3),
    "node 0 second": (lambda h, x: h * x[:, :1], 3 + 4 + 4 + 3),
    # node 0 times a statistic is node 0 (the statistic scales it), then a gate of h
    "node 0 times a statistic": (lambda h, x: h * (x[:, :1] * h.pow(2).mean(-1, keepdim=True)), 3 + 4 + 4 + 3),
}


@pytest.mark.parametrize("case", STATISTIC_OR_NODE_ZERO)
def test_a_statistic_on_either_side_and_a_gate_of_node_zero(case):
    """A statistic (ids ``-1``) on either side of a product keeps the other operand's neurons; the input's first
    neuron (id 0) is no statistic: it gates ``h`` into a new set. Kills ``binary`` 243, 251 (the statistic on the
    left not recognised, or taken as the base), 244, 245, 247, 248, 254, 255 (node 0 read as a statistic)."""
    op, num_nodes = STATISTIC_OR_NODE_ZERO[case]
    graph, moved = convert_exactly(WithInput(op).to(DTYPE), *batch(5, 3))
    assert graph.num_nodes == num_nodes
    assert graph.perm_group.tolist() == fixed(3) + [0] * (num_nodes - 6) + fixed(3)
    if num_nodes == 14:
        gate = graph.edge_index[0] == 0
        assert sorted(graph.edge_index[1][gate].tolist()) == [3, 4, 5, 6, 7, 8, 9, 10]  # h (Linear) and the product


def test_a_value_combined_with_itself_reordered_or_activated_at_the_output():
    """``o + o[:, [1, 0, 2]]`` (each neuron meets another of its own set: pinned, no symmetry claimed) and
    ``o * sigmoid(o)`` (the same neurons: a new version, its act the model's output). Kills ``binary`` 358, 359,
    369, 370 (the overlap not seen, its sets not pinned) and 280 (the same-neuron product not observed); the sum's
    edges, one per operand neuron and sum neuron (448: the second operand's dropped)."""

    class Reordered(nn.Module):
        def __init__(self, op) -> None:
            super().__init__()
            self.op = op
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.op(self.b(torch.tanh(self.a(x))))

    for op in (lambda o: o + o[:, [1, 0, 2]], lambda o: o * torch.sigmoid(o)):
        model = Reordered(op).to(DTYPE)
        inputs, targets = batch(5, 3)
        gradgraph.convert.clear_structure_cache()
        graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
        torch.testing.assert_close(graph.act[-3:].T, model(inputs).detach(), atol=1e-12, rtol=0)
    hidden = WithInput(lambda h, x: h + h[:, [1, 0, 3, 2]])  # the overlap in a hidden set (h = tanh(a(x)))
    graph, moved = convert_exactly(hidden.to(DTYPE), *batch(5, 3))
    assert graph.perm_group.tolist() == fixed(graph.num_nodes) and moved == 0
    # the sum is a new set of 4 (nodes 7-10), each neuron fed by h_i and h_perm(i): 8 RESIDUAL edges
    into = (graph.edge_index[1] >= 7) & (graph.edge_index[1] < 11)
    edges = sorted(zip(graph.edge_index[0][into].tolist(), graph.edge_index[1][into].tolist()))
    assert graph.num_nodes == 14 and len(edges) == 8
    assert sorted(source for source, _ in edges) == [3, 3, 4, 4, 5, 5, 6, 6]
    assert set(graph.edge_kind[into].tolist()) == {int(EdgeKind.RESIDUAL)}


# Brief mut39 (issue 31, runs elementwise 14-15: the not-killed survivors of runs convert 1 and 9, elementwise 1, 3 and
# 5, made afresh; numbers of run elementwise 15, which keeps those of the old runs but ``binary``'s, renumbered after
# session 19's change of it: 313 -> 330, 345 -> 362, 358/359 -> 375/376, 369/370 -> 386/387, 400-406 -> 417-423,
# 430 -> 434, 438/439 -> 454/455, 480 -> ``merged_set`` 38)


def _words(model, inputs):
    """The words of ``to_graph``'s refusal (an UnsupportedOperationError, nothing else)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(model, inputs, None, squared)
    return str(error.value)


class ArithmeticOnTheInput(nn.Module):
    """The ``[b, 2, 3]`` input with its datapoints put last (``transpose(0, 2)``, ``[3, 2, b]``) times a constant
    (``float``) or, cast to float from integers, times a parameter of ``b`` entries (``integer``); a sum and
    ``Linear(1, 2)``."""

    def __init__(self, integer: bool, batch: int) -> None:
        super().__init__()
        self.integer = integer
        self.scale, self.out = nn.Parameter(torch.rand(batch, dtype=DTYPE) + 0.5), nn.Linear(1, 2)

    def forward(self, x):
        moved = x.transpose(0, 2)
        value = moved.to(DTYPE) * self.scale if self.integer else moved * 0.5
        return self.out(value.sum((0, 1))[:, None])


@pytest.mark.parametrize("integer", [False, True], ids=["float times 0.5", "integer cast, times a parameter"])
def test_the_input_read_by_arithmetic_with_its_datapoints_last_is_refused_naming_the_op(integer):
    """The rule that reads the raw input first (``binary``'s ``_operand``: a float input, or the integer input cast
    to float where a parameter scales it) expects its features on the last axis: refused, naming the op. Kills
    ``binary`` 30 and ``_operand`` 10 (``need_neurons``' op name ``None``: an ``AttributeError``)."""
    inputs = torch.randint(0, 5, (5, 2, 3), generator=torch.Generator().manual_seed(1)) if integer else \
        torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    text = _words(ArithmeticOnTheInput(integer, 5).to(DTYPE), inputs)
    assert text.endswith(": Tensor.mul: the input's features are not its last axis"), text


class ScaledPositionTable(nn.Module):
    """Token embeddings plus a position table scaled by a parameter (``pos(arange(T)) * scale``): the parameter meets
    values of no datapoint."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(3, 4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, ids):
        return self.out(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1])) * self.scale)).sum(1)


def test_a_parameter_times_a_position_table_is_refused_in_full():
    """A parameter combined with values that do not depend on the input (a position table before it joins the
    tokens): refused, the op and the words in full. Kills ``with_parameter`` 5-10 (that refusal's op or words
    ``None``, dropped or misspelt)."""
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    text = _words(ScaledPositionTable().to(DTYPE), ids)
    assert re.fullmatch(r"\S+:\d+ in \S+: Tensor\.mul: arithmetic between a parameter and values that do not depend "
                        r"on the input", text), text


class NewSetReadTwice(nn.Module):
    """A new set made by an op of two layers' values, read by ``Linear(4, 3)`` and, through tanh, by another
    ``Linear(4, 3)`` (``reads_tanh_first``: the tanh's reader called first): ``merged``, ``tanh(a(x)) + tanh(b(x))``
    (one neuron of each per neuron: ``merged_set``); ``combined``, ``tanh(a(x)) + g[:, [0, 0, 1, 1]]`` with
    ``g = tanh(b(x))`` of two neurons (not one of each per neuron: ``combined_set``)."""

    def __init__(self, combined: bool, reads_tanh_first: bool) -> None:
        super().__init__()
        self.combined, self.reads_tanh_first = combined, reads_tanh_first
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 2 if combined else 4)
        self.p, self.q = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        other = torch.tanh(self.b(x))
        other = other[:, [0, 0, 1, 1]] if self.combined else other
        new = torch.tanh(self.a(x)) + other
        if self.reads_tanh_first:
            return self.q(torch.tanh(new)) + self.p(new)
        return self.p(new) + self.q(torch.tanh(new))


@pytest.mark.parametrize("reads_tanh_first", [False, True], ids=["value first", "tanh first"])
@pytest.mark.parametrize("combined", [False, True], ids=["merged", "combined"])
def test_a_new_set_read_as_it_is_and_through_tanh_is_exact(combined, reads_tanh_first):
    """The op's value is version 0 of its new set, its tanh version 1 (``next_version``), so the second reader's
    ``fix_act`` finds the other version as the act and splits a copy off. Kills ``merged_set`` 38 and
    ``combined_set`` 62 (the new value made version 1, which the tanh's ``next_version`` gives again: the two
    values passed for one act, and the conversion's gradient check refused the wrong graph)."""
    torch.manual_seed(0)
    convert_exactly(NewSetReadTwice(combined, reads_tanh_first).to(DTYPE), *batch(5, 3))


class GateOverBlocks(nn.Module):
    """``h = tanh(a(x))`` of four neurons with ``g = sigmoid(c(x))[:, [0, 0, 1, 1]]``, two gate neurons each over a
    block of two: a product (``block_gate``'s new set) or a sum (no neuron of ``g`` per neuron of ``h``:
    ``combined_set``'s new set), then ``Linear(4, 2)``."""

    def __init__(self, additive: bool) -> None:
        super().__init__()
        self.additive = additive
        self.a, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        h, g = torch.tanh(self.a(x)), torch.sigmoid(self.c(x))[:, [0, 0, 1, 1]]
        return self.out(h + g if self.additive else h * g)


class InABlock(nn.Module):
    def __init__(self, additive: bool) -> None:
        super().__init__()
        self.block, self.out = GateOverBlocks(additive), nn.Linear(2, 2)

    def forward(self, x):
        return self.out(self.block(x))


@pytest.mark.parametrize("additive", [False, True], ids=["product: block_gate", "sum: combined_set"])
def test_a_gate_over_blocks_names_its_new_set_by_module_and_op(additive):
    """Exact (a per-datapoint loop); the new set is named by the op, at the root and in a module (the plan's
    ``set_names``). Kills ``binary`` 330 (``block_gate``'s op ``None``: the product set named ``'None'``) and 362
    (``combined_set``'s op ``None``)."""
    from test_convert_conv_set_names import assert_exact_by_loop, origins

    op = "Tensor.add" if additive else "Tensor.mul"
    torch.manual_seed(0)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    root, nested = GateOverBlocks(additive).to(DTYPE), InABlock(additive).to(DTYPE)
    assert_exact_by_loop(root, inputs)
    assert_exact_by_loop(nested, inputs)
    assert origins(root, inputs) == ["input", "a", "c", op, "out"]
    assert origins(nested, inputs) == ["input", "block.a", "block.c", f"block {op}", "block.out", "out"]


class TokensPlusTheirIds(nn.Module):
    """``tanh(emb(ids)).sum(1)`` of ``[b, 4]`` token ids plus the ids themselves cast to float (``ids / 7``, a
    constant of the datapoints on the four features), tanh, ``Linear(4, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(torch.tanh(self.emb(ids)).sum(1) + ids.to(DTYPE) / 7))


def test_ids_cast_to_float_and_added_to_neurons_are_a_constant():
    """The cast ids meet neurons, not a parameter: a constant that differs between the features (so the set is
    pinned), not the input's neurons. Kills ``_operand`` 8 (``or`` for ``and``: the cast ids read as input neurons
    wherever they meet anything, and the ids, read as tokens by the embedding, refused as "the input is read with
    two different layouts")."""
    ids = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    graph, moved = convert_exactly(TokensPlusTheirIds().to(DTYPE), ids, targets)
    assert moved == 0


POSITION_TABLE_OPS = {"1.0 * table": lambda table: 1.0 * table, "table + 0.0": lambda table: table + 0.0}


class TableThroughAnOp(nn.Module):
    """Token embeddings plus a position table passed through an elementwise op that keeps its values
    (``1.0 * table``, ``table + 0.0``) before it joins the tokens, tanh, ``Linear(4, 3)``, a sum over the tokens."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = POSITION_TABLE_OPS[op]
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.tok(ids) + self.op(self.pos(torch.arange(ids.shape[1]))))).sum(1)


@pytest.mark.parametrize("op", sorted(POSITION_TABLE_OPS))
def test_a_position_table_through_an_elementwise_op_keeps_its_rows(op):
    """The op's result keeps the table rows each position reads (``unbound_index``), so the rows are bound where
    the table joins the tokens. Kills ``unary`` 35, 39 (the rows dropped: the table's gradient lost, and the
    conversion's gradient check refused). (A table scaled by another constant, ``2.0 * table``, is refused by that
    check either way: the scale is on no edge.)"""
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    graph, moved = convert_exactly(TableThroughAnOp(op).to(DTYPE), ids, targets)
    assert moved > 0


def sign_flipped(model: nn.Module, rows: str, columns: str) -> nn.Module:
    """A copy of ``model`` with the rows (weight and bias) of its ``Linear`` ``rows`` and the columns of ``columns``
    negated: the model itself exactly when the neurons between them are an odd activation's alone."""
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        getattr(flipped, rows).weight.neg_(), getattr(flipped, rows).bias.neg_()
        getattr(flipped, columns).weight.neg_()
    return flipped


class TanhOfAResidualSum(nn.Module):
    """``out(tanh(a(x) + tanh(c(x))))``: the sum is absorbed into ``a``'s fresh affine neurons, then tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x) + torch.tanh(self.c(x))))


def test_a_set_that_absorbed_a_residual_sum_is_not_labelled_by_the_activation_after_it():
    """A sign flip of ``a``'s rows (weight and bias) and of ``out``'s columns changes the model, since the residual
    ``tanh(c(x))`` is not flipped: the set is no odd tanh layer, and its label must not be TANH (the label is what
    the scaling actions trust). ``binary`` marks the absorbing set ``absorbed``, so ``unary`` does not label it.
    Kills ``binary`` 417, 418 (``absorbed`` not set: ``a``'s neurons labelled TANH)."""
    torch.manual_seed(0)
    model = TanhOfAResidualSum().to(DTYPE)
    inputs, targets = batch(5, 3)
    graph, _ = convert_exactly(model, inputs, targets)
    assert not torch.allclose(sign_flipped(model, "a", "out")(inputs), model(inputs), atol=1e-3)
    hidden_a = slice(3, 7)  # input 3, then a's four neurons
    assert graph.activation[hidden_a].tolist() == [int(gradgraph.ActivationKind.IDENTITY)] * 4
    assert graph.activation[7:11].tolist() == [int(gradgraph.ActivationKind.TANH)] * 4  # c's, its own tanh


class GatedOrResidual(nn.Module):
    """``out(tanh(a(x) OP g))`` where the fresh affine output ``a(x)`` absorbs the other operand: ``sum``, ``g =
    tanh(c(x))`` (a residual sum); ``product``, ``g = sigmoid(c(x))`` (a gated unit, GLU-like); ``product of a sum``,
    ``g = sigmoid(c(x) + tanh(d(x)))``, whose gate set itself absorbed a residual sum first."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)
        if kind == "product of a sum":
            self.d = nn.Linear(3, 4)

    def forward(self, x):
        if self.kind == "sum":
            return self.out(torch.tanh(self.a(x) + torch.tanh(self.c(x))))
        if self.kind == "product":
            return self.out(torch.tanh(self.a(x) * torch.sigmoid(self.c(x))))
        return self.out(torch.tanh(self.a(x) * torch.sigmoid(self.c(x) + torch.tanh(self.d(x)))))


GATED_OR_RESIDUAL = {"sum": gradgraph.NodeKind.RESIDUAL, "product": gradgraph.NodeKind.FFN_HIDDEN,
                     "product of a sum": gradgraph.NodeKind.FFN_HIDDEN}


@pytest.mark.parametrize("kind", list(GATED_OR_RESIDUAL))
def test_a_gated_product_is_hidden_and_a_residual_sum_is_residual(kind):
    """The node kinds (what GradMetaNet reads of each neuron): the sets a residual sum lives in are residual-stream
    neurons; a product that gates a fresh affine output is a feed-forward unit, so both operands' sets (and, where the
    gate's set absorbed a sum before, that set and the sum's) are hidden neurons of it, marked ``gated``. Kills
    ``binary`` 419 (``gated`` set on sums instead of products: the kinds swapped), 420, 421 (the absorbing set not
    marked ``gated``: RESIDUAL), 422, 423 (the gate's sets not marked: an absorbed gate set RESIDUAL, and the union
    with it too)."""
    torch.manual_seed(0)
    graph, _ = convert_exactly(GatedOrResidual(kind).to(DTYPE), *batch(5, 3))
    widths = 12 if kind == "product of a sum" else 8  # a's, c's (and d's) four neurons after the three inputs
    assert graph.node_kind[3:3 + widths].tolist() == [int(GATED_OR_RESIDUAL[kind])] * widths
    assert graph.node_kind[:3].tolist() == [int(gradgraph.NodeKind.INPUT)] * 3
    assert graph.node_kind[3 + widths:].tolist() == [int(gradgraph.NodeKind.OUTPUT)] * 3


class PlusItselfReordered(nn.Module):
    """``h + h[:, [0, 2, 1, 3]]`` (or ``*``) of ``h = tanh(a(x))``: the reordering keeps neurons 0 and 3 in place, so
    each of them meets itself; tanh, ``Linear(4, 3)``, plus ``side(h)``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.out, self.side = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        reordered = h[:, [0, 2, 1, 3]]
        return self.out(torch.tanh(h + reordered if self.op == "+" else h * reordered)) + self.side(h)


@pytest.mark.parametrize("op", ["+", "*"])
def test_a_value_combined_with_itself_with_fixed_points_is_exact_and_pinned(op):
    """The operands share neurons (an overlap): one edge per pair into the merged set, so a neuron that meets itself
    feeds its merged neuron once, and no symmetry is claimed. Kills ``binary`` 375, 376 (the overlap not seen: two
    parallel edges from neurons 0 and 3, and ``edge_permutation`` refused the graph)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(PlusItselfReordered(op).to(DTYPE), *batch(5, 3))
    assert moved == 0


class ResidualIntoAPart(nn.Module):
    """``z = h[:, :2] + tanh(c(x))`` for the fresh affine output ``h = a(x)`` of four neurons, then
    ``out(tanh(cat([z, h[:, 2:]])))`` plus ``side(h)``: the residual meets only part of ``h``'s set."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.out, self.side = nn.Linear(3, 4), nn.Linear(3, 2), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        z = h[:, :2] + torch.tanh(self.c(x))
        return self.out(torch.tanh(torch.cat([z, h[:, 2:]], -1))) + self.side(h)


def test_a_residual_added_to_part_of_an_affine_output_keeps_the_group():
    """A part of a fresh affine output is no whole one: the sum gets a merged set of its own, and the layout keeps a
    symmetry (a sampled element moves 12 nodes and keeps the function). Kills ``absorbable`` 22 (``or`` for
    ``and``: the part, whose rows agree, absorbed the sum into ``h``'s set, and nothing was left to permute)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(ResidualIntoAPart().to(DTYPE), *batch(5, 3))
    assert moved > 0


class ResidualIntoTwoParts(nn.Module):
    """``z = cat([a(x)[:, :2], b(x)[:, 2:]]) + tanh(c(x))`` (a value of two fresh affine sets, as wide as each), then
    ``out(tanh(z))`` plus ``side(b(x))``, which reads ``b``'s whole output as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4)
        self.out, self.side = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        b = self.b(x)
        z = torch.cat([self.a(x)[:, :2], b[:, 2:]], -1) + torch.tanh(self.c(x))
        return self.out(torch.tanh(z)) + self.side(b)


def test_a_residual_added_to_parts_of_two_affine_outputs_leaves_their_labels():
    """A value of two sets is no fresh affine output of one: the sum gets a merged set of its own, which the tanh
    labels, and ``b``'s set stays IDENTITY — a sign flip of ``b``'s rows (and of ``side``'s columns) changes the
    model, since the residual is not flipped, so no odd activation may be claimed for it. Kills ``absorbable`` 1
    (``and`` for ``or``: the value of two sets absorbed the sum into ``a``'s, and ``b``'s neurons, holding ``b + r``
    under the tanh, were labelled TANH)."""
    torch.manual_seed(0)
    model = ResidualIntoTwoParts().to(DTYPE)
    inputs, targets = batch(5, 3)
    graph, _ = convert_exactly(model, inputs, targets)
    assert not torch.allclose(sign_flipped(model, "b", "side")(inputs), model(inputs), atol=1e-3)
    identity, tanh = int(gradgraph.ActivationKind.IDENTITY), int(gradgraph.ActivationKind.TANH)
    # the input's 3, a's 4, b's 4, c's 4 (tanh), the merged 4 (tanh), out's 3, side's 3
    assert graph.activation.tolist() == [identity] * 11 + [tanh] * 8 + [identity] * 6


# ------------------------------------------------------------------------ mut42 (issue 31): the survivors left
class StatisticsTimesACopy(nn.Module):
    """``stats(v) * v[:, None, :k]`` with ``stats(v) = stack([(v ** 2).sum(-1, keepdim=True), v.sum(-1,
    keepdim=True)], 1)``, ``[b, 2, 1]`` statistics first, then ``tanh(mid(.))`` summed over the new axis: the product
    copies each neuron of ``v[:, :k]`` over the new axis of two. ``v`` is the input itself (``k = 1``: only the
    input's neuron 0 is copied) or ``tanh(a(x))`` (``k = 4``)."""

    def __init__(self, of_input: bool) -> None:
        super().__init__()
        self.of_input = of_input
        self.width = 1 if of_input else 4
        if not of_input:
            self.a = nn.Linear(3, 4)
        self.mid, self.out = nn.Linear(self.width, 4), nn.Linear(4, 2)

    def forward(self, x):
        v = x if self.of_input else torch.tanh(self.a(x))
        stats = torch.stack([(v ** 2).sum(-1, keepdim=True), v.sum(-1, keepdim=True)], 1)
        return self.out(torch.tanh(self.mid(stats * v[:, None, :self.width])).sum(1))


@pytest.mark.parametrize("of_input", [True, False], ids=["input neuron 0", "a set's neurons"])
def test_a_copy_over_a_new_axis_beside_a_statistic_is_refused_at_the_op_that_makes_it(of_input):
    """One neuron at two places of one datapoint position is refused by name at the product that makes the copy,
    where the other operand (first) is a statistic, no neuron. Kills ``_one_value_per_neuron`` 13, 14 (``> 0``,
    ``>= 1``: the columns of node 0, the input's first feature, were dropped from the check; the copy passed and
    the gradient check refused ``mid.weight`` instead) and 11 (``ids[:+1]``: only the first operand's columns were
    checked, the statistic's, none; the copy passed the product and was refused only at ``mid``, in a Linear's
    words)."""
    torch.manual_seed(0)
    model = StatisticsTimesACopy(of_input).to(DTYPE)
    inputs, _ = batch(5, 3)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError,
                       match=r"^\S+:\d+ in \S+: Tensor\.mul: copies values of one position over a new axis "):
        gradgraph.to_graph(model, inputs, None, squared)


class ChunkProductSecondFirst(nn.Module):
    """``out(b * a)`` with ``a, b = w(x).chunk(2, -1)``: a product of the two halves of one affine output, no
    activation, the *second* half on the left."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.out = nn.Linear(3, 4), nn.Linear(2, 2)

    def forward(self, x):
        a, b = self.w(x).chunk(2, -1)
        return self.out(b * a)


def test_a_product_of_two_halves_second_half_first_keeps_its_group():
    """The halves are cut from each other (each permuted by the product's permutation): a sampled element moves
    nodes and keeps the function. Kills ``split_fused_gate`` 26 (``low_a <= high_b``: halves that touch, the second
    on the left, read as overlapping, so no cut, and nothing was left to permute; with an activation on a half,
    ``unary``'s own cut hides it, as in ``test_convert_rules_values.py``'s swapped SwiGLU)."""
    torch.manual_seed(0)
    _, moved = convert_exactly(ChunkProductSecondFirst().to(DTYPE), *batch(5, 3, classes=2))
    assert moved > 0


class GateOfOneNeuronPerToken(nn.Module):
    """``sigmoid(g(x)) * d`` over ``[b, 2, 3]`` tokens: the gate ``g(x)`` holds one neuron at both tokens, ``d =
    stack([h[:, 0, 0], h[:, 1, 1]], 1)[..., None]`` (``h = tanh(a(x))``) a different neuron of ``h`` at each; the
    product is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.g, self.a = nn.Linear(3, 1), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        d = torch.stack([h[:, 0, 0], h[:, 1, 1]], 1)[..., None]
        return (torch.sigmoid(self.g(x)) * d).flatten(1)


def test_a_gate_that_meets_two_neurons_gates_each_of_them_with_a_product_neuron_of_its_own():
    """The gate, first, meets two of ``d``'s neurons, so it gates ``d`` (the order tried second): one product
    neuron per neuron of ``d``, each fed by GATE edges from its neuron and the gate, and nothing moved. Kills
    ``block_gate`` 24 (``break``: the second order was not tried, and one pinned product neuron, fed by all three,
    held both tokens' values)."""
    torch.manual_seed(0)
    model = GateOfOneNeuronPerToken().to(DTYPE)
    inputs, _ = batch(5, 2, 3)
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, None, squared)
    # the input's 3, a's 3 (nodes 3-5), g's 1 (node 6), the two product neurons (7, 8: the output)
    assert graph.num_nodes == 9
    gate = graph.edge_kind == int(EdgeKind.GATE)
    pairs = sorted(zip(graph.edge_index[1, gate].tolist(), graph.edge_index[0, gate].tolist()))
    assert pairs == [(7, 3), (7, 6), (8, 4), (8, 6)]
    assert assert_group_keeps_function(model, inputs, None, squared)[0] == 0


BROADCAST_TABLE_OPS = {
    # a constant that keeps the table's values and gives it a new leading axis, [T, 4] -> [1, T, 4]
    # (a product with a tensor of ones, "times ones [1, T, 4]", is refused since session 22: a product with a constant
    # tensor counts as an op of slope other than one on position values, whatever its values)
    "minus zeros [1, T, 4]": lambda table: table - torch.zeros(1, *table.shape, dtype=table.dtype),
    "plus zeros [1, T, 4]": lambda table: torch.zeros(1, *table.shape, dtype=table.dtype) + table,
}


class BroadcastTable(nn.Module):
    """Token embeddings plus a position table that a constant broadcasts to ``[1, T, 4]`` before it joins the
    tokens, tanh, ``Linear(4, 3)``, a sum over the tokens."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = BROADCAST_TABLE_OPS[op]
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.tok(ids) + self.op(self.pos(torch.arange(ids.shape[1]))))).sum(1)


@pytest.mark.parametrize("op", sorted(BROADCAST_TABLE_OPS))
def test_a_position_table_broadcast_by_a_constant_keeps_its_rows_at_the_new_shape(op):
    """A value of no datapoint (no components) whose rows are not bound yet, broadcast to a new shape by a
    constant: it keeps no components and its rows at the result's shape, so they are bound where the table joins
    the tokens. Kills ``unary`` 42 (the missing components broadcast: an ``AttributeError``), 49, 51 (the rows
    dropped: the gradient check refused the table) and 53-56 (the rows broadcast from ``None`` or to no shape)."""
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    _, moved = convert_exactly(BroadcastTable(op).to(DTYPE), ids, targets)
    assert moved > 0


class ScaledThenPlusItsPartSwapped(nn.Module):
    """``h = tanh(w(x)) * [1, 2, 3, 4]`` (a scale per feature: ``h``'s set is pinned), then ``out(h[:, :2] + h[:, [1,
    0]])`` (the operands share neurons) plus ``side(h[:, 2:])``, which cuts ``h``'s set at 2."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.out, self.side = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.w(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=x.dtype)
        return self.out(h[:, :2] + h[:, [1, 0]]) + self.side(h[:, 2:])


def test_an_overlap_keeps_a_set_pinned_before_pinned_in_its_other_piece():
    """The overlap pins the operands' sets (``pinned = True``, never back to false): ``h``'s part the sum does not
    read, ``h[:, 2:]``, scaled by 3 and 4, stays fixed, and the group (nothing moved) keeps the function. Kills
    ``binary`` 386, 387 (``pinned = None`` / ``False``: the overlap unpinned ``h``'s set, so its piece ``h[:, 2:]``,
    tied to nothing, was permuted: a false symmetry, the scales 3 and 4 swapped)."""
    torch.manual_seed(0)
    _, moved = convert_exactly(ScaledThenPlusItsPartSwapped().to(DTYPE), *batch(5, 3, classes=2), seeds=range(4))
    assert moved == 0


class PlusAnotherReordered(nn.Module):
    """``out(z)`` with ``z = h + g[:, [2, 0, 3, 1]]``, ``h = tanh(a(x))``, ``g = tanh(c(x))`` (four neurons each):
    a sum of two sets paired in another order (no neuron in both operands)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def merged(self, x):
        return torch.tanh(self.a(x)) + torch.tanh(self.c(x))[:, [2, 0, 3, 1]]

    def forward(self, x):
        return self.out(self.merged(x))


def test_a_merged_set_numbers_its_neurons_in_the_left_operands_order():
    """The merged set holds one neuron per neuron of the left operand, in its order (``merged_set``: aligned with
    ``sources[0]``): node ``11 + i`` holds ``z[:, i]`` as act and ``dL/dz[:, i]`` as grad, per datapoint, written
    out against autograd. Kills ``binary`` 434 (``argsort(pairs[1])``: the merged neurons numbered in ``g``'s order,
    so node 11 held ``z[:, 1]``; the same graph up to the order of that set's nodes, and the group alike)."""
    torch.manual_seed(0)
    model = PlusAnotherReordered().to(DTYPE)
    inputs, _ = batch(5, 3)
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, None, squared)
    z = model.merged(inputs)
    z.retain_grad()
    squared(model.out(z), None).sum().backward()
    # the input's 3, h's 4 (nodes 3-6), g's 4 (7-10), the merged 4 (11-14), the output's 2
    assert graph.num_nodes == 17
    torch.testing.assert_close(graph.act[11:15], z.detach().T, atol=1e-12, rtol=0)
    torch.testing.assert_close(graph.grad[11:15], z.grad.T, atol=1e-12, rtol=0)


# ------------------------------------------------- a bound or exponent per neuron (mut42: a false symmetry, fixed)
PER_FEATURE = torch.tensor([0.3, -0.5, 0.1, -0.2], dtype=DTYPE)
POWERS = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=DTYPE)
UNARY_WITH_A_TENSOR = {
    "torch.clamp(h, min=c)": lambda h, c, p: torch.clamp(h, min=c),
    "torch.clamp(h, max=c)": lambda h, c, p: torch.clamp(h, max=c),
    "torch.clamp(h, c, c + 1)": lambda h, c, p: torch.clamp(h, c, c + 1),
    "h.clamp(min=c)": lambda h, c, p: h.clamp(min=c),
    "h.clamp_max(c)": lambda h, c, p: h.clamp_max(c),
    "torch.pow(h, p)": lambda h, c, p: torch.pow(h, p),
    "h.pow(p)": lambda h, c, p: h.pow(p),
    "h.float_power(p)": lambda h, c, p: h.float_power(p),
}


class UnaryWithATensor(nn.Module):
    """``out(tanh(op(a(x), c, p)))``: an op of the UNARY table given a tensor bound ``c`` or exponent ``p`` over the
    four features, one entry per feature (``per_feature``) or one value for all."""

    def __init__(self, op: str, per_feature: bool) -> None:
        super().__init__()
        self.op = UNARY_WITH_A_TENSOR[op]
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.c = PER_FEATURE.clone() if per_feature else torch.full((4,), 0.1, dtype=DTYPE)
        self.p = POWERS.clone() if per_feature else torch.full((4,), 2.0, dtype=DTYPE)

    def forward(self, x):
        return self.out(torch.tanh(self.op(self.a(x), self.c, self.p)))


@pytest.mark.parametrize("per_feature", [True, False], ids=["per feature", "alike"])
@pytest.mark.parametrize("op", sorted(UNARY_WITH_A_TENSOR))
def test_a_bound_or_exponent_that_differs_between_neurons_pins_their_set(op, per_feature):
    """A clamp's tensor bound or a power's tensor exponent that differs between the features treats each neuron its own
    way, as a constant added or multiplied does (``check_constant``): the set is pinned, and the group (nothing moved)
    keeps the function; one alike for every feature keeps the set's symmetry. Before the fix (mut42) the UNARY rule
    never looked at the tensor: the set was claimed one flat permutation group, and its sampled elements changed the
    model's output (a false symmetry; per-sample gradients were exact)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(UnaryWithATensor(op, per_feature).to(DTYPE), *batch(6, 3, classes=2), seeds=range(4))
    assert (moved == 0) if per_feature else (moved > 0)


class ClampedByNeurons(nn.Module):
    """``out(tanh(op(a(x), g)))`` with ``g = tanh(b(x))``: a bound that holds neurons of another set, ``op``
    ``h.clamp(min=g)`` or ``torch.clamp(h, max=g)``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h, g = self.a(x), torch.tanh(self.b(x))
        return self.out(torch.tanh(h.clamp(min=g) if self.op == "min" else torch.clamp(h, max=g)))


@pytest.mark.parametrize("op", ["min", "max"])
def test_a_bound_that_holds_neurons_pins_both_sets(op):
    """``clamp(h, min=g)`` pairs each neuron of ``h`` with one of ``g``, which no tie says: neither set is claimed
    permutable (nothing moved) and the group keeps the function. Before the fix (mut42) the UNARY rule read ``h``
    alone and both sets were claimed free groups: a sampled element changed the output (a false symmetry)."""
    torch.manual_seed(0)
    _, moved = convert_exactly(ClampedByNeurons(op).to(DTYPE), *batch(6, 3, classes=2), seeds=range(4))
    assert moved == 0


BOTH_BY_KEYWORD = {
    "torch.add(input=h, other=g)": lambda self, h, g: torch.add(input=h, other=g),
    "torch.mul(input=h, other=g)": lambda self, h, g: torch.mul(input=h, other=g),
    "torch.sub(input=h, other=g)": lambda self, h, g: torch.sub(input=h, other=g),
}


@pytest.mark.parametrize("op", BOTH_BY_KEYWORD)
def test_both_operands_given_by_keyword_are_read(op):
    """``torch.mul(input=h, other=g)``: the first operand by keyword too converts as ``torch.mul(h, g)`` does, exact
    with a group that keeps the function (``binary`` read ``args[0]``: an ``IndexError`` inside the trace, reported
    as the model's failure, before mut42)."""
    model = TwoSets(BOTH_BY_KEYWORD[op], parameter=False).to(DTYPE)
    _, moved = convert_exactly(model, *batch(5, 3))
    assert moved > 0


ONE_PLUS_WEIGHT_NUMBER_FIRST = {
    "torch.add(1.0, w)": lambda w: torch.add(1.0, w),
    "torch.add(input=1, other=w)": lambda w: torch.add(input=1, other=w),
}


@pytest.mark.parametrize("scale", ONE_PLUS_WEIGHT_NUMBER_FIRST)
def test_a_scale_written_torch_add_of_one_and_the_weight_stands_for_the_weight(scale):
    """``torch.add(1.0, w)``: torch 2.13 takes a number as ``torch.add``'s first operand and hands it to the mode
    first, the parameter second (no reflected op: ``1 + w`` arrives as ``Tensor.add(w, 1)``). The number is then on
    the left, and the op stands for ``w`` (exact, the parameter's gradient). Kills ``binary`` 54, 55 (session 22's
    numbering: the number looked for on the right whatever side the parameter is on; the mutants refuse it as
    arithmetic on parameters)."""
    graph, _ = convert_exactly(ScaledBy(ONE_PLUS_WEIGHT_NUMBER_FIRST[scale]).to(DTYPE), *batch(5, 3))
    assert graph.num_nodes == 3 + 4 + 4 + 3


def test_the_edges_of_a_sum_absorbed_into_an_affine_output_carry_no_weight():
    """``out(tanh(a(x) + c(tanh(b(x)))))``: the sum lives in ``a``'s fresh output, fed by one RESIDUAL edge from each
    neuron of ``c``'s output, and such an edge carries no weight: ``edge_param`` is ``-1`` on it (``graph.py``: "-1 if
    the edge has no weight"), a value a user reads. Kills ``binary`` 453 of run elementwise 26 (the absorbed sum's
    edges written with parameter ``-2``)."""

    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.a(x) + self.c(torch.tanh(self.b(x)))))

    graph, moved = convert_exactly(Summed().to(DTYPE), *batch(5, 3))
    residual = graph.edge_kind == int(EdgeKind.RESIDUAL)
    assert int(residual.sum()) == 4 and moved > 0
    assert graph.edge_param[residual].tolist() == [-1] * 4
    assert graph.edge_param_pos[residual].tolist() == [-1] * 4


def test_the_edges_of_a_sum_of_a_set_with_itself_reordered_carry_no_weight():
    """``h + h[:, [1, 0, 3, 2]]`` (the operands share neurons in other places): the sum is a new pinned set fed by
    one RESIDUAL edge per pair, and such an edge carries no weight, ``edge_param`` ``-1`` (``graph.py``), as every
    edge of the sum and of the head reads. Kills ``binary`` 519 of run elementwise 26 (the overlap's edges written
    with parameter ``-2``)."""
    graph, moved = convert_exactly(WithInput(lambda h, x: h + h[:, [1, 0, 3, 2]]).to(DTYPE), *batch(5, 3))
    residual = graph.edge_kind == int(EdgeKind.RESIDUAL)
    assert int(residual.sum()) == 8 and moved == 0
    assert graph.edge_param[residual].tolist() == [-1] * 8
    assert graph.edge_param_pos[residual].tolist() == [-1] * 8


class WeightlessEdges(nn.Module):
    """A model whose graph has structural edges of the kind ``form`` names, then ``Linear(4, 3)``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        if "activations" in form:
            self.b = nn.Linear(3, 4)
        if "blocks" in form:
            self.c = nn.Linear(3, 2)
        if "bias" in form:
            self.bias = nn.Parameter(0.3 * torch.randn(4))
        self.layer_norm = nn.LayerNorm(4, elementwise_affine=False)
        self.batch_norm = nn.BatchNorm1d(4, affine=False).eval()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.form == "a sum of two activations (merged_set)":
            y = h + torch.tanh(self.b(x))
        elif self.form == "a gate over blocks (block_gate)":
            y = h * torch.sigmoid(self.c(x))[:, [0, 0, 1, 1]]
        elif self.form == "a sum over blocks (combined_set)":
            y = h + torch.sigmoid(self.c(x))[:, [0, 0, 1, 1]]
        elif self.form == "a bias after an activation (with_parameter)":
            y = h + self.bias
        elif self.form == "a layer norm without weight (norm)":
            y = self.layer_norm(self.a(x))
        else:  # "a batch norm without weight (batch_norm)"
            y = self.batch_norm(self.a(x))
        return self.out(torch.tanh(y))


WEIGHTLESS = {
    "a sum of two activations (merged_set)": EdgeKind.RESIDUAL,
    "a gate over blocks (block_gate)": EdgeKind.GATE,
    "a sum over blocks (combined_set)": EdgeKind.GATE,
    "a bias after an activation (with_parameter)": EdgeKind.RESIDUAL,
    "a layer norm without weight (norm)": EdgeKind.NORM_SCALE,
    "a batch norm without weight (batch_norm)": EdgeKind.NORM_SCALE,
}


@pytest.mark.parametrize("form", WEIGHTLESS)
def test_every_structural_edge_carries_edge_param_minus_one(form):
    """``graph.py``: ``edge_param`` is "index into ``param_names`` of the edge's weight, -1 if the edge is structural
    (e.g. a residual connection)", a field a user reads. For a sum of two activations, a gate or a sum over blocks, a
    bias after an activation, a layer or batch norm without weight, every edge of the named kind carries no weight,
    ``-1``, and every other edge a valid parameter index. Kills ``merged_set`` 18, ``block_gate`` 71, 74,
    ``combined_set`` 54, ``with_parameter`` 188 (``rules_elementwise.py``), ``norm`` 241 and ``batch_norm`` 222
    (``rules_norm.py``), runs elementwise 28-29's numbers: the edges written with parameter ``-2``, listed equivalent
    by runs elementwise 1 and norm 1 ("every reader asks ``>= 0``")."""
    model = WeightlessEdges(form).to(DTYPE)
    graph, _ = convert_exactly(model, *batch(5, 3))
    structural = graph.edge_kind == int(WEIGHTLESS[form])
    assert int(structural.sum()) > 0
    assert set(graph.edge_param[structural].tolist()) == {-1}
    assert bool(((graph.edge_param == -1) | ((graph.edge_param >= 0) & (graph.edge_param < len(graph.param_names))))
                .all())
