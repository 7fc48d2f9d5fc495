"""The transformer actions of `gradgraph.symmetry.attention` (`random_transformer_permutation`,
`transformer_node_permutation`, `permute_transformer`) on what the hypothesis test in
`tests/convert/test_convert_attention.py` does not reach: non-zero in-projection biases (torch
initialises them to zero, so a bias left unpermuted went unseen), graphs whose nodes are not
numbered head by head, the default flags, and the error messages.

Each test's docstring names the mutants of the symmetry campaign (docs/mutation.md) it was
checked against with ``mutmut apply``.
"""

from __future__ import annotations

import re

import pytest
import torch
from strategies import renumbered
from torch import nn
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import (
    identity_transformer_permutation,
    permute_transformer,
    random_transformer_permutation,
    transformer_node_permutation,
)
from gradgraph.symmetry.attention import HeadPermutation, TransformerPermutation


def squared_error(output, target):
    return ((output - target) ** 2).sum(dim=(1, 2))


def model_and_graph(seed: int = 0):
    """A 2-head encoder layer (batch first) with every parameter random, its batch and graph."""
    torch.manual_seed(seed)
    model = nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, batch_first=True).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()  # torch starts in_proj_bias and out_proj.bias at zero
    inputs, targets = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    return model, inputs, targets, gradgraph.to_graph(model, inputs, targets, squared_error)


def same_values(a, b):
    for key in ("act", "grad", "x", "edge_attr", "edge_index"):
        torch.testing.assert_close(a[key], b[key], atol=1e-12, rtol=0, msg=key)


def test_permuting_a_model_with_nonzero_in_projection_biases_keeps_its_function_and_maps_its_graph():
    """Checked against ``permute_transformer`` 41 (the in-projection bias left in place when the
    model has one)."""
    model, inputs, targets, graph = model_and_graph()
    permutation = random_transformer_permutation(model, torch.Generator().manual_seed(3))
    permuted = permute_transformer(model, permutation)
    torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
    same_values(gradgraph.to_graph(permuted, inputs, targets, squared_error), permute_transformer(graph, permutation))


def test_the_action_on_a_graph_does_not_depend_on_how_its_nodes_are_numbered():
    """The head tables are read by head and position, not by node number: renumbering the nodes
    at random and acting commutes with acting and renumbering. Checked against ``_kind_table`` 8
    (``order = None``). ``_kind_table`` 11, 12 and 14 (``block / (max + 1)``, ``max - 1``,
    ``max + 2``) are equivalent: a head's dims carry positions ``h * d_h + i`` across the heads,
    so position alone already orders them head by head."""
    _, _, _, graph = model_and_graph(1)
    permutation = random_transformer_permutation(graph, torch.Generator().manual_seed(5))
    node_order = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(2))
    acted = permute_transformer(graph, permutation)
    assert not torch.equal(acted.act, graph.act)  # the drawn action moves neurons: the check is not vacuous
    same_values(permute_transformer(renumbered(graph, node_order), permutation), renumbered(acted, node_order))


def test_by_default_every_kind_of_action_is_drawn_and_each_flag_turns_its_kind_off():
    """Checked against ``random_transformer_permutation`` 1-4 (a default flag False), 9 (the
    draw of the query/key and value/output tables inverted), 24 and 39 (heads and FFN drawn
    although their flag is off)."""
    model, _, _, _ = model_and_graph()
    identity = identity_transformer_permutation(model)

    def moved(permutation):
        block, base = permutation.attention[0], identity.attention[0]
        return {"heads": not torch.equal(block.heads, base.heads),
                "query_key": not torch.equal(block.query_key, base.query_key),
                "value_output": not torch.equal(block.value_output, base.value_output),
                "ffn": not torch.equal(permutation.ffn[0], identity.ffn[0])}

    # seeds whose draws move every kind (a 2-head swap is a coin flip; take the first seed that moves all)
    drawn = [moved(random_transformer_permutation(model, torch.Generator().manual_seed(seed))) for seed in range(20)]
    assert any(all(kinds.values()) for kinds in drawn)
    for flag in ("heads", "query_key", "value_output", "ffn"):
        for seed in range(20):
            kinds = moved(random_transformer_permutation(model, torch.Generator().manual_seed(seed), **{flag: False}))
            assert not kinds[flag], (flag, seed)


def test_a_batch_of_transformer_graphs_is_refused_with_the_remedy():
    """Checked against ``_graph_groups`` 1, 5-7 (the batch check disabled) and 9-12 (its message)."""
    _, _, _, graph = model_and_graph()
    batch = Batch.from_data_list([graph, graph])
    with pytest.raises(GradGraphError) as error:
        transformer_node_permutation(batch, identity_transformer_permutation(graph))
    assert str(error.value) == ("transformer symmetries act on one graph; use random_node_permutation on a Batch")


def test_a_permutation_of_another_architecture_is_refused_naming_the_function_and_the_counts():
    """Checked against ``_check`` 3 (``or`` -> ``and``: one count wrong is enough), 6 and 12 (the
    messages), ``transformer_node_permutation`` 3, 7, 8 and ``permute_transformer`` 11, 15, 16
    (the function named)."""
    model, _, _, graph = model_and_graph()
    good = identity_transformer_permutation(model)
    extra_block = TransformerPermutation([*good.attention, good.attention[0]], good.ffn)
    message = ("{where}: the model has 1 attention block(s) and 1 feed-forward layer(s), got 2 head "
               "permutation(s) and 1 FFN permutation(s)")
    with pytest.raises(GradGraphError) as error:
        transformer_node_permutation(graph, extra_block)
    assert str(error.value) == message.format(where="transformer_node_permutation")
    with pytest.raises(GradGraphError) as error:
        permute_transformer(model, extra_block)
    assert str(error.value) == message.format(where="permute_transformer")
    bad_heads = HeadPermutation(torch.tensor([0, 0]), good.attention[0].query_key, good.attention[0].value_output)
    with pytest.raises(GradGraphError, match=re.escape(
            "permute_transformer: attention block 0: heads must be a permutation of range(2)")):
        permute_transformer(model, TransformerPermutation([bad_heads], good.ffn))
