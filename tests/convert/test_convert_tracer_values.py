"""Per-function checks of ``convert/trace/tracer.py`` and ``convert/trace/rules_shape.py`` (issue 31, group
``convert-tracer``).

Written for the survivors of mutmut's runs over the two files (docs/mutation.md): each test is float64 against
an independent truth (torch.func through ``tests/traced_models.py``'s helpers, or a per-datapoint autograd loop,
at 1e-10), or checks a refusal's message in full where a user reads it (what was wrong and where), and names in
its docstring the mutants it kills (``f N``: mutant ``N`` of function ``f``, checked with ``MUTANT_UNDER_TEST``).
The first tests reach the dispatch's refusals that no cheap test of the group's list reached (coverage.py).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.graph import NodeKind
from gradgraph.convert.layout import make_plan
from gradgraph.convert.trace import trace_model
from convert_values import IndexedLoop, LearnedInitialState, exact, refused, squared
from test_convert_tracer_locations import OpaqueThrough  # its lines are the locations tests'
from traced_models import (
    assert_exact_per_sample_grads, assert_group_keeps_function, assert_matches_autograd_loop,
    assert_per_sample_grads_match_loop,
)

DTYPE = torch.float64


class InPlaceOnTheInput(nn.Module):
    """``x.mul_(2)`` on a copy of the raw input: no in-place rule follows the input's elements."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        x = x.clone()
        x.mul_(2)
        return self.lin(x)


class PositionsChangedAfterTheRead(nn.Module):
    """Position ids an embedding read, then changed in place: the factors read them after the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])
        h = self.tokens(ids) + self.positions(positions)
        positions.add_(1)
        return self.out(h).sum(1)


class UnbatchedConvolution(nn.Module):
    """``F.conv1d`` of one datapoint's ``[channels, length]`` values (the datapoints on the channel axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.weight = nn.Parameter(torch.randn(3, 2, 3, dtype=DTYPE))

    def forward(self, x):
        return F.conv1d(torch.tanh(self.lin(x)), self.weight)


class ParameterExponent(nn.Module):
    """``torch.pow(h, p)``: a parameter as an activation's exponent."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.p = nn.Linear(3, 2), nn.Parameter(torch.tensor(2.0, dtype=DTYPE))

    def forward(self, x):
        return torch.pow(torch.sigmoid(self.lin(x)), self.p)


def test_an_in_place_op_on_the_input_is_refused_before_it_runs():
    refused(InPlaceOnTheInput().to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            ": Tensor.mul_: in-place ops on tensors gradgraph follows are unsupported; use the out-of-place form "
            "(inplace=False)")


def test_indices_an_embedding_read_changed_in_place_are_refused():
    refused(PositionsChangedAfterTheRead().to(DTYPE), torch.randint(0, 7, (3, 5)),
            ": Tensor.add_: changes in place the indices an embedding already read (the factors read them after "
            "the forward); change a copy (.clone())")


def test_a_convolution_without_a_datapoint_axis_is_refused():
    refused(UnbatchedConvolution().to(DTYPE), torch.randn(2, 5, dtype=DTYPE),
            ": torch.conv1d: a convolution of an input without a datapoint axis ([channels, *spatial]); gradgraph "
            "reads convolutions of batches [b, channels, *spatial]")


def test_a_parameter_exponent_of_an_activation_is_refused_naming_it():
    refused(ParameterExponent().to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            ": torch.pow: the parameter 'p' is subtracted, divided by, an exponent, a bound or scaled by alpha; "
            "gradgraph reads a parameter added to neurons (a bias) or multiplied with them (a scale): write h + b "
            "or h * s")


class AddmmScaled(nn.Module):
    """``torch.addmm(b, h, w, beta=.., alpha=..)``: a scaled affine map."""

    def __init__(self, **scales) -> None:
        super().__init__()
        self.lin, self.scales = nn.Linear(3, 2), scales
        self.w, self.b = nn.Parameter(torch.randn(2, 2, dtype=DTYPE)), nn.Parameter(torch.randn(2, dtype=DTYPE))

    def forward(self, x):
        return torch.addmm(self.b, torch.tanh(self.lin(x)), self.w, **self.scales)


@pytest.mark.parametrize("scales", [{"beta": 0.5}, {"alpha": 2}, {"beta": 1, "alpha": 1.5}])
def test_addmm_with_alpha_or_beta_is_refused(scales):
    refused(AddmmScaled(**scales).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            ": torch.addmm: addmm with alpha/beta other than 1")


def test_addmm_with_alpha_and_beta_one_is_an_affine_map():
    """``beta=1, alpha=1`` given: the plain ``b + h @ w``."""
    torch.manual_seed(0)
    exact(AddmmScaled(beta=1, alpha=1).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class EmbeddingWith(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.e, self.out = nn.Embedding(7, 4, **options), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(self.e(ids)).sum(1)


def test_an_embedding_with_max_norm_is_refused():
    refused(EmbeddingWith(max_norm=1.0).to(DTYPE), torch.randint(0, 7, (3, 5)),
            " (module 'e' of type Embedding): torch.nn.functional.embedding: max_norm renormalises the table in "
            "place during the forward")


def test_an_embedding_that_scales_gradients_by_frequency_is_refused():
    refused(EmbeddingWith(scale_grad_by_freq=True).to(DTYPE), torch.randint(0, 7, (3, 5)),
            " (module 'e' of type Embedding): torch.nn.functional.embedding: scale_grad_by_freq scales a row's "
            "gradient by its count in the whole batch, so datapoints' gradients are not separate")


def test_an_embedding_with_its_options_given_converts():
    """``padding_idx``, ``max_norm=None``, ``scale_grad_by_freq=False`` given: a plain embedding (the padding row
    gets no gradient)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 7, (3, 5))
    ids[0, 0] = 2
    exact(EmbeddingWith(padding_idx=2, max_norm=None, scale_grad_by_freq=False).to(DTYPE), ids)


# ----------------------------------------------------------------------------- rules_shape.py's refusals
class Joined(nn.Module):
    """``form`` decides what ``forward`` joins (each a refusal of rules_shape.py)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.lin, self.other = nn.Linear(3, 2), nn.Linear(3, 2)
        self.tokens, self.positions = nn.Embedding(7, 2), nn.Embedding(5, 2)
        self.token = nn.Parameter(torch.randn(1, 1, 2, dtype=DTYPE))
        self.tokens_per_datapoint = nn.Parameter(torch.randn(2, 1, 2, dtype=DTYPE))
        self.row = nn.Parameter(torch.randn(1, 2, dtype=DTYPE))
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        if self.form == "unbound":  # two position tables joined before they meet a token
            joined = torch.cat([self.positions(torch.arange(2)), self.positions(torch.arange(3))], 0)
            return self.out(torch.tanh(self.tokens(x)) + joined).sum(1)
        h = torch.tanh(self.lin(x))
        if self.form == "constant":  # (a constant of one value is the pad it equals, since session 19)
            return self.out(torch.cat([h, torch.arange(2, dtype=DTYPE).expand(*h.shape[:-1], 2)], -1)[..., :2])
        if self.form == "stacked token":
            return self.out(torch.stack([h, self.row.expand(h.shape[0], 2)], 1)).sum(1)
        if self.form == "token as a feature":
            return self.out(torch.cat([h, self.token[..., :1].expand(*h.shape[:-1], 1)], -1)[..., 1:]).sum(1)
        if self.form == "token as a datapoint":
            return self.out(torch.cat([h, self.token.expand(1, h.shape[1], 2)], 0)).sum(1)
        if self.form == "a token per datapoint":
            return self.out(torch.cat([self.tokens_per_datapoint, h], 1)).sum(1)
        if self.form == "no datapoint's part":
            return self.out(h + torch.cat([self.token, self.positions(torch.arange(3))[None]], 1)).sum(1)
        raise AssertionError(self.form)


@pytest.mark.parametrize("form, inputs, message", [
    ("unbound", lambda: torch.randint(0, 7, (2, 5)), "concatenating values that do not depend on the input"),
    ("constant", lambda: torch.randn(4, 3, dtype=DTYPE),
     "concatenating neuron values with constants (for transformers models, call them with use_cache=False)"),
    ("stacked token", lambda: torch.randn(4, 3, dtype=DTYPE), "mixes a parameter or the raw input with neuron values"),
    ("token as a feature", lambda: torch.randn(2, 4, 3, dtype=DTYPE),
     "a parameter concatenated along the feature or datapoint axis"),
    ("token as a datapoint", lambda: torch.randn(2, 4, 3, dtype=DTYPE),
     "a parameter concatenated along the feature or datapoint axis"),
    ("a token per datapoint", lambda: torch.randn(2, 4, 3, dtype=DTYPE),
     "a concatenated parameter that differs between datapoints"),
    ("no datapoint's part", lambda: torch.randn(2, 3, 3, dtype=DTYPE),
     "no part of this concatenation depends on the input"),
])
def test_joins_without_a_rule_are_refused(form, inputs, message):
    name = "torch.stack" if form == "stacked token" else "torch.cat"
    refused(Joined(form).to(DTYPE), inputs(), f": {name}: {message}")


# ----------------------------------------------------------------------------- the dispatch's argument forms
class Act(nn.Module):
    """``lin``, then ``act(self, h)``, then ``out``: one op between two affine maps, in the form a test gives."""

    def __init__(self, act, width: int = 2, **parameters) -> None:
        super().__init__()
        self.lin, self.out, self.act = nn.Linear(3, width), nn.Linear(width, 2), act
        for name, shape in parameters.items():
            setattr(self, name, nn.Parameter(torch.randn(*shape, dtype=DTYPE)))

    def forward(self, x):
        return self.out(self.act(self, torch.tanh(self.lin(x))))


@pytest.mark.parametrize("act", [
    lambda m, h: F.dropout(h, 0.5, False), lambda m, h: F.dropout(h, p=0.5, training=False),
    lambda m, h: F.dropout(h, 0.0, True), lambda m, h: F.dropout(h, p=0.0), lambda m, h: F.alpha_dropout(h, 0.5),
    lambda m, h: F.feature_alpha_dropout(h, p=0.5), lambda m, h: torch.dropout(h, 0.5, False),
    lambda m, h: torch.dropout(h, 0.0, True),
    lambda m, h: F.rrelu(h), lambda m, h: F.rrelu(h, 0.1, 0.3, False), lambda m, h: F.rrelu(h, training=False),
    lambda m, h: torch.sigmoid(input=h),
], ids=["dropout-positional-eval", "dropout-keywords-eval", "dropout-p0-positional", "dropout-p0-keyword",
        "alpha-dropout-default", "feature-alpha-dropout-default", "torch-dropout-eval", "torch-dropout-p0",
        "rrelu-default", "rrelu-eval",
        "rrelu-keyword-eval", "sigmoid-input-keyword"])
def test_inactive_dropouts_and_rrelu_and_keyword_inputs_convert_exactly(act):
    """An inactive dropout (eval, ``p=0``, or an alpha dropout, whose default is eval) is the identity, an RReLU
    out of training a leaky ReLU of slope ``(lower + upper) / 2``; checked against a per-datapoint autograd loop
    (torch.func has no batching rule for RReLU). ``torch.dropout`` takes its arguments positionally (``F.dropout``
    hands them to the mode as keywords). Kills dispatch 400, 402 (``torch.dropout``'s ``p`` not read)."""
    torch.manual_seed(2)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(Act(act).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), None, squared)


@pytest.mark.parametrize("act, op, message", [
    (lambda m, h: F.dropout(h), "torch.nn.functional.dropout",
     "active dropout changes the function; call model.eval()"),
    (lambda m, h: F.dropout(h, 0.1, True), "torch.nn.functional.dropout",
     "active dropout changes the function; call model.eval()"),
    (lambda m, h: F.dropout(h, training=True, p=0.1), "torch.nn.functional.dropout",
     "active dropout changes the function; call model.eval()"),
    (lambda m, h: F.alpha_dropout(h, 0.5, True), "torch.nn.functional.alpha_dropout",
     "active dropout changes the function; call model.eval()"),
    (lambda m, h: torch.dropout(h, 0.5, True), "torch.dropout",
     "active dropout changes the function; call model.eval()"),
    (lambda m, h: F.rrelu(h, 0.1, 0.3, True), "torch.nn.functional.rrelu",
     "an active RReLU draws a random slope per element (training mode); call model.eval(), where it is a leaky ReLU "
     "of slope (lower + upper) / 2"),
    (lambda m, h: F.rrelu(h, training=True), "torch.nn.functional.rrelu",
     "an active RReLU draws a random slope per element (training mode); call model.eval(), where it is a leaky ReLU "
     "of slope (lower + upper) / 2"),
], ids=["dropout-default", "dropout-positional", "dropout-keywords", "alpha-dropout", "torch-dropout", "rrelu",
        "rrelu-keyword"])
def test_active_dropout_and_rrelu_are_refused(act, op, message):
    refused(Act(act).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), f": {op}: {message}")


@pytest.mark.parametrize("act", [
    lambda m, h: F.linear(h, m.w, bias=m.b), lambda m, h: F.linear(h, weight=m.w, bias=m.b),
    lambda m, h: F.linear(h, weight=m.w) + m.b, lambda m, h: m.w.t().__rmatmul__(h) + m.b,
    lambda m, h: torch.addmm(m.b, h, m.w.t(), beta=1, alpha=1),
], ids=["bias-keyword", "weight-and-bias-keywords", "weight-keyword", "rmatmul", "addmm-ones"])
def test_affine_maps_with_keyword_arguments_or_reflected_convert_exactly(act):
    torch.manual_seed(3)
    exact(Act(act, w=(2, 2), b=(2,)).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class FunctionalEmbedding(nn.Module):
    """``F.embedding`` called with its arguments as ``call`` passes them."""

    def __init__(self, call) -> None:
        super().__init__()
        self.weight, self.out, self.call = nn.Parameter(torch.randn(7, 4, dtype=DTYPE)), nn.Linear(4, 2), call

    def forward(self, ids):
        return self.out(torch.tanh(self.call(self, ids))).sum(1)


@pytest.mark.parametrize("call", [
    lambda m, ids: F.embedding(input=ids, weight=m.weight), lambda m, ids: F.embedding(ids, m.weight, 2),
    lambda m, ids: F.embedding(ids, m.weight, padding_idx=2), lambda m, ids: F.embedding(ids, m.weight, None, None),
], ids=["keywords", "padding-positional", "padding-keyword", "no-max-norm-positional"])
def test_functional_embeddings_convert_exactly(call):
    """The padding row (id 2, read by the first datapoint) gets no gradient, wherever ``padding_idx`` is given."""
    torch.manual_seed(4)
    ids = torch.randint(0, 7, (3, 5))
    ids[0, :2] = 2
    exact(FunctionalEmbedding(call).to(DTYPE), ids)


@pytest.mark.parametrize("call, message", [
    (lambda m, ids: F.embedding(ids, m.weight, None, 1.0), "max_norm renormalises the table in place during the "
     "forward"),
    (lambda m, ids: F.embedding(ids, m.weight, None, None, 2.0, True), "scale_grad_by_freq scales a row's gradient "
     "by its count in the whole batch, so datapoints' gradients are not separate"),
], ids=["max-norm-positional", "scale-grad-by-freq-positional"])
def test_functional_embedding_options_given_positionally_are_refused(call, message):
    refused(FunctionalEmbedding(call).to(DTYPE), torch.randint(0, 7, (3, 5)),
            f": torch.nn.functional.embedding: {message}")


# ----------------------------------------------------------------------------- ops without a rule
RANK_ONE = ("uses the parameter 'w', and gradgraph has no rule for it, so its gradient cannot be written as rank-1 "
            "terms on the graph; register a converter for the module (gradgraph.register_converter) or write it with "
            "linear maps")


@pytest.mark.parametrize("act, message", [
    (lambda m, h: F.conv_transpose1d(h.reshape(4, 1, 2), m.w).flatten(1)[:, :2],
     f": torch.conv_transpose1d: a convolution {RANK_ONE}"),
    (lambda m, h: torch.atan2(h, m.w[0, :2]), f": torch.atan2: this op {RANK_ONE}"),
], ids=["conv-transpose", "atan2"])
def test_a_parameter_in_an_op_without_a_rule_is_refused_naming_the_kind_of_op(act, message):
    refused(Act(act, w=(1, 1, 2)).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), message)


OPAQUE_REACHES = (r"^\S+:\d+ in \S+{where}: torch\.cumsum: gradgraph has no rule for this op, and its result reaches "
                  r"{what} at \S+:\d+ in \S+{at}\. Write it with supported ops, register it with "
                  r"gradgraph\.convert\.register_elementwise if it is elementwise, or register a converter for the "
                  r"whole module$")


def test_a_value_without_a_rule_is_refused_where_it_reaches_a_parameter_naming_where_it_was_made():
    """The refusal names the op and module that made the value (``inner``, not the Tanh it went through) and the
    op and module where it meets a parameter."""
    import re

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=OPAQUE_REACHES.format(
            where=re.escape(" (module 'inner')"), what=re.escape("torch.nn.functional.linear with the parameter "
                                                               "'out.weight'"), at=re.escape(" (module 'out')"))):
        gradgraph.to_graph(OpaqueThrough(False).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), None, squared)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=OPAQUE_REACHES.format(
            where=re.escape(" (module 'inner')"), what=re.escape("Tensor.mul with the parameter 'scale'"), at="")):
        gradgraph.to_graph(OpaqueThrough(True).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), None, squared)



# ----------------------------------------------------------------------------- in-place ops on the raw input
class ChangesTheInput(nn.Module):
    """``change(x)`` on a copy of the raw input (which no in-place rule follows), then a Linear."""

    def __init__(self, change) -> None:
        super().__init__()
        self.lin, self.change = nn.Linear(3, 2), change

    def forward(self, x):
        x = x.clone()
        x = self.change(x)
        return self.lin(x)


def _iadd(x):
    x += 1
    return x


def _setitem(x):
    x[:, 0] = 0
    return x


@pytest.mark.parametrize("change, op", [
    (_iadd, "Tensor.add_"), (_setitem, "Tensor.__setitem__"),
    (lambda x: F.relu(x, inplace=True), "torch.nn.functional.relu"),
    (lambda x: F.leaky_relu(x, 0.1, True), "torch.nn.functional.leaky_relu"),
    (lambda x: torch.relu_(x), "torch.relu_"),
], ids=["iadd", "setitem", "relu-inplace-keyword", "leaky-relu-inplace-positional", "relu_"])
def test_in_place_ops_on_the_raw_input_are_refused(change, op):
    """Each way of writing in place: a name ending in ``_``, an in-place operator (``__setitem__``, whose name ends in
    ``__`` as the out-of-place ``__add__`` does), ``inplace=True`` (torch passes it as a keyword, however the user
    wrote it)."""
    refused(ChangesTheInput(change).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            f": {op}: in-place ops on tensors gradgraph follows are unsupported; use the out-of-place form "
            "(inplace=False)")


@pytest.mark.parametrize("change", [lambda x: x + 1, lambda x: x.__radd__(1), lambda x: F.relu(x, inplace=False)],
                         ids=["add", "radd", "relu-inplace-false"])
def test_out_of_place_ops_on_the_raw_input_convert_exactly(change):
    torch.manual_seed(5)
    exact(ChangesTheInput(change).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


# ----------------------------------------------------------------------------- __torch_function__
class StaleRead(nn.Module):
    """``h.relu_()`` with its result dropped, then ``h`` read by a Linear (positionally): ``h`` is stale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        return self.b(h)


def test_a_stale_value_read_positionally_is_refused_before_the_op_runs():
    """Kills __torch_function__ 35 (the positional arguments not searched for stale values)."""
    refused(StaleRead().to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            " (module 'b' of type Linear): torch.nn.functional.linear: reads a value that the in-place Tensor.relu_ "
            "before it changed (or a view of it); gradgraph runs in-place ops on intermediate values out of place "
            "(their inputs are factors of the graph), which is the same only if the old value is not read again. Use "
            "the value the op returns, or its out-of-place form")


class ScoreBias(nn.Module):
    """One attention head whose scores get a ``[T, T]`` bias in place: a parameter (``+=``, or ``add_`` with its result
    dropped and ``scores`` read again) or a constant."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.how = how
        if how.startswith("parameter"):
            self.bias = nn.Parameter(torch.randn(4, 4, dtype=DTYPE))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        if self.how == "parameter +=":
            scores += self.bias
        elif self.how == "parameter add_":
            scores.add_(self.bias)
        else:
            scores += torch.arange(16, dtype=DTYPE).reshape(4, 4) / 16
        return self.out(torch.softmax(scores, -1) @ self.v(x)).sum(1)


def test_scores_changed_in_place_by_a_parameter_run_out_of_place_and_are_refused_as_a_learned_bias():
    """A parameter added to the scores in place runs out of place (so the sum's rule names the learned bias, and
    ``scores`` read again after ``add_`` is stale); a constant added in place keeps the scores' own rule: exact.
    Kills __torch_function__ 69 (the parameter looked for from the third argument on: ``add_`` then ran in place)."""
    import re

    inputs = torch.randn(2, 4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+: Tensor\.add: " + re.escape(
            "combines attention scores with neuron values (a learned bias added to the scores, as T5's relative "
            "position bias, is not supported), and its result reaches torch.nn.functional.linear with the parameter "
            "'out.weight' at ") + r"\S+:\d+ in \S+ \(module 'out'\)\. Write it with supported ops, register it with "
            r"gradgraph\.convert\.register_elementwise if it is elementwise, or register a converter for the whole "
            r"module$"):
        gradgraph.to_graph(ScoreBias("parameter +=").to(DTYPE), inputs, None, squared)
    refused(ScoreBias("parameter add_").to(DTYPE), inputs,
            ": torch.softmax: reads a value that the in-place Tensor.add_ before it changed (or a view of it); "
            "gradgraph runs in-place ops on intermediate values out of place (their inputs are factors of the graph), "
            "which is the same only if the old value is not read again. Use the value the op returns, or its "
            "out-of-place form")
    torch.manual_seed(6)
    exact(ScoreBias("constant").to(DTYPE), inputs)


class ScatterInto(nn.Module):
    """``index_add_`` of tanh values over positions of ``[b, 4, 3]`` (positions 0, 1 into 0; 2, 3 into 1): into
    neuron values (refused before it runs) or into zeros made in ``forward`` (a new value: the graph rule's)."""

    def __init__(self, into_neurons: bool) -> None:
        super().__init__()
        self.a, self.b, self.out, self.into_neurons = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2), into_neurons

    def forward(self, x):
        g = torch.tanh(self.b(x))
        index = torch.tensor([0, 0, 1, 1])
        base = torch.tanh(self.a(x))[:, :2].clone() if self.into_neurons else torch.zeros(x.shape[0], 2, 3, dtype=DTYPE)
        return self.out(base.index_add_(1, index, g)).sum(1)


def test_an_in_place_scatter_into_neuron_values_is_refused_and_into_zeros_converts_exactly():
    """Checked against a per-datapoint autograd loop. Kills __torch_function__ 77, 78 (the base's meta not
    read: the scatter into neurons taken for one into a
    constant, refused by the graph rule with another message); not __torch_function__ 48 (every op offered to
    ``out_of_place_call``, which returns None for any op outside ``IN_PLACE_CANDIDATES``: equivalent), which the
    same check leaves alive."""
    inputs = torch.randn(2, 4, 3, dtype=DTYPE)
    refused(ScatterInto(True).to(DTYPE), inputs, ": Tensor.index_add_: in-place ops on tensors gradgraph follows are "
            "unsupported; use the out-of-place form (inplace=False)")
    torch.manual_seed(7)
    model = ScatterInto(False).to(DTYPE)
    del model.a
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, inputs, None, squared)  # (torch.func: no vmap of an index_add_ into zeros)


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("act", [
    lambda m, h: h.view_as(torch.zeros(h.shape, dtype=DTYPE)), lambda m, h: h[:, :1].expand_as(h) + h,
    lambda m, h: h.reshape_as(h.t().t()),
    lambda m, h: h.type_as(h),
], ids=["view_as", "expand_as", "reshape_as", "type_as"])
def test_neuron_values_shaped_like_another_tensor_keep_their_neurons(act):
    """Kills dispatch 4 (every ``*_as`` op taken for a constant shaped like another tensor)."""
    torch.manual_seed(8)
    exact(Act(act).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class Erfcx(nn.Module):
    """``torch.special.erfcx`` (no rule of its own) of a Linear's output, or of a parameter added to it."""

    def __init__(self, of_a_parameter: bool = False) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 2), nn.Linear(2, 1)
        if of_a_parameter:
            self.shift = nn.Parameter(torch.randn(2, dtype=DTYPE))

    def forward(self, x):
        h = self.lin(x)
        return self.out(h + torch.special.erfcx(self.shift) if hasattr(self, "shift") else torch.special.erfcx(h))


def test_a_function_registered_elementwise_is_one_elementwise_op_with_its_label():
    """``torch.special.erfcx`` registered with ``register_elementwise`` (labelled TANH here, to see the label): exact
    against a per-datapoint autograd loop, its neurons labelled; a parameter given to it refused by the op's name; and
    refused as an op without a rule once the registration is taken back. Kills dispatch 28, 29 (the op's input or
    output not handed to the rule), 30 (its name), 31 (its label)."""
    from gradgraph.convert.trace.ops import ELEMENTWISE_FUNCTIONS, op_name

    torch.manual_seed(9)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.register_elementwise(torch.special.erfcx, gradgraph.ActivationKind.TANH)
    try:
        gradgraph.convert.clear_structure_cache()
        graph = assert_per_sample_grads_match_loop(Erfcx().to(DTYPE), inputs)
        tanh = int(gradgraph.ActivationKind.TANH)
        assert graph.activation.tolist() == [0, 0, 0, tanh, tanh, 0]  # the input, lin (erfcx labelled), out
        refused(Erfcx(of_a_parameter=True).to(DTYPE), inputs, ": torch.special.erfcx: the parameter 'shift' used where "
                "gradgraph expects neuron values (arithmetic on a parameter before it meets the input: a learned "
                "slope, "
                "scale or mask)")
    finally:
        del ELEMENTWISE_FUNCTIONS[op_name(torch.special.erfcx)]
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match="torch.special.erfcx: gradgraph has no rule for this op"):
        gradgraph.to_graph(Erfcx().to(DTYPE), inputs, None, None)


class PooledByKeyword(nn.Module):
    """A 1x1 convolution, then ``F.avg_pool1d`` or ``F.max_pool1d`` given its input by keyword (no positional
    argument), then a Linear of the flattened map."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.conv, self.out, self.pool = nn.Conv1d(2, 3, 1), nn.Linear(6, 1), pool

    def forward(self, x):
        return self.out(self.pool(torch.tanh(self.conv(x))).flatten(1))


@pytest.mark.parametrize("pool", [lambda h: F.avg_pool1d(input=h, kernel_size=2),
                                  lambda h: F.max_pool1d(input=h, kernel_size=2)], ids=["avg", "max"])
def test_pooling_given_its_input_by_keyword_converts_exactly(pool):
    """Kills dispatch 88 (no keywords handed to the pooling rule, which reads ``input`` from them)."""
    torch.manual_seed(10)
    exact(PooledByKeyword(pool).to(DTYPE), torch.randn(3, 2, 4, dtype=DTYPE))


@pytest.mark.parametrize("act, op", [
    (lambda m, h: torch.addmm(m.b, h, h.t()[:, :2]), "torch.addmm"),
    (lambda m, h: F.linear(h, h[:2], m.b), "torch.nn.functional.linear"),
], ids=["addmm", "linear"])
def test_an_affine_map_whose_weight_is_no_parameter_is_refused_by_its_name(act, op):
    """Kills dispatch 209 (addmm's name not handed to the affine rule)."""
    refused(Act(act, b=(2,)).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            f": {op}: its weight is not a parameter of the model (or a view of one); gradgraph converts affine maps "
            "whose weights are parameters")


# ----------------------------------------------------------------------------- need_neurons
class ScoresRead(nn.Module):
    """Attention scores ``q @ k^T`` of ``[b, 4, 3]`` read by a Linear as if they were neuron values."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x) @ self.k(x).transpose(1, 2))).sum(1)


def test_scores_read_as_neuron_values_are_refused():
    refused(ScoresRead().to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE),
            " (module 'out' of type Linear): the affine map torch.nn.functional.linear: attention scores used as "
            "neuron "
            "values")


@pytest.mark.parametrize("act, op", [(lambda m, h: h + torch.sigmoid(m.w), "torch.sigmoid"),
                                     (lambda m, h: h + m.w.exp(), "Tensor.exp")], ids=["sigmoid", "exp"])
def test_an_activation_of_a_parameter_is_refused_naming_the_parameter(act, op):
    refused(Act(act, w=(2,)).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            f": {op}: the parameter 'w' used where gradgraph expects neuron values (arithmetic on a parameter before "
            f"it "
            "meets the input: a learned slope, scale or mask)")


# ----------------------------------------------------------------------------- mark_opaque
class OpaqueBesideAReadout(nn.Module):
    """Hidden neurons read by a Linear and by a cumulative sum over them (no rule; its first entry is the first
    neuron's value): the cumulative sum's result only reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h)[:, 0] + torch.cumsum(h, -1)[:, 0]


def test_neurons_read_by_an_op_without_a_rule_are_pinned():
    """A permutation of ``a``'s neurons would change what the cumulative sum reads: the sampled group element keeps
    the function and the graph (it moves no node: every set is pinned or fixed). Kills mark_opaque 6, 7 (the sets
    read by the op not pinned)."""
    from traced_models import assert_group_keeps_function

    torch.manual_seed(11)
    gradgraph.convert.clear_structure_cache()
    moved, _, _ = assert_group_keeps_function(OpaqueBesideAReadout().to(DTYPE), torch.randn(4, 3, dtype=DTYPE), None,
                                              None)
    assert moved == 0


# ----------------------------------------------------------------------------- softmax_over_positions
class SoftmaxOf(nn.Module):
    def __init__(self, softmax, width: int = 2) -> None:
        super().__init__()
        self.out, self.softmax = nn.Linear(width, 1), softmax
        if width != 3:  # (a softmax of the input itself has no first Linear)
            self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.softmax(self, x)).sum(1)


@pytest.mark.parametrize("softmax, width", [
    (lambda m, x: torch.softmax(input=torch.tanh(m.a(x)), dim=1) * torch.tanh(m.a(x)), 2),
    (lambda m, x: torch.softmax(x * 2, 1) * x, 3),
    (lambda m, x: torch.softmax(x * 2, -2) * x, 3),
], ids=["input-keyword", "of-the-input-neurons", "negative-dim"])
def test_a_softmax_over_positions_converts_exactly_however_written(softmax, width):
    """A softmax over the token axis: its input by keyword, or the input's own neurons (node 0 among them), or its
    axis counted from the end. Kills softmax_over_positions 33, 34 (node 0 taken for a statistic's -1)."""
    torch.manual_seed(12)
    exact(SoftmaxOf(softmax, width).to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE))


SOFTMAX_REACHES = (r"^\S+:\d+ in \S+: torch\.softmax: a softmax across positions or part of the features, and its "
                   r"result reaches torch\.nn\.functional\.linear with the parameter 'out\.weight' at \S+:\d+ in \S+ "
                   r"\(module 'out'\)\. Write it with supported ops, register it with "
                   r"gradgraph\.convert\.register_elementwise if it is elementwise, or register a converter for the "
                   r"whole module$")


@pytest.mark.parametrize("softmax, width", [
    (lambda m, x: torch.softmax(torch.tanh(m.a(x)).sum(-1), 1)[..., None] * torch.tanh(m.a(x)), 2),
    (lambda m, x: torch.softmax(torch.tanh(m.a(x)).flatten(1), 1)[:, None], 8),
], ids=["of-a-statistic", "tokens-and-features-flattened"])
def test_a_softmax_over_a_statistic_or_over_tokens_and_features_keeps_its_rule_and_is_refused(softmax, width):
    """Kills softmax_over_positions 22 (a statistic's positions taken for neuron positions), 38 (an axis over which
    the neurons vary taken for positions)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=SOFTMAX_REACHES):
        gradgraph.to_graph(SoftmaxOf(softmax, width).to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE), None, squared)


# ----------------------------------------------------------------------------- join_versions
class Rejoined(nn.Module):
    """Parts of ``a``'s neurons at two versions (before and after a tanh) joined: ``form`` says how."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a, self.b, self.form = nn.Linear(3, 2), nn.Linear(3, 1), form
        self.out = nn.Linear(4 if form.startswith("duplicate") else 2, 1)

    def forward(self, x):
        h = self.a(x)
        if self.form in ("duplicate", "duplicate cat"):  # a0 after the tanh, b, a1 before it, a0 before it: a0 twice
            parts = [torch.tanh(h)[..., 0], torch.tanh(self.b(x))[..., 0], h[..., 1], h[..., 0]]
            if self.form == "duplicate cat":  # a cat makes the second a0 a tied copy (since session 19)
                return self.out(torch.cat([part[..., None] for part in parts], -1))
            return self.out(torch.stack(parts, -1))
        if self.form == "view_as":  # not a join: the activated values viewed as the pre-activation
            return self.out(torch.tanh(h).view_as(h))
        return self.out(torch.cat([-torch.tanh(h)[..., 1:], h[..., :1]], -1))  # rotate_half-like: each neuron once


def test_a_neuron_joined_at_two_versions_is_refused_and_each_neuron_once_converts_exactly():
    """Kills join_versions 10 (``break`` at a part without the set: later parts unchecked), 17 (the op's name), 25
    (``seen`` replaced by the last part: the first and the fourth parts' shared neuron missed); a ``stack`` since
    session 19 (a ``cat`` makes the repeated neuron a tied copy and converts). ``tanh(h).view_as(h)``
    killed 2-7 (the refusal of two versions met by an op that is no join) until session 18, when the ``*_as`` ops
    stopped reading their second argument's neurons: it converts since, and no shape op that is no join meets two
    versions any more (2-7 to be triaged again)."""
    inputs = torch.randn(4, 3, dtype=DTYPE)
    refused(Rejoined("duplicate").to(DTYPE), inputs, ": torch.stack: joins two versions of the same neurons along "
            "their features, one neuron in two parts; gradgraph has one value per neuron")
    exact(Rejoined("duplicate cat").to(DTYPE), inputs)
    torch.manual_seed(12)
    viewed = Rejoined("view_as").to(DTYPE)
    del viewed.b  # (a parameter the form does not use)
    exact(viewed, inputs)
    torch.manual_seed(13)
    model = Rejoined("once").to(DTYPE)
    del model.b
    exact(model, inputs)


# ----------------------------------------------------------------------------- join_parts
class TokenJoined(nn.Module):
    """``tokens`` class tokens (one parameter ``[1, tokens, 2]``) joined to a Linear's outputs, as ``form`` says."""

    def __init__(self, form: str, tokens: int = 1) -> None:
        super().__init__()
        self.a, self.out, self.form = nn.Linear(3, 2), nn.Linear(2, 1), form
        self.token = nn.Parameter(torch.randn(1, tokens, 2, dtype=DTYPE))
        if form == "two sets":
            self.b = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        tokens = self.token.expand(x.shape[0], -1, -1)
        if self.form == "positions":
            return self.out(torch.cat([tokens, h], 1)).sum(1)
        if self.form == "positions by keyword":
            return self.out(torch.cat([tokens, h], dim=1)).sum(1)
        if self.form == "no dim":  # along the datapoints
            return self.out(torch.cat([self.token.expand(1, h.shape[1], -1), h])).sum(1)
        if self.form == "sequence first":  # [T, b, d]: the tokens along axis 0, the datapoints on axis 1
            return self.out(torch.cat([tokens.transpose(0, 1), h.transpose(0, 1)], 0)).sum(0)
        if self.form == "both sides":  # Dinov2's cat([h[:, :1], registers, h[:, 1:]])
            return self.out(torch.tanh(torch.cat([h[:, :1], tokens, h[:, 1:]], 1))).sum(1)
        if self.form == "two sets":  # a and b at different positions of one part
            return self.out(torch.cat([tokens, torch.cat([h, self.b(x)], 1)], 1)).sum(1)
        raise AssertionError(self.form)


@pytest.mark.parametrize("form, tokens, batch", [
    ("positions", 1, 3), ("positions", 2, 3), ("positions", 2, 1), ("positions by keyword", 2, 3),
    ("sequence first", 1, 2), ("both sides", 2, 2),
], ids=["one-token", "two-tokens", "two-tokens-batch-of-one", "dim-keyword", "sequence-first", "both-sides"])
def test_class_tokens_joined_to_tokens_convert_exactly(form, tokens, batch):
    """Two distinct tokens of one parameter are two sets; a batch of one (no datapoint axis to find: axis 0 assumed);
    the tokens on axis 0 with the datapoints on axis 1; a set's positions on both sides of the tokens (one MERGE edge
    per neuron: no two edges share their ends). Kills join_parts 22 (``dim`` 1 by default), 50, 53, 56, 57 (the
    datapoint axis not found, or taken as 0: the sequence-first join refused), 54, 58, 130, 151 (a batch of one:
    an index error, or axis 1 taken for the datapoints), 128 (one set for both tokens), 218 (two parallel edges), 156,
    222 (a MERGE edge's parameter -2, not -1)."""
    torch.manual_seed(14)
    graph = exact(TokenJoined(form, tokens).to(DTYPE), torch.randn(batch, 4, 3, dtype=DTYPE))
    edges = graph.edge_index.t().tolist()
    assert len(edges) == len(set(map(tuple, edges)))
    merge = graph.edge_kind == int(gradgraph.EdgeKind.MERGE)
    assert bool(merge.any()) and graph.edge_param[merge].tolist() == [-1] * int(merge.sum())  # no weight on a merge


class TokenJoinedToAnActivation(nn.Module):
    """A class token joined to ``act(lin(x))`` along the tokens, then a Linear and a sum over the tokens."""

    def __init__(self, act) -> None:
        super().__init__()
        self.lin, self.out, self.act = nn.Linear(3, 2), nn.Linear(2, 1), act
        self.token = nn.Parameter(torch.randn(1, 2, 2, dtype=DTYPE))

    def forward(self, x):
        return self.out(torch.cat([self.token.expand(x.shape[0], -1, -1), self.act(self.lin(x))], 1)).sum(1)


@pytest.mark.parametrize("act", [torch.tanh, F.gelu, torch.sigmoid], ids=["tanh", "gelu", "sigmoid"])
def test_a_class_token_joined_to_an_activation_is_exact(act):
    """The class tokens' act and grad records held every place of the joined value, so the output's gradient
    (``dL/d act(h)``) was written over the joined set's own ``dL/dh``: refused by the summed-gradient check until
    session 18 (found by mut23; fails on the code before). Two tokens of one parameter, a batch of three."""
    torch.manual_seed(15)
    exact(TokenJoinedToAnActivation(act).to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE))


@pytest.mark.parametrize("form, message", [
    ("no dim", "a parameter concatenated along the feature or datapoint axis"),
    ("two sets", "concatenates tensors whose features are not one neuron set"),
], ids=["along-the-datapoints", "two-sets-along-positions"])
def test_class_tokens_joined_without_a_rule_are_refused(form, message):
    """Kills join_parts 17, 19 (no default ``dim``: a TypeError), 204-209 (the refusal of a part whose positions hold
    different sets)."""
    refused(TokenJoined(form).to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE), f": torch.cat: {message}")


class Wrapped(nn.Module):
    """``inner`` as the module ``vit``: its ops' sets are named after the path ``vit``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.vit = inner

    def forward(self, x):
        return self.vit(x)


@pytest.mark.parametrize("tokens, wrapped, names", [
    (1, False, ["input", "a", "torch.cat", "class token", "out", "Tensor.sum"]),
    (2, False, ["input", "a", "torch.cat", "class token", "class token 1", "out", "Tensor.sum"]),
    (3, True, ["input", "vit.a", "vit torch.cat", "vit class token", "vit class token 1", "vit class token 2",
               "vit.out", "vit Tensor.sum"]),
], ids=["one-token", "two-tokens", "three-tokens-in-a-module"])
def test_class_tokens_sets_are_named_in_order(tokens, wrapped, names):
    """The sets of a class-token join, in node order, as the plan keeps them (``set_names``: what a refusal names to
    the user): the merged set is named after the op, the first distinct token "class token", the next ones
    "class token 1", "class token 2"; at the model's root without a leading space (``Tracer.new_set`` strips the
    origin). Kills join_parts 132-138 (a token's label mutated; run tracer 11), which only messages read."""
    torch.manual_seed(14)
    model = TokenJoined("positions", tokens).to(DTYPE)
    model = Wrapped(model) if wrapped else model
    inputs = torch.randn(3, 4, 3, dtype=DTYPE)
    assert [origin for _, _, origin in make_plan(trace_model(model, inputs, model)).set_names] == names
    exact(model, inputs)


# ----------------------------------------------------------------------------- shape_op
class JoinedByKeyword(nn.Module):
    """``torch.cat(tensors=..., dim=...)`` (no positional argument) of ``form``'s parts."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)
        self.w = nn.Parameter(torch.randn(2, 3, dtype=DTYPE))
        self.out = nn.Linear(3 if form in ("parameter", "parameter positional", "neurons") else 4, 1)

    def forward(self, x):
        if self.form == "parameter positional":
            return self.out(torch.tanh(F.linear(x, torch.cat([self.w, torch.zeros(1, 3, dtype=DTYPE)]))))
        if self.form == "input positional":
            return self.out(torch.cat([x, torch.zeros(x.shape[0], 1, dtype=DTYPE)], 1))
        if self.form == "parameter":  # a weight padded with a constant row
            return self.out(torch.tanh(F.linear(x, torch.cat(tensors=[self.w, torch.zeros(1, 3, dtype=DTYPE)]))))
        if self.form == "input":  # the input padded with a constant feature
            return self.out(torch.cat(tensors=[x, torch.zeros(x.shape[0], 1, dtype=DTYPE)], dim=1))
        return self.out(torch.cat(tensors=[torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=-1))


@pytest.mark.parametrize("form, message", [
    ("parameter", "joins the parameter 'w' with a constant of shape [1, 3], whose entries belong to no datapoint and "
     "no "
     "parameter; make it a parameter of the joined shape (the constant's entries then get gradients you can ignore), "
     "or join the results of the ops instead"),
    ("input", "joins the model's input with a constant of shape [4, 1], whose entries belong to no datapoint and no "
     "parameter; join them before calling the model (pass the input with the token prepended or the features "
     "padded)"),
], ids=["parameter", "input"])
@pytest.mark.parametrize("how", ["", " positional"])
def test_a_parameter_or_the_input_joined_with_a_constant_is_refused_by_keyword_too(form, message, how):
    """The refusal of ``test_convert_joined_constants.py`` (which ``gg`` leaves out: it matches the user's frame),
    matched in full, with the parts given by keyword. Kills shape_op 7-11, 18-21 (the parameter's refusal: its name,
    arguments, words), 44 and check_joined_constants 4-11 (the keyword parts not read), 8 (the positional parts)."""
    model = JoinedByKeyword(form + how).to(DTYPE)
    if form == "input":
        del model.a, model.b, model.w
    else:
        del model.a, model.b
    refused(model, torch.randn(4, 3, dtype=DTYPE), f": torch.cat: {message}")


def test_neuron_values_joined_by_keyword_convert_exactly():
    """Kills shape_op 93-96, 121-123 (the keyword parts not read, or not replaced by the kept ones)."""
    torch.manual_seed(15)
    model = JoinedByKeyword("neurons").to(DTYPE)
    del model.w
    exact(model, torch.randn(4, 3, dtype=DTYPE))


class CacheJoined(nn.Module):
    """An empty constant (a key/value cache before its first entry) joined to a Linear's outputs along positions,
    positionally or by keyword; or a one-element constant joined along the features (refused)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.out = nn.Linear(3, 1 if form == "one element" else 2), nn.Linear(2, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.form == "one element":
            return self.out(torch.cat([h, torch.ones(1, 1, dtype=DTYPE)], -1))
        empty = torch.zeros(x.shape[0], 0, 2, dtype=DTYPE)
        joined = torch.cat([empty, h], 1) if self.form == "positional" else torch.cat(tensors=[empty, h], dim=1)
        return self.out(joined).sum(1)


@pytest.mark.parametrize("form", ["positional", "keyword"])
def test_an_empty_constant_joined_to_neuron_values_joins_nothing(form):
    """Kills shape_op 100, 101 (the empty constant kept, then refused), 116, 117 (the kept parts not handed on)."""
    torch.manual_seed(16)
    exact(CacheJoined(form).to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE))


def test_a_one_element_constant_joined_to_neuron_values_is_refused():
    """A batch of one: the constant has one element and is no empty cache. Kills shape_op 102 (``numel() > 1``)."""
    refused(CacheJoined("one element").to(DTYPE), torch.randn(1, 3, dtype=DTYPE),
            ": torch.cat: concatenating neuron values with constants (for transformers models, call them with "
            "use_cache=False)")


class PositionsShaped(nn.Module):
    """Token embeddings plus a position table's rows over ``arange`` (not yet bound to a datapoint), reshaped before
    the sum as ``shape`` says."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 2), nn.Embedding(5, 2), nn.Linear(2, 1)
        self.shape = shape

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.shape(self.positions(torch.arange(ids.shape[1])))))


@pytest.mark.parametrize("shape", [lambda p: p.unsqueeze(0), lambda p: p.view(1, *p.shape), lambda p: p[None],
                                   lambda p: p.reshape(1, -1, 2).contiguous()],
                         ids=["unsqueeze", "view", "none-index", "reshape"])
def test_position_rows_reshaped_before_they_meet_the_tokens_convert_exactly(shape):
    """Kills shape_op 167, 168, 177, 189, 204, 208 (the rows' unbound index not carried through the shape op)."""
    torch.manual_seed(17)
    model = PositionsShaped(shape).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_exact_per_sample_grads(model, torch.randint(0, 7, (3, 4)), None, lambda out, _: out.pow(2).sum((1, 2)))


# ----------------------------------------------------------------------------- replay
class ChunkedWeights(nn.Module):
    """One weight ``[4, 3]`` and bias ``[4]`` cut into two Linear maps (``chunk``, ``split``: tuples of views)."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 3, dtype=DTYPE)), nn.Parameter(torch.randn(4, dtype=DTYPE))
        self.out = nn.Linear(2, 1)

    def forward(self, x):
        (w_q, w_k), (b_q, b_k) = self.w.chunk(2), self.b.split(2)
        return self.out(torch.tanh(F.linear(x, w_q, b_q)) * torch.tanh(F.linear(x, w_k, b_k)))


def test_a_parameter_cut_into_a_tuple_of_views_keeps_its_positions():
    """Kills replay 14, 17 (a tuple output taken as one value: the views left untracked, or one of them given the
    tuple's ids)."""
    torch.manual_seed(18)
    exact(ChunkedWeights().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class TableIndexedByData(nn.Module):
    """A parameter table indexed by ids computed from the integer input (``table[(ids + 1) % 7]``), then a tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.out = nn.Parameter(torch.randn(7, 2, dtype=DTYPE)), nn.Linear(2, 1)

    def forward(self, ids):
        return self.out(torch.tanh(self.table[(ids + 1) % 7])).sum(1)


def test_a_parameter_indexed_by_data_keeps_the_index_values_and_is_refused_at_the_tanh():
    """The index keeps its values in the replay of the parameter's positions (its rows are a parameter still, read
    by the tanh: refused by name). Kills replay 1 (``data=True`` by default: the index's element ids replayed, an
    AttributeError)."""
    refused(TableIndexedByData().to(DTYPE), torch.randint(0, 7, (3, 4)),
            ": torch.tanh: the parameter 'table' used where gradgraph expects neuron values (arithmetic on a parameter "
            "before it meets the input: a learned slope, scale or mask)")


# ----------------------------------------------------------------------------- more of the dispatch's names
class TableOfNeurons(nn.Module):
    """``F.embedding`` whose table is neuron values (``tanh(a(x)).t()``), not a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 2), nn.Linear(4, 1)

    def forward(self, x):
        ids = torch.tensor([[0, 1]]).expand(x.shape[0], 2)
        return self.out(F.embedding(ids, torch.tanh(self.a(x)).t())).sum(1)


class NormInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.out = nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1)

    def forward(self, x):
        return self.out(self.bn(self.a(x)))


@pytest.mark.parametrize("model, message", [
    (TableOfNeurons, ": torch.nn.functional.embedding: its table is not a parameter of the model (or a view of one); "
     "gradgraph converts affine maps whose weights are parameters"),
    (NormInTraining, " (module 'bn' of type BatchNorm1d): torch.nn.functional.batch_norm: batch norm in training mode "
     "mixes the datapoints of a batch, so their gradients are not separate rank-1 terms; call model.eval()"),
], ids=["embedding", "batch-norm"])
def test_the_embedding_and_batch_norm_refusals_name_the_op(model, message):
    """Kills dispatch 310, 353 (the op's name not handed to the embedding or batch-norm rule)."""
    refused(model().to(DTYPE).train(), torch.randn(4, 3, dtype=DTYPE), message)


class LastToken(nn.Module):
    """The last real token's values, ``h[arange(b), lengths - 1]`` with the lengths counted from the ids (data)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.out = nn.Embedding(7, 2), nn.Linear(2, 1)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids))[torch.arange(ids.shape[0]), (ids != 0).sum(1) - 1])


def test_neuron_values_indexed_by_data_keep_the_index_values():
    """Kills replay_ids 1 (``data=True`` by default: the index replaced by its element ids)."""
    torch.manual_seed(19)
    ids = torch.randint(1, 7, (3, 4)) * (torch.arange(4) < torch.tensor([[2], [4], [3]]))
    exact(LastToken().to(DTYPE), ids)


@pytest.mark.parametrize("act", [
    lambda m, h: torch.pow(torch.sigmoid(h), torch.sigmoid(m.b(m.x))),
    lambda m, h: torch.clamp(h, min=torch.tanh(m.b(m.x))),
    lambda m, h: h.max(torch.tanh(m.b(m.x))), lambda m, h: torch.max(h, other=torch.tanh(m.b(m.x))),
    lambda m, h: torch.min(h, torch.tanh(m.b(m.x))),
], ids=["pow", "clamp-min-keyword", "max-method", "max-other-keyword", "min"])
def test_two_neuron_values_in_one_elementwise_op_convert_exactly(act):
    """An activation of two neuron values (``torch.pow(h, g)``, ``clamp(h, min=g)``), and ``max`` / ``min`` of two
    tensors (the elementwise ``maximum`` / ``minimum``), their second argument positional or by keyword. Kills
    dispatch 460 (the second neuron values taken for a parameter operand), 480 (no keywords handed to the binary
    rule)."""
    class Two(Act):
        def forward(self, x):
            self.x = x
            return super().forward(x)

    torch.manual_seed(20)
    model = Two(act).to(DTYPE)
    model.b = nn.Linear(3, 2).to(DTYPE)
    exact(model, torch.randn(4, 3, dtype=DTYPE))


def test_the_max_of_neuron_values_and_a_parameter_is_refused_as_a_bound():
    """``h.max(w)`` is ``torch.maximum(h, w)``: a parameter as a bound. Kills dispatch 478 (the binary rule handed no
    name: the parameter then taken for a bias, and the graph wrong, which only the summed-gradient check caught)."""
    refused(Act(lambda m, h: h.max(m.w), w=(2,)).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            ": Tensor.maximum: the parameter 'w' is subtracted, divided by, an exponent, a bound or scaled by alpha; "
            "gradgraph reads a parameter added to neurons (a bias) or multiplied with them (a scale): write h + b or h "
            "* s")


# ----------------------------------------------------------------------------- _in_packing
class Packed(nn.Module):
    """An LSTM run on ``pack_padded_sequence`` of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 5, 4, 3]), batch_first=True)
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1])


def test_a_refusal_inside_the_packing_names_it_and_the_remedy_in_full():
    """``test_convert_packed_sequences.py`` matches the message in part; this one in full (the user's frames as any
    ``file:line in function``). Kills _in_packing 8-12 (its words)."""
    import re

    gradgraph.convert.clear_structure_cache()
    message = re.escape(
        ": torch._pack_padded_sequence: inside torch.nn.utils.rnn.pack_padded_sequence: packed sequences are not "
        "supported (a PackedSequence interleaves the datapoints' steps by length, and gradgraph follows a batch axis "
        "of "
        "datapoints). Pass the padded batch to the RNN and read each sequence's last step as output[torch.arange(b), "
        "lengths - 1] (for a unidirectional RNN the same values as the packed run's; gradgraph has no rule for this "
        "op), and its result reaches torch.lstm with the parameter 'rnn.weight_ih_l0' at ")
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + message + r"\S+:\d+ in \S+ \(module "
                       r"'rnn'\)\. Write it with supported ops, register it with "
                       r"gradgraph\.convert\.register_elementwise "
                       r"if it is elementwise, or register a converter for the whole module$"):
        gradgraph.to_graph(Packed().to(DTYPE), torch.randn(4, 5, 3, dtype=DTYPE), None, squared)


# ----------------------------------------------------------------------------- neurons_from_raw
class InputPlusConv(nn.Module):
    """``x + conv(x)`` of a ``[b, 2, 5]`` map (a 1-D convolution keeping channels and length): the input read as
    channels by the convolution, then again elementwise by the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(2, 2, 3, padding=1), nn.Linear(10, 1)

    def forward(self, x):
        return self.head(torch.tanh(x + self.conv(x)).flatten(1))


def test_a_three_axis_input_read_as_channels_and_again_elementwise_converts_exactly():
    """Written for neurons_from_raw 17, 18 (a map of three axes not read again as channels), which it does not kill:
    the sum reads the input elementwise the same way either way."""
    torch.manual_seed(21)
    exact(InputPlusConv().to(DTYPE), torch.randn(3, 2, 5, dtype=DTYPE))


# ----------------------------------------------------------------------------- assign_comps
class ReadTwice(nn.Module):
    """The input ``[b, 2, 2]`` read transposed (its rows gathered from strided places: element 2 at position 0) and
    then as it is by a Linear (element 2 at position 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(2, 2), nn.Linear(2, 1)

    def forward(self, x):
        return self.out(torch.tanh(x.transpose(1, 2) * 2 + self.lin(x))).sum(1)


def test_the_input_read_with_two_layouts_is_refused():
    """Kills assign_comps 26 (the check dropped) and the words of its refusal."""
    refused(ReadTwice().to(DTYPE), torch.randn(3, 2, 2, dtype=DTYPE),
            " (module 'lin' of type Linear): input: the input is read with two different layouts")


SHAPED_LIKE = {
    "view_as": lambda h: torch.tanh(h).view_as(h),
    "reshape_as": lambda h: torch.tanh(h).reshape_as(h),
    "expand_as": lambda h: torch.tanh(h[:, :1]).expand_as(h),
    "type_as": lambda h: torch.tanh(h).type_as(h),
    "view_as keyword": lambda h: torch.tanh(h).view_as(other=h),
}


class ShapedLike(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.lin, self.out, self.op = nn.Linear(3, 4), nn.Linear(4, 2), op

    def forward(self, x):
        return self.out(self.op(self.lin(x)))


@pytest.mark.parametrize("form", sorted(SHAPED_LIKE))
def test_an_activation_shaped_like_its_own_input_is_exact(form):
    """``tanh(h).view_as(h)``: the ``*_as`` ops read only their second argument's shape, so ``h`` (another version of
    the same neurons) is no part of the result. Refused as "joins two versions of the same neurons" until session 18
    (found by mut23; fails on the code before)."""
    torch.manual_seed(16)
    exact(ShapedLike(SHAPED_LIKE[form]).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class GrowingLoop(IndexedLoop):
    """An Elman loop through ``recurrent_step`` whose later steps add a map (``extra``): no fold."""

    def __init__(self) -> None:
        super().__init__()
        self.input_map, self.recurrent_map, self.extra, self.head = (nn.Linear(3, 4), nn.Linear(4, 4),
                                                                     nn.Linear(4, 4), nn.Linear(4, 2))

    def step(self, h, x_t):
        new = torch.tanh(self.input_map(x_t) + self.recurrent_map(h))
        return torch.tanh(self.extra(new)) if self.t > 0 else new



def test_a_loop_whose_later_steps_make_another_set_names_that_set_in_the_warning():
    """A folded step that creates a set the first step did not: the loop is converted unrolled, exactly, and the
    warning names the set by its origin (``extra``) in full. Kills new_set 6 (the origin not handed to
    ``fold_set``: "(None)"), which only ``test_convert_recurrent_values.py``, outside the group's list, killed."""
    torch.manual_seed(21)
    message = ("to_graph: a recurrent loop of GrowingLoop does not fold over time (step creates more neuron sets "
               "than the first step (extra)); every loop is converted unrolled, exactly (docs/recurrent.md). Pass "
               "fold_time=False to ask for the unrolled layout")
    with pytest.warns(UserWarning) as caught:
        exact(GrowingLoop().to(DTYPE), torch.randn(3, 3, 3, dtype=DTYPE))
    assert [str(warning.message) for warning in caught] == [message]


# ----------------------------------------------------------------------------- runs tracer 14-15 (issue 31)
class RawJoinedToAToken(nn.Module):
    """A class token joined to the raw input ``[b, 4, 3]`` along the tokens, after ``flat`` read the input with 12
    features (``first="flat"``), or joined to the input's rows with their features shuffled (``first="shuffled"``)."""

    def __init__(self, first: str) -> None:
        super().__init__()
        self.first = first
        self.token = nn.Parameter(torch.randn(1, 1, 3, dtype=DTYPE))
        self.out = nn.Linear(3, 1)
        if first == "flat":
            self.flat = nn.Linear(12, 1)

    def forward(self, x):
        token = self.token.expand(x.shape[0], -1, -1)
        if self.first == "flat":
            flat = self.flat(x.reshape(x.shape[0], -1))
            return self.out(torch.cat([token, x], 1)).sum(1) + flat
        return self.out(torch.cat([token, x.transpose(1, 2).reshape(x.shape[0], 4, 3)], 1)).sum(1)


@pytest.mark.parametrize("first, message", [
    ("flat", "the input is read with 3 features here but 12 elsewhere"),
    ("shuffled", "the input's features are not its last axis"),
], ids=["read-with-another-width", "features-not-last"])
def test_the_raw_input_joined_to_a_class_token_is_refused_naming_the_join(first, message):
    """``join_parts`` reads a raw part through ``need_neurons(part, name)``, whose refusals name the join. Kills
    join_parts 27 (``None`` for the name: an AttributeError, since ``unsupported`` strips the op's name)."""
    torch.manual_seed(22)
    refused(RawJoinedToAToken(first).to(DTYPE), torch.randn(2, 4, 3, dtype=DTYPE), f": torch.cat: {message}")


def test_a_class_token_and_the_tokens_it_joins_are_permuted_together():
    """The token's neurons are tied to the merged set's, neuron for neuron: the group permutes ``a``'s outputs, the
    merged set and the token together (nodes 3-8: ``a`` 2, the join 2, the token 2), and a sampled element keeps the
    function and maps the graph to the permuted model's. Kills join_parts 158 (the token's neurons tied in reverse
    order to the merged set's: no slot holds one neuron of each set, so nothing is permuted)."""
    torch.manual_seed(14)
    model, inputs = TokenJoined("positions").to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE)
    graph = exact(model, inputs)
    assert graph.perm_group.tolist() == [-1] * 3 + [0] * 6 + [-1] * 2
    assert max(assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(3)) > 0


class TokenJoinReadTwice(nn.Module):
    """``y = cat([tokens, a(x)], 1)`` read by a Linear and, through a tanh (the merged set's next version), by
    another (``form="twice"``); or ``tanh(h)`` joined after ``pre`` read ``h`` (``form="act"``: the join's part is
    another version of a set whose act is fixed, so it becomes a copy of its own, named by the join)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 1)
        self.c = nn.Linear(2, 1) if form == "twice" else None
        self.pre = nn.Linear(2, 1) if form == "act" else None
        self.token = nn.Parameter(torch.randn(1, 2, 2, dtype=DTYPE))

    def forward(self, x):
        h = self.a(x)
        tokens = self.token.expand(x.shape[0], -1, -1)
        if self.form == "twice":
            y = torch.cat([tokens, h], 1)
            return (self.b(y) * self.c(torch.tanh(y))).sum(1)
        read = self.pre(h).sum(1)
        return self.b(torch.cat([tokens, torch.tanh(h)], 1)).sum(1) + read


def test_a_class_token_join_read_at_two_versions_is_exact():
    """The join's merged set starts at version 0, so ``tanh(y)`` is its version 1, another value than ``y``: ``c``
    reads a copy of its own. Kills join_parts 261 (the merged set's first version numbered 1, as the tanh's: ``c``'s
    edges then read ``y``'s act, refused by the summed-gradient check)."""
    torch.manual_seed(23)
    exact(TokenJoinReadTwice("twice").to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE))


def test_a_joined_activation_whose_set_has_another_act_is_a_copy_named_by_the_join():
    """``tanh(h)`` joined after ``pre`` fixed ``h`` as its set's act: ``fix_act`` makes the joined part a copy of its
    own, named after the join (the plan's ``set_names``, what a refusal names). Kills join_parts 212 (``fix_act``
    handed no name: the copy named "None")."""
    torch.manual_seed(23)
    model, inputs = TokenJoinReadTwice("act").to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE)
    assert [origin for _, _, origin in make_plan(trace_model(model, inputs, model)).set_names] == [
        "input", "a", "pre", "Tensor.sum", "torch.cat", "class token", "class token 1", "torch.cat", "b", "Tensor.sum",
        "Tensor.add"]
    exact(model, inputs)


class GatheredAtTheRoot(nn.Module):
    """``h[:, src]`` (positions gathered with a repeat) or ``h[src]`` (the datapoints) at the model's root."""

    def __init__(self, along: str) -> None:
        super().__init__()
        self.along = along
        self.a, self.out = nn.Linear(3, 2), nn.Linear(2, 1)
        self.register_buffer("src", torch.tensor([0, 2, 2, 1]))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h[:, self.src] if self.along == "positions" else h[self.src]).sum(1)


def test_positions_gathered_at_the_root_are_a_copy_named_by_the_op():
    """The gather's tied copy is named after the op where no module holds it. Kills dispatch 168
    (``gather_positions`` handed no name: the copy named "None gather")."""
    torch.manual_seed(24)
    model, inputs = GatheredAtTheRoot("positions").to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE)
    assert [origin for _, _, origin in make_plan(trace_model(model, inputs, model)).set_names] == [
        "input", "a", "Tensor.__getitem__ gather", "out", "Tensor.sum"]
    exact(model, inputs)


def test_datapoints_gathered_at_the_root_are_refused_naming_the_op():
    """Kills dispatch 168 as well (the refusal named ``None``: an AttributeError, since ``unsupported`` strips it)."""
    refused(GatheredAtTheRoot("datapoints").to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE),
            ": Tensor.__getitem__: values whose features (the axes after axis 0) sit at different positions; "
            "gradgraph gathers and scatters positions whose features are neurons")


def test_position_rows_chunked_and_repeated_before_they_meet_the_tokens_convert_exactly():
    """``chunk`` of a position table not yet bound to a datapoint: a tuple output, each view with its rows' unbound
    index. Kills shape_op 252 (the tuple of indices handed whole to every view: a TypeError at the ``repeat``)."""
    torch.manual_seed(17)
    model = PositionsShaped(lambda p: p[None].chunk(2, 1)[0].repeat(1, 2, 1)).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_exact_per_sample_grads(model, torch.randint(0, 7, (3, 4)), None, lambda out, _: out.pow(2).sum((1, 2)))


class BroadcastByAConstant(nn.Module):
    """``tanh(a(x))`` of an input with one position, ``[b, 1, 3]``, broadcast to three positions by a constant
    ``c [1, 3, 2]`` (``+``, ``*``, or ``torch.clamp(h, min=c)``), then read as ``form`` says."""

    def __init__(self, op: str, form: str) -> None:
        super().__init__()
        self.op, self.form = op, form
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2) if form == "linear" else None
        self.register_buffer("c", torch.randn(1, 3, 2, dtype=DTYPE))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        value = {"add": lambda: h + self.c, "mul": lambda: h * self.c, "clamp": lambda: torch.clamp(h, min=self.c)}
        value = value[self.op]()
        if self.form == "whole":
            return value
        if self.form == "first position":
            return value[:, :1]
        if self.form == "tanh of the last two":
            return torch.tanh(value[:, 1:])
        if self.form == "summed":
            return value.sum(1)
        return self.b(value).sum(1)


@pytest.mark.parametrize("op", ["add", "mul", "clamp"])
@pytest.mark.parametrize("form", ["whole", "first position", "tanh of the last two", "summed"])
def test_a_value_broadcast_over_new_positions_by_a_constant_converts_exactly(op, form):
    """The result of an elementwise op that a constant broadcasts over more positions holds the value's neurons at the
    result's shape, as ``h.expand(...)`` then the op would. Its ids were kept at the value's own shape, and the
    assembly failed to expand the records to the result's (a RuntimeError, "The expanded size of the tensor (1) must
    match the existing size (3)", for every form but "summed"; found through run tracer 14's ``observe`` 10, which a
    smaller view of such a value told apart; fails before, 12 of the 15)."""
    torch.manual_seed(25)
    exact(BroadcastByAConstant(op, form).to(DTYPE), torch.randn(4, 1, 3, dtype=DTYPE))


@pytest.mark.parametrize("op", ["add", "mul", "clamp"])
def test_a_value_broadcast_over_new_positions_by_a_constant_then_a_linear_is_refused_as_an_expand_is(op):
    """A Linear then reads one neuron's values at three places of one datapoint position: refused as it is after
    ``h.expand(-1, 3, -1)`` (a RuntimeError in the assembly before)."""
    refused(BroadcastByAConstant(op, "linear").to(DTYPE), torch.randn(4, 1, 3, dtype=DTYPE),
            " (module 'b' of type Linear): torch.nn.functional.linear: copies values of one position over a new axis "
            "(a broadcast or expand of a [.., 1, ..] axis), so one neuron would hold several values at one datapoint "
            "position; apply the op before adding the axis, or add it with a Linear")


class MaskedByKeyword(nn.Module):
    """``h`` masked by a comparison of its own values, the operands given by keyword as ``form`` says."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.form == "masked_fill":
            return self.out(h.masked_fill(mask=h <= 0.1, value=0.5))
        return self.out(torch.where(h > 0.1, h, other=-0.25))


@pytest.mark.parametrize("form", ["masked_fill", "where"])
def test_neurons_masked_by_their_own_comparison_given_by_keyword_convert_exactly(form):
    """The dispatch hands ``masks_compared_neurons`` the op's keywords (session 20), where ``mask=`` / ``value=`` and
    ``other=`` are. Kills dispatch 40 (``kwargs=None``: an AttributeError where an operand is a keyword)."""
    torch.manual_seed(26)
    exact(MaskedByKeyword(form).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unrolled"])
def test_a_learned_initial_state_is_refused_naming_the_previous_state_op(fold):
    """The parameter read by ``previous_state`` where neuron values are expected: refused, folded and unrolled, naming
    the op (as ``test_convert_recurrent_values.py``'s test of the same model, outside the group's list). Kills
    dispatch 91 (``previous_copy`` handed no name: an AttributeError, since ``unsupported`` strips it)."""
    torch.manual_seed(10)
    refused(LearnedInitialState().to(DTYPE), torch.randn(3, 3, 3, dtype=DTYPE),
            ": gradgraph.convert.trace.recurrent.previous_state: the parameter 'h0' used where gradgraph expects "
            "neuron values (arithmetic on a parameter before it meets the input: a learned slope, scale or mask)",
            fold_time=fold)


class Pixels(nn.Module):
    """Integer pixels ``[b, 2, 3]`` cast and scaled (data made from the input), then reshaped (``form``) into a Linear's
    six features: the integer input read as features."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.lin = form, nn.Linear(6, 2)

    def forward(self, x):
        if self.form == "cast, then reshaped":
            return self.lin(x.double().reshape(x.shape[0], 6) / 255)
        if self.form == "scaled, then reshaped":
            return self.lin((x.double() / 255).reshape(x.shape[0], 6))
        return self.lin((x.double() / 255).transpose(1, 2).reshape(x.shape[0], 6))


@pytest.mark.parametrize("form", ["cast, then reshaped", "scaled, then reshaped", "scaled, then transposed"])
def test_integer_pixels_cast_and_reshaped_into_a_linear_convert_exactly(form):
    """A shape op on data made from the integer input is replayed on the input's element ids (``data=True``), so the
    Linear reads the elements' places. Kills replay 7, 12 (``data`` dropped: the data's values replayed as if they were
    element ids, refused as "the input's features are not its last axis")."""
    torch.manual_seed(3)
    exact(Pixels(form).to(DTYPE), torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8))


class PixelsReadTwice(nn.Module):
    """``p = x.double() / 255`` of integer pixels ``[b, 2, 3]`` (data made from the input) read by two Linear maps of
    its three features (``form="twice"``), by one of three and one of its six flattened (``"widths"``), or only a
    statistic of it, its mean over the features, read by a Linear (``"mean"``)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(1 if form == "mean" else 3, 2), nn.Linear(3 if form == "twice" else 6, 2)

    def forward(self, x):
        p = x.double() / 255
        if self.form == "twice":
            return (self.a(p) + self.b(p)).sum(1)
        if self.form == "mean":
            return self.a(p.mean(-1, keepdim=True)).sum(1) + self.b(p.reshape(p.shape[0], 6))
        flat = self.b(p.reshape(p.shape[0], 6))
        return self.a(p).sum(1) + flat


def test_data_made_from_integer_pixels_read_by_two_linear_maps_converts_exactly():
    """The first read makes ``p`` the input's neurons and remembers them on ``p``; the second reads the same neurons.
    Kills need_neurons 17 (``None`` remembered: the second Linear reads ``p`` as a constant, refused)."""
    torch.manual_seed(3)
    exact(PixelsReadTwice("twice").to(DTYPE), torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8))


@pytest.mark.parametrize("form, message", [
    ("widths", " (module 'a' of type Linear): the affine map torch.nn.functional.linear: the input is read with 3 "
               "features here but 6 elsewhere"),
    ("mean", " (module 'a' of type Linear): torch.nn.functional.linear: its input is not computed from the model input "
             "by ops gradgraph follows (a custom autograd.Function, a tensor made inside forward, .detach(), or a "
             "second input passed through forward_kwargs such as a data graph's edge features: gradgraph reads one "
             "input tensor); register the module that computes it with gradgraph.convert.register_elementwise if it "
             "is elementwise, or register a converter for it"),
], ids=["read-with-another-width", "a-statistic-of-the-pixels"])
def test_data_made_from_integer_pixels_is_refused_naming_the_linear(form, message):
    """Kills need_neurons 11 (the reader's name not handed on: an AttributeError, since ``unsupported`` strips it) and
    5 (``and`` for ``or``: a float statistic of the data, which has no element map, read as the input: a TypeError)."""
    torch.manual_seed(3)
    refused(PixelsReadTwice(form).to(DTYPE), torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8), message)


# ----------------------------------------------------------------------------- values handed to Python
class ReadToPython(nn.Module):
    """Hidden neurons whose values the forward hands to Python (``form``) and uses as a number that scales the
    output: a permutation of ``a``'s neurons changes the number (the first neuron's value), which the graph does
    not show. ``"constant"`` reads their shape only (the control: its group moves ``a``'s neurons)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.form = form

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.form == "float":
            scale = float(h[0, 0])
        elif self.form == "item":
            scale = h[0, 1].item()
        elif self.form == "tolist":
            scale = h.tolist()[0][0]
        elif self.form == "branch":  # a comparison of the neurons (no pin of its own) read as a truth value
            scale = 2.0 if bool(h[0, 0] > 0) else -1.0
        elif self.form == "item of a cumulative sum":  # an op without a rule, then read as a number
            scale = torch.cumsum(h, -1)[:, 0].sum().item()
        else:  # reads the shape only
            scale = 2.0 if h.size(-1) == 4 and h.dim() == 2 and len(h) == h.shape[0] else 1.0
        return self.out(h) * scale


VALUE_READ_FORMS = ["float", "item", "tolist", "branch", "item of a cumulative sum"]


@pytest.mark.parametrize("form", VALUE_READ_FORMS)
def test_neurons_whose_values_are_handed_to_python_are_pinned(form):
    """The number is a constant to autograd and to the graph, but not to a permutation of the neurons it was read
    from: their set is pinned (``VALUE_READS``), so the group moves no node (``out``'s neurons are the output's). On
    the code before, ``float`` / ``item`` / ``tolist`` / ``branch`` claimed ``a``'s neurons free: a sampled element
    that moves neuron 0 changed the output (seed 1 of ``float``: by 0.14), a false symmetry. Kills mark_opaque 6, 7
    (the sets not pinned: with ``"item of a cumulative sum"`` on the code before as well, where only the cumulative
    sum's ``mark_opaque`` pinned them). One datapoint: with several the read is refused (next test)."""
    torch.manual_seed(11)
    model, inputs = ReadToPython(form).to(DTYPE), torch.randn(1, 3, dtype=DTYPE)
    for seed in range(4):
        gradgraph.convert.clear_structure_cache()
        moved, _, _ = assert_group_keeps_function(model, inputs, None, squared, seed=seed)
        assert moved == 0, (seed, moved)


@pytest.mark.parametrize("form", VALUE_READ_FORMS)
def test_values_of_several_datapoints_handed_to_python_are_refused_naming_the_read(form):
    """With several datapoints the number is one for the batch (the first datapoint's neuron, a sum over all), so a
    datapoint's output depends on the others' values where autograd sees a constant: on the code before each form
    converted, and its per-sample gradients differed from each datapoint's own (the gradient of its loss computed on
    it alone) by 3 to 32 times the size of the latter, though their sum was autograd's. Refused at the read, naming
    the op and the line of the forward."""
    torch.manual_seed(11)
    model, inputs = ReadToPython(form).to(DTYPE), torch.randn(5, 3, dtype=DTYPE)
    reads = {"float": "Tensor.__float__", "item": "Tensor.item", "tolist": "Tensor.tolist", "branch": "Tensor.__bool__",
             "item of a cumulative sum": "Tensor.item"}
    with pytest.raises(UnsupportedOperationError, match=rf"{re.escape(reads[form])}: hands values of the datapoints to "
                       r"Python \(a number or a branch\), one for all 5 datapoints.*convert one datapoint at a time"):
        gradgraph.to_graph(model, inputs)
    own = torch.cat([model(inputs[i:i + 1]) for i in range(5)])
    assert (own - model(inputs)).abs().max() > 1e-3  # the coupling is real: a datapoint alone computes otherwise


def test_a_read_converted_with_one_datapoint_is_refused_when_the_batch_grows():
    """A read converted with one datapoint (no coupling) leaves a cached plan; the next call with four datapoints must
    not replay it silently: it is traced again and refused at the read."""
    torch.manual_seed(11)
    model, inputs = ReadToPython("float").to(DTYPE), torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, inputs[:1], loss_fn=squared)
    with pytest.raises(UnsupportedOperationError, match="one for all 4 datapoints"):
        gradgraph.to_graph(model, inputs, loss_fn=squared)


class ReadsOtherValuesToPython(nn.Module):
    """Reads into Python what does not vary with the datapoints (a parameter's value) or the data's own mask and
    ids (``mask.any()``, ``int(ids.max())``): no coupling, converts at any batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, ids, mask):
        assert int(ids.max()) < self.embed.num_embeddings and bool(mask.any())
        h = torch.tanh(self.embed(ids)) * float(self.scale)
        return self.out(h * mask[..., None]).sum(1)


def test_reads_of_parameters_and_of_the_datas_masks_and_ids_into_python_convert_exactly():
    """The control of the refusal above: reading a parameter's value and the data's mask and ids into Python couples
    no datapoints; the per-sample gradients are each datapoint's own (autograd on each datapoint alone)."""
    torch.manual_seed(2)
    model = ReadsOtherValuesToPython().to(DTYPE)
    ids, mask = torch.randint(0, 7, (4, 5)), (torch.rand(4, 5) > 0.3).to(DTYPE)
    graph = gradgraph.to_graph(model, ids, forward_kwargs={"mask": mask}, loss_fn=lambda o, t: o.pow(2).sum(-1))
    names, params = zip(*model.named_parameters())
    # one datapoint at a time (vmap cannot run a read into Python)
    rows = [torch.autograd.grad(model(ids[i:i + 1], mask[i:i + 1]).pow(2).sum(), params, allow_unused=True)
            for i in range(4)]
    grads = graph.per_sample_grads()
    for k, name in enumerate(names):
        expected = torch.stack([torch.zeros_like(params[k]) if row[k] is None else row[k] for row in rows])
        torch.testing.assert_close(grads.get(name, torch.zeros_like(expected)), expected, atol=1e-12, rtol=0,
                                   msg=name)


VALUE_READ_REASON = (
    "hands values of the datapoints to Python (a number or a branch), one for all 2 datapoints: what the forward "
    "computes from it for one datapoint depends on the others, which autograd cannot see, so every per-sample "
    "gradient would be wrong. Compute it with tensor ops within each datapoint (h.amax(-1, keepdim=True) for "
    "h.max().item()), move a check of the values out of forward, or convert one datapoint at a time")


@pytest.mark.parametrize("form", ["float", "item of a cumulative sum"])
def test_values_of_two_datapoints_handed_to_python_are_refused_in_full(form):
    """Two datapoints are several: datapoint 0's neuron (``float``) or a sum over both (an op without a rule, then
    ``item``: the opaque value made from neurons, ``Opaque.of_datapoints``) scales both outputs, so each datapoint's
    output differs from the one it computes alone. Refused at the read, the message in full (op, batch size, the
    remedies). Kills ``check_value_read``'s ``num_datapoints > 2`` and its message's mutants, and ``mark_opaque``'s
    ``of_datapoints`` not handed on from the cumulative sum's neurons (issue 31, run tracer 28)."""
    torch.manual_seed(11)
    model, inputs = ReadToPython(form).to(DTYPE), torch.randn(2, 3, dtype=DTYPE)
    own = torch.cat([model(inputs[i:i + 1]) for i in range(2)])
    assert (own - model(inputs)).abs().max() > 1e-3  # the coupling is real
    op = "Tensor.__float__" if form == "float" else "Tensor.item"
    refused(model, inputs, f": {op}: {VALUE_READ_REASON}")


class ReadsAPositionTable(nn.Module):
    """Token and position embeddings; the forward scales its output by a number read from the position table's rows
    (``"read"``: a cumulative sum, an op without a rule, then ``float``; ``"detached read"``: a detach, then ``item``),
    or by the detached rows themselves (``"detach"``). The rows are read at constant indices (``arange``): their
    neurons are bound to no datapoint, one value for every datapoint, so nothing couples them."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.form = form

    def forward(self, ids):
        rows = self.positions(torch.arange(ids.shape[1]))
        h = self.out(torch.tanh(self.tokens(ids) + rows)).sum(1)
        if self.form == "read":
            return h * float(torch.cumsum(rows, 0)[-1, 0])
        if self.form == "detached read":
            return h * rows.detach().abs().max().item()
        return h * rows.detach()[0, :2]


@pytest.mark.parametrize("form", ["read", "detached read", "detach"])
def test_values_of_a_position_table_read_into_python_or_detached_convert_exactly(form):
    """The control of the two refusals: values that do not vary with the datapoints (a position table's rows, their
    neurons bound to none), read into Python or detached, even into the output, couple nothing: the per-sample
    gradients are each datapoint's own (autograd on each datapoint alone, 1e-12). Kills ``mark_opaque``'s
    ``of_datapoints`` left out (every opaque value then counts as the datapoints': the read refused) and
    ``__torch_function__``'s detach mark without its test of the datapoints' values (``or``, or the test dropped: the
    output refused as cut) (issue 31, run tracer 28)."""
    torch.manual_seed(3)
    model, ids = ReadsAPositionTable(form).to(DTYPE), torch.randint(0, 7, (4, 5))
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, ids, None, squared, atol=1e-12)


class DetachedTail(nn.Module):
    """The output over its batch's largest detached value (``out / out.detach().abs().max()``, after the last
    parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        out = self.out(torch.tanh(self.a(x)))
        return out / out.detach().abs().max()


def test_an_output_made_from_detached_values_of_two_datapoints_is_refused_naming_the_detach():
    """Two datapoints are several: the detached largest value is the batch's, so each output differs from the one its
    datapoint computes alone. Refused at the model's output naming the detach and where it ran (its location in the
    forward), the message in full; with one datapoint the same model converts exactly. Kills ``cut_in_output``'s
    ``num_datapoints > 2`` and ``>= 1`` and the mark's words (``f"{name} at {location}"``) in ``__torch_function__``
    (issue 31, run tracer 28; ``test_convert_safety.py``'s tests of the cut match the user's file, which under mutmut
    is the trampoline's, and are deselected from the group's list)."""
    torch.manual_seed(5)
    model, inputs = DetachedTail().to(DTYPE), torch.randn(2, 3, dtype=DTYPE)
    own = torch.cat([model(inputs[i:i + 1]) for i in range(2)])
    assert (own - model(inputs)).abs().max() > 1e-3  # the coupling is real
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+: the model's output: is made from values of "
                       r"the datapoints whose gradient was cut \(Tensor\.detach at \S+:\d+ in \S+\): .* couples the 2 "
                       r"datapoints "):  # the message in full: test_convert_run_values.py
        gradgraph.to_graph(model, inputs, None, squared)
    assert_matches_autograd_loop(model, inputs[:1], None, squared, atol=1e-12)  # one datapoint: its own gradient


def test_neurons_whose_shape_is_read_stay_free():
    """The control: ``h.size()``, ``h.dim()``, ``len(h)`` and ``h.shape`` read no values, and the constant scale they
    decide pins nothing: the group moves ``a``'s neurons (every sample keeps the function)."""
    torch.manual_seed(11)
    model, inputs = ReadToPython("constant").to(DTYPE), torch.randn(5, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(4)]
    assert max(moved) > 0, moved


class GateOverOneGraphsNodes(nn.Module):
    """One graph's nodes ``[N, 3]`` (``datapoints=torch.zeros(N)``): features, one gate per node squeezed to ``[N]``,
    a softmax over the nodes (axis 0 holds the positions of the one datapoint), the weighted sum, a head ``[1, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.gate, self.head = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.f(x))
        weights = torch.softmax(self.gate(h).squeeze(-1), 0)
        return self.head((weights[:, None] * h).sum(0, keepdim=True))


def test_a_softmax_over_one_graphs_nodes_of_a_one_axis_gate_converts_exactly_with_a_true_group():
    """A one-axis value's softmax is over positions where the rows are one datapoint's nodes: run as its parts, it
    converts; the per-sample gradient of the one datapoint is autograd's gradient, and a sampled group element (which
    moves ``f``'s neurons) keeps the function and maps the graph to the permuted model's. Kills
    softmax_over_positions 30 (``dim() == 1`` for ``== 0``: a one-axis softmax keeps the softmax rule, which refuses it
    as "a softmax across positions")."""
    from strategies import assert_same_graph
    from gradgraph.symmetry import permute_model, permute_nodes, random_node_permutation

    torch.manual_seed(0)
    model = GateOverOneGraphsNodes().to(DTYPE)
    x, y, batch = torch.randn(6, 3, dtype=DTYPE), torch.randn(1, 2, dtype=DTYPE), torch.zeros(6, dtype=torch.long)

    def loss(output, target):
        return ((output - target) ** 2).sum(-1)

    gradgraph.convert.clear_structure_cache()
    graph = gradgraph.to_graph(model, x, y, loss, datapoints=batch)
    ours = graph.per_sample_grads()
    params = dict(model.named_parameters())
    assert set(ours) == set(params)
    for (name, param), grad in zip(params.items(), torch.autograd.grad(loss(model(x), y).sum(), list(params.values()))):
        torch.testing.assert_close(ours[name][0], grad, atol=1e-10, rtol=0, msg=name)
    moved = 0
    for seed in range(3):
        perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
        permuted = permute_model(model, graph, perm)
        with torch.no_grad():
            torch.testing.assert_close(permuted(x), model(x), atol=1e-10, rtol=0)
        assert_same_graph(gradgraph.to_graph(permuted, x, y, loss, datapoints=batch), permute_nodes(graph, perm),
                          atol=1e-10)
        moved = max(moved, int((perm != torch.arange(graph.num_nodes)).sum()))
    assert moved > 0


# ----------------------------------------------------------------------------- __torch_function__: grouped ops
class PerGroupCodeAfterAGroupedOp(nn.Module):
    """A grouped convolution, then ``cat([h[:, :2] * 2, h[:, 2:] * 3])`` on a later set feeding a depthwise
    convolution: exchanging the depthwise groups 0 and 2 changes the function, and the graph shows neither constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pre = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=2, padding=1)
        self.b, self.c = nn.Linear(4, 4), nn.Conv2d(4, 2, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)

    def forward(self, x):
        # (b over the channels as a Linear: no op the trace runs as parts between the two grouped ones)
        h = torch.relu(self.b(torch.relu(self.pre(torch.relu(self.a(x)))).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        h = torch.cat([h[:, :2] * 2.0, h[:, 2:] * 3.0], 1)
        return self.c(torch.relu(self.depthwise(h))).mean((2, 3))


def test_per_group_code_after_an_earlier_grouped_op_still_stops_the_blocks():
    """The count of grouped ops running is back to 0 once the first grouped convolution has run, so the part of ``h``
    the later code reads marks its set (``NeuronSet.read_in_part``) and the depthwise convolution's groups are not
    claimed alike: every sampled group element keeps the function. Kills __torch_function__ 39 and 41 (the count
    made -1 or left at 1 by the first grouped op: no later read in part is marked, and a sample that exchanges the
    depthwise groups changes the output)."""
    torch.manual_seed(8)
    model, inputs = PerGroupCodeAfterAGroupedOp().to(DTYPE), torch.randn(3, 3, 6, 6, dtype=DTYPE)
    for seed in range(6):
        gradgraph.convert.clear_structure_cache()
        assert_group_keeps_function(model, inputs, None, squared, seed=seed)


# ----------------------------------------------------------------------------- dispatch: a constant first operand
# (issue 31, branch mut46: session 22's unary branch, cd4b455, whose tests are in test_convert_elementwise_values.py,
# outside this group's list)
CONSTANT_FIRST = {
    "torch.pow(2.0, h)": (lambda self, x, h: torch.pow(2.0, h), True),
    "torch.pow(2.0, exponent=h)": (lambda self, x, h: torch.pow(2.0, exponent=h), True),
    "c.pow(h), c one number": (lambda self, x, h: torch.full((3,), 1.5, dtype=h.dtype).pow(h), True),
    "torch.clamp(zeros, min=h)": (lambda self, x, h: torch.clamp(torch.zeros(3, dtype=h.dtype), min=h), True),
    "torch.clamp(c, max=h), c per neuron": (
        lambda self, x, h: torch.clamp(torch.tensor([0.1, -0.2, 0.3], dtype=h.dtype), max=h), False),
    "torch.pow(a base per neuron, h)": (lambda self, x, h: torch.pow(torch.tensor([1.5, 2.0, 2.5], dtype=h.dtype), h),
                                        False),
    # the raw input as the first operand is a neuron value of its own (the input's), not a constant
    "torch.pow(the input, h)": (lambda self, x, h: torch.pow(x, h), False),
}


class ConstantFirst(nn.Module):
    """``Linear(3, 3)``, ``tanh``, then ``op(self, x, h)`` (an elementwise op whose first operand is no neuron value
    of ``h``), ``Linear(3, 2)``; ``p`` a parameter for the refusal below (``with_parameter``)."""

    def __init__(self, op, with_parameter: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.op, self.first, self.out = op, nn.Linear(3, 3), nn.Linear(3, 2)
        if with_parameter:
            self.p = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.out(self.op(self, x, torch.tanh(self.first(x))))


@pytest.mark.parametrize("op", list(CONSTANT_FIRST))
def test_an_elementwise_op_of_a_constant_first_and_neuron_values_converts_exactly_with_its_group(op):
    """``torch.pow(2.0, h)``, ``c.pow(h)``, ``torch.clamp(c, min=h)``: elementwise in ``h`` with a constant first
    (the dispatch hands ``unary`` the one neuron value, session 22). Per-sample gradients equal to torch.func's at
    1e-10, and sampled elements of the inferred group keep the function and map the graph; the hidden neurons move
    where the constant is one number, and are fixed where it differs between them, or where the first operand is
    the model's input (a neuron value of its own: ``torch.pow(x, h)`` pairs each input with a hidden neuron).
    Kills ``dispatch``'s mutants of that branch (which failed at the next layer, or gave the op the constant)."""
    make, free = CONSTANT_FIRST[op]
    model = ConstantFirst(make).to(DTYPE)
    inputs = torch.rand(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1)) + 0.5
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, None, squared)
    moved = max(assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(4))
    hidden = graph.perm_group[graph.node_kind == NodeKind.HIDDEN]
    assert (moved > 0) == free and bool((hidden[:3] >= 0).all()) == free, (moved, hidden)


def test_a_parameter_as_the_first_operand_of_an_elementwise_op_of_neuron_values_is_refused_naming_it():
    """``torch.pow(p, h)`` with a parameter base: the parameter is no bias or scale of ``h``; refused, naming it,
    matched in full after the location."""
    refused(ConstantFirst(lambda self, x, h: torch.pow(self.p, h), True).to(DTYPE), torch.randn(4, 3, dtype=DTYPE),
            ": torch.pow: the parameter 'p' is subtracted, divided by, an exponent, a bound or scaled by alpha; "
            "gradgraph reads a parameter added to neurons (a bias) or multiplied with them (a scale): write h + b "
            "or h * s")


class OneActivation(nn.Module):
    """``Linear(3, 3)``, then ``act(h)`` (an activation given its input positionally or by keyword), ``Linear(3, 2)``."""

    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.act, self.first, self.out = act, nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.act(self.first(x)))


@pytest.mark.parametrize("function, kind", [(torch.sigmoid, "SIGMOID"), (torch.tanh, "TANH"), (torch.relu, "RELU")])
def test_an_activation_given_its_input_by_keyword_is_labelled_as_given_positionally(function, kind):
    """``torch.sigmoid(input=h)``: the same graph as ``torch.sigmoid(h)``, its hidden neurons labelled with the
    activation. Since session 22 the unary branch hands an op whose first operand holds no neurons the one neuron
    value it reads, without a label (``torch.pow(2.0, h)``), so a keyword input misread (``kwargs.get`` of another
    key) still converted, exactly, but unlabelled. Kills ``dispatch`` 491-493 (run tracer 23)."""
    x = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    graphs = []
    for act in (function, lambda h: function(input=h)):
        gradgraph.convert.clear_structure_cache()
        graphs.append(assert_exact_per_sample_grads(OneActivation(act).to(DTYPE), x, None, squared))
    hidden = graphs[1].activation[graphs[1].node_kind == NodeKind.HIDDEN]
    assert hidden.tolist() == [int(getattr(gradgraph.graph.ActivationKind, kind))] * 3, hidden
    from strategies import assert_same_graph

    assert_same_graph(graphs[1], graphs[0])


class IdsViewedAsAGrid(nn.Module):
    """Token ids viewed in the shape of a grid of neuron values (``ids.view_as(grid)``, ``[b, 6]`` as ``[b, 2, 3]``),
    then read by an embedding: data given another tracked tensor's shape (``SHAPED_LIKE``, dispatch's data branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.proj = nn.Embedding(7, 4), nn.Linear(4, 1)
        self.cells, self.out = nn.Embedding(7, 3), nn.Linear(3, 2)

    def forward(self, ids):
        grid = self.proj(self.tokens(ids)).view(-1, 2, 3)
        cells = self.cells(ids.view_as(grid))
        return self.out(torch.tanh(cells).sum((1, 2))) + torch.tanh(grid).sum((1, 2))[:, None]


def test_ids_viewed_in_the_shape_of_neuron_values_are_read_by_an_embedding_exactly():
    """``ids.view_as(grid)`` is a shape op of the ids: the embedding that reads the result gives each row its
    datapoint's component through the ids' elements, replayed in the new shape. Exact against autograd on each
    datapoint alone (1e-12), for the batch traced and for another batch the cached plan serves. Kills ``dispatch``
    33 (the op handed to ``data_op`` as ``None``: read as elementwise data, whose element map a reshape does not
    keep) and 37 (the output left untracked: the ids a constant of the trace, the embedding's rows a table's)
    (issue 31, branch mut51's six left, run tracer 29)."""
    torch.manual_seed(0)
    model = IdsViewedAsAGrid().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):
        assert_matches_autograd_loop(model, torch.randint(0, 7, (4, 6)), None, squared, atol=1e-12)


class ChecksItsIds(nn.Module):
    """Reads the integer input itself into Python (``ids.tolist()``, ``int(ids[0, 0])``) for a check of the ids: the
    data, a constant of its datapoints, not a value autograd follows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 2)

    def forward(self, ids):
        assert all(0 <= i < self.embed.num_embeddings for row in ids.tolist() for i in row) and int(ids[0, 0]) >= 0
        return self.out(torch.tanh(self.embed(ids))).sum(1)


def test_the_integer_input_read_into_python_converts_exactly_at_any_batch_size():
    """The integer input itself (``Raw``, not data made from it) read into Python is read freely, as the data's masks
    and ids are (``Tracer.of_datapoints`` leaves out what ``is_data`` says): exact against autograd on each datapoint
    alone (1e-12) with four datapoints. Kills ``Tracer.of_datapoints`` 6 (``is_data(value, None)``: the input's
    read refused as the datapoints' values) (issue 31, run tracer 29)."""
    torch.manual_seed(4)
    model = ChecksItsIds().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, torch.randint(0, 7, (4, 5)), None, squared, atol=1e-12)


class OpaqueAfterTheOutputLayer(nn.Module):
    """The last Linear's output goes on through an op without a rule (a cumulative sum: opaque, after the last
    parameter), whole (``"whole"``) or as a tanh of its first two neurons (``"tanh of a part"``: the set's newest
    version holds only those two)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.form = form

    def forward(self, x):
        y = self.out(torch.tanh(self.a(x)))
        return (y if self.form == "whole" else torch.tanh(y[:, :2])).cumsum(-1)


@pytest.mark.parametrize("form", ["whole", "tanh of a part"])
def test_output_neurons_read_by_an_op_without_a_rule_are_the_graphs_outputs_with_their_acts(form):
    """An opaque value keeps the sets it was made from (``Opaque.sets``), which ``run._output_sets`` reads: the last
    Linear's neurons reach the model's output through the cumulative sum, so they are the graph's ``OUTPUT`` nodes, and
    their acts are their newest values (the tanh of the part: 0 for the third neuron, which that version does not
    hold). Exact against the model's own values. Kills ``mark_opaque`` 20 (the ``Opaque`` made without its sets: the
    neurons labelled ``HIDDEN`` and, for the part, their acts 0) — listed equivalent before (runs tracer 1-2's 18, the
    same diff), which it is not (issue 31, run tracer 30)."""
    torch.manual_seed(1)
    model, inputs = OpaqueAfterTheOutputLayer(form).to(DTYPE), torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    graph = gradgraph.to_graph(model, inputs, None, squared)
    kinds = [NodeKind.INPUT] * 3 + [NodeKind.HIDDEN] * 4 + [NodeKind.OUTPUT] * 3
    assert graph.node_kind.tolist() == [int(kind) for kind in kinds]
    y = model.out(torch.tanh(model.a(inputs))).detach()
    expected = y.T if form == "whole" else torch.cat([torch.tanh(y[:, :2]).T, torch.zeros(1, 4, dtype=DTYPE)])
    torch.testing.assert_close(graph.act[7:], expected, atol=1e-12, rtol=0)
