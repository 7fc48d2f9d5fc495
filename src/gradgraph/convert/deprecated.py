"""The converters' former entry points, now aliases of :func:`gradgraph.to_graph` and
:func:`gradgraph.convert_closure` that warn (``DeprecationWarning``).

Every model goes through one converter, the trace (:mod:`gradgraph.convert.traced`), so there
is nothing left for a converter per model family to do. To check that a model is an MLP chain
or a stock attention model, read it with :func:`gradgraph.convert.mlp_layers` or
:func:`gradgraph.convert.transformer_structure`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from gradgraph.capture import LossFn
from gradgraph.convert.registry import convert_closure, to_graph
from gradgraph.convert.traced import convert_closure_traced, to_graph_traced
from gradgraph.graph import GradGraph

__all__ = ["convert_attention", "convert_mlp", "convert_traced", "convert_traced_closure"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"gradgraph.convert.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def convert_mlp(model: nn.Module, inputs: Tensor, *, targets: Any = None, loss_fn: LossFn | None = None,
                forward_kwargs: Mapping[str, Any] | None = None) -> GradGraph:
    """Deprecated: :func:`gradgraph.to_graph` (same arguments, same graph)."""
    _warn("convert_mlp", "gradgraph.to_graph")
    return to_graph(model, inputs, targets, loss_fn, forward_kwargs=forward_kwargs)


def convert_attention(model: nn.Module, inputs: Tensor, *, targets: Any = None, loss_fn: LossFn | None = None,
                      forward_kwargs: Mapping[str, Any] | None = None) -> GradGraph:
    """Deprecated: :func:`gradgraph.to_graph` (same arguments, same graph; the datapoint axis
    of a sequence-first ``[T, b, d]`` input is inferred from the attention modules)."""
    _warn("convert_attention", "gradgraph.to_graph")
    return to_graph(model, inputs, targets, loss_fn, forward_kwargs=forward_kwargs)


def convert_traced(model: nn.Module, inputs: Tensor, *, targets: Any = None, loss_fn: LossFn | None = None,
                   forward_kwargs: Mapping[str, Any] | None = None, datapoint_dim: int | None = None) -> GradGraph:
    """Deprecated: :func:`gradgraph.to_graph`; ``datapoint_dim`` (the axis of ``inputs`` that
    counts datapoints, inferred by ``to_graph``) is passed to the traced converter."""
    _warn("convert_traced", "gradgraph.to_graph")
    if datapoint_dim is None:
        return to_graph(model, inputs, targets, loss_fn, forward_kwargs=forward_kwargs)
    return to_graph_traced(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
                           datapoint_dim=datapoint_dim)


def convert_traced_closure(model: nn.Module, closure: Callable[[], Tensor], *,
                           datapoint_dim: int | None = None) -> tuple[GradGraph, Tensor]:
    """Deprecated: :func:`gradgraph.convert_closure` (``datapoint_dim`` as for :func:`convert_traced`)."""
    _warn("convert_traced_closure", "gradgraph.convert_closure")
    if datapoint_dim is None:
        return convert_closure(model, closure)
    return convert_closure_traced(model, closure, datapoint_dim=datapoint_dim)
