"""Packed sequences (``torch.nn.utils.rnn.pack_padded_sequence``) are refused naming the packing, with a
remedy that gives the same per-sample gradients.

Before, a packed LSTM was refused at the op the trace stopped at, with a reason about that op
("Tensor.index_select: values whose features ... sit at different positions", or "torch._pack_padded_sequence:
gradgraph has no rule for this op"), which says nothing a user of packing can act on. Both refusal tests fail on
the code before (the message).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError

DTYPE = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class PackedClassifier(nn.Module):
    def __init__(self, enforce_sorted: bool) -> None:
        super().__init__()
        self.enforce_sorted = enforce_sorted
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=self.enforce_sorted)
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1])


class PaddedClassifier(nn.Module):
    """The remedy: the padded batch through the RNN, each sequence's output at its last step."""

    def __init__(self, packed: PackedClassifier) -> None:
        super().__init__()
        self.rnn, self.head = packed.rnn, packed.head

    def forward(self, x, lengths):
        output, _ = self.rnn(x)
        return self.head(output[torch.arange(x.shape[0]), lengths - 1])


@pytest.mark.parametrize("enforce_sorted, lengths", [(True, [5, 5, 4, 3]), (False, [5, 3, 4, 5])])
def test_packed_sequences_are_refused_naming_the_packing_and_the_remedy(enforce_sorted, lengths):
    torch.manual_seed(0)
    model = PackedClassifier(enforce_sorted).to(DTYPE)
    x, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedOperationError, match=r"inside torch\.nn\.utils\.rnn\.pack_padded_sequence: packed "
                                                        r"sequences are not supported.*output\[torch\.arange\(b\), "
                                                        r"lengths - 1\]"):
        gradgraph.to_graph(model, x, y, _cross_entropy, forward_kwargs={"lengths": torch.tensor(lengths)})


def test_the_remedy_has_the_packed_models_per_sample_gradients():
    """The padded model's graph against the *packed* model run on each datapoint alone (autograd)."""
    torch.manual_seed(1)
    packed = PackedClassifier(enforce_sorted=False).to(DTYPE)
    x, y, lengths = torch.randn(4, 5, 3, dtype=DTYPE), torch.randint(0, 3, (4,)), torch.tensor([5, 2, 4, 3])
    graph = gradgraph.to_graph(PaddedClassifier(packed), x, y, _cross_entropy, forward_kwargs={"lengths": lengths})
    per_sample = graph.per_sample_grads()
    params = dict(packed.named_parameters())
    assert set(per_sample) == set(params)
    for i in range(4):
        loss = _cross_entropy(packed(x[i:i + 1], lengths[i:i + 1]), y[i:i + 1]).sum()
        for (name, _), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(per_sample[name][i], grad, atol=1e-10, rtol=0, msg=f"{name}, datapoint {i}")
