"""Plain nn.Sequential chains are a case of the traced converter: the chain capture strategy of a
cached plan gives the graph the general trace and the per-op replay give, tensor for tensor, and
is refused wherever calling the leaves would not be the model's computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import ACTIVATIONS, assert_same_graph, cross_entropy
from torch import nn
from traced_models import assert_exact_per_sample_grads

import gradgraph
from gradgraph import UnsupportedModuleError
from gradgraph.convert import chain as chain_module
from gradgraph.convert.plan import PLAN_CACHE, TracePlan

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("empty_plan_cache")


@pytest.fixture
def chain_runs(monkeypatch):
    """Counts the conversions whose tensors the chain capture recorded."""
    calls = []
    run = chain_module.ChainCapture.run

    def counted(self, chain, x):
        calls.append(len(chain))
        return run(self, chain, x)

    monkeypatch.setattr(chain_module.ChainCapture, "run", counted)
    return calls


def only_plan() -> TracePlan:
    assert len(PLAN_CACHE) == 1
    return next(iter(PLAN_CACHE._entries.values()))


def three_ways(model, inputs, targets, loss_fn, monkeypatch, chain_runs):
    """``(traced, captured, replayed)``: the first conversion (a trace), the second (the chain
    capture of the cached plan) and a third with the capture refused (the per-op replay)."""
    traced = gradgraph.to_graph(model, inputs, targets, loss_fn)
    assert only_plan().chain is not None
    captured = gradgraph.to_graph(model, inputs, targets, loss_fn)
    assert len(chain_runs) == 1
    with monkeypatch.context() as patch:
        patch.setattr(chain_module.ChainCapture, "applies", lambda self, chain: False)
        replayed = gradgraph.to_graph(model, inputs, targets, loss_fn)
    assert len(chain_runs) == 1 and PLAN_CACHE.hits == 2 and PLAN_CACHE.misses == 1
    return traced, captured, replayed


@st.composite
def chains(draw):
    """``(model, datapoint shape, b, seed)``: a plain chain with optional Flatten first, dropout (eval),
    biasless layers and a nested Sequential."""
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 7)) for _ in range(depth + 1)]
    flatten = draw(st.booleans())
    shape = (2, widths[0]) if flatten else (widths[0],)
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for index in range(depth):
        d_in = widths[0] * 2 if flatten and index == 0 else widths[index]
        layers.append(nn.Linear(d_in, widths[index + 1], bias=draw(st.booleans())))
        activation = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
        if activation is not None:
            layers.append(activation())
        if draw(st.booleans()):
            layers.append(nn.Dropout(draw(st.sampled_from([0.0, 0.5]))))
    if draw(st.booleans()) and len(layers) > 1:  # nest the tail of the chain
        cut = draw(st.integers(1, len(layers) - 1))
        layers = [*layers[:cut], nn.Sequential(*layers[cut:])]
    return nn.Sequential(*layers), shape, draw(st.integers(1, 5)), draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=chains())
def test_the_chain_capture_gives_the_graph_of_the_trace_and_of_the_replay(spec, monkeypatch, chain_runs):
    model, shape, batch, seed = spec
    PLAN_CACHE.clear()
    chain_runs.clear()
    torch.manual_seed(seed)
    model = model.to(DTYPE).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    inputs = torch.randn(batch, *shape, dtype=DTYPE)
    out_features = [module for module in model.modules() if isinstance(module, nn.Linear)][-1].out_features
    targets = torch.randint(0, out_features, (batch,))
    traced, captured, replayed = three_ways(model, inputs, targets, cross_entropy, monkeypatch, chain_runs)
    assert_same_graph(traced, captured, atol=0)
    assert_same_graph(replayed, captured, atol=0)
    assert traced.edge_index is captured.edge_index  # one plan, one structure


def test_a_chain_converts_exactly_and_keeps_the_mlp_layout(monkeypatch, chain_runs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 4, bias=False),
                          nn.Sequential(nn.Tanh(), nn.Linear(4, 3))).to(DTYPE).eval()
    inputs, targets = torch.randn(7, 2, 3, dtype=DTYPE), torch.randint(0, 3, (7,))
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)  # traced
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)  # chain capture
    assert len(chain_runs) == 1
    assert graph.layer.tolist() == [0] * 6 + [1] * 5 + [2] * 4 + [3] * 3
    assert graph.param_names == ["1.weight", "1.bias", "4.weight", "5.1.weight", "5.1.bias"]
    assert graph.perm_group.tolist() == [-1] * 6 + [0] * 5 + [1] * 4 + [-1] * 3


class TwoLayers(nn.Module):
    """A chain written as a forward with a functional op between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * 2)


def shared_linear() -> nn.Module:
    layer = nn.Linear(4, 4)
    return nn.Sequential(layer, nn.ReLU(), layer, nn.Linear(4, 2))


@pytest.mark.parametrize("build", [
    shared_linear,  # a Linear used twice
    TwoLayers,  # a functional op between layers
    lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)),  # a leaf with a normalised input
    lambda: nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)),  # a leaf type not known to be one op
])
def test_the_chain_capture_is_refused_where_it_would_be_wrong(build, chain_runs):
    torch.manual_seed(0)
    model = build().to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 2, (5,))
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    assert only_plan().chain is None
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)  # the per-op replay
    assert chain_runs == [] and PLAN_CACHE.hits == 1


def test_a_leaf_changed_after_the_plan_was_cached_is_not_captured(chain_runs):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE).eval()
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 2, (5,))
    gradgraph.to_graph(model, inputs, targets, cross_entropy)
    model[1].train()  # active dropout: calling the leaves would silently convert another function
    with pytest.raises(UnsupportedModuleError, match="dropout"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
    model[1].eval()
    handle = model[0].register_forward_hook(lambda module, args, output: output * 2)
    try:
        graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    finally:
        handle.remove()
    assert chain_runs == []
    torch.testing.assert_close(graph.act[4:8].T, torch.relu(2 * model[0](inputs)), rtol=0, atol=0)


def test_a_closure_on_a_chain_is_captured_once_and_gives_the_graph_of_to_graph(chain_runs):
    model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3)).to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    calls = []

    def closure():
        calls.append(1)
        return cross_entropy(model(inputs), targets)

    first, _ = gradgraph.convert_closure(model, closure)
    graph, losses = gradgraph.convert_closure(model, closure)
    assert len(calls) == 2 and len(chain_runs) == 1
    assert_same_graph(graph, first, atol=0)
    assert_same_graph(graph, gradgraph.to_graph(model, inputs, targets, cross_entropy), atol=0)
    torch.testing.assert_close(losses, cross_entropy(model(inputs), targets), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_chain_capture_on_cuda_equals_cpu(chain_runs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    on_cpu = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    model, inputs, targets = model.cuda(), inputs.cuda(), targets.cuda()
    for _ in range(2):  # a trace, then the chain capture of its plan
        on_cuda = gradgraph.to_graph(model, inputs, targets, cross_entropy)
        for key in on_cpu.keys():
            if isinstance(on_cuda[key], torch.Tensor):
                assert on_cuda[key].device.type == "cuda", key
                torch.testing.assert_close(on_cuda[key].cpu(), on_cpu[key], atol=1e-12, rtol=0, msg=key)
    assert len(chain_runs) == 1


@pytest.mark.parametrize("activation", sorted(chain_module.ACTIVATION_MODULES, key=lambda cls: cls.__name__))
def test_every_chain_activation_keeps_its_mlp_label(activation, chain_runs):
    # the MLP layout labels a hidden layer by its activation module (SIREN's Sine is SINE, whose
    # oddness the sign-flip symmetry needs), on the trace and on the chain capture alike
    model = nn.Sequential(nn.Linear(3, 4), activation(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    for _ in range(2):
        graph = gradgraph.to_graph(model, inputs, loss_fn=lambda output, _: output.pow(2).sum(1))
        assert graph.activation[3:7].tolist() == [int(chain_module.ACTIVATION_MODULES[activation])] * 4
        assert graph.activation[:3].eq(0).all() and graph.activation[7:].eq(0).all()
    assert len(chain_runs) == 1
