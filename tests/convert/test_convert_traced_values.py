"""``to_graph_traced`` and the plain-chain capture, checked against what they must give (issue 31, group
``convert-traced`` of ``./gg mutate``): every refusal in full (what is wrong and where), a chain capture
tensor for tensor against the general replay and autograd, a cached plan never served for a model it does
not fit. Written for the survivors of runs traced 1-2 (each test's docstring names the mutants it kills,
checked with ``MUTANT_UNDER_TEST`` in ``.mutation/convert-traced/mutants``)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from strategies import cross_entropy
from torch import nn

import gradgraph
from gradgraph import GradGraphError
from gradgraph.convert.traced import to_graph_traced

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("empty_plan_cache")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


def _batch(rows: int = 5, features: int = 3):
    return torch.randn(rows, features, dtype=DTYPE), torch.randint(0, 2, (rows,))


def _refused(match: str, call, error=GradGraphError):
    with pytest.raises(error, match=f"^{re.escape(match)}$"):
        call()


def autograd_per_sample(model, inputs, targets, loss_fn, call=None):
    """One autograd pass per datapoint, the model run on that datapoint alone: the ground truth."""
    call = call or (lambda x: model(x))
    params = dict(model.named_parameters())
    grads = {name: [] for name in params}
    for i in range(inputs.shape[0]):
        loss = loss_fn(call(inputs[i:i + 1]), None if targets is None else targets[i:i + 1]).sum()
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[name].append(torch.zeros_like(params[name]) if grad is None else grad)
    return {name: torch.stack(value) for name, value in grads.items()}


def assert_per_sample(graph, reference, atol=1e-11):
    ours = graph.per_sample_grads()
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------ refusals, in full
def test_datapoints_that_are_no_batch_vector_are_refused_with_what_they_are():
    model, (x, y) = _mlp(), _batch()
    for bad, shown in [(torch.tensor([0.0, 1, 1, 2, 2]), "Tensor[5]"), (torch.ones(5, dtype=torch.bool), "Tensor[5]"),
                       ([0, 1, 1, 2, 2], "list"), (torch.tensor([[0, 1, 1, 2, 2]]), "Tensor[1, 5]")]:
        _refused(f"to_graph: datapoints must be a 1-D integer tensor (PyG's batch vector), got {shown}",
                 lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=bad))


def test_datapoints_that_do_not_name_each_row_or_skip_a_datapoint_are_refused():
    model, (x, y) = _mlp(), _batch()
    _refused("to_graph: datapoints [4] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [5, 3] and datapoint_dim 0",
             lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=torch.tensor([0, 1, 1, 2])))
    _refused("to_graph: datapoints [5] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [5] and datapoint_dim 0",
             lambda: gradgraph.to_graph(model, x[:, 0], y, cross_entropy, datapoints=torch.tensor([0, 1, 1, 2, 2])))
    x3 = torch.randn(2, 5, 3, dtype=DTYPE)
    _refused("to_graph: datapoints [5] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [2, 5, 3] and datapoint_dim 1",
             lambda: to_graph_traced(model, x3, targets=y, loss_fn=cross_entropy, datapoint_dim=1,
                                     datapoints=torch.tensor([0, 1, 1, 2, 2])))
    for bad, values in [([0, 2, 2, 2, 0], "[0, 2]"), ([-1, 0, 0, 1, 1], "[-1, 0, 1]"), ([1, 1, 2, 2, 3], "[1, 2, 3]")]:
        _refused(f"to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values {values}",
                 lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=torch.tensor(bad)))


def test_an_input_of_another_dtype_is_refused_naming_both():
    model, (x, y) = _mlp(), _batch()
    _refused("inputs [5, 3] are torch.float32 but Sequential's parameters are ['torch.float64']: convert one to "
             "the other's dtype", lambda: gradgraph.to_graph(model, x.float(), y, cross_entropy))


def test_a_chain_names_the_input_shape_its_first_linear_needs():
    model, (_, y) = _mlp(), _batch()
    first = "'0' (Linear(in_features=3, out_features=4, bias=True))"
    for shape in [(5, 4), (5,), (5, 2, 4)]:
        _refused(f"inputs must have shape [b, 3] (or [b, ..., 3]) for {first}, got {list(shape)}",
                 lambda: gradgraph.to_graph(model, torch.randn(*shape, dtype=DTYPE), y, cross_entropy))
    # an activation or dropout before it does not change the features it reads; a nested chain is walked
    nested = nn.Sequential(nn.ReLU(), nn.Dropout(0.0), nn.Sequential(nn.Linear(3, 2))).to(DTYPE)
    _refused("inputs must have shape [b, 3] (or [b, ..., 3]) for '2.0' (Linear(in_features=3, out_features=2, "
             "bias=True)), got [5, 6]", lambda: gradgraph.to_graph(nested, torch.randn(5, 6, dtype=DTYPE), y,
                                                                    cross_entropy))


def test_an_empty_or_scalar_batch_is_refused_on_its_axis():
    model, (_, y) = _mlp(), _batch()
    _refused("inputs must be a batch with b > 0 datapoints on axis 0, got shape [0, 3]",
             lambda: gradgraph.to_graph(model, torch.randn(0, 3, dtype=DTYPE), y[:0], cross_entropy))
    _refused("inputs must be a batch with b > 0 datapoints on axis 0, got shape []",
             lambda: gradgraph.to_graph(model, torch.tensor(1.0, dtype=DTYPE), y, cross_entropy))
