"""A constant pad of a ``[b, C]`` value broadcast over positions (issue 31, branch mut47, group ``convert-conv``).

``ConvRules.pads_positions`` took a constant ``F.pad`` of a map whose channels are one neuron each only where the
map's components vary along its spatial axes (a feature map) or it has one position; a ``[b, C]`` value broadcast
over positions (``h[:, :, None].expand(-1, -1, L)``) and padded into a convolution was refused as an op without a
rule. ``spatial_pool``, which reads the pad, makes a copy of each channel at fresh components for every place of
the padded grid, its act the padded tensor, and reads nothing of how the input's components vary: so the pad of
such a map converts exactly, with the map's own group (the copy tied to its channel). Lifted in the branch that
adds this file (mutmut's ``pads_positions`` 55, 56, 59 of runs conv 11-12 converted these models exactly). Each test
is float64: per-sample gradients against torch.func and a loop over the datapoints, sampled group elements
checked against the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import exact, squared
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

DTYPE = torch.float64


class BroadcastThenPadded(nn.Module):
    """``h = tanh(a(x))`` (four features) broadcast over three positions (``form``), padded with 0.5 on both sides and
    read by a ``Conv1d`` (``"2-D"``: over a 2 x 3 grid, padded on every side, read by a ``Conv2d``), then a head."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.conv = nn.Conv2d(4, 4, 3) if form == "2-D" else nn.Conv1d(4, 4, 3)
        self.register_buffer("scale", torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.form == "2-D":
            grid = F.pad(h[:, :, None, None].expand(-1, -1, 2, 3), (1, 1, 1, 1), value=0.5)
            return self.out(torch.tanh(self.conv(grid)).mean((2, 3)))
        line = {"expanded": lambda: h[:, :, None].expand(-1, -1, 3), "repeated": lambda: h[:, :, None].repeat(1, 1, 3),
                "scaled per position": lambda: h[:, :, None] * self.scale,
                "shifted per position": lambda: h[:, :, None] + self.scale}[self.form]()
        return self.out(torch.tanh(self.conv(F.pad(line, (1, 1), value=0.5))).mean(-1))


@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize("form", ["expanded", "repeated", "scaled per position", "shifted per position", "2-D"])
def test_a_value_broadcast_over_positions_and_padded_converts_exactly_with_a_true_group(form, batch):
    """Exact against torch.func and a loop over the datapoints (also for a batch of one, where no axis of the map
    varies at all); four sampled group elements keep the function and map the graph to the permuted model's, and
    they move neurons (``a``'s and the convolution's). Fails before the lift: refused, "torch.nn.functional.pad:
    gradgraph has no rule for this op"."""
    model = BroadcastThenPadded(form).to(DTYPE)
    inputs = torch.randn(batch, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    exact(model, inputs)
    assert_matches_autograd_loop(model, inputs, None, squared)
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(4)]
    assert max(moved) > 0

