"""The converter registry behind :func:`gradgraph.to_graph`.

A converter is a callable ``converter(model, inputs, *, targets, loss_fn, forward_kwargs)
-> GradGraph``. Each is registered with a *matcher*: a module type (matches through
``isinstance``) or a predicate ``model -> bool``. :func:`to_graph` asks the matchers from
the most recently registered to the oldest; a model none matches (every model, unless a user
registered a converter) goes to the traced converter, which reads any forward it can follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from gradgraph.capture import LossFn, check_materialised, mapping_inputs
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import GradGraph

__all__ = ["Converter", "convert_closure", "register_converter", "to_graph", "registered_converters"]

#: ``(model, closure) -> (graph, losses [b])``: a built-in converter's form for a training closure.
ClosureConverter = Callable[[nn.Module, Callable[[], Tensor]], tuple[GradGraph, Tensor]]


class Converter(Protocol):
    """Signature every converter implements."""

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        *,
        targets: Any,
        loss_fn: LossFn | None,
        forward_kwargs: Mapping[str, Any],
    ) -> GradGraph: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    matches: Callable[[nn.Module], bool]
    converter: Converter


#: Converters registered with :func:`register_converter` (gradgraph itself registers none).
_REGISTRY: list[_Entry] = []
#: The traced converter, asked when no registered converter matches the model (and its closure form).
_FALLBACK: list[Converter] = []
_FALLBACK_CLOSURE: list[ClosureConverter] = []


def set_fallback(converter: Converter, closure_converter: ClosureConverter) -> None:
    """Make ``converter`` (and its closure form) the one asked when no registered converter matches."""
    _FALLBACK[:] = [converter]
    _FALLBACK_CLOSURE[:] = [closure_converter]


def register_converter(
    match: type[nn.Module] | Callable[[nn.Module], bool],
    converter: Converter | None = None,
    *,
    name: str | None = None,
) -> Any:
    """Register ``converter`` for models that ``match``; usable as a decorator.

    Args:
        match: a module class (any instance of it, subclasses included, matches) or a
            predicate ``model -> bool``.
        converter: the converter; omit it to use ``register_converter`` as a decorator.
        name: shown by :func:`registered_converters`; defaults to the converter's name.

    Example::

        @gradgraph.register_converter(MyBlock)
        def convert_my_block(model, inputs, *, targets, loss_fn, forward_kwargs):
            ...
            return graph
    """
    if isinstance(match, type):
        module_type = match
        if not issubclass(module_type, nn.Module):
            raise TypeError(f"register_converter: {module_type.__name__} is not an nn.Module subclass")

        def matches(model: nn.Module) -> bool:
            return isinstance(model, module_type)

    elif callable(match):
        matches = match
    else:
        raise TypeError(f"register_converter: match must be a module type or a predicate, got {match!r}")

    def add(fn: Converter) -> Converter:
        _REGISTRY.append(_Entry(name or getattr(fn, "__name__", repr(fn)), matches, fn))
        return fn

    return add if converter is None else add(converter)


def registered_converters() -> list[str]:
    """Names of the registered converters, in the order :func:`to_graph` tries them
    (the traced converter, which reads any forward, last)."""
    return [entry.name for entry in reversed(_REGISTRY)] + [getattr(fn, "__name__", repr(fn)) for fn in _FALLBACK]


def to_graph(
    model: nn.Module,
    inputs: Tensor,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    datapoints: Tensor | None = None,
    fold_time: bool = True,
) -> GradGraph:
    """Convert a network and a batch into a :class:`~gradgraph.GradGraph`.

    One forward and one backward pass record, for every neuron and every component,
    the activation ``act`` and backpropagated signal ``grad`` (see
    :mod:`gradgraph.capture` for the two objectives).

    Args:
        model: the network, e.g. an MLP chain or a transformer encoder.
        inputs: ``[b, d_in]`` for MLPs; ``[b, T, d]`` (or ``[T, b, d]`` when the module is
            not ``batch_first``) for attention models. A mapping of tensors (a tokenizer's
            output, ``{"input_ids": [b, T], "attention_mask": [b, T], ...}``) is read as the
            model's call ``model(**inputs)``: the entry named as ``forward``'s first parameter is
            the input, the others join ``forward_kwargs``.
        targets: passed to ``loss_fn``.
        loss_fn: ``loss_fn(output, targets) -> [b]`` unreduced per-datapoint loss; ``None``
            for output mode (the model returns one scalar per datapoint).
        forward_kwargs: extra keyword arguments for ``model.forward`` (e.g. ``mask``).
        datapoints: ``[n]`` (int64), the datapoint of each row of ``inputs`` (axis 0, ``n`` rows):
            PyG's ``batch`` vector for a batch of data graphs joined into one ``x [n, features]``
            (each graph a datapoint, ``b = datapoints.max() + 1``; ``docs/gnn.md``). ``None``: axis 0
            (1 for sequence-first attention) counts the datapoints.
        fold_time: the layout of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (traced converter):
            ``True`` (default) folds each loop over time — one neuron set per gate and state,
            each weight one edge set, one component per (datapoint, step) — and unrolls a loop
            whose steps do not fold; ``False`` unrolls every loop (docs/recurrent.md).

    Returns:
        The :class:`~gradgraph.GradGraph` with ``B`` components (``B = b`` for MLPs,
        ``b * T`` for attention models).

    Raises:
        UnsupportedModuleError: no converter handles the model, or part of it.
        GradGraphError: bad shapes, a bad loss, or non-finite factors.

    Graphs of models with the same architecture may share their architecture-only tensors
    (``edge_index``, slot maps, node labels; see :mod:`gradgraph.graph`), which are
    read-only; values and factors are fresh for every call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_graph: model must be an nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        # torch.enable_grad() cannot leave inference mode, and a tensor made in it cannot be saved
        # for backward: convert outside it, on normal copies of the tensors made inside
        with torch.inference_mode(False):
            inputs, targets, forward_kwargs, datapoints = _normal_tensors((inputs, targets, forward_kwargs, datapoints))
            return to_graph(model, inputs, targets, loss_fn, forward_kwargs=forward_kwargs, datapoints=datapoints,
                            fold_time=fold_time)
    model = _uncompiled(model)
    kwargs = dict(forward_kwargs or {})
    if isinstance(inputs, Mapping):  # a tokenizer's output: the first argument of forward, the rest by name
        inputs, kwargs = mapping_inputs(model, inputs, kwargs, "to_graph")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"to_graph: inputs must be a Tensor, got {type(inputs).__name__}")
    if isinstance(model, nn.MultiheadAttention) and {"key", "value"} & set(kwargs):
        raise GradGraphError(
            f"to_graph: {sorted({'key', 'value'} & set(kwargs))} passed through forward_kwargs to an "
            "nn.MultiheadAttention; gradgraph converts self-attention, where `inputs` is the query, key and value "
            "at once (cross-attention is not supported)"
        )
    for entry in reversed(_REGISTRY):
        if entry.matches(model):
            if datapoints is not None:
                raise GradGraphError(f"to_graph: the registered converter '{entry.name}' matches "
                                     f"{type(model).__name__} and takes no datapoints; only the traced converter reads "
                                     "rows of several datapoints")
            check_materialised(model, "to_graph")
            return entry.converter(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=kwargs)
    # the traced converter checks for meta parameters in its one read of the model's parameters
    if not _FALLBACK:
        raise UnsupportedModuleError("", type(model).__name__, "no registered converter matches it")
    # options past the common four are passed only when set, so a fallback registered before
    # they existed keeps working
    options: dict[str, Any] = {}
    if datapoints is not None:
        options["datapoints"] = datapoints
    if not fold_time:
        options["fold_time"] = False
    return _FALLBACK[0](model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=kwargs, **options)


def _normal_tensors(value: Any) -> Any:
    """``value`` (nested containers too) with every inference-mode tensor replaced by a normal copy."""
    return tree_map(lambda item: item.clone() if isinstance(item, Tensor) and item.is_inference() else item, value)


def convert_closure(model: nn.Module, closure: Callable[[], Tensor], *,
                    datapoints: Tensor | None = None) -> tuple[GradGraph, Tensor]:
    """Convert ``model`` on the batch that a training closure runs it on, calling the closure once.

    The closure draws its batch, calls ``model(inputs, ...)`` once and returns the
    per-datapoint losses ``[b]`` without calling ``backward`` — an optimizer's closure minus
    the backward. The traced converter captures the forward as it runs (a trace, or a cached
    plan of the architecture, shared with :func:`to_graph`), and the losses' one backward pass
    gives the factors.

    .. code-block:: python

        graph, losses = gradgraph.convert_closure(
            model, lambda: F.cross_entropy(model(x), y, reduction="none"))

    Args:
        model: the network the closure calls.
        closure: ``() -> [b]`` per-datapoint losses.
        datapoints: ``[n]`` int64, the datapoint of each row of the input the closure passes (PyG's
            ``batch`` vector), as for :func:`to_graph`.

    Returns:
        ``(graph, losses)``: the :class:`~gradgraph.GradGraph` and the closure's losses ``[b]``,
        detached.

    Raises:
        GradGraphError: the closure never calls the model, calls it twice or without an input
            tensor, or returns something other than ``[b]`` losses; a model on the ``meta``
            device; as :func:`to_graph` for the model itself.
        UnsupportedModuleError: a converter registered with :func:`register_converter`
            matches the model (those take a batch and a loss function: use :func:`to_graph`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_closure: model must be an nn.Module, got {type(model).__name__}")
    if not callable(closure):
        raise TypeError(f"convert_closure: closure must be callable, got {type(closure).__name__}")
    check_materialised(model, "convert_closure")
    if torch.is_inference_mode_enabled():  # as to_graph: the closure runs outside inference mode
        with torch.inference_mode(False):
            try:
                return convert_closure(model, closure, datapoints=datapoints)
            except (RuntimeError, GradGraphError) as error:  # torch's, or the trace's report of it
                if "Inference tensors cannot be saved" not in str(error):
                    raise
                raise GradGraphError(
                    "convert_closure was called in torch.inference_mode() and the closure uses a tensor made there "
                    f"({error}); make the closure's tensors outside inference mode, or call convert_closure outside "
                    "it (torch.no_grad() is fine)") from error
    original = _uncompiled(model)
    for entry in reversed(_REGISTRY):
        if entry.matches(original):
            raise UnsupportedModuleError(
                "", type(original).__name__, f"the registered converter '{entry.name}' takes a batch and a loss "
                "function, not a closure: call to_graph(model, inputs, targets, loss_fn)")
    extra = {} if datapoints is None else {"datapoints": datapoints}
    if original is model:
        return _FALLBACK_CLOSURE[0](model, closure, **extra)
    # the closure calls the compiled wrapper: for this one call its forward is the original module's
    # call (which the converter captures), not dynamo's compiled function
    compiled_forward = vars(model)["forward"]
    model.forward = original.__call__  # a bound method: nn.Module would register a module as a child
    try:
        return _FALLBACK_CLOSURE[0](original, closure, **extra)
    finally:
        model.forward = compiled_forward


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d model wraps (``_orig_mod``); the model itself otherwise.

    gradgraph follows the eager forward op by op; dynamo's compiled function computes the same
    function, so the graph of the original module is the compiled model's graph (and converting
    it skips ~20 s of recompilation and dynamo's warnings from inside the trace)."""
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module) and "forward" in vars(model):
        return original
    return model
