"""What a trace finds that does not depend on values, and how a later call finds it again.

A :class:`TracePlan` holds the layout, labels, group and slots of a traced architecture and,
for every recorded tensor, the op that produced it and where its elements go in
``act`` / ``grad`` (:func:`plan_records`). :data:`PLAN_CACHE` keeps plans per architecture and
call (:func:`plan_key`). :mod:`gradgraph.convert.assembly` makes a graph from a plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradgraph.convert.trace import KEY_STRIDE, TraceResult
from gradgraph.convert.trace.ops import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES
from gradgraph.convert.trace.meta import NeuronSet, ValueGuard
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


def parameter_signature(parameters: Mapping[str, Tensor]) -> tuple:
    """Per parameter ``(name, shape, floating, device type, requires_grad)``: its part of the plan key."""
    return tuple([(name, p.shape, p.dtype.is_floating_point, p.device.type, p.requires_grad)
                  for name, p in parameters.items()])


def plan_key(model: nn.Module, inputs: Tensor, kwargs: dict[str, Any], parameter_signature: tuple,
              modules: list[nn.Module]) -> tuple:
    """What a plan depends on besides the op fingerprints a replay checks.

    ``parameter_signature`` is :func:`parameter_signature` of ``dict(model.named_parameters())``
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
        tuple(ELEMENTWISE_MODULES),
        tuple(ELEMENTWISE_FUNCTIONS),
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


def clear_structure_cache() -> None:
    """Forget the traced converter's cached plans (the architecture-only tensors of every
    architecture converted so far, MLP chains included), e.g. to free their memory."""
    PLAN_CACHE.clear()


# --------------------------------------------------------------------- factors
def _component_index(comps: Tensor, num_keys: int) -> Tensor:
    return (comps // KEY_STRIDE) * num_keys + comps % KEY_STRIDE


@dataclass
class Record:
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
class OnehotRecord:
    """One-hot activations of table rows: rows from an embedding's indices (``op``) or constant.

    With ``weights`` (a position table resampled by ``F.interpolate``) row ``rows[i]`` takes
    ``weights[i]`` at column ``columns[i]`` instead of 1 (constant rows, each pair once)."""

    op: int | None
    rows: Tensor | None
    shape: tuple[int, ...]
    keep: Tensor | None
    columns: Tensor
    first: int
    padding: int | None = None  # a padding_idx row gets no gradient: its one-hot stays 0
    weights: Tensor | None = None


@dataclass
class TracePlan:
    """Everything a trace found that does not depend on values: reused for later calls.

    A later call of the same architecture on inputs of the same shape replays the forward with
    a light mode that only checks each op's fingerprint and keeps the tensors the factors come
    from (:func:`gradgraph.convert.trace.replay_model`); the graph's structure is shared.
    """

    fingerprints: list[tuple]
    act: list[Record]
    grad: list[Record]
    onehot: list[OnehotRecord]
    structure: dict[str, Any]
    weights: list[SlotCopy]  # parameter values -> edge rows
    biases: list[SlotCopy]  # parameter values -> node rows
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
    #: whether the trace ran the recurrent loops folded over time; a replay runs them so too
    fold_time: bool = False
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tensors = tuple(self.structure.values())
        self._versions = tuple((tensor, tensor._version) for tensor in tensors)
        self.nbytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    @property
    def derived(self) -> dict[Any, Any]:
        """What later stages work out from the plan alone, once per plan (the structure per
        device, the assembly's recipes), keyed by what it is."""
        return self._derived

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


def _record(trace: TraceResult, tensor: Tensor, nodes: Tensor, comps: Tensor, num_keys: int,
            num_components: int) -> Record:
    """Where the elements of ``tensor`` (neurons ``nodes``, components ``comps``) go in a factor."""
    source = trace.source_of(tensor)
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
                return Record(source, tuple(nodes.shape), None, None, (first, width))
    keep = (nodes >= 0) & (comps >= 0)
    all_kept = bool(keep.all())
    linear = nodes[keep] * num_components + _component_index(comps[keep], num_keys)
    return Record(source, tuple(nodes.shape), None if all_kept else keep.reshape(-1), linear)


def _covers(neuron_set: NeuronSet, nodes: Tensor) -> bool:
    """Whether ``nodes`` holds every neuron of the set."""
    return torch.unique(nodes[neuron_set.holds(nodes)]).numel() == neuron_set.size


def _own_nodes(neuron_set: NeuronSet, nodes: Tensor) -> Tensor:
    """``nodes`` with the entries of other sets' neurons set to -1 (not written)."""
    inside = neuron_set.holds(nodes)
    return nodes if bool(inside.all()) else torch.where(inside, nodes, torch.full_like(nodes, -1))


def plan_records(trace: TraceResult) -> tuple[list[Record], list[Record], list[OnehotRecord], int]:
    """Where every set's act, grad and one-hot rows come from: ``(act, grad, onehot, K)``.

    A set no affine map reads takes its newest value as its act (an output's values; of the newest
    version, the fullest value seen: a stock RNN's input terms ``xw`` over the sequence, not the last
    step's ``xw[:, t]``, ``Tracer.observe``) — if that value holds all of the set's neurons or reaches
    the output: a part of a set that leads nowhere (``tanh(h[:, :2])`` never read) would give its
    neurons acts that a permutation of the set does not move with them, so such a set keeps zero acts.
    """
    num_keys = max(trace.num_keys, 1)
    num_components = trace.num_datapoints * num_keys
    reaching_output = trace.output_sets
    acts, grads, onehots = [], [], []
    for neuron_set in trace.sets:
        records = neuron_set.act_records
        if not records and neuron_set.last is not None and (
                neuron_set.index in reaching_output or _covers(neuron_set, neuron_set.last[1])):
            records = [*neuron_set.folded_lasts, neuron_set.last]  # one per step of a folded loop
        for value, nodes, comps in records:
            if comps is not None:
                # a value may hold several sets' neurons (cat([h, x])); each set writes only its
                # own, so a later version of one set never overwrites another set's act
                acts.append(_record(trace, value, _own_nodes(neuron_set, nodes), comps, num_keys, num_components))
        for index, nodes, comps, op, padding in neuron_set.onehot_records:
            keep = (nodes >= 0) & (comps >= 0)
            if op is None and padding is not None:
                keep &= index != padding
            onehots.append(OnehotRecord(
                op, None if op is not None else index[keep], tuple(nodes.shape),
                None if bool(keep.all()) else keep.reshape(-1), _component_index(comps[keep], num_keys),
                neuron_set.first, padding))
        for rows, weights, nodes, comps in neuron_set.weighted_records:
            onehots.append(_weighted_record(rows, weights, nodes, comps, num_keys, num_components, neuron_set.first))
        for tensor, nodes, comps in neuron_set.grad_records:
            if nodes is not None and tensor.requires_grad:
                grads.append(_record(trace, tensor, nodes, comps, num_keys, num_components))
    return acts, grads, onehots, num_keys


def _weighted_record(rows: Tensor, weights: Tensor, nodes: Tensor, comps: Tensor, num_keys: int, num_components: int,
                     first: int) -> OnehotRecord:
    """The activations a resampled position table's rows take: ``rows`` / ``weights`` ``[*shape, J]`` per
    element of the value that joined the tokens (every feature of a position repeats its position's rows)."""
    keep = ((nodes >= 0) & (comps >= 0)).unsqueeze(-1).expand(rows.shape) & (rows >= 0) & (weights != 0)
    columns = _component_index(comps.unsqueeze(-1).expand(rows.shape)[keep], num_keys)
    kept_rows, kept_weights = rows[keep], weights[keep]
    pairs, inverse = torch.unique(kept_rows * num_components + columns, return_inverse=True)
    chosen = kept_weights.new_zeros(pairs.numel()).scatter_(0, inverse, kept_weights)
    if not torch.equal(chosen[inverse], kept_weights):  # (one weight per row and column, by construction)
        raise GradGraphError("internal: a resampled table's row takes two weights at one component")
    return OnehotRecord(None, pairs // num_components, tuple(rows.shape), None, pairs % num_components, first, None,
                        chosen)


@dataclass
class SlotCopy:
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


def slot_copy(name: str, rows: Tensor | slice, places: Tensor) -> SlotCopy:
    """The :class:`SlotCopy` of parameter ``name``'s entries ``places`` into ``rows`` (slices where consecutive)."""
    return SlotCopy(name, rows if isinstance(rows, slice) else _as_slice(rows), _as_slice(places))
