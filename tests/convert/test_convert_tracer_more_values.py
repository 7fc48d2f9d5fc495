"""Per-function checks of ``convert/trace/tracer.py`` written for survivors of issue 31 (branch mut47, group
``convert-tracer``): float64, against torch.func and a per-datapoint autograd loop at 1e-10, with sampled
elements of the inferred group; each test names the mutants it kills (checked with ``MUTANT_UNDER_TEST``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from convert_values import exact, squared
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

DTYPE = torch.float64


class PixelsReadThenChanged(nn.Module):
    """``p = x.double() / 255`` of integer pixels ``[b, 3]`` (data made from the input), read by ``a`` (which makes
    ``p`` the input's neurons), then changed elementwise (``form``: scaled per feature, shifted, squared) and read
    by ``b``: ``b``'s input is no longer the input's neurons, so it gets a set of its own."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.form = form
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        p = x.double() / 255
        h = torch.tanh(self.a(p))
        changed = {"scaled": lambda: p * self.scale, "shifted": lambda: p + 1, "squared": lambda: p ** 2}[self.form]()
        return self.out(h + torch.tanh(self.b(changed)))


@pytest.mark.parametrize("form", ["scaled", "shifted", "squared"])
def test_data_made_from_integer_pixels_read_then_changed_and_read_again_converts_exactly(form):
    """The first read makes ``p`` the input's neurons and remembers them on ``p``, so ``p * scale``, ``p + 1`` and
    ``p ** 2`` are elementwise ops of neurons, read by ``b`` as such. Exact against torch.func and a loop over the
    datapoints; three sampled group elements keep the function. Kills ``xǁTracerǁneed_neurons__mutmut_16``
    (``set_meta(None, neurons)``: the neurons not remembered on ``p``, which stays data, so ``p * scale`` is data
    that ``b`` reads as the input's own elements, with the input's values as their act: ``b``'s gradient is then
    wrong, and the conversion's summed-gradient check refuses the model)."""
    model = PixelsReadThenChanged(form).to(DTYPE)
    pixels = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    exact(model, pixels)
    assert_matches_autograd_loop(model, pixels, None, squared)
    for seed in range(3):
        moved, _, _ = assert_group_keeps_function(model, pixels, None, squared, seed=seed)
        assert moved > 0


class PartsScaledByADecomposedOp(nn.Module):
    """``PerGroupCodeBefore`` of ``test_convert_grouped_blocks.py`` with each half scaled by an op the trace runs as
    its parts (``torch.lerp``, ``addcmul``, ``addcdiv`` from zeros: ``2 h[:, :2]``, ``3 h[:, 2:]``; ``"one half"``
    scales only the first), then a depthwise convolution: its groups 0 and 2 are not alike (their input channels
    were scaled by 2 and 3), and the graph shows neither constant."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)

    def scaled(self, part, factor):
        zeros, ones = torch.zeros_like(part), torch.ones_like(part)
        if self.form == "addcmul":
            return torch.addcmul(zeros, part, ones, value=factor)
        if self.form == "addcdiv":
            return torch.addcdiv(zeros, part, ones, value=factor)
        return torch.lerp(zeros, part, factor)

    def forward(self, x):
        h = torch.relu(self.a(x))
        second = h[:, 2:] if self.form == "one half" else self.scaled(h[:, 2:], 3.0)
        h = torch.cat([self.scaled(h[:, :2], 2.0), second], 1)
        return self.c(torch.relu(self.depthwise(h))).mean((2, 3))


@pytest.mark.parametrize("form", ["lerp", "addcmul", "addcdiv", "one half"])
def test_channels_treated_apart_inside_a_decomposed_op_make_no_blocks(form):
    """A set read in part inside an op run as its parts that is no grouped op (``torch.lerp`` and the others
    decompose into ops the trace follows) is marked ``read_in_part`` like any other partial read, so the depthwise
    convolution's groups are not claimed alike: no blocks, and six sampled group elements keep the function; the
    exchange of groups 0 and 2 written by hand changes it. Exact against torch.func. Kills
    ``xǁTracerǁ__torch_function____mutmut_35`` and ``36`` (``getattr(parts, "groups", 2) > 1`` / ``>= 1``: every
    decomposed op counted as a grouped op, so its partial reads did not mark the set; the layout then claimed the
    four groups as blocks, and four of six sampled elements changed the output)."""
    torch.manual_seed(8)
    model = PartsScaledByADecomposedOp(form).to(DTYPE)
    inputs = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    graph = exact(model, inputs)
    assert int(graph.perm_block.max()) <= 0
    for seed in range(6):
        assert_group_keeps_function(model, inputs, None, squared, seed=seed)
    swap = torch.tensor([2, 1, 0, 3])
    with torch.no_grad():
        before = model(inputs)
        model.a.weight.copy_(model.a.weight[swap])
        model.a.bias.copy_(model.a.bias[swap])
        model.depthwise.weight.copy_(model.depthwise.weight[swap])
        model.depthwise.bias.copy_(model.depthwise.bias[swap])
        model.c.weight.copy_(model.c.weight[:, swap])
        assert (model(inputs) - before).abs().max() > 1e-3
