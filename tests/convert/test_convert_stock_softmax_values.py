"""``stock_graph._unshifted_softmax`` (new in session 19: PyG's softmax over neighbours without its detached shift,
which ``softmax_over_neighbours_unshifted`` patches into PyG's aggregations while a trace or a replay runs), checked
where run stock 3 (group ``convert-stock``, issue 31) showed it unchecked by the group's list: against PyG's own
``softmax`` (the same value and gradient along any axis), and a ``ptr`` without an ``index`` handed to PyG's form
unchanged. Mutant numbers are run stock 3's (``mutmut show NAME`` in ``.mutation/convert-stock/``), each checked with
``MUTANT_UNDER_TEST=NAME``."""

from __future__ import annotations

import pytest
import torch

from gradgraph.convert.trace import stock_graph

utils = pytest.importorskip("torch_geometric.utils")
DTYPE = torch.float64


def test_a_ptr_without_an_index_is_handed_to_pygs_own_softmax_unchanged():
    """The docstring: "A ``ptr`` without an ``index`` keeps PyG's form" — every argument, in its place. Kills
    ``_unshifted_softmax`` 3, 5-12 (an argument of that call dropped, ``None`` or moved; 4, ``index`` as ``None``, is
    that very value)."""
    calls = []

    def original(*args):
        calls.append(args)
        return "PyG's"

    src, ptr = torch.randn(4, 2, dtype=DTYPE), torch.tensor([0, 1, 4])
    assert stock_graph._unshifted_softmax(original)(src, None, ptr, 2, 1) == "PyG's"
    assert len(calls) == 1 and len(calls[0]) == 5
    assert calls[0][0] is src and calls[0][1] is None and calls[0][2] is ptr and calls[0][3:] == (2, 1)


@pytest.mark.parametrize("dim", [0, 1, -2])
@pytest.mark.parametrize("num_nodes", [None, 6])
def test_the_unshifted_softmax_is_pygs_softmax_along_any_axis(dim, num_nodes):
    """``exp(src)`` over each group of ``index`` along ``dim`` of a ``[5, 4, 3]`` value, divided by the group's sum:
    PyG's value and gradient (PyG subtracts each group's detached maximum first, a shift that cancels), also along
    axis 1 and with a ``num_nodes`` beyond the last group. Kills ``_unshifted_softmax`` 22 (the sums scattered along
    axis 0 whatever ``dim``)."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(5, 4, 3, dtype=DTYPE, generator=generator)
    size = src.shape[dim]
    index = torch.tensor([0, 2, 0, 1, 2][:size])
    ours_src, theirs_src = src.clone().requires_grad_(), src.clone().requires_grad_()
    ours = stock_graph._unshifted_softmax(utils.softmax)(ours_src, index, None, num_nodes, dim)
    theirs = utils.softmax(theirs_src, index, None, num_nodes, dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    weights = torch.randn(src.shape, dtype=DTYPE, generator=generator)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_src.grad, theirs_src.grad, rtol=0, atol=1e-12)
