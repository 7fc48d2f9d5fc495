"""A statistic of the features (a sum or norm over them, one value per token) pooled over the tokens is refused,
and no graph ever has an edge from a value that holds no neuron.

Found while adding softmax-over-positions (attention pooling): ``e = sigmoid((h * w).sum(-1, keepdim=True))``
then ``e.mean(1)`` made a pooled set whose MERGE edge came from node -1 (a statistic holds no neuron). The
per-sample gradients were exact, but ``edge_index`` held -1 — which a message-passing layer reads as the last
node — and the inferred group was no symmetry ("edge_permutation: the permutation maps an edge onto no edge").
The pooling rule now refuses it by name, and ``make_plan`` refuses any edge from a node below 0. The model tests
fail on the code before (converted, with the -1 edge).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert.layout import make_plan
from gradgraph.convert.trace import trace_model
from gradgraph.errors import GradGraphError

DTYPE = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class PooledStatistic(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.features, self.scale, self.head = nn.Linear(3, 4), nn.Parameter(torch.randn(4)), nn.Linear(4, 3)

    def forward(self, x):  # [b, T, 3]
        h = torch.tanh(self.features(x))
        statistic = torch.sigmoid((h * self.scale).sum(-1, keepdim=True))  # [b, T, 1]: no neuron
        if self.form == "times its mean over the tokens":
            gate = statistic * statistic.mean(1, keepdim=True)
        elif self.form == "over its sum over the tokens":
            gate = statistic / statistic.sum(1, keepdim=True)
        else:  # "softmax over the tokens, by hand"
            gate = torch.exp(statistic) / torch.exp(statistic).sum(1, keepdim=True)
        return self.head((gate * h).mean(1))


@pytest.mark.parametrize("form", ["times its mean over the tokens", "over its sum over the tokens",
                                  "softmax over the tokens, by hand"])
def test_a_statistic_pooled_over_the_tokens_is_refused_by_name(form):
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 3, dtype=DTYPE), torch.randint(0, 3, (3,))
    with pytest.raises(gradgraph.convert.UnsupportedOperationError,
                       match=r"pooling a statistic \(a sum or norm over the features\) over positions"):
        gradgraph.to_graph(PooledStatistic(form).to(DTYPE), x, y, _cross_entropy)


def test_make_plan_refuses_an_edge_from_no_neuron():
    """The guard behind every rule: a trace whose edge list holds a source of -1 is refused, not laid out."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    trace = trace_model(model, inputs, model)
    make_plan(trace)  # as traced: fine
    src, dst, kind, param, pos, rest = trace.edges[-1]
    broken = src.clone()
    broken[0] = -1
    trace.edges[-1] = (broken, dst, kind, param, pos, rest)
    with pytest.raises(GradGraphError, match=r"from a value that holds no neuron"):
        make_plan(trace)
