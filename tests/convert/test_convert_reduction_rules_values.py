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

import torch
from torch import nn

import gradgraph
from convert_values import exact, squared
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
