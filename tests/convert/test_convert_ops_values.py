"""Per-function checks of ``convert/trace/ops.py`` (issue 31, run decompositions 1): the names ``op_name`` gives
the functions users call (torch's aliases named as the op they alias, tensor attributes, ``torch.nn.functional``,
``torch.special``, ``torch.fft``, a factory's function, a user's own), its bounded cache, ``numpy_keywords``,
``out_of_place_name`` and ``register_elementwise`` (its refusals matched in full); and each alias converts to the
graph of its canonical op, tensor for tensor. The tests written for a run's survivors name the mutants they kill
(``.mutation/convert-decompositions/``'s numbering)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_values import exact
from strategies import assert_same_graph
from torch import nn, Tensor

from gradgraph import ActivationKind
from gradgraph.convert.trace import ops
from gradgraph.convert.trace.ops import numpy_keywords, op_name, out_of_place_name, register_elementwise

DTYPE = torch.float64


class Captured(torch.overrides.TorchFunctionMode):
    """The functions torch hands ``__torch_function__`` (a tensor attribute's getter among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.funcs: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fresh_names():
    """``op_name``'s cache emptied for the test (every name made afresh, then read from the cache), then put back."""
    saved = dict(ops._OP_NAMES)
    ops._OP_NAMES.clear()
    yield
    ops._OP_NAMES.clear()
    ops._OP_NAMES.update(saved)


class Callable:
    """A callable object with the name attributes a test gives it (none by default: not even ``__module__``)."""

    __module__ = None

    def __init__(self, **attributes) -> None:
        for key, value in attributes.items():
            setattr(self, key, value)

    def __call__(self, x):
        return x


def factory_made(name):
    def fn(x):
        return x

    fn.__name__ = name
    return fn


def users_own(x):
    return x


@pytest.mark.parametrize("func,name", [
    (torch.add, "torch.add"), (Tensor.add, "Tensor.add"), (Tensor.add_, "Tensor.add_"),
    (Tensor.__matmul__, "Tensor.__matmul__"), (F.linear, "torch.nn.functional.linear"),
    (F.softmax, "torch.nn.functional.softmax"), (F.gelu, "torch.nn.functional.gelu"),
    (F.max_pool2d, "torch.nn.functional.max_pool2d"),
    (F.adaptive_max_pool1d, "torch.nn.functional.adaptive_max_pool1d"),
    (torch.special.erf, "torch.special.erf"), (torch.special.expit, "torch.special.expit"),
    (torch.fft.fft, "torch.fft.fft"), (torch.fft.rfft, "torch.fft.rfft"),
    (torch.multiply, "torch.mul"), (Tensor.multiply, "Tensor.mul"), (Tensor.multiply_, "Tensor.mul_"),
    (torch.subtract, "torch.sub"), (Tensor.subtract_, "Tensor.sub_"), (torch.divide, "torch.div"),
    (torch.true_divide, "torch.div"), (Tensor.true_divide_, "Tensor.div_"), (torch.negative, "torch.neg"),
    (Tensor.negative_, "Tensor.neg_"), (torch.absolute, "torch.abs"), (Tensor.absolute, "Tensor.abs"),
    (torch.clip, "torch.clamp"), (Tensor.clip_, "Tensor.clamp_"), (torch.arctan, "torch.atan"),
    (Tensor.arctan, "Tensor.atan"), (torch.arcsinh, "torch.asinh"), (Tensor.arcsinh_, "Tensor.asinh_"),
    (torch.concat, "torch.cat"), (torch.concatenate, "torch.cat"),
    (users_own, f"{__name__}.users_own"), (factory_made("snake"), f"{__name__}.snake"),
    (torch.einsum, "torch.einsum"), (torch.norm, "torch.norm"), (torch.split, "torch.split"),
    (Callable(__qualname__="snake"), "torch.snake"), (Callable(__name__="snake", __module__="mine"), "mine.snake"),
    (Callable(__qualname__="make.<locals>.snake"), "torch.make.<locals>.snake"),
    (Callable(__qualname__="make.<locals>.snake", __name__="<lambda>"), "torch.make.<locals>.snake"),
    (Callable(__qualname__="make.<locals>.fn", __name__="snake"), "torch.snake"),
    (Callable(__qualname__="halves.__get__"), "Tensor.halves (attribute)"),
    (Callable(__qualname__="_VariableFunctionsClass.subtract", __module__="torch"), "torch.sub"),
    (Callable(__qualname__="TensorBase.clip_"), "Tensor.clamp_"),
    (Callable(__qualname__="TensorBase.sum"), "Tensor.sum"),
    (Tensor.split, "Tensor.split"), (Tensor.norm, "Tensor.norm"), (Tensor.__rsub__, "Tensor.__rsub__"),
])
def test_op_name_on_an_empty_cache_names_torch_functions_as_the_rules_know_them(func, name, fresh_names):
    """``op_name`` (twice: the second from its cache, emptied before) and the table's aliases; Python functions of
    ``torch`` (``torch.einsum`` is ``torch.functional.einsum``) named ``torch.*``; callables with only some of the
    name attributes (no ``__qualname__``, no ``__name__``, no ``__module__``, a factory's ``<locals>``, a getter
    without its descriptor), ``Tensor``'s Python methods (``Tensor.split``). Kills ops ``op_name`` 4, 10 and
    ``_name_of``'s 76 (run decompositions 1: the cache, filled before, hid every one of them; the test has a new
    name since run decompositions 2, whose stats mutmut had mapped to ``op_name`` alone)."""
    assert op_name(func) == name
    assert op_name(func) == name


def test_a_callable_with_no_name_at_all_is_named_by_its_repr(fresh_names):
    function = Callable()
    function.__class__.__repr__ = lambda self: "<snake>"
    try:
        assert op_name(function) == "torch.<snake>"
    finally:
        del Callable.__repr__


def test_a_tensor_attribute_is_named_by_its_descriptor(fresh_names):
    """``W.T``, ``W.mT``: torch hands the attribute's getter; it is named ``Tensor.T (attribute)``."""
    weight = torch.randn(3, 4, dtype=DTYPE)
    with Captured() as captured:
        weight.T, weight.mT, weight.H  # noqa: B018
    assert [op_name(func) for func in captured.funcs] == ["Tensor.T (attribute)", "Tensor.mT (attribute)",
                                                          "Tensor.H (attribute)"]


def test_a_lambda_keeps_its_qualified_name_and_an_unhashable_callable_is_named_without_the_cache():
    class Unhashable:
        __hash__ = None
        __qualname__ = "torch.multiply"

        def __call__(self, x):
            return x

    function = lambda x: x  # noqa: E731
    assert op_name(function) == f"{__name__}.test_a_lambda_keeps_its_qualified_name_and_an_unhashable_" \
                                f"callable_is_named_without_the_cache.<locals>.<lambda>"
    unhashable = Unhashable()
    unhashable.__qualname__ = "_VariableFunctionsClass.multiply"
    unhashable.__module__ = "torch"
    assert op_name(unhashable) == "torch.mul"
    unhashable.__qualname__ = "TensorBase.clip_"
    assert op_name(unhashable) == "Tensor.clamp_"
    unhashable.__qualname__ = "TensorBase.add"  # no alias: its own name. Kills ops ``op_name`` 14-16
    assert op_name(unhashable) == "Tensor.add"


def test_the_cache_of_names_stops_at_4096_entries():
    """Callables made afresh per call would only fill the cache: it keeps at most 4096, then names without it."""
    saved = dict(ops._OP_NAMES)
    try:
        ops._OP_NAMES.clear()
        functions = [factory_made(f"made{i}") for i in range(4100)]
        assert [op_name(function) for function in functions] == [f"{__name__}.made{i}" for i in range(4100)]
        assert len(ops._OP_NAMES) == 4096 and functions[4095] in ops._OP_NAMES and functions[4096] not in ops._OP_NAMES
        assert [op_name(function) for function in functions] == [f"{__name__}.made{i}" for i in range(4100)]
    finally:
        ops._OP_NAMES.clear()
        ops._OP_NAMES.update(saved)


def test_numpy_keywords_are_torch_keywords_except_for_python_functions():
    assert numpy_keywords("torch.mean", {"axis": -1, "keepdims": True, "dtype": DTYPE}) == \
        {"dim": -1, "keepdim": True, "dtype": DTYPE}
    assert numpy_keywords("Tensor.sum", {"axis": 1}) == {"dim": 1}
    assert numpy_keywords("Tensor.amax", {"keepdims": False, "dim": 0}) == {"keepdim": False, "dim": 0}
    kwargs = {"dim": 1, "keepdim": True}
    assert numpy_keywords("torch.mean", kwargs) is kwargs
    kwargs = {"axis": 1}
    assert numpy_keywords("torch.nn.functional.softmax", kwargs) is kwargs
    assert list(numpy_keywords("torch.sum", {"dtype": DTYPE, "axis": 0, "keepdims": True})) == ["dtype", "dim",
                                                                                               "keepdim"]


@pytest.mark.parametrize("name,out_of_place", [
    ("Tensor.div_", "Tensor.div"), ("torch.relu_", "torch.relu"), ("Tensor.masked_fill_", "Tensor.masked_fill"),
    ("Tensor.__itruediv__", "Tensor.__truediv__"), ("Tensor.__iadd__", "Tensor.__add__"),
    ("Tensor.__imatmul__", "Tensor.__matmul__"), ("Tensor.__ipow__", "Tensor.__pow__"),
    ("Tensor.div", None), ("Tensor.__add__", None), ("Tensor.__init__", None), ("Tensor.__index__", None),
    ("Tensor.__setitem__", None), ("torch.nn.functional.relu", None), ("Tensor.__getitem__ (no-op)", None),
])
def test_out_of_place_name(name, out_of_place):
    assert out_of_place_name(name) == out_of_place


def test_register_elementwise_refuses_what_is_neither_a_module_type_nor_a_function():
    with pytest.raises(TypeError, match=r"^register_elementwise: int is not an nn.Module subclass$"):
        register_elementwise(int)
    with pytest.raises(TypeError, match=r"^register_elementwise: expected a module type or a function, got 3$"):
        register_elementwise(3)
    with pytest.raises(TypeError, match=r"^register_elementwise: expected a module type or a function, got 'x'$"):
        register_elementwise("x")


def test_register_elementwise_labels_a_module_type_or_a_function_with_its_activation():
    class Snake(nn.Module):
        def forward(self, x):
            return x + torch.sin(x).pow(2)

    try:
        register_elementwise(Snake)
        register_elementwise(torch.special.erfinv, 5)
        register_elementwise(torch.special.i0, ActivationKind.RELU)
        assert ops.ELEMENTWISE_MODULES[Snake] is ActivationKind.IDENTITY
        assert ops.ELEMENTWISE_FUNCTIONS["torch.special.erfinv"] is ActivationKind.TANH
        assert ops.ELEMENTWISE_FUNCTIONS["torch.special.i0"] is ActivationKind.RELU
    finally:
        ops.ELEMENTWISE_MODULES.pop(Snake, None)
        ops.ELEMENTWISE_FUNCTIONS.pop("torch.special.erfinv", None)
        ops.ELEMENTWISE_FUNCTIONS.pop("torch.special.i0", None)


class Written(nn.Module):
    """``Linear -> op(h, g) -> Linear`` for a binary or unary op written as ``op``, on ``[b, 3, 4]`` tokens."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.first, self.gate, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h, g = torch.tanh(self.first(x)), torch.sigmoid(self.gate(x)) + 0.5
        return self.out(self.op(h, g)).sum(1)


ALIASES = {  # alias: (written with the alias, written with the op it aliases)
    "torch.multiply": (lambda h, g: torch.multiply(h, g), lambda h, g: torch.mul(h, g)),
    "Tensor.multiply": (lambda h, g: h.multiply(g), lambda h, g: h.mul(g)),
    "torch.subtract": (lambda h, g: torch.subtract(h, 0.5), lambda h, g: torch.sub(h, 0.5)),
    "Tensor.subtract": (lambda h, g: h.subtract(h * g), lambda h, g: h.sub(h * g)),
    "torch.divide": (lambda h, g: torch.divide(h, g), lambda h, g: torch.div(h, g)),
    "Tensor.true_divide": (lambda h, g: h.true_divide(2.0), lambda h, g: h.div(2.0)),
    "torch.negative": (lambda h, g: torch.negative(h) * g, lambda h, g: torch.neg(h) * g),
    "Tensor.absolute": (lambda h, g: h.absolute() + g, lambda h, g: h.abs() + g),
    "torch.clip": (lambda h, g: torch.clip(h * 3, -1.0, 1.0), lambda h, g: torch.clamp(h * 3, -1.0, 1.0)),
    "Tensor.clip": (lambda h, g: (h * 3).clip(min=-1.0), lambda h, g: (h * 3).clamp(min=-1.0)),
    "torch.arctan": (lambda h, g: torch.arctan(h + g), lambda h, g: torch.atan(h + g)),
    "Tensor.arcsinh": (lambda h, g: (h + g).arcsinh(), lambda h, g: (h + g).asinh()),
    "torch.concat": (lambda h, g: torch.concat([h[..., :3], g[..., 3:]], -1),
                     lambda h, g: torch.cat([h[..., :3], g[..., 3:]], -1)),
    "torch.concatenate": (lambda h, g: torch.concatenate((h[..., :2], g[..., 2:]), axis=-1),
                          lambda h, g: torch.cat((h[..., :2], g[..., 2:]), dim=-1)),
    "torch.mean axis keepdims": (lambda h, g: h - torch.mean(h, axis=-1, keepdims=True),
                                 lambda h, g: h - torch.mean(h, dim=-1, keepdim=True)),
    "Tensor.sum axis": (lambda h, g: h * h.sum(axis=-1, keepdim=True), lambda h, g: h * h.sum(dim=-1, keepdim=True)),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_alias_converts_to_the_graph_of_the_op_it_aliases(alias):
    """torch's aliases and NumPy's keywords: exact per-sample gradients and the canonical op's graph, tensor for
    tensor."""
    with_alias, canonical = ALIASES[alias]
    torch.manual_seed(5)
    first = Written(with_alias).to(DTYPE)
    second = Written(canonical).to(DTYPE)
    second.load_state_dict(first.state_dict())
    inputs = torch.randn(4, 3, 4, dtype=DTYPE)
    graph = exact(first, inputs)
    assert_same_graph(graph, exact(second, inputs), atol=0)
