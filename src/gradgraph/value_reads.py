"""Reads of tensor values into Python, and the check that a loss makes none across datapoints.

A value read (``l.max().item()``, ``float(h[0, 0])``, ``if l.mean() > 0:``) gives a Python
number or branch that autograd sees as a constant. Made from the values of several datapoints
and used for every one of them (``l / l.max().item()``), it couples the datapoints where
neither autograd nor gradgraph's separation probe (:mod:`gradgraph.convert.separation`, which
checks derivatives) can see it: each per-sample gradient is then that of a loss that depends on
the rest of the batch, silently. The trace refuses such reads inside ``forward``
(``Tracer.check_value_read``); :func:`refuse_value_reads` refuses them in a ``loss_fn``.

A statistic of the batch kept as a tensor but made without gradient (``losses /
losses.detach().max()``) hides the same coupling from autograd: :class:`DerivedValueReads` also
refuses a ``detach`` of values computed from the output, and the trace a model output made from
detached values of the datapoints (``Tracer.cut_in_output``). The same statistic computed under
``torch.no_grad()`` is refused where it enters a value with gradient (a custom ``autograd.Function``'s forward
runs without gradient too, but what it returns is given a ``grad_fn``, so it is not refused).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gradgraph.errors import DatapointCouplingError

__all__ = ["DETACH_FUNCTIONS", "VALUE_READ_FUNCTIONS", "DerivedValueReads", "refuse_value_reads", "tensors_in"]

#: the functions that cut a tensor's gradient explicitly; an op under ``torch.no_grad()`` cuts it too, refused where its
#: value enters one with gradient (``DerivedValueReads.refuse_without_gradient``)
DETACH_FUNCTIONS = frozenset({Tensor.detach, torch.detach})

#: the functions that hand a tensor's values to Python (``float(t)``, ``bool(t)``, ``t.tolist()``,
#: ``torch.equal``); shape and dtype queries (``t.size()``, ``t.dim()``) read no values
VALUE_READ_FUNCTIONS = frozenset({
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.__bool__,
    Tensor.__complex__, Tensor.__contains__, Tensor.__array__, Tensor.equal, torch.equal, Tensor.allclose,
    torch.allclose, Tensor.is_nonzero, torch.is_nonzero,
})


def tensors_in(value: Any) -> list[Tensor]:
    """The tensors inside ``value`` (a tensor, a tuple, a dict, a ``transformers`` ``ModelOutput``)."""
    if isinstance(value, Mapping):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    return [item for item in tree_flatten(value)[0] if isinstance(item, Tensor)]


class DerivedValueReads(TorchFunctionMode):
    """A mode that follows the tensors computed from the sources given to :meth:`follow` and raises
    :class:`~gradgraph.errors.DatapointCouplingError` at a value read of any of them; ``what`` names the code
    for the error (``"loss_fn"``, ``"the closure"``). Until :meth:`follow` is given sources of several
    datapoints it only passes every op on."""

    def __init__(self, what: str) -> None:
        super().__init__()
        # id -> tensor: the tensor is kept alive so that its id is not reused by another
        self.derived: dict[int, Tensor] = {}
        # id -> tensor: the derived tensors made under torch.no_grad(), refused where they enter a value with gradient
        self.without_gradient: dict[int, Tensor] = {}
        self.what, self.num_datapoints = what, 1

    def follow(self, sources: Any, num_datapoints: int) -> None:
        """Follow the tensors in ``sources`` (a tensor or a structure of them: the model's output) of a batch of
        ``num_datapoints``; with one datapoint no read couples datapoints, so nothing is followed."""
        if num_datapoints > 1:
            self.num_datapoints = max(self.num_datapoints, num_datapoints)
            self.derived.update((id(tensor), tensor) for tensor in tensors_in(sources))

    def reads_derived(self, values: list) -> bool:
        return any(isinstance(value, Tensor) and self.derived.get(id(value)) is value for value in values)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.derived:  # the model's forward inside a closure, before its output exists: pass it on
            return func(*args, **kwargs)
        values = tree_flatten((args, kwargs))[0]
        derived = self.reads_derived(values)
        if derived and func in VALUE_READ_FUNCTIONS:
            name = getattr(func, "__name__", repr(func))
            raise DatapointCouplingError(
                f"{self.what} hands values computed from the model's output to Python ({name}: a number or "
                f"a branch), one for all {self.num_datapoints} datapoints; a loss made with it depends on the other "
                "datapoints where autograd sees a constant, so every per-sample gradient would be silently wrong "
                "(only their sum right). Compute each datapoint's loss from its own output with tensor ops "
                "(no .item(), float() or if on the losses), or convert one datapoint at a time")
        if derived and func in DETACH_FUNCTIONS:
            raise DatapointCouplingError(
                f"{self.what} cuts the gradient of values computed from the model's output (detach): a statistic of "
                "the batch made from them (losses / losses.detach().max()) couples the datapoints where autograd sees "
                "a constant, so every per-sample gradient would be silently wrong, and gradgraph cannot tell such a "
                "statistic from one of a datapoint alone. Compute each datapoint's loss from its own output without "
                "detach, or convert one datapoint at a time")
        output = func(*args, **kwargs)
        if derived:
            made = tensors_in(output)
            if not torch.is_grad_enabled():
                self.without_gradient.update((id(tensor), tensor) for tensor in made)
            elif self.without_gradient and any(tensor.requires_grad for tensor in made):
                self.refuse_without_gradient(func, values)
            for tensor in made:
                self.derived[id(tensor)] = tensor
        return output

    def refuse_without_gradient(self, func: Any, values: list) -> None:
        """Refuse an op that makes a value with gradient from one computed from the output under
        ``torch.no_grad()`` (``losses / largest``, ``largest`` the batch's largest loss made without gradient). A
        custom ``autograd.Function`` runs its forward without gradient too, but gives what it returns a ``grad_fn``
        (the same tensor), so its output is not refused."""
        for value in values:
            if isinstance(value, Tensor) and self.without_gradient.get(id(value)) is value and value.grad_fn is None:
                name = getattr(func, "__name__", repr(func))
                raise DatapointCouplingError(
                    f"{self.what} cuts the gradient of values computed from the model's output (torch.no_grad(), "
                    f"read by {name}): a statistic of the batch made from them (losses / largest, largest computed "
                    "under no_grad) couples the datapoints where autograd sees a constant, so every per-sample "
                    "gradient would be silently wrong, and gradgraph cannot tell such a statistic from one of a "
                    "datapoint alone. Compute each datapoint's loss from its own output with gradient, or convert "
                    "one datapoint at a time")


@contextmanager
def refuse_value_reads(sources: Any, what: str, num_datapoints: int) -> Iterator[None]:
    """Within the block, raise :class:`~gradgraph.errors.DatapointCouplingError` at a value read of a tensor
    computed from ``sources`` (a tensor or a structure of them: the model's output) when there are several
    datapoints; ``what`` names the code for the error (``"loss_fn"``). With one datapoint it checks nothing."""
    if num_datapoints <= 1:
        yield
        return
    guard = DerivedValueReads(what)
    guard.follow(sources, num_datapoints)
    with guard:
        yield
