"""Per-function checks of ``convert/trace/recurrent.py`` and ``convert/trace/rules_recurrent.py`` (issue 31,
runs recurrent 1-...): the decomposition of every fused recurrent op (``torch.rnn_tanh``, ``torch.rnn_relu``,
``torch.gru``, ``torch.lstm``) and cell op (``torch.gru_cell`` ...) gives the op's outputs and the gradients of every
input exactly (float64, 1e-12, against the op itself called by torch), folded and unrolled; where it must not
decompose it says ``None``; and models that reach the folded loop's corners convert with per-sample gradients equal
to a per-datapoint autograd loop (float64, 1e-10), in the layout (folded or unrolled) docs/recurrent.md gives them.
The tests written for a run's survivors name the mutants they kill (``.mutation/convert-recurrent/``'s numbering:
``r`` for ``recurrent.py``, ``rules`` for ``rules_recurrent.py``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn, Tensor

from gradgraph.convert.trace.recurrent import folding_time, RECURRENT_CELL_OPS, RECURRENT_OPS, recurrent_decomposition

DTYPE = torch.float64
MODULES = {"tanh": nn.RNN, "relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
FUSED = {kind: op for op, (kind, _) in RECURRENT_OPS.items()}
CELL_OPS = {kind: op for op, kind in RECURRENT_CELL_OPS.items()}


def fused_arguments(kind: str, layers: int, bidirectional: bool, bias: bool, batch_first: bool, proj: int,
                    given_state: bool, seed: int = 0, batch: int = 2, steps: int = 3):
    """The nine arguments ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` hand their fused op (a padded batch), every float
    tensor a leaf that requires its gradient; a zero state is ``torch.zeros`` (as the module makes for ``hx=None``)."""
    torch.manual_seed(seed)
    options = {"nonlinearity": kind} if kind in ("tanh", "relu") else {}
    if proj:
        options["proj_size"] = proj
    module = MODULES[kind](3, 4, num_layers=layers, bias=bias, bidirectional=bidirectional, batch_first=batch_first,
                           **options).to(DTYPE)
    params = [weight.detach().clone().requires_grad_(True) for weight in module._flat_weights]
    stacks = layers * (2 if bidirectional else 1)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batch, steps, 3) if batch_first else (steps, batch, 3)
    input = torch.randn(shape, dtype=DTYPE, generator=generator).requires_grad_(True)

    def state(width: int) -> Tensor:
        if given_state:
            return torch.randn(stacks, batch, width, dtype=DTYPE, generator=generator).requires_grad_(True)
        return torch.zeros(stacks, batch, width, dtype=DTYPE)

    hx = [state(proj or 4), state(4)] if kind == "lstm" else state(4)
    return (input, hx, params, bias, layers, 0.0, False, bidirectional, batch_first)


def leaves(args) -> list[Tensor]:
    flat = [item for arg in args for item in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return [item for item in flat if isinstance(item, Tensor) and item.requires_grad]


def assert_same_outputs_and_gradients(ours, theirs, inputs: list[Tensor]) -> None:
    """Equal outputs (each of a tuple), and equal gradients of a random weighting of them for every input."""
    ours, theirs = (ours if isinstance(ours, tuple) else (ours,)), (theirs if isinstance(theirs, tuple) else (theirs,))
    assert len(ours) == len(theirs)
    generator = torch.Generator().manual_seed(7)
    total_ours = total_theirs = 0
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        weights = torch.randn(b.shape, dtype=b.dtype, generator=generator)
        total_ours, total_theirs = total_ours + (a * weights).sum(), total_theirs + (b * weights).sum()
    if not inputs:
        return
    grads_ours = torch.autograd.grad(total_ours, inputs, allow_unused=True)
    grads_theirs = torch.autograd.grad(total_theirs, inputs, allow_unused=True)
    for index, (a, b) in enumerate(zip(grads_ours, grads_theirs)):
        a = torch.zeros_like(inputs[index]) if a is None else a
        b = torch.zeros_like(inputs[index]) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"gradient of input {index}")


FUSED_CASES = [
    (kind, layers, bidirectional, bias, batch_first, proj, given)
    for kind in ("tanh", "relu", "gru", "lstm")
    for layers, bidirectional, bias, batch_first, given in [(1, False, True, True, False), (2, True, False, False, True),
                                                             (2, False, True, False, True), (1, True, True, True, True)]
    for proj in ((0, 2) if kind == "lstm" else (0,))
]


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("kind, layers, bidirectional, bias, batch_first, proj, given", FUSED_CASES)
def test_the_fused_ops_decomposition_gives_the_ops_outputs_and_gradients(kind, layers, bidirectional, bias,
                                                                          batch_first, proj, given, fold):
    """``torch.lstm`` (...) run as its per-step loop: the output sequence, ``h_n`` (and ``c_n``) and the gradient of
    every input (the sequence, the given initial states, every weight) equal the fused op's, folded or not (outside a
    trace the step events go nowhere); the states are zeros (``hx=None``) or given."""
    args = fused_arguments(kind, layers, bidirectional, bias, batch_first, proj, given)
    op = FUSED[kind]
    parts = recurrent_decomposition(op, args, {})
    assert parts is not None
    with folding_time(fold):
        ours = parts()
    assert_same_outputs_and_gradients(ours, op(*args), leaves(args))


CELL_CASES = list(itertools.product(("tanh", "relu", "gru", "lstm"), (True, False), ("zeros", "zeros-grad", "given")))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("kind, bias, state", CELL_CASES)
def test_the_cell_ops_decomposition_gives_the_ops_outputs_and_gradients(kind, bias, state, fold):
    """``torch.gru_cell`` (...) as ``nn.GRUCell`` calls it: ``(input, hx, w_ih, w_hh[, b_ih, b_hh])``, the state
    given, zeros (as the cell makes for ``hx=None``), or zeros that require their gradient (no constant: the
    decomposition must keep their term)."""
    torch.manual_seed(2)
    options = {"nonlinearity": kind} if kind in ("tanh", "relu") else {}
    cell = getattr(nn, {"tanh": "RNNCell", "relu": "RNNCell", "gru": "GRUCell", "lstm": "LSTMCell"}[kind])(
        3, 4, bias=bias, **options).to(DTYPE)
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(2, 3, dtype=DTYPE, generator=generator).requires_grad_(True)

    def make() -> Tensor:
        if state == "given":
            return torch.randn(2, 4, dtype=DTYPE, generator=generator).requires_grad_(True)
        return torch.zeros(2, 4, dtype=DTYPE).requires_grad_(state == "zeros-grad")

    hx = (make(), make()) if kind == "lstm" else make()
    weights = [weight.detach().clone().requires_grad_(True) for weight in
               (cell.weight_ih, cell.weight_hh, *((cell.bias_ih, cell.bias_hh) if bias else ()))]
    args = (input, hx, *weights)
    op = CELL_OPS[kind]
    parts = recurrent_decomposition(op, args, {})
    assert parts is not None
    with folding_time(fold):
        ours = parts()
    assert_same_outputs_and_gradients(ours, op(*args), leaves(args))
