"""``convert/blocks.py`` (``parallel_blocks`` and the automorphism check behind it) written out against the model
itself: which classes a grouped op's groups make blocks of (read from the graph), and that the inferred group keeps
the function exactly (float64, ``assert_group_keeps_function``). Written for the survivors of group
``convert-layout``'s runs of ``blocks.py`` (issue 31); each test names the mutants it kills, checked with
``MUTANT_UNDER_TEST`` in ``.mutation/convert-layout/mutants/``.
"""

from __future__ import annotations

import re

import pytest
import torch
from convert_values import squared
from torch import nn
from traced_models import assert_group_keeps_function

import gradgraph

DTYPE = torch.float64


class ResidualDepthwise(nn.Module):
    """``h + depthwise(h)``: the depthwise convolution reads and writes the same class (the sum ties its
    output channels to its input channels), so its groups relate no two distinct classes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(h + self.depthwise(h))).mean((2, 3))


def test_a_grouped_op_whose_classes_are_not_distinct_makes_no_blocks():
    torch.manual_seed(0)
    model = ResidualDepthwise().to(DTYPE)
    inputs = torch.randn(3, 3, 6, 6, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert int(graph.perm_block.max()) <= 0
    assert_group_keeps_function(model, inputs, None, squared)


class SecondGroupedOpTreatedApart(nn.Module):
    """``a`` (1x1), ``first`` (``groups`` groups), ``second`` (the same groups, so its group ``g`` reads exactly the
    first's group ``g``), then the second's outputs treated per group (``mode``: ``"scale"`` multiplies its first
    group by 2 and the rest by 3, ``"activation"`` puts a ReLU on the first group and a tanh on the rest; ``"none"``:
    nothing). A value holding some of the second op's groups drops its record (``Tracer.note_group_parts``), so the
    second op makes no blocks; its edges, one group each, still read the first op's groups. ``rolled``: the first
    op's channels rolled by one group before the second op (its group ``g`` reads the first's group ``g - 1``)."""

    def __init__(self, groups: int, mode: str, rolled: bool = False) -> None:
        super().__init__()
        channels = 2 * groups
        self.a = nn.Conv1d(2, channels, 1)
        self.first = nn.Conv1d(channels, channels, 3, groups=groups, padding=1)
        self.second = nn.Conv1d(channels, channels, 1, groups=groups)
        self.o = nn.Linear(channels, 2)
        self.mode, self.rolled = mode, rolled

    def forward(self, x):
        c = torch.tanh(self.first(torch.tanh(self.a(x))))
        d = self.second(c.roll(2, 1) if self.rolled else c)
        if self.mode == "scale":
            d = torch.cat([d[:, :2] * 2.0, d[:, 2:] * 3.0], 1)
        elif self.mode == "activation":
            d = torch.cat([torch.relu(d[:, :2]), torch.tanh(d[:, 2:])], 1)
        return self.o(torch.tanh(d).mean(-1))


def _first_groups_exchanged(model: SecondGroupedOpTreatedApart, groups: int) -> nn.Module:
    """A copy of ``model`` with the first op's groups 0 and 1 exchanged whole (``a``'s output channels, the first
    op's kernels and biases): the exchange the blocks would claim, the second op left as it is."""
    import copy

    swapped = copy.deepcopy(model)
    order = torch.arange(2 * groups)
    order[:2], order[2:4] = torch.tensor([2, 3]), torch.tensor([0, 1])
    with torch.no_grad():
        swapped.a.weight.copy_(model.a.weight[order])
        swapped.a.bias.copy_(model.a.bias[order])
        swapped.first.weight.copy_(model.first.weight[order])
        swapped.first.bias.copy_(model.first.bias[order])
    return swapped


@pytest.mark.parametrize("rolled", [False, True])
@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("mode", ["scale", "activation"])
def test_a_second_grouped_op_read_apart_is_refused_by_the_automorphism_check_alone(groups, mode, rolled):
    """The first op's groups pass every check before the automorphism check (their link is the only one: the
    second op's record was dropped; every set of the blocks is the first op's own or one set cut into all of
    them; nothing read them in part); only the graph shows that exchanging them would need the second op's
    groups exchanged too, which are not alike (an edge of the second op's group 0 maps onto no edge). Exchanged
    by hand, the first op's groups change the function, so the refusal is needed; the group inferred keeps it.
    Kills ``x__is_automorphism`` 2, 14, 15, 52 (the check weakened or skipped: the first op's groups claimed as
    blocks), checked with ``MUTANT_UNDER_TEST``."""
    torch.manual_seed(11)
    model = SecondGroupedOpTreatedApart(groups, mode, rolled).to(DTYPE)
    inputs = torch.randn(4, 2, 5, dtype=DTYPE)
    with torch.no_grad():
        before, after = model(inputs), _first_groups_exchanged(model, groups)(inputs)
    assert float((before - after).abs().max()) > 1e-3  # the exchange is no symmetry of this model
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert int(graph.perm_block.max()) <= 0
    for seed in range(4):
        assert_group_keeps_function(model, inputs, None, squared, seed=seed)


@pytest.mark.parametrize("rolled", [False, True])
@pytest.mark.parametrize("groups", [2, 3])
def test_two_grouped_ops_in_a_row_move_as_one_group_of_blocks(groups, rolled):
    """The same two grouped ops with nothing per group after them: one group of ``groups`` blocks (each the
    first op's input and output channels and the second's output channels), and the exchange keeps the function
    (the control of the test above: the blocks are refused there for the per-group code alone)."""
    torch.manual_seed(11)
    model = SecondGroupedOpTreatedApart(groups, "none", rolled).to(DTYPE)
    inputs = torch.randn(4, 2, 5, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert int(graph.perm_block.max()) + 1 == groups
    assert torch.unique(graph.perm_group[graph.perm_block > 0]).numel() == 1
    assert int(graph.perm_tie[graph.perm_block == 1].max()) == 2  # three classes a block
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(4)]
    assert max(moved) > 0


class TurnedDownFirst(nn.Module):
    """A first grouped op whose groups are turned down (``mode``), then a pointwise convolution and a depthwise one
    whose groups are claimed. ``"input"``: the first op (2 groups) reads the model's input channels, which no
    permutation moves (``free_ranks`` is ``None``); ``"read_in_part"``: the first op (depthwise) reads
    ``cat([h[:, :2] * 2, h[:, 2:] * 3])``, a set read in part by an op outside it."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Conv2d(4, 4, 1)
        self.first = nn.Conv2d(4, 4, 3, groups=2 if mode == "input" else 4, padding=1)
        self.pointwise, self.project = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)
        self.second = nn.Conv2d(4, 4, 3, groups=4, padding=1)

    def forward(self, x):
        if self.mode == "input":
            h = torch.relu(self.first(x))
        else:
            h = torch.relu(self.stem(x))
            h = torch.relu(self.first(torch.cat([h[:, :2] * 2.0, h[:, 2:] * 3.0], 1)))
        h = torch.relu(self.pointwise(h))
        return self.project(torch.relu(self.second(h))).mean((2, 3))


@pytest.mark.parametrize("mode", ["input", "read_in_part"])
def test_a_group_turned_down_does_not_stop_the_search_for_the_next(mode):
    """The first op's groups are turned down (by the first checks' ``free_ranks``, or by the check of sets read in
    part), the second's are claimed: one group of 4 blocks, on the second op's channels only, that keeps the
    function. Kills ``x_parallel_blocks`` 141 (``break`` for the first checks' ``continue``) and 153 (``break``
    for the read-in-part check's), checked with ``MUTANT_UNDER_TEST``."""
    torch.manual_seed(12)
    model = TurnedDownFirst(mode).to(DTYPE)
    inputs = torch.randn(3, 4, 5, 5, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    blocked = graph.perm_block > 0
    assert int(graph.perm_block.max()) == 3
    assert torch.unique(graph.perm_group[blocked]).numel() == 1
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(3)]
    assert max(moved) > 0


class EmptyLayerTwice(nn.Module):
    """MobileNet's block beside a zero-width ``Linear(2, 0)`` applied twice to its output (an empty edge group of a
    parameter at two sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.project = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.empty = nn.Linear(2, 0)

    def forward(self, x):
        y = self.project(torch.relu(self.depthwise(torch.relu(self.stem(x))))).mean((2, 3))
        return torch.cat([y, self.empty(torch.tanh(y)), self.empty(y)], 1)


def test_an_empty_layer_used_twice_does_not_stop_the_blocks():
    """A parameter's edge groups without sources make no call site (``len(src)``): the zero-width layer's two
    empty groups are skipped, and the depthwise convolution's 4 groups are claimed, keeping the function. Kills
    ``x_parallel_blocks`` 6 (``or`` for the first ``and``: the empty groups taken as sites, whose first target
    does not exist), checked with ``MUTANT_UNDER_TEST``."""
    torch.manual_seed(13)
    model = EmptyLayerTwice().to(DTYPE)
    inputs = torch.randn(3, 3, 6, 6, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert int(graph.perm_block.max()) == 3
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(2)]
    assert max(moved) > 0


def test_an_edge_from_no_neuron_is_refused_by_the_layout_with_its_kind_and_target():
    """``make_plan``'s last guard (layout.py, session 21): an edge group whose sources hold node ``-1`` (a rule that
    took a value holding no neuron, a statistic, for neurons; a message-passing layer would read it as the last
    node) is refused by name, with the edge's kind and target. No model reaches it (the rules refuse such values
    first), so the trace of a small MLP is given one such edge by hand. Kills ``x_make_plan`` 75, 78-94 (the test
    skipped, the bad edge's index, kind or target read wrong, the message changed), checked with
    ``MUTANT_UNDER_TEST``."""
    from gradgraph.convert.layout import make_plan
    from gradgraph.convert.trace.run import trace_model
    from gradgraph.errors import GradGraphError
    from gradgraph.graph import EdgeKind

    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    trace = trace_model(model, torch.randn(2, 3, dtype=DTYPE), model)
    assert make_plan(trace).structure["edge_index"].min() >= 0
    src, dst, _, _, _, extra = trace.edges[-1]
    bad_src = src.clone()
    bad_src[1] = -1
    trace.edges.append((bad_src, dst.clone(), EdgeKind.GATE, -1, None, extra))
    message = (f"gradgraph made an edge of kind GATE into node {int(dst[1])} from a value that holds no neuron (a "
               "statistic such as a sum over the features, used as if it held neurons); this model is not supported. "
               "Please report it with the model")
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        make_plan(trace)


class BetweenFlatGroups(nn.Module):
    """A stem, MobileNet's expansion and depthwise convolution, then a hidden 1x1 map and the projection: a flat
    group before the blocks and one after them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.expand = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.hidden, self.project = nn.Conv2d(4, 3, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.expand(torch.relu(self.stem(x))))
        return self.project(torch.relu(self.hidden(torch.relu(self.depthwise(h))))).mean((2, 3))


def test_the_groups_after_a_group_of_blocks_are_numbered_on():
    """The layout numbers the groups in node order, a group of blocks counting one: the stem's 6 nodes (its map and
    its ReLU) are group 0, the 48 nodes of the 4 blocks group 1, the hidden map's 6 nodes group 2, each flat one a
    block of its own; the input and the output stay. Kills ``x_make_plan`` 450 (``break`` at a class of the blocks
    past the first), 460-463 (the count after a group of blocks set to 1, lowered, raised by 2, or the loop ended:
    the hidden map's nodes in another group or in none), checked with ``MUTANT_UNDER_TEST``."""
    torch.manual_seed(15)
    model = BetweenFlatGroups().to(DTYPE)
    inputs = torch.randn(3, 3, 6, 6, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert graph.perm_group.tolist() == [-1] * 3 + [0] * 6 + [1] * 48 + [2] * 6 + [-1] * 4
    assert int(graph.perm_block[graph.perm_group == 1].max()) == 3
    assert graph.perm_block[graph.perm_group == 2].tolist() == [0] * 6
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(2)]
    assert max(moved) > 0
