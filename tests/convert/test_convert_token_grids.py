"""Tokens whose components are not numbered ``0 .. T - 1`` (a class token prepended gets the newest key, first),
read by an op that makes a new grid of positions — a same-size convolution or pooling over the tokens, a token
shift by ``F.pad`` — and then joined with themselves along the features.

Until session 18 the new grid was numbered ``0 .. T - 1`` afresh, so the joined value held two components at one
position: a ``Linear`` after the join was refused as "applied to an axis that holds positions" (a wrong reason),
and with learned positions added the summed-gradient check caught a wrong gradient (found by the token-program
fuzzer's shift step). Now a same-size grid keeps its input's components by index
(``ConvRules.position_comps(like=...)``, ``PadRules.padded_comps``). The mixer tests fail on the code before;
the last guards the new keys of a grown grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

DTYPE = torch.float64


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


class ClassTokenMixer(nn.Module):
    """Token ids, a class token prepended, a token mixer over the tokens (``conv``: a depthwise Conv1d with
    "same" padding; ``pool``: a max pool of stride 1; ``shift``: half the features shifted one token down), the
    mixed and the original tokens concatenated along the features, a Linear, learned positions, mean pooling."""

    def __init__(self, mixer: str, width: int = 4, tokens: int = 3) -> None:
        super().__init__()
        self.mixer = mixer
        self.embed = nn.Embedding(7, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        if mixer == "conv":
            self.conv = nn.Conv1d(width, width, 3, padding=1, groups=width)
        self.mix = nn.Linear(2 * width, width)
        self.positions = nn.Parameter(torch.randn(tokens + 1, width) / 3)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        h = torch.cat([self.cls.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1)
        if self.mixer == "conv":
            mixed = self.conv(h.transpose(1, 2)).transpose(1, 2)
        elif self.mixer == "pool":
            mixed = F.max_pool1d(h.transpose(1, 2), 3, 1, 1).transpose(1, 2)
        else:
            half = h.shape[-1] // 2
            mixed = torch.cat([F.pad(h[..., :half], (0, 0, 1, -1)), h[..., half:]], dim=-1)
        z = torch.tanh(self.mix(torch.cat([mixed, h], dim=-1)) + self.positions)
        return self.head(z).mean(1)


@pytest.mark.parametrize("mixer", ["conv", "pool", "shift"])
def test_a_token_mixer_after_a_class_token_joined_with_the_tokens_is_exact(mixer):
    torch.manual_seed(0)
    model = ClassTokenMixer(mixer).to(DTYPE)
    ids, targets = torch.randint(0, 7, (3, 3)), torch.tensor([0, 2, 1])
    graph = assert_exact_per_sample_grads(model, ids, targets, _cross_entropy)
    # one per (datapoint, token), the class token's included, and one for the mean over the tokens
    assert graph.num_components == 3 * (4 + 1)
    moved, _, _ = assert_group_keeps_function(model, ids, targets, _cross_entropy, seed=1)
    assert moved > 0


class GrownGrid(nn.Module):
    """Tokens padded by two at the end (new positions, new keys), a Linear, and learned positions of the
    padded length: every position of the padded grid is its own component."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.lin = nn.Linear(3, 4), nn.Linear(4, 4)
        self.positions = nn.Parameter(torch.randn(6, 4) / 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.pad(torch.tanh(self.embed(x)), (0, 0, 0, 2), value=0.5)
        return self.head(torch.tanh(self.lin(h) + self.positions)).mean(1)


def test_a_grid_grown_by_a_pad_gets_new_components_for_its_new_positions():
    torch.manual_seed(1)
    model = GrownGrid().to(DTYPE)
    inputs, targets = torch.randn(2, 4, 3, dtype=DTYPE), torch.tensor([1, 0])
    graph = assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    assert graph.num_components == 2 * (6 + 1)  # (+ 1: the mean over the tokens)
    assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=2)
