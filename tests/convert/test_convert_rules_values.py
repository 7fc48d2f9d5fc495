"""The trace rules' values and refusals where the other convert tests walk only one path
(mutation testing of ``convert/``, docs/mutation.md: each test names the mutants it kills).

Every conversion is checked against torch.func's per-sample gradients in float64
(``assert_exact_per_sample_grads``), a group element against the permuted model
(``assert_group_keeps_function``), and every refusal by its whole message (the user's frame
it names matched as ``FILE:LINE in FUNCTION``: under mutmut that frame is its trampoline).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

import gradgraph
from gradgraph import ActivationKind, EdgeKind
from gradgraph.convert.trace import UnsupportedOperationError

DTYPE = torch.float64


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


class Around(nn.Module):
    """``l2(f(tanh(l1(x))))``; ``x`` ``[b, d_in]`` or ``[b, T, d_in]``; ``f`` maps ``[..., hidden]``
    to ``[b, hidden]`` (a token model pools inside ``f``)."""

    def __init__(self, f, d_in: int = 4, hidden: int = 6, d_out: int = 3):
        super().__init__()
        self.l1, self.l2, self.f = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), f

    def forward(self, x):
        return self.l2(self.f(torch.tanh(self.l1(x))))


def _model(f, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Around(f).to(DTYPE)


def _batch(tokens: bool):
    generator = torch.Generator().manual_seed(1)
    shape = (5, 3, 4) if tokens else (5, 4)
    return torch.randn(*shape, dtype=DTYPE, generator=generator), torch.randn(5, 3, dtype=DTYPE, generator=generator)


# ------------------------------------------------------------------ softmax
@pytest.mark.parametrize("softmax", [
    lambda h: F.softmax(h, dim=-1),
    lambda h: torch.softmax(h, dim=1),
    lambda h: F.softmax(h, 1),
], ids=["F-keyword-minus-one", "torch-keyword-one", "F-positional-one"])
def test_a_softmax_over_the_features_with_its_dim_written_any_way_converts_exactly(softmax):
    """A softmax over a set's features, its ``dim`` a keyword or positional, negative or not.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``ElementwiseRules.softmax`` 16, 18 (``args[1]``
    read when only the keyword holds the dim: an ``IndexError``)."""
    inputs, targets = _batch(tokens=False)
    assert_exact_per_sample_grads(_model(softmax), inputs, targets, squared_error)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax:UserWarning")
def test_a_softmax_without_a_dim_takes_pytorchs_implicit_choice():
    """``F.softmax(h)`` / ``nn.Softmax()`` on ``[b, features]``: PyTorch's implicit dim is 1, the
    features, so it converts exactly; on ``[b, T, features]`` PyTorch takes dim 0 — the datapoints —
    and it is refused, never read as a softmax over the features. Failed before with a ``TypeError``
    (``None % ndim``) inside the softmax rule (found by the mutation run of ``convert/``)."""
    inputs, targets = _batch(tokens=False)
    assert_exact_per_sample_grads(_model(nn.Softmax()), inputs, targets, squared_error)
    assert_exact_per_sample_grads(_model(lambda h: F.softmax(h)), inputs, targets, squared_error)
    tokens, token_targets = _batch(tokens=True)
    with pytest.raises(UnsupportedOperationError, match="torch.nn.functional.softmax: a softmax across positions"):
        gradgraph.to_graph(_model(lambda h: F.softmax(h).mean(1)), tokens, token_targets, squared_error)


SOFTMAX_OVER_POSITIONS = (
    r"^[^ ]+:\d+ in [^ ]+: {op}: a softmax across positions or part of the features, and its result reaches "
    r"torch\.nn\.functional\.linear with the parameter 'l2\.weight' at [^ ]+:\d+ in Around\.forward \(module "
    r"'l2'\)\. Write it with supported ops, register it with gradgraph\.convert\.register_elementwise if it is "
    r"elementwise, or register a converter for the whole module$"
)


@pytest.mark.parametrize(("softmax", "op"), [
    (lambda h: h.reshape(h.shape[0], -1).softmax(-1).reshape(h.shape).mean(1), r"Tensor\.softmax"),
], ids=["tokens-and-features-flattened"])
def test_a_softmax_over_positions_is_refused_where_its_result_reaches_a_parameter(softmax, op):
    """A softmax over an axis that holds tokens and features together mixes positions and features:
    refused, by the whole message.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``ElementwiseRules.softmax`` 25, 26 (the softmax over
    tokens and features taken as elementwise), 54-63 (the opaque mark's output, op, reason or sets
    dropped or changed). A softmax over the token axis alone (its dim a keyword or positional) was refused
    here too until the trace ran it as its parts (the next test)."""
    inputs, targets = _batch(tokens=True)
    with pytest.raises(UnsupportedOperationError, match=SOFTMAX_OVER_POSITIONS.format(op=op)):
        gradgraph.to_graph(_model(softmax), inputs, targets, squared_error)


@pytest.mark.parametrize("softmax", [lambda h: F.softmax(h, dim=1).mean(1), lambda h: torch.softmax(h, 1).mean(1),
                                     lambda h: (F.softmax(h, 1) * h).sum(1)],
                         ids=["keyword-dim", "positional-dim", "weights-times-values"])
def test_a_softmax_over_the_token_axis_converts_exactly(softmax):
    """Each feature's softmax over the tokens, as ``exp(h - c) / sum_t exp(h - c)`` (trace/decompositions.py):
    exact, whether its dim is a keyword or positional."""
    inputs, targets = _batch(tokens=True)
    assert_exact_per_sample_grads(_model(softmax), inputs, targets, squared_error)


class ReadFirst(nn.Module):
    """``l2(tanh(l1(f(x.T).T)))``: an op over the *datapoints* of the raw input, read first."""

    def __init__(self, f):
        super().__init__()
        self.l1, self.l2, self.f = nn.Linear(4, 6), nn.Linear(6, 3), f

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(self.f(x.transpose(0, 1)).transpose(0, 1))))


@pytest.mark.parametrize(("f", "op"), [
    (lambda x: x.softmax(-1), r"Tensor\.softmax"),
    (torch.tanh, r"torch\.tanh"),
], ids=["softmax", "tanh"])
def test_an_input_read_first_with_its_datapoints_last_is_refused_naming_the_op(f, op):
    """The input read by an elementwise op or a softmax with its datapoints last: refused,
    naming that op. Checked to fail on ``ElementwiseRules.softmax`` 3 and ``ElementwiseRules.unary``
    3 (the reader's name not passed on)."""
    inputs, targets = _batch(tokens=False)
    with pytest.raises(UnsupportedOperationError,
                       match=rf"^[^ ]+:\d+ in [^ ]+: {op}: the input's features are not its last axis$"):
        gradgraph.to_graph(ReadFirst(f).to(DTYPE), inputs, targets, squared_error)


# ------------------------------------------------------------------ fused gates
class SwappedSwiGLU(nn.Module):
    """``head(h + w3(silu(a) * b))`` with ``b, a = w12(h).chunk(2, -1)``: the gate is the *second*
    half of the fused output (as some checkpoints order it)."""

    def __init__(self, d: int = 5, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.w12 = nn.Linear(d, 2 * hidden)
        self.w3 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        b, a = self.w12(h).chunk(2, dim=-1)
        return self.head(h + self.w3(F.silu(a) * b))


def test_a_fused_gate_whose_gate_is_the_second_half_is_exact_and_keeps_its_group():
    """Exact per-sample gradients, and the inferred group keeps the function and moves the
    hidden neurons (each half by the product's permutation).

    Written for ``ElementwiseRules.split_fused_gate`` 26 (``low_a <= high_b``: the halves in this
    order read as overlapping, so the gate's cut is skipped), and it does **not** fail on it:
    the chunk's halves are cut anyway (docs/mutation.md lists 26 as not killed)."""
    torch.manual_seed(0)
    model = SwappedSwiGLU().to(DTYPE)
    inputs, targets = _batch(tokens=False)
    inputs = torch.cat([inputs, inputs[:, :1]], dim=1)
    assert_exact_per_sample_grads(model, inputs, targets, squared_error)
    moved = sum(assert_group_keeps_function(model, inputs, targets, squared_error, seed=seed)[0] for seed in range(4))
    assert moved > 0


# ------------------------------------------------------------------ parameters as biases and scales
class ParameterAfter(nn.Module):
    """``l2(f(tanh(l1(x)), ...))`` with ``l1`` without bias, where ``f`` adds or multiplies the
    module's own parameters: ``kind`` picks the model (every parameter reaches the loss).

    - ``"bias-after-activation"``: ``tanh(l1(x)) + b`` (a bias on values that are no fresh
      affine output: a new set of neurons holding ``b`` as their bias);
    - ``"absorbed"``: ``tanh(l1(x) + b)`` (``b`` becomes ``l1``'s neurons' bias: no new set);
    - ``"two-biases"``: ``tanh(l1(x) + b + c)`` (``b`` absorbed, ``c`` a new set);
    - ``"position"``: ``(tanh(l1(x)) + p).mean(1)`` with ``p`` ``[T, hidden]`` (a position
      embedding added after the activation);
    - ``"scale-per-position"``: ``(tanh(l1(x)) * p).mean(1)`` (refused);
    - ``"scale-on-tokens"``: ``(tanh(l1(x)).transpose(1, 2) * t).mean(2)`` with ``t`` ``[T]``
      (refused: the parameter differs between the positions on the last axis)."""

    def __init__(self, kind: str, d_in: int = 4, hidden: int = 6, tokens: int = 3, d_out: int = 3):
        super().__init__()
        self.kind = kind
        self.b = nn.Parameter(torch.randn(hidden)) if kind in ("bias-after-activation", "absorbed", "two-biases") \
            else None
        self.c = nn.Parameter(torch.randn(hidden)) if kind == "two-biases" else None
        self.p = nn.Parameter(torch.randn(tokens, hidden)) if kind in ("position", "scale-per-position") else None
        self.t = nn.Parameter(torch.randn(tokens)) if kind == "scale-on-tokens" else None
        self.l1, self.l2 = nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out)

    def forward(self, x):
        if self.kind == "bias-after-activation":
            h = torch.tanh(self.l1(x)) + self.b
        elif self.kind == "absorbed":
            h = torch.tanh(self.l1(x) + self.b)
        elif self.kind == "two-biases":
            h = torch.tanh(self.l1(x) + self.b + self.c)
        elif self.kind == "position":
            h = (torch.tanh(self.l1(x)) + self.p).mean(1)
        elif self.kind == "scale-per-position":
            h = (torch.tanh(self.l1(x)) * self.p).mean(1)
        else:
            h = (torch.tanh(self.l1(x)).transpose(1, 2) * self.t).mean(2)
        return self.l2(h)


@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize(("kind", "num_nodes"), [
    ("bias-after-activation", 4 + 6 + 6 + 3), ("absorbed", 4 + 6 + 3), ("two-biases", 4 + 6 + 6 + 3), ("position", None),
])
def test_a_parameter_added_to_neurons_is_their_bias_exactly(kind, num_nodes, batch):
    """A parameter added to neurons: absorbed as the bias of a fresh ``Linear`` output that has
    none (no new neurons), else the bias of a new set; per position when it differs between
    positions. Exact per-sample gradients, for a batch of one datapoint too.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``ElementwiseRules.with_parameter`` 72, 155 (the
    second row read: none in a batch of one), 73, 74, 78-83, 91 (the absorption's test), 115-117,
    120-123, 126-128 (the new set), 129 (its edges' parameter ``-2``), 43 (the position
    embedding's path), 54 (its sum read as a product: GATE edges)."""
    torch.manual_seed(0)
    model = ParameterAfter(kind).to(DTYPE)
    inputs, targets = _batch(tokens=kind == "position")
    graph = assert_exact_per_sample_grads(model, inputs[:batch], targets[:batch], squared_error)
    # edges without a parameter (the RESIDUAL edges into a bias's new set) name parameter -1
    assert set(graph.edge_param[graph.edge_kind == int(EdgeKind.RESIDUAL)].tolist()) <= {-1}
    if num_nodes is not None:
        assert graph.num_nodes == num_nodes
    else:  # the position embedding's values join the neurons by a sum: RESIDUAL edges, no GATE
        kinds = graph.edge_kind.tolist()
        assert int(EdgeKind.GATE) not in kinds and int(EdgeKind.RESIDUAL) in kinds


@pytest.mark.parametrize(("kind", "reason"), [
    ("scale-per-position", "a parameter multiplying neurons that differs between positions"),
    # (read as a map [b, features, positions], as a 1-D convolution's: a parameter differing by position)
    ("scale-on-tokens", "a parameter combined with a feature map that differs between positions"),
])
def test_a_parameter_that_is_no_bias_or_scale_per_feature_is_refused(kind, reason):
    """Refused by the whole message. Checked to fail on ``ElementwiseRules.with_parameter``
    37-42 and 65-70 (the op or the reason dropped or changed)."""
    torch.manual_seed(0)
    inputs, targets = _batch(tokens=True)
    with pytest.raises(UnsupportedOperationError, match=rf"^[^ ]+:\d+ in [^ ]+: Tensor\.mul: {reason}$"):
        gradgraph.to_graph(ParameterAfter(kind).to(DTYPE), inputs, targets, squared_error)


# ------------------------------------------------------------------ activation labels
class Elementwise(nn.Module):
    """``l2(f(l1(x)))``: the hidden neurons' activation label is ``f``'s."""

    def __init__(self, f):
        super().__init__()
        self.l1, self.l2, self.f = nn.Linear(4, 6), nn.Linear(6, 3), f

    def forward(self, x):
        return self.l2(self.f(self.l1(x)))


@pytest.mark.parametrize(("f", "label"), [
    (torch.tanh, ActivationKind.TANH),
    (lambda h: h * 2.0, ActivationKind.OTHER),
    (lambda h: torch.tanh(h) * 2.0, ActivationKind.OTHER),
], ids=["tanh", "times-two", "tanh-times-two"])
def test_an_elementwise_op_other_than_one_activation_labels_the_neurons_other(f, label):
    """``graph.activation`` of ``l1``'s neurons: the activation when it is the one op applied,
    ``OTHER`` when another elementwise op (a constant factor) changes them.

    Checked to fail on ``ElementwiseRules.unary`` 17 (the constant factor of ``l1(x) * 2`` not
    counted: labelled the identity)."""
    torch.manual_seed(0)
    inputs, targets = _batch(tokens=False)
    graph = assert_exact_per_sample_grads(Elementwise(f).to(DTYPE), inputs, targets, squared_error)
    assert graph.activation[4:10].tolist() == [int(label)] * 6


# ------------------------------------------------------------------ edge values and biases (assembly)
class PartOfAWeight(nn.Module):
    """``l2(g(tanh(F.linear(x, w[rows], b[rows]))))`` with ``w`` ``[hidden + 2, d_in]`` and
    ``rows`` the first or the last ``hidden`` rows: the first layer's edges hold part of ``w``.
    ``g`` is the identity, or ``h + tanh(l3(h))`` (RESIDUAL edges without a weight, so the
    edge values are gathered, not one ``cat`` of whole slots)."""

    def __init__(self, offset: int = 0, residual: bool = False, d_in: int = 4, hidden: int = 5, d_out: int = 3):
        super().__init__()
        self.rows = slice(offset, offset + hidden)
        self.w = nn.Parameter(torch.randn(hidden + 2, d_in))
        self.b = nn.Parameter(torch.randn(hidden + 2))
        self.l3 = nn.Linear(hidden, hidden) if residual else None
        self.l2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w[self.rows], self.b[self.rows]))
        if self.l3 is not None:
            h = h + torch.tanh(self.l3(h))
        return self.l2(h)


@pytest.mark.parametrize(("offset", "residual"), [(0, False), (2, False), (2, True)])
def test_edges_that_hold_part_of_a_parameter_carry_those_entries(offset, residual):
    """Each edge's value is its weight entry and each node's bias its entry, where a layer
    reads only some rows of its parameters; per-sample gradients exact (the unread rows'
    gradient zero).

    Checked with ``MUTANT_UNDER_TEST`` against ``assembly._assembly_recipe`` 23, 24, 62, 63
    and ``_bias_pieces`` 3-9 (docs/mutation.md says which it kills)."""
    torch.manual_seed(0)
    model = PartOfAWeight(offset, residual).to(DTYPE)
    inputs, targets = _batch(tokens=False)
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)
    first = graph.edge_param == graph.param_names.index("w")
    torch.testing.assert_close(graph.edge_attr[first, 0], model.w.detach()[model.rows].reshape(-1), atol=0, rtol=0)
    torch.testing.assert_close(graph.x[4:9, 0], model.b.detach()[model.rows], atol=0, rtol=0)
    assert_exact_per_sample_grads(model, inputs, targets, squared_error)


class OutputBias(nn.Module):
    """``l2(tanh(l1(x))) + b`` with ``l2`` without bias: ``b`` is absorbed as the output
    neurons' bias."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.b = nn.Linear(4, 6), nn.Linear(6, 3, bias=False), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) + self.b


def test_a_bias_absorbed_by_the_output_neurons_leaves_their_act_the_output():
    """The output neurons' ``act`` is the model's output (bias included), their bias ``b``, no
    extra neurons. Checked to fail on ``ElementwiseRules.with_parameter`` 111 (the biased value
    not observed: the output neurons' act read from before the bias)."""
    torch.manual_seed(0)
    model = OutputBias().to(DTYPE)
    inputs, targets = _batch(tokens=False)
    graph = assert_exact_per_sample_grads(model, inputs, targets, squared_error)
    assert graph.num_nodes == 4 + 6 + 3
    torch.testing.assert_close(graph.act[-3:].T, model(inputs).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(graph.x[-3:, 0], model.b.detach(), atol=0, rtol=0)
