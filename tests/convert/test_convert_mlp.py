"""MLP conversion: exact per-sample gradients, parameter maps and error paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_mlp, mlp_specs
from traced_models import assert_exact_per_sample_grads
from torch import nn
from torch.func import functional_call, grad, vmap

import gradgraph
from gradgraph import ActivationKind, EdgeKind, GradGraphError, NodeKind, UnsupportedModuleError
from gradgraph.errors import NonFiniteFactorError


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).sum(dim=1)


def reference_per_sample_grads(model, inputs, targets, loss_fn):
    """torch.func per-sample gradients: the ground truth we compare against."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(p, x, y):
        output = functional_call(model, p, (x[None],))
        if loss_fn is None:
            return output.reshape(())
        return loss_fn(output, y[None])[0]

    if targets is None:
        return vmap(grad(lambda p, x: one(p, x, None)), in_dims=(None, 0))(params, inputs)
    return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)


@settings(max_examples=40, deadline=None)
@given(spec=mlp_specs(), batch=st.integers(1, 9), output_mode=st.booleans())
def test_per_sample_grads_match_torch_func(spec, batch, output_mode):
    widths, activations, biases, seed = spec
    if output_mode:
        widths = widths[:-1] + [1]
    model = build_mlp(widths, activations, biases, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = None if output_mode else torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)
    loss_fn = None if output_mode else squared_error

    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=loss_fn)
    reference = reference_per_sample_grads(model, inputs, targets, loss_fn)
    from_graph = graph.per_sample_grads()

    assert set(from_graph) == {name for name, _ in model.named_parameters()}
    for name, expected in reference.items():
        assert from_graph[name].shape == expected.shape
        torch.testing.assert_close(from_graph[name], expected, atol=1e-10, rtol=0)
    assert graph.num_components == batch
    assert graph.edge_components().shape == (graph.edge_index.shape[1], batch, 2)


@settings(max_examples=20, deadline=None)
@given(spec=mlp_specs(max_depth=4, max_width=12), batch=st.integers(1, 6))
def test_mean_grad_equals_autograd_on_mean_loss(spec, batch):
    widths, activations, biases, seed = spec
    model = build_mlp(widths, activations, biases, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(batch, widths[-1], generator=generator, dtype=torch.float64)

    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)
    model.zero_grad()
    squared_error(model(inputs), targets).mean().backward()
    mean = graph.mean_grad()
    for name, param in model.named_parameters():
        torch.testing.assert_close(mean[name], param.grad, atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(spec=mlp_specs(max_depth=4, max_width=12), channels=st.integers(1, 3))
def test_to_parameters_round_trips_every_parameter(spec, channels):
    widths, activations, biases, seed = spec
    model = build_mlp(widths, activations, biases, seed=seed)
    graph = gradgraph.to_graph(model, torch.randn(2, widths[0], dtype=torch.float64), loss_fn=None) if widths[
        -1
    ] == 1 else gradgraph.to_graph(
        model, torch.randn(2, widths[0], dtype=torch.float64), torch.zeros(2, widths[-1], dtype=torch.float64),
        loss_fn=squared_error,
    )
    params = graph.to_parameters(graph.weight, graph.bias)
    for name, param in model.named_parameters():
        assert torch.equal(params[name], param.detach())
    # A trailing channel dimension follows the parameter's shape.
    edge_values = torch.randn(graph.edge_index.shape[1], channels, dtype=torch.float64)
    node_values = torch.randn(graph.num_nodes, channels, dtype=torch.float64)
    stacked = graph.to_parameters(edge_values, node_values)
    for name, param in model.named_parameters():
        assert stacked[name].shape == (*param.shape, channels)
    weight_name = graph.param_names[int(graph.edge_param[0])]
    position = int(graph.edge_param_pos[0])
    assert torch.equal(stacked[weight_name].reshape(-1, channels)[position], edge_values[0])
    # Without node values, bias parameters are left out.
    only_weights = graph.to_parameters(graph.weight)
    assert set(only_weights) == {name for name, p in model.named_parameters() if name.endswith("weight")}


def test_graph_fields_of_a_known_architecture():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False), nn.Tanh()).double()
    graph = gradgraph.to_graph(model, torch.randn(5, 3, dtype=torch.float64), loss_fn=lambda out, _: out.sum(1))
    assert graph.num_nodes == 3 + 4 + 2
    assert graph.edge_index.shape == (2, 3 * 4 + 4 * 2)
    assert graph.act.shape == graph.grad.shape == (9, 5)
    assert graph.node_kind.tolist() == [NodeKind.INPUT] * 3 + [NodeKind.HIDDEN] * 4 + [NodeKind.OUTPUT] * 2
    assert graph.layer.tolist() == [0] * 3 + [1] * 4 + [2] * 2
    assert graph.activation.tolist() == [ActivationKind.IDENTITY] * 3 + [ActivationKind.RELU] * 4 + [
        ActivationKind.TANH
    ] * 2
    assert graph.perm_group.tolist() == [-1] * 3 + [0] * 4 + [-1] * 2
    assert torch.all(graph.edge_kind == EdgeKind.LINEAR)
    # x = [bias], edge_attr = [weight]; the bias-free last layer has zeros and no parameter slot.
    assert graph.x.shape == (9, 1) and graph.edge_attr.shape == (20, 1)
    assert torch.equal(graph.x[3:7, 0], model[0].bias.detach())
    assert torch.all(graph.x[:3, 0] == 0) and torch.all(graph.node_param[:3] == -1)
    assert torch.all(graph.x[7:, 0] == 0) and torch.all(graph.node_param[7:] == -1)
    assert torch.equal(graph.edge_attr[:12, 0], model[0].weight.detach().reshape(-1))
    assert torch.equal(graph.edge_attr[12:, 0], model[2].weight.detach().reshape(-1))
    # edge order follows the row-major weight layout: edge e of layer 0 is W[e // 3, e % 3]
    src, dst = graph.edge_index[:, :12]
    assert torch.equal(dst - 3, torch.arange(12) // 3) and torch.equal(src, torch.arange(12) % 3)
    assert torch.equal(graph.weight[:12], model[0].weight.detach().reshape(-1))
    # act of hidden neurons is what they emit (post-activation), act of outputs is the output
    inputs = graph.act[:3].T
    torch.testing.assert_close(graph.act[3:7].T, torch.relu(model[0](inputs)))
    torch.testing.assert_close(graph.act[7:].T, model(inputs))


def test_custom_module_with_functional_activations_is_traced():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(2, 6)
            self.body = nn.Sequential(nn.Linear(6, 5), nn.Sequential(nn.SiLU(), nn.Linear(5, 1)))

        def forward(self, x):
            return self.body(torch.tanh(self.inp(x)))

    model = Net().double()
    inputs = torch.randn(4, 2, dtype=torch.float64)
    graph = gradgraph.to_graph(model, inputs)
    reference = reference_per_sample_grads(model, inputs, None, None)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-12, rtol=0)
    assert graph.param_names == ["inp.weight", "inp.bias", "body.0.weight", "body.0.bias", "body.1.1.weight",
                                 "body.1.1.bias"]
    assert graph.activation[2:8].eq(ActivationKind.TANH).all() and graph.activation[8:13].eq(ActivationKind.SILU).all()


def test_capture_leaves_parameter_grads_untouched():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    gradgraph.to_graph(model, torch.randn(4, 3, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return self.b(x + self.a(x))


class SharedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(torch.relu(self.a(x))).sum(1)


@pytest.mark.parametrize(
    ("model", "path", "type_name"),
    [
        # (a Conv1d of the input unflattened to one channel converts since 2026-12-07:
        # tests/convert/test_convert_conv_unsqueezed.py)
        (nn.Sequential(nn.Unflatten(1, (1, 4)), nn.ConvTranspose1d(1, 1, 2)), "1", "ConvTranspose1d"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1)), "1", "Dropout"),
    ],
)
def test_unsupported_modules_name_path_and_type(model, path, type_name):
    with pytest.raises(UnsupportedModuleError) as info:
        gradgraph.to_graph(model.double(), torch.randn(2, 4, dtype=torch.float64))
    assert info.value.path == path
    assert info.value.module_type == type_name
    assert f"'{path}'" in str(info.value) and type_name in str(info.value)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 1)),
        nn.Sequential(nn.ReLU(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 1)),
    ],
)
def test_chains_the_mlp_fast_path_refused_convert_through_the_trace(model):
    # once refused by the chain reader; the traced converter reads them exactly
    model = model.double()
    assert_exact_per_sample_grads(model, torch.randn(3, 4, dtype=torch.float64), None, None)


def test_skip_connection_and_shared_weights_convert_exactly():
    assert_exact_per_sample_grads(SkipNet().double(), torch.randn(3, 3, dtype=torch.float64), None, None)
    graph = assert_exact_per_sample_grads(SharedNet().double(), torch.randn(3, 3, dtype=torch.float64), None, None)
    # the shared Linear appears twice; per_sample_grads summed both uses
    assert int((graph.edge_param == graph.param_names.index("a.weight")).sum()) == 2 * 9


def test_dropout_in_eval_mode_is_accepted():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().eval()
    graph = gradgraph.to_graph(model, torch.randn(3, 4, dtype=torch.float64))
    assert graph.num_nodes == 9


def test_bad_inputs_and_losses_raise_clear_errors():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with pytest.raises(GradGraphError, match=r"shape \[b, 3\].*'0'.*got \[4, 5\]"):
        gradgraph.to_graph(model, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(GradGraphError, match="got \\[4\\]"):
        gradgraph.to_graph(model, torch.randn(4, dtype=torch.float64))
    with pytest.raises(GradGraphError, match="dtype"):
        gradgraph.to_graph(model, torch.randn(4, 3))
    with pytest.raises(GradGraphError, match="one scalar output per datapoint"):
        gradgraph.to_graph(model, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(GradGraphError, match=r"one unreduced loss per datapoint, shape \[4\]; got \[\]"):
        gradgraph.to_graph(
            model,
            torch.randn(4, 3, dtype=torch.float64),
            torch.randn(4, 2, dtype=torch.float64),
            loss_fn=nn.MSELoss(),
        )
    with pytest.raises(GradGraphError, match="targets were given but no loss_fn"):
        gradgraph.to_graph(model, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Module"):
        gradgraph.to_graph("not a model", torch.randn(4, 3))


def test_non_finite_factors_are_reported():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    inputs = torch.randn(4, 3, dtype=torch.float64)
    inputs[1, 2] = float("nan")
    with pytest.raises(NonFiniteFactorError, match="input neurons"):
        gradgraph.to_graph(model, inputs)
    with torch.no_grad():
        model[0].weight.fill_(1e308)
    with pytest.raises(NonFiniteFactorError, match="'0' output"):
        gradgraph.to_graph(model, torch.ones(4, 3, dtype=torch.float64))


def test_forward_kwargs_reach_the_model():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, scale: float = 1.0):
            return self.lin(x)

    model = Scaled().double()
    graph = gradgraph.to_graph(model, torch.randn(3, 2, dtype=torch.float64), forward_kwargs={"scale": 2.0})
    assert graph.num_nodes == 3


def test_user_converter_takes_precedence():
    class Custom(nn.Module):
        def forward(self, x):
            return x.sum(1)

    calls = []

    def convert_custom(model, inputs, *, targets, loss_fn, forward_kwargs):
        calls.append(type(model).__name__)
        return gradgraph.to_graph(nn.Sequential(nn.Linear(inputs.shape[1], 1)).double(), inputs)

    from gradgraph.convert import registry

    before = list(registry._REGISTRY)
    try:
        gradgraph.register_converter(Custom, convert_custom)
        assert gradgraph.registered_converters()[0] == "convert_custom"
        graph = gradgraph.to_graph(Custom(), torch.randn(2, 3, dtype=torch.float64))
        assert calls == ["Custom"] and graph.num_nodes == 4
    finally:
        registry._REGISTRY[:] = before
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        gradgraph.register_converter(int, convert_custom)
