"""Which torch functions the trace knows, by name, and how users teach it their elementwise ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.convert.activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ONE_OP_MODULES
from gradgraph.graph import ActivationKind
from gradgraph.value_reads import DETACH_FUNCTIONS, VALUE_READ_FUNCTIONS


# ----------------------------------------------------------------------- op tables
#: ``op_name`` per function seen (a trace and every replay name each op of a forward)
_OP_NAMES: dict[Any, str] = {}


def op_name(func: Any) -> str:
    """The name fingerprints and rules know ``func`` by (``"torch.addmm"``, ``"Tensor.view"``,
    ``"Tensor.shape (attribute)"``, ``"torch.nn.functional.linear"``)."""
    try:
        return _OP_NAMES[func]
    except KeyError:
        name = _name_of(func)
        name = _ALIASES.get(name, name)
        if len(_OP_NAMES) < 4096:  # bounded: callables made afresh per call would only fill it
            _OP_NAMES[func] = name
        return name
    except TypeError:  # unhashable
        name = _name_of(func)
        return _ALIASES.get(name, name)


def _name_of(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if "<locals>" in name and "<" not in getattr(func, "__name__", "<"):
        # a function made by a factory under its own __name__ (F.max_pool2d is torch's
        # boolean_dispatch.<locals>.fn, as are F.adaptive_max_pool2d and the other max pools)
        name = func.__name__
    module = getattr(func, "__module__", None) or ""
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if name.startswith("TensorBase.") or name.startswith("Tensor."):
        return "Tensor." + name.split(".", 1)[1]
    if "__get__" in name:  # a tensor attribute (W.T, W.mT): its getter, named by the descriptor
        owner = getattr(func, "__self__", None)
        attribute = getattr(owner, "__name__", None) or name.split(".")[0]
        return f"Tensor.{attribute} (attribute)"
    if module.startswith("torch._C._nn") or module == "torch.nn.functional":
        return f"torch.nn.functional.{name}"
    if module.startswith("torch._C._special") or module == "torch.special":
        return f"torch.special.{name.removeprefix('special_')}"
    if module.startswith("torch._C._fft") or module == "torch.fft":
        return f"torch.fft.{name.removeprefix('fft_')}"
    return f"torch.{name}" if module.startswith("torch") or not module else f"{module}.{name}"


#: torch's aliases, named as the function they alias so every rule and fingerprint reads them as one
#: (``torch.multiply`` is ``torch.mul``; ConvBERT's attention calls it); their in-place forms too
_ALIASES: dict[str, str] = {
    f"{owner}.{alias}{suffix}": f"{owner}.{name}{suffix}"
    for owner in ("torch", "Tensor") for suffix in ("", "_")
    for alias, name in (("multiply", "mul"), ("subtract", "sub"), ("divide", "div"), ("true_divide", "div"),
                        ("negative", "neg"), ("absolute", "abs"), ("clip", "clamp"), ("arctan", "atan"),
                        ("arcsinh", "asinh"), ("concat", "cat"), ("concatenate", "cat"))
}


def numpy_keywords(name: str, kwargs: dict) -> dict:
    """``kwargs`` with NumPy's keyword names as torch's own: ``axis`` -> ``dim``, ``keepdims`` ->
    ``keepdim``. torch's functions accept both; the rules read ``dim`` (ImageGPT's layer norm calls
    ``torch.mean(..., axis=-1)``, I-BERT's ``x.mean(axis=2)``). Python functions (``torch.nn.functional``)
    are left as called: they take no such alias."""
    if ("axis" in kwargs or "keepdims" in kwargs) and not name.startswith("torch.nn."):
        renamed = {"axis": "dim", "keepdims": "keepdim"}
        return {renamed.get(key, key): value for key, value in kwargs.items()}
    return kwargs


def _names(*functions: Any) -> set[str]:
    return {op_name(function) for function in functions}


def _method(*names: str) -> set[str]:
    return {f"Tensor.{name}" for name in names}


# Shape ops: replayed on the id tensors.
SHAPE_OPS = _method(
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze",
    "expand", "expand_as", "__getitem__", "split", "chunk", "narrow", "movedim", "moveaxis", "swapaxes",
    "swapdims", "unbind", "select", "view_as", "reshape_as", "clone", "tensor_split", "split_with_sizes",
    "repeat", "T (attribute)", "mT (attribute)", "mH (attribute)", "H (attribute)", "roll", "flip",
) | _names(
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.split, torch.chunk, torch.narrow, torch.movedim, torch.swapaxes, torch.unbind, torch.select, torch.t,
    torch.clone, torch.tensor_split, torch.cat, torch.stack, torch.broadcast_to, torch.roll, torch.flip,
) | {"Tensor.broadcast_to"}
#: shape ops whose second tensor gives only a shape (or a dtype): their values are their first argument's
SHAPED_LIKE = {"Tensor.expand_as", "Tensor.view_as", "Tensor.reshape_as", "Tensor.type_as"}
# Casts and eval-mode no-ops: identity on the values' neurons.
#: ops whose result does not depend on their tensor arguments' values (only on shape, dtype,
#: device): constants, as a factory call inside ``forward`` is (an RNN's zero initial state)
CONSTANT_FACTORIES = {f"torch.{name}_like" for name in ("zeros", "ones", "full", "empty")} | _method(
    "new_zeros", "new_ones", "new_full", "new_empty")
#: dropouts by op name, and whether each is active (``training``) when the call does not say:
#: an inactive one returns its input (``nn.Dropout2d`` in eval mode), an active one is refused
DROPOUT_TRAINING_DEFAULT: dict[str, bool] = {
    **{op_name(function): True for function in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)},
    **{op_name(function): False for function in (F.alpha_dropout, F.feature_alpha_dropout)},
    "torch.dropout": True,
}
#: ``F.rrelu``: random slopes in training mode (refused), a leaky ReLU in eval mode
RRELU = op_name(F.rrelu)
IDENTITY_OPS = _method("to", "float", "double", "half", "bfloat16", "type_as", "type", "cpu", "cuda") | {
    *DROPOUT_TRAINING_DEFAULT, "Tensor.__getitem__ (no-op)",
}
#: named activations by op name (from the one table, gradgraph.convert.activations)
ACTIVATION_OPS: dict[str, ActivationKind] = {
    **{op_name(function): kind for function, kind in ACTIVATION_FUNCTIONS.items()},
    **{f"Tensor.{method}": kind for method, kind in ACTIVATION_METHODS.items()},
}
UNARY = set(ACTIVATION_OPS) | _names(
    F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.logsigmoid,
    F.softsign, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.cos, torch.erf,
    torch.square, torch.reciprocal, torch.clamp, torch.pow, torch.exp2, torch.log1p, torch.expm1, torch.sign,
    torch.special.erf, torch.special.expit, torch.nan_to_num, F.tanhshrink, F.softshrink, F.hardshrink, F.threshold,
    F.rrelu, torch.atan, torch.sinh, torch.asinh,
) | _method(
    "exp", "log", "sqrt", "rsqrt", "abs", "neg", "__neg__", "cos", "erf", "square", "reciprocal", "clamp", "pow",
    "clamp_min", "clamp_max", "float_power", "sign", "log1p", "expm1", "hardshrink", "atan", "sinh", "asinh",
)
BINARY_ADD = _method("__add__", "__radd__", "__sub__", "__rsub__", "add", "sub") | _names(torch.add, torch.sub)
BINARY_MUL = _method("__mul__", "__rmul__", "__truediv__", "__rdiv__", "mul", "div") | _names(
    torch.mul, torch.div
)
#: ops whose parameter operand is not a bias or a scale of the neurons (``h - v``, ``h / v``)
PARAMETER_REFUSED = _method("__sub__", "__rsub__", "sub", "__truediv__", "__rdiv__", "div") | _names(
    torch.sub, torch.div)
#: ops that hand a tensor's values to Python (``float(h[0, 0])``, ``bool(h.max() > 0)``, ``h.tolist()``): what the
#: forward then does with them (a scale, a branch) is no op the trace sees, so the sets read are pinned
#: (``Tracer.__torch_function__``); shape and dtype queries (``h.size()``, ``h.dim()``) read no values
VALUE_READS = frozenset(op_name(function) for function in VALUE_READ_FUNCTIONS)
#: ops that cut a value's gradient explicitly (``h.detach()``): a model output made from them is refused
DETACHES = frozenset(op_name(function) for function in DETACH_FUNCTIONS)
#: in-place operators: they change a value the trace already recorded
IN_PLACE_OPERATORS = _method("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                              "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                              "__irshift__", "__setitem__")


def out_of_place_name(name: str) -> str | None:
    """The out-of-place form of an in-place op's name (``Tensor.div_`` -> ``Tensor.div``,
    ``Tensor.__itruediv__`` -> ``Tensor.__truediv__``); ``None`` for an op that is not in place."""
    prefix, _, method = name.rpartition(".")
    if method.startswith("__i") and method.endswith("__") and name in IN_PLACE_OPERATORS:
        return f"{prefix}.__{method[3:]}"
    if method.endswith("_") and not method.endswith("__"):
        return f"{prefix}.{method[:-1]}"
    return None


BINARY_OTHER = _method("__pow__", "__rpow__", "maximum", "minimum") | _names(torch.maximum, torch.minimum)
REDUCTIONS = _method("sum", "mean", "var", "std", "amax", "amin", "norm", "logsumexp", "max", "min") | _names(
    torch.sum, torch.mean, torch.var, torch.std, torch.amax, torch.amin, torch.norm, torch.logsumexp, torch.max,
    torch.min,
)
#: ``max`` / ``min`` given a second tensor are the elementwise ``maximum`` / ``minimum``, not a reduction
ELEMENTWISE_MAX_MIN = {"Tensor.max": "Tensor.maximum", "Tensor.min": "Tensor.minimum", "torch.max": "torch.maximum",
                       "torch.min": "torch.minimum"}
# (torch.concat and torch.concatenate are named torch.cat: _ALIASES)
JOINS = _names(torch.cat, torch.stack)
CONCATENATIONS = _names(torch.cat)
#: what to do instead of joining the model's input with a constant inside ``forward``
JOINED_INPUT_REMEDY = ("join them before calling the model (pass the input with the token prepended or the features "
                       "padded)")
POOLS = _method("sum", "mean") | _names(torch.sum, torch.mean)
SOFTMAX = _names(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax) | _method("softmax", "log_softmax")
MASK_FILL = _method("masked_fill") | _names(torch.masked_fill)
#: comparisons of two values (``h <= c``): a boolean, no gradient (rules_elementwise.py, ``comparison``)
COMPARISONS = _method("le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__", "__eq__",
                      "__ne__") | _names(torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne)
#: casts a comparison may go through on its way to a mask of the same neurons (``(h > c).float()``)
COMPARISON_CASTS = _method("float", "double", "half", "bfloat16", "to", "type_as", "type", "bool")
WHERE = _names(torch.where)
MATMUL = _method("__matmul__", "__rmatmul__", "matmul", "mm", "bmm") | _names(torch.matmul, torch.mm, torch.bmm)
#: ``beta * bias + alpha * (q @ kᵀ)``: attention scores with a constant bias (Bloom's ALiBi)
BADDBMM = _names(torch.baddbmm) | _method("baddbmm")
LINEAR = _names(F.linear)
ADDMM = _names(torch.addmm) | _method("addmm")
EMBEDDING = _names(F.embedding)
LAYER_NORM = _names(F.layer_norm)
RMS_NORM = {"torch.nn.functional.rms_norm", "torch.rms_norm"}
BATCH_NORM = _names(F.batch_norm)
SDPA = _names(F.scaled_dot_product_attention)
CONVOLUTION = _names(torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
LOST_TRACK = (
    "its input is not computed from the model input by ops gradgraph follows (a custom autograd.Function, a "
    "tensor made inside forward, .detach(), or a second input passed through forward_kwargs such as a data graph's "
    "edge features: gradgraph reads one input tensor); register the module that computes it with "
    "gradgraph.convert.register_elementwise if it is elementwise, or register a converter for it"
)
IN_PLACE_HINT = "in-place ops on tensors gradgraph follows are unsupported; use the out-of-place form (inplace=False)"
# Queries that return no tensor (size, dim, dtype ...) pass through without a rule.

#: Registered by :func:`register_elementwise`: module types and functions treated as one
#: elementwise op, with the activation label they give a neuron set.
ELEMENTWISE_MODULES: dict[type[nn.Module], ActivationKind] = dict(ONE_OP_MODULES)
ELEMENTWISE_FUNCTIONS: dict[str, ActivationKind] = {}


def register_elementwise(target: type[nn.Module] | Callable[..., Tensor],
                         activation: ActivationKind = ActivationKind.IDENTITY) -> None:
    """Declare a module type or a torch function elementwise, for the traced converter.

    Most custom activations need nothing: an activation written with torch ops
    (``x * torch.sigmoid(1.702 * x)``) is followed op by op. Register a module whose forward
    uses ops gradgraph does not know (a custom ``autograd.Function``, ``torch.special``
    functions, a C++ extension), or a torch function that is elementwise but unknown. The
    traced converter then treats one call as one elementwise op: same neurons, a new value,
    and ``activation`` as the label of the neuron set (``IDENTITY`` = no named activation;
    the label decides the scale symmetries gradgraph may apply, so name one only if the
    function really is it).

    Args:
        target: an ``nn.Module`` subclass (every instance, subclasses included) or a torch
            function such as ``torch.special.erfinv``.
        activation: the :class:`~gradgraph.ActivationKind` to label the neurons with.

    Example::

        class Snake(nn.Module):            # uses an op the tracer has no rule for
            def forward(self, x):
                return x + torch.sin(x).pow(2)

        gradgraph.convert.register_elementwise(Snake)
    """
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_elementwise: {target.__name__} is not an nn.Module subclass")
        ELEMENTWISE_MODULES[target] = ActivationKind(activation)
    elif callable(target):
        ELEMENTWISE_FUNCTIONS[op_name(target)] = ActivationKind(activation)
    else:
        raise TypeError(f"register_elementwise: expected a module type or a function, got {target!r}")


# The names these had before issue 27 made them public, for rule files written against them
# (tests/convert/test_convert_layering.py lists any use); new code uses the public names.
_ADDMM = ADDMM
_BADDBMM = BADDBMM
_BATCH_NORM = BATCH_NORM
_BINARY_ADD = BINARY_ADD
_BINARY_MUL = BINARY_MUL
_BINARY_OTHER = BINARY_OTHER
_CONCATENATIONS = CONCATENATIONS
_CONVOLUTION = CONVOLUTION
_ELEMENTWISE_FUNCTIONS = ELEMENTWISE_FUNCTIONS
_ELEMENTWISE_MODULES = ELEMENTWISE_MODULES
_EMBEDDING = EMBEDDING
_IDENTITY_OPS = IDENTITY_OPS
_IN_PLACE_HINT = IN_PLACE_HINT
_IN_PLACE_OPERATORS = IN_PLACE_OPERATORS
_JOINS = JOINS
_LAYER_NORM = LAYER_NORM
_LINEAR = LINEAR
_LOST_TRACK = LOST_TRACK
_MASK_FILL = MASK_FILL
_MATMUL = MATMUL
_PARAMETER_REFUSED = PARAMETER_REFUSED
_POOLS = POOLS
_REDUCTIONS = REDUCTIONS
_RMS_NORM = RMS_NORM
_SDPA = SDPA
_SHAPE_OPS = SHAPE_OPS
_SOFTMAX = SOFTMAX
_UNARY = UNARY
_WHERE = WHERE
_ACTIVATIONS = ACTIVATION_OPS
_op_name = op_name
