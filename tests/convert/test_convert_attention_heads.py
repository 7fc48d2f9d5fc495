"""Attention with 3 and 4 heads: exact factors and the head symmetry group.

With 2 heads every permutation of the heads is also a cyclic shift, so a converter or a
sampler that only knew shifts (or tied heads by a rotation) passed the 2-head suites. Here the
heads are permuted by transpositions and other non-cyclic permutations, and the sampled group
must contain them.
"""

from __future__ import annotations

import pytest
import torch
from strategies import assert_same_graph
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

import gradgraph
from gradgraph import GradGraphError, NodeKind
from gradgraph.symmetry import (
    HeadPermutation,
    TransformerPermutation,
    identity_transformer_permutation,
    permute_heads,
    permute_nodes,
    random_node_permutation,
    transformer_node_permutation,
)

DTYPE = torch.float64
WIDTH = 12  # 3 heads of 4 dims, 4 heads of 3 dims


def layer(heads: int, seed: int = 0) -> nn.TransformerEncoderLayer:
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(WIDTH, heads, 5, dropout=0.0, batch_first=True).to(DTYPE).eval()


def token_loss(output, target):
    return (output - target).pow(2).sum((1, 2))


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, WIDTH, generator=generator, dtype=DTYPE),
            torch.randn(2, 3, WIDTH, generator=generator, dtype=DTYPE))


def is_cyclic_shift(perm: torch.Tensor) -> bool:
    n = perm.numel()
    return any(torch.equal(perm, torch.roll(torch.arange(n), k)) for k in range(n))


NON_CYCLIC = {3: [torch.tensor([1, 0, 2]), torch.tensor([0, 2, 1])],
              4: [torch.tensor([1, 0, 3, 2]), torch.tensor([0, 2, 1, 3]), torch.tensor([3, 1, 2, 0]),
                  torch.tensor([1, 2, 0, 3]), torch.tensor([2, 0, 3, 1])]}  # the last two: not their own inverse


@pytest.mark.parametrize("heads", [3, 4])
def test_factors_are_exact(heads):
    inputs, targets = batch()
    assert_exact_per_sample_grads(layer(heads), inputs, targets, token_loss)


@pytest.mark.parametrize("heads", [3, 4])
def test_non_cyclic_head_permutations_keep_the_function_and_permute_the_graph(heads):
    """Checked to fail: with ``transformer_node_permutation`` reading the head permutation
    inverted (``block.heads.argsort()``) the 4-head case fails -- its last two permutations are
    not their own inverse, which no 2-head permutation can be."""
    model = layer(heads)
    inputs, targets = batch()
    graph = gradgraph.to_graph(model, inputs, targets, token_loss)
    for perm in NON_CYCLIC[heads]:
        assert not is_cyclic_shift(perm)
        permuted = permute_heads(model, [perm])
        with torch.no_grad():
            torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
        assert_same_graph(gradgraph.to_graph(permuted, inputs, targets, token_loss), permute_heads(graph, [perm]),
                          atol=1e-10)
        assert not torch.equal(permute_heads(graph, [perm]).act, graph.act)


@pytest.mark.parametrize("heads", [3, 4])
def test_sampled_group_keeps_the_function_and_contains_non_cyclic_head_permutations(heads):
    """Elements of the inferred group keep the function; some exchange heads in an order that
    is no cyclic shift (the whole symmetric group of the heads is sampled, not a subgroup).

    Checked to fail with ``random_node_permutation`` drawing its block permutation as a random
    cyclic shift instead of ``randperm`` (symmetry/permutation.py), invisible with 2 heads."""
    model = layer(heads)
    inputs, targets = batch()
    graph = gradgraph.to_graph(model, inputs, targets, token_loss)
    queries = torch.nonzero(graph.node_kind == NodeKind.QUERY).flatten()
    head_of = graph.perm_block[queries]
    assert torch.unique(head_of).numel() == heads
    non_cyclic = False
    for seed in range(12):
        if seed < 3:
            assert_group_keeps_function(model, inputs, targets, token_loss, seed=seed)
        perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
        # which head each head's queries went to: one head for all of its queries
        moved_to = torch.full((heads,), -1)
        for query, head in zip(queries.tolist(), head_of.tolist()):
            target = int(graph.perm_block[perm[query]])
            assert moved_to[head] in (-1, target)
            moved_to[head] = target
        assert torch.equal(torch.sort(moved_to).values, torch.arange(heads))
        non_cyclic |= not is_cyclic_shift(moved_to)
    assert non_cyclic


@pytest.mark.parametrize("heads", [3, 4])
def test_exchanging_only_query_key_of_two_heads_is_not_a_symmetry(heads):
    """Sensitivity: a transposition of two heads' query/key dims without their value/output
    dims is rejected on the graph and changes the model's function."""
    model = layer(heads)
    inputs, targets = batch()
    graph = gradgraph.to_graph(model, inputs, targets, token_loss)
    identity = identity_transformer_permutation(graph)
    block = identity.attention[0]
    swap = torch.arange(heads)
    swap[[1, 2]] = swap[[2, 1]]  # heads 1 and 2: not a cyclic shift for 3 or 4 heads
    node_perm = transformer_node_permutation(graph, TransformerPermutation(
        [HeadPermutation(swap, block.query_key, block.value_output)], identity.ffn))
    values = torch.isin(graph.node_kind, torch.tensor([NodeKind.VALUE, NodeKind.ATTENTION]))
    node_perm[values] = torch.nonzero(values).flatten()
    with pytest.raises(GradGraphError, match="not a symmetry"):
        permute_nodes(graph, node_perm)
    d_head = WIDTH // heads
    rows = torch.arange(WIDTH).reshape(heads, d_head)[swap].reshape(-1)
    broken = permute_heads(model, [torch.arange(heads)])
    with torch.no_grad():
        weight = broken.self_attn.in_proj_weight
        weight[:WIDTH] = weight[:WIDTH][rows].clone()  # queries
        weight[WIDTH:2 * WIDTH] = weight[WIDTH:2 * WIDTH][rows].clone()  # keys
        assert not torch.allclose(broken(inputs), model(inputs), atol=1e-6)
