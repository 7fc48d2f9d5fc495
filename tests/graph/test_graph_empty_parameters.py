"""``GradGraph._grads_by_parameter`` with a parameter of no entries (``nn.Linear(4, 0)``), changed
after the mutation runs of ``graph.py`` (#27): such a parameter has no edges, and its gradient is
an empty tensor of its shape, in the graph's dtype, for ``per_sample_grads`` and ``mean_grad``
alike, next to the full gradients of the others. Ground truth: torch.func per-sample gradients in
float64 (1e-10). Run graph 10 (docs/mutation.md): kills ``_grads_by_parameter``'s mutants of that
block (each checked with ``MUTANT_UNDER_TEST=NAME`` in ``.mutation/graph/``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import reference_per_sample_grads

import gradgraph

DTYPE = torch.float64


def cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


class EmptyLayers(nn.Module):
    """Two layers of no outputs (one before, one after a real one) concatenated into a set, and a
    head; ``bias=False`` on one, so the empty parameters are not all alike."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on initialising a zero-element tensor
            self.empty_first, self.real = nn.Linear(4, 0), nn.Linear(4, 3)
            self.empty_last = nn.Linear(4, 0, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.empty_first(x), self.real(x), self.empty_last(x)], -1)))


@pytest.mark.parametrize("batch", [1, 3])
def test_parameters_with_no_entries_get_empty_gradients_of_their_shapes(batch):
    torch.manual_seed(6)
    model = EmptyLayers().to(DTYPE)
    inputs, targets = torch.randn(batch, 4, dtype=DTYPE), torch.randint(0, 2, (batch,))
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    reference = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    per_sample, mean = graph.per_sample_grads(), graph.mean_grad()
    assert set(per_sample) == set(mean) == set(reference) == {name for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        assert per_sample[name].shape == (batch, *parameter.shape), name
        assert mean[name].shape == parameter.shape, name
        assert per_sample[name].dtype == mean[name].dtype == DTYPE, name
        torch.testing.assert_close(per_sample[name], reference[name], atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], reference[name].mean(0), atol=1e-10, rtol=0, msg=name)
    assert per_sample["empty_first.weight"].shape == (batch, 0, 4) and mean["empty_last.weight"].shape == (0, 4)
    assert per_sample["real.weight"].abs().sum() > 0  # the real layer's gradients are not overwritten
