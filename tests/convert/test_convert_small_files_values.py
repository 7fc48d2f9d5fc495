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
    """The graph's per-sample gradients equal autograd's on each datapoint alone (a loop), float64 at 1e-10."""
    ours = graph.per_sample_grads()
    params = dict(model.named_parameters())
    assert set(ours) == set(params)
    for i in range(inputs.shape[0]):
        target = None if targets is None else targets[i:i + 1]
        expected = torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), target).sum(), list(params.values()))
        for (name, _), value in zip(params.items(), expected):
            torch.testing.assert_close(ours[name][i], value, rtol=0, atol=1e-10, msg=name)


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



# ----------------------------------------------------------------------------------------------------- mlp.py
from gradgraph.convert import mlp_layers  # noqa: E402
from gradgraph.graph import ActivationKind  # noqa: E402,F401
from gradgraph.symmetry.permutation import permute_hidden, random_hidden_perms  # noqa: E402


class _Three(nn.Module):
    def __init__(self, middle_bias=True, middle_out=4):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, middle_out, bias=middle_bias), nn.Linear(middle_out, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def _mlp_refused(model, path, module_type, reason):
    where = f"'{path}'" if path else "the root module"
    with pytest.raises(UnsupportedModuleError, match=f"^{re.escape(f'unsupported module at {where} of type ')}"
                                                     f"{re.escape(f'{module_type}: {reason}')}$") as refusal:
        mlp_layers(model)
    assert refusal.value.path == path and refusal.value.module_type == module_type


def test_mlp_layers_refuses_a_linears_weight_read_in_another_order():
    """A forward that reads an ``nn.Linear``'s weight transposed, flipped or in part (``F.linear(h, W.flip(0))``) is
    no chain of that ``Linear``: its edges are not the weight's row-major entries, and a hidden permutation of the
    layers read from it changes the function (the symmetry actions' silent wrong answer). Failed before the fix
    (``mlp_layers`` read each as layer ``b``)."""

    class Transposed(_Three):
        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x)), self.b.weight.t(), self.b.bias)))

    class Flipped(_Three):
        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x)), self.b.weight.flip(0), self.b.bias)))

    class Part(_Three):
        def __init__(self):
            super().__init__(middle_bias=False, middle_out=5)

        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x))[:, :3], self.b.weight[:, :3])))

    for build in (Transposed, Flipped):
        torch.manual_seed(6)
        model = build().to(DTYPE)
        inputs = torch.randn(6, 3, dtype=DTYPE)
        permuted = _Three().to(DTYPE)
        permuted.load_state_dict(model.state_dict())
        permuted = permute_hidden(permuted, random_hidden_perms(permuted, torch.Generator().manual_seed(2)))
        moved = build().to(DTYPE)
        moved.load_state_dict(permuted.state_dict())
        assert (moved(inputs) - model(inputs)).abs().max() > 1e-3  # what the action would do to this model
        _mlp_refused(model, "b", "Linear", "its weight is not read as nn.Linear reads it (row-major, each entry once, "
                                          "in_features inputs to out_features outputs): transposed, reordered or in "
                                          "part")
    with pytest.raises(UnsupportedModuleError):
        mlp_layers(Part().to(DTYPE))
