"""``GradGraph.per_sample_grad_norms`` and ``graph.loss`` against torch.func, in float64.

Each case fails on the bug it guards: ``||g||·||a||`` used for token models (the cross terms of
the Gram matrices dropped) breaks the GPT case; summing the norms of a tied weight's uses
instead of norming their sum breaks the tied-head case; the shuffled-components case reaches
the general Gram path (components not grouped by datapoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.symmetry import permute_components
from traced_models import GPT, assert_per_sample_grad_norms, token_loss


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    return model, torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)), _cross_entropy


def _gpt_case():
    torch.manual_seed(1)
    model = GPT(vocab=11, context=6, d=8, heads=2, layers=1).double().eval()
    return model, torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6)), token_loss


def test_mlp_norms_equal_torch_func():
    model, inputs, targets, loss_fn = _mlp_case()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    assert_per_sample_grad_norms(graph, model, inputs, targets, loss_fn)


def test_token_model_with_tied_head_equals_torch_func():
    """Several components per datapoint (tokens) and a weight used twice (the tied head)."""
    model, inputs, targets, loss_fn = _gpt_case()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    assert graph.num_components == inputs.numel()
    assert_per_sample_grad_norms(graph, model, inputs, targets, loss_fn, atol=1e-10)


def test_cnn_norms_equal_torch_func():
    """A convolution's components are (datapoint, position) pairs: the Gram path, over positions."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    inputs, targets = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    graph = gradgraph.to_graph(model, inputs, targets, _cross_entropy)
    assert graph.num_components > inputs.shape[0]
    assert_per_sample_grad_norms(graph, model, inputs, targets, _cross_entropy)


def test_components_in_any_order():
    model, inputs, targets, loss_fn = _gpt_case()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    generator = torch.Generator().manual_seed(3)
    shuffled = permute_components(graph, torch.randperm(graph.num_components, generator=generator))
    torch.testing.assert_close(shuffled.per_sample_grad_norms(), graph.per_sample_grad_norms(), atol=1e-10, rtol=0)


def test_graph_keeps_the_per_datapoint_losses():
    model, inputs, targets, loss_fn = _mlp_case()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    torch.testing.assert_close(graph.loss, loss_fn(model(inputs), targets), atol=0, rtol=0)
    assert not graph.loss.requires_grad
    closure_graph, losses = gradgraph.convert_closure(model, lambda: loss_fn(model(inputs), targets))
    torch.testing.assert_close(closure_graph.loss, losses, atol=0, rtol=0)
    output_graph = gradgraph.to_graph(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double(), inputs)
    assert output_graph.loss.shape == (inputs.shape[0],)  # output mode: the outputs
