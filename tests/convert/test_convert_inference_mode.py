"""``to_graph`` and ``convert_closure`` called inside ``torch.inference_mode()``.

``torch.no_grad()`` was always fine (the conversion enables grad for its own backward), but
``torch.enable_grad()`` cannot leave inference mode: a user evaluating a model under
``inference_mode`` got torch's ``element 0 of tensors does not require grad`` from inside the
converter. Both entry points now run outside inference mode; ``to_graph`` copies the tensors made
inside it (an inference tensor cannot be saved for backward), and ``convert_closure``, which cannot
copy what the closure captured, says what to do. Each test failed before (the RuntimeError).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.errors import GradGraphError

DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


class Masked(nn.Module):
    """An MLP whose forward reads a keyword tensor (made in inference mode in the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)) * scale)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = Masked().to(DTYPE)
    inputs, targets = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    scale = torch.rand(4, 7, dtype=DTYPE) + 0.5
    return model, inputs, targets, scale


def test_to_graph_in_inference_mode_equals_the_graph_outside_it(batch):
    model, inputs, targets, scale = batch
    outside = gradgraph.to_graph(model, inputs, targets, class_loss, forward_kwargs={"scale": scale})
    with torch.inference_mode():
        made_inside = (inputs.clone(), targets.clone(), {"scale": scale.clone()})
        assert made_inside[0].is_inference()
        inside = gradgraph.to_graph(model, made_inside[0], made_inside[1], class_loss, forward_kwargs=made_inside[2])
        assert torch.is_inference_mode_enabled()  # the caller's mode is left as it was
    assert not inside.act.is_inference() and not inside.grad.is_inference()
    for name, value in outside.per_sample_grads().items():
        torch.testing.assert_close(inside.per_sample_grads()[name], value, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(inside.loss, outside.loss, atol=0, rtol=0)


def test_convert_closure_in_inference_mode(batch):
    model, inputs, targets, scale = batch
    outside, losses = gradgraph.convert_closure(model, lambda: class_loss(model(inputs, scale), targets))
    with torch.inference_mode():
        inside, inside_losses = gradgraph.convert_closure(model, lambda: class_loss(model(inputs, scale), targets))
        captured = scale.clone()  # an inference tensor the closure multiplies with: it cannot be copied for it
        with pytest.raises(GradGraphError, match=r"convert_closure was called in torch\.inference_mode\(\) and the "
                                                 r"closure uses a tensor made there .*torch\.no_grad\(\) is fine"):
            gradgraph.convert_closure(model, lambda: class_loss(model(inputs, captured), targets))
    torch.testing.assert_close(inside_losses, losses, atol=0, rtol=0)
    for name, value in outside.per_sample_grads().items():
        torch.testing.assert_close(inside.per_sample_grads()[name], value, atol=0, rtol=0, msg=name)
