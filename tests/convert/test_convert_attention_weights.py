"""``nn.MultiheadAttention``'s attention weights (``need_weights=True``, its default) under the trace.

The trace runs the module as its own functional form, which returned ``None`` for the weights: a model
that read them failed inside its own forward (``'NoneType' object has no attribute 'mean'``), and one that
branched on ``weights is not None`` would have been converted as another function than the one it
computes. The weights are now returned as the module returns them (averaged over the heads or not); read
into the output, the per-sample gradients are exact (autograd carries their gradient to the queries' and
keys' neurons); fed to a parameterised op, the conversion is refused. Each test failed before (the
AttributeError).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import assert_group_keeps_function

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE
from gradgraph.errors import GradGraphError, UnsupportedModuleError

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


class ReadsWeights(nn.Module):
    """Attention whose weights reach the logits: ``read="add"`` adds the first query's weights on the
    first three keys, ``read="linear"`` feeds the flattened weights to a ``Linear``."""

    def __init__(self, average: bool, read: str) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head, self.weights_head = nn.Linear(8, 3), nn.Linear(2 * 5 * 5 if not average else 5 * 5, 3)
        self.average, self.read = average, read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attention(x, x, x, average_attn_weights=self.average)
        logits = self.head(torch.tanh(out).mean(1))
        if self.read == "linear":
            return logits + self.weights_head(weights.flatten(1))
        first = weights[:, 0, :3] if self.average else weights[:, 1, 0, :3]
        return logits + 2.0 * first


def per_datapoint(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(class_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), list(params.values()),
                                allow_unused=True) for i in range(inputs.shape[0])]
    return {name: torch.stack([row[j] if row[j] is not None else torch.zeros_like(params[name]) for row in rows])
            for j, name in enumerate(params)}


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_read_into_the_output_convert_exactly(average):
    torch.manual_seed(1)
    model = ReadsWeights(average, "add").to(DTYPE).eval()
    targets = torch.randint(0, 3, (4,))
    gradgraph.convert.clear_structure_cache()
    for call in range(2):  # a trace, then the cached plan's replay
        misses = PLAN_CACHE.misses
        inputs = torch.randn(4, 5, 8, dtype=DTYPE)
        per_sample = gradgraph.to_graph(model, inputs, targets, class_loss).per_sample_grads()
        reference = per_datapoint(model, inputs, targets)
        for name, value in reference.items():
            if name.startswith("weights_head"):
                assert name not in per_sample or not bool(per_sample[name].any())
                continue
            torch.testing.assert_close(per_sample[name], value, atol=1e-10, rtol=0, msg=name)
    assert PLAN_CACHE.misses == misses
    model.weights_head = None  # not part of this function
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=2)
    assert moved > 0


def test_attention_weights_fed_to_a_parameterised_op_are_refused():
    torch.manual_seed(2)
    model = ReadsWeights(True, "linear").to(DTYPE).eval()
    with pytest.raises((UnsupportedModuleError, GradGraphError),
                       match=r"module 'weights_head' of type Linear\): torch\.nn\.functional\.linear: its input is "
                             r"not computed from the model input by ops gradgraph follows"):
        gradgraph.to_graph(model, torch.randn(4, 5, 8, dtype=DTYPE), torch.randint(0, 3, (4,)), class_loss)
