"""In-place ops on intermediate values, run out of place under the trace and the replay alike.

``nn.ReLU(inplace=True)`` and ``out += identity`` are in every torchvision CNN. An in-place op
changes a tensor that the conversion has recorded (a BatchNorm's output, whose gradient is a
factor of the graph): after ``relu_``, autograd would give the gradient of the *activated*
value for it. So the trace and the replay run the op out of place and hand the new tensor on,
which is what the model's own code uses (``x = relu(x)``, ``out = out.__iadd__(identity)``, a
module's return value): the recorded tensor keeps its value and its gradient.

That is the same computation only if the old tensor is never read again. It is *stale* from
then on — it, and every tensor sharing its storage (a view of it, the tensor it is a view of) —
and any later op that reads a stale tensor's values, or a model output that is one, is refused
by name (the trace) or sends the replay back to the trace (:class:`StaleValues`). Reading
its shape or dtype is allowed. Only ops on values in the autograd graph (``grad_fn`` set) are
rewritten; one on the model input, a parameter or a constant keeps the trace's old rule.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gradgraph.convert.trace.ops import op_name

__all__ = ["IN_PLACE_CANDIDATES", "StaleValues", "out_of_place_call"]

#: functionals with an ``inplace`` flag (``nn.ReLU(inplace=True)`` and the like call them so)
_FLAGGED = (F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.silu, F.mish, F.hardswish,
            F.hardsigmoid, F.threshold, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout, F.rrelu)
_FLAG_POSITION = {func: list(inspect.signature(func).parameters).index("inplace") for func in _FLAGGED}

#: in-place methods and functions, by the name the trace knows them by, and their out-of-place forms
_METHODS = ("add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max", "neg", "exp",
            "pow", "masked_fill")
_REWRITES: dict[str, tuple[str, Any]] = {
    **{f"Tensor.{method}_": (f"Tensor.{method}", getattr(Tensor, method)) for method in _METHODS},
    **{f"Tensor.__i{operator}__": (f"Tensor.__{operator}__", getattr(Tensor, f"__{operator}__"))
       for operator in ("add", "sub", "mul", "truediv")},
    **{f"torch.{function}_": (f"torch.{function}", getattr(torch, function))
       for function in ("relu", "sigmoid", "tanh")},
    # the in-place functionals (AttentiveFP's F.leaky_relu_): their arguments are the out-of-place ones' first
    **{op_name(getattr(F, f"{function}_")): (op_name(getattr(F, function)), getattr(F, function))
       for function in ("leaky_relu", "elu", "celu", "hardtanh", "threshold")},
}

#: the names of every op :func:`out_of_place_call` may rewrite (one set lookup per op for the others)
IN_PLACE_CANDIDATES = frozenset(_REWRITES) | frozenset(op_name(func) for func in _FLAGGED)

#: ops that read a tensor's metadata only (a stale tensor's shape is still right)
_METADATA = {"Tensor.shape (attribute)", "Tensor.size", "Tensor.dim", "Tensor.ndim (attribute)",
             "Tensor.dtype (attribute)", "Tensor.device (attribute)", "Tensor.numel", "Tensor.is_floating_point",
             "Tensor.requires_grad (attribute)", "Tensor.grad_fn (attribute)", "Tensor.layout (attribute)",
             "Tensor.is_cuda (attribute)", "Tensor.__len__"}


def out_of_place_call(func: Any, name: str, args: tuple, kwargs: dict) -> tuple[Any, str, tuple, dict] | None:
    """``(func, name, args, kwargs)`` of the out-of-place form of an in-place op on a value in the
    autograd graph (its first argument, ``grad_fn`` set), or ``None`` where there is none to run
    (not in place, not an op rewritten here, or a leaf, a parameter, a constant)."""
    # by name first: this runs for every op of every replay
    rewrite = _REWRITES.get(name)
    if rewrite is not None:
        func, name = rewrite[1], rewrite[0]
    else:
        try:
            position = _FLAG_POSITION.get(func)
        except TypeError:  # unhashable
            return None
        if position is None:
            return None
        if kwargs.get("inplace") is True:
            kwargs = {**kwargs, "inplace": False}
        elif len(args) > position and args[position] is True:
            args = (*args[:position], False, *args[position + 1:])
        else:
            return None
    target = args[0] if args else kwargs.get("input")
    if not isinstance(target, Tensor) or target.grad_fn is None:
        return None
    return func, name, args, kwargs


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class StaleValues:
    """The tensors an in-place op run out of place left behind (see the module docstring).

    Each is kept alive until the forward ends, so that its memory is not reused by a new tensor
    (a storage address names it).
    """

    def __init__(self) -> None:
        self.stale: dict[int, tuple[Tensor, str]] = {}

    def mark(self, target: Any, output: Any, op: str) -> None:
        """``target`` (the in-place op's first argument) is stale unless ``output`` is it (an
        identity such as dropout in eval)."""
        if isinstance(target, Tensor) and isinstance(output, Tensor) and _storage(output) != _storage(target):
            self.stale[_storage(target)] = (target, op)

    def read(self, name: str, args: tuple, kwargs: dict) -> str | None:
        """The in-place op whose target (or a view of it) this op reads, or ``None``."""
        if not self.stale or name in _METADATA:
            return None
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, Tensor):
                found = self.stale.get(_storage(value))
                if found is not None:
                    return found[1]
        return None

    def in_output(self, output: Any) -> str | None:
        """The in-place op whose target the model returns, or ``None``."""
        return self.read("output", (output,), {})

    @staticmethod
    def message(op: str) -> str:
        return (f"reads a value that the in-place {op} before it changed (or a view of it); gradgraph runs in-place "
                "ops on intermediate values out of place (their inputs are factors of the graph), which is the "
                "same only if the old value is not read again. Use the value the op returns, or its out-of-place "
                "form")
