"""Per-function checks of ``convert/trace/decompositions.py`` (issue 31, run decompositions 1): every
decomposition gives its op's value and input gradient exactly (float64, to 1e-12, against the op itself
called by torch), runs the parts its docstring names (recorded with a ``TorchFunctionMode``), and a model
written with the op converts with exact per-sample gradients (torch.func); where the trace follows the op
itself (or nothing), ``decomposition`` says ``None``. The tests written for a run's survivors name the mutants they
kill (``.mutation/convert-decompositions/``'s numbering)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_values import exact, squared
from torch import nn, Tensor
from torch.overrides import TorchFunctionMode

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.convert.trace.decompositions import decomposition, DECOMPOSABLE, is_softmax, SOFTMAX_FUNCTIONS, \
    softmax_parts
from gradgraph.convert.trace.ops import op_name

DTYPE = torch.float64


class Record(TorchFunctionMode):
    """The names of the torch functions run at the top level (nested calls run with the mode off)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(op_name(func))
        return func(*args, **(kwargs or {}))


def parts_of(func, *args, **kwargs):
    """``(value, names of the ops run)`` of ``decomposition(func, args, kwargs)``; fails where it is ``None``."""
    parts = decomposition(func, args, kwargs)
    assert parts is not None, f"{op_name(func)} has no decomposition here"
    with Record() as record:
        value = parts()
    return value, record.names


def same_value_and_gradient(func, *args, **kwargs):
    """The parts' value equals ``func``'s, and so does the gradient of a random weighting of it with
    respect to every float input tensor; returns the names of the ops the parts ran."""
    flat = [item for arg in (*args, *kwargs.values()) for item in (arg if isinstance(arg, list) else [arg])]
    inputs = [arg for arg in flat if isinstance(arg, Tensor) and arg.is_floating_point()]
    for tensor in inputs:
        tensor.requires_grad_(True)
    value, names = parts_of(func, *args, **kwargs)
    expected = func(*args, **kwargs)
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)
    weights = torch.randn(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad((value * weights).sum(), inputs, allow_unused=True)
    theirs = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    return names


def randn(*shape, seed=0, dtype=DTYPE):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- F.glu
@pytest.mark.parametrize("call", ["default", "dim -1", "dim 1", "dim 0 keyword"])
def test_glu_is_the_first_half_times_the_sigmoid_of_the_second(call):
    """``F.glu(x, dim)``: ``a * sigmoid(b)`` of the halves along ``dim`` (default the last)."""
    x = randn(4, 6, 8)
    args, kwargs = {"default": ((x,), {}), "dim -1": ((x, -1), {}), "dim 1": ((x, 1), {}),
                    "dim 0 keyword": ((x,), {"dim": 0})}[call]
    names = same_value_and_gradient(F.glu, *args, **kwargs)
    assert names == ["Tensor.chunk", "torch.sigmoid", "Tensor.mul"]


# ----------------------------------------------------------------------- F.normalize
@pytest.mark.parametrize("call", ["default", "p 1 dim -1", "p 3 dim 0", "eps", "keywords"])
def test_normalize_divides_by_the_norm_clamped_at_eps(call):
    """``F.normalize``: ``x / max(‖x‖_p, eps)`` over ``dim`` (default ``p = 2``, ``dim = 1``, ``eps = 1e-12``);
    rows of small norm (below 1) and an all-zero row (the clamp) included."""
    x = randn(5, 4, 3) * 1e-3
    x[0, :, :] = 0.0  # along dim 1 the first datapoint's columns are zero: 0 / eps
    x[1] *= 1e3
    args, kwargs = {"default": ((x,), {}), "p 1 dim -1": ((x, 1.0, -1), {}), "p 3 dim 0": ((x, 3.0, 0), {}),
                    "eps": ((x, 2.0, 1, 1e-3), {}), "keywords": ((x,), {"p": 1.5, "dim": 2, "eps": 1e-4})}[call]
    names = same_value_and_gradient(F.normalize, *args, **kwargs)
    assert names == ["Tensor.norm", "Tensor.clamp_min", "Tensor.expand_as", "torch.div"]


def test_normalize_writes_into_out():
    """``F.normalize(x, out=buffer)`` fills the buffer, as torch's does."""
    x = randn(3, 4)
    out = torch.empty(3, 4, dtype=DTYPE)
    value, _ = parts_of(F.normalize, x, 2.0, 1, 1e-12, out)
    assert value is out
    torch.testing.assert_close(out, F.normalize(x), atol=1e-15, rtol=0)


# ----------------------------------------------------------------------- linalg.vector_norm
@pytest.mark.parametrize("call", ["default", "ord 1", "ord 3 dim 1", "dims keepdim", "keywords", "inf"])
def test_vector_norm_is_tensor_norm(call):
    """``torch.linalg.vector_norm`` runs as ``Tensor.norm`` (default ``ord = 2`` over every axis, no keepdim)."""
    x = randn(3, 4, 5)
    args, kwargs = {"default": ((x,), {}), "ord 1": ((x, 1), {}), "ord 3 dim 1": ((x, 3, 1), {}),
                    "dims keepdim": ((x, 2, (1, 2), True), {}), "keywords": ((x,), {"dim": -1, "keepdim": True}),
                    "inf": ((x, float("inf"), 2), {})}[call]
    names = same_value_and_gradient(torch.linalg.vector_norm, *args, **kwargs)
    assert names == ["Tensor.norm"]


def test_vector_norm_with_a_dtype_or_out_is_the_op_itself():
    """With ``dtype`` (or ``out``) the parts call ``linalg.vector_norm`` itself: the result has that dtype, and
    ``keepdim`` is passed on. Kills decompositions ``_vector_norm`` 15."""
    x = randn(3, 4, dtype=torch.float32)
    value, names = parts_of(torch.linalg.vector_norm, x, 2, 1, dtype=torch.float64)
    assert value.dtype == torch.float64 and names == ["torch.linalg_vector_norm"]
    torch.testing.assert_close(value, torch.linalg.vector_norm(x, 2, 1, dtype=torch.float64), atol=0, rtol=0)
    value, _ = parts_of(torch.linalg.vector_norm, x, 3, 1, True, dtype=torch.float64)  # keepdim kept
    torch.testing.assert_close(value, torch.linalg.vector_norm(x, 3, 1, True, dtype=torch.float64), atol=0, rtol=0)
    out = torch.empty(4, dtype=DTYPE)
    value, _ = parts_of(torch.linalg.vector_norm, randn(3, 4), 1, 0, out=out)
    torch.testing.assert_close(out, randn(3, 4).abs().sum(0), atol=1e-15, rtol=0)


# ----------------------------------------------------------------------- F.prelu
@pytest.mark.parametrize("func", [F.prelu, torch.prelu])
@pytest.mark.parametrize("slopes", [1, 6])
@pytest.mark.parametrize("keywords", [False, True])
def test_prelu_is_relu_minus_the_slope_times_relu_of_minus_x(func, slopes, keywords):
    """``prelu(x, w) = relu(x) - w * relu(-x)``: one slope, or one per feature of a ``[b, features]`` input,
    positional or by keyword."""
    x, weight = randn(4, 6), randn(slopes, seed=1).abs() + 0.1
    if keywords:
        names = same_value_and_gradient(func, input=x, weight=weight)
    else:
        names = same_value_and_gradient(func, x, weight)
    assert names == ["torch.nn.functional.relu", "Tensor.neg", "torch.nn.functional.relu", "Tensor.mul",
                     "Tensor.sub"]


def test_prelu_with_a_slope_per_channel_of_positions_is_not_decomposed():
    """A slope per channel of a ``[b, channels, length]`` input (the slopes on axis 1, not the last): no parts
    (``relu(x) - w * relu(-x)`` would broadcast ``w`` over the last axis); nor without a tensor weight."""
    assert decomposition(F.prelu, (randn(2, 3, 3), randn(3)), {}) is None
    assert decomposition(F.prelu, (randn(2, 3), randn(2)), {}) is None
    assert decomposition(F.prelu, (randn(2, 3),), {"weight": 0.25}) is None
    assert decomposition(F.prelu, (), {"input": randn(2, 3, 3), "weight": randn(3)}) is None
    same_value_and_gradient(F.prelu, randn(2, 3, 3), randn(1))  # one slope: any shape


# ----------------------------------------------------------------------- x @ v
@pytest.mark.parametrize("func", [torch.matmul, Tensor.matmul, Tensor.__matmul__])
@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5), (2, 3, 4, 5)])
def test_a_matrix_times_a_vector_is_a_linear_map_with_one_output(func, shape):
    """``x @ v`` for a vector ``v`` (a learned query scoring each token) is ``F.linear`` with one output, its
    axis dropped."""
    names = same_value_and_gradient(func, randn(*shape), randn(5, seed=1))
    assert names == ["Tensor.unsqueeze", "torch.nn.functional.linear", "Tensor.squeeze"]


def test_other_matrix_products_are_followed_as_matmul():
    """A matrix times a matrix, a vector times a matrix or a vector, or a call by keyword: the trace follows
    ``matmul`` itself (no parts)."""
    assert decomposition(torch.matmul, (randn(4, 5), randn(5, 2)), {}) is None
    assert decomposition(torch.matmul, (randn(5), randn(5, 2)), {}) is None
    assert decomposition(torch.matmul, (randn(5), randn(5)), {}) is None
    assert decomposition(torch.matmul, (randn(4, 5),), {"other": randn(5)}) is None
    assert decomposition(torch.matmul, (randn(4, 5), randn(5), randn(5)), {}) is None


# ----------------------------------------------------------------------- einsum
LINEAR_EQUATIONS = {  # equation: (operand shapes, whether the parts transpose the matrix)
    "bi,oi->bo": ((4, 5), (3, 5)),
    "bi,io->bo": ((4, 5), (5, 3)),
    "oi,bi->bo": ((3, 5), (4, 5)),
    "io,bi->bo": ((5, 3), (4, 5)),
    "...i,io->...o": ((2, 4, 5), (5, 3)),
    "btd,ed->bte": ((2, 4, 5), (3, 5)),
    " b t d , e d -> b t e ": ((2, 4, 5), (3, 5)),
}


@pytest.mark.parametrize("equation", sorted(LINEAR_EQUATIONS))
@pytest.mark.parametrize("as_list", [False, True])
def test_an_einsum_that_maps_the_last_axis_with_a_matrix_is_f_linear(equation, as_list):
    """A two-operand einsum mapping the last axis of one operand with a matrix (either order, ``...``, spaces,
    the operands listed or passed one by one) is ``F.linear`` of it, the matrix transposed where its
    contracted letter comes first."""
    shapes = LINEAR_EQUATIONS[equation]
    operands = [randn(*shape, seed=i) for i, shape in enumerate(shapes)]
    names = same_value_and_gradient(torch.einsum, equation, operands) if as_list else \
        same_value_and_gradient(torch.einsum, equation, *operands)
    matrix_term = [term for term in equation.replace(" ", "").split("->")[0].split(",") if len(term) == 2 and
                   "." not in term and term not in ("bi",)][0]
    transposed = matrix_term.index("i" if "i" in matrix_term else "d") == 0
    assert names == (["Tensor.t", "torch.nn.functional.linear"] if transposed else ["torch.nn.functional.linear"])


@pytest.mark.parametrize("equation,shapes", [("btd,d->bt", ((2, 4, 5), (5,))), ("d,btd->bt", ((5,), (2, 4, 5))),
                                             ("bd,d->b", ((3, 5), (5,)))])
def test_an_einsum_of_a_matrix_and_a_vector_is_x_at_v(equation, shapes):
    """``"btd,d->bt"`` (either order): the tokens times a vector, ``F.linear`` with one output."""
    names = same_value_and_gradient(torch.einsum, equation, *(randn(*shape, seed=i) for i, shape in enumerate(shapes)))
    assert names == ["Tensor.unsqueeze", "torch.nn.functional.linear", "Tensor.squeeze"]


MATMUL_EQUATIONS = {
    "bhid,bhjd->bhij": ((2, 3, 4, 5), (2, 3, 6, 5)),
    "bhij,bhjd->bhid": ((2, 3, 4, 6), (2, 3, 6, 5)),
    "bid,bjd->bji": ((2, 4, 5), (2, 6, 5)),
    "hbid,bhjd->bhij": ((3, 2, 4, 5), (2, 3, 6, 5)),
    "bhid,bhjd->hbji": ((2, 3, 4, 5), (2, 3, 6, 5)),
    "bij,bkj->bik": ((2, 3, 4), (2, 5, 4)),
    " b h i d , b h j d -> b h i j ": ((2, 3, 4, 5), (2, 3, 6, 5)),
}


@pytest.mark.parametrize("equation", sorted(MATMUL_EQUATIONS))
def test_an_einsum_that_is_a_batched_matrix_product_is_matmul_of_permuted_operands(equation):
    """Batch letters in both operands and the output, one free letter per operand, one summed: ``matmul`` of
    the operands permuted to ``[batch, free, summed]`` / ``[batch, summed, free]``, the product permuted to the
    output's order only where it differs."""
    shapes = MATMUL_EQUATIONS[equation]
    names = same_value_and_gradient(torch.einsum, equation, *(randn(*shape, seed=i) for i, shape in enumerate(shapes)))
    assert [name for name in names if name != "Tensor.permute"] == ["torch.matmul"]
    inputs, output = equation.replace(" ", "").split("->")
    left, right = inputs.split(",")
    batch = [letter for letter in output if letter in left and letter in right]
    produced = "".join((*batch, *(letter for letter in left if letter not in right),
                        *(letter for letter in right if letter not in left)))
    assert names[-1] == ("torch.matmul" if produced == output else "Tensor.permute")


PRODUCT_SUM_EQUATIONS = {
    "bt,btd->bd": ((2, 4), (2, 4, 5)),
    "btd,bt->bd": ((2, 4, 5), (2, 4)),
    "bt,btd->btd": ((2, 4), (2, 4, 5)),
    "btd,bt->dbt": ((2, 4, 5), (2, 4)),
    "bd,bd->b": ((3, 5), (3, 5)),
    "btd,btd->": ((2, 4, 5), (2, 4, 5)),
    "bt,tbd->db": ((2, 4), (4, 2, 5)),
    "b t , b t d -> b d": ((2, 4), (2, 4, 5)),
    ",d->d": ((), (5,)),
    ",ij->ij": ((), (3, 4)),
    "ij,->ji": ((3, 4), ()),
}


@pytest.mark.parametrize("equation", sorted(PRODUCT_SUM_EQUATIONS))
def test_any_other_einsum_of_nested_letters_is_the_aligned_product_summed(equation):
    """One operand's letters all the other's: the product of the operands aligned on their letters, summed over
    the letters the output drops (none: the product itself); spaces in the equation, a scalar operand. Kills
    decompositions ``_einsum_as_product_sum`` 15, 16, ``_einsum_as_matmul`` 15, 16 (the spaced attention product
    above) and ``_einsum_as_linear`` 33-36, 56 (a scalar operand: its empty term)."""
    shapes = PRODUCT_SUM_EQUATIONS[equation]
    names = same_value_and_gradient(torch.einsum, equation, *(randn(*shape, seed=i) for i, shape in enumerate(shapes)))
    assert "torch.einsum" not in names and "Tensor.mul" in names
    inputs, output = equation.replace(" ", "").split("->")
    assert ("Tensor.sum" in names) == (len(set(output)) < len(set(inputs) - {","}))


@pytest.mark.parametrize("equation,shapes", [
    ("bhid,bhje->bhij", ((2, 3, 4, 5), (2, 3, 6, 7))),  # two separate sums
    ("bhid,bhjd->bij", ((2, 3, 4, 5), (2, 3, 6, 5))),  # a head summed too
    ("bi,ij,bj->bi", ((2, 3), (3, 3), (2, 3))),  # three operands
    ("b...,b...->b", ((2, 3), (2, 3))),
    ("bii,bi->bi", ((2, 3, 3), (2, 3))),
    ("bi,bj->bij", ((2, 3), (2, 4))),  # an outer product: neither's letters all the other's
    ("bi->b", ((2, 3),)),
    ("bi,oi", ((2, 3), (4, 3))),  # implicit output
    ("bi,oi,bo->bo", ((2, 3), (4, 3))),  # three terms, two operands (torch refuses it)
    ("bi,oi,bo->bo", ((2, 3), (4,))),
    ("bi,bi,bi->b", ((2, 3), (2, 3))),  # three terms, two operands
    ("bdd,d->bd", ((2, 3, 3), (3,))),  # a diagonal times a vector
    ("bij,bjjk->bik", ((2, 3, 4), (2, 4, 4, 5))),  # a diagonal, then a batched product
])
def test_other_einsums_have_no_parts(equation, shapes):
    """What no decomposition reads: the trace refuses the einsum by name. A repeated letter (a diagonal) is none of
    the forms: read as one, ``"bdd,d->bd"`` would be a sum over ``x[b, i, :] v`` and ``"bij,bjjk->bik"`` a permute
    of the wrong rank. Kills decompositions ``_einsum_as_linear`` 32, ``_einsum_as_matmul`` 21, 22 and
    ``_einsum_as_product_sum`` 25."""
    assert decomposition(torch.einsum, (equation, *(randn(*shape) for shape in shapes)), {}) is None
    assert decomposition(torch.einsum, (equation, [randn(*shape) for shape in shapes]), {}) is None


def test_an_einsum_with_a_non_tensor_operand_or_no_equation_has_no_parts():
    assert decomposition(torch.einsum, ("bi,oi->bo", randn(2, 3), 2.0), {}) is None
    assert decomposition(torch.einsum, (randn(2, 3),), {}) is None
    assert decomposition(torch.einsum, (), {"equation": "bi,oi->bo"}) is None


# ----------------------------------------------------------------------- softmax
SOFTMAX_CALLS = {
    "F.softmax": lambda x: (F.softmax, (x, 1), {}),
    "F.softmax dim keyword": lambda x: (F.softmax, (x,), {"dim": -1}),
    "F.softmax dtype positional": lambda x: (F.softmax, (x.float(), 1, 3, DTYPE), {}),
    "F.softmax dtype keyword": lambda x: (F.softmax, (x.float(), 0), {"dtype": DTYPE}),
    "torch.softmax": lambda x: (torch.softmax, (x, 2), {}),
    "torch.softmax dtype positional": lambda x: (torch.softmax, (x.float(), 1, DTYPE), {}),
    "Tensor.softmax": lambda x: (Tensor.softmax, (x, -2), {}),
    "F.log_softmax": lambda x: (F.log_softmax, (x, 1), {}),
    "F.log_softmax dtype positional": lambda x: (F.log_softmax, (x.float(), 2, 3, DTYPE), {}),
    "torch.log_softmax": lambda x: (torch.log_softmax, (x,), {"dim": 0}),
    "torch.log_softmax dtype positional": lambda x: (torch.log_softmax, (x.float(), -1, DTYPE), {}),
    "Tensor.log_softmax": lambda x: (Tensor.log_softmax, (x, 1), {}),
}


@pytest.mark.parametrize("call", sorted(SOFTMAX_CALLS))
def test_softmax_parts_give_the_softmax_and_its_gradient(call):
    """``exp(x - c) / sum(exp(x - c))`` (the log form ``x - c - log(sum(exp(x - c)))``) over the softmax's axis,
    the dtype given positionally (``F.softmax(x, dim, _stacklevel, dtype)``, ``torch.softmax(x, dim, dtype)``)
    or by keyword; scores spread over hundreds stay finite (``c`` the maximum along the axis); no cast without a
    dtype. Kills decompositions ``softmax_parts`` 41."""
    x = randn(3, 4, 5) * 300
    func, args, kwargs = SOFTMAX_CALLS[call](x)
    assert is_softmax(func)
    parts = softmax_parts(func, args, kwargs)
    leaf = args[0].detach().requires_grad_(True)
    args = (leaf, *args[1:])
    run = softmax_parts(func, args, kwargs)
    with Record() as record:
        value = run()
    expected = func(*args, **kwargs)
    assert parts is not None and value.dtype == expected.dtype == DTYPE
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)
    weights = randn(*expected.shape, seed=5)
    torch.testing.assert_close(torch.autograd.grad((value * weights).sum(), leaf)[0],
                               torch.autograd.grad((expected * weights).sum(), leaf)[0], atol=1e-12, rtol=0)
    log = SOFTMAX_FUNCTIONS[func]
    cast = ["Tensor.to"] if "dtype" in call else []
    assert record.names == cast + (["Tensor.sub", "torch.exp", "Tensor.sum", "torch.log", "Tensor.sub"] if log else
                                   ["Tensor.sub", "torch.exp", "Tensor.sum", "torch.exp", "Tensor.div"])
    assert "Tensor.amax" not in record.names  # the shift is taken with the trace off: a constant


def test_softmax_parts_need_an_integer_dim_and_a_tensor_of_some_axis():
    assert softmax_parts(F.softmax, (randn(3, 4),), {}) is None
    assert softmax_parts(F.softmax, (randn(3, 4), None), {}) is None
    assert softmax_parts(F.softmax, (randn(3, 4), (0, 1)), {}) is None
    assert softmax_parts(torch.softmax, (2.0, 0), {}) is None
    assert softmax_parts(torch.softmax, (randn(), 0), {}) is None
    value = softmax_parts(torch.softmax, (), {"input": randn(4), "dim": 0})()  # one axis
    torch.testing.assert_close(value, torch.softmax(randn(4), 0), atol=1e-15, rtol=0)


def test_is_softmax_knows_the_six_and_nothing_else():
    class Unhashable:
        __hash__ = None

        def __call__(self, x):
            return x

    assert all(is_softmax(func) for func in (F.softmax, torch.softmax, Tensor.softmax, F.log_softmax,
                                             torch.log_softmax, Tensor.log_softmax))
    assert not is_softmax(F.relu) and not is_softmax(torch.exp) and not is_softmax(Unhashable())
    assert [SOFTMAX_FUNCTIONS[f] for f in (F.softmax, torch.softmax, Tensor.softmax)] == [False] * 3
    assert [SOFTMAX_FUNCTIONS[f] for f in (F.log_softmax, torch.log_softmax, Tensor.log_softmax)] == [True] * 3


# ----------------------------------------------------------------------- the dispatch
def test_decomposition_is_none_for_what_it_does_not_decompose():
    class Unhashable:
        __hash__ = None

        def __call__(self, x):
            return x

    assert decomposition(Unhashable(), (randn(2),), {}) is None
    assert decomposition(F.linear, (randn(2, 3), randn(4, 3)), {}) is None
    assert decomposition(torch.softmax, (randn(2, 3), 1), {}) is None  # softmax_parts decides, where it runs
    assert F.linear not in DECOMPOSABLE and torch.einsum in DECOMPOSABLE and F.pad in DECOMPOSABLE


def test_a_batched_convolution_and_a_recurrent_op_run_as_their_parts():
    """``F.conv1d`` of a batch (taps, then ``F.linear``), ``F.pad`` with a padding mode (indexing) and
    ``torch.rnn_tanh`` (``nn.RNN``'s fused op, step by step) give the op's value."""
    x, weight = randn(2, 3, 7), randn(4, 3, 3, seed=1)
    names = same_value_and_gradient(F.conv1d, x, weight, randn(4, seed=2), 1, 1)
    assert "torch.nn.functional.linear" in names and "torch.conv1d" not in names
    names = same_value_and_gradient(F.pad, randn(2, 3, 7), (2, 1), "reflect")
    assert "torch.nn.functional.pad" not in names
    rnn = nn.RNN(3, 4, batch_first=True).to(DTYPE)
    inputs = randn(2, 5, 3)
    with Record():
        pass
    expected, _ = rnn(inputs)
    seen = []

    class Decompose(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            parts = decomposition(func, args, kwargs or {})
            if parts is not None and func is torch.rnn_tanh:
                seen.append(func)
                return parts()
            return func(*args, **(kwargs or {}))

    with Decompose():
        value, _ = rnn(inputs)
    assert seen == [torch.rnn_tanh]
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------- in a model
class Written(nn.Module):
    """``Linear -> op -> Linear`` over ``[b, 3, 4]`` tokens, the op one of the decomposed forms."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.first, self.out = nn.Linear(4, 8), nn.Linear(4 if form.startswith("glu") else 8, 2)
        if form.startswith("einsum"):
            self.weight = nn.Parameter(torch.randn(8, 8) / 3)
        if "prelu" in form:
            self.slope = nn.Parameter(torch.rand(1) * 0.4 + 0.1)

    def forward(self, x):
        h = self.first(x)
        form = self.form
        if form == "glu dim -1":
            h = F.glu(h, -1)
        elif form == "glu keyword":
            h = F.glu(input=h, dim=2)
        elif form == "normalize p 1":
            h = F.normalize(torch.tanh(h), p=1.0, dim=-1)
        elif form == "normalize eps":
            h = F.normalize(torch.tanh(h) * 1e-3, 2.0, 2, 0.5)
        elif form == "vector_norm rms":
            h = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        elif form == "vector_norm ord 3":
            h = h * torch.linalg.vector_norm(h, 3, -1, True)
        elif form == "prelu keywords":
            h = F.prelu(input=h, weight=self.slope)
        elif form == "torch.prelu":
            h = torch.prelu(h, self.slope)
        elif form == "einsum list":
            h = torch.tanh(torch.einsum("btd,ed->bte", [h, self.weight]))
        elif form == "einsum transposed":
            h = torch.tanh(torch.einsum("de,btd->bte", self.weight, h))
        return self.out(h).sum(1)


@pytest.mark.parametrize("form", ["glu dim -1", "glu keyword", "normalize p 1", "normalize eps", "vector_norm rms",
                                  "vector_norm ord 3", "prelu keywords", "torch.prelu", "einsum list",
                                  "einsum transposed"])
def test_a_model_written_with_a_decomposed_op_converts_exactly(form):
    torch.manual_seed(7)
    exact(Written(form).to(DTYPE), torch.randn(4, 3, 4, dtype=DTYPE))


def test_an_einsum_that_is_no_decomposition_is_refused_by_name():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.out = nn.Linear(4, 3), nn.Linear(9, 2)

        def forward(self, x):
            h = torch.tanh(self.first(x))
            return self.out(torch.einsum("bi,bj->bij", h, h).flatten(1))

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+Outer.forward: torch\.einsum: gradgraph has "
                       r"no rule for this op, and its result reaches torch\.nn\.functional\.linear with the parameter "
                       r"'out\.weight' at "):
        gradgraph.to_graph(Outer().to(DTYPE), torch.randn(4, 4, dtype=DTYPE), None, squared)


def test_a_recurrent_cell_called_with_keywords_is_no_decomposition():
    """``torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih=..., b_hh=...)``: the step-by-step parts read positional
    arguments only; with keywords the trace follows (refuses) the op rather than drop its biases. Kills
    decompositions ``decomposition`` 110."""
    x, h = randn(2, 3), randn(2, 4, seed=1)
    weights = (randn(4, 3, seed=2), randn(4, 4, seed=3))
    biases = {"b_ih": randn(4, seed=4), "b_hh": randn(4, seed=5)}
    assert decomposition(torch.rnn_tanh_cell, (x, h, *weights), biases) is None
    same_value_and_gradient(torch.rnn_tanh_cell, x, h, *weights, *biases.values())
