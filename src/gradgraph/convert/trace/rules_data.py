"""Trace rules for data computed from integer inputs: position ids, token types, attention masks.

``input_ids.ne(pad).int().cumsum(1) * mask + pad`` (RoBERTa's position ids),
``torch.zeros_like(input_ids)`` (token types), ``(1.0 - mask) * finfo.min`` (an additive
attention mask): tensors computed from a model's integer input by ops without parameters hold
no neurons. Every datapoint's such values are constants of that datapoint, so the trace treats
them as constants wherever they meet neurons (a mask added to attention scores, a padding mask
multiplying hidden states) and as indices of the datapoint's positions where an embedding
reads them (a cached plan reads them again on every call). Cast to float and read by an
affine map, a norm or a parameter scale (``pixels.float() / 255``), the input's elements are
input features as before. What it still refuses: such data mixed across datapoints (a
reduction or cumulative sum over the batch axis) and then used by a parameterised op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gradgraph.convert.trace.meta import broadcast_ids, Raw, varies_along
from gradgraph.convert.trace.ops import IDENTITY_OPS, JOINED_INPUT_REMEDY, SHAPE_OPS

#: ops with a ``dim`` that combine the elements along it (the first argument's axis)
_ALONG_AXIS = {f"{prefix}.{name}" for prefix in ("Tensor", "torch") for name in (
    "sum", "mean", "prod", "amax", "amin", "max", "min", "any", "all", "cumsum", "cumprod", "cummax", "cummin",
    "logcumsumexp", "argmax", "argmin", "count_nonzero", "sort", "argsort", "flip", "roll", "diff")}
#: those that take their axis third, after a count (``roll(input, shifts, dims)``, ``diff(input, n, dim)``): where it
#: is among the arguments, and what it is when not given (``roll``: the flattened tensor, every axis; ``diff``: the
#: last axis); every other op of ``_ALONG_AXIS`` takes it second, every axis when not given (``sort`` and
#: ``argsort``: the last axis)
_AXIS_THIRD = {f"{prefix}.{name}": default for prefix in ("Tensor", "torch") for name, default in (
    ("roll", None), ("diff", -1))}
#: ops of ``_ALONG_AXIS`` that take their axis second but default to the last axis, not every axis
_LAST_AXIS_DEFAULT = {f"{prefix}.{name}" for prefix in ("Tensor", "torch") for name in ("sort", "argsort")}


@dataclass
class Data:
    """A tensor computed from the integer input without parameters: a constant of its datapoints.

    ``element`` is the flat input element each value stands at (full shape, int64) when the
    ops that made it kept the input's elements one to one (elementwise ops, casts, shape ops);
    ``None`` otherwise (a reduction over positions). An embedding reads it to give each index
    its datapoint's component.
    """

    element: Tensor | None


def _injective(element: Tensor) -> bool:
    """Whether no input element appears twice (a broadcast copies elements)."""
    flat = element.reshape(-1)
    return bool((flat >= 0).all()) and torch.unique(flat).numel() == flat.numel()


class DataRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: ops on data made from the input."""

    def is_data(self, value: Tensor, meta: Any) -> bool:
        """A constant of the datapoints: derived data, or the integer input itself."""
        return isinstance(meta, Data) or (isinstance(meta, Raw) and not self.input_tensor.is_floating_point())

    def data_op(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        """An op on data only: its outputs are data, with input elements followed where they stay one to one."""
        metas = [meta for _, meta in tracked]
        outputs = [value for value in tree_flatten(output)[0] if isinstance(value, Tensor)]
        indexed_by_data = name == "Tensor.__getitem__" and any(value is not args[0] for value, _ in tracked)
        # (first: roll and flip are shape ops too, replayed on the elements unless they move the datapoints)
        first = args[0] if args else kwargs.get("input")  # torch.cumsum(input=ids, dim=0): no positional argument
        first_meta = self.meta(first) if isinstance(first, Tensor) else None
        if name in _ALONG_AXIS and first_meta is not None and \
                self._mixes_datapoints(first, first_meta, args, kwargs, name):
            return self.mark_opaque(output, name, "combines data of different datapoints (an op along the batch "
                                    "axis), so a datapoint's values depend on the others", [])
        if (name in SHAPE_OPS or name in IDENTITY_OPS or name == "Tensor.__getitem__") and not indexed_by_data:
            self.check_joined_constants(name, args, kwargs, "the model's input (or data made from it)",
                                        JOINED_INPUT_REMEDY)
            raw = all(isinstance(meta, Raw) for meta in metas)
            if raw and all(not value.is_floating_point() for value in outputs):
                return self.replay(func, args, kwargs, output, Raw, self._element, data=True)
            if all(self._element(meta) is not None for meta in metas):
                return self.replay(func, args, kwargs, output, Data, self._element, data=True)
        if name in SHAPE_OPS or name == "Tensor.__getitem__":
            for value in outputs:
                self.set_meta(value, Data(None))
            return None
        for value in outputs:
            self.set_meta(value, Data(self._elementwise(value, metas)))
        return None

    def _element(self, meta: Any) -> Tensor | None:
        return meta.element

    def _elementwise(self, value: Tensor, metas: list) -> Tensor | None:
        """The element map of an op's output that has the shape of an operand it was computed from."""
        for meta in metas:
            element = meta.element
            if element is None or element.dim() > value.dim():
                continue
            try:
                broadcast = broadcast_ids(element, value.shape)
            except RuntimeError:
                continue
            if tuple(element.shape) == tuple(value.shape):
                return element
            if _injective(broadcast):  # only a size-1 axis was added
                return broadcast.clone()
        return None

    def _mixes_datapoints(self, value: Tensor, meta: Any, args: tuple, kwargs: dict, name: str) -> bool:
        """An op along an axis over which the datapoint changes, or along every axis."""
        element = meta.element
        if element is None or value.dim() == 0:
            return False
        at, default = (2, _AXIS_THIRD[name]) if name in _AXIS_THIRD else (1, -1 if name in _LAST_AXIS_DEFAULT else None)
        dim = kwargs.get("dim", kwargs.get("dims", args[at] if len(args) > at else default))
        if isinstance(dim, bool) or not isinstance(dim, int | tuple | list | None):
            return False
        datapoint = self.datapoint_of(element)[0]
        if dim is None:
            return any(varies_along(datapoint, axis) for axis in range(value.dim()))
        dims = [dim] if isinstance(dim, int) else list(dim)
        return any(varies_along(datapoint, axis % value.dim()) for axis in dims)

    def data_index_comps(self, indices: Tensor, meta: Any) -> Tensor | None:
        """Components of an embedding's data indices, one per index, or ``None`` if unknown."""
        element = meta.element
        if element is None or not _injective(element):
            return None
        datapoint, within, _ = self.datapoint_of(element)
        return self.assign_comps(element, datapoint, within)


# The names these had before issue 27 made them public, for rule files written against them
# (tests/convert/test_convert_layering.py lists any use); new code uses the public names.
_Data = Data
_DataRules = DataRules
