"""Several rows of one datapoint: a video's frames run through a CNN as ``[b * T, C, H, W]``, tokens pooled
in pairs. Each row must keep components of its own.

Before: a convolution of ``x.reshape(b * T, C, H, W)`` was refused ("a convolution whose input's first
axis is not the datapoints"), and a pooling over positions gave all rows of a datapoint one component,
so ``h.view(b, T // 2, 2, d).mean(2)`` then a ``Linear`` was refused ("copies values of one position over
a new axis"). A convolution of a merged batch axis now reads the channels on axis 1 and gives every
(row, position) of a datapoint its own component (``rules_conv.channel_input`` / ``position_comps``), and
a pooling that leaves several rows of a datapoint gives each row a key (``reduction``). Each test failed
before; each is exact against a per-datapoint autograd loop with a true group.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def assert_exact(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> gradgraph.GradGraph:
    return assert_matches_autograd_loop(model, inputs, targets, class_loss)


class FrameCNN(nn.Module):
    """A CNN on every frame of ``[b, T, C, H, W]`` (``reshape(b * T, ...)``), pooled over each frame's
    positions, then over time: a mean, a GRU, a ``Linear`` per frame, or one ``Linear`` of all frames."""

    def __init__(self, temporal: str, frames: int = 4) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2)
        self.gru = nn.GRU(6, 5, batch_first=True) if temporal == "gru" else None
        width = {"mean": 6, "gru": 5, "per_frame": 6, "all_frames": 6 * frames}[temporal]
        self.head = nn.Linear(width, 3)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        h = F.relu(self.conv2(F.relu(self.conv1(video.reshape(b * t, *video.shape[2:])))))
        h = h.mean((2, 3)).view(b, t, -1)
        if self.temporal == "mean":
            return self.head(h.mean(1))
        if self.temporal == "gru":
            return self.head(self.gru(h)[0][:, -1])
        if self.temporal == "per_frame":
            return self.head(torch.tanh(h)).mean(1)
        return self.head(h.reshape(b, -1))


@pytest.mark.parametrize("temporal", ["mean", "gru", "per_frame", "all_frames"])
def test_a_cnn_on_every_frame_of_a_video(temporal):
    torch.manual_seed(11)
    model = FrameCNN(temporal).to(DTYPE)
    targets = torch.randint(0, 3, (3,))
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):  # a trace, then the cached plan's replay
        misses = PLAN_CACHE.misses
        videos = torch.randn(3, 4, 3, 6, 6, dtype=DTYPE)
        assert_exact(model, videos, targets)
    assert PLAN_CACHE.misses == misses
    for seed in range(2):
        moved, _, _ = assert_group_keeps_function(model, videos, targets, class_loss, seed=seed)
        assert moved > 0


class PairPooling(nn.Module):
    """Tokens ``[b, T, d]`` pooled in pairs (Funnel's and patch merging's downsampling), then a ``Linear``."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.pool = pool

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(tokens))
        pairs = h.view(h.shape[0], h.shape[1] // 2, 2, h.shape[2])
        h = {"mean": pairs.mean(2), "sum": pairs.sum(2), "max": pairs.amax(2)}[self.pool]
        return self.head(torch.tanh(self.second(h)).mean(1))


@pytest.mark.parametrize("pool", ["mean", "sum", "max"])
def test_tokens_pooled_in_pairs_then_read_by_a_linear_map(pool):
    torch.manual_seed(12)
    model = PairPooling(pool).to(DTYPE)
    tokens, targets = torch.randn(3, 6, 5, dtype=DTYPE), torch.randint(0, 3, (3,))
    graph = assert_exact(model, tokens, targets)
    assert graph.act.shape[1] >= 3 * (6 + 3)  # the pooled tokens have components of their own
    moved, _, _ = assert_group_keeps_function(model, tokens, targets, class_loss, seed=1)
    assert moved > 0
