"""GradGraph's weight-space maps on a token model with every kind of parameter block, against
torch.func: ``per_sample_grads``, ``mean_grad`` (the regular token layout and components in any
order), ``to_parameters``; and the guards of batching and of the single-graph methods.

The model has a dense ``nn.Linear`` block (one slice of its parameter), a weight used as
``h @ w`` (a dense block whose positions are not one slice), a one-output head (an edge list,
not a dense block), and tokens (several components per datapoint). Each mutant of the
``graph.py`` survivors this file was written for changes at least one of these numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch
from strategies import renumbered
from traced_models import reference_per_sample_grads

import gradgraph
from gradgraph import GradGraphError
from gradgraph.graph import _SPAN_CHUNK, consecutive_span
from gradgraph.symmetry import permute_components

DTYPE = torch.float64


class Blocks(nn.Module):
    """``[b, T, 3]`` tokens -> ``[b, 1]``: ``head(tanh(tanh(l1(x)) @ w))`` mean-pooled over tokens."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(3, 4), nn.Linear(5, 1)
        self.w = nn.Parameter(torch.randn(4, 5) / 2)

    def forward(self, x):
        return self.head(torch.tanh(torch.tanh(self.l1(x)) @ self.w)).mean(1)


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(4)
    model = Blocks().to(DTYPE)
    inputs, targets = torch.randn(5, 3, 3, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)
    return model, inputs, targets, graph


def shuffled(graph):
    """The same graph with its components in a random order (the irregular layout)."""
    perm = torch.randperm(graph.num_components, generator=torch.Generator().manual_seed(0))
    return permute_components(graph, perm)


@pytest.mark.parametrize("order", ["regular", "shuffled"])
def test_per_sample_and_mean_grads_match_torch_func(case, order):
    """Checked to fail on the ``graph.py`` mutants of ``_datapoint_outer_products`` (its token
    branch), ``_grads_by_parameter`` (the layout test, spans, the scatter) and
    ``_component_param_grads``, which the MLP-only tests of the first campaign let survive."""
    model, inputs, targets, graph = case
    graph = graph if order == "regular" else shuffled(graph)
    reference = reference_per_sample_grads(model, inputs, targets, squared_error)
    ours, mean = graph.per_sample_grads(), graph.mean_grad()
    assert set(ours) == set(reference) == set(mean)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], value.mean(0), atol=1e-12, rtol=0, msg=name)
    exported = graph.to_networkx()  # mean_grad of every weight edge, tokens summed
    src, dst = graph.edge_index.tolist()
    for edge in range(len(src)):
        param = int(graph.edge_param[edge])
        if param >= 0:
            want = mean[graph.param_names[param]].reshape(-1)[int(graph.edge_param_pos[edge])]
            assert abs(exported.edges[src[edge], dst[edge]]["mean_grad"] - float(want)) < 1e-12


def test_to_parameters_is_the_inverse_with_and_without_trailing_channels(case):
    model, _, _, graph = case
    params = dict(model.named_parameters())
    written = graph.to_parameters(graph.weight, graph.bias)
    assert set(written) == set(params)
    for name, value in params.items():
        torch.testing.assert_close(written[name], value.detach(), atol=0, rtol=0)
    stacked = graph.to_parameters(torch.stack([graph.weight, 2 * graph.weight], 1),
                                  torch.stack([graph.bias, 2 * graph.bias], 1))
    for name, value in params.items():
        torch.testing.assert_close(stacked[name], torch.stack([value.detach(), 2 * value.detach()], -1), atol=0, rtol=0)
    weights_only = graph.to_parameters(graph.weight)
    assert set(weights_only) == {"l1.weight", "w", "head.weight"}
    assert weights_only["w"].dtype == DTYPE


def test_to_parameters_names_the_bad_shape(case):
    _, _, _, graph = case
    E, N = graph.edge_index.shape[1], graph.num_nodes
    with pytest.raises(GradGraphError, match=rf"^to_parameters: node_values must have shape \[N\] with N={N}, got \[3\]$"):
        graph.to_parameters(graph.weight, torch.zeros(3, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=rf"^to_parameters: node_values must have shape \[N\], k with N={N}, got \[{N}\]$"):
        graph.to_parameters(torch.zeros(E, 2, dtype=DTYPE), torch.zeros(N, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=rf"^to_parameters: edge_values and node_values must share the trailing "
                                             rf"dim, got \[{E}, 2\] and \[{N}, 3\]$"):
        graph.to_parameters(torch.zeros(E, 2, dtype=DTYPE), torch.zeros(N, 3, dtype=DTYPE))


def test_single_graph_methods_refuse_a_batch_by_name(case):
    _, _, _, graph = case
    batch = Batch.from_data_list([graph, graph])
    for method, call in [("to_parameters", lambda: batch.to_parameters(batch.weight)),
                         ("per_sample_grads", batch.per_sample_grads), ("mean_grad", batch.mean_grad),
                         ("to_networkx", batch.to_networkx)]:
        with pytest.raises(GradGraphError, match=rf"^GradGraph\.{method}\(\) needs one graph, got a Batch of 2; "
                                                 r"call batch\.to_data_list\(\) first$"):
            call()


def test_batching_graphs_with_different_component_counts_is_refused(case):
    """Both orders, so the check reads the first graph's count and every other's."""
    model, inputs, targets, graph = case
    fewer = gradgraph.to_graph(model, inputs[:3], targets[:3], squared_error)
    for first, second in [(graph, fewer), (fewer, graph)]:
        with pytest.raises(GradGraphError, match=rf"^cannot batch GradGraphs with different numbers of components: "
                                                 rf"'act' has {first.num_components} components in the first graph "
                                                 rf"and {second.num_components} in another "
                                                 rf"\(\[{second.num_nodes}, {second.num_components}\]\); convert every "
                                                 r"graph with the same number of datapoints \(and tokens\), or "
                                                 r"pad/subsample the components first$"):
            Batch.from_data_list([first, second])
    same = Batch.from_data_list([graph, graph])  # equal counts batch, component_sample stacked
    assert same.component_sample.shape == (2, graph.num_components)
    assert same.act.shape == (2 * graph.num_nodes, graph.num_components)
    assert int(same.edge_index.max()) == 2 * graph.num_nodes - 1  # the second graph's edges shifted
    assert torch.equal(same.edge_param_pos, torch.cat([graph.edge_param_pos] * 2))  # slots not shifted


@pytest.mark.parametrize("start", [0, 3])
def test_consecutive_span(start):
    assert consecutive_span(torch.arange(start, start + 7)) == slice(start, start + 7)
    assert consecutive_span(torch.arange(start, start + 6).reshape(2, 3)) == slice(start, start + 6)
    assert consecutive_span(torch.tensor([start])) == slice(start, start + 1)
    assert consecutive_span(torch.tensor([], dtype=torch.long)) is None
    assert consecutive_span(torch.tensor([start, start + 2, start + 3])) is None
    assert consecutive_span(torch.tensor([start + 1, start])) is None
    long = torch.arange(start, start + 2 * _SPAN_CHUNK + 5)  # several pieces, each compared
    assert consecutive_span(long) == slice(start, start + long.numel())
    for broken_at in (1, _SPAN_CHUNK + 3, 2 * _SPAN_CHUNK + 4):
        broken = long.clone()
        broken[broken_at] += 1
        assert consecutive_span(broken) is None, broken_at


def test_repr_counts(case):
    model, _, _, graph = case
    assert repr(graph) == (f"GradGraph(nodes={graph.num_nodes}, edges={graph.edge_index.shape[1]}, "
                           f"components={graph.num_components}, datapoints=5, "
                           f"parameters={sum(p.numel() for p in model.parameters())})")


class TiedTokens(nn.Module):
    """Token ids ``[b, T]`` -> an embedding, a hidden layer, logits read by the same table
    (``F.linear(h, table)``), mean-pooled: one parameter in two blocks of two edge kinds."""

    def __init__(self, vocab: int = 7, width: int = 4):
        super().__init__()
        self.table, self.hidden = nn.Embedding(vocab, width), nn.Linear(width, width)

    def forward(self, ids):
        return F.linear(torch.tanh(self.hidden(self.table(ids))), self.table.weight).mean(1)


def test_a_parameter_in_two_blocks_sums_both():
    """The table is an EMBEDDING block and a dense LINEAR block over the same slots; both uses
    add up. (The head's block is not one slice here, so the ``_add_at`` assignment mutant still
    survives: docs/mutation.md.)"""
    torch.manual_seed(2)
    model = TiedTokens().to(DTYPE)
    ids, targets = torch.randint(0, 7, (4, 3)), torch.randn(4, 7, dtype=DTYPE)
    graph = gradgraph.to_graph(model, ids, targets, squared_error)
    reference = reference_per_sample_grads(model, ids, targets, squared_error)
    ours, mean = graph.per_sample_grads(), graph.mean_grad()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], value.mean(0), atol=1e-12, rtol=0, msg=name)


class SharedQueryKey(nn.Module):
    """Attention whose query and key share one projection (as in Reformer's shared-QK
    attention): ``[b, T, 3]`` -> ``[b]``. ``qk.weight`` is two dense blocks (a QUERY and a KEY
    block), each covering the whole parameter in order (one slice each)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(3, 3, bias=False)
        self.v, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        q, k = self.qk(x), self.qk(x)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 3**0.5, -1)
        return self.head((attention @ self.v(x)).mean(1)).squeeze(-1)


def test_a_parameter_in_two_whole_slice_blocks_sums_both():
    """One weight that is two dense blocks, each the whole parameter in order: the second
    block's values are added to the first's, in both ``per_sample_grads`` and ``mean_grad``.
    Checked to fail with ``_add_at`` assigning instead of adding through its slice
    (``x__add_at__mutmut_2``: ``target[..., span] = values``) and with the whole-parameter
    shortcut taken for a parameter that already holds a block
    (``xǁGradGraphǁ_grads_by_parameter__mutmut_79``: ``param in flats``)."""
    torch.manual_seed(3)
    model = SharedQueryKey().to(DTYPE)
    inputs = torch.randn(4, 2, 3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs)
    whole = slice(0, 9)
    index = graph.param_names.index("qk.weight")
    qk_blocks = [block for block in graph._parameter_blocks() if block[0] == index]
    # the case the two mutants need: two dense blocks of one parameter, each one whole slice
    assert [(block[1], block[5]) for block in qk_blocks] == [("dense", whole), ("dense", whole)]
    reference = reference_per_sample_grads(model, inputs, None, None)
    ours, mean = graph.per_sample_grads(), graph.mean_grad()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], value.mean(0), atol=1e-12, rtol=0, msg=name)


def test_edge_order_does_not_change_the_gradients(case):
    """The same graph with its edges listed backwards: no block's slots are one slice any more
    (the slot-by-slot path), and every gradient is the same. Checked to fail with ``_add_at``
    called without its positions in the mean path."""
    _, _, _, graph = case
    backwards = renumbered(graph, edge_order=torch.arange(graph.edge_index.shape[1] - 1, -1, -1))
    for method in ("per_sample_grads", "mean_grad"):
        expected, got = getattr(graph, method)(), getattr(backwards, method)()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-12, rtol=0, msg=f"{method} {name}")


class PerToken(Blocks):
    """:class:`Blocks` without the pooling: ``[b, T, 3]`` -> ``[b, T, 1]``."""

    def forward(self, x):
        return self.head(torch.tanh(torch.tanh(self.l1(x)) @ self.w))


def test_two_components_per_datapoint():
    """Two tokens, a loss per token: two components per datapoint. Checked to fail with the
    one-component fast path of ``_datapoint_outer_products`` taken for two (``tokens == 2``)."""
    torch.manual_seed(6)
    model = PerToken().to(DTYPE)
    inputs, targets = torch.randn(5, 2, 3, dtype=DTYPE), torch.randn(5, 2, 1, dtype=DTYPE)

    def loss(output, target):
        return (output - target).pow(2).sum((1, 2))

    graph = gradgraph.to_graph(model, inputs, targets, loss)
    assert graph.num_components == 2 * 5
    reference = reference_per_sample_grads(model, inputs, targets, loss)
    ours = graph.per_sample_grads()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)



class ShiftFirst(nn.Module):
    """``head(tanh(x + shift))``: the first parameter used is a bias (of new neurons after the input)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(x + self.shift))


def test_a_bias_that_is_parameter_zero():
    """Checked to fail with ``_parameter_blocks`` skipping parameter 0's bias nodes
    (``node_param > 0``), a mutant no model with a weight first can see."""
    torch.manual_seed(8)
    model = ShiftFirst().to(DTYPE)
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)
    assert graph.param_names[0] == "shift"
    reference = reference_per_sample_grads(model, inputs, targets, squared_error)
    ours, mean = graph.per_sample_grads(), graph.mean_grad()
    assert set(ours) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], value.mean(0), atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("layout", ["runs", "interleaved edges", "scattered nodes", "both"])
def test_blocks_are_found_however_edges_and_nodes_are_numbered(case, layout):
    """A converter writes each weight's edges as one run and each layer's neurons as one range,
    which the block finder reads without sorting; edges in random order (each weight's edges
    interleaved with the others') and nodes numbered at random take the general paths. Every
    layout finds the same dense blocks and gives the same gradients. Checked to fail with the
    run-based edge groups taken for interleaved edges (a group then misses edges)."""
    _, _, _, graph = case
    generator = torch.Generator().manual_seed(1)
    edge_order = torch.randperm(graph.edge_index.shape[1], generator=generator)
    node_order = torch.randperm(graph.num_nodes, generator=generator)
    other = renumbered(graph, node_order if layout in ("scattered nodes", "both") else None,
                       edge_order if layout in ("interleaved edges", "both") else None)
    kinds = [how for _, how, *_ in graph._parameter_blocks()]
    assert kinds.count("dense") == 2  # l1 and w; the one-output head is an edge list
    assert [how for _, how, *_ in other._parameter_blocks()] == kinds
    for method in ("per_sample_grads", "mean_grad"):
        expected, got = getattr(graph, method)(), getattr(other, method)()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-12, rtol=0, msg=f"{method} {name}")


def edge_by_edge_grads(graph):
    """``{name: [b, numel]}`` summed edge by edge and node by node: the definition, no blocks."""
    num_datapoints = int(graph.num_datapoints)
    sample = graph.component_sample.reshape(-1)
    flats = {name: torch.zeros(num_datapoints, int(torch.tensor(shape).prod()), dtype=graph.act.dtype)
             for name, shape in zip(graph.param_names, graph.param_shapes)}
    src, dst = graph.edge_index
    for edge in range(src.numel()):
        param = int(graph.edge_param[edge])
        if param >= 0:
            values = torch.zeros(num_datapoints, dtype=graph.act.dtype).index_add_(
                0, sample, graph.act[src[edge]] * graph.grad[dst[edge]])
            flats[graph.param_names[param]][:, int(graph.edge_param_pos[edge])] += values
    for node in torch.nonzero(graph.node_param >= 0).flatten().tolist():
        values = torch.zeros(num_datapoints, dtype=graph.act.dtype).index_add_(0, sample, graph.grad[node])
        flats[graph.param_names[int(graph.node_param[node])]][:, int(graph.node_param_pos[node])] += values
    return flats


def test_a_block_with_as_many_edges_as_cells_but_a_repeated_pair_is_an_edge_list(case):
    """Edges of one weight that span whole node ranges and number rows x columns, but join one
    (row, column) pair twice and another not at all: not a dense block (the table would drop an
    edge). Checked to fail with the all-cells-written check of the no-sort path removed."""
    _, _, _, graph = case
    src, dst = graph.edge_index.clone()
    first = torch.nonzero(graph.edge_param == graph.param_names.index("l1.weight")).flatten()
    block_dst = dst[first]
    # two edges of l1 from one source to two destinations strictly inside the block's range
    low, high = int(block_dst.min()), int(block_dst.max())
    from_source = first[(src[first] == src[first[0]]) & (dst[first] > low) & (dst[first] < high)]
    dst[from_source[1]] = dst[from_source[0]]
    fields = {key: value for key, value in graph}
    fields["edge_index"] = torch.stack((src, dst))
    doubled = gradgraph.GradGraph(**fields)
    assert [how for param, how, *_ in doubled._parameter_blocks() if param == graph.param_names.index("l1.weight")] \
        == ["edges"]
    expected = edge_by_edge_grads(doubled)
    for name, value in doubled.per_sample_grads().items():
        torch.testing.assert_close(value.reshape(value.shape[0], -1), expected[name], atol=1e-12, rtol=0, msg=name)
