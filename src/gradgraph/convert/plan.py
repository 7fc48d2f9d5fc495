"""What a trace finds that does not depend on values, and how a later call reuses it.

A :class:`TracePlan` holds the layout, labels, group and slots of a traced architecture and,
for every recorded tensor, the op that produced it and where its elements go in
``act`` / ``grad``. :data:`PLAN_CACHE` keeps plans per architecture and call; :func:`_fill`
runs the one backward pass and writes the factors; :func:`_assemble` puts a graph together
from a plan, the model's values and fresh factors.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from gradgraph.capture import check_finite
from gradgraph.convert.trace import KEY_STRIDE, UnsupportedOperationError
from gradgraph.convert.trace.ops import _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_MODULES
from gradgraph.convert.trace.meta import NeuronSet, ValueGuard
from gradgraph.convert.trace.tracer import _Tracer
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph, consecutive_span

if TYPE_CHECKING:
    from gradgraph.convert.chain import ChainCapture

def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, dict):
        return tuple(sorted((key, _signature(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_signature(item) for item in value)
    return repr(value)


def _parameter_signature(parameters: Mapping[str, Tensor]) -> tuple:
    """Per parameter ``(name, shape, floating, device type, requires_grad)``: its part of the plan key."""
    return tuple([(name, p.shape, p.dtype.is_floating_point, p.device.type, p.requires_grad)
                  for name, p in parameters.items()])


def _plan_key(model: nn.Module, inputs: Tensor, kwargs: dict[str, Any], parameter_signature: tuple,
              modules: list[nn.Module]) -> tuple:
    """What a plan depends on besides the op fingerprints a replay checks.

    ``parameter_signature`` is :func:`_parameter_signature` of ``dict(model.named_parameters())``
    and ``modules`` is ``list(model.modules())``, read once per conversion.

    Not the floating dtype of the parameters or the input: a plan holds only the layout and
    where the factors come from, so a float32 and a float64 model of one architecture share it
    (and its structure tensors). A forward whose ops depend on the dtype still differs in its
    fingerprints (a cast, a ``finfo`` constant) and is traced again.
    """
    # built on every conversion: module types themselves (not their names), torch.Size as it is
    return (
        type(model),
        parameter_signature,
        tuple([type(module) for module in modules]),
        ("tensor", inputs.shape, inputs.dtype.is_floating_point, inputs.device.type),
        _signature(kwargs) if kwargs else (),
        model.training,
        tuple(_ELEMENTWISE_MODULES),
        tuple(_ELEMENTWISE_FUNCTIONS),
    )


class PlanCache:
    """A small LRU of :class:`TracePlan` s: later conversions of an architecture replay, not trace.

    A replay checks every op of the forward against the plan's fingerprints (name, arguments
    by producer, output shapes) and traces afresh if anything differs, so a cached plan is
    only ever used for the computation it describes. Graphs share a plan's structure tensors,
    read-only; a plan one of whose tensors was written in place (:meth:`TracePlan.intact`) is
    dropped on its next lookup. Bounded in entries and in the bytes of the plans' structure; a
    plan larger than the byte budget is used once and not kept.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 256 * 2**20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, TracePlan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> TracePlan | None:
        """The plan stored under ``key`` (the most recently used from now on), or ``None``."""
        with self._lock:
            plan = self._entries.get(key)
            if plan is not None and not plan.intact():
                del self._entries[key]  # a caller wrote into a shared structure tensor
                plan = None
            if plan is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return plan

    def put(self, key: tuple, plan: TracePlan) -> None:
        """Keep ``plan`` under ``key``, dropping the least recently used plans beyond the bounds."""
        with self._lock:
            self._entries.pop(key, None)
            if plan.nbytes > self.max_bytes:
                return
            self._entries[key] = plan
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the structure tensors the cached plans hold."""
        return sum(plan.nbytes for plan in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every plan and reset the counts (graphs already returned keep their tensors)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


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

    #: records the plan's tensors by calling a plain chain's leaves (None: the general replay)
    chain: ChainCapture | None = None
    #: op index -> decisions the layout read off constant values; a replay re-checks them
    guards: dict[int, list[ValueGuard]] = field(default_factory=dict)
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tensors = tuple(self.structure.values())
        self._versions = tuple((tensor, tensor._version) for tensor in tensors)
        self.nbytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def intact(self) -> bool:
        """``False`` if a structure tensor (shared by the graphs) was written in place since the trace."""
        return all(tensor._version == version for tensor, version in self._versions)

    def structure_on(self, device: torch.device) -> dict[str, Tensor]:
        """The shared structure tensors on ``device`` (moved once per device, then reused)."""
        key = ("structure", str(device))
        if key not in self._derived:
            self._derived[key] = {name: value.to(device) for name, value in self.structure.items()}
        return self._derived[key]

    def template_on(self, device: torch.device) -> GradGraph:
        """A graph of only the structure tensors on ``device``; never handed out, only shallow-copied."""
        key = ("template", str(device))
        if key not in self._derived:
            self._derived[key] = GradGraph(**self.structure_on(device))
        return self._derived[key]

    def component_sample(self, num_datapoints: int, device: torch.device) -> Tensor:
        """``[b * K]``: the datapoint of every component (a fresh tensor: graphs own it)."""
        samples = torch.arange(num_datapoints, device=device)
        return samples if self.num_keys == 1 else samples.repeat_interleave(self.num_keys)

    @property
    def sources(self) -> list[tuple]:
        """Where every tensor the plan reads comes from: the records' sources, and
        ``("onehot", op)`` per one-hot record (an embedding's indices)."""
        return [record.source for record in self.act + self.grad] + [("onehot", record.op) for record in self.onehot]

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
    source = _source(tracer, tensor)
    width = int(nodes.shape[-1]) if nodes.dim() else 1
    if width > 0 and nodes.numel() == num_components * width:
        # a block: read as [B, width], element (c, w) is neuron first + w at component c, i.e.
        # its comps code is that of component c (compared as codes: converting the O(B·width)
        # codes to component indices first was most of a first conversion's record time)
        rows = nodes.reshape(num_components, width)
        first = int(rows[0, 0])
        if first >= 0 and torch.equal(rows, (first + torch.arange(width)).expand(num_components, width)):
            component = torch.arange(num_components)
            codes = (component // num_keys) * KEY_STRIDE + component % num_keys
            if torch.equal(comps.reshape(num_components, width), codes[:, None].expand(num_components, width)):
                return _Record(source, tuple(nodes.shape), None, None, (first, width))
    keep = (nodes >= 0) & (comps >= 0)
    all_kept = bool(keep.all())
    linear = nodes[keep] * num_components + _component_index(comps[keep], num_keys)
    return _Record(source, tuple(nodes.shape), None if all_kept else keep.reshape(-1), linear)


def _covers(neuron_set: NeuronSet, nodes: Tensor) -> bool:
    """Whether ``nodes`` holds every neuron of the set."""
    return torch.unique(nodes[neuron_set.holds(nodes)]).numel() == neuron_set.size


def _own_nodes(neuron_set: NeuronSet, nodes: Tensor) -> Tensor:
    """``nodes`` with the entries of other sets' neurons set to -1 (not written)."""
    inside = neuron_set.holds(nodes)
    return nodes if bool(inside.all()) else torch.where(inside, nodes, torch.full_like(nodes, -1))


def _plan_records(tracer: _Tracer, num_datapoints: int, reaching_output: set[int] = frozenset()
                  ) -> tuple[list[_Record], list[_Record], list[_OnehotRecord], int]:
    """Where every set's act, grad and one-hot rows come from.

    A set no affine map reads takes its newest value as its act (an output's values) — if that
    value holds all of the set's neurons or reaches the output: a part of a set that leads
    nowhere (``h.chunk(2)[0]`` never read) would give its neurons acts that a permutation of the
    set does not move with them, so such a set keeps zero acts.
    """
    num_keys = max(len(tracer.keys), 1)
    num_components = num_datapoints * num_keys
    acts, grads, onehots = [], [], []
    for neuron_set in tracer.sets:
        records = neuron_set.act_records
        if not records and neuron_set.last is not None and (
                neuron_set.index in reaching_output or _covers(neuron_set, neuron_set.last[1])):
            records = [neuron_set.last]
        for value, nodes, comps in records:
            if comps is not None:
                # a value may hold several sets' neurons (cat([h, x])); each set writes only its
                # own, so a later version of one set never overwrites another set's act
                acts.append(_record(tracer, value, _own_nodes(neuron_set, nodes), comps, num_keys, num_components))
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
        return output if isinstance(output, Tensor) and source[2] == 0 else tree_flatten(output)[0][source[2]]
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


def _tiles(records: list[_Record], num_nodes: int) -> bool:
    """Whether ``records`` are blocks that write rows ``0 .. N`` in order, each once (an MLP chain)."""
    row = 0
    for record in records:
        if record.block is None or record.block[0] != row:
            return False
        row += record.block[1]
    return row == num_nodes


def _factor(plan: TracePlan, which: str, values: list[Tensor | None], num_components: int, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """``act`` or ``grad`` ``[N, B]`` from the recorded values of ``plan.act`` / ``plan.grad``
    (``None``: no gradient reached the tensor, its elements are 0). Run under ``no_grad``."""
    records = plan.act if which == "act" else plan.grad
    derived = plan._derived
    if derived[("tiles", which)]:
        # [B, width] blocks -> [N, B]: one cat of the transposed views writes the result
        # contiguous in a single pass, as many ops as blocks
        pieces = []
        for value, record in zip(values, records):
            width = record.block[1]
            if value is None:
                pieces.append(torch.zeros(width, num_components, dtype=dtype, device=device))
                continue
            if value.shape != (num_components, width):
                value = (value if tuple(value.shape) == record.shape else value.expand(record.shape))
                value = value.reshape(num_components, width)
            pieces.append(value.T)
        result = torch.cat(pieces)
        return result if result.dtype == dtype and result.device == device else result.to(device, dtype)
    # rows that a block record writes whole need no zeros first (most of a transformer's rows)
    target = torch.empty(plan.num_nodes * num_components, dtype=dtype, device=device)
    rows = target.view(plan.num_nodes, num_components)
    for start, stop in derived[("unwritten", which)]:
        rows[start:stop].zero_()
    for value, record in zip(values, records):
        if value is None:
            if record.block is not None:  # no gradient reached it: its rows are zero, not unwritten
                first, width = record.block
                rows[first:first + width].zero_()
            continue
        if tuple(value.shape) != record.shape:
            value = value.expand(record.shape)
        if record.block is not None:
            first, width = record.block
            rows[first:first + width].copy_(value.reshape(num_components, width).T)
            continue
        value = value.reshape(-1)
        if record.keep is not None:
            value = value[record.keep.to(value.device)]
        target[record.linear.to(device)] = value.to(dtype)
    return rows


def _fill_recipe(plan: TracePlan, parameters: Mapping[str, Tensor]) -> None:
    """What :func:`_fill` derives from the plan alone, once per plan (into ``plan._derived``):
    the distinct sources of the gradient records (and each record's position among them), the
    parameters outside the plan that require grad, and how each factor is written."""
    sources = list(dict.fromkeys(record.source for record in plan.grad))
    plan._derived["grad_sources"] = sources
    plan._derived["grad_of_record"] = [sources.index(record.source) for record in plan.grad]
    # which parameters those are follows from the plan's key: the names of those that require grad
    known = set(plan.param_names)
    plan._derived["others"] = [name for name, param in parameters.items() if param.requires_grad and name not in known]
    for which, records in (("act", plan.act), ("grad", plan.grad)):
        plan._derived[("tiles", which)] = _tiles(records, plan.num_nodes)
        plan._derived[("unwritten", which)] = _unwritten_rows(plan.num_nodes, records)
    plan._derived["fill"] = True


def _fill(plan: TracePlan, x: Tensor, captured: dict, objective: Tensor, parameters: Mapping[str, Tensor],
          num_datapoints: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``act``, ``grad`` ``[N, B]`` from the recorded tensors, with the one backward pass.

    ``parameters``: the model's ``named_parameters()`` as a mapping."""
    num_components = num_datapoints * plan.num_keys
    derived = plan._derived
    if "fill" not in derived:
        _fill_recipe(plan, parameters)
    tensors = [_resolve(source, x, captured) for source in derived["grad_sources"]]
    # the parameters ride along in the same backward pass, so a parameter that reaches the loss
    # through ops the trace did not follow is caught instead of silently missing
    others = derived["others"]
    if torch.is_grad_enabled():
        total = objective.sum()
    else:
        with torch.enable_grad():  # the caller is in no_grad; the sum must stay differentiable
            total = objective.sum()
    results = torch.autograd.grad(total, tensors + [parameters[name] for name in others] if others else tensors,
                                  allow_unused=True)
    for name, result in zip(others, results[len(tensors):]):
        if result is not None:
            raise UnsupportedOperationError(
                name.rsplit(".", 1)[0] if "." in name else "", "parameter use", "in the forward",
                f"the parameter '{name}' affects the loss through ops gradgraph did not follow (a custom "
                "autograd.Function, a tensor made inside forward, or an op without a rule); register the module "
                "with gradgraph.convert.register_elementwise or gradgraph.register_converter")
    with torch.no_grad():
        act = _factor(plan, "act", [_resolve(record.source, x, captured) for record in plan.act], num_components,
                      dtype, device)
        grad = _factor(plan, "grad", [results[index] for index in derived["grad_of_record"]], num_components, dtype,
                       device)
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
        # one sum over all factors: a NaN or Inf anywhere makes it non-finite; only then look set by
        # set (math.isfinite of the scalar: torch.isfinite of a 0-d tensor is several ops, ~10 µs)
        if not math.isfinite((act.sum() + grad.sum()).item()):
            for first, size, origin in plan.set_names:
                where = "input" if origin == "input" else f"'{origin}' output"
                check_finite(f"activation of the {where} neurons", act[first:first + size])
                check_finite(f"backpropagated signal of the {where} neurons", grad[first:first + size])
    return act, grad


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
    span = consecutive_span(index)
    return index if span is None else span


def _slot_copy(name: str, rows: Tensor | slice, places: Tensor) -> _SlotCopy:
    return _SlotCopy(name, rows if isinstance(rows, slice) else _as_slice(rows), _as_slice(places))


def _slots_tile(slots: list[_SlotCopy], num_rows: int) -> bool:
    """Whether ``slots`` write rows ``0 .. num_rows`` in order from consecutive parameter entries."""
    row = 0
    for slot in slots:
        if not isinstance(slot.rows, slice) or not isinstance(slot.places, slice) or slot.rows.start != row:
            return False
        row = slot.rows.stop
    return row == num_rows


def _bias_pieces(slots: list[_SlotCopy], num_nodes: int, whole: Mapping[str, slice]) -> list | None:
    """The bias vector ``[N]`` as consecutive pieces, in row order: a count of zeros (rows no
    bias writes) or ``(name, places)``, the entries of a parameter that fill the next rows
    (``places`` ``None``: all of them). ``None`` unless every slot writes consecutive rows from
    consecutive entries, each row at most once. ``whole``: ``slice(0, numel)`` per parameter."""
    if not all(isinstance(slot.rows, slice) and slot.rows.step in (None, 1) and isinstance(slot.places, slice)
               and slot.places.step in (None, 1) for slot in slots):
        return None
    row, pieces = 0, []
    for slot in sorted(slots, key=lambda slot: slot.rows.start):
        if slot.rows.start < row:
            return None
        if slot.rows.start > row:
            pieces.append(slot.rows.start - row)
        pieces.append((slot.name, None if slot.places == whole.get(slot.name) else slot.places))
        row = slot.rows.stop
    if row < num_nodes:
        pieces.append(num_nodes - row)
    return pieces


def _assembly_recipe(plan: TracePlan) -> None:
    """What :func:`_assemble` derives from the plan alone, once per plan (into ``plan._derived``)."""
    whole = {name: slice(0, math.prod(shape)) for name, shape in zip(plan.param_names, plan.param_shapes)}
    # every edge a weight entry, weight after weight (MLP chains): (name, places), places None
    # for a whole parameter (its flat view as it is: no indexing op)
    tiles = _slots_tile(plan.weights, plan.num_edges)
    plan._derived["weight_pieces"] = [(slot.name, None if slot.places == whole.get(slot.name) else slot.places)
                                      for slot in plan.weights] if tiles else None
    plan._derived["unweighted"] = None
    if not tiles:
        covered = torch.zeros(plan.num_edges, dtype=torch.bool)
        for slot in plan.weights:
            covered[slot.rows] = True
        # edges no parameter writes (relations) have weight 1
        plan._derived["unweighted"] = None if bool(covered.all()) else torch.nonzero(~covered).flatten()
    plan._derived["bias_pieces"] = _bias_pieces(plan.biases, plan.num_nodes, whole)
    plan._derived["zeros"] = {}


def _entries(parameters: Mapping[str, Tensor], name: str, places: slice | None) -> Tensor:
    flat = parameters[name].reshape(-1)
    return flat if places is None else flat[places]


def _bias(plan: TracePlan, parameters: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[N]``: every neuron's bias, 0 where no parameter gives one (run under ``no_grad``).

    Where the bias slots are consecutive pieces (:func:`_bias_pieces`; every plan of ``Linear``
    layers) the vector is one ``cat`` of the parameters' entries and zero runs the plan keeps,
    instead of zero-filling ``[N]`` and one indexed write per slot (~10 µs each)."""
    pieces = plan._derived["bias_pieces"]
    if pieces:
        values = [piece if isinstance(piece, int) else _entries(parameters, *piece) for piece in pieces]
        if all(isinstance(value, int) or (value.dtype == dtype and value.device == device) for value in values):
            return torch.cat([_zeros(plan, value, dtype, device) if isinstance(value, int) else value
                              for value in values])
    bias = torch.zeros(plan.num_nodes, dtype=dtype, device=device)
    for slot in plan.biases:
        slot.write(bias, parameters[slot.name].reshape(-1))
    return bias


def _zeros(plan: TracePlan, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[count]`` zeros kept by the plan per dtype and device (only ever read: ``cat`` copies them)."""
    key = (count, dtype, device)
    zeros = plan._derived["zeros"].get(key)
    if zeros is None:
        zeros = plan._derived["zeros"][key] = torch.zeros(count, dtype=dtype, device=device)
    return zeros


def _assemble(plan: TracePlan, parameters: Mapping[str, Tensor], act: Tensor, grad: Tensor,
              num_datapoints: int) -> GradGraph:
    """A GradGraph from a plan's shared structure, the model's values (``parameters``: its
    ``named_parameters()`` as a mapping) and fresh factors.

    The graph is a shallow copy of the plan's template (as PyG's transforms copy ``Data``):
    it shares the read-only structure tensors and gets its own ``x``, ``edge_attr``, factors,
    ``component_sample`` and lists.
    """
    device, dtype = act.device, act.dtype
    if "zeros" not in plan._derived:
        _assembly_recipe(plan)
    with torch.no_grad():
        weight_pieces = plan._derived["weight_pieces"]
        if weight_pieces is not None:
            edge_attr = torch.cat([_entries(parameters, name, places) for name, places in weight_pieces])
            if edge_attr.dtype != dtype or edge_attr.device != device:
                edge_attr = edge_attr.to(device, dtype)
        else:
            edge_attr = torch.empty(plan.num_edges, dtype=dtype, device=device)
            if plan._derived["unweighted"] is not None:
                edge_attr[plan._derived["unweighted"].to(device)] = 1
            for slot in plan.weights:
                slot.write(edge_attr, parameters[slot.name].reshape(-1))
        bias = _bias(plan, parameters, dtype, device)
    graph = copy.copy(plan.template_on(device))
    # what setting the fields one by one does, without PyG's per-key dispatch (a third of a small
    # model's assembly): a fresh shallow copy holds no attribute caches to invalidate
    graph._store._mapping.update(
        x=bias[:, None], edge_attr=edge_attr[:, None], act=act, grad=grad,
        component_sample=plan.component_sample(num_datapoints, device), num_datapoints=num_datapoints,
        param_names=list(plan.param_names), param_shapes=[list(shape) for shape in plan.param_shapes])
    return graph
