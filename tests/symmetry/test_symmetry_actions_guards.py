"""Permutation and scaling actions where the mutation campaign on ``symmetry/`` found them
untested (docs/mutation.md): a BatchNorm's running statistics under ``permute_model``, the
model left untouched by the actions that copy it, reproducible random permutations, the
component permutation's guard and its ``component_x``, and the error messages (matched in
full, as a user reads them; on a Batch the message names the graph and that graph's module).

Ground truths: the network function (a permuted model computes the same outputs), the
original model's parameters and buffers before the call, and the statistics moved by hand.
Each test's docstring names the mutants it was checked against (``mutmut show NAME`` in
``.mutation/symmetry/``).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.symmetry import (
    edge_permutation,
    flip_nodes,
    hidden_factors_to_node_factors,
    hidden_perms_to_node_permutation,
    permute_components,
    permute_ffn_hidden,
    permute_heads,
    permute_hidden,
    permute_model,
    permute_nodes,
    random_hidden_perms,
    random_node_factors,
    random_node_permutation,
    rescale_hidden,
    rescale_nodes,
)
from gradgraph.symmetry.permutation import perm_structure

DTYPE = torch.float64


def cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


def batch_norm_mlp(seed: int) -> nn.Sequential:
    """``Linear(3, 5) -> BatchNorm1d(5) -> ReLU -> Linear(5, 2)`` in eval mode, with running
    statistics that differ channel by channel (so a channel's statistics cannot be swapped
    unnoticed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).to(DTYPE).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(5))
        model[1].running_var.copy_(torch.rand(5) + 0.5)
        model[1].weight.copy_(torch.randn(5))
        model[1].bias.copy_(torch.randn(5))
    return model


@pytest.mark.parametrize("seed", range(4))
def test_permute_model_moves_batch_norm_statistics_with_the_channels(seed):
    """The permuted model computes the same function; its running statistics are the
    original's, moved as the BatchNorm's bias moved; the original model is left as it was.
    Checked to fail with the ``_move_running_statistics`` mutants that change which module's
    statistics move or where to (``x__move_running_statistics__mutmut_1``-``40`` but those
    listed as equivalent or not killed in docs/mutation.md: e.g. the bias test negated, the
    bias name misspelt, the old and new channel swapped, the move skipped), with
    ``permute_model`` passing no graph to it (``x_permute_model__mutmut_21``) and
    with the model copied shallowly (``x_permute_model__mutmut_13``: the original's
    parameters change)."""
    model = batch_norm_mlp(seed)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    graph = gradgraph.to_graph(model, inputs, torch.randint(0, 2, (6,)), cross_entropy)
    generator = torch.Generator().manual_seed(100 + seed)
    perm = random_node_permutation(graph, generator=generator)
    while torch.equal(perm, torch.arange(graph.num_nodes)):
        perm = random_node_permutation(graph, generator=generator)
    permuted = permute_model(model, graph, perm)
    torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
    # the statistics by hand: channel c (the bias node at position c) goes to the channel of
    # the node it is moved to
    bias_nodes = torch.nonzero(graph.node_param == graph.param_names.index("1.bias")).flatten()
    old, new = graph.node_param_pos[bias_nodes], graph.node_param_pos[perm[bias_nodes]]
    assert not torch.equal(old, new)  # the channels moved, so the check below can fail
    for key in ("running_mean", "running_var"):
        expected = before[f"1.{key}"].clone()
        expected[new] = before[f"1.{key}"][old]
        torch.testing.assert_close(getattr(permuted[1], key), expected, atol=0, rtol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"permute_model changed the original's {name}"


def test_permute_model_names_a_parameter_the_model_lacks():
    """Checked to fail with the message dropped (``x_permute_model__mutmut_17``)."""
    model = batch_norm_mlp(0)
    graph = gradgraph.to_graph(model, torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,)), cross_entropy)
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).to(DTYPE)
    message = "permute_model: the graph has parameter '1.weight', which the model lacks"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        permute_model(other, graph, torch.arange(graph.num_nodes))


def mlp() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)


def test_permute_hidden_leaves_the_original_model_and_names_itself_in_errors():
    """Checked to fail with the model copied shallowly (``x_permute_hidden__mutmut_11``) and
    with the name in the guard's message dropped or changed (``x_permute_hidden__mutmut_17``,
    ``23``, ``24``; ``x_hidden_perms_to_node_permutation__mutmut_13``, ``17``, ``18``)."""
    model = mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs = torch.randn(5, 2, dtype=DTYPE)
    permuted = permute_hidden(model, [torch.tensor([3, 1, 0, 2]), torch.tensor([2, 0, 1])])
    torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"permute_hidden changed the original's {name}"
    graph = gradgraph.to_graph(model, inputs)
    message = "permute_hidden: permutation 1 must be a permutation of range(3), got shape [4]"
    for target in (model, graph):
        with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
            permute_hidden(target, [torch.arange(4), torch.arange(4)])
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        hidden_perms_to_node_permutation(graph, [torch.arange(4), torch.arange(4)])
    message = "permute_hidden: expected 2 permutations (one per hidden layer), got 1"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        permute_hidden(model, [torch.arange(4)])


def test_permutations_given_as_whole_number_floats_are_read_as_indices():
    """A permutation may come as any tensor of whole numbers: it is read as indices.
    Checked to fail with the conversion to ``long`` dropped (``x__check_layer_perms__mutmut_11``,
    ``13``; ``x_permute_components__mutmut_3``, ``5``)."""
    model = mlp()
    graph = gradgraph.to_graph(model, torch.randn(5, 2, dtype=DTYPE))
    perms = [torch.tensor([3, 1, 0, 2]), torch.tensor([2, 0, 1])]
    expected = permute_hidden(graph, perms)
    got = permute_hidden(graph, [perm.to(DTYPE) for perm in perms])
    for key in ("x", "act", "grad", "edge_attr"):
        assert torch.equal(got[key], expected[key]), key
    components = torch.tensor([4, 2, 0, 1, 3])
    expected = permute_components(graph, components)
    got = permute_components(graph, components.to(DTYPE))
    for key in ("act", "grad", "component_sample"):
        assert torch.equal(got[key], expected[key]), key


def test_random_hidden_perms_follow_the_generator():
    """Checked to fail with the generator not passed on (``x_random_hidden_perms__mutmut_4``,
    ``6``): two calls with generators seeded alike must agree, whatever the global seed."""
    model = mlp()
    torch.manual_seed(1)
    first = random_hidden_perms(model, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    second = random_hidden_perms(model, generator=torch.Generator().manual_seed(7))
    assert [len(perm) for perm in first] == [4, 3]
    for one, two in zip(first, second):
        assert torch.equal(one, two)


def test_permute_components_checks_the_permutation_and_moves_component_x():
    """A vector of the right length that is not a permutation is refused (checked to fail with
    the guard's ``or`` made ``and``: ``x_permute_components__mutmut_8``); ``component_x`` moves
    with ``act`` (checked to fail with it left or dropped: ``x_permute_components__mutmut_21``,
    ``26``, ``27``, ``29``)."""
    graph = gradgraph.to_graph(mlp(), torch.randn(5, 2, dtype=DTYPE))
    message = "permute_components: perm must be a permutation of range(5)"
    for bad in (torch.tensor([0, 0, 1, 2, 3]), torch.arange(4), torch.arange(6)):
        with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
            permute_components(graph, bad)
    graph.component_x = torch.randn(graph.num_nodes, 5, 3, dtype=DTYPE)
    perm = torch.tensor([4, 2, 0, 1, 3])
    moved = permute_components(graph, perm)
    assert torch.equal(moved.component_x, graph.component_x[:, perm])
    assert torch.equal(moved.act, graph.act[:, perm])


def test_scale_and_sign_guards_say_what_is_wrong():
    """Matched in full. Checked to fail with the positive-scale guard weakened or dropped (a
    zero scale then reaches ``transform_nodes``' other message: ``x_rescale_nodes__mutmut_3``,
    ``4``) and with the messages dropped or changed (``x_rescale_nodes__mutmut_6``-``8``,
    ``x_flip_nodes__mutmut_11``-``13``, ``x_hidden_factors_to_node_factors__mutmut_1``)."""
    graph = gradgraph.to_graph(mlp(), torch.randn(5, 2, dtype=DTYPE))
    ones = torch.ones(graph.num_nodes, dtype=DTYPE)
    zero = ones.clone()
    zero[3] = 0.0
    message = "rescale_nodes: scales must be > 0; use flip_nodes or transform_nodes for signs"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_nodes(graph, zero)
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_nodes(graph, -ones)
    with pytest.raises(GradGraphError, match=r"^flip_nodes: signs must be \+1 or -1$"):
        flip_nodes(graph, 2 * ones)
    batch = Batch.from_data_list([graph, graph])
    message = "hidden_factors_to_node_factors needs one graph, got a Batch; use node factors [N]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        hidden_factors_to_node_factors(batch, [None, None])


class Named(nn.Module):
    """An MLP whose modules have names (``enc``, ``dec``), unlike a ``Sequential``'s."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(2, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_on_a_batch_the_message_names_the_graph_and_its_own_module():
    """Two architectures in one Batch: a bad factor on graph 1's Tanh neuron is described with
    graph 1's module name (``enc``; graph 0's parameter of the same index is ``0.weight``).
    Checked to fail with the graph index not read from ``batch`` (``x__describe_node__mutmut_4``,
    ``5``) and with ``_module_of_node`` reading graph 0's names or another parameter (its
    mutants but those listed in docs/mutation.md)."""
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).to(DTYPE)
    inputs = torch.randn(3, 2, dtype=DTYPE)
    graphs = [gradgraph.to_graph(first, inputs), gradgraph.to_graph(Named().to(DTYPE), inputs)]
    batch = Batch.from_data_list(graphs)
    factors = torch.ones(batch.num_nodes, dtype=DTYPE)
    node = graphs[0].num_nodes + 3  # graph 1: inputs 0-1, Tanh neurons 2-4
    factors[node] = 2.0
    message = (
        f"transform_nodes: cannot apply factor 2 to node {node} (graph 1, module 'enc', position 1, kind HIDDEN, "
        "activation TANH): a positive factor != 1 needs a positively homogeneous activation "
        "(IDENTITY, RELU, LEAKY_RELU)"
    )
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_nodes(batch, factors)
    # the output neuron: its module is found from its incoming weights, not its bias
    factors = torch.ones(batch.num_nodes, dtype=DTYPE)
    factors[batch.num_nodes - 1] = 2.0
    output = f"node {batch.num_nodes - 1} (graph 1, module 'dec', position 0, kind OUTPUT"
    with pytest.raises(GradGraphError, match=re.escape(output)):
        rescale_nodes(batch, factors)
    # an input neuron has no module
    factors = torch.ones(batch.num_nodes, dtype=DTYPE)
    factors[graphs[0].num_nodes] = 2.0
    first_input = f"node {graphs[0].num_nodes} (graph 1, position 0, kind INPUT,"
    with pytest.raises(GradGraphError, match=re.escape(first_input)):
        rescale_nodes(batch, factors)
    # and permute_nodes on the Batch moves each graph on its own (a sanity check of the fixture)
    permuted = permute_nodes(batch, torch.arange(batch.num_nodes))
    assert torch.equal(permuted.act, batch.act)


def tanh_relu_mlp() -> nn.Sequential:
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).to(DTYPE)


def test_rescale_hidden_refuses_what_changes_the_function_and_skips_none_layers():
    """A scale below 1 on a Tanh layer is refused like one above it (checked to fail with the
    rescaling test made ``factor > 1``: ``x__admits__mutmut_17``); an infinite scale is refused
    (``or`` made ``and``, message dropped: ``x__admits__mutmut_2``, ``9`` in the
    run before ``_admits`` lost its unreachable zero test; the message is now "must be finite"); a ``None`` layer
    before a scaled one leaves the later layer's factors in place (checked to fail with the
    loop's ``continue`` made ``break``: ``x_hidden_factors_to_node_factors__mutmut_28``); the
    shape guard's message (``33``, ``34``); the name of the action in the messages of the model
path (``x__transform_model__mutmut_11``, ``23``). Messages matched in full."""
    model = tanh_relu_mlp()
    graph = gradgraph.to_graph(model, torch.randn(3, 2, dtype=DTYPE))
    message = (
        "rescale_hidden: cannot rescale the neurons of '0' (Linear(in_features=2, out_features=4, bias=True)): "
        "its activation TANH is not positively homogeneous (only IDENTITY, RELU, LEAKY_RELU are)"
    )
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_hidden(model, [0.5 * torch.ones(4, dtype=DTYPE), None])
    message = "rescale_hidden: expected 2 factor tensors (one per hidden layer), got 1"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_hidden(model, [None])
    message = "rescale_hidden: factors for '2' must have shape [3], got [4]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_hidden(model, [None, torch.ones(4, dtype=DTYPE)])
    message = "rescale_hidden: factors for '2' must be finite"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_hidden(model, [None, torch.full((3,), float("inf"), dtype=DTYPE)])
    scales = torch.tensor([2.0, 0.5, 3.0], dtype=DTYPE)
    node_factors = hidden_factors_to_node_factors(graph, [None, scales])
    relu_nodes = torch.nonzero(graph.perm_group == 1).flatten()
    expected = torch.ones(graph.num_nodes, dtype=DTYPE)
    expected[relu_nodes[torch.argsort(graph.position[relu_nodes])]] = scales
    assert torch.equal(node_factors, expected)
    # the graph action agrees with the model action
    on_graph = rescale_hidden(graph, [None, scales])
    of_model = gradgraph.to_graph(rescale_hidden(model, [None, scales]), torch.randn(3, 2, dtype=DTYPE))
    torch.testing.assert_close(on_graph.edge_attr, of_model.edge_attr, atol=1e-12, rtol=0)
    message = "factors for hidden layer 1 must have shape [3], got [2]"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        hidden_factors_to_node_factors(graph, [None, torch.ones(2)])


class Gated(nn.Module):
    """A gated unit, ``down(silu(gate(x)) * up(x))``: its permutation group ties two neuron
    sets of one kind and depth (the gate's and the up projection's outputs), one row each."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)).squeeze(-1)


def gated_graph():
    torch.manual_seed(0)
    model = Gated().to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    return model, inputs, gradgraph.to_graph(model, inputs)


def test_a_tie_of_two_sets_of_one_kind_moves_them_together():
    """The gate's neuron ``i`` and the up projection's neuron ``i`` move together, so the
    permuted model computes the same function. Checked to fail with ``_tied_table`` reading
    the nodes of the other kinds (``x__tied_table__mutmut_5``) and with the split into runs
    made one run (``13``)."""
    model, inputs, graph = gated_graph()
    hidden = torch.nonzero(graph.perm_group >= 0).flatten()
    assert len(hidden) == 8 and len(torch.unique(graph.node_kind[hidden])) == 1  # one kind, two sets
    generator = torch.Generator().manual_seed(1)
    moved = 0
    for _ in range(6):
        perm = random_node_permutation(graph, generator=generator)
        permuted = permute_model(model, graph, perm)
        torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
        moved += int((perm != torch.arange(graph.num_nodes)).sum())
    assert moved > 0


def test_ties_whose_sets_do_not_match_are_refused():
    """A hand-made graph whose tied sets disagree (positions, or sizes of the kinds): a clear
    error, never a wrong permutation. Checked to fail with the three messages dropped
    (``x__tied_table__mutmut_8``, ``16``, ``21``)."""
    _, _, graph = gated_graph()
    where = "group 0, block 0, tie 0"
    # nodes 3-6: the gate's outputs (positions 0-3), 7-10: the up projection's (0-3)
    extra_position = graph.clone()
    extra_position.position = graph.position.clone()
    extra_position.position[4] = 4  # five positions over eight nodes
    repeated_position = graph.clone()
    repeated_position.position = graph.position.clone()
    repeated_position.position[4] = 0  # a set holding position 0 twice
    mismatched = "random_node_permutation: group 0, block 0, tie 0 ties sets whose positions do not match"
    for bad in (extra_position, repeated_position):
        with pytest.raises(GradGraphError, match=f"^{re.escape(mismatched)}$"):
            random_node_permutation(bad)
    sizes = graph.clone()
    sizes.layer = graph.layer.clone()
    sizes.layer[7:9], sizes.layer[9:11] = 2, 3  # kinds of 4, 2 and 2 nodes in one tie
    sizes.layer[11] = 4
    message = f"random_node_permutation: {where} ties kinds with different numbers of nodes"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        random_node_permutation(sizes)


def test_random_node_permutation_on_a_batch_moves_every_group_of_every_graph_within_its_graph():
    """A Batch of a three-layer MLP and a gated unit: each graph's nodes stay in that graph,
    every hidden neuron of every graph moves in some draw, and the draw is a symmetry of each
    source network. Checked to fail with the Batch key of a group shifted so that a group of
    graph 0 falls out (``x_random_node_permutation__mutmut_15``: group 0; ``16``: group 2)."""
    gated, inputs, gated_graph_ = gated_graph()
    torch.manual_seed(3)
    mlp3 = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.ReLU(),
                         nn.Linear(2, 1)).to(DTYPE)
    mlp_graph = gradgraph.to_graph(mlp3, inputs)
    batch = Batch.from_data_list([mlp_graph, gated_graph_])
    generator = torch.Generator().manual_seed(0)
    moved = torch.zeros(batch.num_nodes, dtype=torch.bool)
    offset = mlp_graph.num_nodes
    for _ in range(12):
        perm = random_node_permutation(batch, generator=generator)
        assert torch.equal(batch.batch[perm], batch.batch)  # no node leaves its graph
        moved |= perm != torch.arange(batch.num_nodes)
        for model, graph, own in ((mlp3, mlp_graph, perm[:offset]), (gated, gated_graph_, perm[offset:] - offset)):
            torch.testing.assert_close(permute_model(model, graph, own)(inputs), model(inputs), atol=1e-12, rtol=0)
    hidden = batch.perm_group >= 0
    assert bool(moved[hidden].all()), "a hidden neuron never moved"
    assert not bool(moved[~hidden].any())


def test_random_node_permutation_follows_the_generator_in_tied_groups():
    """Two draws with generators seeded alike agree, whatever the global seed, also where
    blocks and ties are shuffled (the gated unit's tie). Checked to fail with the generator
    not passed to the block or rank shuffles (``x_random_node_permutation__mutmut_101``,
    ``106``, ``108``)."""
    _, _, graph = gated_graph()
    torch.manual_seed(1)
    first = random_node_permutation(graph, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(2)
    second = random_node_permutation(graph, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second)


class EncoderRegressor(nn.Module):
    """A post-norm encoder layer with 4 heads, mean-pooled into one output: ``[b, T, 8] -> [b]``.
    Its graph has blocks (the heads) and ties (query/key, value/output dims of a head)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 4, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1)).squeeze(-1)


def test_random_node_permutation_of_a_transformer_graph_is_a_symmetry_of_the_model():
    """Heads are shuffled as blocks and each head's tied dims move together: the permuted
    model computes the same function, draws are reproducible, and they move many nodes.
    Checked to fail with ``perm_tie`` not read (``x_perm_structure__mutmut_26``, ``27``,
    ``32``, ``33``, ``39``), with the block shuffle not seeded (``x_random_node_permutation__mutmut_101``)
    and with the one-flat-set shortcut taken for tied groups (``x_random_node_permutation__mutmut_57``, ...)."""
    torch.manual_seed(0)
    model = EncoderRegressor().to(DTYPE).eval()
    inputs = torch.randn(3, 2, 8, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs)
    assert len(torch.unique(graph.perm_block[graph.perm_block >= 0])) == 4
    for seed in range(4):
        perm = random_node_permutation(graph, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(100 + seed)
        again = random_node_permutation(graph, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(perm, again)
        assert int((perm != torch.arange(graph.num_nodes)).sum()) > 10
        torch.testing.assert_close(permute_model(model, graph, perm)(inputs), model(inputs), atol=1e-12, rtol=0)
    # the two ties of a head (query/key dims, value/output dims) move independently: some
    # draw moves a query dim inside its head while leaving that head's value dims in order
    query = torch.nonzero(graph.node_kind == gradgraph.NodeKind.QUERY).flatten()
    value = torch.nonzero(graph.node_kind == gradgraph.NodeKind.VALUE).flatten()
    assert len(torch.unique(graph.perm_tie[query])) == 1
    assert not torch.equal(graph.perm_tie[query], graph.perm_tie[value])

    def rank_in_head(perm, nodes):
        return graph.position[perm[nodes]] % 2  # head width 2: the dim's rank inside its head

    independent = False
    for seed in range(4, 40):
        perm = random_node_permutation(graph, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(rank_in_head(perm, query) == graph.position[query] % 2,
                           rank_in_head(perm, value) == graph.position[value] % 2):
            independent = True
            break
    assert independent, "the query/key tie and the value/output tie of a head always moved together"


def test_permute_nodes_keeps_nodes_in_their_graph_and_reads_whole_number_floats():
    """In a Batch of two copies of one graph, swapping a hidden neuron of graph 0 with its twin
    in graph 1 keeps every other label and is refused by the ``batch`` label (checked to fail
    with that key misspelt: ``x_permute_nodes__mutmut_23``, ``24``). A permutation of whole
    number floats is read as indices, also by ``permute_model``'s statistics move (checked to
    fail with the conversion to ``long`` dropped: ``x_permute_nodes__mutmut_4``, ``7``;
    ``x__move_running_statistics__mutmut_3``, ``5``)."""
    graph = gradgraph.to_graph(mlp(), torch.randn(5, 2, dtype=DTYPE))
    batch = Batch.from_data_list([graph, graph])
    swap = torch.arange(batch.num_nodes)
    swap[3], swap[graph.num_nodes + 3] = graph.num_nodes + 3, 3
    message = "permute_nodes: the permutation moves nodes across different 'batch' values"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        permute_nodes(batch, swap)
    perm = hidden_perms_to_node_permutation(graph, [torch.tensor([3, 1, 0, 2]), torch.tensor([2, 0, 1])])
    expected, got = permute_nodes(graph, perm), permute_nodes(graph, perm.to(DTYPE))
    for key in ("x", "act", "grad", "edge_attr"):
        assert torch.equal(got[key], expected[key]), key
    model = batch_norm_mlp(1)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    bn_graph = gradgraph.to_graph(model, inputs, torch.randint(0, 2, (6,)), cross_entropy)
    perm = random_node_permutation(bn_graph, generator=torch.Generator().manual_seed(3))
    expected, got = permute_model(model, bn_graph, perm), permute_model(model, bn_graph, perm.to(DTYPE))
    for name, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], value), name


class SpareNorm(nn.Module):
    """A BatchNorm that the forward never uses (its bias is in no graph), listed before the one
    it uses."""

    def __init__(self):
        super().__init__()
        self.spare = nn.BatchNorm1d(5)
        self.body = batch_norm_mlp(2)

    def forward(self, x):
        return self.body(x)


def test_a_batch_norm_outside_the_graph_does_not_stop_the_statistics_move():
    """Checked to fail with the module loop's ``continue`` made ``break``
    (``x__move_running_statistics__mutmut_40``): the spare norm, first in the module order,
    would end the loop before the used one."""
    model = SpareNorm().to(DTYPE).eval()
    inputs = torch.randn(6, 3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, torch.randint(0, 2, (6,)), cross_entropy)
    assert "spare.bias" not in graph.param_names
    perm = random_node_permutation(graph, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(perm, torch.arange(graph.num_nodes))
    torch.testing.assert_close(permute_model(model, graph, perm)(inputs), model(inputs), atol=1e-12, rtol=0)


def test_parallel_edges_of_one_kind_are_refused():
    """A hand-made graph with one edge listed twice: its slots are ambiguous, so no edge
    permutation is given. Checked to fail with the duplicate test dropped or comparing only
    the first key (``x_edge_permutation__mutmut_27``, ``30``) and with the message dropped or
    changed (``32``, ``33``)."""
    graph = gradgraph.to_graph(mlp(), torch.randn(5, 2, dtype=DTYPE))
    fields = {key: value for key, value in graph}
    extra = 5  # not the edge with the smallest slot key
    for key in ("edge_attr", "edge_kind", "edge_param", "edge_param_pos"):
        fields[key] = torch.cat([graph[key], graph[key][extra:extra + 1]])
    fields["edge_index"] = torch.cat([graph.edge_index, graph.edge_index[:, extra:extra + 1]], dim=1)
    doubled = gradgraph.GradGraph(**fields)
    message = "edge_permutation: the graph has parallel edges of one kind; slots are ambiguous"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        permute_nodes(doubled, torch.arange(doubled.num_nodes))


def test_graphs_without_blocks_and_ties_get_one_block_and_one_tie_per_group():
    """A hand-made graph may leave out ``perm_block`` / ``perm_tie``: every group is then one
    block with one tie (``0`` on its nodes, ``-1`` elsewhere), and random permutations still
    are symmetries. Checked to fail with the default dropped or shifted
    (``x_perm_structure__mutmut_2``, ``9``, ``10``, ``16``, ``17``) and with a missing field
    returned as is (``34``, ``37``). ``edge_permutation`` reads a whole-number float
    permutation as indices (its mutants 4 and 7, which drop the cast, give the same slots:
    equivalent, docs/mutation.md)."""
    model = mlp()
    inputs = torch.randn(5, 2, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs)
    bare = graph.clone()
    del bare.perm_block, bare.perm_tie
    group, block, tie = perm_structure(bare)
    expected = torch.where(graph.perm_group >= 0, 0, -1)
    assert torch.equal(group, graph.perm_group) and torch.equal(block, expected) and torch.equal(tie, expected)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        perm = random_node_permutation(bare, generator=generator)
        torch.testing.assert_close(permute_model(model, bare, perm)(inputs), model(inputs), atol=1e-12, rtol=0)
    assert torch.equal(edge_permutation(graph, perm.to(DTYPE)), edge_permutation(graph, perm))


class NestedNoBias(nn.Module):
    """A hidden layer without bias, two module levels deep (``block.0``)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(2, 3, bias=False))
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.block(x)))


def test_the_message_names_a_nested_module_found_from_its_weights():
    """A neuron without a bias is described by the module of its incoming weights, with its
    full dotted path. Checked to fail with the weights not read (``x__module_of_node__mutmut_20``,
    ``21``, ``26``, ``27``, ``29``) and with the path cut at its first dot
    (``54``, ``55``, ``57``); and the count message of ``hidden_factors_to_node_factors``
    (``x_hidden_factors_to_node_factors__mutmut_12``)."""
    torch.manual_seed(1)
    graph = gradgraph.to_graph(NestedNoBias().to(DTYPE), torch.randn(4, 2, dtype=DTYPE))
    factors = torch.ones(graph.num_nodes, dtype=DTYPE)
    factors[3] = 2.0  # inputs 0-1, Tanh neurons 2-4
    message = (
        "transform_nodes: cannot apply factor 2 to node 3 (module 'block.0', position 1, kind HIDDEN, "
        "activation TANH): a positive factor != 1 needs a positively homogeneous activation "
        "(IDENTITY, RELU, LEAKY_RELU)"
    )
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        rescale_nodes(graph, factors)
    message = "expected 1 factor tensors (one per hidden layer), got 2"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        hidden_factors_to_node_factors(graph, [None, None])


def test_head_and_feed_forward_permutations_read_whole_number_floats_as_indices():
    """Checked to fail with the conversion to ``long`` dropped (``x__replace__mutmut_17``,
    ``19``: heads; ``30``, ``32``: feed-forward neurons)."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, batch_first=True).to(DTYPE)
    for action, perm in ((permute_heads, torch.tensor([1, 0])), (permute_ffn_hidden, torch.tensor([5, 3, 0, 1, 4, 2]))):
        expected, got = action(layer, [perm]).state_dict(), action(layer, [perm.to(DTYPE)]).state_dict()
        for name, value in expected.items():
            assert torch.equal(got[name], value), (action.__name__, name)


class OneDimHeads(EncoderRegressor):
    """:class:`EncoderRegressor` with width 4 and 4 heads: every head has one dim."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 4, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 1)


def test_heads_of_one_dim_and_blocks_that_differ():
    """Heads of width 1 are shuffled as blocks like any other (checked to fail with the block
    shape read from a second column: ``x_random_node_permutation__mutmut_91``); a hand-made
    graph whose heads differ in their ties is refused in full words (checked to fail with the
    message dropped: ``96``)."""
    torch.manual_seed(2)
    model = OneDimHeads().to(DTYPE).eval()
    inputs = torch.randn(3, 2, 4, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs)
    for seed in range(3):
        perm = random_node_permutation(graph, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(permute_model(model, graph, perm)(inputs), model(inputs), atol=1e-12, rtol=0)
    uneven = graph.clone()
    uneven.perm_tie = graph.perm_tie.clone()
    head = torch.nonzero((graph.perm_block == 1) & (graph.node_kind == gradgraph.NodeKind.VALUE)).flatten()
    uneven.perm_tie[head] = 0  # head 1's value dim joins its query/key tie
    group = int(graph.perm_group[head[0]])
    message = f"random_node_permutation: the blocks of permutation group {group} differ"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        random_node_permutation(uneven)


def test_random_node_permutation_on_a_batch_of_many_graphs_keeps_groups_apart():
    """Four graphs of two groups each: the Batch key of (graph, group) must stay one-to-one
    however many graphs there are (checked to fail with the graph's offset divided instead of
    multiplied, ``x_random_node_permutation__mutmut_17``: graph 3's group 0 then shares a key
    with graph 0's group 1). And a node permutation that is not a symmetry is refused in
    full words (``x_edge_permutation__mutmut_55``)."""
    model = mlp()
    graphs = [gradgraph.to_graph(model, torch.randn(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(s)))
              for s in range(4)]
    batch = Batch.from_data_list(graphs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = random_node_permutation(batch, generator=generator)
        assert torch.equal(batch.batch[perm], batch.batch)
        assert torch.equal(batch.perm_group[perm], batch.perm_group)
        permute_nodes(batch, perm)
    graph = graphs[0]
    swap = torch.arange(graph.num_nodes)
    swap[2], swap[6] = 6, 2  # a neuron of hidden layer 0 with one of hidden layer 1
    message = "edge_permutation: the permutation maps an edge onto no edge; it is not a symmetry"
    with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
        edge_permutation(graph, swap)


def test_random_node_factors_follow_the_range_the_generator_and_the_admissible_set():
    """Scales lie in ``scale_range`` (log-uniform: both ends of a wide range are reached), signs
    take both values, nodes that admit neither keep 1, ``low == high`` gives that scale, the
    draw follows the generator (whatever the global seed), and a range with ``low <= 0`` is
    refused in full words. Checked to fail with the range's arithmetic changed
    (``x_random_node_factors__mutmut_14``, ``21``, ``26``), the generator not passed on
    (``16``, ``19``, ``37``, ``39``), every sign flipped (``41``), ``low == 0`` allowed or
    ``low == high`` refused (``6``, ``7``) and the message dropped (``8``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6), nn.Identity(),
                          nn.Linear(6, 1)).to(DTYPE)
    graph = gradgraph.to_graph(model, torch.randn(4, 2, dtype=DTYPE))
    can_scale, can_flip = gradgraph.symmetry.admissible_transformations(graph)
    assert bool(can_scale.any()) and bool(can_flip.any()) and not bool((can_scale | can_flip).all())
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(random_node_factors(graph, scale_range=(0.5, 8.0), generator=torch.Generator().manual_seed(4)))
    assert torch.equal(draws[0], draws[1])
    magnitudes, signs = [], []
    generator = torch.Generator().manual_seed(5)
    for _ in range(40):
        factors = random_node_factors(graph, scale_range=(0.5, 8.0), generator=generator)
        assert bool((factors[~(can_scale | can_flip)] == 1).all())
        assert bool((factors[can_flip & ~can_scale].abs() == 1).all())
        magnitudes.append(factors[can_scale].abs())
        signs.append(factors[can_flip].sign())
    magnitudes, signs = torch.cat(magnitudes), torch.cat(signs)
    assert float(magnitudes.min()) >= 0.5 and float(magnitudes.max()) <= 8.0
    assert float(magnitudes.min()) < 0.6 and float(magnitudes.max()) > 6.5  # both ends reached
    assert 0.3 < float((signs < 0).double().mean()) < 0.7
    fixed = random_node_factors(graph, scale_range=(2.0, 2.0), flip=False, generator=generator)
    torch.testing.assert_close(fixed[can_scale], torch.full_like(fixed[can_scale], 2.0), atol=1e-12, rtol=0)
    for bad in ((0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)):
        message = f"random_node_factors: need 0 < low <= high, got scale_range={bad}"
        with pytest.raises(GradGraphError, match=f"^{re.escape(message)}$"):
            random_node_factors(graph, scale_range=bad)
