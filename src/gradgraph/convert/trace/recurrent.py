"""``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` as the per-step ops they compute.

The stock recurrent modules run one fused op (``torch.rnn_tanh``, ``torch.rnn_relu``,
``torch.gru``, ``torch.lstm``, reached through ``torch._VF``) that takes every layer's
weights in one list. :func:`recurrent_decomposition` runs it instead as the loop it stands
for, written with ``F.linear`` on slices of the weights and elementwise ops, which the trace
already follows. For layer ``l``, direction ``d`` and step ``t`` (``x_t`` the layer's input
at ``t``, ``h`` the state of the previous step in the direction's order), torch's equations:

* RNN: ``h_t = tanh(W_ih x_t + b_ih + W_hh h + b_hh)`` (``relu`` for ``nonlinearity="relu"``);
* GRU: ``r = σ(W_ir x_t + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x_t + b_iz + W_hz h + b_hz)``,
  ``n = tanh(W_in x_t + b_in + r ⊙ (W_hn h + b_hn))``, ``h_t = (1 - z) ⊙ n + z ⊙ h``;
* LSTM: ``i, f, o = σ(W_i· x_t + b_i· + W_h· h + b_h·)``, ``g = tanh(W_ig x_t + b_ig + W_hg h + b_hg)``,
  ``c_t = f ⊙ c + i ⊙ g``, ``h_t = o ⊙ tanh(c_t)``.

Each gate is its own ``F.linear`` on the rows of its block of ``W_ih`` / ``W_hh`` (torch's order:
``r, z, n`` and ``i, f, g, o``), so the trace sees one neuron set per gate and step, tied by
the products and sums that join them; the permutation of hidden units then moves the rows of
every gate block of ``W_ih``, the rows and columns of ``W_hh`` and the biases together.

Unrolled, an initial state that is a constant zero (``hx=None``: the module makes ``torch.zeros``)
contributes nothing but ``b_hh``; the first step then reads the bias alone (``W_hh · 0``
has no gradient). That choice reads the state's values, so it depends on them; a replay runs
this same function on its own arguments, and a different choice is a different op sequence,
which the replay's fingerprints catch (it traces afresh).

**Folded over time** (``to_graph(..., fold_time=True)``, the default; :func:`folding_time` sets
it for a trace and its replays alike): every step reads its state through
:func:`previous_state` (also a constant initial state: no term is skipped), the input terms
``W_i· x + b_i·`` are one ``F.linear`` per gate block over the whole sequence (not the GRU's
candidate, whose recurrent term is gated), and the loop tells the tracer where it and each of
its steps begin and end (``trace/rules_recurrent.py`` then gives every step the first step's
neuron sets). The calls of one cell on the state the call before returned, and the calls of one
:func:`recurrent_step` function (hand-written loops), are loops too. The events go to the
tracer only (a replay has no listener), so trace and replay run the same ops.

What is not decomposed (the trace then refuses the fused op by name, with the module's path):
packed sequences (``PackedSequence``: the fused op's packed signature). An LSTM with
``proj_size`` projects each step's state, ``h_t = W_hr (o ⊙ tanh(c_t))``, one more ``F.linear``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

__all__ = ["FoldMismatch", "RECURRENT_CELL_OPS", "RECURRENT_OPS", "fold_listener", "folding_time", "previous_state",
           "recurrent_decomposition", "recurrent_step"]

#: whether the fused recurrent ops run folded (one set per role over all steps, with
#: :func:`previous_state` copies) or unrolled (one set per role and step); set by the trace and
#: the replay of a plan, so both run the same ops
_FOLD_TIME: ContextVar[bool] = ContextVar("gradgraph_fold_time", default=False)
#: the tracer that follows the steps of a folded loop (``None`` in a replay: the events are no ops)
_LISTENER: ContextVar[Any] = ContextVar("gradgraph_fold_listener", default=None)
_GROUPS = itertools.count()


class FoldMismatch(Exception):
    """The steps of a loop run folded were not the same computation (another set of neurons, a
    parallel edge, two steps at one component): the trace starts over with every loop unrolled."""


@contextlib.contextmanager
def folding_time(fold: bool) -> Iterator[None]:
    """Run the fused recurrent ops folded (``True``) or unrolled (``False``) inside the block."""
    token = _FOLD_TIME.set(fold)
    try:
        yield
    finally:
        _FOLD_TIME.reset(token)


@contextlib.contextmanager
def fold_listener(listener: Any) -> Iterator[None]:
    """Send the step events of folded loops to ``listener`` (the tracer) inside the block: its
    ``fold_event(kind, *args)`` gets ``("begin_loop", key)`` where a stock module's loop starts
    (before the ops that precede its first step), ``("begin_step", key, states)`` (the loop's
    name and the states the step reads, before their :func:`previous_state`),
    ``("end_step", states)`` (the states it returns) and ``("end_group", key)`` where the loop
    is known to end."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def _event(kind: str, *args: Any) -> None:
    listener = _LISTENER.get()
    if listener is not None:
        # the tracer's own bookkeeping (torch.cat, torch.isin ...) is no op of the forward: a
        # replay, which has no listener, must see the same ops
        with torch._C.DisableTorchFunction():
            listener.fold_event(kind, *args)


def recurrent_step(step: Callable[..., Any], state: Tensor | tuple[Tensor, ...], x_t: Tensor) -> Any:
    """``step(state, x_t)`` as one step of a recurrent loop that ``to_graph`` folds over time.

    For a loop written by hand (an Elman net, a custom cell), so that its graph has one neuron
    set per role over all steps and each weight one edge set (docs/recurrent.md)::

        h = torch.zeros(x.shape[0], hidden)
        for t in range(x.shape[1]):
            h = gradgraph.recurrent_step(self.step, h, x[:, t])  # step(h, x_t) -> h_t

    Args:
        step: ``step(state, x_t) -> new state``, the same function at every step (calls of one
            function — one method of one object, or one code object, as a lambda written in the
            loop — whose ``state`` is the previous call's result are one loop).
        state: ``[b, H]``, or a tuple of them (an LSTM's ``(h, c)``): the previous step's states,
            or the initial ones (constants, or values computed from the input).
        x_t: ``[b, F]``, the step's input: its components (one per datapoint and step) are where
            the step's values live in the graph.

    Returns:
        ``step``'s result (a tensor, or a tuple as ``state``). Outside a conversion this is
        ``step(state, x_t)``. Where the steps do not fold (another computation at some step), the
        conversion unrolls the loop, exactly.
    """
    states = state if isinstance(state, tuple) else (state,)
    # one loop: calls of one function, also where it is made anew at each step (a lambda in the
    # loop's body: one code object); what differs between its calls (a closure's weights) the
    # tracer's checks find, and the loop is then unrolled
    owner = getattr(step, "__self__", None)
    function = getattr(step, "__func__", step)
    key = ("step", id(owner) if owner is not None else None, getattr(function, "__code__", None) or id(function))
    _event("begin_step", key, states)
    read = tuple(previous_state(value, x_t) for value in states)
    result = step(read if isinstance(state, tuple) else read[0], x_t)
    _event("end_step", result if isinstance(result, tuple) else (result,))
    return result


def previous_state(state: Tensor, like: Tensor) -> Tensor:
    """The state a step reads, ``[b, H]``: its value is ``state`` (``h_{t-1}``, or the initial
    state at the first step), and the trace reads it as the *previous-state copy* of the state's
    neurons living at the components of ``like`` (the step's input ``x_t``, ``[b, F]``), as a
    convolution's tap copies live at the output positions. One torch function (overridable), so
    the trace sees it as one op."""
    if has_torch_function_variadic(state, like):
        return handle_torch_function(previous_state, (state, like), state, like)
    return state.view_as(state)

#: the fused op -> (cell kind, gate count per hidden unit)
RECURRENT_OPS: dict[Any, tuple[str, int]] = {
    torch.rnn_tanh: ("tanh", 1),
    torch.rnn_relu: ("relu", 1),
    torch.gru: ("gru", 3),
    torch.lstm: ("lstm", 4),
}

#: the fused one-step op of ``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell`` -> cell kind
RECURRENT_CELL_OPS: dict[Any, str] = {
    torch.rnn_tanh_cell: "tanh",
    torch.rnn_relu_cell: "relu",
    torch.gru_cell: "gru",
    torch.lstm_cell: "lstm",
}


def _is_constant_zero(state: Tensor | None) -> bool:
    """A state that no autograd path reaches and that is all zeros (``hx=None``)."""
    return state is None or (not state.requires_grad and not bool(state.any()))


def _gate(x: Tensor | None, weight: Tensor, bias: Tensor | None, block: int, size: int) -> Tensor | None:
    """``x @ W[block]ᵀ + b[block]`` for one gate block of ``size`` rows; ``None`` for no term.

    ``x is None`` is a zero state: only the bias remains."""
    rows = slice(block * size, (block + 1) * size)
    if x is None:
        return None if bias is None else bias[rows]
    return F.linear(x, weight[rows], None if bias is None else bias[rows])


def _plus(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    return first if second is None else first + second


def _times(gate: Tensor, value: Tensor | None) -> Tensor | None:
    return None if value is None else gate * value


def _step(kind: str, x_t: Tensor | None, h: Tensor | None, c: Tensor | None, weights: Sequence[Tensor | None],
          size: int, input_terms: Sequence[Tensor] | None = None,
          recurrent_blocks: Sequence[tuple[Tensor, Tensor | None]] | None = None) -> tuple[Tensor, Tensor | None]:
    """One step of one layer and direction: ``(h_t, c_t)`` (``c_t`` only for the LSTM);
    ``h`` / ``c`` are ``None`` for a zero state. Folded, the input terms ``W_i· x_t + b_i·`` of the
    gate blocks come computed (``input_terms``: one ``F.linear`` per block over the whole sequence;
    ``None`` for a block computed here) and ``recurrent_blocks`` holds each block's
    ``(W_h·, b_h·)`` sliced once."""
    w_ih, w_hh, b_ih, b_hh = weights

    def input_term(block: int) -> Tensor:
        if input_terms is not None and input_terms[block] is not None:
            return input_terms[block]
        return _gate(x_t, w_ih, b_ih, block, size)

    def recurrent_term(block: int) -> Tensor | None:
        if recurrent_blocks is not None:
            return F.linear(h, *recurrent_blocks[block])
        return _gate(h, w_hh, b_hh, block, size)

    def pre_activation(block: int) -> Tensor:
        return _plus(input_term(block), recurrent_term(block))

    if kind in ("tanh", "relu"):
        value = pre_activation(0)
        return (torch.tanh(value) if kind == "tanh" else torch.relu(value)), None
    if kind == "gru":
        reset = torch.sigmoid(pre_activation(0))
        update = torch.sigmoid(pre_activation(1))
        recurrent = recurrent_term(2)
        candidate = torch.tanh(_plus(input_term(2), _times(reset, recurrent)))
        return _plus((1 - update) * candidate, _times(update, h)), None
    input_gate = torch.sigmoid(pre_activation(0))
    forget_gate = torch.sigmoid(pre_activation(1))
    cell_input = torch.tanh(pre_activation(2))
    output_gate = torch.sigmoid(pre_activation(3))
    cell = _plus(_times(forget_gate, c), input_gate * cell_input)
    return output_gate * torch.tanh(cell), cell


def _run(kind: str, gates: int, input: Tensor, hx: Tensor | Sequence[Tensor], params: Sequence[Tensor],
         has_biases: bool, num_layers: int, dropout: float, train: bool, bidirectional: bool,
         batch_first: bool) -> tuple[Tensor, ...]:
    directions = 2 if bidirectional else 1
    projected = _projected(kind, params, has_biases, num_layers * directions)
    per_direction = (4 if has_biases else 2) + projected
    hidden = params[0].shape[0] // gates
    time_axis = 1 if batch_first else 0
    if kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    fold = _FOLD_TIME.get()
    h0_zero, c0_zero = (False, False) if fold else (_is_constant_zero(h0), _is_constant_zero(c0))
    layer_input = input
    final_h: list[Tensor] = []
    final_c: list[Tensor] = []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0:
            layer_input = F.dropout(layer_input, dropout, train)  # the trace refuses it when active
        direction_outputs = []
        for direction in range(directions):
            at = (layer * directions + direction) * per_direction
            w_ih, w_hh = params[at], params[at + 1]
            b_ih, b_hh = (params[at + 2], params[at + 3]) if has_biases else (None, None)
            w_hr = params[at + per_direction - 1] if projected else None
            state = layer * directions + direction
            h = None if h0_zero else h0[state]
            c = None if kind != "lstm" or c0_zero else c0[state]
            steps = range(layer_input.shape[time_axis])
            outputs: dict[int, Tensor] = {}
            group = ("module", next(_GROUPS), layer, direction)
            input_terms = recurrent_blocks = None
            if fold:  # every step reads its state through a previous-state copy, also a zero one
                _event("begin_loop", group)
                h, c = h0[state], (c0[state] if kind == "lstm" else None)
                # W_ih's terms of all steps at once, and W_hh's blocks sliced once: fewer ops per step.
                # Not the GRU's candidate: its recurrent term is gated (r ⊙ (W_hn h + b_hn)), so the
                # sum lands in the input term's neurons, which must then be the step's own set
                blocks = [slice(block * hidden, (block + 1) * hidden) for block in range(gates)]
                inputs_all = [None if kind == "gru" and block == 2 else
                              F.linear(layer_input, w_ih[rows], None if b_ih is None else b_ih[rows])
                              for block, rows in enumerate(blocks)]
                recurrent_blocks = [(w_hh[rows], None if b_hh is None else b_hh[rows]) for rows in blocks]
            for t in (reversed(steps) if direction == 1 else steps):
                x_t = layer_input.select(time_axis, t) if not fold or kind == "gru" else None
                if fold:
                    input_terms = [None if term is None else term.select(time_axis, t) for term in inputs_all]
                    _event("begin_step", group, (h,) if c is None else (h, c))
                    h = previous_state(h, input_terms[0])
                    c = previous_state(c, input_terms[0]) if kind == "lstm" else None
                h, c = _step(kind, x_t, h, c, (w_ih, w_hh, b_ih, b_hh), hidden, input_terms, recurrent_blocks)
                if w_hr is not None:  # LSTM with proj_size: h_t = W_hr (o ⊙ tanh(c_t))
                    h = F.linear(h, w_hr)
                if fold:
                    _event("end_step", (h,) if c is None else (h, c))
                outputs[t] = h
            if fold:
                _event("end_group", group)
            direction_outputs.append(torch.stack([outputs[t] for t in steps], dim=time_axis))
            final_h.append(h)
            if kind == "lstm":
                final_c.append(c)
        layer_input = direction_outputs[0] if directions == 1 else torch.cat(direction_outputs, dim=-1)
    results = (layer_input, torch.stack(final_h))
    return results + ((torch.stack(final_c),) if kind == "lstm" else ())


def _cell(kind: str, input: Tensor, hx: Tensor | Sequence[Tensor], w_ih: Tensor, w_hh: Tensor,
          b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    h, c = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    fold = _FOLD_TIME.get() and input.dim() == 2
    if fold:  # steps of one loop: calls of one cell, each on the state the one before returned
        states = (h, c) if kind == "lstm" else (h,)
        _event("begin_step", ("cell", id(w_ih)), states)
        h = previous_state(h, input)
        c = previous_state(c, input) if kind == "lstm" else None
    else:
        h = None if _is_constant_zero(h) else h
        c = None if kind != "lstm" or _is_constant_zero(c) else c
    h_new, c_new = _step(kind, input, h, c, (w_ih, w_hh, b_ih, b_hh), w_hh.shape[1])
    if kind != "lstm":
        if fold:
            _event("end_step", (h_new,))
        return h_new
    result = h_new, c_new if c_new is not None else torch.zeros_like(h_new)
    if fold:
        _event("end_step", result)
    return result


def _projected(kind: str, params: Sequence[Tensor], has_biases: bool, stacks: int) -> int | None:
    """1 if every layer and direction has an LSTM projection weight ``W_hr`` (``proj_size``),
    0 if none has, ``None`` for a weight list of another length."""
    plain = 4 if has_biases else 2
    if len(params) == stacks * plain:
        return 0
    if kind == "lstm" and len(params) == stacks * (plain + 1):
        return 1
    return None


def recurrent_decomposition(func: Any, args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """The per-step ops of a fused recurrent op (``torch.lstm`` …) called as ``nn.RNN`` /
    ``nn.GRU`` / ``nn.LSTM`` call it on a padded batch, or of one cell step (``torch.lstm_cell``
    …, from ``nn.LSTMCell`` …); ``None`` otherwise (not such an op, a packed sequence: the trace
    then refuses the fused op)."""
    if func in RECURRENT_CELL_OPS and not kwargs and 4 <= len(args) <= 6:
        return lambda: _cell(RECURRENT_CELL_OPS[func], *args)
    if func not in RECURRENT_OPS or kwargs or len(args) != 9:
        return None
    kind, gates = RECURRENT_OPS[func]
    input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    if not isinstance(input, Tensor) or not isinstance(batch_first, bool) or input.dim() != 3:
        return None  # the packed signature: (data, batch_sizes, hx, params, ...)
    directions = 2 if bidirectional else 1
    projected = _projected(kind, params, has_biases, num_layers * directions)
    if projected is None or params[0].shape[0] % gates or params[1].shape[0] != params[0].shape[0]:
        return None
    return lambda: _run(kind, gates, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                        batch_first)
