"""Per-function checks of ``trace/rules_pad.py`` (issue 31, runs pad 1-2): the refusals no other test reaches, each
matched in full, and the values of what survived mutation, each against per-sample gradients by torch.func in
float64 (``exact``) or against the padded value itself."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.errors import DatapointCouplingError, NonFiniteFactorError
from gradgraph.convert.traced import to_graph_traced
from convert_values import exact, refused, squared

DTYPE = torch.float64


class Padded(nn.Module):
    """``head(pad(h))`` with ``h = tanh(a(x))`` made into the value ``shape`` gives (``[b, T, 4]`` by default)."""

    def __init__(self, pad, shape=None, width: int = 4) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(width, 2)
        self.pad, self.shape = pad, shape

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.shape(self, h) if self.shape is not None else h
        return self.head(self.pad(h)).sum(1)


def _tokens(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randn(batch, length, 3, dtype=DTYPE)


def test_a_pad_of_an_axis_along_which_the_components_vary_too_is_refused():
    """``[b, T * d]`` (the tokens flattened into the features): the neurons and the tokens vary along axis 1."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(3, 4), nn.Linear(22, 2)

        def forward(self, x):
            return self.head(F.pad(torch.tanh(self.a(x)).flatten(1), (1, 1)))

    refused(Flat().double(), _tokens(),
            ": torch.nn.functional.pad: pads axis 1 of a value of shape [2, 20], along which both the neurons and the "
            "components vary; gradgraph pads a feature axis that holds the same neurons at every datapoint and "
            "position")


def test_a_pad_of_features_whose_neurons_differ_between_places_is_refused():
    """``stack([a(x), b(tanh(a(x)))], 1)``: the two rows of ``[b, 2, T, 4]`` hold different neurons."""
    model = Padded(lambda h: F.pad(h, (1, 1)), lambda self, h: torch.stack([h, self.b(h)], 1), width=6).double()
    refused(model, _tokens(),
            ": torch.nn.functional.pad: pads axis 3 of a value of shape [2, 2, 5, 4] whose neurons differ between "
            "places (or are statistics); gradgraph pads one row of neurons")


def test_a_pad_of_the_positions_of_a_statistic_is_refused():
    """``[b, T, 1]`` holding a sum over each token's features (a statistic, no neuron): its positions padded."""
    model = Padded(lambda h: F.pad(h, (0, 0, 1, 0)), lambda self, h: h.sum(-1, keepdim=True), width=1).double()
    refused(model, _tokens(),
            ": torch.nn.functional.pad: pads the positions of a value of shape [2, 5, 1] whose positions hold "
            "different neurons (or statistics); gradgraph pads one row of features")


def test_a_pad_of_the_positions_of_a_sequence_first_value_is_refused():
    """``[T, b, d]`` with ``datapoint_dim=1``: the positions axis 0 comes before the datapoints."""
    gradgraph.convert.clear_structure_cache()
    model = Padded(lambda h: F.pad(h, (0, 0, 1, 0))).double()
    try:
        to_graph_traced(model, _tokens().transpose(0, 1).contiguous(), loss_fn=squared, datapoint_dim=1)
    except UnsupportedOperationError as error:
        assert str(error).endswith(
            ": torch.nn.functional.pad: pads the positions of a value of shape [5, 2, 4] whose datapoints are not its "
            "first axis alone, or whose features are not its last axes"), str(error)
    else:
        raise AssertionError("not refused")


def test_a_sequence_first_model_that_shifts_its_tokens_batch_first_is_exact():
    """``[T, b, 3]`` in (``datapoint_dim=1``), transposed to ``[b, T, 4]`` inside the model, then a token shift: the
    padded value's datapoints are its axis 0, so it converts (refused before session 19 for any model whose
    datapoints are not its input's axis 0, with a message saying the value's datapoints were not its first axis),
    exact against a loop over the datapoints."""
    gradgraph.convert.clear_structure_cache()
    torch.manual_seed(3)
    model = Padded(lambda h: F.pad(h, (0, 0, 1, -1)), lambda self, h: h.transpose(0, 1)).double()
    inputs = _tokens(3).transpose(0, 1).contiguous()  # [T, b, 3]
    graph = to_graph_traced(model, inputs, loss_fn=squared, datapoint_dim=1)
    ours = graph.per_sample_grads()
    for i in range(inputs.shape[1]):
        model.zero_grad()
        squared(model(inputs[:, i:i + 1]), None).sum().backward()
        for name, param in model.named_parameters():
            if param.grad is not None:  # b is unused here
                torch.testing.assert_close(ours[name][i], param.grad, atol=1e-10, rtol=0, msg=f"{name}, datapoint {i}")
    assert set(ours) == {"a.weight", "a.bias", "head.weight", "head.bias"}


def test_a_pad_of_features_that_hold_a_statistic_is_refused():
    """``cat([h, h.sum(-1)])``: every row the same, but its last place a statistic (no neuron). Kills
    ``neuron_pad`` 95 (the statistics' check dropped)."""
    model = Padded(lambda h: F.pad(h, (1, 1)), lambda self, h: torch.cat([h, h.sum(-1, keepdim=True)], -1),
                   width=7).double()
    refused(model, _tokens(),
            ": torch.nn.functional.pad: pads axis 2 of a value of shape [2, 5, 5] whose neurons differ between "
            "places (or are statistics); gradgraph pads one row of neurons")


def test_a_pad_of_a_transposed_value_whose_datapoints_are_its_second_axis_is_refused():
    """``[T, b, d]`` made inside the model: the datapoints vary along axis 1. Kills ``position_pad`` 5, 20 (the
    check of the datapoints' axes weakened: it would then be refused as a pad of the datapoint axis)."""

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(F.pad(torch.tanh(self.a(x)).transpose(0, 1), (0, 0, 0, 0, 1, 0))).sum(0)

    refused(Transposed().double(), _tokens(),
            ": torch.nn.functional.pad: pads the positions of a value of shape [5, 2, 4] whose datapoints are not its "
            "first axis alone, or whose features are not its last axes")


def test_a_pad_of_the_datapoint_axis_of_a_value_of_features_is_refused():
    """``[b, d]`` padded on axis 0. Kills ``position_pad`` 10 (``first == 1`` refused as the wrong layout)."""
    refused(Padded(lambda h: F.pad(h, (0, 0, 1, 0))[1:], lambda self, h: h.sum(1)).double(), _tokens(3),
            ": torch.nn.functional.pad: pads the datapoint axis 0 of a value of shape [3, 4]: the new rows would be "
            "datapoints of no input")


class Tail(nn.Module):
    """``a`` then ``tail(self, h)``: the model's output (its own loss by ``squared``)."""

    def __init__(self, tail, modules=None) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        for name, module in (modules or {}).items():
            setattr(self, name, module)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, torch.tanh(self.a(x)))


def test_pads_of_one_datapoint_and_one_token_are_exact():
    """A batch of one (one row of features) and one token of one datapoint (one row of positions). Kills
    ``neuron_pad`` 93 and ``position_pad`` 49, 70 (row 1 read for row 0: there is none)."""
    torch.manual_seed(8)
    exact(Tail(lambda self, h: self.head(F.pad(h, (1, 1), value=0.5)), {"head": nn.Linear(6, 2)}).double(),
          torch.randn(1, 3, dtype=DTYPE))
    exact(Tail(lambda self, h: self.head(F.pad(h, (0, 0, 1, 0), value=0.5)).sum(1), {"head": nn.Linear(4, 2)}).double(),
          torch.randn(1, 1, 3, dtype=DTYPE))


def test_pads_of_values_that_hold_the_inputs_neuron_zero_are_exact():
    """``cat([x, h])`` holds the input's neurons, the first of which is node 0. Kills ``neuron_pad`` 96, 97 and
    ``position_pad`` 50, 51 (``< 0`` as ``<= 0`` / ``< 1``: node 0 taken for a statistic)."""
    torch.manual_seed(9)
    tokens = _tokens()
    joined = lambda self, x: torch.cat([x, torch.tanh(self.a(x))[..., :1]], -1)  # noqa: E731

    class Joined(nn.Module):
        def __init__(self, pad, width) -> None:
            super().__init__()
            self.a, self.head, self.pad = nn.Linear(3, 4), nn.Linear(width, 2), pad

        def forward(self, x):
            return self.head(self.pad(joined(self, x))).sum(1)

    exact(Joined(lambda h: F.pad(h, (0, 0, 1, 0)), 4).double(), tokens)
    exact(Joined(lambda h: F.pad(h, (1, 0))[..., 1:], 4).double(), tokens)
    exact(Joined(lambda h: F.pad(h, (2, 1), value=0.25), 7).double(), tokens)


def test_a_padded_value_and_a_function_of_it_both_read_are_exact():
    """``head(p) + c(sin(p))`` with ``p`` a padded value: ``p`` is version 0 of its new sets, ``sin(p)`` version
    1; at version 1 both would be one act and the summed-gradient check would refuse. Kills ``neuron_pad`` 180
    and ``position_pad`` 111."""
    torch.manual_seed(10)
    both = lambda self, p: self.head(p) + self.c(torch.sin(p))  # noqa: E731
    exact(Tail(lambda self, h: both(self, F.pad(h, (1, 1))), {"head": nn.Linear(6, 2), "c": nn.Linear(6, 2)}).double(),
          torch.randn(3, 3, dtype=DTYPE))
    exact(Tail(lambda self, h: both(self, F.pad(h, (0, 0, 1, -1))).sum(1),
               {"head": nn.Linear(4, 2), "c": nn.Linear(4, 2)}).double(), _tokens())


def test_a_token_shift_that_is_the_models_output_is_exact():
    """Nothing fixes the shifted value's act: it is the newest value of its set (``observe``). Kills
    ``position_pad`` 118."""
    torch.manual_seed(11)
    exact(Tail(lambda self, h: F.pad(h, (0, 0, 1, -1), value=0.5)).double(), _tokens())


def test_a_pad_of_an_unbound_position_table_has_no_rule():
    """A position table (no datapoint yet: no components) padded on its positions: no rule. Kills
    ``pads_neuron_values`` 13 (the check of the components dropped: the rule would read ``None``)."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.positions, self.head = nn.Linear(3, 4), nn.Embedding(6, 4), nn.Linear(4, 2)

        def forward(self, x):
            table = F.pad(self.positions(torch.arange(x.shape[1] - 1)), (0, 0, 1, 0))
            return self.head(torch.tanh(self.a(x)) + table).sum(1)

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError,
                       match=r"torch\.nn\.functional\.pad: gradgraph has no rule for this op"):
        gradgraph.to_graph(Positions().double(), _tokens(), None, squared)


def _coupled_loss(output, _targets):
    losses = output.pow(2).flatten(1).sum(1)
    return losses - losses.mean()


def _names(model, inputs) -> str:
    """The neuron set a coupled loss is named at (the pad's output is the model's output)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(DatapointCouplingError) as info:
        gradgraph.to_graph(model, inputs, None, _coupled_loss)
    return re.search(r"values at (.*?) \(a tensor", str(info.value)).group(1)


def _nan(output):
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(NonFiniteFactorError) as info:
        gradgraph.to_graph(output, torch.randn(3, 3, dtype=DTYPE), None, squared)
    return str(info.value)


def test_the_new_sets_of_a_pad_are_named_after_the_module_and_the_side():
    """The sets' names, as the coupling and non-finite messages give them: the copy by the module path (or the
    op's name outside a module), the constants ``pad before`` / ``pad after``. Kills ``neuron_pad`` 110, 115, 119-122,
    126, 132 and ``position_pad`` 65, 71."""
    torch.manual_seed(12)
    modules = {"pad": nn.ConstantPad1d((1, 2), 0.5), "shift": nn.ZeroPad2d((0, 0, 1, -1))}
    assert _names(Tail(lambda self, h: self.pad(h), modules).double(), torch.randn(3, 3, dtype=DTYPE)) == \
        "the neurons of 'pad pad before'"
    assert _names(Tail(lambda self, h: F.pad(h, (1, 0))).double(), torch.randn(3, 3, dtype=DTYPE)) == \
        "the neurons of 'torch.nn.functional.pad pad before'"
    assert _names(Tail(lambda self, h: F.pad(h, (0, 2))).double(), torch.randn(3, 3, dtype=DTYPE)) == \
        "the neurons of 'torch.nn.functional.pad'"
    modules["pad"] = nn.ConstantPad1d((0, 2), 0.5)
    assert _names(Tail(lambda self, h: self.pad(h), modules).double(), torch.randn(3, 3, dtype=DTYPE)) == \
        "the neurons of 'pad'"
    assert _names(Tail(lambda self, h: self.shift(h), modules).double(), _tokens(3)) == "the neurons of 'shift'"
    assert _names(Tail(lambda self, h: F.pad(h, (0, 0, 1, -1))).double(), _tokens(3)) == \
        "the neurons of 'torch.nn.functional.pad'"
    # a NaN pad value (the pad is the output: only its own places are not finite) names the constant block
    assert "activation of the 'pad pad after' output neurons" in _nan(
        Tail(lambda self, h: self.pad(h), {"pad": nn.ConstantPad1d((0, 2), float("nan"))}).double())
    assert "activation of the 'torch.nn.functional.pad pad after' output neurons" in _nan(
        Tail(lambda self, h: F.pad(h, (0, 2), value=float("nan"))).double())


class OneChannelMap(nn.Module):
    """``Conv1d(3, 1)``: a map of one channel ``[b, 1, L]``, padded along its positions (``F.pad(h, (1, 2),
    value=value)``), then ``Conv1d(1, 2)``, the mean over the positions and a head."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.c1, self.c2, self.head = nn.Conv1d(3, 1, 3), nn.Conv1d(1, 2, 3), nn.Linear(2, 2)

    def forward(self, x):
        h = F.pad(torch.tanh(self.c1(x)), (1, 2), value=self.value)
        return self.head(self.c2(h).mean(-1))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_one_channel_map_padded_along_its_positions_is_exact(value):
    """A map of one channel ``[b, 1, L]`` padded along its positions: its neurons vary along no axis (one channel),
    so the last axis is no feature axis of tokens but the map's positions, the convolution rule's pad. Exact
    against torch.func's per-sample gradients at 1e-10. Kills ``pads_neuron_values`` 50 (``<=`` for ``<``: a pad
    of the last axis of a value whose neurons vary along none read as a pad of token positions before the
    features, which fails on the map's shape: a ``RuntimeError`` out of the trace)."""
    torch.manual_seed(0)
    exact(OneChannelMap(value).to(DTYPE), torch.randn(4, 3, 8, dtype=DTYPE))
