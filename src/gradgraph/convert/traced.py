"""Trace -> GradGraph: neuron sets, their factors, and the symmetry group the trace proves.

:func:`convert_traced` runs :func:`gradgraph.convert.trace.trace_model`, the one backward
pass, and then lays the graph out:

* **nodes** — the neuron sets in the order the forward created them (the input first),
  each split where an attention op gave its neurons different roles (a fused ``qkv``
  output becomes query, key and value sets). ``layer`` is the set's depth (the longest path
  from the input, as in the MLP and stock attention layouts),
  ``position`` the neuron's rank in its permutation orbit (its index in the set for
  sets that are not tied to others).
* **components** — ``B = b * K`` where ``K`` counts the position keys the trace used
  (tokens, a class token, pooled vectors); component ``i * K + k`` is key ``k`` of
  datapoint ``i``. A neuron that does not live at a key holds 0 there, which keeps every
  per-sample gradient exact: both ends of a weight live at the same keys.
* **edges** — one per weight entry (row-major over the weight, as the MLP converter), per
  embedding-table entry, per norm scale, and the structural relations (residual,
  gate, merge, attention) with weight 1 and no parameter.
* **symmetry** — ties (residual adds, gates, norms, merges) join neuron sets into classes
  whose members one permutation must move together; a class is *fixed* if any member is
  read by the loss or the output, is an input or a table's rows, meets a constant that
  differs between its neurons, or is used by an op gradgraph cannot follow. Attention
  heads are blocks (query with key, value with output tied). Everything else is free:
  ``perm_group`` / ``perm_block`` / ``perm_tie`` / ``position`` describe exactly that group
  (see :mod:`gradgraph.symmetry.permutation`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from gradgraph.capture import LossFn, check_closure_losses, check_finite, per_datapoint_objective
from gradgraph.convert.trace import (
    KEY_STRIDE,
    NeuronSet,
    PlanMismatch,
    UnsupportedOperationError,
    output_sets,
    replay_model,
    trace_model,
)
from gradgraph.convert.trace.ops import _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_MODULES
from gradgraph.convert.trace.tracer import _Tracer
from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, EdgeKind, GradGraph, NodeKind

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
        if runs:
            raise GradGraphError(f"the closure called {type(model).__name__} twice; gradgraph converts one forward "
                                 "per closure call")
        if not args or not isinstance(args[0], Tensor):
            raise GradGraphError(f"the closure must call {type(model).__name__} with the input tensor as its first "
                                 f"argument; got {[type(arg).__name__ for arg in args]}")
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


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, dict):
        return tuple(sorted((key, _signature(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_signature(item) for item in value)
    return repr(value)


def _plan_key(model: nn.Module, inputs: Tensor, kwargs: dict[str, Any]) -> tuple:
    """What a plan depends on besides the op fingerprints a replay checks."""
    return (
        type(model),
        tuple((name, tuple(p.shape), p.dtype, p.device.type, p.requires_grad) for name, p in model.named_parameters()),
        tuple(type(module).__name__ for module in model.modules()),
        _signature(inputs),
        _signature(kwargs),
        model.training,
        tuple(_ELEMENTWISE_MODULES),
        tuple(_ELEMENTWISE_FUNCTIONS),
    )


class PlanCache:
    """A small LRU of :class:`TracePlan` s: later conversions of an architecture replay, not trace.

    A replay checks every op of the forward against the plan's fingerprints (name, arguments
    by producer, output shapes) and traces afresh if anything differs, so a cached plan is
    only ever used for the computation it describes.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, TracePlan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> TracePlan | None:
        with self._lock:
            plan = self._entries.get(key)
            if plan is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return plan

    def put(self, key: tuple, plan: TracePlan) -> None:
        with self._lock:
            self._entries[key] = plan
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: The traced converter's plans, keyed by architecture, input shape and call arguments.
PLAN_CACHE = PlanCache()


# --------------------------------------------------------------------- factors
def _component_index(comps: Tensor, num_keys: int) -> Tensor:
    return (comps // KEY_STRIDE) * num_keys + comps % KEY_STRIDE


@dataclass
class _Record:
    """Where one recorded tensor's elements go in ``act`` / ``grad`` (flat ``row * B + column``).

    ``block = (first, width)`` when the tensor, read as ``[B, width]``, is exactly rows
    ``first .. first + width`` of the factor matrix (a ``[b, T, d]`` tensor of one neuron set
    when the tokens are the only keys): then it is one strided copy, not a scatter.
    """

    source: tuple  # ("input",) | ("out", op, position) | ("derived", op, recipe)
    shape: tuple[int, ...]
    keep: Tensor | None  # flat mask of the elements that are some neuron's value at some component
    linear: Tensor | None
    block: tuple[int, int] | None = None


@dataclass
class _OnehotRecord:
    """One-hot activations of table rows: rows from an embedding's indices (``op``) or constant."""

    op: int | None
    rows: Tensor | None
    shape: tuple[int, ...]
    keep: Tensor | None
    columns: Tensor
    first: int
    padding: int | None = None  # a padding_idx row gets no gradient: its one-hot stays 0


@dataclass
class TracePlan:
    """Everything a trace found that does not depend on values: reused for later calls.

    A later call of the same architecture on inputs of the same shape replays the forward with
    a light mode that only checks each op's fingerprint and keeps the tensors the factors come
    from (:func:`gradgraph.convert.trace.replay_model`); the graph's structure is shared.
    """

    fingerprints: list[tuple]
    act: list[_Record]
    grad: list[_Record]
    onehot: list[_OnehotRecord]
    structure: dict[str, Any]
    weights: list[_SlotCopy]  # parameter values -> edge rows
    biases: list[_SlotCopy]  # parameter values -> node rows
    param_names: list[str]
    param_shapes: list[list[int]]
    num_nodes: int
    num_edges: int
    num_keys: int
    set_names: list[tuple[int, int, str]]  # (first node, size, origin) for messages

    _derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    def structure_on(self, device: torch.device) -> dict[str, Tensor]:
        """The shared structure tensors on ``device`` (moved once per device, then reused)."""
        key = ("structure", str(device))
        if key not in self._derived:
            self._derived[key] = {name: value.to(device) for name, value in self.structure.items()}
        return self._derived[key]

    def component_sample(self, num_datapoints: int, device: torch.device) -> Tensor:
        """``[b * K]``: the datapoint of every component."""
        key = ("component_sample", num_datapoints, str(device))
        if key not in self._derived:
            self._derived[key] = torch.arange(num_datapoints, device=device).repeat_interleave(self.num_keys)
        return self._derived[key]

    @property
    def wanted(self) -> set[int]:
        ops = {record.source[1] for record in self.act + self.grad if record.source[0] != "input"}
        return ops | {record.op for record in self.onehot if record.op is not None}


def _source(tracer: _Tracer, tensor: Tensor) -> tuple:
    derived = tracer.derived.get(id(tensor))
    if derived is not None and derived[0] is tensor:
        return ("derived", derived[1], derived[2])
    found = tracer.log.source(tensor)
    if found == (-1, 0):
        return ("input",)
    if not isinstance(found, tuple) or found[0] == "param":
        raise GradGraphError("internal: a recorded tensor was produced by no op of the trace")
    return ("out", found[0], found[1])


def _record(tracer: _Tracer, tensor: Tensor, nodes: Tensor, comps: Tensor, num_keys: int,
            num_components: int) -> _Record:
    keep = (nodes >= 0) & (comps >= 0)
    all_kept = bool(keep.all())
    linear = nodes[keep] * num_components + _component_index(comps[keep], num_keys)
    source = _source(tracer, tensor)
    width = int(nodes.shape[-1]) if nodes.dim() else 1
    if all_kept and nodes.numel() == num_components * width and width > 0:
        first = int(nodes.reshape(-1)[0])
        block = (first + torch.arange(width))[None, :] * num_components + torch.arange(num_components)[:, None]
        if torch.equal(linear, block.reshape(-1)):
            return _Record(source, tuple(nodes.shape), None, None, (first, width))
    return _Record(source, tuple(nodes.shape), None if all_kept else keep.reshape(-1), linear)


def _plan_records(tracer: _Tracer, num_datapoints: int) -> tuple[list[_Record], list[_Record], list[_OnehotRecord],
                                                                   int]:
    num_keys = max(len(tracer.keys), 1)
    num_components = num_datapoints * num_keys
    acts, grads, onehots = [], [], []
    for neuron_set in tracer.sets:
        records = neuron_set.act_records or ([neuron_set.last] if neuron_set.last is not None else [])
        for value, nodes, comps in records:
            if comps is not None:
                acts.append(_record(tracer, value, nodes, comps, num_keys, num_components))
        for index, nodes, comps, op, padding in neuron_set.onehot_records:
            keep = (nodes >= 0) & (comps >= 0)
            if op is None and padding is not None:
                keep &= index != padding
            onehots.append(_OnehotRecord(
                op, None if op is not None else index[keep], tuple(nodes.shape),
                None if bool(keep.all()) else keep.reshape(-1), _component_index(comps[keep], num_keys),
                neuron_set.first, padding))
        for tensor, nodes, comps in neuron_set.grad_records:
            if nodes is not None and tensor.requires_grad:
                grads.append(_record(tracer, tensor, nodes, comps, num_keys, num_components))
    return acts, grads, onehots, num_keys


def _resolve(source: tuple, x: Tensor, captured: dict[int, tuple[tuple, dict, Any]]) -> Tensor:
    if source[0] == "input":
        return x
    args, kwargs, output = captured[source[1]]
    if source[0] == "out":
        return tree_flatten(output)[0][source[2]]
    recipe = source[2]
    with torch.no_grad():
        value = args[0].detach()
        if recipe[0] == "layer_norm":
            return F.layer_norm(value, recipe[1], None, None, recipe[2])
        if recipe[0] == "rms_norm":
            epsilon = torch.finfo(value.dtype).eps if recipe[1] is None else recipe[1]
            return value * torch.rsqrt(value.pow(2).mean(-1, keepdim=True) + epsilon)
        return (value - args[1]) / torch.sqrt(args[2] + recipe[1])


def _unwritten_rows(num_nodes: int, records: list[_Record]) -> list[tuple[int, int]]:
    """``[(start, stop)]`` row ranges of ``[N, B]`` that no block record writes whole."""
    covered = torch.zeros(num_nodes, dtype=torch.bool)
    for record in records:
        if record.block is not None:
            first, width = record.block
            covered[first:first + width] = True
    edges = torch.diff(torch.cat((torch.tensor([True]), covered, torch.tensor([True]))).int())
    starts = torch.nonzero(edges == -1).flatten().tolist()
    stops = torch.nonzero(edges == 1).flatten().tolist()
    return list(zip(starts, stops))


def _fill(plan: TracePlan, x: Tensor, captured: dict, objective: Tensor, model: nn.Module, num_datapoints: int,
          dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``act``, ``grad`` ``[N, B]`` from the recorded tensors, with the one backward pass."""
    num_components = num_datapoints * plan.num_keys
    # rows that a block record writes whole need no zeros first (most of a transformer's rows)
    act = torch.empty(plan.num_nodes * num_components, dtype=dtype, device=device)
    grad = torch.empty_like(act)
    for which, target, records in (("act", act, plan.act), ("grad", grad, plan.grad)):
        if ("unwritten", which) not in plan._derived:
            plan._derived[("unwritten", which)] = _unwritten_rows(plan.num_nodes, records)
        rows = target.view(plan.num_nodes, num_components)
        for start, stop in plan._derived[("unwritten", which)]:
            rows[start:stop].zero_()
    grad_tensors: dict[tuple, Tensor] = {}
    for record in plan.grad:
        grad_tensors.setdefault(record.source, _resolve(record.source, x, captured))
    tensors = list(grad_tensors.values())
    # the parameters ride along in the same backward pass, so a parameter that reaches the loss
    # through ops the trace did not follow is caught instead of silently missing
    known = set(plan.param_names)
    others = [(name, param) for name, param in model.named_parameters() if param.requires_grad and name not in known]
    results = torch.autograd.grad(objective.sum(), tensors + [param for _, param in others], allow_unused=True)
    for (name, _), result in zip(others, results[len(tensors):]):
        if result is not None:
            raise UnsupportedOperationError(
                name.rsplit(".", 1)[0] if "." in name else "", "parameter use", "in the forward",
                f"the parameter '{name}' affects the loss through ops gradgraph did not follow (a custom "
                "autograd.Function, a tensor made inside forward, or an op without a rule); register the module "
                "with gradgraph.convert.register_elementwise or gradgraph.register_converter")
    gradient_of = dict(zip(grad_tensors, results))

    def scatter(target: Tensor, values: Tensor, record: _Record) -> None:
        values = values.detach()
        if tuple(values.shape) != record.shape:
            values = values.expand(record.shape)
        if record.block is not None:
            first, width = record.block
            rows = target.view(plan.num_nodes, num_components)[first:first + width]
            rows.copy_(values.reshape(num_components, width).T)
            return
        values = values.reshape(-1)
        if record.keep is not None:
            values = values[record.keep.to(values.device)]
        target[record.linear.to(device)] = values.to(dtype)

    for record in plan.act:
        scatter(act, _resolve(record.source, x, captured), record)
    for record in plan.grad:
        result = gradient_of.get(record.source)
        if result is not None:
            scatter(grad, result, record)
        elif record.block is not None:  # no gradient reached it: its rows are zero, not unwritten
            first, width = record.block
            grad.view(plan.num_nodes, num_components)[first:first + width].zero_()
    act = act.view(plan.num_nodes, num_components)
    grad = grad.view(plan.num_nodes, num_components)
    for record in plan.onehot:
        if record.op is None:
            rows = record.rows
        else:
            indices = captured[record.op][0][0]
            rows = indices.detach().unsqueeze(-1).expand(record.shape).reshape(-1)
            rows = rows if record.keep is None else rows[record.keep.to(rows.device)]
        columns = record.columns.to(device)
        if record.op is not None and record.padding is not None:
            columns = columns[(rows != record.padding).to(device)]
            rows = rows[rows != record.padding]
        act[(record.first + rows).to(device), columns] = 1
    if not bool(torch.isfinite(act.sum() + grad.sum())):
        for first, size, origin in plan.set_names:
            check_finite(f"activation of the neurons of '{origin}'", act[first:first + size])
            check_finite(f"backpropagated signal of the neurons of '{origin}'", grad[first:first + size])
    return act, grad


# --------------------------------------------------------------------- layout
class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def _roles(tracer: _Tracer) -> Tensor:
    """Per node: the NodeKind an attention op gave it, or -1."""
    roles = torch.full((tracer.num_nodes,), -1, dtype=torch.long)
    for block in tracer.attention:
        for q, k, v, o in block:
            roles[q], roles[k], roles[v], roles[o] = (int(NodeKind.QUERY), int(NodeKind.KEY), int(NodeKind.VALUE),
                                                      int(NodeKind.ATTENTION))
    return roles


def _final_sets(tracer: _Tracer, roles: Tensor) -> tuple[Tensor, list[tuple[NeuronSet, int, int, int]]]:
    """Split created sets where roles change; returns ``(set_of_node [N], [(created, start, stop, role)])``."""
    pieces: list[tuple[NeuronSet, int, int, int]] = []
    set_of_node = torch.empty(tracer.num_nodes, dtype=torch.long)
    for neuron_set in tracer.sets:
        start = neuron_set.first
        stop = neuron_set.first + neuron_set.size
        role = roles[start:stop]
        cuts = [start] + [start + i for i in range(1, neuron_set.size) if role[i] != role[i - 1]] + [stop]
        for low, high in zip(cuts, cuts[1:]):
            set_of_node[low:high] = len(pieces)
            pieces.append((neuron_set, low, high, int(roles[low])))
    return set_of_node, pieces


def _make_plan(tracer: _Tracer, output: Any, num_datapoints: int) -> TracePlan:
    """The value-free part of the graph: layout, labels, group, slots, where factors come from."""
    num_nodes = tracer.num_nodes
    roles = _roles(tracer)
    set_of_node, pieces = _final_sets(tracer, roles)
    reaching_output = output_sets(tracer, output)
    acts, grads, onehots, num_keys = _plan_records(tracer, num_datapoints)

    # ---- edges
    sources, targets, kinds, params, positions = [], [], [], [], []
    weights: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    edge_count = 0
    for src, dst, kind, param, pos, _ in tracer.edges:
        sources.append(src)
        targets.append(dst)
        kinds.append(torch.full((len(src),), int(kind), dtype=torch.long))
        params.append(torch.full((len(src),), param, dtype=torch.long))
        positions.append(pos if pos is not None else torch.full((len(src),), -1, dtype=torch.long))
        if param >= 0:
            rows, places = weights.setdefault(param, ([], []))
            rows.append(torch.arange(edge_count, edge_count + len(src)))
            places.append(pos)
        edge_count += len(src)
    edge_index = torch.stack((torch.cat(sources), torch.cat(targets))) if sources else torch.empty(2, 0,
                                                                                                   dtype=torch.long)
    edge_kind = torch.cat(kinds) if kinds else torch.empty(0, dtype=torch.long)

    # ---- node labels
    node_param = torch.full((num_nodes,), -1, dtype=torch.long)
    node_param_pos = torch.full((num_nodes,), -1, dtype=torch.long)
    biases: list[tuple[str, Tensor, Tensor]] = []
    activation = torch.full((num_nodes,), int(ActivationKind.IDENTITY), dtype=torch.long)
    for neuron_set in tracer.sets:
        rows = slice(neuron_set.first, neuron_set.first + neuron_set.size)
        if neuron_set.bias_param >= 0:
            node_param[rows] = neuron_set.bias_param
            node_param_pos[rows] = neuron_set.bias_pos
            biases.append((tracer.param_names[neuron_set.bias_param], torch.arange(rows.start, rows.stop),
                           neuron_set.bias_pos.clone()))
        label = neuron_set.activation
        if getattr(neuron_set, "elementwise_ops", 0) and label is not ActivationKind.IDENTITY:
            label = ActivationKind.OTHER
        elif getattr(neuron_set, "elementwise_ops", 0) and neuron_set.created_by == "affine" \
                and not neuron_set.absorbed:
            label = ActivationKind.OTHER
        activation[rows] = int(label)

    # ---- symmetry classes over final sets
    union = _UnionFind(len(pieces))
    node_union = _UnionFind(num_nodes)
    for a, b in tracer.ties:
        for x, y in zip(a.tolist(), b.tolist()):
            union.union(int(set_of_node[x]), int(set_of_node[y]))
            node_union.union(x, y)
    for a, b in _shared_parameter_ties(tracer):
        for x, y in zip(a.tolist(), b.tolist()):
            union.union(int(set_of_node[x]), int(set_of_node[y]))
            node_union.union(x, y)
    for block in tracer.attention:
        for q, k, v, o in block:
            for nodes in (k, v, o):
                union.union(int(set_of_node[q[0]]), int(set_of_node[nodes[0]]))
        first = block[0][0][0]
        for q, _, _, _ in block[1:]:
            union.union(int(set_of_node[first]), int(set_of_node[q[0]]))
    has_attention = bool(tracer.attention)
    classes: dict[int, list[int]] = {}
    for index in range(len(pieces)):
        classes.setdefault(union.find(index), []).append(index)

    node_kind = torch.empty(num_nodes, dtype=torch.long)
    for index, (neuron_set, low, high, role) in enumerate(pieces):
        kind = neuron_set.kind
        if role >= 0:
            kind = NodeKind(role)
        elif neuron_set.index in reaching_output and neuron_set.created_by not in ("input", "token"):
            kind = NodeKind.OUTPUT
        elif neuron_set.created_by == "affine" and (not neuron_set.absorbed or getattr(neuron_set, "gated", False)):
            members = classes[union.find(index)]
            plain = all(pieces[m][0].created_by == "affine"
                        and (not pieces[m][0].absorbed or getattr(pieces[m][0], "gated", False)) for m in members)
            if plain:
                kind = NodeKind.FFN_HIDDEN if (has_attention or len(members) > 1) else NodeKind.HIDDEN
            else:
                kind = NodeKind.RESIDUAL
        elif neuron_set.created_by == "affine":
            kind = NodeKind.RESIDUAL
        node_kind[low:high] = int(kind)

    # affine edges named by what they feed, as the stock attention layout names them
    if len(edge_kind):
        src_kind, dst_kind = node_kind[edge_index[0]], node_kind[edge_index[1]]
        affine = edge_kind == int(EdgeKind.LINEAR)
        for kinds, side, label in (
            (NodeKind.QUERY, dst_kind, EdgeKind.QUERY), (NodeKind.KEY, dst_kind, EdgeKind.KEY),
            (NodeKind.VALUE, dst_kind, EdgeKind.VALUE), (NodeKind.ATTENTION, src_kind, EdgeKind.ATTENTION_OUT),
            (NodeKind.FFN_HIDDEN, dst_kind, EdgeKind.FFN_IN), (NodeKind.FFN_HIDDEN, src_kind, EdgeKind.FFN_OUT),
        ):
            edge_kind[affine & (side == int(kinds))] = int(label)

    perm_group = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_block = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_tie = torch.full((num_nodes,), -1, dtype=torch.long)
    position = torch.empty(num_nodes, dtype=torch.long)
    for index, (_, low, high, _) in enumerate(pieces):
        position[low:high] = torch.arange(high - low)
    attention_nodes = roles >= 0
    group = 0
    for root in sorted(classes):
        members = classes[root]
        member_sets = [pieces[m][0] for m in members]
        nodes = torch.cat([torch.arange(pieces[m][1], pieces[m][2]) for m in members])
        if any(s.pinned or s.index in reaching_output or s.created_by in ("input", "token") for s in member_sets):
            continue
        if bool(attention_nodes[nodes].any()):
            if not bool(attention_nodes[nodes].all()) or not _assign_heads(tracer, nodes, set_of_node, perm_block,
                                                                          perm_tie, position, pieces):
                continue
        else:
            slots = torch.tensor([node_union.find(n) for n in nodes.tolist()])
            ranks = _flat_ranks(nodes, slots, set_of_node)
            if ranks is None:
                continue
            position[nodes] = ranks
            perm_block[nodes] = 0
            perm_tie[nodes] = 0
        perm_group[nodes] = group
        group += 1

    structure = {
        "edge_index": edge_index,
        "layer": _depths(edge_index, edge_kind, set_of_node, len(pieces)),
        "node_kind": node_kind,
        "edge_kind": edge_kind,
        "activation": activation,
        "perm_group": perm_group,
        "perm_block": perm_block,
        "perm_tie": perm_tie,
        "position": position,
        "node_param": node_param,
        "node_param_pos": node_param_pos,
        "edge_param": torch.cat(params) if params else torch.empty(0, dtype=torch.long),
        "edge_param_pos": torch.cat(positions) if positions else torch.empty(0, dtype=torch.long),
    }
    return TracePlan(
        fingerprints=list(tracer.log.fingerprints),
        act=acts,
        grad=grads,
        onehot=onehots,
        structure=structure,
        weights=[_slot_copy(tracer.param_names[param], torch.cat(rows), torch.cat(places))
                 for param, (rows, places) in weights.items()],
        biases=[_slot_copy(name, rows, places) for name, rows, places in biases],
        param_names=list(tracer.param_names),
        param_shapes=[list(shape) for shape in tracer.param_shapes],
        num_nodes=num_nodes,
        num_edges=int(edge_index.shape[1]),
        num_keys=num_keys,
        set_names=[(neuron_set.first, neuron_set.size, neuron_set.origin) for neuron_set in tracer.sets],
    )


@dataclass
class _SlotCopy:
    """Where one parameter's values go in ``edge_attr`` (or the bias vector): ``rows`` take
    ``flat[places]``; either is a slice when consecutive (every ``nn.Linear`` weight is both)."""

    name: str
    rows: slice | Tensor
    places: slice | Tensor

    def write(self, target: Tensor, flat: Tensor) -> None:
        places = self.places if isinstance(self.places, slice) else self.places.to(flat.device)
        rows = self.rows if isinstance(self.rows, slice) else self.rows.to(target.device)
        target[rows] = flat[places].to(target.dtype)


def _as_slice(index: Tensor) -> slice | Tensor:
    if len(index) and bool((index == index[0] + torch.arange(len(index))).all()):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def _slot_copy(name: str, rows: Tensor, places: Tensor) -> _SlotCopy:
    return _SlotCopy(name, _as_slice(rows), _as_slice(places))


def _assemble(plan: TracePlan, model: nn.Module, act: Tensor, grad: Tensor, num_datapoints: int) -> GradGraph:
    """A GradGraph from a plan's shared structure, the model's values and fresh factors."""
    device, dtype = act.device, act.dtype
    named = dict(model.named_parameters())
    flat = {name: named[name].detach().reshape(-1) for name in plan.param_names}
    edge_attr = torch.ones(plan.num_edges, dtype=dtype, device=device)
    for slot in plan.weights:
        slot.write(edge_attr, flat[slot.name])
    bias = torch.zeros(plan.num_nodes, dtype=dtype, device=device)
    for slot in plan.biases:
        slot.write(bias, flat[slot.name])
    structure = plan.structure_on(device)
    return GradGraph(
        x=bias[:, None],
        edge_attr=edge_attr[:, None],
        act=act,
        grad=grad,
        **structure,
        component_sample=plan.component_sample(num_datapoints, device),
        num_datapoints=num_datapoints,
        param_names=list(plan.param_names),
        param_shapes=[list(shape) for shape in plan.param_shapes],
    )


def _shared_parameter_ties(tracer: _Tracer) -> list[tuple[Tensor, Tensor]]:
    """Node pairs one permutation must move together because they share a parameter entry.

    A weight used at two call sites (a layer applied twice, a tied embedding and head) moves
    as one: the neurons its rows meet at one site move with those they meet at the other, and
    so do the neurons its columns meet. Which end of an edge meets the rows is read per call
    site (the destination for a linear map, the table row for an embedding, the source for a
    transposed use); a site where neither end is a function of the row is pinned.
    """
    uses: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for src, dst, _, param, pos, _ in tracer.edges:
        if param >= 0:
            uses.setdefault(param, []).append((src, dst, pos))
    for neuron_set in tracer.sets:  # a bias is a weight whose "row" is its neuron
        if neuron_set.bias_param >= 0:
            nodes = neuron_set.first + torch.arange(neuron_set.size)
            uses.setdefault(neuron_set.bias_param, []).append((nodes, nodes, neuron_set.bias_pos))
    ties: list[tuple[Tensor, Tensor]] = []
    for param, sites in uses.items():
        if len(sites) < 2:
            continue
        shape = tracer.param_shapes[param]
        numel, columns = math.prod(shape), (shape[-1] if len(shape) >= 2 else 1)
        row_node = torch.full((numel,), -1, dtype=torch.long)
        column_node = torch.full((numel,), -1, dtype=torch.long)
        for src, dst, pos in sites:
            rows, cols = pos // columns, pos % columns
            if _is_function(dst, rows) and _is_function(src, cols):
                at_row, at_column = dst, src
            elif _is_function(src, rows) and _is_function(dst, cols):
                at_row, at_column = src, dst
            else:
                for node in torch.cat((src, dst)).unique().tolist():
                    tracer.set_of(node).pinned = True
                continue
            for table, nodes in ((row_node, at_row), (column_node, at_column)):
                seen = table[pos] >= 0
                if bool(seen.any()):
                    pairs = torch.unique(torch.stack((table[pos][seen], nodes[seen])), dim=1)
                    ties.append((pairs[0], pairs[1]))
                table[pos[~seen]] = nodes[~seen]
    return ties


def _is_function(nodes: Tensor, index: Tensor) -> bool:
    """Whether every node meets one value of ``index`` (its row or column of the weight)."""
    pairs = torch.unique(torch.stack((nodes, index)), dim=1)
    return pairs.shape[1] == torch.unique(nodes).numel()


#: relations between neurons of one step (a head's query and key dims, the two factors of a
#: gate): they do not make one neuron deeper than the other
_SAME_DEPTH_EDGES = (int(EdgeKind.QUERY_KEY), int(EdgeKind.GATE))


def _depths(edge_index: Tensor, edge_kind: Tensor, set_of_node: Tensor, num_sets: int) -> Tensor:
    """``[N]`` depth of every node: the longest path from an input over the edges, by neuron set.

    The MLP chain's layer index and the stock attention layout's depth (query, key and value
    one step after the stream they read, merged heads one after them) are both this number.
    """
    keep = ~torch.isin(edge_kind, torch.tensor(_SAME_DEPTH_EDGES))
    pairs = torch.unique(set_of_node[edge_index[:, keep]], dim=1)
    pairs = pairs[:, pairs[0] != pairs[1]]
    depth = torch.zeros(num_sets, dtype=torch.long)
    for _ in range(num_sets):  # relaxation: at most one round per set on a longest path
        deeper = depth.scatter_reduce(0, pairs[1], depth[pairs[0]] + 1, reduce="amax")
        if torch.equal(deeper, depth):
            return depth[set_of_node]
        depth = deeper
    raise GradGraphError("internal: the traced neuron sets form a cycle")


def _flat_ranks(nodes: Tensor, slots: Tensor, set_of_node: Tensor) -> Tensor | None:
    """Rank of every node's orbit slot, if each slot holds exactly one node of every member set."""
    unique_slots, slot_index = torch.unique(slots, return_inverse=True)
    member_sets = set_of_node[nodes]
    num_sets = len(torch.unique(member_sets))
    counts = torch.bincount(slot_index, minlength=len(unique_slots))
    if not bool((counts == num_sets).all()):
        return None
    pairs = torch.unique(torch.stack((slot_index, member_sets)), dim=1)
    if pairs.shape[1] != len(nodes):
        return None
    # rank slots by the order of the first member set's nodes, so an untied set keeps its order
    first_set = member_sets.min()
    order = torch.full((len(unique_slots),), -1, dtype=torch.long)
    in_first = member_sets == first_set
    order[slot_index[in_first]] = torch.arange(int(in_first.sum()))
    if bool((order < 0).any()):
        return None
    return order[slot_index]


def _assign_heads(tracer: _Tracer, nodes: Tensor, set_of_node: Tensor, perm_block: Tensor, perm_tie: Tensor,
                  position: Tensor, pieces: list) -> bool:
    """Heads as blocks of one attention op; q/k tied (tie 0), v/o tied (tie 1)."""
    node_set = set(nodes.tolist())
    blocks = [block for block in tracer.attention if int(block[0][0][0]) in node_set]
    if len(blocks) != 1:
        return False
    block = blocks[0]
    covered = torch.cat([torch.cat(head) for head in block])
    if len(covered) != len(nodes) or set(covered.tolist()) != node_set:
        return False
    for head, (q, k, v, o) in enumerate(block):
        perm_block[torch.cat((q, k, v, o))] = head
        perm_tie[torch.cat((q, k))] = 0
        perm_tie[torch.cat((v, o))] = 1
        for rows in (q, k, v, o):
            position[rows] = head * len(rows) + torch.arange(len(rows))
    return True
