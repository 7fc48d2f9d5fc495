"""``nn.Embedding(sparse=True)`` (large vocabularies, recommendation models): autograd's gradient of its
table is a sparse tensor, and the first conversion's check of the summed gradient called ``.abs().max()``
on it: ``NotImplementedError: Could not run 'aten::max' with arguments from the 'SparseCPU' backend`` out
of ``to_graph``. The check now reads it dense. The test failed before (that error)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_matches_autograd_loop

import gradgraph

DTYPE = torch.float64


class SparseBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.head = nn.Embedding(12, 6, sparse=True), nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.table(ids)).mean(1))


def test_a_sparse_embedding_converts_exactly_trace_and_replay():
    torch.manual_seed(15)
    model = SparseBag().to(DTYPE)
    targets = torch.randint(0, 3, (4,))
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):
        ids = torch.randint(0, 12, (4, 5))
        ids[0, :3] = 7  # a row read three times by one datapoint, and by another
        ids[1, 0] = 7
        assert_matches_autograd_loop(model, ids, targets, lambda out, y: F.cross_entropy(out, y, reduction="none"))
