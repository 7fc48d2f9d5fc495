"""A cached plan is reused only where the model's constants allow the same layout and group.

The trace decides some things from the values of constants: a bias that differs between heads
(ALiBi's slopes) pins the heads, a per-neuron constant scale pins the neurons it multiplies,
embedding rows read at fixed indices are written into the layout. Two instances of one
architecture share a plan key and op fingerprints but not necessarily those values; the plan's
value guards make a replay trace afresh exactly where the decision would differ. Each test
converts models one after the other WITHOUT clearing the plan cache and compares with the graph
of a fresh trace.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from strategies import assert_same_graph
from torch import nn
from traced_models import token_loss

import gradgraph
import gradgraph.convert.traced as traced_module
from gradgraph import NodeKind
from gradgraph.convert.plan import PLAN_CACHE

DTYPE = torch.float64


@pytest.fixture
def traces(monkeypatch):
    """Counts the conversions that traced the forward (not replayed a cached plan)."""
    calls = []
    original = traced_module.trace_model

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(traced_module, "trace_model", counting)
    PLAN_CACHE.clear()
    yield calls
    PLAN_CACHE.clear()


def fresh_graph(model, *args, **kwargs):
    """The graph of a conversion that traces (the cache emptied first, and again after)."""
    PLAN_CACHE.clear()
    graph = gradgraph.to_graph(model, *args, **kwargs)
    PLAN_CACHE.clear()
    return graph


class HeadBias(nn.Module):
    """Self-attention plus a constant bias on the scores, per head (``slopes``) times distance."""

    def __init__(self, slopes: list[float], sdpa: bool, d: int = 8, length: int = 4) -> None:
        super().__init__()
        self.inp, self.qkv, self.out, self.head = nn.Linear(5, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.heads, self.sdpa = len(slopes), sdpa
        distance = -(torch.arange(length)[None, :] - torch.arange(length)[:, None]).abs().double()
        self.register_buffer("bias", torch.tensor(slopes, dtype=DTYPE).view(1, -1, 1, 1) * distance)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        else:
            y = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + self.bias).softmax(-1) @ v
        return self.head(h + self.out(y.transpose(1, 2).reshape(b, t, -1)))


def head_model(slopes, sdpa):
    torch.manual_seed(3)
    return HeadBias(slopes, sdpa).to(DTYPE)


def heads_free(graph) -> bool:
    queries = graph.node_kind == NodeKind.QUERY
    assert bool(queries.any())
    return bool((graph.perm_group[queries] >= 0).all())


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("order", ["shared first", "per head first"])
def test_a_replay_does_not_carry_head_pinning_to_another_buffer(traces, sdpa, order):
    inputs, targets = torch.randn(3, 4, 5, dtype=DTYPE), torch.randint(0, 2, (3, 4))
    shared, per_head = head_model([0.5, 0.5], sdpa), head_model([0.5, 0.25], sdpa)
    models = [shared, per_head] if order == "shared first" else [per_head, shared]
    expected = [fresh_graph(model, inputs, targets, token_loss) for model in models]
    assert heads_free(expected[models.index(shared)]) and not heads_free(expected[models.index(per_head)])
    traces.clear()
    graphs = [gradgraph.to_graph(model, inputs, targets, token_loss) for model in models]
    for graph, reference in zip(graphs, expected):
        assert_same_graph(graph, reference)
    assert len(traces) == 2  # the second model's bias changes the decision: traced again


def test_a_replay_is_kept_where_the_decision_is_the_same(traces):
    inputs, targets = torch.randn(3, 4, 5, dtype=DTYPE), torch.randint(0, 2, (3, 4))
    first, second = head_model([0.5, 0.25], False), head_model([0.125, 1.0], False)
    expected = fresh_graph(second, inputs, targets, token_loss)
    traces.clear()
    gradgraph.to_graph(first, inputs, targets, token_loss)
    graph = gradgraph.to_graph(second, inputs, targets, token_loss)
    assert len(traces) == 1  # other slopes, still distinct per head: the plan is replayed
    assert_same_graph(graph, expected)


class ScaledMLP(nn.Module):
    """A hidden layer multiplied by a constant buffer: uniform keeps the hidden neurons
    exchangeable, per-neuron values tell them apart."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)) * self.scale)


@pytest.mark.parametrize("order", [0, 1])
def test_a_replay_does_not_carry_neuron_pinning_to_another_scale(traces, order):
    torch.manual_seed(5)
    uniform = ScaledMLP(torch.full((4,), 2.0, dtype=DTYPE)).to(DTYPE)
    distinct = ScaledMLP(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)).to(DTYPE)
    distinct.load_state_dict(uniform.state_dict() | {"scale": distinct.scale})
    models = [uniform, distinct][::1 if order == 0 else -1]
    inputs, targets = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 2, (6,))
    def loss(output, target):
        return F.cross_entropy(output, target, reduction="none")

    expected = [fresh_graph(model, inputs, targets, loss) for model in models]
    hidden = expected[0].layer == 1
    moved = [bool((graph.perm_group[hidden] >= 0).all()) for graph in expected]
    assert moved[models.index(uniform)] and not moved[models.index(distinct)]
    traces.clear()
    for model, reference in zip(models, expected):
        assert_same_graph(gradgraph.to_graph(model, inputs, targets, loss), reference)
    assert len(traces) == 2


class FixedRows(nn.Module):
    """Position embeddings read at indices from a buffer, in a shape the indices cannot be read
    back in where they join the tokens: the layout keeps which row goes to which position."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.register_buffer("rows", torch.tensor(rows))

    def forward(self, ids):
        positions = self.positions(self.rows.view(-1, 1)).squeeze(1)  # [T, d], its lookup shaped otherwise
        return self.out(self.tokens(ids) + positions)


def test_a_replay_reads_fixed_embedding_rows_of_its_own_buffer(traces):
    torch.manual_seed(7)
    first = FixedRows([0, 1, 2]).to(DTYPE)
    second = FixedRows([4, 2, 0]).to(DTYPE)
    second.load_state_dict(first.state_dict() | {"rows": second.rows})
    ids, targets = torch.randint(0, 7, (4, 3)), torch.randint(0, 2, (4, 3))
    expected = fresh_graph(second, ids, targets, token_loss)
    traces.clear()
    gradgraph.to_graph(first, ids, targets, token_loss)
    graph = gradgraph.to_graph(second, ids, targets, token_loss)
    assert_same_graph(graph, expected)
    reference = {name: value for name, value in expected.per_sample_grads().items()}
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-12, rtol=0)
    assert len(traces) == 2
