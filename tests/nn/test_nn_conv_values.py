"""The message-passing base and what it stands on, by value: :class:`GradGraphConv` against a hand
computation of its equation, the channel-block sparse products of ``gradgraph.nn.sparse`` (values
and gradients) against dense formulas, :class:`GraphContext`'s structure and cache, and the
shared encoders, heads and checks of :class:`MetaNetwork`; float64, every message in full.

Written for the mutation run of the ``nn-conv`` group (``./gg mutate nn-conv``, see
docs/mutation.md) before its first run, and in its list from that run on (mutmut does not say
which test killed a mutant, so the docstrings name only mutants checked by hand).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import GradGraphConv, GradMetaNet, GradMetaNetConfig, GradMetaNetPlusPlus, GraphContext
from gradgraph.nn.context import STRUCTURE_MEMO, equal_blocks
from gradgraph.nn.conv import resolve_direction
from gradgraph.nn.metanet import component_inputs
from gradgraph.nn.sparse import ChannelBlockPattern, channel_sddmm, channel_spmm
from nn_values import hand_conv, linear, mlp_graph, randomize, two_graphs

DTYPE = torch.float64
EXACT = dict(atol=1e-12, rtol=1e-12)


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


# ----------------------------------------------------------------------------- GradGraphConv
@pytest.mark.parametrize("per_component", [True, False])
@pytest.mark.parametrize("edge_messages", [True, False])
@pytest.mark.parametrize(("direction", "aggr"), [("both", "mean"), ("forward", "mean"), ("both", "sum"),
                                                 ("forward", "sum"), ("both", "max")])
def test_grad_graph_conv_equals_its_equation_node_by_node(direction, aggr, edge_messages, per_component):
    """:class:`GradGraphConv` on a Batch of two graphs of different shapes is its documented
    equation, every term by hand, for ``[N, C]`` and ``[N, B, C]`` states (the fused sparse path
    for sum / mean, the gathered one for max), both directions and with or without edge
    messages."""
    graph = two_graphs(batch=3)
    layer = randomize(GradGraphConv(4, 3, 2, direction=direction, aggr=aggr, edge_messages=edge_messages).double(), 1)
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(graph.num_nodes, *((3,) if per_component else ()), 4, generator=generator, dtype=DTYPE)
    edge_features = torch.randn(graph.edge_index.shape[1], 2, generator=generator, dtype=DTYPE)
    assert layer.uses_fused_aggregation(h) == (per_component and aggr != "max")
    with torch.no_grad():
        got = layer(h, GraphContext.from_graph(graph, edge_features))
        expected = hand_conv(layer, h, graph, edge_features)
    assert got.shape == (*h.shape[:-1], 3)
    torch.testing.assert_close(got, expected, **EXACT)
    edge_terms = layer.propagate_both(h, GraphContext.from_graph(graph, edge_features))
    if not edge_messages:
        assert edge_terms.dtype == DTYPE and torch.equal(edge_terms, torch.zeros(*h.shape[:-1], 3, dtype=DTYPE))


def test_grad_graph_conv_parameters_follow_the_options():
    """Edge parameters exist only with ``edge_messages`` (backward ones only with ``direction="both"``);
    the message maps and the mean maps have no bias, the self map and the gates have one."""
    names = lambda layer: sorted(name for name, _ in layer.named_parameters())  # noqa: E731
    assert names(GradGraphConv(3, 4, 2)) == sorted([
        "lin_self.weight", "lin_self.bias", "lin_forward.weight", "gate_forward.weight", "gate_forward.bias",
        "lin_backward.weight", "gate_backward.weight", "gate_backward.bias", "lin_layer.weight", "lin_graph.weight"])
    assert names(GradGraphConv(3, 4, 2, direction="forward")) == sorted([
        "lin_self.weight", "lin_self.bias", "lin_forward.weight", "gate_forward.weight", "gate_forward.bias",
        "lin_layer.weight", "lin_graph.weight"])
    assert names(GradGraphConv(3, 4, 2, edge_messages=False)) == sorted([
        "lin_self.weight", "lin_self.bias", "lin_layer.weight", "lin_graph.weight"])
    layer = GradGraphConv(3, 4, 2)
    assert [tuple(layer.get_parameter(name).shape) for name in ("lin_forward.weight", "gate_forward.weight")] == [
        (4, 3), (4, 2)]
    assert (layer.node_dim, layer.aggr, layer.direction, layer.edge_messages) == (0, "mean", "both", True)
    assert GradGraphConv(3, 4, 2, aggr="sum").aggr == "sum"


def test_reset_parameters_reinitialises_every_child():
    """:meth:`GradGraphConv.reset_parameters` draws every child's parameters afresh."""
    layer = GradGraphConv(3, 4, 2)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.fill_(7.0)
    layer.reset_parameters()
    for name, parameter in layer.named_parameters():
        assert not torch.all(parameter == 7.0), name


class OnlyMessage(GradGraphConv):
    def message(self, x_j, gate):
        return super().message(x_j, gate)


class Both(OnlyMessage):
    def message_and_aggregate(self, adj_t, x, gate, pattern=None):
        return super().message_and_aggregate(adj_t, x, gate, pattern)


def test_other_keyword_arguments_reach_message_passing():
    """``**kwargs`` go to PyG's ``MessagePassing`` (here ``decomposed_layers``, default 1).

    Checked to kill ``GradGraphConv.__init__`` 16 (``**kwargs`` dropped), a survivor of the
    hand check of run nn 13."""
    assert GradGraphConv(3, 4, 2, decomposed_layers=2).decomposed_layers == 2
    assert GradGraphConv(3, 4, 2).decomposed_layers == 1


def test_one_dimensional_edge_features_are_refused_with_their_width():
    """Edge features ``[E]`` (no feature axis) are refused by the layer's check with a
    :class:`GradGraphError` naming their last dimension, not an ``IndexError``.

    Checked to kill ``GradGraphConv._check`` 14 and 19 (``shape[+1]`` for ``shape[-1]``, in the
    test and in the message), survivors of the hand check of run nn 13."""
    graph = mlp_graph(0, batch=3)
    num_edges = graph.edge_index.shape[1]
    context = GraphContext.from_graph(graph, torch.zeros(num_edges, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=full(
            f"GradGraphConv: edge features have {num_edges} channels, the layer was built for edge_dim=2")):
        GradGraphConv(3, 4, 2).double()(torch.zeros(graph.num_nodes, 3, dtype=DTYPE), context)


def test_fused_kernel_only_for_sum_or_mean_of_its_own_message():
    """``fuse`` is on for the base layer with sum / add / mean, off for max and for a subclass that
    redefines ``message`` alone, on again where ``message_and_aggregate`` is redefined with it."""
    assert [GradGraphConv(3, 4, 2, aggr=aggr).fuse for aggr in ("sum", "add", "mean", "max", "min")] == [
        True, True, True, False, False]
    assert OnlyMessage(3, 4, 2).fuse is False and Both(3, 4, 2).fuse is True
    h = torch.zeros(5, 2, 3)
    assert GradGraphConv(3, 4, 2).uses_fused_aggregation(h) is True
    assert GradGraphConv(3, 4, 2).uses_fused_aggregation(h[:, 0]) is False
    assert OnlyMessage(3, 4, 2).uses_fused_aggregation(h) is False


def test_message_broadcasts_the_gate_over_components():
    """``message``: ``x_j [E, C]`` or ``[E, B, C]`` times ``gate [E, C]`` per edge and channel."""
    layer = GradGraphConv(3, 3, 2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=generator, dtype=DTYPE)
    gate = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    torch.testing.assert_close(layer.message(x, gate), x * gate[:, None, :], atol=0, rtol=0)
    torch.testing.assert_close(layer.message(x[:, 0], gate), x[:, 0] * gate, atol=0, rtol=0)


def test_mean_of_a_node_with_one_in_edge_is_its_message_and_without_any_is_zero():
    """The fused mean divides by the in-degree (clamped to 1 for nodes without in-edges):
    a chain 0 -> 1 -> 2 and an edge 0 -> 2 gives node 1 its one message, node 2 the mean of two."""
    edge_index = torch.tensor([[0, 1, 0], [1, 2, 2]])
    context = GraphContext(edge_index, torch.zeros(3, 1, dtype=DTYPE), torch.zeros(3, dtype=torch.long), 1,
                           torch.zeros(3, dtype=torch.long), 1)
    layer = GradGraphConv(1, 1, 1, direction="forward")
    x = torch.tensor([[[1.0]], [[10.0]], [[100.0]]], dtype=DTYPE)
    gate = torch.tensor([[2.0], [3.0], [5.0]], dtype=DTYPE)
    got = layer._propagate_direction("forward", x, gate, context)
    torch.testing.assert_close(got, torch.tensor([[[0.0]], [[2.0]], [[(30.0 + 5.0) / 2]]], dtype=DTYPE), atol=0, rtol=0)
    backward = layer._propagate_direction("backward", x, gate, context)
    torch.testing.assert_close(backward, torch.tensor([[[(20.0 + 500.0) / 2]], [[300.0]], [[0.0]]], dtype=DTYPE),
                               atol=0, rtol=0)
    unfused = layer._propagate_direction("backward", x[:, 0], gate, context)
    torch.testing.assert_close(unfused, backward[:, 0], atol=0, rtol=0)


def test_grad_graph_conv_messages_and_repr_in_full():
    """Every refusal of the base layer and of :func:`resolve_direction`, whole; the whole repr."""
    graph = mlp_graph(0, batch=3)
    context = GraphContext.from_graph(graph, torch.zeros(graph.edge_index.shape[1], 2, dtype=DTYPE))
    layer = GradGraphConv(3, 4, 2).double()
    n = graph.num_nodes
    shape_message = "GradGraphConv: node states must have shape [N, C] or [N, B, C] with N={}, C=3; got {}"
    for h in (torch.zeros(n, dtype=DTYPE), torch.zeros(n, 2, 2, 3, dtype=DTYPE), torch.zeros(n + 1, 3, dtype=DTYPE),
              torch.zeros(n, 2, 4, dtype=DTYPE)):
        with pytest.raises(GradGraphError, match=full(shape_message.format(n, list(h.shape)))):
            layer(h, context)
    with pytest.raises(GradGraphError, match=full(
            "GradGraphConv: edge features have 2 channels, the layer was built for edge_dim=5")):
        GradGraphConv(3, 4, 5).double()(torch.zeros(n, 3, dtype=DTYPE), context)
    assert layer(torch.zeros(n, 3, dtype=DTYPE), context).shape == (n, 4)
    assert repr(GradGraphConv(3, 4, 5, direction="forward", aggr="sum", edge_messages=False)) == (
        "GradGraphConv(3, 4, edge_dim=5, direction='forward', aggr='sum', edge_messages=False)")
    with pytest.raises(GradGraphError, match=full("Owner: pass direction= only (flow= is its deprecated name)")):
        resolve_direction("Owner", "both", "forward")
    with pytest.raises(GradGraphError, match=full(
            "Owner: flow='source_to_target' is not supported: gradgraph layers take direction= (one of "
            "('forward', 'both')), not PyG's flow ('source_to_target' / 'target_to_source')")):
        resolve_direction("Owner", None, "source_to_target")
    with pytest.raises(GradGraphError, match=full("Owner: direction must be one of ('forward', 'both'), got 'up'")):
        resolve_direction("Owner", "up", None)
    assert resolve_direction("Owner", None, None) == "both"
    assert resolve_direction("Owner", "forward", None) == "forward"


def test_flow_warns_with_its_replacement():
    """``flow=`` warns with a FutureWarning, the whole text; so does reading a model's ``flow``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = GradGraphConv(3, 4, 2, flow="forward")
    assert layer.direction == "forward"
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning,
         "GradGraphConv: flow= is deprecated, use direction='forward' (PyG's flow means something else)")]
    assert resolve_direction("Owner", None, "both") == "both"
    model = GradMetaNet(8, direction="forward")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.flow == "forward"
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "GradMetaNet.flow is deprecated, read .direction")]


def test_flow_warnings_point_at_the_callers_line():
    """Both warnings name the caller's file (``stacklevel=3`` in :func:`resolve_direction`: past it
    and the constructor; ``stacklevel=2`` in :attr:`MetaNetwork.flow`).

    Deselected in ``gg``'s ``nn-conv`` list: under mutmut the innermost frames are its
    trampoline's, so the file is never this one there. Checked by hand (the mutant applied to a
    copy of ``src``, plain pytest) to kill ``resolve_direction`` 11 (``stacklevel`` dropped) and
    12 (``stacklevel=4``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradGraphConv(3, 4, 2, flow="forward")
        GradMetaNet(8).flow  # noqa: B018
    assert [w.filename for w in caught] == [__file__, __file__]


# ----------------------------------------------------------------------------- sparse products
def random_edges(seed: int, num_nodes: int = 5, num_edges: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted ``(rows, cols)`` with a repeated edge and a node (the last) in no edge."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    cols = torch.randint(0, num_nodes - 1, (num_edges,), generator=generator)
    rows[-1], cols[-1] = rows[0], cols[0]
    return rows, cols


def dense_spmm(rows, cols, gate, x):
    """``out[r, i, c] = sum_e [rows_e = r] gate[e, c] x[cols_e, i, c]`` by a loop over the edges."""
    out = torch.zeros_like(x)
    for e, (r, s) in enumerate(zip(rows.tolist(), cols.tolist())):
        out[r] = out[r] + gate[e] * x[s]
    return out


def dense_sddmm(rows, cols, left, right):
    """``out[e, c] = sum_i left[rows_e, i, c] right[cols_e, i, c]`` by a loop over the edges."""
    return torch.stack([(left[r] * right[s]).sum(0) for r, s in zip(rows.tolist(), cols.tolist())])


@pytest.mark.parametrize("paired", [True, False])
def test_channel_spmm_values_and_gradients_equal_the_dense_loop(paired):
    """:func:`channel_spmm` and its backward (gate and state gradients, each alone and both)
    against autograd of the edge loop, with a pattern from :meth:`ChannelBlockPattern.build_pair`
    (the transposed pattern for the backward) and from :meth:`~ChannelBlockPattern.build` alone
    (the transpose of the CSR matrix)."""
    rows, cols = random_edges(0)
    pattern = ChannelBlockPattern.build_pair(rows, cols, 5, 3)[0] if paired else ChannelBlockPattern.build(
        rows, cols, 5, 3)
    assert (pattern.transposed is None) != paired
    generator = torch.Generator().manual_seed(1)
    gate = torch.randn(9, 3, generator=generator, dtype=DTYPE)
    x = torch.randn(5, 4, 3, generator=generator, dtype=DTYPE)
    cotangent = torch.randn(5, 4, 3, generator=generator, dtype=DTYPE)
    for needs in ((True, True), (True, False), (False, True)):
        g, s = gate.clone().requires_grad_(needs[0]), x.clone().requires_grad_(needs[1])
        got = channel_spmm(pattern, g, s)
        expected = dense_spmm(rows, cols, g, s)
        torch.testing.assert_close(got, expected, **EXACT)
        inputs = [t for t, need in zip((g, s), needs) if need]
        for got_grad, expected_grad in zip(torch.autograd.grad(got, inputs, cotangent),
                                           torch.autograd.grad(expected, inputs, cotangent)):
            torch.testing.assert_close(got_grad, expected_grad, **EXACT)


@pytest.mark.parametrize("paired", [True, False])
def test_channel_sddmm_values_and_gradients_equal_the_dense_loop(paired):
    """:func:`channel_sddmm` and its backward (left and right gradients, each alone and both)
    against autograd of the edge loop, for a paired and an unpaired pattern."""
    rows, cols = random_edges(2)
    pattern = ChannelBlockPattern.build_pair(rows, cols, 5, 3)[0] if paired else ChannelBlockPattern.build(
        rows, cols, 5, 3)
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(5, 4, 3, generator=generator, dtype=DTYPE)
    right = torch.randn(5, 4, 3, generator=generator, dtype=DTYPE)
    cotangent = torch.randn(9, 3, generator=generator, dtype=DTYPE)
    for needs in ((True, True), (True, False), (False, True)):
        a, b = left.clone().requires_grad_(needs[0]), right.clone().requires_grad_(needs[1])
        got = channel_sddmm(pattern, a, b)
        expected = dense_sddmm(rows, cols, a, b)
        torch.testing.assert_close(got, expected, **EXACT)
        inputs = [t for t, need in zip((a, b), needs) if need]
        for got_grad, expected_grad in zip(torch.autograd.grad(got, inputs, cotangent),
                                           torch.autograd.grad(expected, inputs, cotangent)):
            torch.testing.assert_close(got_grad, expected_grad, **EXACT)


def valid_csr(pattern: ChannelBlockPattern) -> torch.Tensor:
    """The pattern's matrix built with torch's ``check_invariants=True`` (sorted, distinct columns
    in every row: what torch's and cuSPARSE's CSR kernels assume); raises where it is not."""
    values = torch.ones(pattern.col.numel(), dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(pattern.crow, pattern.col, values, (pattern.size, pattern.size),
                                       check_invariants=True)


def test_channel_block_pattern_fields_by_hand():
    """The CSR layout of :meth:`ChannelBlockPattern.build` on four edges, two of them parallel
    (edges 0 and 3, both ``1 -> 0``), three nodes, two channels, written out: row pointers,
    columns per channel block (the parallel pair stored once), the value order (both edges at
    one position), in-degrees (counting both), sizes; values summed into the shared entry and
    handed back to both edges; the pair's transposes point at each other and map values into
    the transposed CSR order; the adjacency is the first block with the number of edges per
    entry as values (built once); both matrices are valid CSR.

    Checked to kill ``ChannelBlockPattern.adjacency`` 13 (``num_nodes + 2`` row pointers: the
    dense view is the same, the CSR tensor is not valid), a survivor of run nn 12. The
    parallel pair: on main (one entry per edge) ``col``, ``value_order``, the values and
    the CSR check fail."""
    rows, cols = torch.tensor([1, 0, 1, 1]), torch.tensor([0, 2, 1, 0])
    pattern, transposed = ChannelBlockPattern.build_pair(rows, cols, 3, 2)
    assert pattern.crow.tolist() == [0, 1, 3, 3, 4, 6, 6]
    assert pattern.col.tolist() == [2, 0, 1, 5, 3, 4]
    assert pattern.value_order.tolist() == [1, 0, 2, 1, 4, 3, 5, 4]
    assert pattern.row_count.tolist() == [1, 3, 0]
    assert (pattern.num_nodes, pattern.channels, pattern.num_edges, pattern.size) == (3, 2, 4, 6)
    assert pattern.transposed is transposed and transposed.transposed is pattern
    assert transposed.crow.tolist() == [0, 1, 2, 3, 4, 5, 6] and transposed.col.tolist() == [1, 1, 0, 4, 4, 3]
    assert transposed.value_order.tolist() == [0, 2, 1, 0, 3, 5, 4, 3]
    assert pattern.transpose_order.tolist() == [1, 2, 0, 4, 5, 3]
    assert transposed.transpose_order.tolist() == [2, 0, 1, 5, 3, 4]
    values = torch.arange(1.0, 7.0, dtype=DTYPE)
    torch.testing.assert_close(pattern.transposed_matrix(values).to_dense(), pattern.matrix(values).to_dense().t(),
                               atol=0, rtol=0)
    torch.testing.assert_close(transposed.transposed_matrix(values).to_dense(),
                               transposed.matrix(values).to_dense().t(), atol=0, rtol=0)
    per_edge = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0], [40.0, 41.0]], dtype=DTYPE)
    assert pattern.to_csr_values(per_edge).tolist() == [20.0, 50.0, 30.0, 21.0, 52.0, 31.0]
    assert pattern.from_csr_values(pattern.to_csr_values(per_edge)).tolist() == [
        [50.0, 52.0], [20.0, 21.0], [30.0, 31.0], [50.0, 52.0]]
    adjacency = pattern.adjacency()
    assert adjacency.layout == torch.sparse_csr and adjacency.shape == (3, 3)
    assert adjacency.to_dense().tolist() == [[0, 0, 1], [2, 1, 0], [0, 0, 0]]
    # a valid CSR tensor of the first block: N + 1 row pointers, U columns, the edge counts
    assert adjacency.crow_indices().tolist() == [0, 1, 3, 3]
    assert adjacency.col_indices().tolist() == [2, 0, 1] and adjacency.values().tolist() == [1, 2, 1]
    assert pattern.adjacency() is adjacency
    for each in (pattern, transposed):
        torch.testing.assert_close(valid_csr(each).to_dense(), each.matrix(torch.ones(6, dtype=DTYPE)).to_dense(),
                                   atol=0, rtol=0)


def test_patterns_of_a_graph_with_parallel_edges_are_valid_csr():
    """The patterns GradGraphConv and the decoder use, for a converted graph with parallel edges
    (:func:`residual_graph`), in both directions: every ``(row, column)`` stored once, so torch's
    CSR invariant check accepts them, and as many entries per block as distinct edge pairs.
    Fails on main, whose patterns held one entry per edge (``col_indices ... sorted and distinct``):
    a contract torch's and cuSPARSE's kernels assume, which the CPU kernels happened to tolerate."""
    graph = residual_graph()
    distinct = len(set(zip(*graph.edge_index.tolist())))
    context = GraphContext.from_graph(graph)
    for direction in ("forward", "backward"):
        pattern = context.pattern(direction, 3)
        valid_csr(pattern)
        assert pattern.col.numel() == 3 * distinct < 3 * graph.edge_index.shape[1]
        assert pattern.row_count.sum().item() == graph.edge_index.shape[1]


def test_sparse_products_warn_nothing():
    """The CSR constructor's beta warning is silenced where the matrices are built."""
    rows, cols = random_edges(4)
    pattern = ChannelBlockPattern.build_pair(rows, cols, 5, 2)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        product = channel_spmm(pattern, torch.ones(9, 2, dtype=DTYPE), torch.ones(5, 3, 2, dtype=DTYPE))
        pattern.adjacency()
    assert [str(warning.message) for warning in caught] == []
    assert product.shape == (5, 3, 2)


# ----------------------------------------------------------------------------- GraphContext
def test_equal_blocks_only_for_equal_graphs_in_order():
    """``n`` for ``[0]*n + [1]*n + ...``, else 0 (other orders, sizes, counts; no graphs)."""
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    assert equal_blocks(long([0, 0, 1, 1]), 2) == 2
    assert equal_blocks(long([0, 0, 0]), 1) == 3
    assert equal_blocks(long([0]), 1) == 1
    assert equal_blocks(long([0, 1, 0, 1]), 2) == 0
    assert equal_blocks(long([0, 0, 0]), 2) == 0
    assert equal_blocks(long([0, 0, 1, 1]), 1) == 0
    assert equal_blocks(long([0, 0]), 0) == 0
    assert equal_blocks(long([]), 0) == 0


def test_context_of_a_batch_by_hand():
    """:meth:`GraphContext.from_graph` on a Batch: the edges and features it was given (or the
    graph's ``edge_attr``), the node -> graph map, ``G``, and one dense group per
    (graph, layer) pair, numbered in (graph, layer) order."""
    graph = two_graphs(batch=3)
    context = GraphContext.from_graph(graph)
    assert context.edge_index is graph.edge_index and context.edge_features is graph.edge_attr
    assert torch.equal(context.node_batch, graph.batch) and context.num_graphs == 2
    pairs = sorted(set(zip(graph.batch.tolist(), graph.layer.tolist())))
    expected = [pairs.index(pair) for pair in zip(graph.batch.tolist(), graph.layer.tolist())]
    assert context.layer_group.tolist() == expected and context.num_layer_groups == len(pairs)
    assert context.num_nodes == graph.num_nodes and isinstance(context.num_nodes, int)
    features = torch.zeros(graph.edge_index.shape[1], 2, dtype=DTYPE)
    assert GraphContext.from_graph(graph, features).edge_features is features


def test_context_of_a_single_graph_by_hand():
    """A single graph (no ``batch``): every node in graph 0, ``G = 1``, groups by layer."""
    graph = mlp_graph(2)
    context = GraphContext.from_graph(graph)
    assert context.node_batch.dtype == torch.long and context.node_batch.tolist() == [0] * graph.num_nodes
    assert context.num_graphs == 1 and context.nodes_per_graph() == graph.num_nodes
    layers = sorted(set(graph.layer.tolist()))
    assert context.layer_group.tolist() == [layers.index(layer) for layer in graph.layer.tolist()]
    assert context.num_layer_groups == len(layers) == 4


def test_context_messages_in_full():
    graph = mlp_graph(2)
    num_edges, num_nodes = graph.edge_index.shape[1], graph.num_nodes
    with pytest.raises(GradGraphError, match=full(
            f"GraphContext: edge_features has 3 rows but the graph has {num_edges} edges "
            f"(edge_index [2, {num_edges}])")):
        GraphContext.from_graph(graph, torch.zeros(3, 4))
    bad = graph.clone()
    bad.layer = graph.layer[:-1]
    with pytest.raises(GradGraphError, match=full(
            f"GraphContext: graph.layer must have shape [{num_nodes}], got [{num_nodes - 1}]")):
        GraphContext.from_graph(bad)
    with pytest.raises(GradGraphError, match=full(
            "GraphContext.pattern: direction must be 'forward' or 'backward', got 'both'")):
        GraphContext.from_graph(graph).pattern("both", 3)


def test_patterns_are_built_once_per_width_for_both_directions():
    """``pattern("forward", C)`` has the destinations as rows (in-degrees), ``"backward"`` the
    sources (out-degrees); the first call stores both, later calls return the same objects;
    ``nodes_per_graph`` is remembered too."""
    graph = mlp_graph(2)
    context = GraphContext.from_graph(graph)
    forward = context.pattern("forward", 3)
    assert set(context.cache) == {("forward", 3), ("backward", 3)}
    backward = context.pattern("backward", 3)
    assert context.pattern("forward", 3) is forward and backward is forward.transposed
    src, dst = graph.edge_index
    assert forward.row_count.tolist() == torch.bincount(dst, minlength=graph.num_nodes).tolist()
    assert backward.row_count.tolist() == torch.bincount(src, minlength=graph.num_nodes).tolist()
    assert forward.channels == 3 and context.pattern("forward", 2).channels == 2
    assert context.nodes_per_graph() == graph.num_nodes and context.cache["nodes_per_graph"] == graph.num_nodes
    context.cache["nodes_per_graph"] = 99
    assert context.nodes_per_graph() == 99
    kept = context._replace(cache=context.cache, edge_index=graph.edge_index.flip(0))
    assert kept.cache is context.cache


def test_structure_memo_shares_one_context_structure():
    """A graph carrying a ``STRUCTURE_MEMO`` dict gets one context structure: the first call stores
    it, later calls (other edge features) reuse its cache; a new ``edge_index`` object is not
    taken for the same structure."""
    graph = mlp_graph(3)
    graph.__dict__[STRUCTURE_MEMO] = {}
    first = GraphContext.from_graph(graph)
    assert graph.__dict__[STRUCTURE_MEMO]["context"] is first
    first.pattern("forward", 2)
    features = torch.ones(graph.edge_index.shape[1], 2, dtype=DTYPE)
    second = GraphContext.from_graph(graph, features)
    assert second.cache is first.cache and second.edge_features is features
    assert second.layer_group is first.layer_group
    graph.edge_index = graph.edge_index.clone()
    third = GraphContext.from_graph(graph)
    assert third.cache is not first.cache and graph.__dict__[STRUCTURE_MEMO]["context"] is third
    plain = mlp_graph(3)
    assert STRUCTURE_MEMO not in plain.__dict__
    GraphContext.from_graph(plain)
    assert STRUCTURE_MEMO not in plain.__dict__


# ----------------------------------------------------------------------------- MetaNetwork
def test_default_config_is_the_default_model():
    """:class:`GradMetaNetConfig`'s defaults are :class:`GradMetaNet`'s."""
    assert GradMetaNet.from_config(GradMetaNetConfig()).config == GradMetaNet().config
    config = GradMetaNetConfig()
    assert (config.hidden_channels, config.component_channels, config.num_component_layers, config.num_node_layers,
            config.product_channels, config.component_edge_messages) == (32, None, 2, 2, 16, True)


def test_component_inputs_are_act_grad_then_component_x():
    graph = mlp_graph(4, batch=3)
    torch.testing.assert_close(component_inputs(graph, "M"), torch.stack([graph.act, graph.grad], dim=-1),
                               atol=0, rtol=0)
    extra = torch.randn(graph.num_nodes, 3, 2, dtype=torch.float32)
    graph.component_x = extra
    got = component_inputs(graph, "M")
    assert got.dtype == DTYPE
    torch.testing.assert_close(got, torch.cat([graph.act[..., None], graph.grad[..., None], extra.double()], dim=-1),
                               atol=0, rtol=0)
    single = graph.clone()
    single.act, single.grad, single.component_x = graph.act.float(), graph.grad.float(), extra.double()
    assert component_inputs(single, "M").dtype == torch.float32  # component_x cast to the factors' dtype
    n = graph.num_nodes
    graph.component_x = torch.zeros(n, 3, dtype=DTYPE)
    shape_message = f"M: component_x must have shape [N, B, F] = [{n}, 3, F]; got "
    with pytest.raises(GradGraphError, match=full(f"{shape_message}[{n}, 3]")):
        component_inputs(graph, "M")
    graph.component_x = torch.zeros(n, 2, 1, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=full(f"{shape_message}[{n}, 2, 1]")):
        component_inputs(graph, "M")
    del graph.component_x
    graph.grad = graph.grad[:, :2]
    with pytest.raises(GradGraphError, match=full(f"M: act and grad must both be [N, B]; got [{n}, 3] and [{n}, 2]")):
        component_inputs(graph, "M")
    graph.grad, graph.act = graph.act[:, 0], graph.act[:, 0]
    with pytest.raises(GradGraphError, match=full(f"M: act and grad must both be [N, B]; got [{n}] and [{n}]")):
        component_inputs(graph, "M")


def test_encoders_are_their_linear_maps_and_tables():
    """``encode_edges``, ``encode_nodes`` and ``encode_factors`` by hand from the model's maps; the
    encoders have the widths asked for."""
    graph = two_graphs(batch=3)
    graph.component_x = torch.randn(graph.num_nodes, 3, 2, dtype=DTYPE)
    model = randomize(GradMetaNetPlusPlus(5, component_in_channels=2, max_layers=7, max_positions=9).double(), 3)
    torch.testing.assert_close(model.encode_edges(graph),
                               linear(model.edge_encoder, graph.edge_attr) + model.edge_kind_encoding(graph), **EXACT)
    torch.testing.assert_close(model.encode_nodes(graph),
                               linear(model.node_encoder, graph.x) + model.positional_encoding(graph), **EXACT)
    factors = torch.cat([graph.act[..., None], graph.grad[..., None], graph.component_x], dim=-1)
    torch.testing.assert_close(model.encode_factors(graph), linear(model.factor_encoder, factors), **EXACT)
    assert tuple(model.factor_encoder.weight.shape) == (5, 4)
    assert tuple(model.edge_encoder.weight.shape) == (5, 1) and tuple(model.node_encoder.weight.shape) == (5, 1)
    encoding = model.positional_encoding
    assert (encoding.channels, encoding.max_layers, encoding.max_positions) == (5, 7, 9)
    lazy = GradMetaNetPlusPlus(5, component_in_channels=-1, node_in_channels=-1, edge_in_channels=-1)
    assert isinstance(lazy.factor_encoder.weight, torch.nn.parameter.UninitializedParameter)
    assert (lazy.node_in_channels, lazy.edge_in_channels, lazy.component_in_channels) == (-1, -1, -1)
    default = GradMetaNetPlusPlus(5)
    assert (default.positional_encoding.max_layers, default.positional_encoding.max_positions) == (64, 256)
    assert (default.node_in_channels, default.edge_in_channels, default.component_in_channels) == (1, 1, 0)
    assert tuple(default.factor_encoder.weight.shape) == (5, 2)


def test_input_widths_are_checked_in_full():
    widths = "{{'node_in_channels': {}, 'edge_in_channels': {}, 'component_in_channels': {}}}"
    for node, edge, component in ((0, 1, 0), (1, 0, 0), (-2, 1, 0), (1, -2, 0), (1, 1, -2)):
        message = ("GradMetaNetPlusPlus: input widths must be >= 1 (component_in_channels >= 0), or -1 to infer "
                   f"them at the first call; got {widths.format(node, edge, component)}")
        with pytest.raises(GradGraphError, match=full(message)):
            GradMetaNetPlusPlus(4, node_in_channels=node, edge_in_channels=edge, component_in_channels=component)
    GradMetaNetPlusPlus(4, node_in_channels=1, edge_in_channels=1, component_in_channels=0)
    GradMetaNetPlusPlus(4, node_in_channels=-1, edge_in_channels=-1, component_in_channels=-1)


def test_heads_are_built_as_asked():
    """``build_heads``: no readout for width 0; the component readout's MLP is
    ``density_readout_hidden`` wide with a density, its input width without."""
    model = GradMetaNetPlusPlus(5, graph_out_channels=0, component_out_channels=0)
    assert model.readout is None and model.component_readout is None
    assert (model.edge_out_channels, model.node_out_channels) == (1, 1)
    model = GradMetaNetPlusPlus(5, edge_out_channels=0, node_out_channels=0, graph_out_channels=3,
                                component_out_channels=2)
    assert model.decoder is None and (model.edge_out_channels, model.node_out_channels) == (0, 0)
    assert (model.readout.in_channels, model.readout.out_channels) == (5, 3)
    assert model.component_readout.density is None
    assert model.component_readout.mlp.channel_list == [15, 5, 2]
    with_density = GradMetaNet(6, component_channels=4, component_out_channels=2, component_density_heads=2)
    assert with_density.component_readout.mlp.channel_list[1:] == [6, 2]
    assert with_density.component_readout.density.heads == 2


def test_build_heads_keeps_the_decoder_and_a_lazy_factor_encoder_is_lazy():
    """``build_heads`` keeps the decoder it is given (the module the forward decodes with);
    ``build_factor_encoder`` with ``component_in_channels=-1`` builds PyG's lazy ``Linear(-1, C)``.

    The component readout's MLP is ``density_readout_hidden`` wide only with density heads.

    Checked to kill ``MetaNetwork.build_heads`` 1 (``self.decoder = None``), 23 (the density
    width without a density) and ``build_factor_encoder`` 5 (``Linear(-2, C)``, also lazy, but not PyG's ``-1``), survivors of
    the hand check of run nn 13."""
    model = GradMetaNetPlusPlus(5)
    decoder = torch.nn.Identity()
    model.build_heads(decoder, edge_out_channels=1, node_out_channels=0, graph_channels=5, graph_out_channels=0,
                      component_channels=5, component_out_channels=2, density_readout_hidden=7,
                      component_density_heads=0)
    assert model.decoder is decoder
    assert model.component_readout.mlp.channel_list == [15, 5, 2]  # density_readout_hidden only with a density
    assert GradMetaNet(6, component_channels=4, component_out_channels=2).component_readout.mlp.channel_list == [
        12, 4, 2]
    lazy = GradMetaNetPlusPlus(5, component_in_channels=-1)
    assert (lazy.factor_encoder.in_channels, lazy.factor_encoder.out_channels) == (-1, 5)
    assert (GradMetaNetPlusPlus(5, component_in_channels=3).factor_encoder.in_channels) == 5


def test_output_widths_and_graph_prediction_in_full():
    with pytest.raises(GradGraphError, match=full("Owner: layer counts and output widths must be >= 0, got (0, -1)")):
        GradMetaNet.check_output_widths("Owner", 0, -1)
    GradMetaNet.check_output_widths("Owner", 0, 0)
    GradMetaNet.check_output_widths("Owner")
    for model_class in (GradMetaNet, GradMetaNetPlusPlus):
        with pytest.raises(GradGraphError, match=full(
                f"{model_class.__name__}.for_graph_prediction: graph_out_channels must be >= 1")):
            model_class.for_graph_prediction(0)
        model = model_class.for_graph_prediction(1, 6, node_out_channels=2)
        assert (model.hidden_channels, model.readout.out_channels, model.edge_out_channels,
                model.node_out_channels) == (6, 1, 0, 2)


def test_input_checks_in_full():
    """:meth:`MetaNetwork.check_inputs`: a graph of another floating dtype (each field), or with
    other feature widths than the model was built for, is refused with the whole message; ``-1``
    widths accept any; a model without a factor encoder does not look at ``component_x``."""
    graph = mlp_graph(5, batch=3)
    model = GradMetaNet(6).double()
    for field in ("x", "edge_attr", "act"):
        bad = graph.clone()
        setattr(bad, field, getattr(graph, field).float())
        with pytest.raises(GradGraphError, match=full(
                f"GradMetaNet: graph.{field} is torch.float32 but the model's parameters are torch.float64; "
                "convert one of them (model.to(torch.float32) or graph.to(torch.float64) / "
                "to_graph(..., dtype=torch.float64))")):
            model(bad)
    wide = graph.clone()
    wide.x = torch.cat([graph.x, graph.x], dim=-1)
    wide.edge_attr = torch.cat([graph.edge_attr] * 3, dim=-1)
    wide.component_x = torch.zeros(graph.num_nodes, 3, 2, dtype=DTYPE)
    for field, got, option, expected in (("x", 2, "node_in_channels", 1), ("edge_attr", 3, "edge_in_channels", 1),
                                         ("component_x", 2, "component_in_channels", 0)):
        with pytest.raises(GradGraphError, match=full(
                f"GradMetaNet: graph.{field} has {got} feature columns but the model was built with "
                f"{option}={expected}; pass {option}={got} (or -1 to infer it at the first call)")):
            model.check_inputs(wide)
        setattr(model, option, -1 if field != "component_x" else 2)
    model.check_inputs(wide)
    no_factors = GradMetaNet(6, num_component_layers=0).double()
    graph.component_x = torch.zeros(graph.num_nodes, 3, 2, dtype=DTYPE)
    no_factors.check_inputs(graph)
    int_graph = mlp_graph(5, batch=3)
    int_graph.x = int_graph.x.long()
    GradMetaNet(6).double().check_inputs(int_graph)


def test_input_checks_pass_a_graph_without_act_to_a_model_that_never_reads_it():
    """``check_inputs`` looks at the dtype of ``act`` only where the graph has one: a model
    without component layers takes a graph with no ``act`` (the check does not raise).

    Checked to kill ``MetaNetwork.check_inputs`` 15 (``getattr`` without its default), a
    survivor of the hand check of run nn 13."""
    graph = mlp_graph(5, batch=3)
    del graph.act
    assert getattr(graph, "act", None) is None
    GradMetaNet(6, num_component_layers=0).double().check_inputs(graph)


def test_outputs_cut_the_decoder_to_each_head():
    """``outputs``: the edge and node outputs are the decoder's first ``k_e`` / ``k_n`` columns."""
    graph = two_graphs(batch=3)
    model = randomize(GradMetaNet(6, edge_out_channels=1, node_out_channels=3).double(), 5)
    context = GraphContext.from_graph(graph, model.encode_edges(graph))
    edge = torch.randn(graph.edge_index.shape[1], 3, dtype=DTYPE)
    node = torch.randn(graph.num_nodes, 3, dtype=DTYPE)
    states = torch.randn(graph.num_nodes, 6, dtype=DTYPE)
    out = model.outputs(graph, context, (edge, node), states, None)
    assert torch.equal(out.edge, edge[:, :1]) and torch.equal(out.node, node) and out.graph is None
    model.edge_out_channels, model.node_out_channels = 0, 2
    out = model.outputs(graph, context, (edge, node), states, None)
    assert out.edge is None and torch.equal(out.node, node[:, :2])
    model.edge_out_channels, model.node_out_channels = 2, 0
    out = model.outputs(graph, context, (edge, node), states, None)
    assert torch.equal(out.edge, edge[:, :2]) and out.node is None


def test_outputs_read_out_every_graph_of_the_context_with_its_memo():
    """``outputs`` tells both readouts the context's ``num_graphs`` (a trailing graph without
    nodes still gets its row: the readouts' default would size by the largest graph id) and
    hands the component readout the context's memo of ``nodes_per_graph`` (one check per
    forward, not one per readout).

    Checked to kill ``MetaNetwork.outputs`` 15 (``num_graphs`` ``None``), 29 and 34
    (``nodes_per_graph`` ``None`` / left out: the readout checks the batch again, same numbers),
    survivors of run nn 13."""
    graph = two_graphs(batch=3)
    model = randomize(GradMetaNet(6, graph_out_channels=2, component_out_channels=2).double(), 6)
    context = GraphContext.from_graph(graph, model.encode_edges(graph))._replace(num_graphs=3)
    generator = torch.Generator().manual_seed(7)
    states = torch.randn(graph.num_nodes, 6, generator=generator, dtype=DTYPE)
    component_states = torch.randn(graph.num_nodes, 3, 6, generator=generator, dtype=DTYPE)
    seen = []
    readout = model.component_readout.forward

    def spy(*args):
        seen.append(args[4:])
        return readout(*args)

    model.component_readout.forward = spy
    out = model.outputs(graph, context, None, states, component_states)
    assert seen == [(0,)] and context.cache["nodes_per_graph"] == 0
    assert out.graph.shape == (3, 2) and out.component.shape == (3, 3, 2)
    torch.testing.assert_close(out.graph, model.readout(states, graph.batch, 3), **EXACT)
    torch.testing.assert_close(out.component, readout(component_states, graph.batch, 3, graph.perm_group < 0),
                               **EXACT)


def test_reset_parameters_reaches_every_submodule():
    model = GradMetaNet(6, graph_out_channels=1, component_out_channels=1, component_density_heads=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(7.0)
    model.reset_parameters()
    for name, parameter in model.named_parameters():
        assert not torch.all(parameter == 7.0), name


# ----------------------------------------------------------------------------- parallel edges
def with_parallel_edges(graph, extra: list[int]):
    """``graph`` with the edges at positions ``extra`` added again at the end (two edges with the
    same ``(src, dst)``, as a weight edge and a residual edge between the same neurons are)."""
    parallel = graph.clone()
    parallel.edge_index = torch.cat([graph.edge_index, graph.edge_index[:, extra]], dim=1)
    parallel.edge_attr = torch.cat([graph.edge_attr, graph.edge_attr[extra]], dim=0)
    return parallel


class LinearResidual(torch.nn.Module):
    """``c(b(h) + h)``, ``h = tanh(a(x))``: the converted graph has a weight edge of ``b``'s diagonal
    and a residual edge between the same two neurons (3 parallel pairs)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(8)
        self.a, self.b, self.c = (torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(self.b(h) + h)


def residual_graph() -> gradgraph.GradGraph:
    generator = torch.Generator().manual_seed(9)
    inputs, targets = torch.randn(3, 3, generator=generator, dtype=DTYPE), torch.randn(3, 2, generator=generator,
                                                                                        dtype=DTYPE)
    return gradgraph.to_graph(LinearResidual().double(), inputs, targets,
                              loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))


def test_a_linear_residual_converts_to_parallel_edges_and_both_paths_agree_on_it():
    """The case is real: ``to_graph`` of :class:`LinearResidual` has 3 ``(src, dst)`` pairs twice;
    the fused and gathered paths of :class:`GradGraphConv` (sum and mean) agree on it, values and
    gradients of the states and every parameter (float64)."""
    graph = residual_graph()
    pairs = list(zip(*graph.edge_index.tolist()))
    assert len(pairs) - len(set(pairs)) == 3
    generator = torch.Generator().manual_seed(10)
    h = torch.randn(graph.num_nodes, 3, 4, generator=generator, dtype=DTYPE, requires_grad=True)
    cotangent = torch.randn(graph.num_nodes, 3, 3, generator=generator, dtype=DTYPE)
    for aggr in ("sum", "mean"):
        layers = [randomize(GradGraphConv(4, 3, 1, aggr=aggr).double(), 11) for _ in range(2)]
        layers[1].fuse = False
        results = []
        for layer in layers:
            out = layer(h, GraphContext.from_graph(graph))
            results.append((out, *torch.autograd.grad(out, (h, *layer.parameters()), cotangent)))
        assert layers[0].uses_fused_aggregation(h) and not layers[1].uses_fused_aggregation(h)
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize(("direction", "aggr"), [("both", "mean"), ("both", "sum"), ("forward", "mean")])
def test_fused_path_on_parallel_edges_equals_the_gathered_one_and_the_equation(direction, aggr):
    """Parallel edges (the same ``(src, dst)`` twice or three times) give the channel-block CSR
    matrices two edges at one ``(row, col)``; the fused ``[N, B, C]`` path (:func:`channel_spmm`, and the
    ``sampled_addmm`` of its gate gradient on that pattern) must count every edge once, as the
    gathered path and the equation by hand do: values and the gradients of the states, the edge
    features and every parameter (the gates' included), float64. On main (one CSR entry per edge,
    duplicates kept) the two agreed on CPU, torch 2.13: its kernels summed duplicate entries
    (checked to fail where a kernel keeps one entry per ``(row, col)``, the others' values
    zeroed, in the product or in the sampled gate gradient: a monkeypatched
    ``ChannelBlockPattern.matrix`` / ``_sampled_product``). The pattern now merges parallel edges
    into one entry (``test_patterns_of_a_graph_with_parallel_edges_are_valid_csr``); this test
    checks the merge sums their gates and hands each its gradient."""
    base = mlp_graph(0, batch=3)
    graph = with_parallel_edges(base, [0, 0, 5, base.edge_index.shape[1] - 1])
    src, dst = graph.edge_index
    pairs = list(zip(src.tolist(), dst.tolist()))
    assert len(set(pairs)) == base.edge_index.shape[1] and len(pairs) == base.edge_index.shape[1] + 4
    fused = randomize(GradGraphConv(4, 3, 2, direction=direction, aggr=aggr).double(), 5)
    gathered = randomize(GradGraphConv(4, 3, 2, direction=direction, aggr=aggr).double(), 5)
    gathered.fuse = False
    generator = torch.Generator().manual_seed(6)
    h = torch.randn(graph.num_nodes, 3, 4, generator=generator, dtype=DTYPE, requires_grad=True)
    edge_features = torch.randn(len(pairs), 2, generator=generator, dtype=DTYPE, requires_grad=True)
    cotangent = torch.randn(graph.num_nodes, 3, 3, generator=generator, dtype=DTYPE)
    assert fused.uses_fused_aggregation(h) and not gathered.uses_fused_aggregation(h)
    pattern = GraphContext.from_graph(graph, edge_features).pattern("forward", 3)
    assert pattern.row_count.sum().item() == len(pairs)  # the in-degrees count every parallel edge
    outputs = {}
    for name, layer in (("fused", fused), ("gathered", gathered), ("hand", fused)):
        out = (hand_conv(layer, h, graph, edge_features) if name == "hand"
               else layer(h, GraphContext.from_graph(graph, edge_features)))
        outputs[name] = (out, torch.autograd.grad(out, (h, edge_features, *layer.parameters()), cotangent))
    for name in ("gathered", "hand"):
        torch.testing.assert_close(outputs["fused"][0], outputs[name][0], **EXACT)
        for got, expected in zip(outputs["fused"][1], outputs[name][1]):
            torch.testing.assert_close(got, expected, **EXACT)
    # the parallel copies matter: dropping them changes the answer
    without = fused(h, GraphContext.from_graph(base, edge_features[: base.edge_index.shape[1]]))
    assert not torch.allclose(without, outputs["fused"][0])


def test_channel_products_on_parallel_edges_pass_gradcheck():
    """:func:`channel_spmm` and :func:`channel_sddmm` on a pattern with an edge three times and
    another twice: their hand-written backwards pass ``torch.autograd.gradcheck`` (float64) and
    their values are the edge loops'."""
    rows = torch.tensor([2, 0, 2, 1, 2, 0, 3])
    cols = torch.tensor([1, 3, 1, 1, 1, 3, 0])
    pattern = ChannelBlockPattern.build_pair(rows, cols, 4, 2)[0]
    generator = torch.Generator().manual_seed(7)
    gate = torch.randn(7, 2, generator=generator, dtype=DTYPE, requires_grad=True)
    x = torch.randn(4, 3, 2, generator=generator, dtype=DTYPE, requires_grad=True)
    y = torch.randn(4, 3, 2, generator=generator, dtype=DTYPE, requires_grad=True)
    torch.testing.assert_close(channel_spmm(pattern, gate, x), dense_spmm(rows, cols, gate, x), **EXACT)
    torch.testing.assert_close(channel_sddmm(pattern, x, y), dense_sddmm(rows, cols, x, y), **EXACT)
    assert torch.autograd.gradcheck(lambda g, s: channel_spmm(pattern, g, s), (gate, x))
    assert torch.autograd.gradcheck(lambda a, b: channel_sddmm(pattern, a, b), (x, y))


@pytest.mark.parametrize("model_class", [GradMetaNet, GradMetaNetPlusPlus])
@pytest.mark.parametrize("lazy", [False, True])
def test_one_dimensional_node_and_edge_features_are_refused_by_name(model_class, lazy):
    """``x [N]`` or ``edge_attr [E]`` (no feature axis) is refused by :meth:`MetaNetwork.check_inputs`
    with its shape, also by a model with lazy (``-1``) input widths.

    A bug until then: ``check_inputs`` read ``shape[-1]`` of a 1-D ``x`` as its feature width, so
    ``x [14]`` was refused with the advice "pass node_in_channels=14", and a model built so (or
    with ``-1``) ran without an error: its node encoder read all 14 nodes' values as one row of 14
    features and added that one vector to every node (``edge_attr [E]`` alike), a silent wrong
    answer. Found by ``MetaNetwork.check_inputs`` 32 and 38 of run nn 14 (``shape[+1]`` for
    ``shape[-1]``, which only a 1-D field tells apart)."""
    graph = mlp_graph(5, batch=3)
    widths = dict(node_in_channels=-1, edge_in_channels=-1) if lazy else {}
    for field, axis in (("x", "N"), ("edge_attr", "E")):
        flat = graph.clone()
        setattr(flat, field, getattr(graph, field)[:, 0])
        rows = getattr(flat, field).shape[0]
        model = model_class(6, **widths).double()
        with pytest.raises(GradGraphError, match=full(
                f"{model_class.__name__}: graph.{field} must have shape [{axis}, F] (features on its last axis); "
                f"got [{rows}]")):
            model(flat)
        with pytest.raises(GradGraphError, match=full(
                f"{model_class.__name__}: graph.{field} must have shape [{axis}, F] (features on its last axis); "
                f"got [{rows}, 1, 1]")):
            setattr(flat, field, getattr(graph, field)[:, :, None])
            model.check_inputs(flat)


@pytest.mark.parametrize("model_class", [GradMetaNet, GradMetaNetPlusPlus])
def test_a_model_names_itself_when_act_and_grad_disagree(model_class):
    """``encode_factors`` hands the model's class name to :func:`component_inputs`, so the forward
    of a graph whose ``act`` and ``grad`` differ in shape is refused naming the model.

    Checked to kill ``MetaNetwork.encode_factors`` 3 (the name ``None``) and 6 (``type(None)``:
    "NoneType"), survivors of run nn 14."""
    graph = mlp_graph(5, batch=3)
    graph.grad = graph.grad[:, :2]
    n = graph.num_nodes
    with pytest.raises(GradGraphError, match=full(
            f"{model_class.__name__}: act and grad must both be [N, B]; got [{n}, 3] and [{n}, 2]")):
        model_class(6).double()(graph)
