"""GraphContext: every context built by hand gets its own structure cache, and a structural
``_replace`` starts a new one, so no layer ever reads one graph's sparse patterns on another."""

from __future__ import annotations

import torch

from gradgraph.nn import ComponentConv, GraphContext


def hand_built_context(edge_index: torch.Tensor, num_nodes: int, edge_dim: int = 2) -> GraphContext:
    """A context built as a user would, without ``from_graph`` and without a cache."""
    zeros = torch.zeros(num_nodes, dtype=torch.long)
    generator = torch.Generator().manual_seed(edge_index.shape[1])
    features = torch.randn(edge_index.shape[1], edge_dim, generator=generator, dtype=torch.float64)
    return GraphContext(edge_index, features, zeros, 1, zeros, 1)


def direct_messages(layer: ComponentConv, h: torch.Tensor, context: GraphContext) -> torch.Tensor:
    """The forward edge term by an explicit loop over the edges (mean aggregation)."""
    out = torch.zeros(h.shape[0], h.shape[1], layer.out_channels, dtype=h.dtype)
    count = torch.zeros(h.shape[0], dtype=h.dtype)
    gate = layer.gate_forward(context.edge_features)
    for edge, (src, dst) in enumerate(context.edge_index.t().tolist()):
        out[dst] += layer.lin_forward(h[src]) * gate[edge]
        count[dst] += 1
    return out / count.clamp(min=1)[:, None, None]


def test_contexts_built_by_hand_do_not_share_patterns():
    """Fails on the shared default ``cache={}``: the second graph (same size, other edges)
    then aggregates along the first graph's cached pattern."""
    first = hand_built_context(torch.tensor([[0, 1], [2, 3]]), num_nodes=4)
    second = hand_built_context(torch.tensor([[3, 2, 0], [0, 1, 1]]), num_nodes=4)
    assert first.cache is not second.cache
    layer = ComponentConv(3, 5, 2, direction="forward", edge_messages=True).double()
    h = torch.randn(4, 6, 3, dtype=torch.float64)
    assert layer.uses_fused_aggregation(h)
    for context in (first, second):
        got = layer._propagate_direction("forward", layer.lin_forward(h), layer.gate_forward(context.edge_features), context)
        torch.testing.assert_close(got, direct_messages(layer, h, context), atol=1e-12, rtol=1e-12)


def test_structural_replace_starts_a_new_cache_and_feature_replace_keeps_it():
    """Fails if ``_replace`` keeps the cache when ``edge_index`` changes: the rewired context
    would reuse the original edges' pattern."""
    context = hand_built_context(torch.tensor([[0, 1, 1], [2, 2, 3]]), num_nodes=4)
    layer = ComponentConv(3, 5, 2, direction="forward").double()
    h = torch.randn(4, 2, 3, dtype=torch.float64)
    layer(h, context)  # fills the cache
    assert context.cache
    reweighted = context._replace(edge_features=context.edge_features * 2)
    assert reweighted.cache is context.cache  # same structure: the patterns stay valid
    rewired = context._replace(edge_index=context.edge_index.flip(0))
    assert rewired.cache is not context.cache and not rewired.cache
    got = layer._propagate_direction("forward", layer.lin_forward(h), layer.gate_forward(rewired.edge_features), rewired)
    torch.testing.assert_close(got, direct_messages(layer, h, rewired), atol=1e-12, rtol=1e-12)
