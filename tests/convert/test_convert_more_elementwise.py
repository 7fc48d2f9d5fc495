"""Elementwise modules a new user's model holds: the shrink and threshold activations, RReLU and
the channel dropouts in eval mode convert exactly; in training mode the random ones are refused.

Found by trying ~60 stock modules the suites never saw (session of 2026-12-07): each of these was
refused as an op without a rule (``torch.nn.functional.dropout2d: gradgraph has no rule for this
op``), though in eval mode a dropout is its input and the activations are elementwise. Every test
here failed on the code before (a refusal), and the training-mode tests check the refusal is kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.convert.plan import PLAN_CACHE

DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def assert_exact_per_sample_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn=class_loss):
    """Against a per-datapoint autograd loop (torch.func's vmap has no batching rule for RReLU's op)."""
    return assert_matches_autograd_loop(model, inputs, targets, loss_fn)


class Elementwise(nn.Module):
    """``torch.<name>(h)`` as a module (the functions with no module of their own)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.function(h)


ACTIVATIONS = [
    nn.Tanhshrink(), nn.Softshrink(0.3), nn.Hardshrink(0.3), nn.Threshold(0.1, -0.2), nn.RReLU(0.1, 0.3),
    Elementwise(torch.atan), Elementwise(torch.sinh), Elementwise(torch.asinh),
    Elementwise(lambda h: h.hardshrink(0.2)),
]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda module: repr(module)[:24])
def test_elementwise_activations_convert_exactly_and_keep_the_function_under_the_group(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), activation, nn.Linear(7, 6), activation, nn.Linear(6, 3))
    model = model.to(DTYPE).eval()
    inputs, targets = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=3)
    assert moved > 0  # the hidden neurons are permuted: the op is read as elementwise, not as a pin


DROPOUTS = [(nn.Dropout1d(0.4), 1), (nn.Dropout2d(0.4), 2), (nn.Dropout3d(0.4), 3), (nn.AlphaDropout(0.4), 2),
            (nn.FeatureAlphaDropout(0.4), 2)]


def convolution_net(dropout: nn.Module, dims: int) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    positions = 4 ** dims  # side 6, kernel 3
    return nn.Sequential(conv(2, 3, 3), nn.ReLU(), dropout, conv(3, 4, 1), nn.Flatten(), nn.Linear(4 * positions, 3))


def dropout_id(value) -> str:
    return type(value).__name__ if isinstance(value, nn.Module) else str(value)


@pytest.mark.parametrize("dropout, dims", DROPOUTS, ids=dropout_id)
def test_channel_dropouts_in_eval_mode_are_their_input_traced_and_replayed(dropout, dims):
    torch.manual_seed(1)
    model = convolution_net(dropout, dims).to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):  # a trace, then the cached plan's replay on other inputs
        misses = PLAN_CACHE.misses
        inputs, targets = torch.randn(3, 2, *[6] * dims, dtype=DTYPE), torch.randint(0, 3, (3,))
        assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    assert PLAN_CACHE.misses == misses  # the second conversion replayed the plan
    assert_group_keeps_function(model, inputs, targets, class_loss, seed=2)


@pytest.mark.parametrize("dropout, dims", DROPOUTS, ids=dropout_id)
def test_channel_dropouts_in_training_mode_are_refused_by_name(dropout, dims):
    model = convolution_net(dropout, dims).to(DTYPE).train()
    inputs, targets = torch.randn(3, 2, *[6] * dims, dtype=DTYPE), torch.randint(0, 3, (3,))
    with pytest.raises(UnsupportedOperationError,
                       match=rf"module '2' of type {type(dropout).__name__}\): torch\.nn\.functional\.\w*dropout\w*: "
                             r"active dropout changes the function; call model\.eval\(\)"):
        gradgraph.to_graph(model, inputs, targets, class_loss)


class FunctionalDropouts(nn.Module):
    """Dropouts called as functions: ``F.alpha_dropout`` is inactive unless told ``training=True``,
    ``F.dropout2d`` active unless told ``training=False`` (torch's defaults)."""

    def __init__(self, call) -> None:
        super().__init__()
        self.conv, self.head, self.call = nn.Conv2d(2, 3, 3), nn.Linear(48, 3), call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.call(torch.tanh(self.conv(x))).flatten(1))


@pytest.mark.parametrize("call, active", [
    (lambda h: F.alpha_dropout(h, 0.3), False),
    (lambda h: F.feature_alpha_dropout(h, 0.3), False),
    (lambda h: F.dropout2d(h, 0.3, False), False),
    (lambda h: F.dropout2d(h, p=0.3, training=False), False),
    (lambda h: F.dropout2d(h, 0.0), False),  # p = 0: the same function
    (lambda h: F.dropout2d(h, 0.3), True),
    (lambda h: F.alpha_dropout(h, 0.3, True), True),
    (lambda h: F.feature_alpha_dropout(h, 0.3, training=True), True),
])
def test_functional_dropouts_follow_torchs_default_of_training(call, active):
    torch.manual_seed(2)
    model = FunctionalDropouts(call).to(DTYPE).eval()  # the functions do not read the module's mode
    inputs, targets = torch.randn(3, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,))
    if active:
        with pytest.raises(UnsupportedOperationError, match="active dropout changes the function"):
            gradgraph.to_graph(model, inputs, targets, class_loss)
    else:
        assert_exact_per_sample_grads(model, inputs, targets, class_loss)


def test_rrelu_in_training_mode_is_refused_with_what_eval_mode_computes():
    model = nn.Sequential(nn.Linear(5, 7), nn.RReLU(), nn.Linear(7, 3)).to(DTYPE).train()
    inputs, targets = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedOperationError,
                       match=r"module '1' of type RReLU\): torch\.nn\.functional\.rrelu: an active RReLU draws a "
                             r"random slope per element \(training mode\); call model\.eval\(\), where it is a leaky "
                             r"ReLU of slope \(lower \+ upper\) / 2"):
        gradgraph.to_graph(model, inputs, targets, class_loss)
    with pytest.raises(UnsupportedOperationError, match="an active RReLU"):  # the functional form too
        model = nn.Sequential(nn.Linear(5, 3), Elementwise(lambda h: F.rrelu(h, training=True))).to(DTYPE)
        gradgraph.to_graph(model, inputs, targets, class_loss)
