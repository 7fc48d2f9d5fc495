"""Per-function checks of ``convert/trace/rules_shape.py`` and ``convert/trace/tracer.py``'s dispatch for what
session 19 changed (issue 31, group ``convert-tracer``, runs tracer 6 on): a ``cat`` that repeats neurons
(``copy_repeated_parts`` / ``join_copies``), the version merge (``joined_versions``), a ``cat`` with a constant
that is a pad (``join_as_pad``) and a constant ``F.pad`` of the features, dispatched to ``rules_pad.py``.

Each test is float64 against torch.func (``tests/traced_models.py``'s helpers, at 1e-10) or checks a refusal's
message in full, and names in its docstring the mutants it kills (``f N``: mutant ``N`` of function ``f``,
checked with ``MUTANT_UNDER_TEST``). The first two reach, cheaply, the dispatch and ``shape_op`` lines that only
``test_convert_feature_pad.py`` (19 s) reached in the group (coverage.py per test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convert_values import exact

DTYPE = torch.float64


class PaddedFeatures(nn.Module):
    """``F.pad`` of a hidden layer's features with a constant, then a Linear: the pad rule of ``rules_pad.py``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(F.pad(torch.tanh(self.a(x)), (1, 2), value=0.5))


class JoinedWithZeros(nn.Module):
    """``cat([h, zeros])`` along the features: ``shape_op`` hands it to ``join_as_pad``, a constant pad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.cat([h, h.new_zeros(h.shape[0], 2)], 1))


def test_a_constant_pad_of_the_features_is_exact():
    torch.manual_seed(0)
    exact(PaddedFeatures().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


def test_a_cat_of_features_with_zeros_is_exact():
    torch.manual_seed(1)
    exact(JoinedWithZeros().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))
