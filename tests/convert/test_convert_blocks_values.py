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


# ------------------------------------------------ the automorphism check and its entry numbering, by their contract
# In every model found, the checks before them decide first (docs/mutation.md, run layout 5's 20 not killed): these
# give the two functions small graphs by hand and compare their answers with the ones their docstrings define,
# worked out by hand. Edges ``(src, dst, kind, param, entry)``; every node has label 0 unless said otherwise.
def _automorphism(perm, edges, num_nodes, labels=None, node_params=None):
    """``_is_automorphism`` of ``perm`` over ``edges`` (``uses`` counted from the edges and node entries)."""
    from gradgraph.convert.blocks import _is_automorphism

    src, dst, kind, param, entry = (torch.tensor(column, dtype=torch.long) for column in (zip(*edges) if edges
                                                                                         else [[]] * 5))
    node_param, node_entry = (torch.tensor(column, dtype=torch.long) for column in
                              (node_params or ([-1] * num_nodes, [-1] * num_nodes)))
    used = torch.cat((entry[entry >= 0], node_entry[node_entry >= 0]))
    uses = torch.bincount(used, minlength=int(used.max()) + 1 if len(used) else 0)
    labels = labels or (torch.zeros(num_nodes, dtype=torch.long),)
    return _is_automorphism(torch.tensor(perm), labels, (torch.stack((src, dst)), kind, param, entry),
                            (node_param, node_entry), uses)


# inputs 0, 1; outputs 2, 3: each input feeds each output through an entry of its own of parameter 0
DENSE = [(0, 2, 0, 0, 0), (1, 2, 0, 0, 1), (0, 3, 0, 0, 2), (1, 3, 0, 0, 3)]


def test_the_automorphism_check_accepts_an_exchange_of_two_outputs_with_their_weights():
    """Exchanging outputs 2 and 3 maps every edge onto an edge of its kind and parameter and the entries 0, 1 onto
    2, 3 one to one, used by nothing that stays: an automorphism (the answer the mutants below must not change
    where it is right)."""
    assert _automorphism([0, 1, 3, 2], DENSE, 4)


def test_the_automorphism_check_refuses_nodes_of_different_labels_exchanged():
    """Nodes 0 and 1 of layers 0 and 1 exchanged, node 2 staying, no edges: not an automorphism (it does not keep
    every label). Kills ``_is_automorphism`` 10 (the label check's ``return False`` made ``True``) and 2
    (``moved`` read as the nodes that stay: node 2's label is its own)."""
    labels = (torch.tensor([0, 1, 1]),)
    assert not _automorphism([1, 0, 2], [], 3, labels)
    assert _automorphism([0, 2, 1], [], 3, labels)


def test_the_automorphism_check_refuses_an_edge_mapped_onto_an_edge_of_another_parameter():
    """Inputs 0 and 1 exchanged, each feeding output 2 through a parameter of its own (0 and 1): each edge maps onto
    an edge of its kind, not of its parameter: no automorphism. Kills ``_is_automorphism`` 55 (the parameter check
    failing only where a node's bias parameter differs too) and 66 (its ``return False`` made ``True``); the entries
    alone would pass (one to one, each used once)."""
    assert not _automorphism([1, 0, 2], [(0, 2, 0, 0, 0), (1, 2, 0, 1, 4)], 3)


def test_the_automorphism_check_refuses_an_edge_whose_image_sorts_after_every_edge():
    """Inputs 0 and 1 exchanged where only input 0 feeds output 2: the image ``1 -> 2`` is no edge, and its key
    sorts after every touched edge's. Kills ``_is_automorphism`` 43 (the search clamped to ``len(keys) + 1``: an
    ``IndexError`` instead of ``False``)."""
    assert not _automorphism([1, 0, 2], [(0, 2, 0, 0, 0)], 3)


def test_the_automorphism_check_refuses_entries_not_moved_one_to_one():
    """Outputs 2 and 3 exchanged where the edges into output 2 share entry 0 and those into output 3 have entries 1
    and 2 of their own: each edge maps onto an edge of its kind and parameter, but entry 0 would go to both 1 and 2
    (not one entry to one entry). Kills ``_is_automorphism`` 104 (that check's ``return False`` made ``True``) and
    77 (``if len(before)``: the entry checks skipped wherever there are entries)."""
    shared = [(0, 2, 0, 0, 0), (1, 2, 0, 0, 0), (0, 3, 0, 0, 1), (1, 3, 0, 0, 2)]
    assert not _automorphism([0, 1, 3, 2], shared, 4)


def test_the_automorphism_check_refuses_two_parallel_edges_mapped_onto_one():
    """Output 2 fed by input 0 through two parallel edges (entries 0 and 1), output 3 by one (entry 2); exchanging
    the outputs maps both parallel edges onto the one edge and that one onto the first of them: entries 0 and 1 go
    to 2 (forward one to one in ``forward``'s sense, one write per entry), but entry 2 comes back from two entries
    (``backward`` fails). Not an automorphism: the edge counts of nodes 2 and 3 differ. Kills ``_is_automorphism``
    93 (``and`` for ``or``: both directions must fail). (The trace writes no parallel edges of one kind today, which
    is why no model reaches this.)"""
    parallel = [(0, 2, 0, 0, 0), (0, 2, 0, 0, 1), (0, 3, 0, 0, 2)]
    assert not _automorphism([0, 1, 3, 2], parallel, 4)


def test_the_automorphism_check_refuses_an_entry_that_moves_while_an_edge_that_stays_uses_it():
    """Outputs 2 and 3 exchanged (entries 0 and 1 one to one), but entry 0 is also used by the edge ``4 -> 5``
    between two nodes that stay (a shared parameter): that edge is its own image, so its entry must stay. Not an
    automorphism. Kills ``_is_automorphism`` 106 (the use count compared for the entries that stay instead of
    those that move)."""
    shared_with_staying = [(0, 2, 0, 0, 0), (0, 3, 0, 0, 1), (4, 5, 0, 0, 0)]
    assert not _automorphism([0, 1, 3, 2, 4, 5], shared_with_staying, 6)
    assert _automorphism([0, 1, 3, 2, 4, 5], shared_with_staying[:2] + [(4, 5, 0, 0, 2)], 6)


def test_the_entry_numbering_numbers_every_entry_once_across_parameters_and_counts_its_uses():
    """``_entry_numbering`` for parameters of shapes ``[2, 2]`` and ``[3]`` (entries 0-3, then 4-6): edges of
    parameter 0 at positions 0 and 3, of parameter 1 at 1, one without (``-1``); node biases of parameter 0 at 2 and
    0, of parameter 1 at 0, one without. Kills ``_entry_numbering`` 27, 28 (parameter 0's edges numbered ``-1``),
    41, 42 (parameter 0's node entries ``-1``), 45 (parameter 0's node entries offset as parameter 1's) and 52, 53
    (entry 0 of a node left out of the use counts)."""
    from types import SimpleNamespace

    from gradgraph.convert.blocks import _entry_numbering

    trace = SimpleNamespace(param_shapes=[(2, 2), (3,)])
    edge_index = torch.tensor([[0, 1, 2, 3], [4, 4, 5, 5]])
    edges = (edge_index, torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, -1]), torch.tensor([0, 3, 1, 0]))
    nodes = (torch.tensor([-1, 0, 1, 0, -1, -1]), torch.tensor([0, 2, 0, 0, 0, 0]))
    (_, _, edge_param, edge_entry), (node_param, node_entry), uses = _entry_numbering(trace, edges, nodes)
    assert edge_entry.tolist() == [0, 3, 5, -1]
    assert node_entry.tolist() == [-1, 2, 4, 0, -1, -1]
    assert uses.tolist() == [2, 0, 1, 1, 1, 1, 0]
    assert edge_param.tolist() == [0, 0, 1, -1] and node_param.tolist() == [-1, 0, 1, 0, -1, -1]


# ------------------------------------------------ parallel_blocks' first checks and its class-size check, by contract
# Run layout 5's ``parallel_blocks`` 37, 129, 130, 170: in every model found an earlier check (or the automorphism
# check) decides first. These give ``parallel_blocks`` small traces by hand and compare its answer with the one its
# docstring defines. A trace here: ``sets[s]`` the nodes of set ``s`` (one piece each, numbered in order), ``classes``
# the sets of each class (its root the smallest), ``params[p]`` the call sites of parameter ``p``, each
# ``(sources, targets)`` joined densely (every source to every target, one entry of its own each); every parameter is
# recorded as a grouped op (its sites' output sets); every node has the same labels and no bias; no set was read in
# part; every set was made by op 0.
def _parallel_blocks(sets, classes, params):
    """``parallel_blocks`` over the hand-made trace above; the flat ranks of a class are each node's rank in its
    set (the sets of a class tied slot by slot)."""
    from types import SimpleNamespace

    from gradgraph.convert.blocks import parallel_blocks
    from gradgraph.graph import EdgeKind

    num_nodes = sum(len(nodes) for nodes in sets)
    set_of_node = torch.empty(num_nodes, dtype=torch.long)
    rank = torch.empty(num_nodes, dtype=torch.long)
    for index, nodes in enumerate(sets):
        set_of_node[nodes] = index
        rank[nodes] = torch.arange(len(nodes))
    root_of_piece = {member: min(members) for members in classes for member in members}
    neuron_sets = [SimpleNamespace(index=index, created_at=0, read_in_part=False) for index in range(len(sets))]
    trace = SimpleNamespace(edges=[], grouped=[], param_shapes=[], sets=neuron_sets,
                            set_of=lambda node: neuron_sets[int(set_of_node[node])])
    for param, sites in enumerate(params):
        entry = 0
        for sources, targets in sites:
            src, dst = dense(sources, targets)
            pos = torch.arange(entry, entry + len(src))
            entry += len(src)
            trace.edges.append((torch.tensor(src), torch.tensor(dst), EdgeKind.LINEAR, param, pos, None))
        trace.grouped.append([int(set_of_node[targets[0]]) for _, targets in sites])
        trace.param_shapes.append((entry,))
    columns = list(zip(*trace.edges))
    edge_index = torch.stack((torch.cat(columns[0]), torch.cat(columns[1])))
    edge_kind = torch.full((edge_index.shape[1],), int(EdgeKind.LINEAR), dtype=torch.long)
    edge_param = torch.cat([torch.full((len(src),), param) for src, _, _, param, _, _ in trace.edges])
    edge_pos = torch.cat(columns[4])

    def class_nodes(root):
        return torch.tensor([node for members in classes if min(members) == root for s in members for node in sets[s]])

    labels = tuple(torch.zeros(num_nodes, dtype=torch.long) for _ in range(3))
    no_bias = torch.full((num_nodes,), -1, dtype=torch.long)
    return parallel_blocks(trace, set_of_node, root_of_piece, lambda root: rank[class_nodes(root)], class_nodes,
                           lambda root: next(members for members in classes if min(members) == root), labels,
                           (edge_index, edge_kind, edge_param, edge_pos), (no_bias, no_bias))


def dense(sources, targets):
    """The edges of one weight ``[len(targets), len(sources)]``, row-major: ``(sources, targets)``."""
    return [s for _ in targets for s in sources], [t for t in targets for _ in sources]


@pytest.mark.parametrize("side", ["reads", "writes"])
def test_a_grouped_op_whose_site_reads_or_writes_two_classes_makes_no_blocks(side):
    """Sets (and classes) A = 0-1, B = 2-3, X = 4, C = 5-6, D = 7-8; a grouped op of two groups, A -> C and B -> D,
    each group also reading (``"reads"``) or writing (``"writes"``) X. A site must read the neurons of one class and
    write those of another (the docstring), so there are no blocks — though here the exchange of (A, C) with (B, D),
    X staying, is an automorphism of the graph (X -> C maps onto X -> D), so only that rule decides. Without X: one
    group of two blocks, (A, C) and (B, D). Kills ``x_parallel_blocks`` 37 (``and`` for ``or``: a site refused only
    where both its sources and its targets lie in several classes), checked with ``MUTANT_UNDER_TEST``."""
    sets = [[0, 1], [2, 3], [4], [5, 6], [7, 8]]
    classes = [[index] for index in range(5)]
    reads, writes = ([4], []) if side == "reads" else ([], [4])
    assert _parallel_blocks(sets, classes, [[([0, 1], [5, 6]), ([2, 3], [7, 8])]]) == {0: [[0, 3], [1, 4]]}
    assert _parallel_blocks(sets, classes, [[([0, 1] + reads, [5, 6] + writes),
                                             ([2, 3] + reads, [7, 8] + writes)]]) == {}


def test_a_second_grouped_op_joining_two_groups_of_the_first_makes_no_blocks():
    """Op 0 (parameter 0), four groups ``A_g -> S_g`` (sets 0-3 -> 4-7, one node each); op 1 (parameter 1), two groups
    ``S_0 -> T_0``, ``S_2 -> T_1`` (sets 8, 9), ``T_0`` in one class with ``S_1`` and ``T_1`` with ``S_3`` (a sum). Op 1
    chains op 0's groups 0 and 1 into one block, 2 and 3 into another: two blocks of alike roles, and exchanging them
    is an automorphism of the graph, but op 0 has four groups, one site per block only where there are four blocks
    (a grouped op's group ``g`` is block ``g``: the docstring). No blocks. Without op 1: op 0's four groups are four
    blocks. Kills ``x_parallel_blocks`` 129 (the links' lengths refused only where the roles differ too) and 130 (the
    lengths compared only where there are fewer than two blocks), checked with ``MUTANT_UNDER_TEST``."""
    sets = [[node] for node in range(10)]
    op_0 = [([group], [4 + group]) for group in range(4)]
    apart = [[index] for index in range(10)]
    assert _parallel_blocks(sets, apart, [op_0]) == {0: [[0, 4], [1, 5], [2, 6], [3, 7]]}
    classes = [[0], [1], [2], [3], [4], [5, 8], [6], [7, 9]]
    assert _parallel_blocks(sets, classes, [op_0, [([4], [8]), ([6], [9])]]) == {}


def test_blocks_of_different_sizes_do_not_stop_the_search_for_the_next_group():
    """Two grouped ops of two groups each, apart: ``A_0 -> C_0``, ``A_1 -> C_1`` (sets 0-3) and ``E_0 -> F_0``,
    ``E_1 -> F_1`` (sets 4-7), every set of two nodes but ``C_1`` of three: the first op's blocks are not alike (their
    classes' sizes differ), so it makes none; the second op's two blocks are claimed. With ``C_1`` of two nodes both
    are. Kills ``x_parallel_blocks`` 170 (``break`` for the class-size check's ``continue``: the second op's blocks
    lost), checked with ``MUTANT_UNDER_TEST``."""
    classes = [[index] for index in range(8)]

    def ops(sets):
        return [[(sets[0], sets[2]), (sets[1], sets[3])], [(sets[4], sets[6]), (sets[5], sets[7])]]

    even = [[2 * index, 2 * index + 1] for index in range(8)]
    assert _parallel_blocks(even, classes, ops(even)) == {0: [[0, 2], [1, 3]], 4: [[4, 6], [5, 7]]}
    uneven = [[0, 1], [2, 3], [4, 5], [6, 7, 8], [9, 10], [11, 12], [13, 14], [15, 16]]
    assert _parallel_blocks(uneven, classes, ops(uneven)) == {4: [[4, 6], [5, 7]]}


class AttentionThenHidden(nn.Module):
    """``o(tanh(out(attention(q, k, v) + q + k + v)))``, ``q, k, v`` maps of ``x [b, t, 4]``, two heads of two dims:
    the sums tie the query, key, value and merged-head neurons feature by feature, so their class (with the sums'
    neurons: seven sets, which no rule fixes) has one slot per feature holding one neuron of each set, as flat ranks
    need; ``out``'s neurons are a free hidden class."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))
        self.o = nn.Linear(4, 2)

    def forward(self, x):
        b, t, d = x.shape

        def split(z):
            return z.view(b, t, 2, d // 2).transpose(1, 2)

        q, k, v = self.q(x), self.k(x), self.v(x)
        y = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.o(torch.tanh(self.out(y.transpose(1, 2).reshape(b, t, d) + q + k + v)))


def test_the_layout_gives_parallel_blocks_no_flat_ranks_of_a_class_of_attention_nodes(monkeypatch):
    """``make_plan``'s ``free_ranks`` (the flat ranks of a class no rule fixes and no attention op splits into heads,
    else ``None``: its docstring), as ``parallel_blocks`` is handed it, asked of every class: ``None`` for the class
    of attention nodes, though no rule fixes it and its ties give every slot one node of each of its seven sets (its
    heads are laid out by ``_assign_heads``, not by flat ranks); flat ranks ``0 .. 3`` for ``out``'s class; ``None``
    for the input and output (fixed). No model found makes ``parallel_blocks`` ask it of an attention class
    (docs/mutation.md, ``make_plan`` 389), so the closure is caught on its way in and asked directly. Kills
    ``x_make_plan`` 389 (the attention test dropped: ranks ``0 .. 3`` in every set of the attention class), checked
    with ``MUTANT_UNDER_TEST``."""
    from gradgraph.convert import layout
    from gradgraph.convert.trace.run import trace_model
    from gradgraph.graph import NodeKind

    asked = {}
    parallel_blocks = layout.parallel_blocks

    def spy(trace, set_of_node, root_of_piece, free_ranks, class_nodes, *rest):
        for root in sorted(set(root_of_piece.values())):
            kinds = {NodeKind(int(kind)) for kind in rest[1][1][class_nodes(root)]}
            asked[frozenset(kinds)] = free_ranks(root)
        return parallel_blocks(trace, set_of_node, root_of_piece, free_ranks, class_nodes, *rest)

    monkeypatch.setattr(layout, "parallel_blocks", spy)
    torch.manual_seed(16)
    model = AttentionThenHidden().to(DTYPE)
    layout.make_plan(trace_model(model, torch.randn(3, 3, 4, dtype=DTYPE), model))
    heads = frozenset({NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION, NodeKind.RESIDUAL})
    assert set(asked) == {frozenset({NodeKind.INPUT}), heads, frozenset({NodeKind.FFN_HIDDEN}),
                          frozenset({NodeKind.OUTPUT})}
    assert asked[heads] is None
    assert asked[frozenset({NodeKind.FFN_HIDDEN})].tolist() == [0, 1, 2, 3]
    assert asked[frozenset({NodeKind.INPUT})] is None and asked[frozenset({NodeKind.OUTPUT})] is None
