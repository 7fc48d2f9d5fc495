"""Per-function checks of ``convert/trace/rules_graph.py`` (issue 31, group ``convert-graph-rules``).

Written for the survivors of mutmut's run over ``rules_graph.py`` (docs/mutation.md): each test is
float64 against an independent truth (a per-datapoint autograd loop or torch.func at 1e-10, values
written out by hand), or checks a refusal's message where a user reads it, and names in its docstring
the mutants it kills (``f N``: mutant ``N`` of function ``f``, checked with ``MUTANT_UNDER_TEST``).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import clear_structure_cache
from gradgraph.convert.layout import make_plan
from gradgraph.convert.trace import trace_model
from gradgraph.convert.trace.rules_graph import rank_among_rows, rank_within
from gradgraph.errors import UnsupportedModuleError

DTYPE = torch.float64


def test_rank_within_and_rank_among_rows_written_out():
    """Each element's rank among its group's elements, in order; ``rank_among_rows`` only where some
    datapoint has several rows (zeros otherwise, ``-1`` ids included)."""
    groups = torch.tensor([0, 0, 1, 0, 1, 2, 2, 2, 0])
    assert rank_within(groups).tolist() == [0, 1, 0, 2, 1, 0, 1, 2, 3]
    assert rank_within(torch.tensor([2, 1, 0])).tolist() == [0, 0, 0]
    assert rank_within(torch.zeros(0, dtype=torch.long)).tolist() == []
    assert rank_among_rows(groups).tolist() == [0, 1, 0, 2, 1, 0, 1, 2, 3]
    assert rank_among_rows(torch.tensor([3, 1, 0, 2])).tolist() == [0, 0, 0, 0]
    assert rank_among_rows(torch.tensor([-1, 0, 1])).tolist() == [0, 0, 0]


def test_rank_within_many_rows_counts_in_order():
    """1000 rows of 4 groups (torch's unstable CPU sort reorders equal keys at this size): the ranks of a
    counter per group, in the rows' order. Kills rank_within 5, 6 (an argsort not stable)."""
    groups = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(0))
    seen = [0, 0, 0, 0]
    expected = []
    for group in groups.tolist():
        expected.append(seen[group])
        seen[group] += 1
    assert rank_within(groups).tolist() == expected


# ----------------------------------------------------------------------------- models over a data graph
#: a 5-node graph: node 4 only sends, node 3 receives twice
EDGES = torch.tensor([[0, 1, 2, 3, 4, 4, 1], [1, 2, 3, 0, 3, 0, 0]])


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class Body(nn.Module):
    """``inp`` (a Linear of 3 features to 5), then ``body(self, h, edge_index)``, a ReLU, the mean over the
    nodes (axis -2) and a Linear head of 4 classes; ``table`` (where asked for) a parameter a body may read."""

    def __init__(self, body, width=5, table=False):
        super().__init__()
        self.inp, self.head, self.body = nn.Linear(3, width), nn.Linear(width, 4), body
        self.table = nn.Parameter(torch.randn(5, width)) if table else None

    def forward(self, x, edge_index):
        return self.head(torch.relu(self.body(self, self.inp(x), edge_index)).mean(-2))


def signals(b=3, nodes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nodes, 3, generator=generator, dtype=DTYPE),
            torch.randint(0, 4, (b,), generator=generator))


def convert(model, inputs, targets, edge_index=EDGES):
    return gradgraph.to_graph(model, inputs, targets, cross_entropy, forward_kwargs={"edge_index": edge_index})


def assert_exact_against_loop(model, inputs, targets, edge_index=EDGES):
    """Per-sample and mean gradients against one backward pass per datapoint, each run alone."""
    model = model.to(DTYPE)
    graph = convert(model, inputs, targets, edge_index)
    ours, params = graph.per_sample_grads(), dict(model.named_parameters())
    for i in range(len(inputs)):
        loss = cross_entropy(model(inputs[i:i + 1], edge_index), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, param), grad in zip(params.items(), grads):
            truth = torch.zeros_like(param) if grad is None else grad
            torch.testing.assert_close(ours[name][i], truth, atol=1e-10, rtol=0, msg=f"{name}, datapoint {i}")
    return graph


def refused(body, match, inputs=None, table=False):
    torch.manual_seed(0)
    inputs, targets = signals() if inputs is None else (inputs, torch.zeros(len(inputs), dtype=torch.long))
    with pytest.raises(UnsupportedModuleError, match=match):
        convert(Body(body, table=table).to(DTYPE), inputs, targets)


def test_a_scatter_with_a_tensor_alpha_is_refused():
    """Kills graph_op 104-109."""
    refused(lambda self, h, e: torch.zeros_like(h).index_add_(-2, e[1], h[:, e[0]], alpha=torch.tensor(2.0)),
            re.escape("Tensor.index_add_: an alpha that is a tensor; gradgraph reads a constant number"))


def test_a_gather_of_a_parameter_is_refused_by_its_name():
    """Kills _graph_operand 1-8; gather_positions 6, 8, 12, 13; graph_op 17."""
    refused(lambda self, h, e: h + self.table.index_select(0, e[0, :5]),
            re.escape("Tensor.index_select: the parameter 'table' as its input; gradgraph gathers and scatters neuron "
                      "values along a data graph's nodes"),
            table=True)


def test_a_gather_or_scatter_along_the_feature_axis_is_refused():
    """Kills _position_axis 2, 4-7; gather_positions 67; scatter_positions 55, 56, 60, 66, 67."""
    refused(lambda self, h, e: h.index_select(-1, torch.tensor([0, 0, 1, 2, 3])),
            r"index_select: .*a gather along the feature axis \(the neurons\)")
    refused(lambda self, h, e: torch.zeros_like(h).index_add_(-1, torch.tensor([0, 0, 1, 2, 3]), h),
            r"index_add_: .*a scatter along the feature axis \(the neurons\)")


def test_scatters_gradgraph_does_not_read_are_refused_with_what_it_reads():
    """Into neuron values (out of place), into a tensor the caller made, of a source of another rank, of a
    parameter: each message in full, under the op's name.
    Kills scatter_positions 7, 9-17, 20-25, 29, 31, 35, 36, 75, 78, 84, 89-94."""
    refused(lambda self, h, e: h.index_add(-2, e[1], h[:, e[0]]), re.escape(
        "Tensor.index_add: a scatter into values that depend on the input or on parameters; gradgraph reads a "
        "scatter into zeros (src.new_zeros(...).scatter_add_(...)), then a sum"))
    base = torch.zeros(3, 5, 5, dtype=DTYPE)
    refused(lambda self, h, e: base.index_add(1, e[1], h[:, e[0]]), re.escape(
        "Tensor.index_add: a scatter into a tensor made by the caller; gradgraph reads a scatter into zeros made "
        "inside forward (src.new_zeros(size), torch.zeros, zeros_like; ones for reduce='prod'), then adds what else "
        "is needed"))
    refused(lambda self, h, e: h + torch.zeros(5, dtype=h.dtype).scatter_add(0, torch.tensor(1), h[0, 1, 2]),
            re.escape("Tensor.scatter_add: a source of another rank than the result"))
    refused(lambda self, h, e: h + torch.zeros(5, 5, dtype=h.dtype).index_add_(0, torch.tensor([0, 0, 1, 2, 3]),
                                                                               self.table),
            re.escape("Tensor.index_add_: the parameter 'table' as its source; gradgraph gathers and scatters "
                      "neuron values along a data graph's nodes"), table=True)


def test_a_scatter_whose_index_is_narrower_than_its_source_is_refused():
    """Kills scatter_positions 99-106."""
    def body(self, h, e):
        m = h[:, e[0]]
        index = e[1].view(1, -1, 1).expand(h.shape[0], -1, 3)
        return torch.zeros_like(h).scatter_add(-2, index, m)

    refused(body, re.escape(
        "Tensor.scatter_add: an index of shape [3, 7, 3] for a source of shape [3, 7, 5]; gradgraph reads an index "
        "broadcast from one index per position (index.view(...).expand_as(src))"))


def test_a_scatter_whose_index_differs_between_features_is_refused():
    """Kills scatter_positions 118, 122, 124, 125."""
    def body(self, h, e):
        index = torch.stack([e[1], e[1].roll(1), e[1], e[1], e[1]], -1).unsqueeze(0).expand(h.shape[0], -1, -1)
        return torch.zeros_like(h).scatter_add(-2, index, h[:, e[0]])

    refused(body, re.escape(
        "Tensor.scatter_add: an index that differs between features or datapoints; gradgraph scatters whole "
        "positions (one index per position along the node axis)"))


def test_values_whose_features_sit_at_different_positions_are_refused():
    """``[b, N, T, C]``: positions on axes 1 and 2; a gather along axis 1 carries features at several positions.
    Kills _check_trailing 11-17; _position_axis 10."""
    refused(lambda self, h, e: h.index_select(1, e[0]).mean(2),
            r"index_select: .*values whose features \(the axes after axis 1\) sit at different positions",
            inputs=torch.randn(2, 5, 4, 3, dtype=DTYPE))


def test_a_gather_of_one_neuron_twice_is_refused():
    """Kills _copy_to 26, 36-39; gather_positions 102, 107, 116, 117."""
    refused(lambda self, h, e: h.repeat(*[1] * (h.dim() - 1), 2).index_select(-2, e[0])[..., :5],
            r"index_select: .*its gather does not hold the same neurons at every position, one per feature")


def test_an_empty_scatter_is_a_constant_and_the_rest_exact():
    """A scatter of no message (a source with no edge) leaves its zeros: the model stays exact."""
    torch.manual_seed(1)
    model = Body(lambda self, h, e: h + torch.zeros_like(h).index_add_(-2, e[1, :0], h[:, e[0, :0]]))
    assert_exact_against_loop(model, *signals(seed=1))


# ----------------------------------------------------------------------------- graphs joined into rows [n, F]
#: three graphs of 3, 4 and 2 nodes joined into 9 rows (PyG's batch vector) and their edges
BATCH = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
JOINED_EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6, 7, 8], [1, 2, 0, 4, 5, 6, 3, 4, 8, 7]])


class Joined(nn.Module):
    """``inp``, ``body(self, h, edge_index, batch)`` over rows ``[n, 5]``, a ReLU, a Linear head of 4 classes
    on its ``[b, 5]`` rows (one per graph)."""

    def __init__(self, body):
        super().__init__()
        self.inp, self.head, self.body = nn.Linear(3, 5), nn.Linear(5, 4), body

    def forward(self, x, edge_index, batch):
        return self.head(torch.relu(self.body(self, self.inp(x), edge_index, batch)))


def convert_joined(model, x, targets, edge_index=JOINED_EDGES, batch=BATCH):
    return gradgraph.to_graph(model, x, targets, cross_entropy, datapoints=batch,
                              forward_kwargs={"edge_index": edge_index, "batch": batch})


def assert_joined_exact(model, seed=0, edge_index=JOINED_EDGES, batch=BATCH):
    """Each graph's gradient against one backward pass per graph run alone (its rows, its edges renumbered)."""
    torch.manual_seed(seed)
    model = model.to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(batch), 3, generator=generator, dtype=DTYPE)
    b = int(batch.max()) + 1
    targets = torch.randint(0, 4, (b,), generator=generator)
    graph = convert_joined(model, x, targets, edge_index, batch)
    ours, params = graph.per_sample_grads(), dict(model.named_parameters())
    for i in range(b):
        rows = (batch == i).nonzero()[:, 0]
        first = int(rows[0])
        own = edge_index[:, (batch[edge_index[0]] == i)] - first
        loss = cross_entropy(model(x[rows], own, torch.zeros(len(rows), dtype=torch.long)), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, param), grad in zip(params.items(), grads):
            truth = torch.zeros_like(param) if grad is None else grad
            torch.testing.assert_close(ours[name][i], truth, atol=1e-10, rtol=0, msg=f"{name}, graph {i}")
    return graph


def test_a_joined_pooling_into_more_rows_than_graphs_is_refused():
    """A sum pool into 4 rows for 3 graphs: row 3 receives no message, so it belongs to no datapoint.
    Kills _scatter_rows 10, 13, 16-25; scatter_positions 172."""
    model = Joined(lambda self, h, e, batch: torch.zeros(4, 5, dtype=h.dtype).index_add_(0, batch, h)[:3]).to(DTYPE)
    x = torch.randn(9, 3, dtype=DTYPE)
    with pytest.raises(UnsupportedModuleError, match=r"index_add_: .*row 3 of the result receives no message, and "
                                                     r"its 4 rows are not the input's 9 rows \(its nodes\)"):
        convert_joined(model, x, torch.tensor([0, 1, 2]))


def test_a_joined_sum_pool_and_message_passing_are_exact():
    def body(self, h, e, batch):
        h = h + torch.zeros_like(h).index_add_(0, e[1], h.index_select(0, e[0]))
        return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)

    assert_joined_exact(Joined(body))


# ----------------------------------------------------------------------------- x[key]: a gather or a shape op
def test_indexing_that_repeats_no_position_copies_no_neuron():
    """``h[()]``, a permutation of the nodes ``h[:, perm]``, a boolean mask of them and a repeat of features
    ``h[:, :, idx]`` are shape ops (``gathers_positions`` is False): exact, and the graph has the plain
    model's neurons (a gather would add a tied copy of the 5 channels). Kills gathers_positions 12, 15, 16, 24."""
    inputs, targets = signals(seed=2)
    torch.manual_seed(2)
    plain = assert_exact_against_loop(Body(lambda self, h, e: h), inputs, targets)
    for body in (lambda self, h, e: h[()],
                 lambda self, h, e: h[:, torch.tensor([4, 2, 0, 1, 3])],
                 lambda self, h, e: h[:, torch.tensor([True, False, True, True, False])],
                 lambda self, h, e: h[:, :, torch.tensor([0, 0, 1, 2, 3])]):
        torch.manual_seed(2)
        graph = assert_exact_against_loop(Body(body), inputs, targets)
        assert graph.num_nodes == plain.num_nodes


def test_rows_gathered_by_a_plain_index_are_exact():
    """``h[src]`` on rows ``[n, F]`` (graphs joined by their batch vector): a gather along axis 0, the graph
    of ``h.index_select(0, src)``. Kills gather_axis 3; gathers_positions 30."""
    def body(gather):
        def run(self, h, e, batch):
            h = torch.tanh(h + torch.zeros_like(h).index_add_(0, e[1], gather(h, e[0])))
            return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)
        return run

    graph = assert_joined_exact(Joined(body(lambda h, src: h[src])), seed=3)
    with_select = assert_joined_exact(Joined(body(lambda h, src: h.index_select(0, src))), seed=3)
    assert graph.num_nodes == with_select.num_nodes


def test_indexing_that_is_no_gather_of_positions_stays_exact():
    """Repeated rows of a parameter (``table[idx]``: no neuron values), channels repeated on a transposed
    ``[b, C, N]`` (the indexed axis holds features, not positions) and nodes gathered after a slice of a
    time axis (``h[:, 1:, src]`` on ``[b, T, N, C]``: not full slices before the index) are not read as a
    gather of positions; each converts exactly. Kills gathers_positions 28, 31, 32, 35, 36, 45."""
    inputs, targets = signals(seed=4)
    repeats = torch.tensor([0, 0, 1, 2, 3])
    for body, table in ((lambda self, h, e: h + self.table[repeats], True),
                        (lambda self, h, e: h.transpose(1, 2)[:, repeats].transpose(1, 2), False)):
        torch.manual_seed(4)
        assert_exact_against_loop(Body(body, table=table), inputs, targets)
    torch.manual_seed(4)
    videos = torch.randn(2, 3, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    assert_exact_against_loop(Body(lambda self, h, e: h[:, 1:, e[0]].mean(1)), videos, torch.tensor([0, 3]))


# ----------------------------------------------------------------------------- what a user reads
def test_refusals_of_gathers_along_the_wrong_axis_say_what_to_do():
    """The feature axis, the datapoint axis of signals without ``datapoints`` and of rows joined with them:
    each message in full, under the op's name. Kills _joined_rows 1; _position_axis 8, 9, 29, 31, 32, 34-37, 39-41."""
    refused(lambda self, h, e: h.index_select(-1, torch.tensor([0, 0, 1, 2, 3])), re.escape(
        "Tensor.index_select: a gather along the feature axis (the neurons); gradgraph reads message passing as "
        "gathers and scatters along the data graph's node axis, features last"))
    refused(lambda self, h, e: h.index_select(0, torch.tensor([0, 0, 1, 1])), re.escape(
        "Tensor.index_select: a gather along the datapoint axis 0 of a tensor of shape [4, 5]: it mixes datapoints. "
        "A data graph's nodes are positions of one datapoint: pass a PyG batch with to_graph(..., "
        "datapoints=batch.batch), a batch of graph signals as [b, num_nodes, features] with one edge_index for "
        "all, or one graph with datapoints=torch.zeros(num_nodes)"), inputs=torch.randn(4, 3, dtype=DTYPE))
    model = Joined(lambda self, h, e, batch: torch.zeros(3, 5, dtype=h.dtype).index_add_(
        0, batch, h.unsqueeze(0).index_select(1, e[0])[0, :9])).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_select: a gather along the datapoint axis 1 of a tensor of shape [1, 9, 5]: it mixes "
            "datapoints. gradgraph reads a joined batch's values with its rows on axis 0 and features after them")):
        convert_joined(model, torch.randn(9, 3, dtype=DTYPE), torch.tensor([0, 1, 2]))


def test_positions_share_keys_across_grids():
    """Node ``p`` and edge ``p`` share key ``p``: over 5 nodes a model has 5 position keys, with a gather of
    7 edges 7, whichever grid was made last; one more key holds the pooled rows (the mean over the nodes),
    so ``B = b * (7 + 1)`` (``b * (5 + 1)`` without the gather). Kills _position_comps 12."""
    inputs, targets = signals(seed=5)
    torch.manual_seed(5)
    plain = assert_exact_against_loop(Body(lambda self, h, e: h), inputs, targets)
    assert plain.act.shape[1] == 3 * (5 + 1)
    torch.manual_seed(5)
    graph = assert_exact_against_loop(Body(lambda self, h, e: torch.zeros_like(h).index_add_(-2, e[1], h[:, e[0]])),
                                      inputs, targets)
    assert graph.act.shape[1] == 3 * (EDGES.shape[1] + 1)


def test_joined_rows_refusals_name_the_message_and_the_axes():
    """An edge from graph 1 into graph 0 names the message and both datapoints; rows ``[n, T, F]`` whose
    ``T`` positions carry the features are refused under the scatter's name.
    Kills _joined_rows 9; _scatter_rows 30, 32; gather_positions 21, 50, 55, 64, 65; scatter_positions 45."""
    def body(self, h, e, batch):
        h = torch.tanh(h + torch.zeros_like(h).index_add_(0, e[1], h.index_select(0, e[0])))
        return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)

    crossing = JOINED_EDGES.clone()
    crossing[1, 3] = 1
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_add_: message 3 goes from datapoint 1 to a row of datapoint 0: an edge between two graphs "
            "of the batch mixes datapoints (check edge_index against the batch vector)")):
        convert_joined(Joined(body).to(DTYPE), torch.randn(9, 3, dtype=DTYPE), torch.tensor([0, 1, 2]), crossing)
    pooled = Joined(lambda self, h, e, batch: torch.zeros(int(batch.max()) + 1, 4, 5, dtype=h.dtype).index_add_(
        0, batch, h).mean(1)).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_add_: values whose features (the axes after axis 0) sit at different positions; gradgraph "
            "gathers and scatters positions whose features are neurons")):
        convert_joined(pooled, torch.randn(9, 4, 3, dtype=DTYPE), torch.tensor([0, 1, 2]))
    gathered = Joined(lambda self, h, e, batch: torch.zeros(int(batch.max()) + 1, 4, 5, dtype=h.dtype).index_add_(
        0, batch, h.index_select(0, torch.arange(9))).mean(1)).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_select: values whose features (the axes after axis 0) sit at different positions")):
        convert_joined(gathered, torch.randn(9, 4, 3, dtype=DTYPE), torch.tensor([0, 1, 2]))
    twice = Joined(lambda self, h, e, batch: torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(
        0, batch, h.repeat(*[1] * (h.dim() - 1), 2).index_select(0, torch.arange(9))[:, :5])).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_select: its gather does not hold the same neurons at every position, one per feature")):
        convert_joined(twice, torch.randn(9, 3, dtype=DTYPE), torch.tensor([0, 1, 2]))


def test_joined_rows_take_one_key_per_row_of_the_largest_grid():
    """Graphs of 3, 4 and 2 nodes sending 3, 5 and 2 messages: a row's key is its rank among its graph's
    rows, so the edges of graph 1 need 5 keys and ``B = 3 * 5`` (the pooled rows take key 0). Kills _row_comps 8, 10."""
    def body(self, h, e, batch):
        h = torch.tanh(h + torch.zeros_like(h).index_add_(0, e[1], h.index_select(0, e[0])))
        return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)

    assert assert_joined_exact(Joined(body), seed=6).act.shape[1] == 3 * 5


def test_joined_scatter_refusals_and_a_replay_with_an_edge_between_graphs():
    """A max into rows that are not each graph's own (graph i's max into row i + 1), a scatter of one neuron
    twice, and a replay of the cached plan on edges that now cross from graph 1 into graph 0 (the index is a
    value guard: it is traced again and refused, not replayed). Kills scatter_positions 156, 167, 181, 186, 199, 200."""
    from torch_geometric.utils import scatter

    x, targets = torch.randn(9, 3, dtype=DTYPE), torch.tensor([0, 1, 2])
    shifted = Joined(lambda self, h, e, batch: scatter(h, (batch + 1) % 3, dim=0, reduce="max")).to(DTYPE)
    with pytest.raises(gradgraph.DatapointCouplingError, match="the per-datapoint losses mix datapoints"):
        convert_joined(shifted, x, targets)  # (refused by its reduction until session 18; the coupling check now)
    twice = Joined(lambda self, h, e, batch: torch.zeros(int(batch.max()) + 1, 10, dtype=h.dtype).index_add_(
        0, batch, h.repeat(*[1] * (h.dim() - 1), 2))[:, :5]).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_add_: its scatter does not hold the same neurons at every position, one per feature")):
        convert_joined(twice, x, targets)

    def body(self, h, e, batch):
        h = torch.tanh(h + torch.zeros_like(h).index_add_(0, e[1], h.index_select(0, e[0])))
        return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)

    clear_structure_cache()
    model = Joined(body).to(DTYPE)
    convert_joined(model, x, targets)
    crossing = JOINED_EDGES.clone()
    crossing[1, 3] = 1  # only the scatter's index changes: the gather's guard passes
    with pytest.raises(UnsupportedModuleError, match=r"Tensor.index_add_: message 3 goes from datapoint 1"):
        convert_joined(model, x, targets, crossing)


def test_zeros_made_by_the_first_op_of_the_trace_are_a_scatter_base():
    """The scatter's base made by op 0 of the trace (``torch.zeros_like(x)`` before any layer) is zeros too.
    Kills scatter_positions 81, 82 (op 0 read as no op)."""
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 3), nn.Linear(3, 4)

        def forward(self, x, edge_index):
            zeros = torch.zeros_like(x)
            h = self.inp(x)
            return self.head(torch.relu(zeros.index_add_(1, edge_index[1], h[:, edge_index[0]])).mean(1))

    torch.manual_seed(7)
    assert_exact_against_loop(First(), *signals(seed=7))


def test_a_joined_batch_converted_again_replays_its_plan(monkeypatch):
    """The same batch again: the scatters' index guards hold (they compare the indices' values), so the
    cached plan is replayed, not traced afresh; another graph's edges are traced again (refused above).
    Kills scatter_positions 139, 142 (a guard without values never holds: every call traced again), and the
    same in the gather, gather_positions 41, 44."""
    import gradgraph.convert.traced as traced

    traces = []
    trace_model = traced.trace_model
    monkeypatch.setattr(traced, "trace_model", lambda *args, **kwargs: traces.append(1) or trace_model(*args, **kwargs))

    def body(self, h, e, batch):
        h = torch.tanh(h + torch.zeros_like(h).index_add_(0, e[1], h.index_select(0, e[0])))
        return torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h)

    clear_structure_cache()
    model = Joined(body).to(DTYPE)
    x, targets = torch.randn(9, 3, dtype=DTYPE), torch.tensor([0, 1, 2])
    first = convert_joined(model, x, targets)
    second = convert_joined(model, x + 1, targets)
    assert len(traces) == 1
    assert first.act.shape == second.act.shape
    other = JOINED_EDGES.clone()
    other[1, 3] = 5  # still inside graph 1: traced again, exact
    convert_joined(model, x, targets, other)
    assert len(traces) == 2


def test_a_gathered_copy_and_a_function_of_it_are_two_versions():
    """``m = h[:, src]`` read by one Linear and ``relu(m)`` by another: the copy is version 0 of its set, the
    ReLU's output version 1, so each Linear reads its own act and the graph stays exact. Kills _copy_to 67
    (the copy made version 1: the ReLU's output then passes for it; refused by the summed-gradient check)."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 4)

        def forward(self, x, edge_index):
            m = self.inp(x)[:, edge_index[0]]
            return self.head(torch.tanh(self.a(m) + self.b(torch.relu(m))).mean(1))

    torch.manual_seed(8)
    assert_exact_against_loop(Both(), *signals(seed=8))


class SideAndMessage(nn.Module):
    """``side(relu(h))`` (which makes ``relu(h)`` the act of ``h``'s neurons) plus the sum of the messages
    ``h_j``: the gather reads the other version, ``h``, so it first takes a set of its own."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(5, 5)

    def forward(self, h, edge_index):
        side = self.side(torch.relu(h))  # first: relu(h) is the act of h's neurons when the gather reads h
        return side + torch.zeros_like(h).index_add_(-2, edge_index[1], h.index_select(-2, edge_index[0]))


class MessageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.conv, self.head = nn.Linear(3, 5), SideAndMessage(), nn.Linear(5, 4)

    def forward(self, x, edge_index):
        return self.head(torch.relu(self.conv(self.inp(x), edge_index)).mean(-2))


def set_origins(model, inputs):
    """The plan's ``set_names``: each neuron set's origin, as the refusals of non-finite factors name it."""
    plan = make_plan(trace_model(model, inputs, lambda x: model(x, EDGES)))
    return [origin for _, _, origin in plan.set_names]


def test_gathered_copies_are_named_by_their_module_and_the_op():
    """Exact; the copy of the gathered neurons is named ``'conv gather'`` (its module's path), the set the gather
    gives ``h``'s version is named ``'conv Tensor.index_select'``; at the model's root, where there is no path,
    the copy is named by its op. Kills _copy_to 4 (the version's set named ``'conv None'``), 46 (the copy named
    ``None``), 51 (named by the op inside a module: ``'Tensor.index_select gather'``; at the root ``' gather'``)."""
    torch.manual_seed(9)
    model = MessageModel().to(DTYPE)
    inputs, targets = signals(seed=9)
    assert_exact_against_loop(model, inputs, targets)
    origins = set_origins(model, inputs)
    assert {"conv.side", "conv Tensor.index_select", "conv gather", "conv scatter"} <= set(origins), origins
    root = Body(lambda self, h, e: torch.zeros_like(h).index_add_(-2, e[1], h.index_select(-2, e[0]))).to(DTYPE)
    origins = set_origins(root, inputs)
    assert {"Tensor.index_select gather", "Tensor.index_add_ scatter"} <= set(origins), origins


def test_a_data_graph_with_one_edge_is_exact():
    """One message (a position axis of size 1 after the gather). Kills scatter_positions 214 (the
    datapoints read at position 1)."""
    torch.manual_seed(9)
    assert_exact_against_loop(Body(lambda self, h, e: h + torch.zeros_like(h).index_add_(1, e[1, :1], h[:, e[0, :1]])),
                              *signals(seed=9))


def test_refusals_of_scatters_over_signals_name_the_op():
    """Values holding other neurons at each position
    (two layers' outputs joined along the nodes), one neuron twice in a scatter: in full, by the op's name.
    Kills _copy_to 27; graph_op 35, 45-49, 100; scatter_positions 202, 229, 234, 243, 244."""
    refused(lambda self, h, e: torch.zeros(h.shape[0], 5, 10, dtype=h.dtype).index_add_(
        1, torch.tensor([1, 2, 3, 4, 0]), h.repeat(*[1] * (h.dim() - 1), 2))[..., :5], re.escape(
        "Tensor.index_add_: its scatter does not hold the same neurons at every position, one per feature (a "
        "statistic, or one neuron twice)"))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 4)

        def forward(self, x, edge_index):
            h = torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)
            return self.head(torch.relu(h.index_select(1, edge_index[0])).mean(1))

    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "Tensor.index_select: its gather does not hold the same neurons at every position")):
        convert(Two().to(DTYPE), *signals())


def test_a_gather_of_attention_scores_is_refused_by_the_gathers_name():
    """Scores ``h @ h.T`` gathered along the nodes are no neuron values. Kills _graph_operand 11 (the name
    not passed on)."""
    refused(lambda self, h, e: (h @ h.transpose(-1, -2)).index_select(1, e[0]),
            re.escape("Tensor.index_select: attention scores used as neuron values"))


def test_an_index_computed_from_the_inputs_data_is_a_constant_of_the_datapoints():
    """Integer node types ``z`` read by an embedding, and a gather whose index is computed from ``z``
    (``src + 0 * z[src]``: data, not neuron values): exact per graph. Kills _constant_index 12, 14, 15 (a
    data index refused, or read without its value or meta)."""
    class Types(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 5), nn.Linear(5, 4)

        def forward(self, z, edge_index, batch):
            h = self.embed(z)
            src = edge_index[0] + 0 * z[edge_index[0]]
            h = torch.tanh(h + torch.zeros_like(h).index_add_(0, edge_index[1], h.index_select(0, src)))
            return self.head(torch.zeros(int(batch.max()) + 1, 5, dtype=h.dtype).index_add_(0, batch, h))

    torch.manual_seed(10)
    model = Types().to(DTYPE)
    z = torch.randint(0, 7, (9,), generator=torch.Generator().manual_seed(10))
    targets = torch.tensor([0, 1, 2])
    graph = gradgraph.to_graph(model, z, targets, cross_entropy, datapoints=BATCH,
                               forward_kwargs={"edge_index": JOINED_EDGES, "batch": BATCH})
    ours, params = graph.per_sample_grads(), dict(model.named_parameters())
    for i in range(3):
        rows = (BATCH == i).nonzero()[:, 0]
        own = JOINED_EDGES[:, BATCH[JOINED_EDGES[0]] == i] - int(rows[0])
        loss = cross_entropy(model(z[rows], own, torch.zeros(len(rows), dtype=torch.long)), targets[i:i + 1]).sum()
        for (name, param), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(ours[name][i], grad, atol=1e-10, rtol=0, msg=f"{name}, graph {i}")


def test_a_graph_of_one_node_is_exact():
    """One node with two self loops (a node axis of size 1 before the gather). Kills gather_positions 87 (the
    datapoints read at position 1)."""
    torch.manual_seed(11)
    inputs, targets = signals(nodes=1, seed=11)
    assert_exact_against_loop(Body(lambda self, h, e: h + torch.zeros_like(h).index_add_(1, e[1], h[:, e[0]])),
                              inputs, targets, edge_index=torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("reduce", ["amax", "amin", "prod", "mean"])
def test_a_scatter_reduce_over_signals_is_exact_whatever_its_reduction(reduce):
    """``scatter_reduce`` of the messages into their destination nodes with each of torch's reductions (refused,
    but for sum and mean, until session 18: per channel, each is a tied copy whose act is read from the tensor),
    with and without the base's own values (``include_self``)."""
    for include_self in (True, False):
        torch.manual_seed(11)
        body = Body(lambda self, h, e: h + torch.zeros_like(h).scatter_reduce(
            1, e[1].view(1, -1, 1).expand(h.shape[0], -1, 5), torch.tanh(h[:, e[0]]), reduce,
            include_self=include_self))
        assert_exact_against_loop(body, *signals(seed=11))


def with_its_mean(h):
    """``h``'s first four features and the mean of its features (a statistic: no neuron) as the fifth."""
    return torch.cat([h[..., :4], h.mean(-1, keepdim=True)], -1)


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_a_gather_or_scatter_of_features_that_hold_a_statistic_is_refused_by_name(op):
    """``index_select`` (or ``index_add_``) of values whose last feature is the mean of the features, a statistic
    that holds no neuron (id ``-1``): refused, naming the op, as a gather (scatter) that does not hold one neuron
    per feature. Kills ``_copy_to`` 31 (the test for ``-1`` dropped: the copy's edges come from no neuron, and
    gradgraph's own check fails, a ``GradGraphError``, "gradgraph made an edge of kind MERGE into node 12 from a
    value that holds no neuron")."""
    hint = ("If it is an attention score: attention over a data graph's neighbours computed with ops gradgraph has "
            "no rule for (PyG's (x * att).sum(-1) scores, a softmax with a detached maximum) is refused; PyG's "
            "GATConv converts (run op by op), GATv2Conv and TransformerConv do not (docs/gnn.md)")
    if op == "gather":
        body = lambda self, h, e: h + with_its_mean(h).index_select(1, e[0, :5])  # noqa: E731
        words = "Tensor.index_select: its gather"
    else:
        body = lambda self, h, e: h + torch.zeros_like(h).index_add_(-2, e[1], with_its_mean(h)[:, e[0]])  # noqa: E731
        words = "Tensor.index_add_: its scatter"
    refused(body, re.escape(f"{words} does not hold the same neurons at every position, one per feature (a "
                            f"statistic, or one neuron twice). {hint}") + "$")
