"""The traced converter's entry points: :func:`convert_traced` and its closure form.

A conversion is a forward pass under the trace (or a replay of the architecture's cached
:class:`~gradgraph.convert.plan.TracePlan`), the per-datapoint objective, and the finish:
the plan (:mod:`gradgraph.convert.layout` lays out the graph and its group), the one backward
pass and the graph (:mod:`gradgraph.convert.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.capture import LossFn, check_closure_call, check_closure_losses, per_datapoint_objective
from gradgraph.convert.layout import _make_plan
from gradgraph.convert.plan import PLAN_CACHE, PlanCache, TracePlan, _assemble, _fill, _plan_key
from gradgraph.convert.trace import PlanMismatch, replay_model, trace_model
from gradgraph.convert.trace.tracer import _Tracer
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph

__all__ = ["PLAN_CACHE", "PlanCache", "TracePlan", "convert_traced", "convert_traced_closure", "default_datapoint_dim"]


def convert_traced(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    datapoint_dim: int | None = None,
) -> GradGraph:
    """Convert any model whose forward gradgraph can follow; see :func:`gradgraph.to_graph`.

    Args:
        model: the network (``model.eval()`` for dropout; batch norm in eval mode).
        inputs: ``[b, ...]``: features last for float inputs (``[b, d]``, ``[b, T, d]``,
            images flattened by the model), token ids ``[b, T]`` for models starting with
            an embedding; sequence-first ``[T, b, d]`` with ``datapoint_dim=1``.
        targets, loss_fn, forward_kwargs: as for :func:`gradgraph.to_graph`; ``loss_fn``
            receives the model's output as the model returns it (a tensor, a tuple, a
            ``transformers`` ``ModelOutput``) and returns ``[b]``.
        datapoint_dim: the axis of ``inputs`` that counts datapoints. ``None``: 1 if the
            model's ``nn.MultiheadAttention`` modules are all sequence-first
            (``batch_first=False``, torch's default), else 0.

    Returns:
        A :class:`~gradgraph.GradGraph` with ``B = b * K`` components.
    """
    datapoint_dim = _check_inputs(model, inputs, datapoint_dim)
    kwargs = dict(forward_kwargs or {})

    def forward(x: Tensor) -> Any:
        try:
            if isinstance(model, nn.MultiheadAttention):  # a bare module: its output, not (output, weights)
                return model(x, **kwargs)[0]
            return model(x, **kwargs)
        except TypeError as error:
            if "argument" not in str(error):
                raise
            raise GradGraphError(
                f"to_graph: calling {type(model).__name__}(inputs, **forward_kwargs) failed: {error}. Pass the "
                "model's other arguments through forward_kwargs") from error

    run = _forward_pass(model, inputs, forward, kwargs, datapoint_dim)
    return _finish(run, _objective(run.output, targets, loss_fn, run.num_datapoints), model)


def convert_traced_closure(model: nn.Module, closure: Callable[[], Tensor], *,
                           datapoint_dim: int | None = None) -> tuple[GradGraph, Tensor]:
    """Convert ``model`` on the batch that ``closure`` runs it on, in that one call of ``closure``.

    The closure calls the model once, as ``model(inputs, *args, **kwargs)``, and returns the
    per-datapoint losses ``[b]`` without calling ``backward`` — the closure of a
    ``torch.optim.Optimizer.step``, minus the backward. The model's forward is traced (or a
    cached plan replayed) during that call; the losses' one backward pass gives the factors.
    Everything else the closure does (drawing a batch, the loss) runs once, as written.

    Args:
        model: the network the closure calls.
        closure: ``() -> [b]`` per-datapoint losses.
        datapoint_dim: as for :func:`convert_traced`.

    Returns:
        ``(graph, losses)``: the :class:`~gradgraph.GradGraph` (``B = b * K`` components) and
        the closure's losses ``[b]``, detached.

    Raises:
        GradGraphError: the closure never calls the model, calls it twice, calls it without an
            input tensor, or returns something other than ``[b]`` losses; the errors of
            :func:`convert_traced` for the model itself.
    """
    runs: list[_Pass] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        check_closure_call(model, bool(runs), args)
        inputs, rest = args[0], args[1:]
        dim = _check_inputs(model, inputs, datapoint_dim)
        del model.forward  # the model's own forward (or the trace's stand-in for it) runs inside
        try:
            run = _forward_pass(model, inputs, lambda x: model.forward(x, *rest, **kwargs),
                                {"args": rest, **kwargs}, dim)
        finally:
            model.forward = forward  # type: ignore[method-assign]
        runs.append(run)
        return run.output

    if "forward" in vars(model):
        raise GradGraphError(f"{type(model).__name__} has a forward set on the instance; convert_closure needs the "
                             "class's forward")
    model.forward = forward  # type: ignore[method-assign]
    try:
        losses = closure()
    finally:
        del model.forward
    if not runs:
        raise GradGraphError(f"the closure never called {type(model).__name__}")
    run = runs[0]
    check_closure_losses(losses, run.num_datapoints)
    return _finish(run, losses, model), losses.detach()


def _check_inputs(model: nn.Module, inputs: Tensor, datapoint_dim: int | None) -> int:
    """The datapoint axis of ``inputs`` (non-negative), after checking the batch against the model."""
    if datapoint_dim is None:
        datapoint_dim = default_datapoint_dim(model)
    if inputs.dim() == 0 or not -inputs.dim() <= datapoint_dim < inputs.dim() or inputs.shape[datapoint_dim] == 0:
        raise GradGraphError(f"inputs must be a batch with b > 0 datapoints on axis {datapoint_dim}, got shape "
                             f"{list(inputs.shape)}")
    datapoint_dim %= inputs.dim()
    if inputs.is_floating_point() and inputs.dim() > 1 and datapoint_dim == inputs.dim() - 1:
        raise GradGraphError(f"inputs {list(inputs.shape)}: the datapoint axis {datapoint_dim} is the feature axis; "
                             "features must be the last axis")
    param_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if inputs.is_floating_point() and param_dtypes and inputs.dtype not in param_dtypes:
        raise GradGraphError(f"inputs {list(inputs.shape)} are {inputs.dtype} but {type(model).__name__}'s parameters "
                             f"are {sorted(str(dtype) for dtype in param_dtypes)}: convert one to the other's dtype")
    return datapoint_dim


@dataclass
class _Pass:
    """One forward of the model under the trace (``plan`` is ``None``) or a replay of a cached plan."""

    key: tuple
    plan: TracePlan | None
    tracer: _Tracer | None
    captured: dict
    output: Any
    x: Tensor
    num_datapoints: int
    dtype: torch.dtype


def _forward_pass(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any], kwargs: dict[str, Any],
                  datapoint_dim: int) -> _Pass:
    """Replay the cached plan of this architecture and call, or trace the forward afresh."""
    num_datapoints = inputs.shape[datapoint_dim]
    dtype = inputs.dtype if inputs.is_floating_point() else next(model.parameters()).dtype
    key = (_plan_key(model, inputs, kwargs), datapoint_dim)
    plan = PLAN_CACHE.get(key)
    if plan is not None:
        try:
            replayer, output, x = replay_model(model, inputs, forward, plan.fingerprints, plan.wanted)
        except PlanMismatch:
            pass  # the forward took another path this time: trace it again
        else:
            return _Pass(key, plan, None, replayer.captured, output, x, num_datapoints, dtype)
    tracer, output, x = trace_model(model, inputs, forward, datapoint_dim)
    if not tracer.params:
        raise GradGraphError(f"{type(model).__name__}: the forward used no parameter of the model")
    return _Pass(key, None, tracer, tracer.captured, output, x, num_datapoints, dtype)


def _finish(run: _Pass, objective: Tensor, model: nn.Module) -> GradGraph:
    """The graph of a forward pass, given the per-datapoint objective ``[b]`` computed from it."""
    plan = run.plan
    if plan is None:
        plan = _make_plan(run.tracer, run.output, run.num_datapoints)
    device = run.x.device if run.tracer is None else run.tracer.params[0].device
    act, grad = _fill(plan, run.x, run.captured, objective, model, run.num_datapoints, run.dtype, device)
    if run.plan is None:
        PLAN_CACHE.put(run.key, plan)
    return _assemble(plan, model, act, grad, run.num_datapoints)


def default_datapoint_dim(model: nn.Module) -> int:
    """1 for a model whose self-attention modules are all sequence-first (``[T, b, d]``), else 0."""
    attentions = [module for module in model.modules() if isinstance(module, nn.MultiheadAttention)]
    return 1 if attentions and not any(module.batch_first for module in attentions) else 0


def _objective(output: Any, targets: Any, loss_fn: LossFn | None, num_datapoints: int) -> Tensor:
    if loss_fn is None and not isinstance(output, Tensor):
        raise GradGraphError(f"output mode (loss_fn=None) needs a tensor output; the model returned "
                             f"{type(output).__name__}. Pass a loss_fn that reads it")
    return per_datapoint_objective(output, targets, loss_fn, num_datapoints)
