"""The rules of ``trace/rules_affine.py`` (affine maps, ``matmul`` / ``addmm`` with a parameter, the
zero-state shortcut, embeddings and position parameters), checked by value: what run convert 11
(docs/mutation.md, group ``convert-affine``) found unchecked.

Every conversion is float64 against torch.func's per-sample gradients (1e-10); a refusal is matched
in full after its location (``file:line in name``: under mutmut the innermost frame outside torch and
gradgraph is mutmut's trampoline, so the location is matched by its form only). Each test names the
mutants it kills (``mutmut show NAME`` in ``.mutation/convert-affine/``, ``f 12`` standing for
``gradgraph.convert.trace.rules_affine.xǁAffineRulesǁf__mutmut_12``), each checked with
``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads

import gradgraph
from gradgraph.convert import UnsupportedOperationError

DTYPE = torch.float64


def squared(output, _targets):
    return output.pow(2).flatten(1).sum(1)


def exact(model, inputs, **options):
    gradgraph.convert.clear_structure_cache()
    return assert_exact_per_sample_grads(model, inputs, None, squared, **options)


def refused(model, inputs, message, **options):
    """``to_graph`` refuses with exactly ``message`` after the location."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + re.escape(message) + "$"):
        gradgraph.to_graph(model, inputs, None, squared, **options)


# ----------------------------------------------------------------------- the zero state
class ZeroState(nn.Module):
    """An Elman loop from ``h = torch.zeros(...)`` made in ``forward``: the first step's ``U · 0 + c``
    is the bias ``c`` alone. ``how`` writes the recurrent map as ``F.linear`` (with or without a
    bias), ``addmm`` (``c + h @ V``, ``V`` of shape ``[in, out]``) or ``h @ V`` (no bias)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.input_map, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        if how in ("linear", "linear no bias"):
            self.recurrent = nn.Linear(4, 4, bias=how == "linear")
        else:
            self.v = nn.Parameter(torch.randn(4, 4) / 2)
            if how == "addmm":
                self.c = nn.Parameter(torch.randn(4))

    def step(self, h):
        if self.how.startswith("linear"):
            return self.recurrent(h)
        if self.how == "addmm":
            return torch.addmm(self.c, h, self.v)
        return h @ self.v

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.step(h))
        return self.head(h)


@pytest.mark.parametrize("how", ["linear", "linear no bias", "addmm", "matmul"])
def test_an_affine_map_of_a_zero_state_is_its_bias(how):
    """``zero_state_affine``: the first step reads the bias alone (a view of it, added to the input
    map's neurons) and gives the recurrent weight no gradient there; the later steps are ordinary
    affine maps. Exact against torch.func, with and without a bias, ``F.linear`` and the transposed
    ``addmm`` / ``matmul``."""
    torch.manual_seed(1)
    model = ZeroState(how).to(DTYPE)
    exact(model, torch.randn(5, 3, 3, dtype=DTYPE))
