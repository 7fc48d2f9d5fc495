"""The layout of ``convert/layout.py`` (``make_plan``: the nodes, edges, labels and symmetry group a trace
proves), checked against layouts written out by hand: what run layout 1 (docs/mutation.md, group
``convert-layout``) found unchecked.

Every conversion is float64 against torch.func's per-sample gradients (1e-10; a folded ``nn.RNN``, whose fused op
torch.func cannot run, against a per-datapoint autograd loop) and, where the group moves
something, a sampled element of it must keep the function and map the graph to the permuted model's graph.
The layouts are written out node by node and edge by edge from the model's code (``runs``, ``dense``), not
read back from a conversion. Each test names the mutants it kills (``mutmut show NAME`` in
``.mutation/convert-layout/``, ``make_plan 12`` standing for ``gradgraph.convert.layout.x_make_plan__mutmut_12``),
each checked with ``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

import gradgraph
from gradgraph.graph import ActivationKind as A
from gradgraph.graph import EdgeKind as E
from gradgraph.graph import NodeKind as K

DTYPE = torch.float64
STRUCTURE = ("node_kind", "layer", "activation", "perm_group", "perm_block", "perm_tie", "position", "node_param",
             "node_param_pos", "edge_index", "edge_kind", "edge_param", "edge_param_pos")


def squared(output, _targets):
    return output.pow(2).flatten(1).sum(1)


def runs(*pairs):
    """``runs((a, 2), (b, 3)) == [a, a, b, b, b]`` (an enum member as its integer)."""
    return [int(value) for value, count in pairs for _ in range(count)]


def dense(sources, targets):
    """The edges of one weight ``[len(targets), len(sources)]``, row-major: ``(sources, targets)``."""
    return [s for _ in targets for s in sources], [t for t in targets for _ in sources]


def edges(*groups):
    """``edge_index`` of edge groups in order, each ``(sources, targets)``."""
    return [sum((list(group[0]) for group in groups), []), sum((list(group[1]) for group in groups), [])]


def converted(model, inputs, seeds=range(3)):
    """The graph (exact against torch.func) and the most nodes a sampled group element moved (each sample
    keeps the function and maps the graph); every structure tensor is ``long``."""
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, None, squared)
    for name in STRUCTURE:
        assert getattr(graph, name).dtype == torch.long, name
    moved = max(assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in seeds)
    return graph, moved


def assert_layout(graph, **expected):
    for name, value in expected.items():
        assert getattr(graph, name).tolist() == value, name


# ----------------------------------------------------------------------- a residual MLP
class Residual(nn.Module):
    """``h = tanh(a(x))`` (3 neurons), then ``o(h + b(h))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(h + self.b(h))


def test_a_residual_mlp_is_laid_out_edge_by_edge():
    """Nodes: input 0-1, ``a`` 2-4, ``b`` 5-7 (holding the sum: ``b``'s fresh output absorbs it), ``o`` 8-9.
    The add ties ``h`` to ``b``'s set with RESIDUAL edges ``h -> b`` that have no parameter (``-1`` for the
    parameter and for its entry), so both sets are RESIDUAL (not plain hidden sets: ``b``'s is absorbed) and
    permute together; the bias of every affine set is its node parameter (entry by entry), ``-1`` elsewhere.
    Kills make_plan 31, 32 (a structural edge's entry), 90, 91 (a node without bias),
    268 (an absorbed affine set read as plain), 277, 278 (an absorbed affine set keeps its own kind)."""
    torch.manual_seed(0)
    graph, moved = converted(Residual().to(DTYPE), torch.randn(4, 2, dtype=DTYPE))
    assert moved > 0
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 2), (K.RESIDUAL, 6), (K.OUTPUT, 2)),
        layer=runs((0, 2), (1, 3), (2, 3), (3, 2)),
        activation=runs((A.IDENTITY, 2), (A.TANH, 3), (A.IDENTITY, 5)),
        perm_group=runs((-1, 2), (0, 6), (-1, 2)),
        perm_block=runs((-1, 2), (0, 6), (-1, 2)),
        perm_tie=runs((-1, 2), (0, 6), (-1, 2)),
        position=[0, 1, 0, 1, 2, 0, 1, 2, 0, 1],
        node_param=runs((-1, 2), (1, 3), (3, 3), (5, 2)),
        node_param_pos=[-1, -1, 0, 1, 2, 0, 1, 2, 0, 1],
        edge_index=edges(dense([0, 1], [2, 3, 4]), dense([2, 3, 4], [5, 6, 7]), ([2, 3, 4], [5, 6, 7]),
                         dense([5, 6, 7], [8, 9])),
        edge_kind=runs((E.LINEAR, 15), (E.RESIDUAL, 3), (E.LINEAR, 6)),
        edge_param=runs((0, 6), (2, 9), (-1, 3), (4, 6)),
        edge_param_pos=list(range(6)) + list(range(9)) + [-1] * 3 + list(range(6)),
    )


# ----------------------------------------------------------------------- a transformer block
class Block(nn.Module):
    """``x [b, t, 4]``; ``x + out(attention)`` over 2 heads of 2 dims (separate ``q``, ``k``, ``v`` maps),
    then ``+ ff2(relu(ff1(.)))`` with 3 hidden neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(4, 3), nn.Linear(3, 4)

    def forward(self, x):
        b, t, d = x.shape

        def heads(z):
            return z.view(b, t, 2, 2).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(torch.relu(self.ff1(x)))


def test_a_transformer_block_is_laid_out_as_the_stock_attention_layout():
    """Nodes: input 0-3, query 4-7, key 8-11, value 12-15, merged heads 16-19, ``out`` 20-23 (holding
    ``x + out``: tied to the input, so fixed), ``ff1`` 24-26 (FFN_HIDDEN: a plain hidden set in a model with
    attention), ``ff2`` 27-30 (the output). The heads are the blocks of one group (head ``h``'s query, key,
    value and merged dims: block ``h``; query with key tie 0, value with merged tie 1; position ``2 h + i``),
    the FFN hidden neurons another; every other node is fixed (``-1`` for group, block and tie). Affine edges
    are named by what they feed (QUERY, KEY, VALUE, FFN_IN) or read (ATTENTION_OUT from the merged heads,
    FFN_OUT from the FFN hidden neurons); each head adds query-key pairs, value -> merged dims and every query
    dim -> every merged dim. Kills make_plan 201, 202 (FFN_HIDDEN without attention), 272, 284 (no renaming),
    292 (ATTENTION_OUT read off the target), 299 (every other edge renamed), 214, 216 (``node_kind`` not
    ``long``), 318, 319, 327 (a fixed node's block or tie), _assign_heads 27, 30 (the ties' ids), 32 (the
    positions within a head)."""
    torch.manual_seed(1)
    graph, moved = converted(Block().to(DTYPE), torch.randn(2, 3, 4, dtype=DTYPE))
    assert moved > 0
    x, q, k, v, o, out, ff1, ff2 = ([*range(start, start + size)] for start, size in
                                     ((0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4), (24, 3), (27, 4)))
    per_head = []
    for head in range(2):
        dims = slice(2 * head, 2 * head + 2)
        per_head += [(q[dims], k[dims]), (v[dims], o[dims]),  # every query dim -> every merged dim, query-major
                     ([i for i in q[dims] for _ in range(2)], o[dims] * 2)]
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 4), (K.QUERY, 4), (K.KEY, 4), (K.VALUE, 4), (K.ATTENTION, 4), (K.RESIDUAL, 4),
                       (K.FFN_HIDDEN, 3), (K.OUTPUT, 4)),
        layer=runs((0, 4), (1, 12), (2, 4), (3, 4), (4, 3), (5, 4)),
        activation=runs((A.IDENTITY, 24), (A.RELU, 3), (A.IDENTITY, 4)),
        perm_group=runs((-1, 4), (0, 16), (-1, 4), (1, 3), (-1, 4)),
        perm_block=runs((-1, 4), *[(0, 2), (1, 2)] * 4, (-1, 4), (0, 3), (-1, 4)),
        perm_tie=runs((-1, 4), (0, 8), (1, 8), (-1, 4), (0, 3), (-1, 4)),
        position=[0, 1, 2, 3] * 6 + [0, 1, 2, 0, 1, 2, 3],
        node_param=runs((-1, 4), (1, 4), (3, 4), (5, 4), (-1, 4), (7, 4), (9, 3), (11, 4)),
        edge_index=edges(dense(x, q), dense(x, k), dense(x, v), *per_head, dense(o, out), (x, out), dense(out, ff1),
                         dense(ff1, ff2), (out, ff2)),
        edge_kind=runs((E.QUERY, 16), (E.KEY, 16), (E.VALUE, 16),
                       *[(E.QUERY_KEY, 2), (E.VALUE_ATTENTION, 2), (E.QUERY_ATTENTION, 4)] * 2,
                       (E.ATTENTION_OUT, 16), (E.RESIDUAL, 4), (E.FFN_IN, 12), (E.FFN_OUT, 12), (E.RESIDUAL, 4)),
        edge_param=runs((0, 16), (2, 16), (4, 16), (-1, 16), (6, 16), (-1, 4), (8, 12), (10, 12), (-1, 4)),
    )


# ----------------------------------------------------------------------- what a set is labelled
class Gated(nn.Module):
    """``o(silu(w1(x)) * w3(x))``: a gated unit of 2 (the product absorbed into ``w3``'s fresh output)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.o = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.o(F.silu(self.w1(x)) * self.w3(x))


def test_a_gated_unit_is_two_ffn_hidden_sets_tied_by_its_gate():
    """Nodes: input 0-2, ``w1`` 3-4, ``w3`` 5-6 (holding the product), ``o`` 7-8. Both factors are affine
    outputs of a gate (``w3``'s absorbed the product, but a gate keeps it a hidden set): FFN_HIDDEN, as a
    class of two sets, though the model has no attention; their edges FFN_IN / FFN_OUT, the product's
    GATE edges ``w1 -> w3``. Kills make_plan 237, 243, 244, 259, 265, 266, 267 (the gate not read), 270, 274
    (HIDDEN for a class of two)."""
    torch.manual_seed(2)
    graph, moved = converted(Gated().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved > 0
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 3), (K.FFN_HIDDEN, 4), (K.OUTPUT, 2)),
        layer=runs((0, 3), (1, 4), (2, 2)),
        activation=runs((A.IDENTITY, 3), (A.SILU, 2), (A.IDENTITY, 4)),
        perm_group=runs((-1, 3), (0, 4), (-1, 2)),
        position=[0, 1, 2, 0, 1, 0, 1, 0, 1],
        edge_index=edges(dense([0, 1, 2], [3, 4]), dense([0, 1, 2], [5, 6]), ([3, 4], [5, 6]), dense([5, 6], [7, 8])),
        edge_kind=runs((E.FFN_IN, 12), (E.GATE, 2), (E.FFN_OUT, 4)),
    )


class InputOut(nn.Module):
    """Two outputs: ``a(x)`` and ``tanh(x)``, the input's own neurons (the loss reads both)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x), torch.tanh(x)


def product(output, _targets):
    return (output[0] * output[1]).sum(1) + output[0].pow(2).sum(1)


def test_an_input_that_the_output_reads_stays_an_input():
    """The input set is read by the output (``tanh(x)`` is one of the outputs) yet stays INPUT (with its
    ``tanh``); only ``a``'s nodes are OUTPUT. Kills make_plan 226, 227."""
    torch.manual_seed(3)
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(InputOut().to(DTYPE), torch.randn(5, 2, dtype=DTYPE), None, product)
    assert_layout(graph, node_kind=runs((K.INPUT, 2), (K.OUTPUT, 2)), activation=runs((A.TANH, 2), (A.IDENTITY, 2)),
                  perm_group=[-1] * 4, edge_kind=runs((E.LINEAR, 4)))


class BiasFirst(nn.Module):
    """``o(tanh(addmm(c, x, v)))`` with ``c`` the first parameter the trace meets: parameter 0 is a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.v, self.o = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3, 4)), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(torch.tanh(torch.addmm(self.c, x, self.v)))


def test_a_bias_that_is_the_first_parameter_is_the_nodes_parameter():
    """``c`` is parameter 0 (the trace meets it first); its per-sample gradient comes from the hidden
    nodes' bias slots (node parameter 0, entries 0-3). Kills make_plan 107, 108."""
    torch.manual_seed(4)
    graph, moved = converted(BiasFirst().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, node_param=runs((-1, 3), (0, 4), (3, 2)), node_param_pos=[-1] * 3 + [0, 1, 2, 3, 0, 1],
                  edge_param=runs((1, 12), (2, 8)))


class NormTwice(nn.Module):
    """``o(tanh(tanh(layer_norm(tanh(a(x))))))``: a norm's set under two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.o(torch.tanh(torch.tanh(F.layer_norm(torch.tanh(self.a(x)), (3,)))))


def test_a_norm_under_two_activations_is_labelled_other():
    """The norm's nodes 6-8 carry ``tanh`` and a second op after it: OTHER (``a``'s one ``tanh`` stays
    TANH). Kills make_plan 118, 124, 125, 127."""
    torch.manual_seed(5)
    graph, moved = converted(NormTwice().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, node_kind=runs((K.INPUT, 3), (K.RESIDUAL, 3), (K.NORM, 3), (K.OUTPUT, 2)),
                  activation=runs((A.IDENTITY, 3), (A.TANH, 3), (A.OTHER, 3), (A.IDENTITY, 2)))


# ----------------------------------------------------------------------- heads of one dim, one head
class Attention(nn.Module):
    """``out(attention(q(x), k(x), v(x)))`` over ``x [b, t, 2]`` in ``heads`` heads (1: one head of 2 dims,
    2: two heads of one dim)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(2, 2) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("heads", [1, 2], ids=["one head of 2", "two heads of 1"])
def test_one_head_and_heads_of_one_dim_are_blocks(heads):
    """Query 2-3, key 4-5, value 6-7, merged 8-9: one group; a head is a block (one head: block 0 for all;
    two heads of one dim: blocks 0, 1 in each set). The layout reads each head's first query dim and a
    block's first head only where they exist. Kills make_plan 186, 188, 192, 200 (a head's second dim),
    190 (a block's second head), _assign_heads 5 (the second head), 7 (the second dim)."""
    torch.manual_seed(6)
    graph, moved = converted(Attention(heads).to(DTYPE), torch.randn(3, 3, 2, dtype=DTYPE))
    assert moved > 0
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 2), (K.QUERY, 2), (K.KEY, 2), (K.VALUE, 2), (K.ATTENTION, 2), (K.OUTPUT, 2)),
        perm_group=runs((-1, 2), (0, 8), (-1, 2)),
        perm_block=[-1, -1] + ([0, 0] if heads == 1 else [0, 1]) * 4 + [-1, -1],
        perm_tie=runs((-1, 2), (0, 4), (1, 4), (-1, 2)),
        position=[0, 1] * 6,
    )


# ----------------------------------------------------------------------- cuts carried over ties
class GroupNormChain(nn.Module):
    """``h = a(x)``, ``s1 = h + f(tanh h)``, ``s2 = s1 + g(tanh s1)`` (4 neurons each, every sum absorbed
    into the fresh affine output), ``n = group_norm(s2, 2)``, then ``o(tanh(n + c(tanh n)))`` or, without
    ``tail``, ``o(tanh(n))``."""

    def __init__(self, tail: bool = True) -> None:
        super().__init__()
        self.tail = tail
        self.a, self.f, self.g, self.o = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        if tail:
            self.c = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        s1 = h + self.f(torch.tanh(h))
        s2 = s1 + self.g(torch.tanh(s1))
        n = F.group_norm(s2, 2)
        return self.o(torch.tanh(n + self.c(torch.tanh(n)) if self.tail else n))


@pytest.mark.parametrize("tail", [True, False], ids=["n + c(n)", "n alone"])
def test_a_group_norms_cuts_are_carried_along_the_ties(tail):
    """The norm's 2 groups of 2 channels cut ``s2`` (11-14) and the norm (15-18) at their middle; the
    residual ties carry the cut to ``s1`` (7-10, one hop), to ``h`` (3-6, two hops) and, with ``tail``, from
    the norm to ``c``'s set (19-22, the sum ``n + c``: a tie whose first end is the cut one): each half of the
    tied sets is a group of its own (the channels move only within their group). Without the walk the tie of
    a whole set to a halved one fixes them all. Kills _tied_cuts 3, 19 (no walk), 10, 15 (one direction of
    the ties only), 27 (one hop only), and without ``tail`` 22, 24 (a cut with no partner: the norm's end,
    the output's first node)."""
    torch.manual_seed(7)
    graph, moved = converted(GroupNormChain(tail).to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved > 0
    tied = 5 if tail else 4
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 3), (K.RESIDUAL, 12), (K.NORM, 4), (K.RESIDUAL, 4 * (tied - 4)), (K.OUTPUT, 3)),
        perm_group=[-1] * 3 + [0, 0, 1, 1] * tied + [-1] * 3,
        perm_block=[-1] * 3 + [0] * 4 * tied + [-1] * 3,
        position=[0, 1, 2] + [0, 1] * 2 * tied + [0, 1, 2],
    )


# ----------------------------------------------------------------------- depths
class FusedAttention(nn.Module):
    """nanoGPT's attention (one fused ``c_attn`` split into query, key and value; 2 heads of 2) over
    ``x [b, t, 4]``, then ``c_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, 2, 2).transpose(1, 2) for z in self.c_attn(x).split(4, dim=2))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


def test_a_fused_query_key_value_output_is_one_step_deep():
    """``c_attn``'s one edge group ends in three pieces (query 4-7, key 8-11, value 12-15): all three are
    one step after the input (the key too, though only query-key pairs, which add no depth, lead on from
    it); merged heads 2, ``c_proj`` 3. Kills _depths 13, 18 (a group read by its first ends only)."""
    torch.manual_seed(8)
    graph, moved = converted(FusedAttention().to(DTYPE), torch.randn(2, 3, 4, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, node_kind=runs((K.INPUT, 4), (K.QUERY, 4), (K.KEY, 4), (K.VALUE, 4), (K.ATTENTION, 4),
                                        (K.OUTPUT, 4)),
                  layer=runs((0, 4), (1, 12), (2, 4), (3, 4)))


class Concatenated(nn.Module):
    """``h1 = tanh(a(x))``, ``h2 = tanh(b(h1))``, ``o(cat([h1, h2]))``: ``o`` reads two sets of depth 1 and 2
    in one edge group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(4, 2)

    def forward(self, x):
        h1 = torch.tanh(self.a(x))
        h2 = torch.tanh(self.b(h1))
        return self.o(torch.cat([h1, h2], -1))


def test_a_map_of_a_concatenation_is_one_step_after_its_deepest_part():
    """Nodes: input 0-2, ``h1`` 3-4 (depth 1), ``h2`` 5-6 (2), ``o`` 7-8: one step after the deeper part (3),
    though ``o``'s one edge group starts in the shallower one; each part permutes by itself. Kills _depths 15
    (a group read by its first ends only)."""
    torch.manual_seed(9)
    graph, moved = converted(Concatenated().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, layer=runs((0, 3), (1, 2), (2, 2), (3, 2)), perm_group=runs((-1, 3), (0, 2), (1, 2), (-1, 2)))


# ----------------------------------------------------------------------- shared parameters
class SharedFirst(nn.Module):
    """``o(tanh(F.linear(tanh(F.linear(x, w)), w)))``: one square weight ``w``, parameter 0, at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.o = nn.Parameter(torch.randn(3, 3) / 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.o(torch.tanh(F.linear(torch.tanh(F.linear(x, self.w)), self.w)))


def test_a_weight_used_twice_from_the_input_is_fixed():
    """``w``'s columns meet the input at the first site and ``h1`` (3-5) at the second, its rows ``h1`` and
    ``h2`` (6-8): one permutation must move all three, and the input is fixed, so nothing moves (a group on
    ``h1`` alone changes the function). Kills _shared_parameter_ties 2, 3 (parameter 0's sites not read)."""
    torch.manual_seed(10)
    graph, moved = converted(SharedFirst().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert moved == 0
    assert_layout(graph, node_kind=runs((K.INPUT, 3), (K.RESIDUAL, 6), (K.OUTPUT, 2)), perm_group=[-1] * 11)


class SharedMiddle(nn.Module):
    """``h = tanh(a(x))``, then one square layer ``L`` twice, ``o(tanh(L(tanh(L(h)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.L, self.o = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.L(torch.tanh(self.L(torch.tanh(self.a(x)))))))


def test_a_layer_used_twice_moves_what_it_reads_and_writes_together():
    """``L``'s columns meet ``h`` (2-4) and ``L``'s first output (5-7), its rows (and bias) both outputs
    (5-7, 8-10): one group of three tied sets, FFN_HIDDEN (a class of affine sets), position by position."""
    torch.manual_seed(11)
    graph, moved = converted(SharedMiddle().to(DTYPE), torch.randn(5, 2, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, node_kind=runs((K.INPUT, 2), (K.FFN_HIDDEN, 9), (K.OUTPUT, 2)),
                  perm_group=runs((-1, 2), (0, 9), (-1, 2)), position=[0, 1] + [0, 1, 2] * 3 + [0, 1])


class SharedBias(nn.Module):
    """``h1 = tanh(addmm(c, x, v))``, ``h2 = tanh(addmm(c, h1, u))``, ``o(h2)``: one bias ``c`` (parameter 0,
    the first the trace meets) at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.v = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 3))
        self.u, self.o = nn.Parameter(torch.randn(3, 3) / 2), nn.Linear(3, 2)

    def forward(self, x):
        h1 = torch.tanh(torch.addmm(self.c, x, self.v))
        return self.o(torch.tanh(torch.addmm(self.c, h1, self.u)))


def test_a_bias_used_twice_ties_its_two_sets():
    """``c`` is the bias of ``h1`` (2-4) and ``h2`` (5-7): one permutation moves both (the bias's entry ``i``
    is neuron ``i`` of each), so they are one group of FFN_HIDDEN sets. Kills _shared_parameter_ties 9, 10
    (parameter 0's bias sites not read), 12 (the bias's nodes read backwards: nothing tied, fixed)."""
    torch.manual_seed(12)
    graph, moved = converted(SharedBias().to(DTYPE), torch.randn(5, 2, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, node_kind=runs((K.INPUT, 2), (K.FFN_HIDDEN, 6), (K.OUTPUT, 2)),
                  perm_group=runs((-1, 2), (0, 6), (-1, 2)), position=[0, 1] + [0, 1, 2] * 2 + [0, 1])


class GroupedConv(nn.Module):
    """``a`` (1 -> 4 channels), a grouped 1x1 convolution ``c`` (2 groups of 2 channels), the mean over
    positions, ``o``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.o = nn.Conv1d(1, 4, 1), nn.Conv1d(4, 4, 1, groups=2), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.c(torch.tanh(self.a(x)))).mean(-1))


def test_a_grouped_convolution_shares_no_entry_between_its_groups():
    """Nodes: input 0, ``a``'s channels 1-4, their copies read by ``c`` 5-8, ``c``'s channels 9-12, their
    means 13-16, ``o`` 17-18. ``c``'s weight is read at one site per group, slices that share no entry: they
    tie nothing (kills _shared_parameter_ties 58: sites that share no entry read as shared, pinned); each
    group's channels permute within it (``a``'s with their copies, tie 0; ``c``'s with their means, tie 1),
    and the two groups are the blocks of one permutation group: whole groups move together."""
    torch.manual_seed(13)
    graph, moved = converted(GroupedConv().to(DTYPE), torch.randn(4, 1, 5, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph, layer=runs((0, 1), (1, 4), (2, 4), (3, 4), (4, 4), (5, 2)),
                  perm_group=[-1] + [0] * 16 + [-1, -1],
                  perm_block=[-1] + [0, 0, 1, 1] * 4 + [-1, -1],
                  perm_tie=[-1] + [0] * 8 + [1] * 8 + [-1, -1])


class SharedConv(nn.Module):
    """``a`` (1 -> 3 channels), then one convolution ``c`` (3 -> 3, kernel 2 or 1) twice, the mean, ``o``."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.a, self.o = nn.Conv1d(1, 3, 1), nn.Linear(3, 2)
        self.c = nn.Conv1d(3, 3, kernel, padding=kernel - 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(torch.tanh(self.c(torch.tanh(self.c(h)))).mean(-1))


@pytest.mark.parametrize("kernel", [2, 1])
def test_a_convolution_used_twice_is_pinned(kernel):
    """``c``'s 3-D weight at two sites: the weight's "row" and "column" are read off its last axis (the
    kernel's), so an output channel meets several rows, and an input channel one column only where the kernel
    has one tap: no site passes both tests of either end, so both are pinned (``_shared_parameter_ties``: "a
    site where neither end is a function of the row is pinned") and nothing moves. Kills
    _shared_parameter_ties 65, 75 (one test of an end enough: 65 with either kernel, 75 with kernel 1), 29
    (the column count read off the input-channel axis), 85, 87 (the pinned sets not read), 86 (none pinned:
    a group that changes the function)."""
    torch.manual_seed(14)
    graph, moved = converted(SharedConv(kernel).to(DTYPE), torch.randn(4, 1, 5, dtype=DTYPE))
    assert moved == 0
    assert_layout(graph, perm_group=[-1] * graph.num_nodes)


# ----------------------------------------------------------------------- a folded loop
class FoldedRNN(nn.Module):
    """``nn.RNN(3, 2)`` over ``[b, T, 3]`` (folded over time, the default), read at its last step by ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.RNN(3, 2, batch_first=True), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def exact_by_loop(model, inputs, clear=True):
    """The graph, its per-sample gradients equal to a per-datapoint autograd loop's (1e-10); ``clear``: the
    structure cache cleared first (a trace)."""
    if clear:
        gradgraph.convert.clear_structure_cache()
    graph = gradgraph.to_graph(model, inputs, None, squared)
    per_sample = graph.per_sample_grads()
    for index in range(inputs.shape[0]):
        model.zero_grad()
        squared(model(inputs[index:index + 1]), None).sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(per_sample[name][index], param.grad, atol=1e-10, rtol=0, msg=name)
    return graph


def test_a_folded_loops_previous_state_is_as_deep_as_its_initial_state():
    """Nodes: input 0-2, ``W_ih x + b_ih`` 3-4, the previous-state copy ``P`` 5-6, the state 7-8 (``W_hh P``,
    holding the sum), ``head`` 9-10. The state's MERGE edges into ``P`` close the loop over time and add no
    depth: ``P`` is 0 (a constant initial state), the state 2, the head 3; input map, copy and state are one
    group. Exact against a per-datapoint autograd loop (torch.func cannot run the fused op). Kills _depths
    48-61 (the closing edges kept, dropped by the wrong test, or all edges dropped but them), make_plan 417,
    421 (no previous-state copies: a cycle), _back_pieces 2, 3, 4 (the wrong pieces)."""
    torch.manual_seed(15)
    graph = exact_by_loop(FoldedRNN().to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE))
    assert_layout(
        graph,
        node_kind=runs((K.INPUT, 3), (K.RESIDUAL, 6), (K.OUTPUT, 2)),
        layer=runs((0, 3), (1, 2), (0, 2), (2, 2), (3, 2)),
        perm_group=runs((-1, 3), (0, 6), (-1, 2)),
        position=[0, 1, 2] + [0, 1] * 4,
        edge_index=edges(dense([0, 1, 2], [3, 4]), dense([5, 6], [7, 8]), ([3, 4], [7, 8]), ([7, 8], [5, 6]),
                         dense([7, 8], [9, 10])),
        edge_kind=runs((E.LINEAR, 10), (E.RESIDUAL, 2), (E.MERGE, 2), (E.LINEAR, 4)),
        edge_param=runs((0, 6), (2, 4), (-1, 4), (4, 4)),
    )


# ----------------------------------------------------------------------- what messages name
def test_a_non_finite_input_is_named_by_its_neuron_set():
    """An infinite input feature: the refusal names the input's neurons (``set_names``: each set's first
    node, size and origin) and the count. Kills make_plan 470 (no set names: a ``TypeError``)."""
    inputs = torch.randn(4, 2, dtype=DTYPE)
    inputs[0, 1] = float("inf")
    gradgraph.convert.clear_structure_cache()
    message = ("activation of the input neurons has 1 non-finite value(s) (shape [2, 4]); check the inputs, the "
               "loss and the model's weights")
    with pytest.raises(gradgraph.NonFiniteFactorError, match="^" + re.escape(message) + "$"):
        gradgraph.to_graph(Residual().to(DTYPE), inputs, None, squared)


class SumIntoEarlier(nn.Module):
    """``u = b(x_T)`` first, then a folded ``nn.RNN(3, 2)``'s last state ``h``, ``o(u + tanh(h))``: the sum is
    absorbed into ``u``, a set made before the loop's, so its RESIDUAL edges run from a later set into an
    earlier one in a model that has previous-state copies."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.rnn, self.o = nn.Linear(3, 2), nn.RNN(3, 2, batch_first=True), nn.Linear(2, 2)

    def forward(self, x):
        u = self.b(x[:, -1])
        return self.o(u + torch.tanh(self.rnn(x)[0][:, -1]))


def test_a_sum_absorbed_into_an_earlier_set_is_one_step_after_the_later():
    """``u`` is one step after the loop's state, though made before it: only the edges into a previous-state
    copy from a later set close a loop and are dropped, not every edge into an earlier set. Kills _depths 49."""
    torch.manual_seed(16)
    model = SumIntoEarlier().to(DTYPE)
    graph = exact_by_loop(model, torch.randn(3, 4, 3, dtype=DTYPE))
    # input 0-2, u 3-4 (holding the sum), the loop's input map 5-6, its previous-state copy 7-8, its state 9-10, o
    assert_layout(graph, layer=runs((0, 3), (3, 2), (1, 2), (0, 2), (2, 2), (4, 2)),
                  edge_index=edges(dense([0, 1, 2], [3, 4]), dense([0, 1, 2], [5, 6]), dense([7, 8], [9, 10]),
                                   ([5, 6], [9, 10]), ([9, 10], [7, 8]), ([9, 10], [3, 4]), dense([3, 4], [11, 12])))


def test_a_folded_loops_plan_is_replayed_folded(monkeypatch):
    """The plan keeps ``fold_time``: a second call on other inputs replays the plan with the loop run folded
    (as the trace ran it), exactly, and traces nothing; replayed unrolled, the ops would differ from the
    plan's and every call would trace again. Kills make_plan 458, 473 (``fold_time`` dropped)."""
    traced = gradgraph.convert.traced
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    original = traced.trace_model
    monkeypatch.setattr(traced, "trace_model", counted)
    torch.manual_seed(17)
    model = FoldedRNN().to(DTYPE)
    first = exact_by_loop(model, torch.randn(3, 4, 3, dtype=DTYPE))
    for seed in range(2):
        torch.manual_seed(seed)
        graph = exact_by_loop(model, torch.randn(3, 4, 3, dtype=DTYPE), clear=False)
        assert graph.num_nodes == first.num_nodes == 11
    assert len(traces) == 1


class ParallelConv(nn.Module):
    """One convolution ``c`` (3 -> 3, kernel 2) on two branches ``tanh(a1(x))``, ``tanh(a2(x))``; the means of
    both, concatenated, into ``o``."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Conv1d(1, 3, 1), nn.Conv1d(1, 3, 1)
        self.c, self.o = nn.Conv1d(3, 3, 2, padding=1), nn.Linear(6, 2)

    def forward(self, x):
        means = [torch.tanh(self.c(torch.tanh(a(x)))).mean(-1) for a in (self.a1, self.a2)]
        return self.o(torch.cat(means, -1))


def test_every_pinned_site_of_a_shared_convolution_is_pinned():
    """``c``'s two sites read two branches that share no set: each site pins its own (the second's too), so
    nothing moves. Kills _shared_parameter_ties 88 (the sites after a pinned one skipped)."""
    torch.manual_seed(18)
    graph, moved = converted(ParallelConv().to(DTYPE), torch.randn(4, 1, 5, dtype=DTYPE))
    assert moved == 0
    assert_layout(graph, perm_group=[-1] * graph.num_nodes)


class SlicedWeight(nn.Module):
    """One weight ``w`` (4 x 3): its rows 0-1 read ``h = tanh(a(x))`` once, its rows 2-3 read ``h`` and
    ``g = tanh(b(x))``; ``o`` reads the three outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(2, 3)
        self.w, self.o = nn.Parameter(torch.randn(4, 3) / 2), nn.Linear(6, 2)

    def forward(self, x):
        h, g = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        parts = [F.linear(h, self.w[:2]), F.linear(h, self.w[2:]), F.linear(g, self.w[2:])]
        return self.o(torch.tanh(torch.cat(parts, -1)))


def test_the_sites_after_one_that_shares_no_entry_are_read():
    """``w``'s first site (rows 0-1) shares no entry; the next two share rows 2-3, which ties their outputs
    and ``h`` (2-4) with ``g`` (5-7, columns): groups ``h`` with ``g``, the first site's output (8-9, a plain
    HIDDEN set) alone, the two shared sites' outputs (10-13) together. Kills _shared_parameter_ties 61 (the
    sites after an unshared one skipped: ``h`` and ``g`` moved apart)."""
    torch.manual_seed(19)
    graph, moved = converted(SlicedWeight().to(DTYPE), torch.randn(5, 2, dtype=DTYPE))
    assert moved > 0
    assert_layout(graph,
                  node_kind=runs((K.INPUT, 2), (K.FFN_HIDDEN, 6), (K.HIDDEN, 2), (K.FFN_HIDDEN, 4), (K.OUTPUT, 2)),
                  perm_group=runs((-1, 2), (0, 6), (1, 2), (2, 4), (-1, 2)))


class SharedView(nn.Module):
    """One 1-D parameter ``p`` [4] used as a 2 x 2 weight, ``p.view(2, 2)``, by two layers."""

    def __init__(self):
        super().__init__()
        self.inp, self.p, self.head = nn.Linear(3, 2), nn.Parameter(torch.randn(4)), nn.Linear(2, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(F.linear(h, self.p.view(2, 2)))
        return self.head(torch.tanh(F.linear(h, self.p.view(2, 2))))


def test_a_shared_one_dimensional_parameter_viewed_as_a_matrix_pins_its_neurons():
    """The layout reads a 1-D parameter's entries as rows of one column, so at each site of ``p.view(2, 2)``
    neither end of an edge is a function of the row: every set it meets is pinned (exact, and the group claimed
    keeps the function). The view's own group (one permutation of all three hidden sets, ``p`` moved as
    ``P W Pᵀ``) is a symmetry too, but the layout does not see the view's shape, so it does not claim it; a layout
    that does must change this test. Kills _shared_parameter_ties 28, 33 (the column count of a 1-D parameter
    read as its length, or as 2: the ties of that view claimed)."""
    torch.manual_seed(0)
    model = SharedView().to(torch.float64)
    inputs = torch.randn(5, 3, dtype=torch.float64)
    graph = exact_by_loop(model, inputs)
    assert graph.perm_group.tolist() == [-1] * graph.num_nodes
