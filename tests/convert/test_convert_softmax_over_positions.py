"""A softmax over an axis other than the features converts as its parts: attention pooling (a score per token,
a softmax over the tokens, the weighted sum of the tokens) is exact and its group true; over the datapoints it is
refused as a reduction over datapoints.

Before, ``scores.softmax(1)`` was refused ("a softmax across positions or part of the features") while the same
function written as ``exp(s) / exp(s).sum(1, keepdim=True)`` converted: the trace now runs the softmax as those
parts (``trace/decompositions.py``), with its maximum over the axis subtracted as a constant so ``exp`` stays
finite. The attention-pooling tests fail on the code before (refused). So do the forms with a learned query vector
(``h @ q``: the linear map with one output, its axis dropped, so the softmax over the tokens is over the last
axis; the trace decides by the neuron values, not the axis) and the weighted sum written as an einsum
(``"bt,btd->bd"``: the product of the aligned operands summed over the tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

DTYPE = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class AttentionPooling(nn.Module):
    """Tokens ``[b, T, 3]`` -> features -> one score per token -> softmax over the tokens -> weighted sum -> head
    (attention-based MIL pooling, Ilse et al. 2018, gated)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.features, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.value, self.gate, self.score = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = F.relu(self.features(x))
        scores = self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h)))  # [b, T, 1]
        if self.form == "Tensor.softmax":
            weights = scores.softmax(1)
        elif self.form == "F.softmax":
            weights = F.softmax(scores, dim=-2)
        elif self.form == "torch.softmax with dtype":
            weights = torch.softmax(scores, 1, dtype=DTYPE)
        else:  # log-softmax, exponentiated
            weights = F.log_softmax(scores, 1).exp()
        return self.head((weights * h).sum(1))


@pytest.mark.parametrize("form", ["Tensor.softmax", "F.softmax", "torch.softmax with dtype", "F.log_softmax"])
def test_attention_pooling_converts_exactly_with_a_true_group_and_replays(form):
    torch.manual_seed(0)
    model = AttentionPooling(form).to(DTYPE)
    x, y = torch.randn(5, 4, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    PLAN_CACHE.clear()
    first = assert_exact_per_sample_grads(model, x, y, _cross_entropy)
    moved, _, _ = assert_group_keeps_function(model, x, y, _cross_entropy)
    assert moved >= 10, moved  # the hidden features, the value/gate units permute
    hits = PLAN_CACHE.hits
    x2 = x * 3.0  # other values (another maximum per sequence): the cached plan replays, exact
    assert_exact_per_sample_grads(model, x2, y, _cross_entropy)
    assert PLAN_CACHE.hits > hits
    assert first.num_nodes == gradgraph.to_graph(model, x2, y, _cross_entropy).num_nodes


def test_large_scores_stay_finite():
    """Scores of 1e3 overflow a bare ``exp`` (float64 overflows past ~709); the subtracted maximum keeps it finite."""
    torch.manual_seed(1)
    model = AttentionPooling("Tensor.softmax").to(DTYPE)
    with torch.no_grad():
        model.score.bias.fill_(1e3)
    x, y = torch.randn(5, 4, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    assert_exact_per_sample_grads(model, x, y, _cross_entropy)


def test_a_softmax_over_the_datapoints_is_refused():
    class OverBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.features(x))  # [b, 4]
            return self.head(h.softmax(0) * h)

    with pytest.raises(gradgraph.convert.UnsupportedOperationError, match="datapoints"):
        gradgraph.to_graph(OverBatch().to(DTYPE), torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,)),
                           _cross_entropy)


class LearnedQueryPooling(nn.Module):
    """``softmax_t(h_t · q)``, a learned query vector ``q`` scoring each token, then the weighted sum of the tokens."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.features, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.query = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.tanh(self.features(x))  # [b, T, 8]
        if self.form == "h @ q":
            weights = (h @ self.query).softmax(-1)  # [b, T]
            return self.head((weights[..., None] * h).sum(1))
        if self.form == "torch.matmul, einsum sum":
            weights = torch.matmul(h, self.query).softmax(dim=1)
            return self.head(torch.einsum("bt,btd->bd", weights, h))
        weights = torch.einsum("btd,d->bt", h, self.query).softmax(-1)  # "einsum scores"
        return self.head(torch.einsum("bt,btd->bd", weights, h))


@pytest.mark.parametrize("form", ["h @ q", "torch.matmul, einsum sum", "einsum scores"])
def test_attention_pooling_with_a_learned_query_vector_converts_exactly_with_a_true_group(form):
    torch.manual_seed(2)
    model = LearnedQueryPooling(form).to(DTYPE)
    x, y = torch.randn(5, 4, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    graph = assert_exact_per_sample_grads(model, x, y, _cross_entropy)
    moved, _, _ = assert_group_keeps_function(model, x, y, _cross_entropy)
    assert moved >= 6, moved  # the 8 hidden features permute (with the query's entries)
    assert_exact_per_sample_grads(model, x * 2.0, y, _cross_entropy)  # the replay
    assert graph.per_sample_grads()["query"].shape == (5, 8)
