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
