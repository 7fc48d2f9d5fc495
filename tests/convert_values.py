"""Helpers of the per-function value tests of ``convert/`` (``tests/convert/test_convert_*_values.py``):
a model's output as its own loss, its conversion checked exact, a refusal matched in full, and the models
that more than one rule's tests read (the affine rule's and ``spread_positions``' refusals)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function


def squared(output: torch.Tensor, _targets) -> torch.Tensor:
    """``[b]``: the squared norm of each datapoint's output (output mode without a target)."""
    return output.pow(2).flatten(1).sum(1)


def exact(model, inputs, **options):
    """Convert afresh (no cached plan) and check every per-sample gradient against torch.func; the graph."""
    gradgraph.convert.clear_structure_cache()
    return assert_exact_per_sample_grads(model, inputs, None, squared, **options)


def refused(model, inputs, message, **options):
    """``to_graph`` refuses with exactly ``message`` after the location (``file:line in function``)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + re.escape(message) + "$"):
        gradgraph.to_graph(model, inputs, None, squared, **options)


class HalfErfinv(torch.autograd.Function):
    """``erfinv(x / 2)`` with its derivative by hand: torch runs the forward without gradient (its ``erfinv`` has no
    rule in the trace, so its value is opaque) and then gives the tensor it returns a ``grad_fn`` (the no_grad cut's
    tests: ``test_convert_safety.py``, ``test_convert_no_grad_cuts.py``)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.erfinv(x / 2)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * math.sqrt(math.pi) / 4 * torch.exp(y**2)


class TokenMixing(nn.Module):
    """A Linear over the token axis of ``[b, 4, 2]`` values: each row of the transposed ``[b, 2, 4]``
    holds one neuron four times (the components do not differ along it: only the rows do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.out = nn.Linear(3, 2), nn.Linear(4, 4), nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(self.mix(h.transpose(1, 2)).transpose(1, 2)).sum(1)


class UnboundPositions(nn.Module):
    """A position table over ``arange`` read by an affine map before it joins any token value."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.proj, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.proj(self.positions(torch.arange(ids.shape[1]))))).sum(1)


class TwiceFlattened(nn.Module):
    """``m.repeat(1, 2, 1, 1).flatten(1)`` read by a Linear: each channel at each position twice. (``cat([m, m], 1)``
    converts since session 19: its second part is a tied copy, tests/convert/test_convert_repeated_parts.py.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(2 * 3 * 16, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        return self.head(m.repeat(1, 2, 1, 1).flatten(1))


def assert_crelu_copy_factors(graph, h: torch.Tensor, joined: torch.Tensor, first: int) -> None:
    """CReLU's ``joined = cat([relu(h), relu(-h)], -1)`` after a backward pass (``h.grad`` and ``joined.grad``
    kept): ``h``'s neurons (nodes ``first ...``, each the source of one MERGE edge) hold ``relu(h)`` as act and
    ``dL/dh`` as grad; the copies ``relu(-h)`` and ``dL/d relu(-h)``, per datapoint."""
    width = h.shape[-1]
    merge = graph.edge_kind == gradgraph.EdgeKind.MERGE
    sources, copies = graph.edge_index[:, merge]
    order = torch.argsort(sources)
    sources, copies = sources[order], copies[order]
    assert sources.tolist() == list(range(first, first + width))
    torch.testing.assert_close(graph.act[sources], torch.relu(h).detach().T, atol=1e-12, rtol=0)
    torch.testing.assert_close(graph.grad[sources], h.grad.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(graph.act[copies], torch.relu(-h).detach().T, atol=1e-12, rtol=0)
    torch.testing.assert_close(graph.grad[copies], joined.grad[:, width:].T, atol=1e-12, rtol=0)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[b]``: each datapoint's cross-entropy."""
    return F.cross_entropy(output, target, reduction="none")


def convert_exactly(model, inputs, targets, seeds=range(2)):
    """The graph (exact against torch.func, converted afresh) and the most nodes a sampled group element moved."""
    gradgraph.convert.clear_structure_cache()
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    moved = max(assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=seed)[0] for seed in seeds)
    return graph, moved


def batch(*shape, seed=0, classes=3):
    """Float64 inputs of ``shape`` and ``shape[0]`` class targets below ``classes``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, dtype=torch.float64, generator=generator),
            torch.randint(0, classes, (shape[0],), generator=generator))


class IndexedLoop(nn.Module):
    """A loop of ``gradgraph.recurrent_step`` over ``x [b, T, 3]`` from a zero state ``[b, 4]`` with the step's
    index in ``self.t``, so a step may differ from the others (subclasses define ``step`` and ``head``, which
    reads the last state)."""

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        for t in range(x.shape[1]):
            self.t = t
            h = gradgraph.recurrent_step(self.step, h, x[:, t])
        return self.head(h)


class LearnedInitialState(nn.Module):
    """An Elman loop through ``recurrent_step`` at the model's root whose initial state is a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.input_map, self.recurrent_map, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.h0 = nn.Parameter(torch.randn(4))

    def step(self, h, x_t):
        return torch.tanh(self.input_map(x_t) + self.recurrent_map(h))

    def forward(self, x):
        h = self.h0.expand(x.shape[0], -1)
        for t in range(x.shape[1]):
            h = gradgraph.recurrent_step(self.step, h, x[:, t])
        return self.head(h)
