"""The per-call shortcuts of a cached conversion (issue 14) change nothing but its cost: one walk
over the model lists what torch's generators list, the plan key notices every change a plan
depends on, and the bias / edge values written as pieces equal the slot-by-slot writes."""

from __future__ import annotations

import pytest
import torch
from strategies import GRAPH_TENSORS, build_mlp, cross_entropy
from torch import nn
from traced_models import GPT, token_loss

import gradgraph
from gradgraph import GradGraphError
from gradgraph.convert.assembly import _bias, assemble
from gradgraph.convert.plan import PLAN_CACHE, parameter_signature, plan_key
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES
from gradgraph.convert.traced import _Scan, _walk

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("empty_plan_cache")


class Listed(nn.Module):
    """Lists its members its own way: the walk must leave it to torch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def named_modules(self, *args, **kwargs):
        yield from super().named_modules(*args, **kwargs)


def tied_and_shared() -> nn.Module:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(2, 3, bias=False), shared, nn.Sequential(nn.ReLU(), shared), nn.Linear(3, 3))
    model[3].weight = model[1].weight  # a parameter under two names: listed once, under the first
    model.register_parameter("unset", None)
    return model


@pytest.mark.parametrize("build", [tied_and_shared, GPT, lambda: build_mlp([3, 4, 4, 2], ["relu", "tanh", "none"],
                                                                          [True, False, True])])
def test_the_walk_lists_the_parameters_and_modules_torch_lists(build):
    model = build()
    scan = _walk(model)
    assert scan is not None
    expected = list(model.named_parameters())
    assert [name for name in scan.parameters] == [name for name, _ in expected]
    assert all(scan.parameters[name] is param for name, param in expected)
    assert [id(module) for module in scan.modules] == [id(module) for module in model.modules()]
    assert scan.signature == parameter_signature(dict(model.named_parameters()))
    assert scan.float_dtypes == {param.dtype for _, param in expected if param.is_floating_point()}


def test_a_module_that_lists_its_members_itself_is_read_through_torch():
    model = nn.Sequential(Listed(), nn.Linear(2, 1))
    assert _walk(model) is None and _walk(Listed()) is None
    scan = _Scan.of(model, "to_graph")
    assert list(scan.parameters) == [name for name, _ in model.named_parameters()]
    assert [id(m) for m in scan.modules] == [id(m) for m in model.modules()]
    assert scan.signature == parameter_signature(scan.parameters) and scan.float_dtypes == {torch.float32}


def test_a_meta_model_is_refused_by_to_graph_and_convert_traced():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2))
    inputs, targets = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(GradGraphError, match="to_graph: Sequential has parameters on the 'meta' device"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
    with pytest.raises(GradGraphError, match="meta"):
        gradgraph.convert.convert_traced(model, inputs, targets=targets, loss_fn=cross_entropy)


def key_of(model: nn.Module, inputs: torch.Tensor, kwargs: dict | None = None) -> tuple:
    scan = _Scan.of(model, "to_graph")
    return plan_key(model, inputs, kwargs or {}, scan.signature, scan.modules)


class Twice(nn.Module):
    def forward(self, x):
        return 2 * x


def test_the_plan_key_notices_every_change_a_plan_depends_on():
    torch.manual_seed(0)
    model = build_mlp([3, 5, 2], ["relu", "none"], [True, True])
    inputs = torch.randn(4, 3, dtype=DTYPE)
    key = key_of(model, inputs)
    assert key_of(model, inputs) == key and hash(key_of(model, inputs)) == hash(key)
    assert key_of(build_mlp([3, 5, 2], ["relu", "none"], [True, True], seed=1), inputs) == key  # other values
    assert key_of(model.float(), inputs.float()) == key  # the dtype is no part of a plan
    model.double()

    def changed(change, undo) -> bool:
        change()
        try:
            return key_of(model, inputs) != key
        finally:
            undo()
            assert key_of(model, inputs) == key

    weight = model[0].weight
    assert changed(lambda: setattr(model[0], "weight", nn.Parameter(torch.randn(5, 4, dtype=DTYPE))),
                   lambda: setattr(model[0], "weight", weight))  # a parameter replaced
    assert changed(lambda: setattr(model[0].weight, "data", torch.randn(6, 3, dtype=DTYPE)),
                   lambda: setattr(model[0].weight, "data", weight.data[:5]))  # its values swapped for another shape
    assert changed(lambda: model[2].bias.requires_grad_(False), lambda: model[2].bias.requires_grad_(True))
    assert changed(model.eval, model.train)
    assert changed(lambda: model.append(nn.Tanh()), lambda: model.pop(-1))  # a module added
    assert changed(lambda: model[1].register_parameter("scale", nn.Parameter(torch.ones(1, dtype=DTYPE))),
                   lambda: delattr(model[1], "scale"))
    assert changed(lambda: gradgraph.convert.register_elementwise(Twice),
                   lambda: ELEMENTWISE_MODULES.pop(Twice))  # a registered rule
    assert key_of(model, torch.randn(5, 3, dtype=DTYPE)) != key  # another batch shape
    assert key_of(model, inputs, {"scale": 2}) != key

    # a class of the same name is another architecture
    class ReLU(nn.Module):
        def forward(self, x):
            return x.clamp_min(0)

    relu = model[1]
    assert changed(lambda: model.__setitem__(1, ReLU()), lambda: model.__setitem__(1, relu))


def test_a_changed_model_converts_as_a_fresh_one():
    """After each change the cached path notices, the graph is the one a first conversion gives."""
    torch.manual_seed(0)
    model = build_mlp([3, 5, 2], ["relu", "none"], [True, True])
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,))

    def check() -> None:
        cached = gradgraph.to_graph(model, inputs, targets, cross_entropy)
        PLAN_CACHE.clear()
        fresh = gradgraph.to_graph(model, inputs, targets, cross_entropy)
        for name in GRAPH_TENSORS:
            assert torch.equal(cached[name], fresh[name]) and cached[name].dtype == fresh[name].dtype, name
        assert cached.param_names == fresh.param_names and cached.param_shapes == fresh.param_shapes

    check()
    model[2].bias.requires_grad_(False)
    check()
    model[0].weight = nn.Parameter(torch.randn(6, 3, dtype=DTYPE))
    model[0].bias = nn.Parameter(torch.randn(6, dtype=DTYPE))
    model[2].weight = nn.Parameter(torch.randn(2, 6, dtype=DTYPE))
    check()
    model.append(nn.Tanh())
    check()


def only_plan():
    assert len(PLAN_CACHE) == 1
    return next(iter(PLAN_CACHE._entries.values()))


@pytest.mark.parametrize("case", ["gaps", "gpt"])
def test_biases_and_weights_written_as_pieces_equal_the_slot_writes(case):
    torch.manual_seed(0)
    if case == "gaps":  # layers without a bias leave zero runs between the pieces
        model = build_mlp([3, 4, 5, 4, 2], ["relu", "tanh", "silu", "none"], [False, True, False, True])
        inputs, targets, loss = torch.randn(3, 3, dtype=DTYPE), torch.randint(0, 2, (3,)), cross_entropy
    else:
        model = GPT().double().eval()
        inputs, targets, loss = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)), token_loss
    graph = gradgraph.to_graph(model, inputs, targets, loss)
    plan, parameters = only_plan(), dict(model.named_parameters())
    if case == "gaps":
        assert plan._derived["bias_pieces"] is not None and plan._derived["weight_pieces"] is not None
    for dtype in (DTYPE, torch.float32):  # float32: the values need a cast, the slot writes do it
        with torch.no_grad():
            expected = torch.zeros(plan.num_nodes, dtype=dtype)
            for slot in plan.biases:
                slot.write(expected, parameters[slot.name].reshape(-1))
            assert torch.equal(_bias(plan, parameters, dtype, torch.device("cpu")), expected)
    # the general path (no pieces) assembles the same graph
    pieces = {key: plan._derived[key] for key in ("bias_pieces", "weight_pieces")}
    plan._derived.update(bias_pieces=None, weight_pieces=None)
    try:
        general = assemble(plan, parameters, graph.act, graph.grad, graph.num_datapoints)
    finally:
        plan._derived.update(pieces)
    for name in ("x", "edge_attr"):
        assert torch.equal(general[name], graph[name]) and general[name].stride() == graph[name].stride(), name


# ------------------------------------------------------------------ first conversions
@pytest.mark.parametrize("count", [1, 5, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 3 * (1 << 16) + 7])
def test_consecutive_span_reads_long_positions_piece_by_piece(count):
    from gradgraph.graph import consecutive_span

    positions = torch.arange(11, 11 + count)
    assert consecutive_span(positions) == slice(11, 11 + count)
    assert consecutive_span(positions.reshape(1, -1)) == slice(11, 11 + count)
    for broken in {0, count // 2, count - 1, min(count - 1, 1 << 16)} if count > 1 else ():  # in any piece
        changed = positions.clone()
        changed[broken] += 1 if broken else -1
        assert consecutive_span(changed) is None, broken
    assert consecutive_span(torch.empty(0, dtype=torch.long)) is None


def test_per_group_labels_repeat_each_value_over_its_group():
    from gradgraph.convert.layout import _per_group

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        groups = int(torch.randint(1, 8, (1,), generator=generator))
        values = torch.randint(-1, 3, (groups,), generator=generator).tolist()  # runs of equal values
        sizes = torch.randint(0, 5, (groups,), generator=generator).tolist()
        expected = torch.tensor(values, dtype=torch.long).repeat_interleave(torch.tensor(sizes))
        assert torch.equal(_per_group(values, sizes), expected)


@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_records_are_blocks_exactly_where_their_component_indices_say_so(case, monkeypatch):
    """A record is a block iff all its neurons and components are kept and, read as
    ``[B, width]``, neuron ``first + w`` at component ``c`` (the definition on component indices)."""
    from gradgraph.convert import plan as plan_module

    seen = []
    record = plan_module._record

    def checked(tracer, tensor, nodes, comps, num_keys, num_components):
        result = record(tracer, tensor, nodes, comps, num_keys, num_components)
        width = int(nodes.shape[-1]) if nodes.dim() else 1
        block = bool(((nodes >= 0) & (comps >= 0)).all()) and nodes.numel() == num_components * width and width > 0
        if block:
            rows = nodes.reshape(num_components, width)
            columns = plan_module._component_index(comps.reshape(num_components, width), num_keys)
            block = torch.equal(rows, (rows[0, 0] + torch.arange(width)).expand_as(rows)) and torch.equal(
                columns, torch.arange(num_components)[:, None].expand_as(columns))
        assert (result.block is not None) == block
        seen.append(block)
        return result

    monkeypatch.setattr(plan_module, "_record", checked)
    torch.manual_seed(0)
    if case == "mlp":
        model = build_mlp([3, 4, 2], ["relu", "none"], [True, True])
        gradgraph.to_graph(model, torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 2, (5,)), cross_entropy)
    else:
        gradgraph.to_graph(GPT().double().eval(), torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)),
                           token_loss)
    assert any(seen) and (case == "mlp" or not all(seen))


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
def test_edge_values_gathered_in_one_index_equal_the_slot_writes(dtype):
    """A plan whose weights are not consecutive pieces (tied embeddings, attention's relation
    edges of weight 1) writes ``edge_attr`` by one gather; it must equal the slot-by-slot writes."""
    torch.manual_seed(0)
    model = GPT().to(dtype).eval()
    graph = gradgraph.to_graph(model, torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)), token_loss)
    plan, parameters = only_plan(), dict(model.named_parameters())
    assert plan._derived["weight_pieces"] is None and plan._derived["weight_gather"] is not None
    with torch.no_grad():
        expected = torch.full((plan.num_edges,), float("nan"), dtype=dtype)
        covered = torch.zeros(plan.num_edges, dtype=torch.bool)
        for slot in plan.weights:
            slot.write(expected, parameters[slot.name].reshape(-1))
            covered[slot.rows] = True
        expected[~covered] = 1  # relation edges
    assert bool((~covered).any())  # the trailing 1 is read
    assert torch.equal(graph.edge_attr[:, 0], expected)
