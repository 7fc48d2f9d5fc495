"""A module registered with ``register_elementwise`` that owns trainable parameters is refused by its path, before
the trace, with remedies that work.

Before, the fill's check refused it later with "register the module with gradgraph.convert.register_elementwise
or gradgraph.register_converter" — advice to do what the user had already done. The refusal test fails on the
code before (the message).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradgraph
from gradgraph.convert import register_elementwise
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES

from traced_models import reference_per_sample_grads

DTYPE = torch.float64


class Snake(nn.Module):
    """``x + sin(α x)² / α`` with a learned ``α`` per neuron."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=DTYPE))

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


@pytest.fixture
def snake_registered():
    register_elementwise(Snake)
    yield
    ELEMENTWISE_MODULES.pop(Snake, None)


def _squared(output, targets):
    return ((output - targets) ** 2).sum(-1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Sequential(Snake()), nn.Linear(4, 2)).to(DTYPE)


def test_a_registered_module_with_trainable_parameters_is_refused_by_its_path(snake_registered):
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    with pytest.raises(gradgraph.UnsupportedModuleError,
                       match=r"'1\.0' of type Snake: it is registered with gradgraph\.convert\.register_elementwise, "
                             r"so it runs as one elementwise op without parameters, but it has trainable parameters "
                             r"\['1\.0\.alpha'\].*Freeze them"):
        gradgraph.to_graph(_model(), inputs, targets, _squared)


def test_frozen_it_converts_exactly_with_the_parameters_fixed(snake_registered):
    """The first remedy: its per-sample gradients are those of the other parameters, exact."""
    model = _model()
    model[1][0].alpha.requires_grad_(False)
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    ours = gradgraph.to_graph(model, inputs, targets, _squared).per_sample_grads()
    reference = reference_per_sample_grads(model, inputs, targets, _squared)
    assert set(ours) == set(reference) - {"1.0.alpha"}
    for name, value in ours.items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)
    assert not model[1][0].alpha.requires_grad  # the conversion froze it again


def test_unregistered_it_is_followed_op_by_op():
    """The second remedy, where the ops have rules: refused by name here too (a parameter inside ``sin``),
    never converted without ``alpha``'s gradient."""
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    with pytest.raises(gradgraph.convert.UnsupportedOperationError, match="alpha"):
        gradgraph.to_graph(_model(), inputs, targets, _squared)
