"""A tiny meta-task shared by the ``MetaTrainer`` value tests (float64: an MLP 3 → 4 → 2, batches of 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.optim import Task

DOUBLE = torch.float64


def tiny_task(validation: bool = False) -> Task:
    """``Task("tiny")``: ``x [5, 3]`` standard normal, class ``x[:, 0] > 0``, cross-entropy per datapoint;
    with ``validation``, held-out batches ``x [7, 3]`` labelled by ``x[:, 1] > 0``."""
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def sample(generator: torch.Generator):
        x = torch.randn(5, 3, generator=generator, dtype=DOUBLE)
        return x, (x[:, 0] > 0).long()

    def held_out(generator: torch.Generator):
        x = torch.randn(7, 3, generator=generator, dtype=DOUBLE)
        return x, (x[:, 1] > 0).long()

    return Task("tiny", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                sample_validation=held_out if validation else None)
