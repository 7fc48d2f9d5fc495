"""The attention rules of the trace (``convert/trace/rules_attention.py``) one at a time.

Each model is one self-attention layer ``[b, T, d]`` between two ``Linear`` layers, its scores
written out in one way (a scale, a mask, ``where``, in-place ops, ``baddbmm`` on ``[b * H, T, T]``,
SDPA with its options, grouped-query heads). Every conversion is checked against torch.func's
per-sample gradients at 1e-10 in float64 (``assert_exact_per_sample_grads``), and its attention
structure against the heads written out by hand: the ``QUERY_KEY`` edge of query dim ``i`` to key
dim ``i`` of its key head, ``VALUE_ATTENTION`` of value dim ``j`` to output dim ``j``, and
``QUERY_ATTENTION`` from every query dim of a head to every output dim of it, with the node kinds in
the order ``Linear(d, 3 d)`` makes them. A constant that tells heads apart pins them
(``perm_group < 0``); one that does not leaves them free. Refusals are matched in the words the
user reads.

Written for the survivors of run convert 15 (docs/mutation.md, group ``convert-attention-rules``);
each test's docstring names the mutants it was checked against (``MUTANT_UNDER_TEST=NAME`` in
``.mutation/convert-attention-rules/mutants/``: the test failed).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph import EdgeKind, NodeKind

DTYPE = torch.float64
D, HEADS, T = 12, 2, 4  # head_dim 6, not T: a key read untransposed has another shape


def loss(output, target):
    return (output - target).pow(2).sum((1, 2))


class Attention(nn.Module):
    """``Linear(5, d) -> attention(q, k, v) -> Linear(d, d)`` plus a residual, then a head; the
    attention is ``fn(self, q, k, v)`` on ``[b, H, T, d / H]`` heads (``kv_heads`` key/value heads)."""

    def __init__(self, fn, heads: int = HEADS, kv_heads: int | None = None, d: int = D, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.fn = heads, kv_heads or heads, fn
        self.head_dim = d // heads
        self.inp = nn.Linear(5, d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * self.kv_heads * self.head_dim)
        self.out, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        b, t, _ = x.shape
        self.inputs = x
        h = self.inp(x)
        q = self.q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        y = self.fn(self, q, k, v)
        return self.head(h + self.out(y.transpose(1, 2).reshape(b, t, -1)))


def batch(seed: int = 0, b: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, 5, generator=generator, dtype=DTYPE),
            torch.randn(b, T, 2, generator=generator, dtype=DTYPE))


def convert(fn, **kwargs):
    model = Attention(fn, **kwargs).to(DTYPE)
    inputs, targets = batch()
    return model, assert_exact_per_sample_grads(model, inputs, targets, loss)


def edges(graph, kind: EdgeKind) -> set[tuple[int, int]]:
    return set(map(tuple, graph.edge_index[:, graph.edge_kind == kind].T.tolist()))


def assert_heads(graph, heads: int = HEADS, kv_heads: int | None = None, head_dim: int = D // HEADS) -> None:
    """The attention edges of ``heads`` query heads over ``kv_heads`` key/value heads (query head
    ``h`` reads key/value head ``h // (heads / kv_heads)``), written out."""
    kv_heads = kv_heads or heads
    nodes = {kind: torch.nonzero(graph.node_kind == kind).reshape(-1).tolist()
             for kind in (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION)}
    assert [len(nodes[kind]) for kind in nodes] == [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim,
                                                   heads * head_dim]
    query_key, value_attention, query_attention = set(), set(), set()
    for h in range(heads):
        g = h // (heads // kv_heads)
        q = nodes[NodeKind.QUERY][h * head_dim:(h + 1) * head_dim]
        k = nodes[NodeKind.KEY][g * head_dim:(g + 1) * head_dim]
        v = nodes[NodeKind.VALUE][g * head_dim:(g + 1) * head_dim]
        o = nodes[NodeKind.ATTENTION][h * head_dim:(h + 1) * head_dim]
        query_key |= set(zip(q, k))
        value_attention |= set(zip(v, o))
        query_attention |= {(i, j) for i in q for j in o}
    assert edges(graph, EdgeKind.QUERY_KEY) == query_key
    assert edges(graph, EdgeKind.VALUE_ATTENTION) == value_attention
    assert edges(graph, EdgeKind.QUERY_ATTENTION) == query_attention
    assert int((graph.edge_kind == EdgeKind.QUERY_KEY).sum()) == len(query_key)  # no edge twice
    assert int((graph.edge_kind == EdgeKind.VALUE_ATTENTION).sum()) == len(value_attention)
    assert int((graph.edge_kind == EdgeKind.QUERY_ATTENTION).sum()) == len(query_attention)


def heads_pinned(graph) -> bool:
    """Whether the query and key neurons are pinned (every one) or free (every one); anything else fails."""
    groups = graph.perm_group[(graph.node_kind == NodeKind.QUERY) | (graph.node_kind == NodeKind.KEY)]
    assert bool((groups < 0).all()) or bool((groups >= 0).all()), groups
    return bool((groups < 0).all())


def merged(x):
    """``[b, H, T, d / H] -> [b * H, T, d / H]``: the heads on the batch axis."""
    return x.reshape(-1, T, x.shape[-1])


def scores(q, k):
    return q @ k.transpose(-1, -2)


def causal(t: int = T) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def in_place_scaled_and_masked(self, q, k, v):
    s = scores(q, k)
    s /= math.sqrt(q.shape[-1])
    s.masked_fill_(~causal(), float("-inf"))
    return s.softmax(-1) @ v


def baddbmm_on_merged_heads(self, q, k, v):
    """BLOOM's form: scores ``[b * H, T, T]`` by ``baddbmm`` with a constant bias, viewed ``[b, H, T, T]``
    for the mask and back for ``bmm``."""
    b = q.shape[0]
    bias = torch.zeros(b * self.heads, T, T, dtype=q.dtype)
    s = torch.baddbmm(bias, merged(q), merged(k).transpose(1, 2),
                      beta=1.0, alpha=0.5)
    s = s.view(b, self.heads, T, T).masked_fill(~causal(), -1e4).view(b * self.heads, T, T)
    return torch.bmm(s.softmax(-1), merged(v)).view(q.shape)


VARIANTS = {
    "plain": lambda self, q, k, v: scores(q, k).softmax(-1) @ v,
    "softmax dim by keyword": lambda self, q, k, v: F.softmax(scores(q, k) * 0.5, dim=-1) @ v,
    "softmax dim 3 by position": lambda self, q, k, v: torch.softmax(scores(q, k), 3) @ v,
    "softmax(-1), then .matmul": lambda self, q, k, v: scores(q, k).softmax(-1).matmul(v),
    "softmax with every argument by keyword": lambda self, q, k, v: torch.softmax(input=scores(q, k), dim=-1) @ v,
    "masked_fill and where": lambda self, q, k, v: torch.where(
        causal(), scores(q, k).masked_fill(~causal(), -1e4), torch.tensor(-1e4, dtype=DTYPE)).softmax(-1) @ v,
    "in place": in_place_scaled_and_masked,
    "scores kept through float64()": lambda self, q, k, v: scores(q, k).double().softmax(-1) @ v,
    "baddbmm on merged heads": baddbmm_on_merged_heads,
    "sdpa": lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa causal, scaled, dropout 0": lambda self, q, k, v: F.scaled_dot_product_attention(
        q, k, v, None, 0.0, True, scale=0.3),
    "sdpa boolean mask by keyword": lambda self, q, k, v: F.scaled_dot_product_attention(
        query=q, key=k, value=v, attn_mask=causal()),
    "sdpa on [b * H, T, d / H]": lambda self, q, k, v: F.scaled_dot_product_attention(
        merged(q), merged(k), merged(v)).view(q.shape),
    "sdpa enable_gqa with as many key heads": lambda self, q, k, v: F.scaled_dot_product_attention(
        q, k, v, enable_gqa=True),
    "sdpa enable_gqa on [b * H, T, d / H]": lambda self, q, k, v: F.scaled_dot_product_attention(
        *map(merged, (q, k, v)), enable_gqa=True).view(q.shape),
    "sdpa on [b * H, T, d / H] with a causal mask": lambda self, q, k, v: F.scaled_dot_product_attention(
        *map(merged, (q, k, v)), causal()).view(q.shape),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_written_in_each_way_converts_exactly_with_its_heads(variant):
    """Every way of writing one attention layer: exact per-sample gradients, the heads' edges as
    written out, and the heads free (no constant tells them apart). Checked against
    ``xǁAttentionRulesǁsdpa__mutmut_105`` (the key's components transposed ``(+2, -1)``: untransposed
    for SDPA on ``[b * H, T, d / H]``, refused as attention between datapoints), ``152`` (the mask's
    shape ``[.., T, d / H]``: a causal mask then "did not broadcast" and pinned the heads) and
    ``xǁAttentionRulesǁrepeat_key_value_heads__mutmut_3`` to ``6`` (``enable_gqa`` on three-axis
    values refused as grouped-query attention), ``xǁAttentionRulesǁscores_op__mutmut_15`` (``or`` for the
    second ``and``: ``args[0]`` read of a softmax given its scores by keyword, an ``IndexError``)."""
    _, graph = convert(VARIANTS[variant])
    assert_heads(graph)
    assert not heads_pinned(graph)


@pytest.mark.parametrize("sdpa", [False, True])
def test_grouped_query_attention_reads_each_query_head_against_its_key_value_head(sdpa):
    """Four query heads over two key/value heads, as SDPA's ``enable_gqa`` or as ``transformers``'
    ``repeat_kv`` (expand and reshape) written out: query head ``h`` reads key/value head ``h // 2`` (the
    ``QUERY_KEY`` edges), and the grouped heads are pinned (a head permutation would have to keep
    groups together)."""

    def attend(self, q, k, v):
        if sdpa:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        b, kv_heads, t, head_dim = k.shape  # transformers' repeat_kv
        k, v = (x[:, :, None].expand(b, kv_heads, 2, t, head_dim).reshape(b, 4, t, head_dim) for x in (k, v))
        return scores(q, k).softmax(-1) @ v

    _, graph = convert(attend, heads=4, kv_heads=2)
    assert_heads(graph, heads=4, kv_heads=2, head_dim=3)
    assert heads_pinned(graph)
    attention = graph.perm_group[graph.node_kind == NodeKind.ATTENTION]
    assert bool((attention < 0).all())


def per_head_bias(self, q, k, v):
    slopes = torch.tensor([0.5, 0.25], dtype=DTYPE).view(1, 2, 1, 1)
    return (scores(q, k) + slopes * torch.arange(T, dtype=DTYPE)).softmax(-1) @ v


def sdpa_per_head_mask(self, q, k, v):
    mask = torch.zeros(1, 2, T, T, dtype=DTYPE)
    mask[:, 1] = -0.5 * torch.arange(T, dtype=DTYPE)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_per_head_mask_by_position(self, q, k, v):
    mask = torch.zeros(1, 2, T, T, dtype=DTYPE)
    mask[:, 1] = -0.5 * torch.arange(T, dtype=DTYPE)
    return F.scaled_dot_product_attention(q, k, v, mask)


def baddbmm_per_head_bias(beta: float):
    def attend(self, q, k, v):
        b = q.shape[0]
        bias = (torch.tensor([0.0, 1.0], dtype=DTYPE).view(1, 2, 1, 1) * torch.arange(T, dtype=DTYPE))
        bias = bias.expand(b, -1, T, -1).reshape(b * 2, T, T)
        s = torch.baddbmm(bias, merged(q), merged(k).transpose(1, 2),
                          beta=beta, alpha=1.0)
        return torch.bmm(s.softmax(-1), merged(v)).view(q.shape)
    return attend


@pytest.mark.parametrize("fn, pinned", [
    (per_head_bias, True),
    (sdpa_per_head_mask, True),
    (sdpa_per_head_mask_by_position, True),
    (baddbmm_per_head_bias(1.0), True),
    (baddbmm_per_head_bias(0.0), False),  # beta = 0: the bias is not read
    (lambda self, q, k, v: (scores(q, k) * torch.tensor(0.5, dtype=DTYPE)).softmax(-1) @ v, False),  # a 0-dim constant
    (lambda self, q, k, v: (scores(q, k) + torch.arange(T, dtype=DTYPE)).softmax(-1) @ v, False),  # the same per head
    (lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=causal()), False),
], ids=["per-head bias", "sdpa per-head mask", "sdpa per-head mask by position", "baddbmm per-head bias",
        "baddbmm beta 0",
        "0-dim scale", "bias shared by heads", "sdpa causal mask"])
def test_a_constant_that_tells_heads_apart_pins_them_and_no_other_does(fn, pinned):
    """ALiBi-like biases and masks: the heads are pinned exactly when the constant differs between
    them; the attention is exact and its edges are the heads' either way."""
    _, graph = convert(fn)
    assert_heads(graph)
    assert heads_pinned(graph) == pinned


REFUSALS = {
    "a softmax over queries": (
        lambda self, q, k, v: scores(q, k).softmax(-2) @ v,
        "Tensor.softmax: a softmax of scores over queries, and its result reaches"),
    "a softmax over queries, dim 2": (
        lambda self, q, k, v: F.softmax(scores(q, k), dim=2) @ v,
        "softmax: a softmax of scores over queries, and its result reaches"),
    "scores viewed with other last axes": (
        lambda self, q, k, v: (scores(q, k).reshape(q.shape[0], HEADS * T, T).softmax(-1)
                               .reshape(q.shape[0], HEADS, T, T) @ v),
        "Tensor.reshape: reshapes attention scores, and its result reaches"),
    "scores plus neuron values": (
        lambda self, q, k, v: (scores(q, k) + q[..., :1]).softmax(-1) @ v,
        "Tensor.add: combines attention scores with neuron values (a learned bias added to the scores, as T5's "
        "relative position bias, is not supported)"),
    "weights applied to a constant": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ torch.ones_like(v.detach()),
        "Tensor.matmul: attention weights applied to a constant"),
    "baddbmm of a constant": (
        lambda self, q, k, v: torch.bmm(torch.baddbmm(
            torch.zeros(q.shape[0] * HEADS, T, T, dtype=DTYPE), torch.ones_like(merged(q).detach()),
            merged(k).transpose(1, 2)).softmax(-1), merged(v)).view(q.shape),
        "torch.baddbmm: a batched matmul of neurons with a constant; gradgraph reads baddbmm as attention scores "
        "q @ kᵀ plus a bias"),
    "sdpa with dropout": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.25),
        "scaled_dot_product_attention: attention dropout changes the function; pass dropout_p=0 in eval mode"),
    "sdpa of a constant query": (
        lambda self, q, k, v: F.scaled_dot_product_attention(torch.ones_like(q.detach()), k, v),
        "scaled_dot_product_attention: attention over constant queries, keys or values"),
    "sdpa of a constant value": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, torch.ones_like(v.detach())),
        "scaled_dot_product_attention: attention over constant queries, keys or values"),
    "sdpa with dropout by position": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.25),
        "scaled_dot_product_attention: attention dropout changes the function; pass dropout_p=0 in eval mode"),
    "sdpa over [b * T, d], no head or batch axis": (
        lambda self, q, k, v: F.scaled_dot_product_attention(*(rows(x) for x in (q, k, v))).reshape(
            q.shape[0], T, HEADS, -1).transpose(1, 2),
        "torch.nn.functional.scaled_dot_product_attention: attention without a head or batch axis"),
    "scores of one key head broadcast to the query heads, viewed [b * H, T, T]": (
        lambda self, q, k, v: torch.bmm(scores(q, k[:, :1]).view(-1, T, T).softmax(-1),
                                        v.expand(-1, HEADS, -1, -1).reshape(-1, T, self.head_dim)).view(q.shape),
        "Tensor.view: reshapes attention scores, and its result reaches"),
    "heads whose keys overlap in part": (
        lambda self, q, k, v: scores(q, overlapping_key_heads(k)).softmax(-1) @ v,
        "Tensor.matmul: heads that share some of their query, key or value neurons but not whole heads "
        "(grouped-query attention repeats whole key/value heads)"),
    "sdpa attn_mask read off the input": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=self.inputs[:, None, :, :T]),
        "torch.nn.functional.scaled_dot_product_attention: an attn_mask computed from neuron values or the input "
        "(a learned bias of the attention scores, as T5's relative position bias): its gradient is not a rank-1 term "
        "of the graph, and gradgraph reads attn_mask as a constant. Pass a mask that does not depend on parameters; "
        "a learned score bias is not supported"),
    "scores with their batch axes swapped": (
        lambda self, q, k, v: (scores(q, k).transpose(0, 1).softmax(-1) @ v.transpose(0, 1)).transpose(0, 1),
        "Tensor.transpose: reshapes attention scores, and its result reaches"),
    "heads sharing a value head but not a key head": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ v[:, :1].expand(-1, HEADS, -1, -1),
        "Tensor.matmul: heads that share some of their query, key or value neurons but not whole heads"),
    "attention across the datapoints": (
        lambda self, q, k, v: (scores(*(x.transpose(0, 2) for x in (q, k))).softmax(-1)
                               @ v.transpose(0, 2)).transpose(0, 2),
        "Tensor.matmul: attention between positions of different datapoints (over the rows of a joined batch, or "
        "over the batch axis): one datapoint's output would depend on another's. Attend within each datapoint"),
    "values of another datapoint": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ torch.cat([v[1:], v[:1]]),
        "Tensor.matmul: attention between positions of different datapoints"),
    "heads sharing part of a key head": (
        lambda self, q, k, v: scores(q, torch.cat([k[:, :1, :, :3], k[:, :1, :, :3]], -1).expand(-1, HEADS, -1, -1)
                                     ).softmax(-1) @ v,
        "Tensor.matmul: heads that share some of their query, key or value neurons but not whole heads "
        "(grouped-query attention repeats whole key/value heads)"),
}


def rows(x):
    """``[b, H, T, d / H] -> [b * T, d]``: every position of every datapoint one row."""
    return x.transpose(1, 2).reshape(-1, D)


def overlapping_key_heads(k):
    """Two key heads of ``d / H`` dims that share half of them (dims ``0:6`` and ``3:9`` of the keys)."""
    keys = k.transpose(1, 2).reshape(k.shape[0], T, -1)
    half = k.shape[-1] // 2
    return torch.stack([keys[..., :2 * half], keys[..., half:3 * half]], 1)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_attention_the_rules_cannot_read_is_refused_in_the_users_words(case):
    """Each refusal names the op and says what is not supported (and, for a value marked opaque, what
    it reaches). Checked against ``xǁAttentionRulesǁsdpa__mutmut_10``, ``11`` (a dropout given by
    position not read), ``74`` (``enable_gqa`` read as true: two-axis values refused as grouped-query
    attention), ``114`` (``and`` for ``or``: a mask read off the input taken as a constant), ``123`` to
    ``126``, ``130`` to ``137`` (its message), ``154`` (the op name ``None``);
    ``xǁAttentionRulesǁattention_output__mutmut_13``, ``14``; ``xǁAttentionRulesǁreshape_score_batch__mutmut_17``
    (``and`` for ``or``: a broadcast key head reshaped to the queries' batch, a ``RuntimeError``);
    ``x__grouped__mutmut_8``, ``10`` (the rows' neurons compared flattened: keys that overlap in part taken
    for grouped heads); ``xǁAttentionRulesǁattention_output__mutmut_205`` (the values left out of the
    shared-neuron test: heads with their own keys and one value head accepted) and ``48`` (the op name
    ``None`` in the refusal of attention across datapoints), ``xǁAttentionRulesǁcheck_one_datapoint__mutmut_29``
    (``and`` for the last ``or``: values of other datapoints than the keys' accepted, and converted), ``40``,
    ``44``, ``46`` to ``50`` (that refusal's op name and words);
    ``xǁAttentionRulesǁscores_op__mutmut_46`` (every shape op that changes the scores' batch axes read as a
    reshape)."""
    fn, message = REFUSALS[case]
    model = Attention(fn).to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, inputs, targets, loss)
    assert message in str(refusal.value)


PARAMETER_REFUSALS = {
    "sdpa of a parameter query": (
        (1, HEADS, T, D // HEADS),
        lambda self, q, k, v: F.scaled_dot_product_attention(self.extra.expand(q.shape[0], -1, -1, -1), k, v),
        "torch.nn.functional.scaled_dot_product_attention: the parameter 'extra' used where gradgraph expects neuron "
        "values"),
    "sdpa of a parameter key": (
        (1, HEADS, T, D // HEADS),
        lambda self, q, k, v: F.scaled_dot_product_attention(q, self.extra.expand(q.shape[0], -1, -1, -1), v),
        "torch.nn.functional.scaled_dot_product_attention: the parameter 'extra' used where gradgraph expects neuron "
        "values"),
    "sdpa of a parameter value": (
        (1, HEADS, T, D // HEADS),
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, self.extra.expand(q.shape[0], -1, -1, -1)),
        "torch.nn.functional.scaled_dot_product_attention: the parameter 'extra' used where gradgraph expects neuron "
        "values"),
    "baddbmm of a parameter query": (
        (1, T, D // HEADS),
        lambda self, q, k, v: torch.bmm(torch.baddbmm(
            torch.zeros(q.shape[0] * HEADS, T, T, dtype=DTYPE), self.extra.expand(q.shape[0] * HEADS, -1, -1),
            merged(k).transpose(1, 2)).softmax(-1), merged(v)).view(q.shape),
        "torch.baddbmm: the parameter 'extra' used where gradgraph expects neuron values"),
    "baddbmm of a parameter key": (
        (1, D // HEADS, T),
        lambda self, q, k, v: torch.bmm(torch.baddbmm(
            torch.zeros(q.shape[0] * HEADS, T, T, dtype=DTYPE), merged(q),
            self.extra.expand(q.shape[0] * HEADS, -1, -1)).softmax(-1), merged(v)).view(q.shape),
        "torch.baddbmm: the parameter 'extra' used where gradgraph expects neuron values"),
    "sdpa attn_mask a parameter by position": (
        (1, HEADS, T, T),
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, self.extra),
        "torch.nn.functional.scaled_dot_product_attention: an attn_mask computed from the parameter(s) ['extra'] "
        "(a learned bias of the attention scores"),
    "sdpa attn_mask a parameter as it is": (
        (1, HEADS, T, T),
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=self.extra),
        "torch.nn.functional.scaled_dot_product_attention: an attn_mask computed from the parameter(s) ['extra'] "
        "(a learned bias of the attention scores"),
}


@pytest.mark.parametrize("case", list(PARAMETER_REFUSALS))
def test_a_parameter_where_attention_reads_neurons_is_refused_by_name(case):
    """A learned query, key or value tensor (``extra``), or a learned ``attn_mask`` passed as it is: the
    refusal names the op and the parameter. Checked against ``xǁAttentionRulesǁsdpa__mutmut_38``, ``45``,
    ``52``, ``xǁAttentionRulesǁbiased_scores__mutmut_31``, ``38`` (the op name ``None``), ``sdpa`` 8, 9 (SDPA's
    fourth argument not bound as ``attn_mask``: a learned mask given by position not refused) and
    ``x__parameters_behind__mutmut_9`` to ``12`` (a parameter with no autograd history not named: "the
    parameter(s) []", or a ``KeyError``)."""
    shape, fn, message = PARAMETER_REFUSALS[case]
    model = Attention(fn).to(DTYPE)
    model.extra = nn.Parameter(torch.randn(*shape, dtype=DTYPE))
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, inputs, targets, loss)
    assert message in str(refusal.value)


def test_a_learned_bias_of_baddbmm_scores_is_refused_by_name():
    """``baddbmm`` whose bias is a parameter: a learned score bias, refused with the words for it."""

    def attend(self, q, k, v):
        s = torch.baddbmm(self.bias.repeat(q.shape[0], 1, 1), merged(q), merged(k).transpose(1, 2))
        return torch.bmm(s.softmax(-1), merged(v)).view(q.shape)

    model = Attention(attend).to(DTYPE)
    model.bias = nn.Parameter(torch.randn(HEADS, T, T, dtype=DTYPE))
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, inputs, targets, loss)
    assert ("torch.baddbmm: a bias of attention scores that depends on parameters (a learned bias added to the "
            "scores is not supported)") in str(refusal.value)


@pytest.mark.parametrize("sdpa", [False, True])
def test_one_token_and_one_dimensional_heads_convert_exactly_with_their_heads(sdpa):
    """A sequence of one token, and twelve heads of one dim each: the rule reads a head's rows off
    its first token and its first dim, which are then the only ones. Checked against
    ``xǁAttentionRulesǁattention_output__mutmut_36``, ``298`` (the queries' components read off dim 1)
    and ``73``, ``90``, ``107`` (the query, key or value rows read off token 1), and
    ``xǁAttentionRulesǁcheck_one_datapoint__mutmut_10``, ``19``, ``28`` (the datapoints of the queries, keys
    or values read off dim or token 1): an ``IndexError``."""
    fn = VARIANTS["sdpa" if sdpa else "plain"]
    model = Attention(fn, heads=D).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    assert_heads(graph, heads=D, head_dim=1)
    model = Attention(fn).to(DTYPE)
    graph = assert_exact_per_sample_grads(model, inputs[:, :1], targets[:, :1], loss)
    assert_heads(graph)


@pytest.mark.parametrize("softmax", ["F.softmax", "nn.Softmax", "F.softmax of [b * H, T, T]"])
def test_a_softmax_of_scores_without_a_dim_takes_pytorchs_implicit_axis_and_is_refused_by_name(softmax):
    """``F.softmax(scores)`` and ``nn.Softmax()`` without ``dim`` (deprecated, still legal) hand the rule
    ``dim=None``; PyTorch then takes axis 1 of four-axis scores (the heads) and axis 0 of three-axis ones
    (the batch), never the keys: refused as a softmax of scores over another axis than the keys. Before
    the fix the rule computed ``None % ndim``: a bare ``TypeError`` out of ``to_graph``. (Found while
    triaging ``xǁAttentionRulesǁscores_op__mutmut_76``, ``77``, the default ``-1`` of that line.)"""
    fn = {
        "F.softmax": lambda self, q, k, v: F.softmax(scores(q, k)) @ v,
        "nn.Softmax": lambda self, q, k, v: nn.Softmax()(scores(q, k)) @ v,
        "F.softmax of [b * H, T, T]": lambda self, q, k, v: torch.bmm(
            F.softmax(torch.bmm(merged(q), merged(k).transpose(1, 2))), merged(v)).view(q.shape),
    }[softmax]
    model = Attention(fn).to(DTYPE)
    inputs, targets = batch()
    with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
        with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
            gradgraph.to_graph(model, inputs, targets, loss)
    assert "softmax: a softmax of scores over another axis than the keys, and its result reaches" in str(refusal.value)


def test_scores_bounded_by_a_constant_in_either_place_convert_and_a_max_over_them_is_refused():
    """``scores.max(floor)`` (the method's two-tensor form) and ``torch.min(ceiling, scores)`` (the constant
    first) are elementwise bounds: exact with their heads. A max that reduces the scores (``torch.max(s)``,
    ``s.max(-1, keepdim=True)``: the softmax's shift) is no elementwise op of them and is refused by name.
    Kills scores_op 17 (every max allowed), 19 (``len(args) >= 1``: an ``IndexError`` out of the trace)."""
    for fn in (lambda self, q, k, v: scores(q, k).max(torch.tensor(-1.0, dtype=q.dtype)).softmax(-1) @ v,
               lambda self, q, k, v: torch.min(torch.tensor(2.0, dtype=q.dtype), scores(q, k)).softmax(-1) @ v):
        _, graph = convert(fn)
        assert_heads(graph)
    inputs, targets = batch()
    for fn, op in ((lambda self, q, k, v: (scores(q, k) - torch.max(scores(q, k))).softmax(-1) @ v, "torch.max"),
                   (lambda self, q, k, v: (lambda s: (s - s.max(-1, keepdim=True).values).softmax(-1) @ v)(
                       scores(q, k)), "Tensor.max")):
        with pytest.raises(gradgraph.UnsupportedModuleError, match=re.escape(
                f"{op}: reduces attention scores (a max over the keys for a hand-written stable softmax")):
            gradgraph.to_graph(Attention(fn).to(DTYPE), inputs, targets, loss)


def test_three_axis_scores_kept_through_contiguous_and_a_constant_divided_by_them():
    """Scores ``[b * H, T, T]`` through ``.contiguous()`` (a shape op that keeps the batch shape) convert
    exactly; a constant divided in place by the scores (``ones.div_(scores)``: not the scores, nor a function
    of them the rules read) is refused by name. Kills scores_op 49 (the batch shape read as ``shape[:2]``:
    three-axis scores then taken for reshaped), 24 (the in-place op renamed out of place where the scores
    are not its first argument)."""
    _, graph = convert(lambda self, q, k, v: torch.bmm(torch.bmm(merged(q), merged(k).transpose(1, 2)).contiguous()
                                                       .softmax(-1), merged(v)).view(q.shape))
    assert_heads(graph)
    inputs, targets = batch()
    model = Attention(lambda self, q, k, v: torch.ones(q.shape[0], q.shape[1], T, T, dtype=q.dtype).div_(
        scores(q, k)).softmax(-1) @ v).to(DTYPE)
    with pytest.raises(gradgraph.UnsupportedModuleError, match=re.escape(
            "Tensor.div_: uses attention scores in a way gradgraph has no rule for")):
        gradgraph.to_graph(model, inputs, targets, loss)


def test_a_softmax_of_scores_written_by_hand_is_refused_with_what_to_write_instead():
    """A stable softmax written by hand (``s - s.max(-1, keepdim=True).values``, then ``exp`` and a sum) reduces
    the scores: refused with the remedy (``torch.softmax``), not as a learned bias of the scores (the message
    until session 18, which sent a user looking for a parameter that is not there; a bias from neuron values is
    still named as one, above)."""
    inputs, targets = batch()
    stable = lambda self, q, k, v: (lambda s: (lambda e: e / e.sum(-1, keepdim=True))(  # noqa: E731
        (s - s.max(-1, keepdim=True).values).exp()) @ v)(scores(q, k))
    unstable = lambda self, q, k, v: (lambda e: e / e.sum(-1, keepdim=True))(scores(q, k).exp()) @ v  # noqa: E731
    for fn, op in ((stable, "Tensor.max"), (unstable, "Tensor.sum")):
        with pytest.raises(gradgraph.UnsupportedModuleError, match=re.escape(
                f"{op}: reduces attention scores (a max over the keys for a hand-written stable softmax, a sum of "
                "their exponentials); gradgraph reads attention weights made by a softmax of the scores over the "
                "keys: write it as torch.softmax / F.softmax, which is stable")):
            gradgraph.to_graph(Attention(fn).to(DTYPE), inputs, targets, loss)


WHERE = r"\S+\.py:\d+ in \S+: "  # where: the line and function (under mutmut, its trampoline's)


def refusal_of(fn, setup=None, b: int = 3, **kwargs) -> str:
    model = Attention(fn, **kwargs).to(DTYPE)
    if setup is not None:
        setup(model)
    inputs, targets = batch(b=b)
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, inputs, targets, loss)
    return str(refusal.value)


def test_two_axis_scores_softmaxed_without_a_dim_are_read_over_the_keys_and_refused_at_the_values():
    """Two-axis scores ``[b * T, b * T]`` (every position of every datapoint one row) softmaxed without
    ``dim``: PyTorch's implicit axis of a two-axis value is 1, the keys, so the softmax is read and the
    refusal comes at ``@ v``, which has no head or batch axis. Kills
    ``xǁAttentionRulesǁscores_op__mutmut_89``, ``93`` (the implicit axis 0 for two-axis scores too: refused at
    the softmax as one over the queries, in other words)."""
    message = refusal_of(lambda self, q, k, v: (F.softmax(rows(q) @ rows(k).T) @ rows(v)).reshape(
        q.shape[0], T, HEADS, -1).transpose(1, 2))
    assert re.fullmatch(WHERE + "Tensor.matmul: attention without a head or batch axis", message), message


def test_scores_of_one_datapoint_and_one_head_viewed_as_two_axes_are_followed_to_the_values():
    """Scores ``[1, 1, T, T]`` (one datapoint, one head) viewed ``[T, T]``: the view keeps the queries and
    keys (``reshape_score_batch`` with an empty batch), so the refusal comes at ``@ v``, which has no head
    or batch axis, not at the view. Kills ``xǁAttentionRulesǁreshape_score_batch__mutmut_6``, ``7`` (two-axis
    output not read as scores: refused as a view that reshapes attention scores)."""
    message = refusal_of(lambda self, q, k, v: (scores(q, k).view(T, T).softmax(-1) @ v.view(T, -1)).view(q.shape),
                         b=1, heads=1)
    assert re.fullmatch(WHERE + "Tensor.matmul: attention without a head or batch axis", message), message


MASK_REFUSAL = ("torch.nn.functional.scaled_dot_product_attention: an attn_mask computed from {} (a learned bias of "
                "the attention scores, as T5's relative position bias): its gradient is not a rank-1 term of the "
                "graph, and gradgraph reads attn_mask as a constant. Pass a mask that does not depend on parameters; "
                "a learned score bias is not supported")


def sdpa_with_stored_mask(self, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def test_a_mask_that_requires_grad_without_autograd_history_and_is_no_parameter_is_refused():
    """An ``attn_mask`` kept as a plain attribute that requires grad (a leaf, not registered as a parameter):
    refused as a mask gradgraph cannot read as a constant, with no parameter behind it. Kills
    ``x__parameters_behind__mutmut_6`` (the walk started at a missing ``grad_fn``: an ``AttributeError``) and
    ``8`` (``or`` for ``and``: a tensor with no history looked up among the parameters, a ``KeyError``)."""

    def setup(model):
        model.mask = torch.zeros(1, HEADS, T, T, dtype=DTYPE, requires_grad=True)

    message = refusal_of(sdpa_with_stored_mask, setup)
    assert re.fullmatch(WHERE + re.escape(MASK_REFUSAL.format("neuron values or the input")), message), message


def test_a_mask_computed_from_two_parameters_through_a_shared_node_names_both():
    """A mask ``p2 * (p1 + p1)`` computed from parameters outside the forward (its autograd graph kept): the
    walk of that graph meets ``p1``'s node twice and must go on to ``p2``. Kills
    ``x__parameters_behind__mutmut_18`` (``break`` for ``continue``: the walk stops at the node seen twice,
    and the message names ``['p1']`` only)."""

    def setup(model):
        model.p1 = nn.Parameter(torch.randn(1, HEADS, T, T, dtype=DTYPE))
        model.p2 = nn.Parameter(torch.randn(1, HEADS, T, T, dtype=DTYPE))
        model.mask = model.p2 * (model.p1 + model.p1)

    message = refusal_of(sdpa_with_stored_mask, setup)
    assert re.fullmatch(WHERE + re.escape(MASK_REFUSAL.format("the parameter(s) ['p1', 'p2']")), message), message


class QueriesInAResidual(Attention):
    """The queries' ``Linear`` output also summed after the attention: ``tanh(out(y) + q(h)) + out(y)``."""

    def __init__(self) -> None:
        super().__init__(None)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        queries = self.q(h)
        q = queries.view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        o = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))
        return self.head(torch.tanh(o + queries) + o)


def test_queries_read_by_attention_and_summed_later_convert_exactly():
    """A sum that meets the queries' ``Linear`` output after the attention read it: the query set is no
    longer fresh, so the sum is not absorbed into the neurons the attention reads. Checked against
    torch.func's per-sample gradients at 1e-10 in float64, with the heads written out. Kills
    ``xǁAttentionRulesǁobserve_attention_input__mutmut_2`` (``fresh = True``: the sum absorbed into the
    query set, a ``GradGraphError``, "the traced neuron sets form a cycle")."""
    model = QueriesInAResidual().to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    assert_heads(graph)


def test_keys_read_as_values_leave_the_unread_half_of_their_linear_free():
    """SDPA of ``(q, k, k)``: each head's values are its keys, which is no sharing between heads, so the
    rule pins nothing for grouped heads; the half of ``kv``'s outputs that nothing reads (its value half)
    stays one free group of neurons, a true symmetry (permuting those rows of ``kv`` leaves the model's
    output unchanged, checked here). Kills ``xǁAttentionRulesǁattention_output__mutmut_199`` (the values
    counted with the keys in the shared-neuron test: heads whose values are their keys read as grouped, and
    the whole ``kv`` set pinned)."""
    model = Attention(lambda self, q, k, v: F.scaled_dot_product_attention(q, k, k)).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    unread = graph.perm_group[graph.node_kind == NodeKind.FFN_HIDDEN]
    assert unread.numel() == D and bool((unread >= 0).all()) and unread.unique().numel() == 1, unread
    with torch.no_grad():
        before = model(inputs)
        perm = D + torch.randperm(D, generator=torch.Generator().manual_seed(1))
        rows = torch.cat([torch.arange(D), perm])
        model.kv.weight.copy_(model.kv.weight[rows])
        model.kv.bias.copy_(model.kv.bias[rows])
        torch.testing.assert_close(model(inputs), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", ["torch.nn.functional.scaled_dot_product_attention", "Tensor.matmul"])
def test_queries_transposed_to_positions_last_are_refused_by_name(op):
    """Three heads of ``d / H = T = 4`` dims, the queries transposed ``[b, H, d / H, T]`` (their positions
    last, which the shapes allow as ``d / H == T``): refused, naming the op, as queries whose last axis is
    not their features. Kills ``xǁAttentionRulesǁattention_output__mutmut_38`` to ``43`` (that refusal's op
    name and words)."""

    def attend(self, q, k, v):
        if op == "Tensor.matmul":
            return (q.transpose(-1, -2) @ k.transpose(-1, -2)).softmax(-1) @ v
        return F.scaled_dot_product_attention(q.transpose(-1, -2), k, v)

    message = refusal_of(attend, heads=3)
    assert re.fullmatch(WHERE + re.escape(f"{op}: queries whose last axis is not their features"), message), message


@pytest.mark.parametrize("move", ["flip", "roll", "transpose of equal axes", "index"])
def test_scores_moved_between_datapoints_with_their_batch_shape_kept_are_refused(move):
    """Scores ``[b, H, T, T]`` moved along their batch axes by a shape op that keeps the batch shape (``flip(0)``,
    ``roll(1, 0)``, ``transpose(0, 1)`` with ``b == H``, an index ``[[1, 0]]`` of the datapoints): one datapoint's
    attention then reads another's scores. The rule kept the scores' queries and keys as they were, so the
    model *converted* with per-sample gradients off by 0.46 (``flip(0)`` of three datapoints) from each
    datapoint's loss gradient on the whole batch: a silent wrong answer (found triaging run convert 16's
    survivors, session 21). Now refused, naming the op, as scores moved between datapoints."""
    fn = {
        "flip": lambda self, q, k, v: scores(q, k).flip(0).softmax(-1) @ v,
        "roll": lambda self, q, k, v: scores(q, k).roll(1, 0).softmax(-1) @ v,
        "transpose of equal axes": lambda self, q, k, v: scores(q, k).transpose(0, 1).softmax(-1) @ v,
        "index": lambda self, q, k, v: scores(q, k)[[1, 0]].softmax(-1) @ v,
    }[move]
    message = refusal_of(fn, b=HEADS)
    op = {"index": "__getitem__", "transpose of equal axes": "transpose"}.get(move, move)
    assert re.search(rf"Tensor\.{op}: moves attention scores between datapoints \(one datapoint's attention would "
                     r"read another's scores\), and its result reaches", message), message


WITHIN_A_DATAPOINT = {
    "heads swapped": lambda self, q, k, v: scores(q, k)[:, [1, 0]].softmax(-1) @ v,
    "heads flipped, dims by keyword": lambda self, q, k, v: scores(q, k).flip(dims=(1,)).softmax(-1) @ v,
    "keys rolled": lambda self, q, k, v: scores(q, k).roll(1, -1).softmax(-1) @ v,
    "queries flipped": lambda self, q, k, v: torch.flip(scores(q, k), (-2,)).softmax(-1) @ v,
    "transposed by the attribute mT": lambda self, q, k, v: scores(q, k).mT.softmax(-1) @ v,
    "keys flipped, the scores by keyword": lambda self, q, k, v: torch.flip(input=scores(q, k), dims=(-1,)).softmax(
        -1) @ v,
    "queries repeated by an index": lambda self, q, k, v: scores(q, k)[..., [0, 1, 0, 1], :].softmax(-1) @ v,
    "keys repeated by an index": lambda self, q, k, v: scores(q, k)[..., [0, 1, 0, 1]].softmax(-1) @ v,
}


@pytest.mark.parametrize("move", list(WITHIN_A_DATAPOINT))
def test_scores_moved_within_each_datapoint_convert_exactly(move):
    """Shape ops that move scores only within each datapoint (between its heads, queries or keys; by an index,
    ``flip``, ``roll``, ``torch.flip`` or the attribute ``mT``) are followed, not refused: each converts with
    per-sample gradients equal to torch.func's at 1e-10. Kills the mutants of ``x__moves_datapoints`` (48: the
    keyword arguments dropped from the replay) and
    ``x__datapoints_of_scores`` that refuse them (session 21; checked with ``MUTANT_UNDER_TEST``)."""
    convert(WITHIN_A_DATAPOINT[move])


def test_an_op_of_scores_alone_without_a_rule_is_refused_saying_what_is_followed():
    """``scores.cumsum(-1)`` (scores alone, not a reduction, not elementwise): refused, naming the op, with what
    the rule follows. Kills ``xǁAttentionRulesǁscores_op__mutmut_204``, ``205`` (that message's words; numbers
    of session 21's file after its fix)."""
    message = refusal_of(lambda self, q, k, v: scores(q, k).cumsum(-1).softmax(-1) @ v)
    assert re.match(WHERE + re.escape(
        "Tensor.cumsum: uses attention scores in a way gradgraph has no rule for (it follows them through "
        "elementwise ops with constants, masks and a softmax over the keys), and its result reaches"), message), message


SPLITS = {
    "unbind over the datapoints": lambda self, q, k, v: torch.stack(scores(q, k).unbind(0)).softmax(-1) @ v,
    "split over the datapoints": lambda self, q, k, v: torch.cat(scores(q, k).split(1, 0)).softmax(-1) @ v,
    "chunk over the keys": lambda self, q, k, v: torch.cat(scores(q, k).chunk(2, -1), -1).softmax(-1) @ v,
    "tensor_split over the heads": lambda self, q, k, v: torch.cat(torch.tensor_split(scores(q, k), 2, 1), 1).softmax(
        -1) @ v,
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_scores_split_into_parts_are_refused_by_name(split):
    """Scores split into parts (``unbind``, ``split``, ``chunk``, ``tensor_split``: a shape op whose result is a
    tuple): refused, naming the op, as scores split into parts. A bug found triaging ``x__moves_datapoints``' last
    survivors (issue 31, branch mut38): ``scores_op`` read the tuple's ``shape``, and a bare ``AttributeError``
    ("'tuple' object has no attribute 'shape'") came out of ``to_graph``: no conversion, no refusal by name."""
    message = refusal_of(SPLITS[split])
    op = {"tensor_split over the heads": "torch.tensor_split"}.get(split, f"Tensor.{split.split()[0]}")
    assert re.match(WHERE + re.escape(f"{op}: splits attention scores into parts, which gradgraph does not follow, "
                                      "and its result reaches"), message), message


# ---- issue 31, branch mut38: the last survivors of runs convert 15-16, 18, 22-26 (numbers of a fresh
# .mutation/convert-attention-rules/ made from the file before 93dac38, the split refusal; the same as session 20's)


def test_scores_moved_between_datapoints_with_the_input_given_by_keyword_are_refused():
    """``torch.flip(input=scores, dims=(0,))``: the scores given by keyword, so the op has no positional argument
    to replay; it counts as moving them, and is refused by name. Kills ``x__moves_datapoints__mutmut_8`` (that
    guard's ``return False``: the flip *converted*, per-sample gradients off by 0.6 from a per-datapoint loop),
    ``2`` and ``3`` (``and`` for an ``or``: an ``IndexError`` out of the trace). The same guard refused
    ``torch.flip(input=scores, dims=(-1,))``, a move within each datapoint, as stricter than needed (mut38's
    report): the scores by keyword are replayed since (``WITHIN_A_DATAPOINT``), and this flip over the datapoints
    is refused because the replay shows it moves them."""
    message = refusal_of(lambda self, q, k, v: torch.flip(input=scores(q, k), dims=(0,)).softmax(-1) @ v)
    assert re.match(WHERE + re.escape("torch.flip: moves attention scores between datapoints (one datapoint's "
                                      "attention would read another's scores), and its result reaches"),
                    message), message


def merged_scores_moved(move):
    def attend(self, q, k, v):
        weights = move(merged(q) @ merged(k).transpose(-1, -2)).softmax(-1)
        return (weights @ merged(v)).reshape(q.shape)
    return attend


@pytest.mark.parametrize("move", ["keys flipped", "queries rolled", "transposed by mT"])
def test_three_axis_scores_moved_within_each_datapoint_convert_exactly(move):
    """Scores ``[b * H, T, T]`` (the heads on the batch axis) moved within each datapoint (its keys flipped, its
    queries rolled, transposed by ``mT``): followed, each exact against torch.func's per-sample gradients at
    1e-10. Kills ``x__datapoints_of_scores__mutmut_6`` (``shape[:+2]``) and ``8`` (``comps.shape[+2:]``): the
    same slices for four-axis scores, but for three-axis ones the datapoints cannot be broadcast, the replay fails
    and the move is refused as one between datapoints."""
    convert(merged_scores_moved({"keys flipped": lambda s: s.flip(-1), "queries rolled": lambda s: s.roll(1, -2),
                                 "transposed by mT": lambda s: s.mT}[move]))


SOME_POSITIONS = {
    "some queries": lambda self, q, k, v: scores(q, k)[..., :2, :].softmax(-1) @ v,
    "some keys": lambda self, q, k, v: scores(q, k)[..., :, :2].softmax(-1) @ v[..., :2, :],
    "queries repeated": lambda self, q, k, v: scores(q, k)[..., [0, 1, 0, 1, 0], :].softmax(-1) @ v,
}
REWRITTEN_POSITIONS = {
    "some queries": lambda self, q, k, v: (scores(q, k).softmax(-1) @ v)[..., :2, :],
    "some keys": lambda self, q, k, v: scores(q, k).masked_fill(torch.arange(T) >= 2, float("-inf")).softmax(-1) @ v,
}


class FirstQueries(Attention):
    """:class:`Attention` whose head reads the attention's first two query positions only (``fn`` gives
    ``[b, H, 2, d / H]``), or all ``T`` where ``fn`` keeps them."""

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        y = self.fn(self, q, k, v)
        return self.head(self.out(y.transpose(1, 2).reshape(b, y.shape[-2], -1))[:, :2])


def refusal_of_first_queries(fn, width: int) -> str:
    """The refusal of :class:`FirstQueries` with ``fn`` (a head of ``width`` positions: the loss reads them)."""
    model = FirstQueries(fn).to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as refusal:
        gradgraph.to_graph(model, inputs, targets[:, :width], loss)
    return str(refusal.value)


@pytest.mark.parametrize("positions", list(SOME_POSITIONS))
def test_scores_of_some_positions_are_refused_in_words_that_say_so_with_the_remedy(positions):
    """``scores[..., :2, :]`` (the scores of the first two queries), ``scores[..., :, :2]`` (of two keys), queries
    repeated by an index to five: the scores no longer match the positions of their queries or keys (an index
    that keeps their number, ``scores[..., [0, 1, 0, 1], :]``, converts exactly: the factors are read off the
    tensors, and no edge depends on which query a row of scores came from). The query slice was
    refused as one that "moves attention scores between datapoints" (the datapoints cannot be read off the queries'
    components for the new shape), which a slice within each datapoint does not do (mut38's report, session 21),
    the key slice at the product with ``v`` as "attention between positions of different datapoints"; now each at
    the op, in words that say what it does, with the rewrites that convert (the next test). The query slice killed
    ``x__moves_datapoints__mutmut_56`` (a replay that raises taken as no move) before; it no longer reaches that
    replay."""
    message = refusal_of_first_queries(SOME_POSITIONS[positions], width=2)
    assert re.match(WHERE + re.escape(
        "Tensor.__getitem__: changes the query or key positions attention scores hold (a slice, an index or a "
        "repeat of them), which gradgraph does not follow: select queries on the attention's output instead "
        "((scores.softmax(-1) @ v)[..., :2, :] is scores[..., :2, :].softmax(-1) @ v) and leave keys out with a "
        "mask (scores.masked_fill(mask, float('-inf'))), and its result reaches"), message), message


@pytest.mark.parametrize("positions", list(REWRITTEN_POSITIONS))
def test_the_rewrites_the_refusal_of_some_score_positions_names_convert_exactly(positions):
    """The two rewrites the refusal above names compute the same function as the refused slices and convert:
    per-sample gradients equal to a per-datapoint autograd loop at 1e-10, and a sampled element of the inferred
    group keeps the model's function (float64). Checks that the remedy the message gives is true."""
    model = FirstQueries(REWRITTEN_POSITIONS[positions]).to(DTYPE)
    sliced = FirstQueries(SOME_POSITIONS[positions]).to(DTYPE)  # the same seed: the same weights
    inputs, targets = batch()
    torch.testing.assert_close(model(inputs), sliced(inputs), rtol=0, atol=1e-12)
    assert_matches_autograd_loop(model, inputs, targets[:, :2], loss)
    assert_group_keeps_function(model, inputs, targets[:, :2], loss)


CROSS = {
    "keys by queries, transposed": lambda self, q, k, v: (k[..., 1:, :] @ q[..., :1, :].transpose(-1, -2)).mT.softmax(
        -1) @ v[..., 1:, :],
    "queries by keys": lambda self, q, k, v: scores(q[..., :1, :], k[..., 1:, :]).softmax(-1) @ v[..., 1:, :],
    "as many keys as queries, transposed": lambda self, q, k, v: (k[..., 2:, :] @ q[..., :2, :].transpose(
        -1, -2)).mT.softmax(-1) @ v[..., 2:, :],
}


def test_scores_of_a_cross_attention_with_their_axes_swapped_are_refused_naming_the_rewrite():
    """``(k @ qᵀ).mT`` where one query attends over three other keys: the rows become the queries, which the scores
    do not follow. It was refused as a move "between datapoints" (the replay fails on the new shape, session 22's
    sweep); now in words that say what the op does and how to write it."""
    message = refusal_of_first_queries(CROSS["keys by queries, transposed"], width=1)
    assert re.match(WHERE + re.escape(
        "Tensor.mT (attribute): swaps the query and key axes of attention scores whose queries and keys differ in "
        "number ((k @ qᵀ).mT), which gradgraph does not follow: write the scores as q @ kᵀ, and its result "
        "reaches"), message), message


@pytest.mark.parametrize("form", ["queries by keys", "as many keys as queries, transposed"])
def test_a_cross_attention_as_the_refusal_writes_it_or_with_square_scores_converts_exactly(form):
    """The same attention as ``q @ kᵀ`` (the rewrite the refusal names: the same function), and a transposed cross
    attention of two queries over two other keys (square scores, whose swapped axes the rule follows as for
    self-attention): per-sample gradients equal to a per-datapoint loop at 1e-10, and a sampled element of the
    inferred group keeps the function (float64)."""
    model = FirstQueries(CROSS[form]).to(DTYPE)
    inputs, targets = batch()
    width = 1 if form == "queries by keys" else 2
    if form == "queries by keys":
        swapped = FirstQueries(CROSS["keys by queries, transposed"]).to(DTYPE)
        torch.testing.assert_close(model(inputs), swapped(inputs), rtol=0, atol=1e-12)
    assert_matches_autograd_loop(model, inputs, targets[:, :width], loss)
    assert_group_keeps_function(model, inputs, targets[:, :width], loss)


def with_positions(model):
    model.pos = nn.Embedding(T, D).to(DTYPE)


def position_heads(self, q, heads: int = HEADS):
    """A position embedding ``pos(arange(T))`` viewed as ``heads`` heads of every datapoint: neurons that do not
    depend on the input (no components until they join token values)."""
    p = self.pos(torch.arange(T))
    return p.view(T, heads, -1).transpose(0, 1).unsqueeze(0).expand(q.shape[0], -1, -1, -1)


POSITIONS_ALONE = {
    "sdpa over position values": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, position_heads(self, q)), {},
        "torch.nn.functional.scaled_dot_product_attention"),
    "matmul of weights and position values": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ position_heads(self, q), {}, "Tensor.matmul"),
    "sdpa of position queries": (
        lambda self, q, k, v: F.scaled_dot_product_attention(position_heads(self, q), k, v), {},
        "torch.nn.functional.scaled_dot_product_attention"),
    "grouped-query sdpa over position values": (
        lambda self, q, k, v: F.scaled_dot_product_attention(q, k, position_heads(self, q, 1), enable_gqa=True),
        {"kv_heads": 1}, "torch.nn.functional.scaled_dot_product_attention"),
}


@pytest.mark.parametrize("case", list(POSITIONS_ALONE))
def test_attention_over_a_position_embedding_alone_is_refused_by_name(case):
    """Values or queries that are a position embedding alone (``pos(arange(T))``, the same for every datapoint, not
    added to token values): refused, naming the op, as attention over values that do not depend on the input.
    Kills ``xǁAttentionRulesǁattention_output__mutmut_1`` (``and`` for ``or``: an ``AttributeError`` on the
    missing components), ``4`` to ``9`` (the refusal's op name and words) and
    ``xǁAttentionRulesǁrepeat_key_value_heads__mutmut_27`` (grouped-query values' missing components repeated:
    an ``AttributeError``)."""
    fn, kwargs, op = POSITIONS_ALONE[case]
    message = refusal_of(fn, with_positions, **kwargs)
    assert re.fullmatch(WHERE + re.escape(f"{op}: attention over values that do not depend on the input"),
                        message), message


STATISTICS = {
    "values a mean over their features": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ v.mean(-1, keepdim=True).expand_as(v), "Tensor.matmul"),
    "values ending in their mean": (
        lambda self, q, k, v: scores(q, k).softmax(-1) @ torch.cat([v[..., :-1], v.mean(-1, keepdim=True)], -1),
        "Tensor.matmul"),
    "queries ending in their mean": (
        lambda self, q, k, v: F.scaled_dot_product_attention(torch.cat([q[..., :-1], q.mean(-1, keepdim=True)], -1),
                                                             k, v),
        "torch.nn.functional.scaled_dot_product_attention"),
}


@pytest.mark.parametrize("case", list(STATISTICS))
def test_attention_over_a_statistic_of_the_features_is_refused_by_name(case):
    """Values or queries holding a mean over their features (a statistic, no neuron: id ``-1``): refused, naming the
    op, as queries, keys or values that are not neurons. Kills ``xǁAttentionRulesǁattention_output__mutmut_183``
    (the test dropped: refused later as heads that share neurons), ``186`` to ``191`` (the op name and words)."""
    fn, op = STATISTICS[case]
    message = refusal_of(fn)
    assert re.fullmatch(WHERE + re.escape(f"{op}: queries, keys or values that are not neurons"), message), message


class InputAsValues(nn.Module):
    """One head: queries and keys by ``Linear`` layers, the values the input itself (``[b, 1, T, d]``), or the
    input as queries, keys and values; then a ``Linear``."""

    def __init__(self, all_three: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.all_three = all_three
        if not all_three:
            self.q, self.k = nn.Linear(D, D), nn.Linear(D, D)
        self.out = nn.Linear(D, 2)

    def forward(self, x):
        h = x.unsqueeze(1)
        if self.all_three:
            y = F.scaled_dot_product_attention(h, h, h)
        else:
            y = F.scaled_dot_product_attention(self.q(x).unsqueeze(1), self.k(x).unsqueeze(1), h)
        return self.out(y.squeeze(1))


@pytest.mark.parametrize("all_three", [False, True], ids=["input as values", "input as queries, keys and values"])
def test_attention_that_reads_the_input_itself_converts_exactly(all_three):
    """SDPA whose values (or queries, keys and values) are the input itself, ``[b, T, d]`` given one head axis: the
    input's first feature is node 0, a neuron like any other. Exact against torch.func's per-sample gradients at
    1e-10, with one ``VALUE_ATTENTION`` edge from each input feature. Kills
    ``xǁAttentionRulesǁattention_output__mutmut_184``, ``185`` (``heads <= 0`` / ``< 1``: node 0 taken for no
    neuron, refused) and ``231`` (the output set's origin ``None``: an ``AttributeError``)."""
    model = InputAsValues(all_three).to(DTYPE)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (torch.randn(3, T, D, generator=generator, dtype=DTYPE),
                       torch.randn(3, T, 2, generator=generator, dtype=DTYPE))
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    attention = torch.nonzero(graph.node_kind == NodeKind.ATTENTION).reshape(-1).tolist()
    assert edges(graph, EdgeKind.VALUE_ATTENTION) == set(zip(range(D), attention))


class Wrapped(nn.Module):
    """The attention model as the submodule ``block``."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.block = Attention(fn)

    def forward(self, x):
        return self.block(x)


def set_origins(model) -> list[str]:
    from gradgraph.convert.layout import make_plan
    from gradgraph.convert.trace import trace_model

    inputs, _ = batch()
    return [origin for _, _, origin in make_plan(trace_model(model, inputs, model)).set_names]


def test_the_attention_output_set_is_named_by_its_module_or_its_op():
    """The attention output's neuron set is named by the module that computes it (``block``) and, at the model's
    root, by the op (read off the plan's ``set_names``, what a refusal names to the user). Kills
    ``xǁAttentionRulesǁattention_output__mutmut_238`` (``self.path() and name``: ``''`` at the root, the op's name
    inside ``block``) and ``231`` (``None``)."""
    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    root = set_origins(Attention(sdpa).to(DTYPE))
    assert root == ["input", "inp", "q", "kv", "torch.nn.functional.scaled_dot_product_attention", "out", "head"]
    assert set_origins(Wrapped(sdpa).to(DTYPE)) == ["input", "block.inp", "block.q", "block.kv", "block", "block.out",
                                                    "block.head"]


def test_heads_read_in_another_order_than_their_neurons_take_attention_nodes_in_the_order_they_are_read():
    """Twelve one-dimension heads, their queries, keys and values read in a shuffled order (``q[:, perm]``): the
    attention output's node of head position ``p`` is ``ATTENTION[p]`` (heads in the order they first appear,
    as the rule says), fed by the value node of head ``perm[p]``; exact against torch.func at 1e-10. Kills
    ``xǁAttentionRulesǁattention_output__mutmut_159`` (the ``first_seen`` fill ``3 d / H = 3`` for the row count:
    every head first seen after row 3 ties, and the ties come in the order of their neurons)."""
    perm = [5, 2, 9, 0, 11, 7, 1, 3, 10, 4, 8, 6]
    _, graph = convert(lambda self, q, k, v: F.scaled_dot_product_attention(q[:, perm], k[:, perm], v[:, perm]),
                       heads=12)
    kind = {k: torch.nonzero(graph.node_kind == k).reshape(-1).tolist()
            for k in (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION)}
    assert edges(graph, EdgeKind.VALUE_ATTENTION) == {(kind[NodeKind.VALUE][perm[p]], kind[NodeKind.ATTENTION][p])
                                                      for p in range(12)}
    assert edges(graph, EdgeKind.QUERY_KEY) == set(zip(kind[NodeKind.QUERY], kind[NodeKind.KEY]))
    assert edges(graph, EdgeKind.QUERY_ATTENTION) == {(kind[NodeKind.QUERY][perm[p]], kind[NodeKind.ATTENTION][p])
                                                      for p in range(12)}


def test_attention_weights_applied_to_attention_weights_are_refused_by_name():
    """``(p @ p) @ v`` with ``p`` the attention weights: the second operand of the first ``@`` is attention
    weights, not values; refused, naming the op. Kills ``xǁAttentionRulesǁattend__mutmut_3`` (``need_neurons``'
    op name ``None``: an ``AttributeError`` out of the trace)."""
    def attend(self, q, k, v):
        weights = scores(q, k).softmax(-1)
        return (weights @ weights) @ v

    message = refusal_of(attend)
    assert re.fullmatch(WHERE + "Tensor.matmul: attention scores used as neuron values", message), message


class ReadTwice(nn.Module):
    """The attention output read by ``out`` as it is and by ``out2`` through a tanh (or in the other order)."""

    def __init__(self, tanh_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tanh_first = tanh_first
        self.inp, self.q, self.kv = nn.Linear(5, D), nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.out, self.out2, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.q(h).view(b, t, HEADS, -1).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, HEADS, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        z = self.out2(torch.tanh(y)) + self.out(y) if self.tanh_first else self.out(y) + self.out2(torch.tanh(y))
        return self.head(h + z)


@pytest.mark.parametrize("tanh_first", [False, True])
def test_the_attention_output_read_as_it_is_and_through_a_tanh_converts_exactly(tanh_first):
    """Two versions of the attention output read by two ``Linear`` layers (``out(y)`` and ``out2(tanh(y))``): the
    output is version 0 of its set, the tanh version 1, so the second read takes a set of its own. Exact against
    torch.func at 1e-10. Kills ``xǁAttentionRulesǁattention_output__mutmut_315`` (the output given version 1: both
    reads hold version 1, one act for two values, and the conversion's own check refuses it, "the graph's gradient
    of 'out.weight' ... differs from autograd's")."""
    model = ReadTwice(tanh_first).to(DTYPE)
    inputs, targets = batch()
    assert_exact_per_sample_grads(model, inputs, targets, loss)


# ---- issue 31, branch mut44: ``_moves_datapoints`` after session 21's keyword fix (3f342a7). Run convert 30 numbers
# its mutants afresh: the keyword line adds 11 at the top, so run convert 29's 2, 3, 8 (killed by
# ``test_scores_moved_between_datapoints_with_the_input_given_by_keyword_are_refused``) are 13, 14, 19 now, and the
# flip by keyword no longer reaches their guard (its scores are replayed).


def test_scores_joined_with_a_constant_key_given_by_keyword_are_refused_naming_the_op():
    """``torch.cat(tensors=[scores, zeros], dim=-1)`` (a constant extra key, an attention sink, whose value is the
    first token's; the scores in a list given by keyword): the batch shape is kept, but the op cannot be replayed
    on the scores' datapoints (no positional argument, no ``input``), so it counts as moving scores and is refused,
    naming the op. Kills ``x__moves_datapoints__mutmut_13``, ``14`` (``and`` for an ``or`` of that guard: an
    ``IndexError`` out of the trace) and ``19`` (the guard's ``return False``: the joined scores keep the scores'
    meta, ``T`` keys for ``T + 1`` columns, and the model is refused later, at ``@``, as attention between
    datapoints); checked with ``MUTANT_UNDER_TEST``. The sink key is no key neuron, so the refusal is needed; only
    the op is matched, as the words ("moves attention scores between datapoints") do not fit a join. (Under ``19``
    the same join sliced back to the ``T`` keys before ``@ v`` converts exactly: the guard refuses that too.)"""

    def sink(self, q, k, v):
        joined = torch.cat(tensors=[scores(q, k), torch.zeros(*q.shape[:3], 1, dtype=q.dtype)], dim=-1)
        return joined.softmax(-1) @ torch.cat([v, v[:, :, :1]], -2)

    message = refusal_of(sink)
    assert re.match(WHERE + re.escape("torch.cat: "), message), message


# ---- issue 31, branch mut46: session 22's scores_op, _changes_positions and _swaps_unequal_axes (runs convert 33-)


def flat_heads(x):
    """``[b, H, n, d / H] -> [b * H, n, d / H]`` for any number ``n`` of positions (``merged`` takes ``T``)."""
    return x.reshape(-1, *x.shape[-2:])


def swapped_on_merged_heads(self, q, k, v):
    """``(k @ qᵀ).mT`` of one query over three other keys on ``[b * H, n, d / H]`` (three-axis scores)."""
    weights = (flat_heads(k[..., 1:, :]) @ flat_heads(q[..., :1, :]).transpose(-1, -2)).mT.softmax(-1)
    return (weights @ flat_heads(v[..., 1:, :])).view(q.shape[0], q.shape[1], 1, -1)


def test_three_axis_scores_of_a_cross_attention_with_their_axes_swapped_are_refused_naming_the_rewrite():
    """The swapped cross attention above on three-axis scores ``[b * H, Tk, Tq]`` (the heads on the batch axis):
    refused in the same words, naming the rewrite. Kills ``x__swaps_unequal_axes__mutmut_10`` (the output's
    ``shape[+2:]``: the same two axes for four-axis scores, one axis for three: the swap went unseen and was refused
    as a move "between datapoints", the words before session 22)."""
    message = refusal_of_first_queries(swapped_on_merged_heads, width=1)
    assert re.match(WHERE + re.escape(
        "Tensor.mT (attribute): swaps the query and key axes of attention scores whose queries and keys differ in "
        "number ((k @ qᵀ).mT), which gradgraph does not follow: write the scores as q @ kᵀ, and its result "
        "reaches"), message), message


def heads_rolled_on_merged_heads(self, q, k, v):
    """Scores ``[b * H, T, T]`` (the heads on the batch axis) indexed so that each datapoint's heads roll by one."""
    entries = torch.arange(q.shape[0] * q.shape[1]).view(q.shape[0], q.shape[1]).roll(1, 1).reshape(-1)
    weights = (merged(q) @ merged(k).transpose(-1, -2))[entries].softmax(-1)
    return (weights @ merged(v)).view(q.shape)


BETWEEN_HEADS = {
    "heads rolled": lambda self, q, k, v: scores(q, k).roll(1, 1).softmax(-1) @ v,
    "heads and queries transposed, as many of each": lambda self, q, k, v: scores(q, k).transpose(1, 2).softmax(
        -1) @ v,
    "heads and keys swapped by swapaxes, as many of each": lambda self, q, k, v: scores(q, k).swapaxes(1, -1).softmax(
        -1) @ v,
    "heads rolled by an index on merged heads": heads_rolled_on_merged_heads,
}


@pytest.mark.parametrize("move", list(BETWEEN_HEADS))
def test_scores_moved_between_heads_convert_exactly_with_the_heads_in_place(move):
    """Four heads of a datapoint whose scores move between them (rolled; the heads transposed with the queries or the
    keys, of which there are as many, ``T == H``; rolled by a tensor index on ``[b * H, T, T]``): a head attends
    with another head's scores. The first three converted exactly, and the full permutation group of the heads was
    claimed, which the move does not commute with: a sampled group element changed the model's function (by up to
    0.03), a false symmetry (found in issue 31, branch mut46, probing session 22's score moves; two heads, as
    ``WITHIN_A_DATAPOINT``'s swap, hide it: every permutation of two commutes with their swap; a tensor index, the
    last, pinned the heads already, as a constant that differs between them). Now the heads stay in place (the
    queries and keys pinned, as for a constant per head): per-sample gradients equal to torch.func's at 1e-10, and
    sampled elements of the inferred group keep the function and map the graph (float64)."""
    model = Attention(BETWEEN_HEADS[move], heads=4).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    for seed in range(4):
        assert_group_keeps_function(model, inputs, targets, loss, seed=seed)
    assert heads_pinned(graph)


@pytest.mark.parametrize("move", ["keys rolled", "queries flipped", "transposed by the attribute mT",
                                  "queries repeated by an index"])
def test_scores_moved_within_each_head_leave_the_heads_free(move):
    """Moves of scores among the queries or keys of each head (``WITHIN_A_DATAPOINT``'s) keep every score in its head:
    the heads are not pinned (their permutations keep the function: the checks of the test above on four heads)."""
    model = Attention(WITHIN_A_DATAPOINT[move], heads=4).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    assert not heads_pinned(graph)
    assert max(assert_group_keeps_function(model, inputs, targets, loss, seed=seed)[0] for seed in range(4)) > 0


@pytest.mark.parametrize("move", ["keys flipped", "queries rolled", "transposed by mT"])
def test_three_axis_scores_moved_within_each_head_leave_the_heads_free(move):
    """The same on scores ``[b * H, T, T]`` (four heads on the batch axis; ``merged_scores_moved``): each score's
    batch entry is read off the scores' own shape (``_entries_of_scores``: the axes before the last two), so the
    heads stay free. Kills ``x__entries_of_scores`` 5, 7 (``shape[:+2]`` for ``shape[:-2]``: the same axes for four,
    not for three axes, and the replay fails)."""
    fn = merged_scores_moved({"keys flipped": lambda s: s.flip(-1), "queries rolled": lambda s: s.roll(1, -2),
                              "transposed by mT": lambda s: s.mT}[move])
    model = Attention(fn, heads=4).to(DTYPE)
    inputs, targets = batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss)
    assert not heads_pinned(graph)
    assert max(assert_group_keeps_function(model, inputs, targets, loss, seed=seed)[0] for seed in range(4)) > 0


def test_scores_joined_alone_with_the_parts_by_keyword_are_refused_as_moved():
    """``torch.cat(tensors=[scores], dim=0)``: a shape op with no positional argument and no ``input``, which the
    replay cannot read; counted as moving the scores between datapoints, refused by name (stricter than needed:
    the join of one tensor is the tensor). Kills ``x__scores_first`` 1, 5 (``kwargs["input"]`` read where there is
    none: a ``KeyError`` out of the trace) and ``x__moves_datapoints``' mutants of its guard that skip it
    (``and`` for an ``or``, ``return False``: an ``IndexError`` out of the trace)."""
    message = refusal_of(lambda self, q, k, v: torch.cat(tensors=[scores(q, k)], dim=0).softmax(-1) @ v)
    assert re.match(WHERE + re.escape("torch.cat: moves attention scores between datapoints (one datapoint's "
                                      "attention would read another's scores), and its result reaches"),
                    message), message


# ---- issue 31, branch mut51: the attention edges' parameter (run convert 60)


def test_the_edges_of_attention_heads_carry_edge_param_minus_one():
    """``graph.py``: ``edge_param`` is "-1 if the edge is structural", a field a user reads. The QUERY_KEY,
    VALUE_ATTENTION and QUERY_ATTENTION edges of a four-head attention carry ``-1``, every other edge a valid
    parameter index. Kills ``xǁAttentionRulesǁattention_output__mutmut_259``, ``262``, ``267`` (each kind written
    with parameter ``-2``, listed equivalent as 261, 264, 269 before 320f2cf renumbered the function: "every reader
    asks ``>= 0``"; run elementwise 29 killed their kind elsewhere; run convert 61 confirms); exact against
    torch.func."""
    _, graph = convert(lambda self, q, k, v: (scores(q, k) / 2.0).softmax(-1) @ v, heads=4)
    for kind in (EdgeKind.QUERY_KEY, EdgeKind.VALUE_ATTENTION, EdgeKind.QUERY_ATTENTION):
        structural = graph.edge_kind == int(kind)
        assert int(structural.sum()) > 0, kind
        assert set(graph.edge_param[structural].tolist()) == {-1}, kind
    valid = (graph.edge_param == -1) | ((graph.edge_param >= 0) & (graph.edge_param < len(graph.param_names)))
    assert bool(valid.all())
