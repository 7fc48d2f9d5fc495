"""ScaleEquivariant's outputs against a hand computation, and its error messages in full.

The wrapped model here is a stub: it records the graph it is called on and returns fixed
float64 tensors (drawn from a seeded generator for the graph's sizes). The wrapper's outputs
are then checked entry by entry against ``values * (t_src / t_dst) ** e`` (edges) and
``values * t ** -e`` (nodes), with ``t`` from :func:`gradgraph.symmetry.canonicalize` called
here, so each exponent path of ``ScaleEquivariant._map_back`` (a single rule of exponent 0,
1, -1 or 2; a list of rules; 1-D and 2-D outputs) is pinned to a number, not only to an
equivariance check that a wrong-but-consistent mapping could pass. Mutation-testing group
``nn-canonical`` (docs/mutation.md); each test names the mutants it kills.
"""

from __future__ import annotations

import pytest
import torch
from strategies import build_mlp
from torch import Tensor, nn
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import GradMetaNetOutput, ScaleEquivariant
from gradgraph.nn.canonical import rule_exponent
from gradgraph.symmetry import canonicalize

TOL = dict(atol=0.0, rtol=1e-12)


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).sum(dim=1)


def relu_batch() -> Batch:
    """Two ReLU MLP graphs (float64), so hidden factors are positive and far from 1."""
    inputs = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    targets = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    specs = [([3, 4, 3, 2], ["relu", "relu", "none"], [True, True, True], 11),
             ([3, 5, 2], ["relu", "none"], [False, True], 12)]
    graphs = [gradgraph.to_graph(build_mlp(*spec[:3], seed=spec[3]), inputs, targets, loss_fn=squared_error)
              for spec in specs]
    return Batch.from_data_list(graphs)


class Stub(nn.Module):
    """Returns ``GradMetaNetOutput`` of given shapes with seeded values; remembers its input.

    ``edge`` / ``node``: trailing shape (``()`` for a 1-D output ``[E]`` / ``[N]``, ``(k,)``
    for ``[E, k]``), or ``None`` for no such output; ``edge_rows`` / ``node_rows``: override the row count (to
    produce a wrongly shaped output); ``default_device_after``: a device made the default
    once the outputs are drawn (the caller restores it).
    """

    def __init__(self, edge=(3,), node=(2,), graph=True, component=False, dtype=torch.float64,
                 edge_rows=None, node_rows=None, default_device_after=None) -> None:
        super().__init__()
        self.edge, self.node, self.graph, self.component = edge, node, graph, component
        self.dtype, self.edge_rows, self.node_rows = dtype, edge_rows, node_rows
        self.default_device_after = default_device_after
        self.seen = None

    def forward(self, graph) -> GradMetaNetOutput:
        self.seen = graph
        generator = torch.Generator().manual_seed(3)
        num_graphs = getattr(graph, "num_graphs", 1)

        def draw(rows, trailing):
            if trailing is None:
                return None
            # values in [0.5, 1.5] with random signs: never 0, so no factor can hide
            magnitude = 0.5 + torch.rand(rows, *trailing, generator=generator, dtype=torch.float64)
            sign = torch.randint(0, 2, (rows, *trailing), generator=generator) * 2 - 1
            return (magnitude * sign).to(self.dtype)

        edge_rows = graph.edge_index.shape[1] if self.edge_rows is None else self.edge_rows
        node_rows = graph.num_nodes if self.node_rows is None else self.node_rows
        output = GradMetaNetOutput(
            edge=draw(edge_rows, self.edge),
            node=draw(node_rows, self.node),
            graph=draw(num_graphs, (2,)) if self.graph else None,
            component=draw(num_graphs, (4, 2)) if self.component else None,
        )
        if self.default_device_after is not None:
            torch.set_default_device(self.default_device_after)
        return output


def hand(batch: Batch, stub: Stub, edge_exponents: Tensor | None, node_exponents: Tensor | None):
    """The stub's raw outputs on the canonical graph and their hand-mapped versions."""
    canonical, factors = canonicalize(batch)
    raw = Stub(stub.edge, stub.node, stub.graph, stub.component, stub.dtype)(canonical)
    src, dst = batch.edge_index
    edge = node = None
    if raw.edge is not None:
        ratio = (factors[src] / factors[dst]).to(raw.edge.dtype)
        scale = ratio[:, None] ** edge_exponents.to(raw.edge.dtype)[None, :]
        edge = raw.edge * (scale[:, 0] if raw.edge.dim() == 1 else scale)
    if raw.node is not None:
        ratio = (1.0 / factors).to(raw.node.dtype)
        scale = ratio[:, None] ** node_exponents.to(raw.node.dtype)[None, :]
        node = raw.node * (scale[:, 0] if raw.node.dim() == 1 else scale)
    return raw, edge, node, canonical, factors


def test_hidden_factors_are_far_from_one():
    """Guards the other tests: a ratio of 1 would let a dropped or wrong power pass."""
    batch = relu_batch()
    factors = canonicalize(batch).node_factors
    src, dst = batch.edge_index
    ratio = factors[src] / factors[dst]
    moved = (ratio - 1).abs() > 1e-3
    assert moved.sum() >= batch.edge_index.shape[1] // 2
    assert ((ratio[moved].abs() - 1).abs() > 1e-3).all()  # so ratio ** 2 != ratio, ratio ** -1 != ratio


@pytest.mark.parametrize(
    ("rule", "exponent"),
    [("weight", 1.0), ("gradient", -1.0), (("gradient", 2), -2.0), (("weight", 3), 3.0), ("invariant", 0.0)],
)
def test_a_single_rule_maps_every_channel_back_by_its_power(rule, exponent):
    """One rule for all channels (the int-exponent path), 2-D outputs, against the hand map.

    Kills ``_map_back`` 14 (``exponents != 0``: nonzero powers not applied), 15
    (``exponents == 1``: weight rule not applied), 17 (``ratio * e``), 18 (``values / scale``)
    and ``forward`` 45 (node ratio ``2.0 / t``).
    """
    batch = relu_batch()
    stub = Stub(edge=(3,), node=(2,))
    wrapped = ScaleEquivariant(stub, edge=rule, node=rule)
    out = wrapped(batch)
    exponents = torch.tensor([exponent], dtype=torch.float64)
    raw, edge, node, canonical, _ = hand(batch, stub, exponents, exponents)
    assert torch.equal(stub.seen.x, canonical.x) and torch.equal(stub.seen.edge_attr, canonical.edge_attr)
    torch.testing.assert_close(out.edge, edge, **TOL)
    torch.testing.assert_close(out.node, node, **TOL)
    assert torch.equal(out.graph, raw.graph)
    if exponent == 0.0:
        assert torch.equal(out.edge, raw.edge) and torch.equal(out.node, raw.node)
    else:
        assert not torch.allclose(out.edge, raw.edge)


@pytest.mark.parametrize("rule", ["weight", "gradient", ("gradient", 2), "invariant"])
def test_one_dimensional_outputs_with_a_single_rule_keep_their_shape(rule):
    """``edge [E]`` / ``node [N]`` with one rule: same shape back, each row scaled.

    Kills ``_map_back`` 6 (only 2-D accepted) and 19 (``scale[:, None]`` for 1-D values:
    an ``[E, E]`` outer product).
    """
    batch = relu_batch()
    stub = Stub(edge=(), node=())
    out = ScaleEquivariant(stub, edge=rule, node=rule)(batch)
    exponents = torch.tensor([float(rule_exponent(rule))], dtype=torch.float64)
    _, edge, node, _, _ = hand(batch, stub, exponents, exponents)
    assert out.edge.shape == (batch.edge_index.shape[1],) and out.node.shape == (batch.num_nodes,)
    torch.testing.assert_close(out.edge, edge, **TOL)
    torch.testing.assert_close(out.node, node, **TOL)


def test_one_dimensional_outputs_with_a_list_of_one_rule():
    """``edge [E]`` / ``node [N]`` with a one-element list of rules (the per-channel path).

    Kills ``_map_back`` 24 (``values.shape[1]`` of a 1-D output), 26 (two channels counted
    for a 1-D output), 43 (``scale`` not reduced to ``[E]``: ``[E, E]`` back) and 45
    (``scale[:, 1]``).
    """
    batch = relu_batch()
    stub = Stub(edge=(), node=())
    out = ScaleEquivariant(stub, edge=["gradient"], node=[("weight", 2)])(batch)
    _, edge, node, _, _ = hand(batch, stub, torch.tensor([-1.0], dtype=torch.float64),
                               torch.tensor([2.0], dtype=torch.float64))
    assert out.edge.shape == (batch.edge_index.shape[1],) and out.node.shape == (batch.num_nodes,)
    torch.testing.assert_close(out.edge, edge, **TOL)
    torch.testing.assert_close(out.node, node, **TOL)


def test_a_list_of_rules_maps_each_channel_by_its_own_power():
    """The per-channel path on 2-D outputs, every kind of rule in one list."""
    batch = relu_batch()
    stub = Stub(edge=(4,), node=(3,))
    out = ScaleEquivariant(stub, edge=["gradient", "weight", ("gradient", 2), "invariant"],
                           node=["weight", "invariant", ("gradient", 3)])(batch)
    _, edge, node, _, _ = hand(batch, stub, torch.tensor([-1.0, 1.0, -2.0, 0.0], dtype=torch.float64),
                               torch.tensor([1.0, 0.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(out.edge, edge, **TOL)
    torch.testing.assert_close(out.node, node, **TOL)


@pytest.mark.parametrize("rules", ["gradient", ["gradient", "weight"]])
def test_outputs_keep_the_models_dtype(rules):
    """A float32 model on a float64 graph gets float32 outputs back (the ratio is cast).

    Kills ``_map_back`` 13 (``ratio.to(None)``: float64 ratio promotes the outputs).
    """
    batch = relu_batch()
    stub = Stub(edge=(2,), node=(2,), dtype=torch.float32)
    out = ScaleEquivariant(stub, edge=rules, node=rules)(batch)
    assert out.edge.dtype == torch.float32 and out.node.dtype == torch.float32
    exponents = torch.tensor([float(rule_exponent(r)) for r in ([rules] if isinstance(rules, str) else rules)])
    if len(exponents) == 1:
        exponents = exponents.expand(2)
    _, edge, node, _, _ = hand(batch, stub, exponents, exponents)
    torch.testing.assert_close(out.edge, edge)
    torch.testing.assert_close(out.node, node)


def test_the_exponent_tensor_lives_on_the_outputs_device_not_the_default_one():
    """With ``meta`` as default device once the model has run, CPU outputs still map back on CPU.

    Stands in, on a CPU-only machine, for CPU data under a CUDA default device. The stub sets
    the default device at the end of its forward (canonicalisation, before it, stays on CPU);
    the test restores it. Kills ``_map_back`` 36 (``device=None``) and 39 (no ``device``):
    the exponents would be made on the default device and ``ratio ** power`` would fail.
    """
    batch = relu_batch()
    wrapped = ScaleEquivariant(Stub(edge=(2,), node=(2,)), edge=["gradient", "weight"], node=["weight", "gradient"])
    expected = wrapped(batch)
    switching = ScaleEquivariant(Stub(edge=(2,), node=(2,), default_device_after="meta"),
                                 edge=["gradient", "weight"], node=["weight", "gradient"])
    try:
        out = switching(batch)
    finally:
        torch.set_default_device(None)
    assert torch.tensor(0.0).device.type == "cpu"
    assert out.edge.device.type == "cpu" and out.node.device.type == "cpu"
    torch.testing.assert_close(out.edge, expected.edge, **TOL)
    torch.testing.assert_close(out.node, expected.node, **TOL)


def test_component_and_graph_outputs_pass_through_unchanged():
    """``component [G, B, k]`` and ``graph [G, k]`` are invariant: returned as the model gave them.

    Kills ``forward`` 60 (``component=None``) and 64 (``component`` left out).
    """
    batch = relu_batch()
    stub = Stub(component=True)
    out = ScaleEquivariant(stub)(batch)
    raw = Stub(component=True)(canonicalize(batch).graph)
    assert out.component is not None and torch.equal(out.component, raw.component)
    assert torch.equal(out.graph, raw.graph)


def test_no_graph_rule_is_fine_when_the_model_returns_no_graph_output():
    """``graph=None`` with a model that returns ``graph=None`` works (and ``node=None`` likewise).

    Kills ``forward`` 51 (``output.graph is None and ...``: raises exactly when it should not).
    """
    batch = relu_batch()
    stub = Stub(node=None, graph=False)
    out = ScaleEquivariant(stub, edge="weight", node=None, graph=None)(batch)
    assert out.graph is None and out.node is None and out.edge.shape == (batch.edge_index.shape[1], 3)


def test_repr_names_every_rule():
    """Kills ``__init__`` 12 (``node_rule`` stored as ``None``)."""
    wrapped = ScaleEquivariant(Stub(), edge=("gradient", 2), node=["weight", "invariant"], graph=None)
    assert repr(wrapped) == (
        "ScaleEquivariant(Stub(), edge=('gradient', 2), node=['weight', 'invariant'], graph=None)"
    )


# ------------------------------------------------------------------ errors, in full
def test_rule_exponent_values_and_malformed_rules():
    """Kills ``rule_exponent`` 3, 4, 5 (the tuple test loosened: a list, a 3-tuple or a
    non-int power accepted) and 9 (no message)."""
    assert [rule_exponent(r) for r in ("weight", "gradient", "invariant")] == [1, -1, 0]
    assert rule_exponent(("gradient", 2)) == -2 and rule_exponent(("weight", -3)) == -3
    for bad in (["weight", 2], ("weight", 2, 1), ("weight", 2.0), ("weight",), (2, "weight"), 3):
        with pytest.raises(GradGraphError) as info:
            rule_exponent(bad)
        assert str(info.value) == (
            f"output rule must be 'weight', 'gradient', 'invariant' or (rule, int power), got {bad!r}"
        )
    with pytest.raises(GradGraphError) as info:
        rule_exponent(("bias", 2))
    assert str(info.value) == "unknown output rule 'bias'; expected one of ['gradient', 'invariant', 'weight']"


@pytest.mark.parametrize("what", ["edge", "node"])
def test_a_rule_that_is_neither_a_rule_nor_a_list_is_named(what):
    """Kills ``_exponents`` 4 (no message) and ``__init__`` 16, 19, 20 (edge) / 23, 26, 27
    (node): the ``what`` passed as ``None`` / ``"XXedgeXX"`` / ``"EDGE"``."""
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(Stub(), **{what: 3})
    assert str(info.value) == f"ScaleEquivariant: {what} rule must be a rule or a list of rules, got 3"


def test_constructor_errors_in_full():
    """Kills ``__init__`` 8, 9 (the non-module message) and 34, 35 (the graph-rule message)."""
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(lambda graph: graph)
    assert str(info.value) == "ScaleEquivariant wraps an nn.Module, got function"
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(Stub(), graph="weight")
    assert str(info.value) == (
        "ScaleEquivariant: graph outputs can only be 'invariant', got 'weight'; a per-graph value "
        "has no hidden neuron whose factor it could carry"
    )


def test_forward_errors_in_full():
    """Kills ``forward`` 7, 8, 9 (the wrong-return message) and 53-56 (the graph-output message)."""
    batch = relu_batch()

    class ReturnsTuple(nn.Module):
        def forward(self, graph):
            return graph.act, None

    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(ReturnsTuple())(batch)
    assert str(info.value) == (
        "ScaleEquivariant: the wrapped ReturnsTuple returned tuple; "
        "it must return gradgraph.nn.GradMetaNetOutput(edge=, node=, graph=)"
    )
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(Stub(), graph=None)(batch)
    assert str(info.value) == (
        "ScaleEquivariant: the wrapped model returned a graph output but no graph rule was declared"
    )
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(Stub(), node=None)(batch)
    assert str(info.value) == (
        "ScaleEquivariant: the wrapped model returned a node output but no node rule was declared"
    )


@pytest.mark.parametrize("rules", ["gradient", ["gradient", "weight", "invariant"]])
def test_wrongly_shaped_outputs_are_named_in_full(rules):
    """Kills ``_map_back`` 4 (``and``: a 2-D output with the wrong row count, or a 3-D one
    with the right count, let through), 10, 11 (the message) and ``forward`` 19, 29, 30
    (edge ``rows_name``), 37, 48, 49 (node ``rows_name``)."""
    batch = relu_batch()
    E, N = batch.edge_index.shape[1], batch.num_nodes
    cases = [
        (Stub(edge=(3,), edge_rows=E + 1), f"edge output must have shape [E] or [E, k] with E={E}, got [{E + 1}, 3]"),
        (Stub(edge=(3, 1)), f"edge output must have shape [E] or [E, k] with E={E}, got [{E}, 3, 1]"),
        (Stub(node=(3,), node_rows=N - 1), f"node output must have shape [N] or [N, k] with N={N}, got [{N - 1}, 3]"),
        (Stub(node=(3, 1)), f"node output must have shape [N] or [N, k] with N={N}, got [{N}, 3, 1]"),
    ]
    for stub, message in cases:
        with pytest.raises(GradGraphError) as info:
            ScaleEquivariant(stub, edge=rules, node=rules)(batch)
        assert str(info.value) == f"ScaleEquivariant: {message}"


def test_a_rule_count_that_does_not_match_the_channels_is_named_in_full():
    batch = relu_batch()
    E = batch.edge_index.shape[1]
    with pytest.raises(GradGraphError) as info:
        ScaleEquivariant(Stub(edge=(4,)), edge=["weight", "gradient"])(batch)
    assert str(info.value) == (
        f"ScaleEquivariant: 2 edge rules declared for a edge output with 4 channels (shape [{E}, 4])"
    )
