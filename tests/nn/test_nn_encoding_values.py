"""The encodings and the output tuple by value: :class:`PositionalEncoding` and
:class:`EdgeKindEncoding` against a lookup written out node by node (float64), their range
checks at the boundary with the messages in full, the structure memo, and
:class:`GradMetaNetOutput`'s repr.

Written for the mutation run of the ``nn-encoding`` group (``./gg mutate nn-encoding``, see
docs/mutation.md); each docstring names what it was checked to kill, with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/nn-encoding/mutants/``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch_geometric.data import Batch

import gradgraph
from gradgraph.nn import EdgeKindEncoding, GradMetaNetOutput, PositionalEncoding
from gradgraph.nn.context import STRUCTURE_MEMO
from strategies import build_mlp


def mlp_graph(seed: int, widths) -> gradgraph.GradGraph:
    model = build_mlp(list(widths), ["tanh"] * (len(widths) - 2) + ["none"], [True] * (len(widths) - 1), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(3, widths[-1], generator=generator, dtype=torch.float64)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))


def two_graphs() -> Batch:
    """Two MLPs of different depths (3 and 2 weight layers), so ``depth - layer`` differs by graph."""
    return Batch.from_data_list([mlp_graph(0, (3, 4, 5, 2)), mlp_graph(1, (2, 3, 2))])


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def test_positional_encoding_is_its_equation_node_by_node():
    """``p_n = E_layer[l] + E_depth[L_G - l] + E_kind[k] + 1[fixed] E_position[pos]``, looked up
    by hand per node of a Batch of two graphs of different depths (so ``L_G`` is per graph).

    Checked to kill ``PositionalEncoding.forward`` and ``table_indices`` mutants that swap a
    table, take the depth over the whole batch or from the wrong end, or index positions of
    hidden neurons."""
    graph = two_graphs()
    encoding = randomized(PositionalEncoding(3, max_layers=5, max_positions=6).double(), 0)
    with torch.no_grad():
        got = encoding(graph)
    depth = {0: 3, 1: 2}
    for n in range(graph.num_nodes):
        layer, g = int(graph.layer[n]), int(graph.batch[n])
        assert int(graph.layer[graph.batch == g].max()) == depth[g]
        expected = encoding.layer.weight[layer] + encoding.depth.weight[depth[g] - layer] \
            + encoding.kind.weight[int(graph.node_kind[n])]
        if int(graph.perm_group[n]) < 0:
            expected = expected + encoding.position.weight[int(graph.position[n])]
        torch.testing.assert_close(got[n], expected, atol=1e-14, rtol=1e-14)


def test_positional_encoding_of_a_single_graph_counts_depth_from_its_last_layer():
    """Without a batch vector the graph's own depth is used (the ``batch is None`` branch)."""
    graph = mlp_graph(2, (2, 3, 3, 2))
    encoding = randomized(PositionalEncoding(2, max_layers=4, max_positions=3).double(), 1)
    layer, to_end, position, fixed = encoding.table_indices(graph)
    assert torch.equal(layer, graph.layer)
    assert torch.equal(to_end, 3 - graph.layer)
    assert torch.equal(fixed, graph.perm_group < 0)
    assert torch.equal(position, torch.where(fixed, graph.position, 0))
    assert fixed.dtype == torch.bool


def test_positional_encoding_range_checks_at_the_boundary_with_full_messages():
    """The largest layer index must be ``< max_layers`` and the largest position of a fixed
    neuron ``< max_positions``: equal to the size is refused, one less is accepted; hidden
    neurons' positions are never checked. Messages matched in full.

    Checked to kill the ``table_indices`` mutants of the comparisons (``>`` for ``>=``) and
    of the message texts."""
    graph = mlp_graph(3, (2, 3, 4, 2))  # layers 0..3, fixed positions 0..1, hidden positions 0..3
    PositionalEncoding(2, max_layers=4, max_positions=2)(graph)  # both at their limit: accepted
    with pytest.raises(gradgraph.GradGraphError, match=re.escape(
        "PositionalEncoding: a graph has layer index 3 but max_layers=3; build the model with a larger max_layers"
    ) + "$"):
        PositionalEncoding(2, max_layers=3, max_positions=2)(graph)
    with pytest.raises(gradgraph.GradGraphError, match=re.escape(
        "PositionalEncoding: an input/output neuron has position 1 but max_positions=1; "
        "build the model with a larger max_positions"
    ) + "$"):
        PositionalEncoding(2, max_layers=4, max_positions=1)(graph)


def test_positional_encoding_memo_is_reused_only_for_the_same_structure():
    """With a structure memo the indices are computed once per ``(max_layers, max_positions)``
    and reused while ``graph.layer`` is the same tensor; a new ``layer`` tensor is read afresh.
    The memo's key names the table sizes, so two encodings of other sizes do not share it."""
    graph = mlp_graph(4, (2, 3, 2))
    graph.__dict__[STRUCTURE_MEMO] = {}
    small = PositionalEncoding(2, max_layers=3, max_positions=2)
    first = small.table_indices(graph)
    assert ("positional_encoding", 3, 2) in graph.__dict__[STRUCTURE_MEMO]
    assert small.table_indices(graph) is first
    graph.layer = graph.layer.clone()
    again = small.table_indices(graph)
    assert again is not first and torch.equal(again[0], first[0])
    other = PositionalEncoding(2, max_layers=2, max_positions=2)
    with pytest.raises(gradgraph.GradGraphError, match="max_layers=2"):
        other.table_indices(graph)


def test_positional_encoding_repr_and_tables():
    """``repr`` names every size; the tables have the documented shapes and a small init."""
    encoding = PositionalEncoding(5, max_layers=7, max_positions=9)
    assert repr(encoding) == "PositionalEncoding(5, max_layers=7, max_positions=9)"
    assert encoding.layer.weight.shape == encoding.depth.weight.shape == (7, 5)
    assert encoding.kind.weight.shape == (len(gradgraph.NodeKind), 5)
    assert encoding.position.weight.shape == (9, 5)
    default = PositionalEncoding(4)
    assert (default.max_layers, default.max_positions) == (64, 256)
    for table in (default.layer, default.depth, default.kind, default.position):
        assert 0.03 < float(table.weight.std()) < 0.3  # normal, std 0.1


def test_edge_kind_encoding_is_a_row_lookup_and_checks_both_ends_of_the_range():
    """``q_e = E_kind[k_e]`` row by row; ``-1`` and ``NUM_EDGE_KINDS`` are refused with the full
    message, ``0`` and ``NUM_EDGE_KINDS - 1`` accepted; with a memo the check runs once per
    ``edge_kind`` tensor and again for a new one."""
    kinds = len(gradgraph.EdgeKind)
    encoding = randomized(EdgeKindEncoding(3).double(), 2)
    graph = mlp_graph(5, (2, 3, 2))
    graph.edge_kind = torch.arange(graph.edge_index.shape[1]) % kinds
    graph.edge_kind[0], graph.edge_kind[1] = 0, kinds - 1
    with torch.no_grad():
        got = encoding(graph)
    for e in range(graph.edge_index.shape[1]):
        torch.testing.assert_close(got[e], encoding.kind.weight[int(graph.edge_kind[e])], atol=0, rtol=0)
    for bad, low, high in ((-1, -1, kinds - 1), (kinds, 0, kinds)):
        broken = graph.clone()
        broken.edge_kind = graph.edge_kind.clone()
        broken.edge_kind[2] = bad
        message = (f"EdgeKindEncoding: edge_kind must lie in [0, {kinds}) (gradgraph.EdgeKind), "
                   f"got values in [{low}, {high}]")
        with pytest.raises(gradgraph.GradGraphError, match=re.escape(message) + "$"):
            encoding(broken)
    memo_graph = graph.clone()
    memo_graph.__dict__[STRUCTURE_MEMO] = {}
    encoding(memo_graph)
    assert memo_graph.__dict__[STRUCTURE_MEMO]["edge_kind_checked"] is memo_graph.edge_kind
    memo_graph.edge_kind = memo_graph.edge_kind.clone()
    memo_graph.edge_kind[0] = kinds
    with pytest.raises(gradgraph.GradGraphError, match="EdgeKindEncoding"):
        encoding(memo_graph)  # a new tensor: checked again


def test_edge_kind_table_init_is_small():
    encoding = EdgeKindEncoding(64)
    assert encoding.kind.weight.shape == (len(gradgraph.EdgeKind), 64)
    assert 0.05 < float(encoding.kind.weight.std()) < 0.2


def test_output_repr_prints_shapes_and_none():
    """:class:`GradMetaNetOutput` prints each field's shape (or ``None``), in field order; its
    ``component`` defaults to ``None``. Checked to kill the 15 ``__repr__`` mutants (reached by
    no test before)."""
    output = GradMetaNetOutput(edge=torch.zeros(5, 2), node=None, graph=torch.zeros(1, 3))
    assert output.component is None
    assert repr(output) == "GradMetaNetOutput(edge=[5, 2], node=None, graph=[1, 3], component=None)"
    full = GradMetaNetOutput(torch.zeros(2, 1), torch.zeros(3, 1), None, torch.zeros(1, 4, 2))
    assert repr(full) == "GradMetaNetOutput(edge=[2, 1], node=[3, 1], graph=None, component=[1, 4, 2])"


def test_edge_kind_check_is_trusted_from_the_memo_for_the_same_tensor():
    """The memo's promise is that the structure does not change: for the *same* ``edge_kind``
    tensor the range check is not run again (no device read-back per call), so a value
    written into it afterwards reaches the embedding unchecked (torch's own ``IndexError``).

    Checked to kill ``EdgeKindEncoding.forward`` 6, 7, 8 (the memo read under another key: the
    check then runs on every call)."""
    graph = mlp_graph(6, (2, 3, 2))
    graph.__dict__[STRUCTURE_MEMO] = {}
    encoding = EdgeKindEncoding(2)
    encoding(graph)
    graph.edge_kind[0] = len(gradgraph.EdgeKind)  # in place: the same tensor
    with pytest.raises(IndexError):
        encoding(graph)


@pytest.mark.parametrize("table", ["edge", "node"])
def test_kind_tables_of_wide_encodings_load_old_checkpoints_and_tolerate_a_missing_key(table):
    """A checkpoint saved with fewer kinds loads into an encoding *wider* than its number of
    kinds (64 channels: the usual case, unlike the 4-channel test beside it), and a state dict
    without the table loads with ``strict=False`` (the key reported missing, nothing raised by
    the padding hook).

    Checked to kill ``load_kind_table`` 3, 4, 5 (an ``and`` made ``or``: the hook then reads
    ``.shape`` of the missing entry) and 11 (the saved *width* compared with the row count)."""
    module = EdgeKindEncoding(64) if table == "edge" else PositionalEncoding(64)
    state = {name: value.clone() for name, value in module.state_dict().items()}
    old_rows = state["kind.weight"][:-2] + 1.0
    before = module.kind.weight.detach().clone()
    module.load_state_dict({**state, "kind.weight": old_rows})
    torch.testing.assert_close(module.kind.weight[:-2], old_rows, atol=0, rtol=0)
    torch.testing.assert_close(module.kind.weight[-2:], before[-2:], atol=0, rtol=0)
    del state["kind.weight"]
    result = module.load_state_dict(state, strict=False)
    assert result.missing_keys == ["kind.weight"] and result.unexpected_keys == []
