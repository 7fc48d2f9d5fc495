"""A residual sum may live in the neurons of a fresh affine output (the set "absorbs" it), but not where that
set was already read by another sum: ``y = l(x)``, ``m = (y - mean(y)) + x`` (a merged set read from ``y``),
``z = norm(m) + y`` put ``z`` in ``y``'s neurons with an edge from the norm's set, closing the cycle
``y -> m -> norm -> y``, and the layout refused the model as "internal: the traced neuron sets form a cycle"
(found by the program fuzzer in session 22, program ``[linear, center, add input, norm, add]``), and so did ``y``
read by the copies of a CReLU of part of it, then added back (``[linear, chunk, center, crelu, add]``, the fuzzer
again): a set a sum or a cat's copy read absorbs no later sum now. The first two tests and the CReLU one fail on the code
before; the gated forms pass on both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph

DTYPE = torch.float64

SUMS = {
    "norm of a merge, added back": lambda m, x, y: m.norm((y - y.mean(-1, keepdim=True)) + x) + y,
    "added back first": lambda m, x, y: y + m.norm((y - y.mean(-1, keepdim=True)) + x),
    "a gated merge, added back": lambda m, x, y: torch.tanh((y * 0.5 + x) * m.gate(x)) + y,
    "two sums read from y, the second added back": lambda m, x, y: torch.tanh(m.norm(y + x) + m.gate(x)) + y,
    # y read by the copies of a cat (CReLU of a centred half), then added back: the fuzzer's
    # [linear, chunk, center, crelu, add]
    "a CReLU of part of y, added back": lambda m, x, y: (lambda c: torch.cat([F.relu(c), F.relu(-c)], -1))(
        y[:, 1:] - y[:, 1:].mean(-1, keepdim=True))[:, :3] + y,
}


class SumReadTwice(nn.Module):
    """``y = Linear(3, 3)(x)``, then ``sum(self, x, y)``, ``tanh``, a head (``x`` has the width of ``y``); the
    ``gate`` (a ``Linear(3, 3)``) and ``norm`` (a ``LayerNorm(3)``) only where the sum uses them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sum = SUMS[name]
        self.l, self.head = nn.Linear(3, 3), nn.Linear(3, 2)
        if "gate" in name or "two sums" in name:
            self.gate = nn.Linear(3, 3)
        if "norm" in name or "first" in name or "two sums" in name:
            self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.head(torch.tanh(self.sum(self, x, self.l(x))))


def loss(output, target):
    return F.cross_entropy(output, target, reduction="none")


@pytest.mark.parametrize("name", list(SUMS))
def test_a_sum_read_by_an_earlier_sum_of_the_same_affine_output_converts_exactly(name):
    """Exact against a per-datapoint autograd loop at 1e-10; a sampled element of the inferred group keeps the
    function (float64)."""
    gradgraph.convert.clear_structure_cache()
    model = SumReadTwice(name).to(DTYPE)
    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    targets = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(2))
    assert_matches_autograd_loop(model, inputs, targets, loss)
    assert_group_keeps_function(model, inputs, targets, loss)
