"""``trace/in_place.py`` function by function: what the mutation run of ``convert-in-place`` (run
convert 7, docs/mutation.md) found unchecked by ``test_convert_in_place.py``.

Every conversion here is float64 against torch.func's per-sample gradients (1e-10), on the first
conversion (the trace) and a second one of other inputs (the cached plan's replay); a refusal is
matched in full, word for word, against a message written out here (not built by the code under
test). Each test names the mutants it kills (``mutmut show NAME`` in ``.mutation/convert-in-place/``),
each checked with ``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from traced_models import convert_twice

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.convert.trace.in_place import _FLAGGED

DTYPE = torch.float64


def cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


class TwoLayers(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
        self.body = forward

    def forward(self, x):
        return self.body(self, x)


def _keyword_input(self, x):
    h = self.a(x)
    g = torch.relu_(input=h)  # torch hands the mode no positional argument: kwargs["input"] is the target
    return self.b(torch.sigmoid_(input=g * 2.0))


def test_an_in_place_function_given_its_input_by_keyword_converts_exactly():
    """``torch.relu_(input=h)``: the mode sees ``args == ()``, the target is ``kwargs["input"]``.
    Kills ``out_of_place_call`` 29 (``args[0]`` of an empty tuple), 31-33 (the target looked up
    under another key: not rewritten, refused as an in-place op)."""
    (first, second), _, _ = convert_twice(TwoLayers(_keyword_input).to(DTYPE))
    assert torch.equal(first.edge_index, second.edge_index) and first.num_nodes == 3 + 4 + 3


def _metadata_of_a_stale_value(self, x):
    h = self.a(x)
    g = h.relu_()  # h is stale from here: its values are the pre-activation's, not g's
    # its metadata is still right, and reading it is allowed
    rows, width = h.shape[0], h.size(1)
    assert (rows, width, h.dim(), h.ndim, h.numel(), len(h)) == (x.shape[0], 4, 2, 2, 4 * x.shape[0], x.shape[0])
    assert h.dtype == x.dtype and h.device == x.device and h.is_floating_point() and h.requires_grad
    assert h.grad_fn is not None and h.layout == torch.strided and not h.is_cuda
    return self.b(g.reshape(rows, width))


def test_reading_only_the_shape_dtype_or_device_of_a_stale_value_is_allowed():
    """Every op of ``_METADATA`` on a value an in-place op left behind converts (exact, first and
    replayed). Kills ``StaleValues.read`` 1 (``not self.stale and name in _METADATA``: a shape read
    of a stale value refused)."""
    convert_twice(TwoLayers(_metadata_of_a_stale_value).to(DTYPE))


STALE_MESSAGE = ("reads a value that the in-place {op} before it changed (or a view of it); gradgraph runs in-place "
                 "ops on intermediate values out of place (their inputs are factors of the graph), which is the "
                 "same only if the old value is not read again. Use the value the op returns, or its out-of-place "
                 "form")


def _returns_the_stale_value(self, x):
    h = self.b(self.a(x))
    torch.sigmoid_(h)  # the result is dropped: the model returns h, whose values the op changed
    return h


def _reads_by_keyword(self, x):
    h = self.a(x)
    g = torch.tanh_(h)
    return self.b(torch.add(g, other=h))  # the stale h as a keyword argument


@pytest.mark.parametrize("forward, where, op", [
    (_returns_the_stale_value, "the model's output", "torch.sigmoid_"),
    (_reads_by_keyword, "torch.add", "torch.tanh_"),
])
def test_a_stale_output_or_keyword_read_is_refused_with_the_whole_message(forward, where, op):
    """The model's output being the stale tensor itself (``StaleValues.in_output``), and a stale
    tensor passed by keyword, are refused with the message in full, on every try (no plan is kept).
    Kills ``in_output`` 2 (the output not searched) and ``message`` 1-7 (its words)."""
    model = TwoLayers(forward).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):
        with pytest.raises(UnsupportedOperationError) as caught:
            gradgraph.to_graph(model, torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,)), cross_entropy)
        assert re.search(re.escape(f"{where}: " + STALE_MESSAGE.format(op=op)), str(caught.value)), str(caught.value)


def _identity_in_place(self, x):
    h = self.a(x)
    d = F.dropout(h, 0.3, False, True)  # eval dropout, in place: returns h itself, nothing changed
    return self.b(h) + self.b(d * 2.0)


def test_an_in_place_op_that_returns_its_input_leaves_nothing_stale():
    """``F.dropout(h, p, training=False, inplace=True)`` returns ``h`` itself: reading ``h`` after it
    is the model's computation and converts exactly (``StaleValues.mark`` marks only a target whose
    storage the result does not share)."""
    convert_twice(TwoLayers(_identity_in_place).to(DTYPE))


def _reads_after_out_of_place(self, x):
    h = self.a(x)
    g = F.relu(h)  # not in place (inplace=False by keyword): h is not stale
    e = F.elu(h, 0.5, False)
    return self.b(g + e * h)


def test_the_flag_false_leaves_the_op_and_its_input_as_they_are():
    """A flagged functional called with ``inplace=False`` is not rewritten, and its input may be read
    again (exact)."""
    convert_twice(TwoLayers(_reads_after_out_of_place).to(DTYPE))


def test_torch_hands_the_mode_every_inplace_flag_by_keyword():
    """Why ``out_of_place_call``'s positional branch (``args[position] is True``) is not reached by
    any model: each functional of ``_FLAGGED``, called with its flag *positionally*, reaches a
    ``__torch_function__`` mode with ``inplace`` in ``kwargs`` (``handle_torch_function`` passes it
    so). Its mutants (``out_of_place_call`` 21-26) are listed as equivalent in docs/mutation.md on
    this ground; this test fails if a torch release changes it, and then they need a test."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append((func, args, dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    positional = {F.threshold: (0.1, 0.0), F.hardtanh: (-1.0, 1.0), F.leaky_relu: (0.01,), F.elu: (1.0,),
                  F.celu: (1.0,), F.rrelu: (1 / 8, 1 / 3, False)}
    for func in _FLAGGED:
        if func in positional:
            extra = positional[func]
        elif "dropout" in func.__name__:
            extra = (0.5, False)
        else:
            extra = ()
        shape = {"dropout1d": (2, 3, 4), "dropout2d": (2, 3, 4, 4)}.get(func.__name__, (2, 3, 4, 4, 4))
        seen.clear()
        with Record():
            func(torch.randn(*shape), *extra, True)
        calls = [(args, kwargs) for called, args, kwargs in seen if called is func]
        assert len(calls) == 1 and calls[0][1].get("inplace") is True and len(calls[0][0]) < 1 + len(extra) + 1, \
            (func.__name__, calls)
