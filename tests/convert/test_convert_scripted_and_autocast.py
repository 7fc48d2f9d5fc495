"""TorchScript modules and conversions under ``torch.autocast`` are refused by name, with the remedy.

Found trying the library as a new user would: a ``torch.jit.script`` / ``torch.jit.trace`` model crashed inside
the converter (``AttributeError: '_CachedForward' object has no attribute '__getattr__'``, from the plain-chain
check), a scripted submodule was refused as "ops gradgraph did not follow (a custom autograd.Function, ...)",
and a conversion under ``torch.autocast('cpu', dtype=torch.bfloat16)`` was refused as "a value computed from
this parameter reaches the loss through an op whose gradgraph rule reads it as a constant" — each a wrong
reason. Each refusal test fails on the code before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.errors import GradGraphError, UnsupportedModuleError

from traced_models import assert_exact_per_sample_grads

DTYPE = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(DTYPE)


def _batch():
    return torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("script", [torch.jit.script, lambda module: torch.jit.trace(module, torch.randn(2, 5,
                                                                                                     dtype=DTYPE))],
                         ids=["script", "trace"])
def test_a_torchscript_model_is_refused_naming_torchscript(script):
    x, y = _batch()
    with pytest.raises(UnsupportedModuleError, match=r"root module .* TorchScript module .* Convert the Python module"):
        gradgraph.to_graph(script(_mlp()), x, y, _cross_entropy)


class WithScriptedPart(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.first, self.inner, self.head = nn.Linear(5, 4).to(DTYPE), inner, nn.Linear(4, 3).to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.head(h + self.inner(h))


def test_a_scripted_submodule_is_refused_by_its_path_and_the_python_module_converts():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).to(DTYPE)
    x, y = _batch()
    with pytest.raises(UnsupportedModuleError, match=r"'inner' of type RecursiveScriptModule: it is a TorchScript"):
        gradgraph.to_graph(WithScriptedPart(torch.jit.script(inner)), x, y, _cross_entropy)
    assert_exact_per_sample_grads(WithScriptedPart(inner), x, y, _cross_entropy)  # the remedy


def test_a_conversion_under_autocast_is_refused_and_converts_with_autocast_off():
    torch.manual_seed(1)
    model, (x, y) = _mlp(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(GradGraphError, match=r"to_graph was called under torch.autocast\('cpu', "
                                                 r"dtype=torch.bfloat16\).*enabled=False"):
            gradgraph.to_graph(model.float(), x.float(), y, _cross_entropy)
        with pytest.raises(GradGraphError, match=r"convert_closure was called under torch.autocast"):
            gradgraph.convert_closure(model, lambda: _cross_entropy(model(x.float()), y))
        with torch.autocast("cpu", enabled=False):  # the remedy: the full-precision model's graph, exact
            assert_exact_per_sample_grads(model.double(), x, y, _cross_entropy)


def test_autocast_inside_the_closure_is_refused_too():
    model, (x, y) = _mlp().float(), _batch()

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x.float())
        return _cross_entropy(output.float(), y)

    with pytest.raises(GradGraphError, match=r"convert_closure was called under torch.autocast"):
        gradgraph.convert_closure(model, closure)
