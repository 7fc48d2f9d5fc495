"""The batched and fused learned-optimizer pieces against the general path or a loop written out, in
float64: ``vmapped_update`` (called without ``first_graph``) against each particle's ``to_graph`` +
``LearnedUpdate`` step; ``ParameterLayout.scatter`` against a loop over the graph's edges and nodes;
``capture_chain_step`` against autograd, and its refusals; ``ArchitectureCache.batch`` of two graphs
against ``Batch.from_data_list``; ``ChainGraphs``' refusal of another architecture's graph.

Written for the survivors of the mutation runs of ``optim/batched.py``, ``parameter_layout.py``,
``chain_step.py``, ``batching.py`` and ``chain_graphs.py`` (issue 31; docs/mutation.md, runs optim 5-6):
each test names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in
``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch_geometric.data import Batch

from gradgraph import to_graph
from gradgraph.errors import GradGraphError
from gradgraph.optim import ParameterLayout
from gradgraph.optim.batched import chain_gradients, vmapped_update
from gradgraph.optim.chain_graphs import ChainGraphs
from gradgraph.optim.fused import mlp_chain
from strategies import assert_same_graph, learned_rule

DOUBLE = torch.float64


def _loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets, reduction="none")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_vmapped_update_without_first_graph_is_every_particle_s_general_step():
    """Three particles, each with its own parameters, batch and GradMetaNet meta-parameters: the batched
    closed-form graphs and the one vmapped update (``first_graph`` left out: the batch's first graph is
    read) give every particle's new parameters and factor EMAs as ``to_graph`` of that particle's network
    and ``LearnedUpdate`` called with that particle's meta-parameters, to 1e-10.

    Kills ``vmapped_update`` 11, 12 (``first`` is ``None`` when ``first_graph`` is left out), 13
    (``graphs.get_example(None)``)."""
    model = _model()
    chain = mlp_chain(model)
    num_particles, batch_size = 3, 6
    generator = torch.Generator().manual_seed(1)
    params = {name: p.detach()[None] + 0.3 * torch.randn(num_particles, *p.shape, generator=generator, dtype=DOUBLE)
              for name, p in model.named_parameters()}
    inputs = torch.randn(num_particles, batch_size, 5, generator=generator, dtype=DOUBLE)
    targets = torch.randint(0, 3, (num_particles, batch_size), generator=generator)
    structure = ChainGraphs.from_model(chain, model, inputs[0], targets[0], _loss, num_particles)
    _, grads, graphs = chain_gradients(chain, params, inputs, targets, _loss, structure)
    meta = learned_rule("gradmetanet")
    meta_params = {name: value.detach()[None] + 0.05 * torch.randn(num_particles, *value.shape,
                                                                    generator=generator, dtype=DOUBLE)
                   for name, value in meta.named_parameters()}
    new_params, new_state = vmapped_update(meta, meta_params, params, grads, meta.init_state(params), graphs)

    num_nodes = structure.template.num_nodes
    for particle in range(num_particles):
        network = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in network.named_parameters():
                parameter.copy_(params[name][particle])
        graph = to_graph(network, inputs[particle], targets[particle], _loss)
        own = {name: value[particle:particle + 1] for name, value in params.items()}
        mean_grads = {name: value[None] for name, value in graph.mean_grad().items()}
        expected, expected_state = functional_call(
            meta, {name: value[particle] for name, value in meta_params.items()},
            (own, mean_grads, meta.init_state(own)), {"graphs": Batch.from_data_list([graph]), "first_graph": graph})
        for name in params:
            torch.testing.assert_close(new_params[name][particle], expected[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new_state.factor_emas[particle * num_nodes:(particle + 1) * num_nodes],
                                   expected_state.factor_emas, rtol=1e-10, atol=1e-12)


def test_parameter_layout_scatters_every_carried_entry_and_zero_for_the_others():
    """``ParameterLayout.from_graph`` + ``scatter`` of two graphs' edge and node outputs against a loop
    over the edges and nodes (``edge_param`` / ``edge_param_pos``, ``node_param`` / ``node_param_pos``),
    on an MLP's graph where one edge and one node carry no parameter entry: those two entries get 0.

    Kills ``ParameterLayout.from_graph`` 34 (``num_edges - num_nodes`` for the slot of an entry no edge
    or node carries: it points at an edge, whose value the entry then gets)."""
    model = _model()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 5, generator=generator, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=generator)
    graph = to_graph(model, x, y, _loss)
    graph.edge_param = graph.edge_param.clone()
    graph.node_param = graph.node_param.clone()
    dropped_edge, dropped_node = 3, int((graph.node_param >= 0).nonzero()[0])
    graph.edge_param[dropped_edge] = -1
    graph.node_param[dropped_node] = -1
    layout = ParameterLayout.from_graph(graph)
    num_graphs, channels = 2, 3
    num_edges, num_nodes = int(graph.edge_index.shape[1]), int(graph.num_nodes)
    edge_values = torch.randn(num_graphs * num_edges, channels, generator=generator, dtype=DOUBLE)
    node_values = torch.randn(num_graphs * num_nodes, channels, generator=generator, dtype=DOUBLE)
    scattered = layout.scatter(edge_values, node_values, num_graphs)

    shapes = {name: tuple(int(s) for s in shape) for name, shape in zip(graph.param_names, graph.param_shapes)}
    expected = {name: torch.zeros(num_graphs, *shape, channels, dtype=DOUBLE) for name, shape in shapes.items()}
    carried = 0
    for values, owner, position, count in (
            (edge_values, graph.edge_param, graph.edge_param_pos, num_edges),
            (node_values, graph.node_param, graph.node_param_pos, num_nodes)):
        per_graph = values.reshape(num_graphs, count, channels)
        for slot in range(count):
            if int(owner[slot]) < 0:
                continue
            name = graph.param_names[int(owner[slot])]
            expected[name].reshape(num_graphs, -1, channels)[:, int(position[slot])] = per_graph[:, slot]
            carried += 1
    total = sum(torch.Size(shape).numel() for shape in shapes.values())
    assert carried == total - 2  # the two dropped entries are carried by nothing
    assert scattered.keys() == expected.keys()
    for name in expected:
        assert torch.equal(scattered[name], expected[name]), name


# ---------------------------------------------------------------- capture_chain_step (the fused user path)

def _chain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _batch(size: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(size, 5, generator=generator, dtype=DOUBLE),
            torch.randint(0, 3, (size,), generator=generator))


def _capture(model: nn.Module, closure, **kwargs):
    from gradgraph.optim.chain_step import capture_chain_step

    params = {name: p.detach()[None] for name, p in model.named_parameters()}
    return capture_chain_step(model, mlp_chain(model), params, closure, **kwargs)


def test_the_fused_capture_leaves_the_factors_out_unless_asked_and_its_gradients_are_autograd_s():
    """``factors`` defaults to ``False``: the losses and mean gradients only (autograd's of the mean loss),
    no factor; with ``factors=True`` the per-datapoint factors too (each layer's ``Σ_b act_b ⊗ δ_b / b`` is
    its weight gradient).

    Kills ``capture_chain_step`` 1 (``factors=True`` by default) and 127 (``inputs`` left ``None`` without
    the factors)."""
    model = _chain_model()
    x, y = _batch()
    captured = _capture(model, lambda: _loss(model(x), y))
    assert torch.equal(captured.inputs, x)
    assert captured.layer_inputs is None and captured.output is None
    assert captured.deltas is None and captured.input_delta is None
    expected = torch.autograd.grad(_loss(model(x), y).mean(), list(model.parameters()))
    for (name, _), value in zip(model.named_parameters(), expected):
        torch.testing.assert_close(captured.grads[name][0], value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(captured.losses[0], _loss(model(x), y).detach(), rtol=1e-12, atol=1e-14)
    full = _capture(model, lambda: _loss(model(x), y), factors=True)
    weight_grad = torch.einsum("bi,bo->oi", full.layer_inputs[0][0], full.deltas[0][0]) / x.shape[0]
    torch.testing.assert_close(weight_grad, expected[0], rtol=1e-12, atol=1e-14)


def test_a_chain_with_a_forward_set_on_the_instance_is_not_fused_and_keeps_that_forward():
    """A ``forward`` set on the instance after the optimizer was built: the capture refuses it before the
    closure runs (``NotFused``, its message in full), so ``LearnedOptimizer`` takes the general path, which
    refuses such a model by name; the instance's ``forward`` is still there and no parameter moved.

    Kills ``capture_chain_step`` 3, 4 (the check of ``vars(model)`` for another key: the closed form is
    stepped instead of the user's forward, and the user's ``forward`` is deleted), 8, 9, 10 (the message)."""
    from gradgraph.optim import LearnedOptimizer
    from gradgraph.optim.chain_step import NotFused

    x, y = _batch()
    doubled = _chain_model()
    doubled.forward = lambda inputs: 2 * nn.Sequential.forward(doubled, inputs)
    with pytest.raises(NotFused) as refused:
        _capture(doubled, lambda: _loss(doubled(x), y))
    assert str(refused.value) == "the model's forward is an instance attribute, or a hook would not run"
    assert "forward" in vars(doubled)

    model = _chain_model()
    opt = LearnedOptimizer(model, learned_rule("deepsets"))
    assert opt.chain is not None
    own_forward = lambda inputs: 2 * nn.Sequential.forward(model, inputs)  # noqa: E731
    model.forward = own_forward
    with pytest.raises(GradGraphError) as refused:
        opt.step(lambda: _loss(model(x), y))
    assert str(refused.value) == ("LearnedOptimizer.step: Sequential has a forward set on the instance; "
                                  "convert_closure needs the class's forward")
    assert vars(model)["forward"] is own_forward and opt.chain is None
    for p, q in zip(model.parameters(), _chain_model().parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("call", ["square tokens", "extra positional", "extra keyword"])
def test_a_call_other_than_inputs_b_in_is_not_fused(call):
    """``[b, in, in]`` inputs (tokens as many as the features), an extra positional argument, an extra
    keyword: ``NotFused`` with its message in full, before anything is computed.

    Kills ``capture_chain_step`` 29 (``dim() != 2 and shape[1] != in``) and 30 (``rest_kwargs and dim() != 2``:
    the dimension checked only beside a keyword): ``[b, 5, 5]`` fused; 31 (``rest and rest_kwargs``: an
    extra positional fused); 36, 37, 38 (the message)."""
    from gradgraph.optim.chain_step import NotFused

    model = _chain_model()
    x, y = _batch()
    calls = {"square tokens": lambda: _loss(model(torch.randn(7, 5, 5, dtype=DOUBLE)).mean(dim=1), y),
             "extra positional": lambda: _loss(model(x, None), y),
             "extra keyword": lambda: _loss(model(x, scale=2.0), y)}
    with pytest.raises(NotFused) as refused:
        _capture(model, calls[call])
    assert str(refused.value) == "the closure calls the model with other arguments than inputs [b, in]"
    assert "forward" not in vars(model)


def test_losses_that_do_not_depend_on_the_output_are_refused_in_full():
    """The closure calls the model but returns losses of something else.

    Kills ``capture_chain_step`` 77-80 (the message ``None`` or changed)."""
    from gradgraph.optim import LearnedOptimizer

    model = _chain_model()
    x, _ = _batch()
    opt = LearnedOptimizer(model, learned_rule("deepsets"))
    with pytest.raises(GradGraphError) as refused:
        opt.step(lambda: model(x).detach().sum(dim=1) * 0 + torch.ones(7, dtype=DOUBLE))
    assert str(refused.value) == "LearnedOptimizer.step: the closure's losses do not depend on the model's output"


def test_non_finite_factors_are_refused_with_the_whole_message():
    """A NaN input: the fused step's ``NonFiniteFactorError`` in full (the existing test matches a word).

    Kills ``capture_chain_step`` 118, 119, 121, 122, 123 (the message changed)."""
    from gradgraph.errors import NonFiniteFactorError

    model = _chain_model()
    x, y = _batch()
    x = x.clone()
    x[2, 1] = float("nan")
    with pytest.raises(NonFiniteFactorError) as refused:
        _capture(model, lambda: _loss(model(x), y), factors=True)
    assert str(refused.value) == ("LearnedOptimizer.step: a loss, gradient or factor of the batch has non-finite "
                                  "values (NaN or Inf); check the inputs, the loss and the model's weights")


# ---------------------------------------------------------------- ArchitectureCache (the general path's batches)

def test_the_architecture_cache_batches_two_graphs_as_collating_does():
    """Two graphs of one architecture (two networks, two batches), batched twice — the second time from
    the cached template, with the value fields concatenated — against ``Batch.from_data_list`` of graphs
    converted afresh: every field equal, the structure collated once. (The existing test batches one
    and three graphs.)

    Kills ``ArchitectureCache.batch`` 21 (``len(values) == 2`` for the one-graph shortcut: the first
    graph's values stand for both)."""
    from gradgraph.optim.batching import ArchitectureCache

    def graphs() -> list:
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
            generator = torch.Generator().manual_seed(10 + seed)
            x = torch.randn(6, 5, generator=generator, dtype=DOUBLE)
            out.append(to_graph(model, x, torch.randint(0, 3, (6,), generator=generator), _loss))
        return out

    cache = ArchitectureCache()
    first, second = cache.batch(graphs()), cache.batch(graphs())
    reference = Batch.from_data_list(graphs())
    assert second.edge_index is first.edge_index  # the second came from the template
    for batch in (first, second):
        assert_same_graph(batch, reference, exact=True)  # every field, dtype and value
    assert second.act.shape[0] == 2 * graphs()[0].act.shape[0]


# ---------------------------------------------------------------- ChainGraphs

def test_chain_graphs_refuses_a_template_of_another_depth_in_full():
    """A three-layer chain with the GradGraph of a two-layer network (one component per datapoint, as every
    ``to_graph`` graph): refused before any value is written, with the layer widths and the chain named.

    Kills ``ChainGraphs.__init__`` 27 (``and``: refused only when the components are wrong too), 33, 34
    (the message ``None``, ``int(None)``)."""
    deep = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, generator=generator, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=generator)
    template = to_graph(_model(), x, y, _loss)
    with pytest.raises(GradGraphError) as refused:
        ChainGraphs(mlp_chain(deep), template, 2)
    assert str(refused.value) == (
        "ChainGraphs: the graph's layers have [5, 4, 3] neurons and 6 components for 6 datapoints; the chain "
        "('0.weight', '2.weight', '4.weight') needs one neuron per unit and one component per datapoint")


def _particles(num_particles: int = 3, batch_size: int = 6, dtype: torch.dtype = DOUBLE):
    """A chain, ``P`` parameter sets near its own, ``P`` batches."""
    model = _model()
    generator = torch.Generator().manual_seed(5)
    params = {name: (p.detach()[None] + 0.3 * torch.randn(num_particles, *p.shape, generator=generator,
                                                            dtype=DOUBLE)).to(dtype)
              for name, p in model.named_parameters()}
    inputs = torch.randn(num_particles, batch_size, 5, generator=generator, dtype=DOUBLE).to(dtype)
    targets = torch.randint(0, 3, (num_particles, batch_size), generator=generator)
    return model, params, inputs, targets


def _general_graphs(model: nn.Module, params, inputs, targets) -> Batch:
    graphs = []
    for particle in range(inputs.shape[0]):
        network = copy.deepcopy(model).to(inputs.dtype)
        with torch.no_grad():
            for name, parameter in network.named_parameters():
                parameter.copy_(params[name][particle])
        graphs.append(to_graph(network, inputs[particle], targets[particle], _loss))
    return Batch.from_data_list(graphs)


def test_chain_graphs_batch_holds_the_values_of_every_particle_s_to_graph():
    """The ``Batch`` filled from the closed-form factors against ``Batch.from_data_list`` of ``to_graph`` of
    every particle's network on its batch: ``act``, ``grad``, ``x``, ``edge_attr`` and the per-datapoint
    ``loss``, to 1e-12 in float64, in the graph's dtypes; and GradMetaNet's context structure, built at the
    first forward on such a batch, is kept for the next (the memo the structure shares).

    Kills ``ChainGraphs.batch`` 71, 72, 73 (``loss`` left at the template's values: the key tested
    misspelt or negated), 74 (``loss`` set to ``None``) and ``ChainGraphs.__init__`` 92 (the memo ``None``:
    nothing kept)."""
    from gradgraph.nn.context import STRUCTURE_MEMO

    model, params, inputs, targets = _particles()
    structure = ChainGraphs.from_model(mlp_chain(model), model, inputs[0], targets[0], _loss, inputs.shape[0])
    _, _, batch = chain_gradients(mlp_chain(model), params, inputs, targets, _loss, structure)
    reference = _general_graphs(model, params, inputs, targets)
    for key in ("act", "grad", "x", "edge_attr", "loss"):
        assert batch[key].dtype == reference[key].dtype, key
        torch.testing.assert_close(batch[key], reference[key], rtol=1e-12, atol=1e-14, msg=key)
    meta = learned_rule("gradmetanet")
    meta.embed(batch, structure.template, meta.init_state(params), inputs.shape[0])
    assert "context" in structure._collated.__dict__[STRUCTURE_MEMO]


def test_chain_graphs_batch_casts_the_factors_to_the_graph_s_dtypes():
    """Float32 factors written into the structure of a float64 graph: every value field is float64 (the
    dtype ``to_graph`` gave the structure) and equal to the float64 general path's to float32 precision.

    Kills ``ChainGraphs.batch`` 48, 51, 54, 63, 75 (``.to(None)``: the field left float32)."""
    model, params, inputs, targets = _particles()
    structure = ChainGraphs.from_model(mlp_chain(model), model, inputs[0], targets[0], _loss, inputs.shape[0])
    single = {name: value.float() for name, value in params.items()}
    _, _, batch = chain_gradients(mlp_chain(model), single, inputs.float(), targets, _loss, structure)
    reference = _general_graphs(model, params, inputs, targets)
    for key in ("act", "grad", "x", "edge_attr", "loss"):
        assert batch[key].dtype == torch.float64, key
        torch.testing.assert_close(batch[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_chain_graphs_matches_only_its_own_batch_size_and_particle_count():
    """``matches`` is true for the structure's own ``(B, P)`` only, and ``batch`` refuses factors of another
    size by name (a structure of another batch size has other ``num_datapoints`` and component fields).

    Kills ``ChainGraphs.matches`` 1 (``or``: either count matching is enough) and ``ChainGraphs.batch`` 8
    (the message ``None``)."""
    model, params, inputs, targets = _particles(num_particles=2, batch_size=6)
    chain = mlp_chain(model)
    structure = ChainGraphs.from_model(chain, model, inputs[0], targets[0], _loss, 2)
    assert structure.matches(6, 2)
    assert not structure.matches(4, 2) and not structure.matches(6, 3) and not structure.matches(4, 3)
    with pytest.raises(GradGraphError) as refused:
        chain_gradients(chain, params, inputs[:, :4], targets[:, :4], _loss, structure)
    assert str(refused.value) == "ChainGraphs: built for 2 graphs of 6 components, got factors of 2 x 4"


def test_chain_graphs_refuses_a_graph_with_an_edge_that_carries_no_weight():
    """Kills ``ChainGraphs.__init__`` 78 (the check ``bool(None)``: such a graph accepted, its edge then
    reads parameter ``-1``'s slots) and 81-84 (the message)."""
    model = _model()
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 5, generator=generator, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=generator)
    template = to_graph(model, x, y, _loss)
    template.edge_param = template.edge_param.clone()
    template.edge_param[0] = -1
    with pytest.raises(GradGraphError) as refused:
        ChainGraphs(mlp_chain(model), template, 2)
    assert str(refused.value) == "ChainGraphs: an edge of the graph carries no weight; not a plain chain's graph"


# ---------------------------------------------------------------- features

def test_update_emas_is_the_exponential_moving_average_written_out():
    """``ema_k ← d_k ema_k + (1 − d_k) value`` for three decays, entry by entry, against a loop.

    Kills ``update_emas`` 1 (``d ema − (1 − d) value``)."""
    from gradgraph.optim.features import update_emas

    generator = torch.Generator().manual_seed(7)
    emas = torch.randn(4, 2, 3, generator=generator, dtype=DOUBLE)
    value = torch.randn(4, 2, generator=generator, dtype=DOUBLE)
    decays = torch.tensor([0.1, 0.5, 0.99], dtype=DOUBLE)
    got = update_emas(emas, value, decays)
    for index in range(4):
        for column in range(2):
            for k in range(3):
                decay = float(decays[k])
                expected = decay * float(emas[index, column, k]) + (1 - decay) * float(value[index, column])
                assert abs(float(got[index, column, k]) - expected) <= 1e-15, (index, column, k)


def test_normalize_factors_divides_by_the_rms_of_each_graph_s_layer_written_out():
    """``[G·N, B, C]`` factors of two graphs of an MLP's layout (5 inputs, 4 hidden, 3 outputs; the layers
    of different sizes) against a loop: every value divided by ``sqrt(mean² + eps)`` over its own graph's
    layer's nodes and the components, per channel.

    Kills ``normalize_factors`` 42 (the layer's sum of squares times the node count instead of divided)."""
    from gradgraph.optim.features import normalize_factors

    layer = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    num_graphs, components, channels = 2, 3, 2
    generator = torch.Generator().manual_seed(8)
    values = torch.randn(num_graphs * 12, components, channels, generator=generator, dtype=DOUBLE)
    values = values * torch.linspace(0.5, 4.0, num_graphs * 12, dtype=DOUBLE)[:, None, None]
    got = normalize_factors(values, layer, num_graphs)
    expected = torch.empty_like(values)
    for graph in range(num_graphs):
        for index in range(3):
            rows = [graph * 12 + node for node in range(12) if int(layer[node]) == index]
            for channel in range(channels):
                block = values[rows, :, channel]
                expected[rows, :, channel] = block / torch.sqrt(block.square().mean() + 1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- ArchitectureCache's structure comparison

def test_same_compares_tensors_by_shape_dtype_device_and_value_and_never_a_tensor_with_another_thing():
    """Kills ``_same`` 1, 3, 4 (a tensor against a non-tensor: compared with ``==``, or reported equal),
    5 (``is not``: distinct tensors reported equal unread), 7, 8, 9 (the ``and`` of shape, dtype, device
    and values loosened: same-shaped tensors of other values reported equal)."""
    from gradgraph.optim.batching import _same

    left = torch.tensor([1, 2, 3])
    assert _same(left, left) is True
    assert _same(left, left.clone()) is True
    assert _same(left, torch.tensor([1, 2, 4])) is False
    assert _same(left, torch.tensor([1, 2])) is False
    assert _same(left, left.double()) is False
    assert _same(left, 3) is False and _same(3, left) is False
    assert _same(left, [1, 2, 3]) is False and _same([1, 2, 3], left) is False
    assert _same([(2, 3)], [(2, 3)]) is True and _same([(2, 3)], [(3, 2)]) is False


def _cache_graph(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    generator = torch.Generator().manual_seed(20 + seed)
    x = torch.randn(6, 5, generator=generator, dtype=DOUBLE)
    return to_graph(model, x, torch.randint(0, 3, (6,), generator=generator), _loss)


def test_the_architecture_cache_collates_afresh_a_graph_with_another_field_set():
    """After a template of the architecture exists: a graph with one more field, and one without a value
    field, are collated afresh (``Batch.from_data_list``'s fields), not copied from the template.

    Kills ``ArchitectureCache._matches`` 1 (``and``: another key set matched on the shared keys: the extra
    field is lost) and ``_adopt`` 6 (a graph without every value field reported as matching: the template
    path then reads the missing field)."""
    from gradgraph.optim.batching import ArchitectureCache

    cache = ArchitectureCache()
    cache.batch([_cache_graph()])
    cache.batch([_cache_graph()])  # the template for one graph exists
    extra = _cache_graph(1)
    extra.note = torch.arange(3)
    batch = cache.batch([extra])
    assert "note" in batch.keys() and torch.equal(batch.note, torch.arange(3))

    cache = ArchitectureCache()
    cache.batch([_cache_graph()])
    cache.batch([_cache_graph()])
    lacking = _cache_graph(2)
    del lacking.edge_attr
    batch = cache.batch([lacking])
    reference = Batch.from_data_list([lacking])
    assert set(batch.keys()) == set(reference.keys()) and "edge_attr" not in batch.keys()
    assert torch.equal(batch.act, reference.act)


def test_parameter_features_clip_to_one_then_divide_by_the_tensor_s_rms_written_out():
    """θ, ∇ and the momenta of a ``[P, 3, 4]`` tensor, some far outside ``[−1, 1]``, against a loop:
    each clipped to ``[−1, 1]``, then divided by ``sqrt(mean² + eps)`` over the tensor, per particle and
    feature.

    Kills ``_rms_normalize`` 1 (times the rms instead of divided) and ``parameter_features`` 2-5, 18-20
    (a side of the clip dropped or moved), 25, 26, 29 (the rms over the particles too, over every axis, or
    over the first of the tensor's axes only)."""
    from gradgraph.optim.features import parameter_features

    generator = torch.Generator().manual_seed(9)
    param = 3 * torch.randn(2, 3, 4, generator=generator, dtype=DOUBLE)
    grad = 0.2 * torch.randn(2, 3, 4, generator=generator, dtype=DOUBLE)
    momenta = 2 * torch.randn(2, 3, 4, 6, generator=generator, dtype=DOUBLE)
    assert (param > 1).any() and (param < -1).any()
    got = parameter_features(param, grad, momenta)
    raw = [param, grad, *momenta.unbind(-1)]
    for particle in range(2):
        for feature, values in enumerate(raw):
            clipped = values[particle].clamp(-1, 1)
            expected = clipped / torch.sqrt(clipped.square().mean() + 1e-12)
            torch.testing.assert_close(got[particle, ..., feature], expected, rtol=1e-13, atol=1e-15)


def test_time_features_are_tanh_of_t_over_s_minus_one_in_the_dtype_asked_for():
    """``tanh(t / s − 1)`` for the eleven scales ``s = 10^(k/2)``, written out in Python floats, to 1e-14 in
    float64 (the scales made in float64 too); with ``dtype=float32`` the features are float32 whatever the
    step's dtype.

    Kills ``time_features`` 3, 6 (the scales made in the default float32: ``10^(k/2)`` rounded) and 12
    (the step not cast: a float64 step gives float64 features where float32 was asked for)."""
    from gradgraph.optim.features import time_features

    step = torch.tensor([0, 1, 7, 250, 99_999])
    got = time_features(step, torch.float64)
    assert got.shape == (5, 11) and got.dtype == torch.float64
    for row, t in enumerate(step.tolist()):
        for k in range(11):
            assert abs(float(got[row, k]) - math.tanh(t / 10 ** (k / 2) - 1)) <= 1e-14, (t, k)
    single = time_features(step.double(), torch.float32)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, got.float(), rtol=1e-6, atol=1e-7)
