"""`gradgraph.nn.linear`: the faster product for narrow outputs computes what `F.linear` does.

Both forms are compared in float64 on each side of the thresholds (rows, output channels), with
and without bias, forward and backward; each test fails if the transposed form drops the bias,
swaps the weight's axes or reshapes its rows in the wrong order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import Linear as PyGLinear

from gradgraph.nn.linear import MIN_ROWS, NARROW_OUT_CHANNELS, Linear, batched_linear, linear, prefers_transposed

CASES = [  # (leading shape, in, out): rows on each side of MIN_ROWS, outputs on each side of NARROW_OUT_CHANNELS
    ((MIN_ROWS,), 5, NARROW_OUT_CHANNELS),
    ((MIN_ROWS - 1,), 5, NARROW_OUT_CHANNELS),
    ((MIN_ROWS,), 5, NARROW_OUT_CHANNELS + 1),
    ((41, 32), 3, 2),
    ((7, 11, 16), 4, 1),
]


def test_the_transposed_form_is_taken_for_narrow_outputs_of_many_rows_on_the_cpu_only():
    cpu = torch.device("cpu")
    assert prefers_transposed(MIN_ROWS, NARROW_OUT_CHANNELS, cpu)
    assert not prefers_transposed(MIN_ROWS - 1, NARROW_OUT_CHANNELS, cpu)
    assert not prefers_transposed(MIN_ROWS, NARROW_OUT_CHANNELS + 1, cpu)
    assert not prefers_transposed(MIN_ROWS, 1, torch.device("meta"))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading, in_channels, out_channels", CASES)
def test_linear_equals_f_linear_forward_and_backward(leading, in_channels, out_channels, bias):
    generator = torch.Generator().manual_seed(len(leading) * 100 + out_channels)
    x = torch.randn(*leading, in_channels, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(out_channels, in_channels, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(out_channels, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    out = linear(x, weight, b)
    expected = F.linear(x, weight, b)
    assert out.shape == expected.shape == (*leading, out_channels)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = [x, weight] + ([b] if bias else [])
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(expected, inputs, upstream)
    for first, second in zip(got, want):
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows, out_channels", [(MIN_ROWS, 3), (MIN_ROWS - 1, 3), (MIN_ROWS, NARROW_OUT_CHANNELS + 2)])
def test_batched_linear_equals_one_f_linear_per_graph(rows, out_channels, bias):
    generator = torch.Generator().manual_seed(rows + out_channels)
    graphs, in_channels = 3, 6
    x = torch.randn(graphs, rows, in_channels, dtype=torch.float64, generator=generator)
    weight = torch.randn(graphs, out_channels, in_channels, dtype=torch.float64, generator=generator)
    b = torch.randn(graphs, out_channels, dtype=torch.float64, generator=generator) if bias else None
    out = batched_linear(x, weight, b)
    expected = torch.stack([F.linear(x[g], weight[g], b[g] if bias else None) for g in range(graphs)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_the_layer_is_pyg_linear_with_the_same_parameters_and_lazy_widths():
    torch.manual_seed(0)
    ours = Linear(-1, 4, bias=True)
    x = torch.randn(MIN_ROWS, 7, dtype=torch.float32)
    out = ours(x)  # the lazy width is read off the first input, as PyG's
    assert isinstance(ours, PyGLinear) and ours.in_channels == 7
    theirs = PyGLinear(7, 4)
    assert set(theirs.state_dict()) == set(ours.state_dict()) == {"weight", "bias"}
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)
    assert repr(ours) == repr(theirs)
