"""A sum, mean, maximum or minimum over an axis along which whole values were stacked
(``rules_elementwise.py``, ``merge_stacked``): JumpingKnowledge's ``torch.stack(xs, -1).max(-1)`` over layer
outputs, a mean of several layers' features. Elementwise in the stacked values, as ``torch.maximum(h1, h2)``:
exact, with a group that moves the stacked values' neurons together. Slices of one set (a per-head statistic,
maxout) keep their own rules.

Before the rule these were refused as "a reduction over part of the features" (checked on main at 31513c7), so
the exactness tests fail there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradgraph
from convert_values import exact, squared
from traced_models import assert_group_keeps_function

DTYPE = torch.float64

REDUCE = {
    "max-last": lambda hs: torch.stack(hs, -1).max(-1)[0],
    "amax-last": lambda hs: torch.stack(hs, -1).amax(-1),
    "sum-last": lambda hs: torch.stack(hs, -1).sum(-1),
    "mean-middle": lambda hs: torch.stack(hs, 1).mean(1),
    "min-keepdim": lambda hs: torch.stack(hs, -1).min(-1, keepdim=True)[0].squeeze(-1),
    "torch-max-first": lambda hs: torch.max(torch.stack(hs, 0), 0)[0],
}


class Stacked(nn.Module):
    """Three layers' outputs (widths 4) stacked and reduced, then a head."""

    def __init__(self, reduce: str) -> None:
        super().__init__()
        self.reduce = REDUCE[reduce]
        self.a, self.b, self.c, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h1 = torch.tanh(self.a(x))
        h2 = torch.relu(self.b(h1))
        h3 = self.c(h2)
        return self.out(torch.tanh(self.reduce([h1, h2, h3])))


def _inputs():
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)


@pytest.mark.parametrize("reduce", sorted(REDUCE))
def test_a_reduction_over_stacked_values_is_exact_and_moves_them_together(reduce):
    torch.manual_seed(0)
    model = Stacked(reduce).to(DTYPE)
    graph = exact(model, _inputs())
    moved, _, perm = assert_group_keeps_function(model, _inputs(), None, squared, seed=5)
    # the three layers' neurons (nodes 3-6, 7-10, 11-14) move, each by the same permutation (tied by the merge)
    shifts = [perm[first:first + 4] - first for first in (3, 7, 11)]
    assert bool((shifts[0] != torch.arange(4)).any()), "the stacked values lost their symmetry"
    assert torch.equal(shifts[0], shifts[1]) and torch.equal(shifts[1], shifts[2])
    merge = graph.edge_kind == int(gradgraph.EdgeKind.GATE if "max" in reduce or "min" in reduce
                                   else gradgraph.EdgeKind.RESIDUAL)
    assert int(merge.sum()) == 12  # one edge from each stacked neuron into its merged neuron


class SameTwice(nn.Module):
    """``stack([h, h], -1).max(-1)``: one value stacked with itself (the stacked axis holds one neuron: no merge,
    a new version of ``h``) or with another version of it (``stack([h, 2 * h])``: refused at the stack)."""

    def __init__(self, versions: bool) -> None:
        super().__init__()
        self.versions = versions
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(torch.stack([h, 2 * h if self.versions else h], -1).max(-1)[0])


def test_a_value_stacked_with_itself_is_a_new_version_and_with_another_version_refused():
    torch.manual_seed(0)
    graph = exact(SameTwice(False).to(DTYPE), _inputs())
    assert int((graph.edge_kind == int(gradgraph.EdgeKind.GATE)).sum()) == 0
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.convert.UnsupportedOperationError, match="joins two versions of the same neurons"):
        gradgraph.to_graph(SameTwice(True).to(DTYPE), _inputs(), None, squared)
