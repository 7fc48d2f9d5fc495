"""Per-function checks of ``trace/rules_pad.py`` (issue 31, runs pad 1-...): the refusals no other test reaches, each
matched in full, and the values of what survived mutation, each against per-sample gradients by torch.func in
float64 (``exact``) or against the padded value itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
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
            "components vary; gradgraph pads a feature axis that holds the same neurons at every datapoint and position")


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
            ": torch.nn.functional.pad: pads the positions of a value of shape [2, 5, 1] whose positions hold different "
            "neurons (or statistics); gradgraph pads one row of features")


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
