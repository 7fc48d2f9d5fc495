"""The symmetry actions on graphs and models that no converted test model had: modules with
running statistics that are no BatchNorm, ties of neuron sets of different kinds and depths whose
nodes interleave, a graph of exactly two edges, a node permutation that sends an edge past the
last slot, a neuron whose first incoming edge is structural, a neuron with one incoming edge.

Found by the mutation runs of ``symmetry/`` (docs/mutation.md, "Not equivalent and not killed");
each test's docstring names the mutants it was checked to fail on (``mutmut show NAME`` in
``.mutation/symmetry/``). Ground truths: the network function (a permuted model computes the same
outputs), the definition of a tie (tied sets move by one rank permutation), and the messages
written out as a user reads them.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import edge_permutation, permute_model, random_node_permutation, rescale_nodes

DTYPE = torch.float64


def cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


class MeanOnlyNorm(nn.Module):
    """Mean-only batch normalisation (Salimans and Kingma, 2016) in eval mode: ``x - mean + bias``,
    a ``running_mean`` buffer and no ``running_var``."""

    def __init__(self, width: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(width))
        self.register_buffer("running_mean", torch.randn(width))

    def forward(self, x):
        return x - self.running_mean + self.bias


class Standardize(nn.Module):
    """``(x - mean) / sqrt(var)`` with both running statistics and no ``bias`` attribute at all."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("running_mean", torch.randn(width))
        self.register_buffer("running_var", torch.rand(width) + 0.5)

    def forward(self, x):
        return (x - self.running_mean) / self.running_var.sqrt()


def test_modules_with_running_statistics_that_are_no_batch_norm_keep_them_under_permute_model():
    """A mean-only norm and a standardisation read their statistics as constants per neuron, so
    the converter pins their sets; ``permute_model`` moves the free first layer and leaves both
    modules' buffers as they were, and the permuted model computes the same function. Checked to
    fail with a module skipped only when it has neither statistic
    (``x__move_running_statistics__mutmut_22``: the mean-only norm's missing ``running_var`` is
    then cloned) and with the ``bias`` attribute read without its default (``29``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 6), MeanOnlyNorm(6), nn.ReLU(),
                          nn.Linear(6, 4), Standardize(4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    inputs = torch.randn(7, 3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    perm = random_node_permutation(graph, generator=generator)
    while torch.equal(perm, torch.arange(graph.num_nodes)):
        perm = random_node_permutation(graph, generator=generator)
    permuted = permute_model(model, graph, perm)
    torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
    for name in ("3.running_mean", "6.running_mean", "6.running_var"):
        assert torch.equal(permuted.state_dict()[name], before[name]), name


class Gated(nn.Module):
    """``down(silu(gate(x)) * up(x))``: one permutation group tying two sets of four neurons."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)).squeeze(-1)


@pytest.mark.parametrize(("kind_b", "layer_b"), [(10, 0), (12, 0)])
def test_tied_sets_of_other_kinds_and_depths_with_interleaved_nodes_move_by_one_rank_permutation(kind_b, layer_b):
    """A hand-made graph: the gated unit's two tied sets relabelled as set A (kind 9, layer 1) on
    nodes 3, 5, 7, 9 and set B (kind ``kind_b``, layer ``layer_b``) on nodes 4, 6, 8, 10, both
    holding positions 0-3. A uniform element of the group moves A within A and B within B, neuron
    ``r`` of both to the same new position. Checked to fail (the two sets then share one label,
    read as runs of consecutive nodes, which hold positions twice: an error) with the label
    ``kind * (L + 1) + layer`` made ``kind + layer`` or ``kind * (L - 1) + layer`` (case
    ``(10, 0)``: ``x_random_node_permutation__mutmut_40``, ``42``) and ``kind / (L + 1) + layer``
    (case ``(12, 0)``: ``39``)."""
    torch.manual_seed(0)
    graph = gradgraph.to_graph(Gated().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    set_a, set_b = torch.tensor([3, 5, 7, 9]), torch.tensor([4, 6, 8, 10])
    assert graph.perm_group[3:11].eq(0).all() and int(graph.layer.max()) == 2
    graph.node_kind = graph.node_kind.clone()
    graph.layer, graph.position = graph.layer.clone(), graph.position.clone()
    graph.node_kind[set_a], graph.layer[set_a], graph.position[set_a] = 9, 1, torch.arange(4)
    graph.node_kind[set_b], graph.layer[set_b], graph.position[set_b] = kind_b, layer_b, torch.arange(4)
    generator = torch.Generator().manual_seed(2)
    moved = 0
    for _ in range(5):
        perm = random_node_permutation(graph, generator=generator)
        assert set(perm[set_a].tolist()) == set(set_a.tolist())
        assert set(perm[set_b].tolist()) == set(set_b.tolist())
        assert torch.equal(graph.position[perm[set_a]], graph.position[perm[set_b]])
        moved += int((perm != torch.arange(graph.num_nodes)).sum())
    assert moved > 0


def fields_of(graph) -> dict:
    return {key: value for key, value in graph}


def test_a_graph_of_two_parallel_edges_is_refused():
    """``Linear(1, 1)``'s one edge listed twice: the two slots are ambiguous, so no edge
    permutation is given. Checked to fail with the duplicate check skipped for fewer than three
    edges (``x_edge_permutation__mutmut_26``)."""
    graph = gradgraph.to_graph(nn.Linear(1, 1).to(DTYPE), torch.randn(4, 1, dtype=DTYPE))
    assert graph.num_edges == 1
    fields = fields_of(graph)
    for key in ("edge_attr", "edge_kind", "edge_param", "edge_param_pos"):
        fields[key] = torch.cat([graph[key], graph[key]])
    fields["edge_index"] = torch.cat([graph.edge_index, graph.edge_index], dim=1)
    doubled = gradgraph.GradGraph(**fields)
    message = "edge_permutation: the graph has parallel edges of one kind; slots are ambiguous"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        edge_permutation(doubled, torch.arange(doubled.num_nodes))


def test_a_permutation_that_sends_an_edge_past_the_last_slot_is_named_not_a_symmetry():
    """Swapping hidden node 4 with output node 5 sends the edge ``4 -> 6`` to ``5 -> 6``, a key
    beyond every slot of the graph: the answer is the "not a symmetry" message, not an
    ``IndexError``. Checked to fail with the search clamped one slot past the end
    (``x_edge_permutation__mutmut_45``)."""
    torch.manual_seed(0)
    graph = gradgraph.to_graph(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).to(DTYPE),
                               torch.randn(4, 2, dtype=DTYPE), torch.tensor([0, 1, 1, 0]), cross_entropy)
    num_nodes = graph.num_nodes  # inputs 0-1, hidden 2-4, outputs 5-6
    src, dst = graph.edge_index
    last_slot = int(((graph.edge_kind * num_nodes + dst) * num_nodes + src).max())
    perm = torch.arange(num_nodes)
    perm[[4, 5]] = perm[[5, 4]]
    moved_key = (graph.edge_kind * num_nodes + perm[dst]) * num_nodes + perm[src]
    assert int(moved_key.max()) > last_slot  # an edge goes past the last slot
    message = "edge_permutation: the permutation maps an edge onto no edge; it is not a symmetry"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        edge_permutation(graph, perm)


class Residual(nn.Module):
    """``out(h + mix(tanh(h)))`` with ``h = inp(x)``: the sum's neurons are fed by ``mix``'s
    weights and by a structural residual edge, and carry ``mix``'s bias."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.mix(torch.tanh(h)))


def test_a_neuron_whose_first_incoming_edge_is_structural_is_named_by_its_bias():
    """The graph with its edges in reverse order (the same network: edge order carries no
    meaning), so the residual stream's neuron 5 is first fed by its structural ``RESIDUAL``
    edge: the message names the module from the neuron's bias, ``mix``, as for the graph in the
    converter's order. Checked to fail with the bias not read (``x__module_of_node__mutmut_33``,
    ``34``, ``39``, ``40``: no module named) and read only where the graph has no ``node_param``
    (``44``)."""
    torch.manual_seed(0)
    graph = gradgraph.to_graph(Residual().to(DTYPE), torch.randn(4, 2, dtype=DTYPE))
    fields = fields_of(graph)
    for key in ("edge_attr", "edge_kind", "edge_param", "edge_param_pos"):
        fields[key] = graph[key].flip(0)
    fields["edge_index"] = graph.edge_index.flip(1)
    reversed_edges = gradgraph.GradGraph(**fields)
    first_in = torch.nonzero(reversed_edges.edge_index[1] == 5).flatten()[0]
    assert int(reversed_edges.edge_param[first_in]) < 0  # the structural edge comes first
    factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    factors[5] = 2.0
    message = ("transform_nodes: cannot apply factor 2 to node 5 (module 'mix', position 0, kind RESIDUAL, "
               "activation IDENTITY): only hidden neurons are transformed; inputs, outputs and other node kinds "
               "keep factor 1")
    for each in (graph, reversed_edges):
        with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
            rescale_nodes(each, factors)


def test_a_neuron_with_one_incoming_edge_is_named_by_its_module():
    """``Linear(1, 3)``'s neurons have one incoming edge each; the message names their module.
    Checked to fail with the second incoming edge read (``x__module_of_node__mutmut_32``: an
    ``IndexError``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)
    graph = gradgraph.to_graph(model, torch.randn(4, 1, dtype=DTYPE))
    factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    factors[2] = 2.0  # input 0, Tanh neurons 1-3
    message = ("transform_nodes: cannot apply factor 2 to node 2 (module '0', position 1, kind HIDDEN, "
               "activation TANH): a positive factor != 1 needs a positively homogeneous activation "
               "(IDENTITY, RELU, LEAKY_RELU)")
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_nodes(graph, factors)
