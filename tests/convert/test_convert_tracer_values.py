"""Per-function checks of ``convert/trace/tracer.py`` and ``convert/trace/rules_shape.py`` (issue 31, group
``convert-tracer``).

Written for the survivors of mutmut's runs over the two files (docs/mutation.md): each test is float64 against
an independent truth (torch.func through ``tests/traced_models.py``'s helpers, or a per-datapoint autograd loop,
at 1e-10), or checks a refusal's message in full where a user reads it (what was wrong and where), and names in
its docstring the mutants it kills (``f N``: mutant ``N`` of function ``f``, checked with ``MUTANT_UNDER_TEST``).
The first tests reach the dispatch's refusals that no cheap test of the group's list reached (coverage.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convert_values import exact, refused

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
        if self.form == "constant":
            return self.out(torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=DTYPE)], -1)[..., :2])
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
