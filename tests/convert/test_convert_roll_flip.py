"""``roll`` and ``flip`` of neuron values are shape ops: a permutation of places, followed by replaying the op on
the ids. Along the positions (a token roll, Swin's cyclic shift of a ``[b, H, W, C]`` map, a sequence read
backwards) and along the features they convert exactly with a group that keeps the function; along the datapoint
axis they are refused (a datapoint's loss would read another's values: the residual rule or the coupling
check). Before session 18 each was refused as "gradgraph has no rule for this op"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

DTYPE = torch.float64


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


class Rolled(nn.Module):
    """``[b, T, 4]`` tokens (or a ``[b, 3, 3, 4]`` channels-last map), an op that moves places, a residual MLP,
    mean pooling over the places."""

    def __init__(self, op) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + F.gelu(self.mix(self.op(h)))
        return self.head(h.flatten(1, -2).mean(1))


TOKENS = {
    "roll tokens": lambda h: h.roll(1, 1),
    "torch.roll tokens, keywords": lambda h: torch.roll(h, shifts=-2, dims=1),
    "flip tokens": lambda h: h.flip(1),
    "torch.flip tokens": lambda h: torch.flip(h, [1]),
    "roll features": lambda h: torch.roll(h, 1, -1),
    "flip features": lambda h: h.flip(-1),
}


@pytest.mark.parametrize("op", TOKENS.values(), ids=TOKENS.keys())
def test_a_roll_or_flip_of_tokens_or_features_is_exact_with_a_group_that_keeps_the_function(op):
    torch.manual_seed(0)
    model = Rolled(op).to(DTYPE)
    inputs, targets = torch.randn(3, 5, 3, dtype=DTYPE), torch.tensor([0, 1, 1])
    assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=1)


def test_swins_cyclic_shift_of_a_channels_last_map_is_exact():
    torch.manual_seed(1)
    model = Rolled(lambda h: torch.roll(h, shifts=(-1, -1), dims=(1, 2))).to(DTYPE)
    inputs, targets = torch.randn(2, 3, 3, 3, dtype=DTYPE), torch.tensor([1, 0])
    assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=2)
    assert moved > 0


@pytest.mark.parametrize("op", [lambda h: h.roll(1, 0), lambda h: torch.roll(h, shifts=1, dims=0),
                                lambda h: h.flip(0)], ids=["roll", "roll keywords", "flip"])
def test_a_roll_or_flip_of_the_datapoints_is_refused(op):
    """Refused where the moved rows meet their own datapoint's (the residual add), and by the coupling check
    where they reach the loss alone."""
    torch.manual_seed(2)
    inputs, targets = torch.randn(3, 5, 3, dtype=DTYPE), torch.tensor([0, 1, 1])
    with pytest.raises(gradgraph.UnsupportedModuleError, match="Tensor.add: combines values of different datapoints"):
        gradgraph.to_graph(Rolled(op).to(DTYPE), inputs, targets, _cross_entropy)
    alone = Rolled(op).to(DTYPE)
    alone.forward = lambda x: alone.head(alone.op(torch.tanh(alone.embed(x))).mean(1))
    with pytest.raises(gradgraph.DatapointCouplingError, match="the per-datapoint losses mix datapoints"):
        gradgraph.to_graph(alone, inputs, targets, _cross_entropy)


def test_a_roll_of_the_flattened_value_is_refused():
    """``torch.roll(h, 1)`` without ``dims`` rolls the flattened value: features move into other positions."""
    torch.manual_seed(3)
    model = Rolled(lambda h: torch.roll(h, 1)).to(DTYPE)
    with pytest.raises(gradgraph.UnsupportedModuleError, match="not features"):
        gradgraph.to_graph(model, torch.randn(3, 5, 3, dtype=DTYPE), torch.tensor([0, 1, 1]), _cross_entropy)
