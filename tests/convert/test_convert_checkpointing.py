"""Activation checkpointing (``torch.utils.checkpoint``) inside ``forward``, as large models and
``transformers``' ``gradient_checkpointing_enable()`` use it.

Non-reentrant checkpointing converts exactly, traced and replayed. Reentrant checkpointing cannot be
differentiated by ``torch.autograd.grad`` with respect to values inside it, which is how gradgraph reads
its factors: it is refused with what to do, where ``to_graph`` stopped with torch's RuntimeError before
(the refusal test failed so).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.errors import GradGraphError

DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.middle, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.reentrant = reentrant

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.middle(torch.relu(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, self.first(x), use_reentrant=self.reentrant))


def test_non_reentrant_checkpointing_converts_exactly_traced_and_replayed():
    torch.manual_seed(16)
    model = Checkpointed(reentrant=False).to(DTYPE)
    targets = torch.randint(0, 3, (4,))
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):
        inputs = torch.randn(4, 5, dtype=DTYPE)
        assert_matches_autograd_loop(model, inputs, targets, class_loss)
    assert assert_group_keeps_function(model, inputs, targets, class_loss, seed=1)[0] > 0


def test_reentrant_checkpointing_is_refused_with_what_to_do():
    model = Checkpointed(reentrant=True).to(DTYPE)
    with pytest.raises(GradGraphError, match=r"torch\.utils\.checkpoint\(\.\.\., use_reentrant=True\).*Use "
                                             r"use_reentrant=False \(exact\)"):
        gradgraph.to_graph(model, torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,)), class_loss)
