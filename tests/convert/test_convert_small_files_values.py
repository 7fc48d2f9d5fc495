"""The small files of convert/ written out (issue 31, runs small 1-n of group ``convert-small``).

``registry.py`` (``register_converter``, ``registered_converters``, ``to_graph`` / ``convert_closure``'s checks and
dispatch), ``attention.py`` (``transformer_structure``), ``mlp.py`` (``mlp_layers``), ``trace/result.py``
(``TraceResult``), ``deprecated.py`` (the aliases). Each test checks against an independent ground truth: a
registered converter's graph against per-sample gradients by ``torch.func`` in float64, ``mlp_layers`` against the
model's own layers, a deprecated alias's graph tensor for tensor against ``to_graph``'s, a refusal's message in full
(what and where). The docstrings name the mutants each kills (checked with ``MUTANT_UNDER_TEST`` in
``.mutation/convert-small/mutants/``).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import gradgraph
from gradgraph import GradGraphError, UnsupportedModuleError
from gradgraph.convert import registry

DTYPE = torch.float64


@pytest.fixture
def clean_registry():
    """The registry as it was before the test, whatever the test registered."""
    before = list(registry._REGISTRY)
    yield
    registry._REGISTRY[:] = before


def _squared_loss(output, target):
    return output.pow(2).sum(1)


def _assert_per_sample_grads(graph, model, inputs, loss_fn, targets=None):
    """The graph's per-sample gradients equal torch.func's (each datapoint's loss alone), in float64 at 1e-10."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(params, x, y):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y).sum()

    in_dims = (None, 0, None if targets is None else 0)
    expected = vmap(grad(one), in_dims=in_dims)(params, inputs, targets)
    ours = graph.per_sample_grads()
    assert set(ours) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-10, msg=name)


def test_a_predicate_matcher_routes_its_models_to_its_converter_and_the_newest_is_asked_first(clean_registry):
    """A predicate registered with ``register_converter`` (not a type) is asked with the model; the converter it
    routes to gets the batch, the loss and the forward's keywords; the newest registration is asked first and named
    first; a registered converter's graph is the traced one of the same model (per-sample gradients by torch.func)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    seen = []

    def older(model, inputs, *, targets, loss_fn, forward_kwargs):
        raise AssertionError("the older registration must not be asked first")

    def by_predicate(model, inputs, *, targets, loss_fn, forward_kwargs):
        seen.append((targets, loss_fn, dict(forward_kwargs)))
        return registry._FALLBACK[0](model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs)

    gradgraph.register_converter(lambda m: isinstance(m, nn.Sequential), older)
    gradgraph.register_converter(lambda m: isinstance(m, nn.Sequential) and len(m) == 3, by_predicate, name="three")
    names = gradgraph.registered_converters()
    assert names[:2] == ["three", "older"]
    assert names[-1] == registry._FALLBACK[0].__name__
    graph = gradgraph.to_graph(model, inputs, "the targets", _squared_loss)
    assert seen == [("the targets", _squared_loss, {})]
    _assert_per_sample_grads(graph, model, inputs, _squared_loss)
