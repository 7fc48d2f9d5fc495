"""Grouped-query attention (SDPA's ``enable_gqa``): the block is fixed, the parts no head reads are not.

``AttentionRules.attention_output`` pinned every set a grouped-query block reads (queries, keys, values and
the output) until issue 31 (branch mut47). The layout fixes the block itself anyway: its query, key, value
and output pieces are one class, which ``layout._assign_heads`` turns down where heads repeat key/value
nodes and ``free_ranks`` turns down for holding attention nodes. So the pin changed only the parts of those
sets that no head reads, such as the value half of a fused ``kv`` projection when SDPA reads ``(q, k, k)``:
they were fixed, though permuting them (the projection's rows and whatever reads them) keeps the function.
These tests check, in float64, that such a part is free, that the inferred group is a true symmetry (sampled
elements keep the function and map the graph to the permuted model's graph), the per-sample gradients against
torch.func and a per-datapoint loop, and that the grouped heads themselves stay fixed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, assert_matches_autograd_loop

from gradgraph import NodeKind

DTYPE = torch.float64
D, HEADS, KV_HEADS, T = 12, 4, 2, 4
HEAD_DIM = D // HEADS


def loss(output, target):
    return (output - target).pow(2).sum((1, 2))


class GroupedQuery(nn.Module):
    """``Linear(5, d)``, queries of four heads and a fused ``kv`` projection of two key/value heads,
    ``SDPA(q, k, k, enable_gqa=True)`` (the value half of ``kv`` read by no head), a residual and a head;
    with ``read_rest`` the value half is read by a ``Linear`` of its own through a tanh."""

    def __init__(self, read_rest: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.read_rest = read_rest
        self.inp = nn.Linear(5, D)
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * KV_HEADS * HEAD_DIM)
        self.out, self.head = nn.Linear(D, D), nn.Linear(D, 2)
        if read_rest:
            self.rest = nn.Linear(KV_HEADS * HEAD_DIM, D)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.q(h).view(b, t, HEADS, -1).transpose(1, 2)
        kv = self.kv(h)
        k, _ = kv.view(b, t, 2, KV_HEADS, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        h = h + self.out(y.transpose(1, 2).reshape(b, t, -1))
        if self.read_rest:
            h = h + self.rest(torch.tanh(kv[..., KV_HEADS * HEAD_DIM:]))
        return self.head(h)


def batch(b: int = 3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(b, T, 5, generator=generator, dtype=DTYPE),
            torch.randn(b, T, 2, generator=generator, dtype=DTYPE))


@pytest.mark.parametrize("read_rest", [False, True])
def test_grouped_query_attention_leaves_the_parts_no_head_reads_free(read_rest):
    """The value half of ``kv`` (six neurons) is free, alone or read by a ``Linear`` of its own, while every
    query, key and output neuron of the grouped heads stays fixed; exact against torch.func and a loop over
    the datapoints; four sampled group elements keep the function and map the graph to the permuted model's,
    and a permutation of the value half's rows of ``kv`` (with ``rest``'s columns) done by hand keeps the
    output. Fails before the lift (the rule pinned the whole ``kv`` set: the value half fixed). It is what
    ``xǁAttentionRulesǁattention_output__mutmut_241`` and ``242`` (the pin made ``None`` / ``False``)
    converted, runs convert 29 and 30 (no longer mutants: the pin is gone)."""
    model = GroupedQuery(read_rest).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    assert_matches_autograd_loop(model, inputs, targets, loss)
    roles = [int(kind) for kind in (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION)]
    heads = torch.isin(graph.node_kind, torch.tensor(roles))  # the keys are the values: labelled VALUE
    assert int(heads.sum()) == 2 * D + KV_HEADS * HEAD_DIM
    assert bool((graph.perm_group[heads] < 0).all()), graph.perm_group[heads]
    unread = graph.node_kind == int(NodeKind.FFN_HIDDEN)
    assert int(unread.sum()) == KV_HEADS * HEAD_DIM
    assert bool((graph.perm_group[unread] >= 0).all()) and graph.perm_group[unread].unique().numel() == 1
    for seed in range(4):
        moved, _, perm = assert_group_keeps_function(model, inputs, targets, loss, seed=seed)
        assert moved > 0 and not bool((perm[heads] != torch.arange(graph.num_nodes)[heads]).any())
    half = KV_HEADS * HEAD_DIM
    shuffle = half + torch.randperm(half, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(inputs)
        model.kv.weight.copy_(model.kv.weight[torch.cat([torch.arange(half), shuffle])])
        model.kv.bias.copy_(model.kv.bias[torch.cat([torch.arange(half), shuffle])])
        if read_rest:
            model.rest.weight.copy_(model.rest.weight[:, shuffle - half])
        torch.testing.assert_close(model(inputs), before, rtol=0, atol=1e-12)


def test_exchanging_two_key_value_heads_alone_changes_the_function():
    """What the layout's fix of the grouped heads guards: key/value head 0 and 1 exchanged (the key half's
    rows of ``kv``) without their query groups changes the model's output, so the block must stay fixed (the
    test above checks it is)."""
    model = GroupedQuery(read_rest=False).to(DTYPE)
    inputs, _ = batch()
    swap = torch.cat([torch.arange(HEAD_DIM, 2 * HEAD_DIM), torch.arange(HEAD_DIM), torch.arange(2 * HEAD_DIM, D)])
    with torch.no_grad():
        before = model(inputs)
        model.kv.weight.copy_(model.kv.weight[swap])
        model.kv.bias.copy_(model.kv.bias[swap])
        assert (model(inputs) - before).abs().max() > 1e-3
