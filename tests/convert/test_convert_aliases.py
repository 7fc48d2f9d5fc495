"""torch's aliases (``torch.multiply``, ``Tensor.clip``, ...) and NumPy's keyword names (``axis``,
``keepdims``) convert as the functions and keywords they alias.

Found trying ``transformers`` families as a new user would: ImageGPT's layer norm (``torch.mean(x,
axis=-1, keepdim=True)``) and I-BERT's (``x.mean(axis=2, keepdim=True)``) were refused as "a reduction over
datapoints" (the rule read ``dim``, found none, and took the reduction to be over every axis), and
ConvBERT's ``torch.multiply`` had "no rule". Each test fails on the code before (refused). ImageGPT and
I-BERT themselves are in ``test_convert_models.py``'s transformers suite (exact, and their inferred group checked).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

from traced_models import assert_exact_per_sample_grads

DTYPE = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class Aliased(nn.Module):
    """A layer norm, a gate and a pooling written with NumPy keywords and torch's aliases."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.gate, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):  # [b, T, 4]
        h = self.first(x)
        centred = torch.subtract(h, torch.mean(h, axis=-1, keepdims=True))
        h = torch.divide(centred, torch.sqrt(centred.square().mean(axis=-1, keepdim=True) + 1e-5))
        h = torch.multiply(h, torch.sigmoid(self.gate(x))).clip(-3.0, 3.0)
        h = torch.negative(torch.absolute(h)).multiply(0.5)
        return self.head(torch.tanh(h.sum(axis=1)))


def test_aliases_and_numpy_keywords_convert_exactly_and_replay_from_the_cache():
    torch.manual_seed(0)
    model = Aliased().to(DTYPE)
    x, y = torch.randn(5, 3, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    gradgraph.convert.clear_structure_cache()
    first = assert_exact_per_sample_grads(model, x, y, _cross_entropy)
    hits = PLAN_CACHE.hits
    again = gradgraph.to_graph(model, x, y, _cross_entropy)  # the replay reads the keywords as the trace did
    assert PLAN_CACHE.hits == hits + 1
    torch.testing.assert_close(again.act, first.act, atol=0, rtol=0)
    torch.testing.assert_close(again.grad, first.grad, atol=0, rtol=0)


def test_a_reduction_over_the_datapoints_by_axis_is_still_refused():
    """``axis=0`` is the datapoint axis: read as ``dim=0``, it is refused as one (not converted)."""
    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.first(x)
            return self.head(h - torch.mean(h, axis=0, keepdims=True))

    with pytest.raises(gradgraph.convert.UnsupportedOperationError, match="datapoints"):
        gradgraph.to_graph(BatchMean().to(DTYPE), torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)),
                           _cross_entropy)
