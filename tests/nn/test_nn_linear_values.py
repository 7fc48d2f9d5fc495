"""`gradgraph.nn.linear` by hand: which product each call takes, read off the result's layout.

Both products give the same values (``tests/nn/test_nn_linear.py``), so a mutant that only sends a call
down the other product (a threshold read off the wrong axis, a check dropped or widened) changes no value.
The docstrings say what tells them apart: :func:`linear`'s transposed product returns "a view with the
rows as its last-moving axis", ``F.linear`` and :func:`batched_linear`'s ``bmm`` with the contiguous
``[G, in, out]`` return contiguous tensors. Each case below is picked so that a wrong threshold input
(in channels for out channels, the last leading axis for the rows, the group count for the rows) takes the
other side of :func:`prefers_transposed` than the right one, and the values are checked against
``F.linear`` in float64 as well.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradgraph.nn.linear import MIN_ROWS, NARROW_OUT_CHANNELS, batched_linear, linear, prefers_transposed

CPU = torch.device("cpu")


def _rows_last_strides(leading: tuple[int, ...], out_channels: int) -> tuple[int, ...]:
    """Strides of ``[*leading, out]`` read through the transposed view of a contiguous ``[out, rows]``."""
    strides, step = [], 1
    for size in reversed(leading):
        strides.append(step)
        step *= size
    return (*reversed(strides), math.prod(leading))


LINEAR_CASES = [  # (leading shape, in, out, transposed?)
    ((MIN_ROWS,), 5, NARROW_OUT_CHANNELS, True),
    ((MIN_ROWS - 1,), 5, NARROW_OUT_CHANNELS, False),
    ((MIN_ROWS,), 5, NARROW_OUT_CHANNELS + 1, False),  # in <= 8: the in channels taken for the out ones say yes
    ((MIN_ROWS,), NARROW_OUT_CHANNELS + 1, 3, True),  # in > 8: the in channels taken for the out ones say no
    ((41, 32), 3, 2, True),  # 1312 rows, the last leading axis alone (32) says no
    ((MIN_ROWS, 2), 4, 3, True),  # the last leading axis taken for the in channels: no reshape to [rows, in]
    ((7, 11, 16), 4, 2, True),
    ((), 5, 3, False),  # one datapoint: F.linear
    ((3, 5), 4, 2, False),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading, in_channels, out_channels, transposed", LINEAR_CASES)
def test_linear_takes_the_transposed_view_exactly_where_prefers_transposed_says(
    leading, in_channels, out_channels, transposed, bias
):
    """Kills linear's mutants that only change the product taken: ``x.shape[-2]`` for the in channels,
    ``weight.shape[1]`` for the out channels, ``x.dim() <= 2`` / ``< 3``, ``or`` for ``and``, the ``not``
    dropped (``tests/nn/test_nn_linear.py`` checks the values, not the product)."""
    rows = math.prod(leading)
    assert prefers_transposed(rows, out_channels, CPU) == transposed  # the cases are what they say
    generator = torch.Generator().manual_seed(rows + 10 * in_channels + out_channels)
    x = torch.randn(*leading, in_channels, dtype=torch.float64, generator=generator)
    weight = torch.randn(out_channels, in_channels, dtype=torch.float64, generator=generator)
    b = torch.randn(out_channels, dtype=torch.float64, generator=generator) if bias else None
    out = linear(x, weight, b)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-12, atol=1e-12)
    if transposed:
        assert out.stride() == _rows_last_strides(leading, out_channels)
        assert not out.is_contiguous()
    else:
        assert out.is_contiguous()


BATCHED_CASES = [  # (graphs, rows, in, out, transposed?)
    (3, MIN_ROWS, 6, 3, True),  # the group count (3) or the in channels (6) taken for the rows say no
    (3, MIN_ROWS, NARROW_OUT_CHANNELS + 1, 3, True),  # the in channels taken for the out ones say no
    (3, MIN_ROWS, 6, NARROW_OUT_CHANNELS + 1, False),  # ... say yes
    (3, MIN_ROWS - 1, 6, 3, False),
    (MIN_ROWS, 2, 6, 3, False),  # the group count taken for the rows says yes
    (2, 5, MIN_ROWS, 3, False),  # the in channels taken for the rows say yes
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("graphs, rows, in_channels, out_channels, transposed", BATCHED_CASES)
def test_batched_linear_takes_the_transposed_product_exactly_where_prefers_transposed_says(
    graphs, rows, in_channels, out_channels, transposed, bias
):
    """Kills batched_linear's mutants that read the rows or the out channels off the wrong axis
    (``x.shape[0]`` / ``x.shape[2]``, ``weight.shape[0]`` / ``weight.shape[2]``): same values, other layout."""
    assert prefers_transposed(rows, out_channels, CPU) == transposed
    generator = torch.Generator().manual_seed(graphs + rows + out_channels)
    x = torch.randn(graphs, rows, in_channels, dtype=torch.float64, generator=generator)
    weight = torch.randn(graphs, out_channels, in_channels, dtype=torch.float64, generator=generator)
    b = torch.randn(graphs, out_channels, dtype=torch.float64, generator=generator) if bias else None
    out = batched_linear(x, weight, b)
    expected = torch.stack([F.linear(x[g], weight[g], b[g] if bias else None) for g in range(graphs)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if transposed:
        assert out.stride() == (out_channels * rows, 1, rows)
    else:
        assert out.is_contiguous()


def test_linear_with_no_input_channels_is_the_bias():
    """``in_channels == 0``: no division by zero, ``F.linear``'s answer (the bias on every row)."""
    x = torch.empty(2 * MIN_ROWS, 0, dtype=torch.float64)
    weight = torch.empty(3, 0, dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out = linear(x, weight, b)
    torch.testing.assert_close(out, b.expand(2 * MIN_ROWS, 3), rtol=0, atol=0)
    assert out.is_contiguous()
