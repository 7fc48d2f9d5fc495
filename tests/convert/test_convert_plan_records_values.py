"""The plan's records where a value is not one whole block of one neuron set (mutation testing of
``convert/plan.py``: ``_record``, ``_own_nodes``, ``plan_records``; docs/mutation.md names the
mutants each test kills and the ones that are equivalent).

Every conversion is checked against torch.func's per-sample gradients in float64
(``assert_exact_per_sample_grads``) on a fresh trace and again on the cached plan's replay (the
records are what a replay reads), and where the records decide a node's ``act`` only (a set no
affine map reads), that ``act`` against the model's own values.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

DTYPE = torch.float64


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


def _twice(model, inputs, targets, loss_fn):
    """The per-sample gradients exact on a fresh trace and on the replay of its plan; the two graphs."""
    PLAN_CACHE.clear()
    first = assert_exact_per_sample_grads(model, inputs, targets, loss_fn)
    misses = PLAN_CACHE.misses
    second = assert_exact_per_sample_grads(model, inputs, targets, loss_fn)
    assert PLAN_CACHE.misses == misses, "the second conversion traced again instead of replaying the plan"
    return first, second


class ScalarOutput(nn.Module):
    """``l2(tanh(l1(x))).squeeze()``: on one datapoint with one output the output is 0-d."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).squeeze()


def test_a_zero_dimensional_output_of_one_datapoint_is_one_neuron_at_one_component():
    """A batch of one and a ``squeeze()`` make the output a 0-d tensor: its record is one
    element, the output neuron at the only component.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``_record`` 5 (the width read off the last axis
    of a 0-d tensor: an ``IndexError``)."""
    torch.manual_seed(0)
    model = ScalarOutput().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(1, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(1, dtype=DTYPE, generator=generator)

    def loss(output, target):
        return (output - target.squeeze()).pow(2).reshape(1)

    for graph in _twice(model, inputs, targets, loss):
        torch.testing.assert_close(graph.act[-1], model(inputs).detach().reshape(1), atol=1e-12, rtol=0)


class PermutedRead(nn.Module):
    """``l2`` reads ``tanh(l1(x))`` with its features in another order."""

    ORDER = [2, 0, 1, 5, 3, 4]

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))[:, self.ORDER])


def test_a_layer_reading_its_inputs_permuted_gets_each_neurons_own_act():
    """A value whose neurons are every neuron of a set, but not in order, is no block: each
    element is written to its own neuron's row.

    Checked to fail on ``_record`` 24 (a block taken whenever the first neuron id is >= 0:
    the permuted value copied onto consecutive rows)."""
    torch.manual_seed(0)
    model = PermutedRead().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    graphs = _twice(model, inputs, targets, squared_error)
    with torch.no_grad():
        hidden = torch.tanh(model.l1(inputs))
    for graph in graphs:  # the hidden neurons' rows hold their own values, in neuron order
        torch.testing.assert_close(graph.act[4:10], hidden.T, atol=1e-12, rtol=0)


class OutputOfThree(nn.Module):
    """``cat([a, tanh(b), l3(b)])``: ``b`` is made first and ``l3`` reads it before its tanh;
    ``a`` is read by no layer, so its act is this output value, which holds a later version of
    ``b``'s neurons too."""

    def __init__(self):
        super().__init__()
        self.lb, self.la, self.l3 = nn.Linear(4, 2), nn.Linear(4, 3), nn.Linear(2, 2)

    def forward(self, x):
        b = self.lb(x)
        a = self.la(x)
        return torch.cat([a, torch.tanh(b), self.l3(b)], -1)


def test_an_output_holding_several_sets_writes_each_sets_own_neurons_only():
    """The output ``cat([a, tanh(b), l3(b)])``: ``a``'s act is its part of the output, while
    ``b``'s act stays ``b`` (what ``l3`` reads), not ``tanh(b)``.

    Checked to fail on ``_own_nodes`` 4 (the output value written to every neuron it holds:
    ``b``'s act overwritten by ``tanh(b)``, ``l3.weight``'s gradient wrong)."""
    torch.manual_seed(0)
    model = OutputOfThree().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 7, dtype=DTYPE, generator=generator)
    for graph in _twice(model, inputs, targets, squared_error):
        output = model(inputs).detach()
        # nodes: the input 0-3, b 4-5, a 6-8, l3's output 9-10
        torch.testing.assert_close(graph.act[4:6].T, model.lb(inputs).detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(graph.act[6:9].T, output[:, :3], atol=1e-12, rtol=0)
        torch.testing.assert_close(graph.act[9:11].T, output[:, 5:], atol=1e-12, rtol=0)


class PartOfTheOutput(nn.Module):
    """``tanh(l2(tanh(l1(x)))[:, :2])``: the model's output is part of ``l2``'s neurons, at a version only that part
    holds (``l2``'s whole output is an older version: since session 19 a set's act is its newest version's fullest
    value, so without the tanh all four would take ``l2``'s output)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(x)))[:, :2])


def test_a_set_whose_part_is_the_output_takes_that_part_as_its_act():
    """The output neurons that are part of the model's output have that output as their act
    (the other two, which lead nowhere, keep zero acts).

    Checked to fail on ``plan_records`` 17 (the newest value taken only for sets that do *not*
    reach the output: the output neurons' act all zero) and ``assembly._tiles`` 11 (the act
    blocks, which stop before the output's partial record, taken as tiling every row)."""
    torch.manual_seed(0)
    model = PartOfTheOutput().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 2, dtype=DTYPE, generator=generator)
    for graph in _twice(model, inputs, targets, squared_error):
        torch.testing.assert_close(graph.act[-4:-2].T, model(inputs).detach(), atol=1e-12, rtol=0)
        assert torch.equal(graph.act[-2:], torch.zeros_like(graph.act[-2:]))


class FrozenFirstLayer(nn.Module):
    """``l2(tanh(l1(x)))`` with ``l1`` frozen: ``l1``'s output does not require grad."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.l1.requires_grad_(False)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_a_frozen_first_layer_still_gets_its_per_sample_gradients():
    """The backpropagated signal of a frozen layer's outputs is read from the probe, not from
    the output itself (which does not require grad); every parameter's per-sample gradient,
    the frozen ones too, is exact.

    Checked to fail on ``plan_records`` 83 (a grad record kept for a tensor that does not
    require grad)."""
    torch.manual_seed(0)
    model = FrozenFirstLayer().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    _, second = _twice(model, inputs, targets, squared_error)
    assert float(second.per_sample_grads()["l1.weight"].abs().sum()) > 0  # the frozen layer's, not zeros
    assert not model.l1.weight.requires_grad  # and it stays frozen


class MovedPositions(nn.Module):
    """Token embeddings plus position embeddings ``pos(arange(T))`` read in another order than
    their indices (``pos(arange(T))[order]``): the rows are constants of the architecture, not
    re-read from the indices; ``pos`` has a padding row, which gets no gradient."""

    def __init__(self, order, padding_idx):
        super().__init__()
        self.tokens, self.out = nn.Embedding(7, 4), nn.Linear(4, 3)
        self.positions = nn.Embedding(len(order), 4, padding_idx=padding_idx)
        self.order = order

    def forward(self, ids):
        positions = self.positions(torch.arange(ids.shape[1]))[self.order]
        return self.out(torch.tanh(self.tokens(ids) + positions).mean(1))


@pytest.mark.parametrize("padding_idx", [1, -2, None])
def test_position_rows_moved_before_they_join_the_tokens_leave_the_padding_row_without_gradient(padding_idx):
    """Position embeddings read in reversed order: each position's one-hot is its own row, and
    the padding row (``padding_idx`` 1, or -2: the same row counted from the end) none — its
    per-sample gradient is zero, as torch.func's.

    Checked to fail on ``plan_records`` 50 (the padding row's one-hot kept), 52 (every row
    kept), 53 (only the padding row kept), 76-78 (the keep mask reshaped to ``None``, 1 or -2:
    it is not all true here, the padding row's elements out)."""
    torch.manual_seed(0)
    model = MovedPositions([4, 3, 2, 1, 0], padding_idx).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (3, 5), generator=generator)
    targets = torch.randn(3, 3, dtype=DTYPE, generator=generator)
    for graph in _twice(model, ids, targets, squared_error):
        padding = None if padding_idx is None else padding_idx % 5
        per_sample = graph.per_sample_grads()["positions.weight"]
        if padding is not None:
            assert torch.equal(per_sample[:, padding], torch.zeros_like(per_sample[:, padding]))
        assert bool((per_sample.abs().sum(-1) > 0).sum(-1).eq(5 - (padding is not None)).all())



class FrozenTokens(nn.Module):
    """Token ids ``[b, T]`` → a frozen ``Embedding`` (a pretrained table kept fixed) → tanh →
    mean over tokens → ``out``: the embedding's output requires no grad."""

    def __init__(self, positions: bool = False):
        super().__init__()
        self.tokens, self.out = nn.Embedding(7, 4), nn.Linear(4, 3)
        self.positions = nn.Embedding(5, 4) if positions else None
        self.tokens.requires_grad_(False)
        if positions:
            self.positions.requires_grad_(False)

    def forward(self, ids):
        h = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(torch.arange(ids.shape[1]))
        return self.out(torch.tanh(h).mean(1))


@pytest.mark.parametrize("positions", [False, True], ids=["tokens", "tokens-and-positions"])
def test_a_frozen_embedding_of_token_ids_gets_the_backpropagated_signal_and_stays_frozen(positions):
    """The embedding's neurons carry ``dL/dh`` though nothing upstream requires grad, so every
    per-sample gradient (the frozen tables' too, as torch.func gives them) is exact, and the
    tables are frozen again afterwards.

    **A bug found** (mutation testing of ``plan.py``): the gradient records of values that did
    not require grad were dropped, so with integer ids a frozen embedding's neurons got
    ``grad`` 0 and the table's per-sample gradients were silently zero (a frozen ``Linear`` of
    a float input was right: the input requires grad). Fixed in ``traced._forward_pass``, which
    runs the forward with every floating parameter requiring grad; this test failed before
    the fix (``AssertionError: tokens.weight``)."""
    torch.manual_seed(0)
    model = FrozenTokens(positions).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (3, 5), generator=generator)
    targets = torch.randn(3, 3, dtype=DTYPE, generator=generator)
    for graph in _twice(model, ids, targets, squared_error):
        assert graph.grad.abs().sum() > 0
    assert not model.tokens.weight.requires_grad and model.out.weight.requires_grad
    assert not positions or not model.positions.weight.requires_grad


class NoGradBlock(nn.Module):
    """``l2(tanh(l1(x)))`` with ``l1`` run under ``torch.no_grad()`` inside the forward."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.l1(x)
        return self.l2(torch.tanh(h))


def test_a_block_run_under_no_grad_inside_the_forward_is_a_cut_as_autograd_sees_it():
    """Values made under ``no_grad`` require no grad: autograd (and torch.func) give ``l1``
    no gradient, and the graph agrees — ``l1``'s per-sample gradients and its neurons' ``grad``
    are zero, ``l2``'s exact.

    Checked to fail on ``plan_records`` 83 (a gradient record kept for a value that requires
    no grad: autograd refuses to differentiate with respect to it)."""
    torch.manual_seed(0)
    model = NoGradBlock().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    for graph in _twice(model, inputs, targets, squared_error):
        # nodes: the input 0-3, l1's output 4-9
        assert torch.equal(graph.grad[4:10], torch.zeros_like(graph.grad[4:10]))
        assert graph.grad[10:].abs().sum() > 0


class DeadBranchLast(nn.Module):
    """``l2(tanh(l1(x)))``, and last a layer whose output is only cut, activated and dropped:
    ``tanh(l3(h)[:, :1])``. ``l3``'s neurons lead nowhere and their newest version holds only part of them: no act."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        out = self.l2(h)
        torch.tanh(self.l3(h)[:, :1])
        return out


def test_act_blocks_that_stop_short_of_the_last_rows_leave_them_zero():
    """The act records are blocks in row order that end before the last set (``l3``'s, with no
    act): the factor is still ``[N, B]`` with those rows zero, the rest the layers' inputs and
    the output; per-sample gradients exact (``l3``'s zero).

    Checked to fail on ``assembly._tiles`` 11 (``row != num_nodes``: such records taken as
    tiling all rows, a ``[13, B]`` act) and ``assembly._factor`` 18-20, 23, 24 (the zero rows of
    ``l3``'s grad, which no gradient reaches, dropped or of the wrong shape in the tiling path)."""
    torch.manual_seed(0)
    model = DeadBranchLast().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    for graph in _twice(model, inputs, targets, squared_error):
        assert graph.act.shape == (15, 5)
        torch.testing.assert_close(graph.act[:4].T, inputs, atol=0, rtol=0)
        torch.testing.assert_close(graph.act[4:10].T, torch.tanh(model.l1(inputs)).detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(graph.act[10:13].T, model(inputs).detach(), atol=1e-12, rtol=0)
        assert torch.equal(graph.act[13:], torch.zeros_like(graph.act[13:]))


class ZeroWidth(nn.Module):
    """A layer of no outputs concatenated into a set (``nn.Linear(4, 0)``)."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.head = nn.Linear(4, 0), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.l0(x), self.l1(x)], -1)))


def test_a_zero_width_layer_converts_with_empty_gradients():
    """Its parameters have no entries, so no edges: ``per_sample_grads()`` / ``mean_grad()`` give
    them as empty tensors of their shapes. Checked to fail before: the first conversion's check
    raised a bare ``KeyError: 'l0.weight'`` (the graph's gradients had no entry for them)."""
    import warnings

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on initialising a zero-element tensor
        model = ZeroWidth().to(torch.float64)
    inputs, targets = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    graph = assert_exact_per_sample_grads(model, inputs, targets,
                                          lambda out, y: F.cross_entropy(out, y, reduction="none"))
    assert graph.mean_grad()["l0.weight"].shape == (0, 4)
    assert graph.per_sample_grads()["l0.bias"].shape == (3, 0)


class ReadsZeroWidth(nn.Module):
    """``nn.Linear(4, 0)`` read by ``nn.Linear(0, 2)`` (the second layer's output is its bias alone)."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(4, 0), nn.Linear(0, 2)

    def forward(self, x):
        return self.l1(self.l0(x))


def test_an_affine_map_of_a_value_with_no_features_is_refused_by_name():
    """A zero-width layer whose output a ``Linear`` reads: the trace failed inside (``rows_along_last``: "cannot
    reshape tensor of 0 elements into shape [-1, 0]"), reported as the user's model failing (found in session
    22). Refused at the map, naming the module and the shape; a zero-width part of a concatenation still
    converts (the test above)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on initialising a zero-element tensor
        model = ReadsZeroWidth().to(torch.float64)
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, torch.randn(3, 4, dtype=torch.float64), None, lambda out, _: out.pow(2).sum(1))
    assert re.fullmatch(r"\S+\.py:\d+ in ReadsZeroWidth\.forward \(module 'l1' of type Linear\): "
                        + re.escape("torch.nn.functional.linear: an affine map of a value with no features (shape "
                                    "[3, 0], a layer of width 0 before it): it has no neurons to read. Remove the "
                                    "layer of width 0, or give it a width of at least 1"), str(refusal.value))
