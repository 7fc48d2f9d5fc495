"""``per_sample_grad_norms`` on the layouts its fast paths split on, and a saved graph, where the
mutation campaign on ``graph.py``'s newer code (run graph 7, docs/mutation.md) found them
untested: a bias used twice (the shared-entries path reads a bias block as ``grad`` alone),
exactly two components per datapoint (next to the one-component shortcut), the Batch guard's
message, and ``torch.save`` / ``torch.load(weights_only=True)`` with and without the block cache.
Ground truth: torch.func per-sample gradients, in float64.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch
from traced_models import assert_per_sample_grad_norms

import gradgraph
from gradgraph import GradGraphError

DTYPE = torch.float64


class SharedLayer(nn.Module):
    """One ``Linear(3, 3)`` applied twice: its weight *and its bias* are used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x))).sum(1)


def test_a_bias_used_twice():
    """The parameter's uses share entries, so its per-datapoint gradient is summed first; the
    bias blocks are ``grad`` alone. Checked to fail with the bias read as ``act * grad``
    (``xǁGradGraphǁper_sample_grad_norms__mutmut_74``, ``77``, ``78``)."""
    torch.manual_seed(0)
    model = SharedLayer().to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    assert_per_sample_grad_norms(gradgraph.to_graph(model, inputs), model, inputs, None, None)


class PerToken(nn.Module):
    """``[b, 2, 3] -> [b, 2, 1]``, a loss per token: two components per datapoint."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.l1(x)))


def per_token_loss(output, target):
    return (output - target).pow(2).sum((1, 2))


def test_exactly_two_components_per_datapoint():
    """Checked to fail with the one-component shortcut taken for two
    (``xǁGradGraphǁ_block_squared_norms__mutmut_36``: ``tokens == 2``)."""
    torch.manual_seed(1)
    model = PerToken().to(DTYPE)
    inputs, targets = torch.randn(5, 2, 3, dtype=DTYPE), torch.randn(5, 2, 1, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, per_token_loss)
    assert graph.num_components == 2 * 5
    assert_per_sample_grad_norms(graph, model, inputs, targets, per_token_loss)


def test_on_a_batch_the_message_names_the_method():
    """Checked to fail with the method's name dropped or changed in the guard
    (``xǁGradGraphǁper_sample_grad_norms__mutmut_2``-``4``)."""
    graph = gradgraph.to_graph(SharedLayer().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))
    batch = Batch.from_data_list([graph, graph])
    message = "GradGraph.per_sample_grad_norms() needs one graph, got a Batch of 2; call batch.to_data_list() first"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        batch.per_sample_grad_norms()


def saved_and_loaded(graph):
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), buffer.getvalue()


def test_a_graph_saves_without_its_block_cache_and_loads_with_weights_only():
    """Before and after ``mean_grad()`` (which caches the parameter blocks: slices and
    tensors) the graph saves to the same bytes, loads with ``weights_only=True`` and gives the
    same gradients. Checked to fail with the cache kept, a key other than the cache's popped,
    or the pop made strict (``xǁGradGraphǁ__getstate____mutmut_1``-``7``)."""
    torch.manual_seed(2)
    model = PerToken().to(DTYPE)
    inputs, targets = torch.randn(4, 2, 3, dtype=DTYPE), torch.randn(4, 2, 1, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, per_token_loss)
    graph.__dict__.pop("_blocks_cache", None)  # a graph that never computed its blocks
    fresh, fresh_bytes = saved_and_loaded(graph)
    expected = graph.mean_grad()
    assert "_blocks_cache" in graph.__dict__
    cached, cached_bytes = saved_and_loaded(graph)
    assert cached_bytes == fresh_bytes
    for loaded in (fresh, cached):
        assert "_blocks_cache" not in loaded.__dict__
        got = loaded.mean_grad()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
