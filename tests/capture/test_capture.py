"""The public ``gradgraph.capture()`` and ``Recorder``: recorded values and gradients against
torch.func's per-sample gradients (float64), in loss mode, output mode and with a functional
``forward`` that records through the ``Recorder``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import gradgraph
from gradgraph import GradGraphError
from gradgraph.capture import Recorder

DTYPE = torch.float64


def mlp(d_out: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, d_out)).to(DTYPE)


def per_sample(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               objective) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """torch.func: ``({name: [b, *param.shape]}, [b, *x.shape])``, the gradient of
    ``objective(model(x_i), target_i)`` of each datapoint alone, by parameters and by input."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(params, x, target):
        return objective(functional_call(model, params, (x[None],))[0], target)

    by_param = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    by_input = vmap(grad(one, argnums=1), in_dims=(None, 0, 0))(params, inputs, targets)
    return by_param, by_input


def test_loss_mode_records_each_datapoints_own_gradient():
    """``g_i`` of the summed loss is each datapoint's own ``dL_i/du``, not scaled by ``1/b``.

    Checked to fail: with ``capture`` differentiating ``objective.mean()`` instead of
    ``objective.sum()`` every recorded gradient is ``1/b`` of torch.func's (b = 5 here).
    """
    model = mlp()
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)

    def loss_fn(output, targets):
        return (output - targets).pow(2).sum(-1)

    recorded = gradgraph.capture(model, inputs, modules=["0", "2"], targets=targets, loss_fn=loss_fn)
    expected, expected_input = per_sample(model, inputs, targets, lambda out, target: (out - target).pow(2).sum())

    for name in ("0", "2"):
        act, signal = recorded.values[f"{name}:input"], recorded.grads[f"{name}:output"]
        torch.testing.assert_close(torch.einsum("bo,bi->boi", signal, act), expected[f"{name}.weight"],
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(signal, expected[f"{name}.bias"], atol=1e-12, rtol=0)
    torch.testing.assert_close(recorded.grads["input"], expected_input, atol=1e-12, rtol=0)
    torch.testing.assert_close(recorded.values["input"], inputs, atol=0, rtol=0)
    with torch.no_grad():
        output = model(inputs)
    torch.testing.assert_close(recorded.output, output, atol=0, rtol=0)
    torch.testing.assert_close(recorded.objective, loss_fn(output, targets), atol=0, rtol=0)
    assert all(p.grad is None for p in model.parameters())  # parameters' .grad left alone


def test_output_mode_records_the_gradient_of_the_output():
    """``loss_fn=None``: ``g_i = d f(x_i) / du`` for a ``[b, 1]`` output, and ``objective`` is
    the output itself. Checked to fail with the summed objective replaced by its mean."""
    model = mlp(d_out=1)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    recorded = gradgraph.capture(model, inputs, modules=["2"])
    expected, expected_input = per_sample(model, inputs, torch.zeros(6), lambda out, _: out[0])
    signal, act = recorded.grads["2:output"], recorded.values["2:input"]
    torch.testing.assert_close(torch.einsum("bo,bi->boi", signal, act), expected["2.weight"], atol=1e-12, rtol=0)
    torch.testing.assert_close(recorded.grads["input"], expected_input, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(recorded.objective, model(inputs)[:, 0], atol=0, rtol=0)


def test_functional_forward_records_through_the_recorder():
    """A ``forward(inputs, recorder)`` that re-implements the model records values and grads
    of the tensors it names; the gradients are torch.func's per-sample ones."""
    model = mlp()
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,))

    def forward(x, recorder: Recorder):
        hidden = recorder.record("pre", F.linear(x, model[0].weight, model[0].bias), grad=True)
        activation = recorder.record("hidden", torch.tanh(hidden))
        return F.linear(activation, model[2].weight, model[2].bias)

    def loss_fn(output, targets):
        return F.cross_entropy(output, targets, reduction="none")

    recorded = gradgraph.capture(model, inputs, targets=targets, loss_fn=loss_fn, forward=forward)
    expected, _ = per_sample(model, inputs, targets,
                             lambda out, target: F.cross_entropy(out[None], target[None]))
    assert set(recorded.grads) == {"input", "pre"}  # only what asked for a gradient
    torch.testing.assert_close(recorded.grads["pre"], expected["0.bias"], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.einsum("bo,bi->boi", recorded.grads["pre"], inputs), expected["0.weight"],
                               atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(recorded.values["hidden"], torch.tanh(model[0](inputs)), atol=0, rtol=0)


def test_recorder_refuses_a_second_record_and_a_gradient_of_a_constant():
    recorder = Recorder()
    x = torch.randn(2, 3, requires_grad=True)
    assert recorder.record("x", x) is x
    with pytest.raises(GradGraphError, match="'x' was recorded twice"):
        recorder.record("x", x)
    with pytest.raises(GradGraphError, match="'c' does not depend on the input"):
        recorder.record("c", torch.ones(2), grad=True)


def test_capture_refuses_a_loss_that_is_not_per_datapoint():
    model = mlp()
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=r"shape \[4\]; got \[\]"):
        gradgraph.capture(model, inputs, targets=targets, loss_fn=lambda out, t: (out - t).pow(2).mean())


def test_capture_refuses_a_loss_that_reads_the_batch_into_python():
    """A loss scaled by a number read from the batch's outputs (``.item()``) is one loss of all datapoints where
    autograd sees a constant: refused (on the code before, captured with every ``g_i`` scaled by the batch's
    number instead of the datapoint's own). Reading the targets couples nothing and is captured as before."""
    model = mlp()
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    with pytest.raises(gradgraph.DatapointCouplingError, match=r"loss_fn hands values computed from the model's "
                       r"output to Python \(item: a number or a branch\), one for all 4 datapoints"):
        gradgraph.capture(model, inputs, targets=targets,
                          loss_fn=lambda out, t: (out - t).pow(2).sum(-1) / out.abs().max().item())
    scale = float(targets.abs().max())
    checked = gradgraph.capture(model, inputs, targets=targets,
                                loss_fn=lambda out, t: (out - t).pow(2).sum(-1) / t.abs().max().item())
    plain = gradgraph.capture(model, inputs, targets=targets, loss_fn=lambda out, t: (out - t).pow(2).sum(-1) / scale)
    torch.testing.assert_close(checked.objective, plain.objective, atol=0, rtol=0)


class DictOutput(nn.Module):
    """An MLP returning its logits in a mapping, as a ``transformers`` ``ModelOutput`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return {"logits": self.body(x)}


def test_the_refusal_follows_an_output_mapping_and_two_datapoints_and_says_why_in_full():
    """The tensors of a mapping output are followed (kills ``tensors_in`` 1: the mapping's values not read), two
    datapoints are already several (kills ``follow`` 2: ``> 2``), and both refusals say the cause and the remedy in
    full (kills the message mutants of ``__torch_function__``). ``capture`` takes a tensor output: the conversion
    runs the same ``per_datapoint_objective``."""
    model, inputs, targets = DictOutput(), torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE)
    read = ("loss_fn hands values computed from the model's output to Python (__float__: a number or a branch), one "
            "for all 2 datapoints; a loss made with it depends on the other datapoints where autograd sees a constant, "
            "so every per-sample gradient would be silently wrong (only their sum right). Compute each datapoint's "
            "loss from its own output with tensor ops (no .item(), float() or if on the losses), or convert one "
            "datapoint at a time")
    with pytest.raises(gradgraph.DatapointCouplingError) as refusal:
        gradgraph.to_graph(model, inputs, targets,
                           lambda out, t: (out["logits"] - t).pow(2).sum(-1) * float(out["logits"][0, 0]))
    assert str(refusal.value) == read
    detached = ("loss_fn cuts the gradient of values computed from the model's output (detach): a statistic of the "
                "batch made from them (losses / losses.detach().max()) couples the datapoints where autograd sees a "
                "constant, so every per-sample gradient would be silently wrong, and gradgraph cannot tell such a "
                "statistic from one of a datapoint alone. Compute each datapoint's loss from its own output without "
                "detach, or convert one datapoint at a time")
    with pytest.raises(gradgraph.DatapointCouplingError) as refusal:
        gradgraph.to_graph(model, inputs, targets,
                           lambda out, t: (out["logits"] - t).pow(2).sum(-1) / out["logits"].detach().max())
    assert str(refusal.value) == detached
