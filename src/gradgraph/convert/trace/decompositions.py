"""Composite ops the trace reads as the ops they are made of.

``F.glu(x)`` is ``a * sigmoid(b)`` of the two halves of ``x``; ``F.normalize`` divides by a
norm over the features; ``torch.var_mean`` / ``std_mean`` are the two reductions; ``lerp``, ``addcmul`` and
``addcdiv`` are the sums and products they stand for; ``linalg.vector_norm`` is ``Tensor.norm``; ``F.prelu`` is
``relu(x) - w * relu(-x)``; an ``einsum`` that is a linear map (``"bi,oi->bo"``) is
``F.linear`` (and so is ``x @ v`` by a vector: one output, its axis dropped), one that is a batched matrix
product of two values (``"bhid,bhjd->bhij"``:
attention written with einsum) is ``torch.matmul`` of permuted operands, and any other two-operand einsum
the product of its aligned operands summed over the dropped letters; the fused recurrent
ops of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` are their loop over steps (``trace/recurrent.py``).
Rather than a rule per composite op, the trace (and a replay, identically) runs the
decomposition under itself, so the rules that exist follow the parts: a gated unit, a statistic
of the features, a per-feature scale, an affine map, attention scores. A decomposition depends
only on the op and the shapes of its arguments, never on which tensors are neurons, so a replay
numbers the same ops as the trace (the recurrent one also skips a constant zero state; a replay
with another state runs other ops, which its fingerprints catch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradgraph.convert.trace.recurrent import RECURRENT_CELL_OPS, RECURRENT_OPS, recurrent_decomposition
from gradgraph.convert.trace.rules_conv import CONVOLUTIONS, convolution_parts, padding_parts

__all__ = ["SOFTMAX_FUNCTIONS", "decomposition", "is_softmax", "softmax_parts"]


def _glu(input: Tensor, dim: int = -1) -> Tensor:
    first, second = input.chunk(2, dim=dim)
    return first * torch.sigmoid(second)


def _normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Tensor | None = None) -> Tensor:
    # torch's own definition of F.normalize, written as the ops it runs
    denominator = input.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(input)
    return torch.div(input, denominator, out=out)


def _vector_norm(x: Tensor, ord: float = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None,
                 out: Tensor | None = None) -> Tensor:
    # Tensor.norm runs linalg.vector_norm for a number p (the same values and gradients); the
    # trace reads it as a reduction (over features, or over positions as a pooling)
    if dtype is not None or out is not None:
        return torch.linalg.vector_norm(x, ord, dim, keepdim, dtype=dtype, out=out)
    return x.norm(ord, dim, keepdim)


def _prelu(input: Tensor, weight: Tensor) -> Tensor:
    return F.relu(input) - weight * F.relu(-input)


def _einsum_as_linear(equation: str, operands: tuple) -> Callable[[], Tensor] | None:
    """``F.linear`` for a two-operand einsum that maps the last axis of one operand with a
    matrix (``"bi,oi->bo"``, ``"...i,io->...o"``, either operand order); ``None`` otherwise."""
    if len(operands) != 2 or not all(isinstance(operand, Tensor) for operand in operands) or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    for matrix_at in (1, 0):
        matrix_term, term = terms[matrix_at], terms[1 - matrix_at]
        matrix, x = operands[matrix_at], operands[1 - matrix_at]
        if matrix.dim() == 1 and len(matrix_term) == 1 and term and "." not in term and \
                len(set(term)) == len(term) == x.dim() and term[-1] == matrix_term and output == term[:-1]:
            return lambda vector=matrix, x=x: _matmul_by_vector(x, vector)  # "btd,d->bt": x @ v
        if matrix.dim() != 2 or len(matrix_term) != 2 or "." in matrix_term or not term:
            continue
        contracted = term[-1]
        letters = term.replace("...", "")
        if contracted not in matrix_term or len(set(letters)) != len(letters):
            continue
        produced = matrix_term.replace(contracted, "")
        if len(produced) != 1 or produced in term or output != term[:-1] + produced:
            continue
        if matrix_term == produced + contracted:
            return lambda: F.linear(x, matrix)
        return lambda: F.linear(x, matrix.t())  # under the trace: a view of the parameter
    return None


def _einsum_as_matmul(equation: str, operands: tuple) -> Callable[[], Tensor] | None:
    """``torch.matmul`` of permuted operands for a two-operand einsum that is a batched matrix
    product (``"bhid,bhjd->bhij"``, ``"bhij,bhjd->bhid"``: attention written with einsum): every
    index in both operands and the output is a batch index, one index of each operand alone is a
    free one kept in the output, one index of both operands is summed; ``None`` otherwise."""
    if len(operands) != 2 or not all(isinstance(operand, Tensor) for operand in operands) or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or "." in equation or any(len(set(term)) != len(term) for term in (*terms, output)) \
            or any(len(term) != operand.dim() for term, operand in zip(terms, operands)):
        return None
    left, right = terms
    batch = [letter for letter in output if letter in left and letter in right]
    summed = [letter for letter in left if letter in right and letter not in output]
    free_left = [letter for letter in left if letter not in right]
    free_right = [letter for letter in right if letter not in left]
    if len(summed) != 1 or len(free_left) != 1 or len(free_right) != 1 \
            or set(output) != {*batch, *free_left, *free_right}:
        return None
    first = [left.index(letter) for letter in (*batch, *free_left, *summed)]
    second = [right.index(letter) for letter in (*batch, *summed, *free_right)]
    produced = "".join((*batch, *free_left, *free_right))
    order = [produced.index(letter) for letter in output]

    def run() -> Tensor:
        product = torch.matmul(operands[0].permute(first), operands[1].permute(second))
        return product.permute(order) if order != sorted(order) else product

    return run


def _einsum_as_product_sum(equation: str, operands: tuple) -> Callable[[], Tensor] | None:
    """A two-operand einsum as the product of the operands, aligned on their letters, summed over the
    letters the output drops (``"bt,btd->bd"``: the weights of attention pooling times the tokens, summed
    over the tokens), where it is neither a linear map nor a batched matrix product (those keep their
    forms, tried first) and one operand's letters are all the other's (the smaller broadcast over the larger:
    a weight per token over its features); ``None`` otherwise (``"bhid,bhje->bhij"`` stays refused by name),
    and for ``...``, a repeated letter or a letter of the output in no operand.
    The product is materialised (every letter's size at once), as the einsum's own result is for these."""
    if len(operands) != 2 or not all(isinstance(operand, Tensor) for operand in operands) or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or "." in equation or any(len(set(term)) != len(term) for term in (*terms, output)) \
            or any(len(term) != operand.dim() for term, operand in zip(terms, operands)) \
            or not set(output) <= set(terms[0]) | set(terms[1]) \
            or not (set(terms[0]) <= set(terms[1]) or set(terms[1]) <= set(terms[0])):
        return None
    letters = output + "".join(dict.fromkeys(letter for term in terms for letter in term if letter not in output))

    def aligned(term: str, operand: Tensor) -> Tensor:
        present = [letter for letter in letters if letter in term]
        view = operand.permute([term.index(letter) for letter in present])
        for position, letter in enumerate(letters):
            if letter not in term:
                view = view.unsqueeze(position)
        return view

    summed = list(range(len(output), len(letters)))

    def run() -> Tensor:
        product = aligned(terms[0], operands[0]) * aligned(terms[1], operands[1])
        return product.sum(summed) if summed else product

    return run


def _matmul_by_vector(left: Tensor, right: Tensor) -> Tensor:
    # x @ v of a vector v (a learned query scoring each token, h @ q): the linear map with one output,
    # that output's axis dropped
    return F.linear(left, right.unsqueeze(0)).squeeze(-1)


_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)


_SOFTMAXES = {F.softmax: False, torch.softmax: False, Tensor.softmax: False,
              F.log_softmax: True, torch.log_softmax: True, Tensor.log_softmax: True}


#: softmax and log-softmax, each with whether it is the log form
SOFTMAX_FUNCTIONS = _SOFTMAXES


def is_softmax(func: Any) -> bool:
    """Whether ``func`` is one of :data:`SOFTMAX_FUNCTIONS` (``False`` for an unhashable callable)."""
    try:
        return func in SOFTMAX_FUNCTIONS
    except TypeError:
        return False


def softmax_parts(func: Any, args: tuple, kwargs: dict) -> Callable[[], Tensor] | None:
    """A softmax (or log-softmax) as ``exp(x - c) / sum(exp(x - c))`` (``x - c - log(sum(exp(x - c)))``) over
    its axis, ``c`` the maximum there, taken as a constant (any ``c`` gives the same values and gradients; the
    maximum keeps ``exp`` finite); ``None`` without an integer ``dim``. Over positions (attention pooling: a
    score per token, a softmax over the tokens, a weighted sum) the parts are an elementwise ``exp``, a sum
    over positions and a division by it, which the rules follow. Unlike :func:`decomposition`, whether to run
    it depends on the input: the trace runs it where the axis holds positions of neuron values
    (``Tracer.softmax_over_positions``; a softmax over features or attention scores keeps its rule, which
    names a softmax over queries), and a replay runs it where the trace's log has the parts, not the softmax."""
    log = SOFTMAX_FUNCTIONS[func]
    input = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype_at = 3 if func in (F.softmax, F.log_softmax) else 2  # F.softmax(input, dim, _stacklevel, dtype)
    dtype = kwargs.get("dtype", args[dtype_at] if len(args) > dtype_at else None)
    if not isinstance(input, Tensor) or not isinstance(dim, int) or input.dim() == 0:
        return None

    def run() -> Tensor:
        x = input if dtype is None else input.to(dtype)
        with torch._C.DisableTorchFunction():
            shift = x.detach().amax(dim, keepdim=True)
        shifted = x - shift
        total = torch.exp(shifted).sum(dim, keepdim=True)
        return shifted - torch.log(total) if log else torch.exp(shifted) / total

    return run


def _statistic_and_mean(statistic: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """``torch.var_mean`` / ``torch.std_mean`` as ``(statistic(...), mean(...))``: two reductions over the same
    axes, which the rules read one by one (the tuple op had no rule)."""

    def run(input: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        # var_mean(input, dim, unbiased, keepdim) / (input, unbiased) / (input, dim, *, correction, keepdim)
        dim = None if args and isinstance(args[0], bool) else args[0] if args else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return statistic(input, *args, **kwargs), torch.mean(input, dim=dim, keepdim=keepdim)

    return run


def _lerp(input: Tensor, end: Tensor, weight: Any, *, out: Tensor | None = None) -> Tensor:
    # input + weight * (end - input); torch's kernel takes end - (end - input) * (1 - weight) for weight >= 0.5
    # (the same values up to rounding, the same gradients)
    return torch.add(input, weight * (end - input), out=out)


def _addcmul(input: Tensor, tensor1: Tensor, tensor2: Tensor, *, value: Any = 1, out: Tensor | None = None) -> Tensor:
    return torch.add(input, value * (tensor1 * tensor2), out=out)


def _addcdiv(input: Tensor, tensor1: Tensor, tensor2: Tensor, *, value: Any = 1, out: Tensor | None = None) -> Tensor:
    return torch.add(input, value * (tensor1 / tensor2), out=out)


_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    F.glu: _glu, F.normalize: _normalize, torch.linalg.vector_norm: _vector_norm,
    torch.var_mean: _statistic_and_mean(torch.var), torch.std_mean: _statistic_and_mean(torch.std),
    torch.lerp: _lerp, Tensor.lerp: _lerp, torch.addcmul: _addcmul, Tensor.addcmul: _addcmul,
    torch.addcdiv: _addcdiv, Tensor.addcdiv: _addcdiv,
}

#: every function :func:`decomposition` may run as parts; any other returns ``None`` at once (a
#: replay asks for each of a forward's ops, so the common case is one set lookup)
DECOMPOSABLE = frozenset((*CONVOLUTIONS, F.pad, *_DECOMPOSITIONS, *_MATMULS, F.prelu, torch.prelu, torch.einsum,
                          *RECURRENT_OPS, *RECURRENT_CELL_OPS))


def decomposition(func: Any, args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """A function running ``func(*args, **kwargs)`` as the ops it is made of, or ``None`` where
    the trace follows ``func`` itself (or cannot follow it either way)."""
    try:
        if func not in DECOMPOSABLE:
            return None
    except TypeError:  # an unhashable callable: none of the above
        return None
    convolution = convolution_parts(func, args, kwargs)  # a batched F.conv*d: taps, then F.linear
    if convolution is not None:
        return convolution
    padding = padding_parts(func, args, kwargs)  # a convolution's padding_mode: indexing
    if padding is not None:
        return padding
    if func in _DECOMPOSITIONS:
        return lambda: _DECOMPOSITIONS[func](*args, **kwargs)
    if func in _MATMULS:
        left, right = (args[0], args[1]) if len(args) == 2 and not kwargs else (None, None)
        if isinstance(left, Tensor) and isinstance(right, Tensor) and right.dim() == 1 and left.dim() >= 2:
            return lambda: _matmul_by_vector(left, right)
        return None
    if func is F.prelu or func is torch.prelu:
        input = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        # one slope, or one per feature of a [b, features] input (prelu's channels are axis 1)
        if isinstance(input, Tensor) and isinstance(weight, Tensor) and (
                weight.numel() == 1 or (input.dim() == 2 and weight.numel() == input.shape[1])):
            return lambda: _prelu(input, weight)
        return None
    if func is torch.einsum and args and isinstance(args[0], str):
        operands = tuple(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else tuple(args[1:])
        return (_einsum_as_linear(args[0], operands) or _einsum_as_matmul(args[0], operands)
                or _einsum_as_product_sum(args[0], operands))
    return recurrent_decomposition(func, args, kwargs)  # nn.RNN / nn.GRU / nn.LSTM, step by step
