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

import pytest
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
