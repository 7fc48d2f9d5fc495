"""``_edge_groups``, the block finder's first step: the edges of every (parameter, edge kind)
pair, ascending, as a slice where they are one run in edge order and as a mask where they are
interleaved with others — and ``per_sample_grads`` of a graph whose edge order interleaves a
weight's edges around another's.

Written for the survivors of graph run 9 (docs/mutation.md: ``_parameter_blocks`` /
``_edge_groups`` / ``_edge_block`` after the rewrite); each test's docstring names the mutants it
was checked against (run on each with ``MUTANT_UNDER_TEST=NAME`` in
``.mutation/graph/mutants/``: the test failed).
"""

from __future__ import annotations

import torch
from strategies import renumbered
from torch import nn

import gradgraph
from gradgraph.graph import _edge_groups

DTYPE = torch.float64


def test_edge_groups_are_ascending_runs_with_integer_parameter_and_kind():
    """Two runs written in descending key order come back ascending, each ``(param, kind, slice)``
    with Python ints. Checked against ``x__edge_groups__mutmut_54`` (sorted by the slice: edge
    order) and ``59`` (the kind ``run_key / kinds``, a float)."""
    edge_param = torch.tensor([3, 3, 1, 1, -1])
    edge_kind = torch.tensor([0, 0, 1, 1, 0])
    groups = _edge_groups(edge_param, edge_kind)
    assert groups == [(1, 1, slice(2, 4)), (3, 0, slice(0, 2))]
    assert all(type(param) is int and type(kind) is int for param, kind, _ in groups)


def test_a_pair_whose_edges_come_back_after_another_pair_is_selected_by_mask():
    """Edge order ``A, B, A``: ``A``'s edges are not one run, so both pairs are selected by masks.
    Checked against ``x__edge_groups__mutmut_28`` (each edge compared with the first one instead of
    its predecessor: ``A`` got the slice ``0:1`` and ``B`` the slice ``1:3``, which holds an edge
    of ``A``)."""
    groups = _edge_groups(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 0]))
    assert [(param, kind) for param, kind, _ in groups] == [(0, 0), (1, 0)]
    assert torch.equal(groups[0][2], torch.tensor([True, False, True]))
    assert torch.equal(groups[1][2], torch.tensor([False, True, False]))


def test_per_sample_grads_of_a_graph_whose_first_weight_is_split_around_the_second():
    """``Linear(2, 1) -> ReLU -> Linear(1, 1)`` with its three edges listed first weight, second
    weight, first weight: the per-sample gradients are those of the graph in converter order
    (itself tested against torch.func), bit for bit. Checked against ``x__edge_groups__mutmut_28``
    (the second weight's block then held an edge of the first: a wrong gradient or an error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).to(DTYPE)
    with torch.no_grad():
        model[0].bias.fill_(1.0)  # the ReLU active for every datapoint
    graph = gradgraph.to_graph(model, torch.randn(4, 2, dtype=DTYPE))
    assert graph.edge_param.tolist() == [0, 0, 2]  # 0.weight, 0.weight, 2.weight
    split = renumbered(graph, edge_order=torch.tensor([0, 2, 1]))
    assert split.edge_param.tolist() == [0, 2, 0]
    expected, ours = graph.per_sample_grads(), split.per_sample_grads()
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
