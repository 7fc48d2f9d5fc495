"""``convert/blocks.py`` (``parallel_blocks`` and the automorphism check behind it) written out against the model
itself: which classes a grouped op's groups make blocks of (read from the graph), and that the inferred group keeps
the function exactly (float64, ``assert_group_keeps_function``). Written for the survivors of group
``convert-layout``'s runs of ``blocks.py`` (issue 31); each test names the mutants it kills, checked with
``MUTANT_UNDER_TEST`` in ``.mutation/convert-layout/mutants/``.
"""

from __future__ import annotations

import torch
from torch import nn
from convert_values import squared
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
