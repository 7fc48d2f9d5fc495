"""The rules of ``trace/rules_conv.py`` (taps, padding, channels, pixel shuffles, a flatten into a head,
group and instance norms), checked by value: what run convert 17 (docs/mutation.md, group ``convert-conv``)
found unchecked, and the corners of the file the group's other test files do not reach.

Every conversion is float64 against torch.func's per-sample gradients or a per-datapoint autograd loop
(1e-10); a refusal is matched in full after its location (``file:line in name``: under mutmut the innermost
frame outside torch and gradgraph is mutmut's trampoline, so the location is matched by its form only). Each
test names the mutants it kills (``mutmut show NAME`` in ``.mutation/convert-conv/``, ``f 12`` standing for
``gradgraph.convert.trace.rules_conv.f__mutmut_12`` or ``…rules_conv.xǁConvRulesǁf__mutmut_12``), each
checked with ``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_matches_autograd_loop

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


# ----------------------------------------------------------------------- group and instance norms
class PlainGroupNorm(nn.Module):
    """``Conv2d -> GroupNorm(affine=False) -> Conv2d -> mean over positions -> Linear``."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(groups, 4, affine=False), \
            nn.Conv2d(4, 3, 2)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))).mean((2, 3)))


def test_a_group_norm_without_its_affine_parameters_is_exact():
    """``channel_norm`` with ``weight=None``: the NORM_SCALE edges carry no parameter. Exact."""
    torch.manual_seed(0)
    exact(PlainGroupNorm().to(DTYPE), torch.randn(3, 2, 5, 5, dtype=DTYPE))


# ----------------------------------------------------------------------- a flatten into a head
class TwiceFlattened(nn.Module):
    """``cat([m, m], 1).flatten(1)`` read by a Linear: each channel at each position twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(2 * 3 * 16, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        return self.head(torch.cat([m, m], 1).flatten(1))


class UnboundPositions(nn.Module):
    """A position table over ``arange`` read by an affine map before it joins any token value."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.proj(self.positions(torch.arange(ids.shape[1]))))).sum(1)


class TokenMixing(nn.Module):
    """A Linear over the token axis of ``[b, 4, 2]`` values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.out = nn.Linear(3, 2), nn.Linear(4, 4), nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(self.mix(h.transpose(1, 2)).transpose(1, 2)).sum(1)


def test_spread_positions_leaves_other_layouts_to_the_affine_rule_and_refuses_a_position_twice():
    """``spread_positions``: values without components (a position table) and rows that differ (a Linear
    over tokens) are left to the affine rule, which refuses them in its words; a flattened map that holds
    one channel at one position twice is refused by ``spread_positions`` itself."""
    torch.manual_seed(14)
    refused(TwiceFlattened().to(DTYPE), torch.randn(5, 2, 4, 4, dtype=DTYPE),
            " (module 'head' of type Linear): torch.nn.functional.linear: an affine map over features that hold one "
            "neuron at one position twice")
    refused(UnboundPositions().to(DTYPE), torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(8)),
            " (module 'proj' of type Linear): torch.nn.functional.linear: an affine map of values that do not depend "
            "on the input")
    refused(TokenMixing().to(DTYPE), torch.randn(5, 4, 3, dtype=DTYPE),
            " (module 'mix' of type Linear): torch.nn.functional.linear: applied to an axis that holds positions or "
            "datapoints, not features (e.g. a Linear over tokens, as in MLP-Mixer); gradgraph needs affine maps over "
            "the last, feature axis")
