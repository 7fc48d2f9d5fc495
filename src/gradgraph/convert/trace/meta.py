"""What the trace attaches to tensors: neuron and component ids, parameter views, the op log."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gradgraph.errors import UnsupportedModuleError
from gradgraph.graph import ActivationKind, NodeKind


#: ``comps = datapoint * KEY_STRIDE + key``: room for this many position keys per datapoint.
KEY_STRIDE = 1 << 24

TORCH_DIR = os.path.dirname(torch.__file__)
#: gradgraph's own source directory: frames in it are never "the user's line"
GRADGRAPH_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_frame(frame: FrameType | None) -> tuple[FrameType | None, int]:
    """The first frame from ``frame`` outward that is the user's (its file outside torch and gradgraph), or
    ``None``, and how many frames out from ``frame`` it is (a warning's ``stacklevel`` counts them)."""
    steps = 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((TORCH_DIR, GRADGRAPH_DIR)):
        frame, steps = frame.f_back, steps + 1
    return frame, steps


class TraceAbort(Exception):
    """Carries a gradgraph error out of ``__torch_function__``.

    ``UnsupportedModuleError`` is a ``TypeError``, and torch's binary operators (``@``, ``+``,
    ``+=`` ...) turn a ``TypeError`` into ``NotImplemented``, after which Python tries the
    reflected operator or, for ``+=``, runs ``h = h + f`` a second time. Wrapped in this, the
    error reaches :func:`~gradgraph.convert.trace.run.trace_model`, which raises it as it was.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class UnsupportedOperationError(UnsupportedModuleError):
    """An op inside a model's forward that the traced converter cannot follow.

    Attributes:
        location: ``file:line in Class.forward`` of the user's code that called the op.
        op: the op's name (``torch.fft.rfft``).
    """

    def __init__(self, path: str, op: str, location: str, reason: str, module_type: str | None = None) -> None:
        self.location = location
        self.op = op
        UnsupportedModuleError.__init__(self, path, module_type or op, reason)
        where = f" (module '{path}' of type {module_type})" if path and module_type else (
            f" (module '{path}')" if path else "")
        self.args = (f"{location}{where}: {op}: {reason}",)



# ----------------------------------------------------------------------- metadata
@dataclass
class Neurons:
    """Ids of a tensor that holds neuron values (full shape, int64, on the CPU)."""

    nodes: Tensor  # node id per element, -1 = no neuron (a statistic)
    comps: Tensor | None  # component per element; None = not bound to datapoints yet
    versions: dict[int, int]  # neuron set -> version of its values held here
    unbound_index: Tensor | None = None  # for unbound embedding outputs: table row per element


@dataclass
class Raw:
    """A tensor derived from the model input before any affine map fixed its layout."""

    element: Tensor  # flat input element index per element


@dataclass
class Param:
    """A parameter or a view of one."""

    index: int  # into Tracer.param_names
    pos: Tensor  # flat position in the parameter per element


@dataclass
class Resampled:
    """A parameter's table resampled by ``F.interpolate`` (a position table resized to the input's grid).

    Element ``e`` of the value is ``sum_j weights[pos[e], j] * flat_param[taps[pos[e], j]]``: every row
    of ``taps`` / ``weights`` one element of the interpolation's output (later shape ops move ``pos``).
    """

    index: int  # into Tracer.param_names
    pos: Tensor  # row of ``taps`` / ``weights`` per element
    taps: Tensor  # [R, J] flat positions in the parameter that the element reads
    weights: Tensor  # [R, J] float64 interpolation weights (0 where an element reads fewer than J entries)


@dataclass
class Scores:
    """Attention scores (or weights) of ``q @ kᵀ``: rows are queries, columns keys."""

    query: Neurons
    key: Neurons
    batch_shape: tuple[int, ...]


@dataclass
class Opaque:
    """Values gradgraph cannot follow (fine after the last parameterised op)."""

    op: str
    location: str
    path: str
    reason: str
    sets: set[int] = field(default_factory=set)
    #: a comparison's neurons (``h <= c``): a mask of these same neurons may read it (rules_elementwise.py)
    compared: Neurons | None = None
    #: made from the values of datapoints (neurons, the input, scores), not of parameters and constants alone
    of_datapoints: bool = True
    #: where the gradient of datapoints' values it is made from was cut (``"Tensor.detach at model.py:12 in
    #: M.forward"``, ``"Tensor.max under torch.no_grad() at ..."``: ``Tracer.cut_gradient``); ``None`` when it was
    #: not
    cut: str | None = None


def of_datapoints(meta: Any) -> bool:
    """Whether a value the trace follows varies with the datapoints: neuron values bound to datapoints, the model's
    input (the tracer's ``is_data`` tells integer ids from float features), attention scores, and values it cannot
    follow made from any of them; not parameters, their resampled tables, rows of a table read at constant indices
    (a position table, its neurons not bound to datapoints), or the data's masks and ids
    (:class:`~gradgraph.convert.trace.rules_data.Data`)."""
    if isinstance(meta, Opaque):
        return meta.of_datapoints
    if isinstance(meta, Neurons):
        return meta.comps is not None
    if isinstance(meta, Scores):
        return meta.query.comps is not None or meta.key.comps is not None
    return isinstance(meta, Raw)


@dataclass
class NeuronSet:
    """One set of neurons created by an op of the trace (nodes ``first .. first + size``).

    Attributes:
        index: creation order; also the ``layer`` label of its nodes.
        kind: the :class:`NodeKind` (refined when the graph is built).
        origin: module path / op that created it, for messages.
    """

    index: int
    first: int
    size: int
    kind: NodeKind
    origin: str
    activation: ActivationKind = ActivationKind.IDENTITY
    bias_param: int = -1
    bias_pos: Tensor | None = None
    act_version: int | None = None
    act_records: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    grad_records: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    onehot_records: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    #: rows of a resampled position table: (table rows [*, J], their weights [*, J], nodes, comps) per binding
    weighted_records: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)
    last: tuple[Tensor, Tensor, Tensor] | None = None
    #: the newest values of earlier steps of a loop run folded (``rules_recurrent.py``): with
    #: ``last``, one per step, the act of a set no affine map reads
    folded_lasts: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    last_version: int = 0
    version_counter: int = 0
    fresh: bool = True
    absorbed: bool = False
    pinned: bool = False
    #: affine | input | token | norm | merge | attention | scale | pool | embedding | previous
    created_by: str = "affine"
    #: the index of the op of the forward whose rule made it (sets one op made for every group of a
    #: grouped op are alike: the layout's whole-group blocks)
    created_at: int = -1
    #: an op outside a grouped op read or changed part of it only (``h[:, :2] * 2``): its parts may differ in
    #: ways the graph does not show, so no whole-group blocks are claimed across it
    read_in_part: bool = False

    def holds(self, nodes: Tensor) -> Tensor:
        """Boolean mask of the same shape: which of the node ids ``nodes`` are this set's neurons."""
        return (nodes >= self.first) & (nodes < self.first + self.size)


def set_containing(sets: list[NeuronSet], node: int) -> NeuronSet:
    """The set of ``sets`` (in creation order, so sorted by first node) that holds node ``node``."""
    low, high = 0, len(sets) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if sets[middle].first <= node:
            low = middle
        else:
            high = middle - 1
    return sets[low]


# ----------------------------------------------------------------------- the tracer
def ids_like(tensor: Tensor, value: int = -1) -> Tensor:
    return torch.full(tuple(tensor.shape), value, dtype=torch.long)


def broadcast_ids(ids: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    return ids.expand(*shape) if tuple(ids.shape) != tuple(shape) else ids


def varies_along(ids: Tensor, axis: int) -> bool:
    if ids.shape[axis] <= 1:
        return False
    first = ids.narrow(axis, 0, 1)
    return not bool((ids == first).all())


def constant_varies(constant: Tensor, shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    """Whether ``constant``, broadcast to ``shape``, differs along one of ``axes`` (the axes the
    neurons it meets vary along): then it tells those neurons apart and their permutation
    symmetry is lost. A constant that does not broadcast counts as differing."""
    try:
        expanded = torch.broadcast_to(constant.detach(), shape)
    except RuntimeError:
        return True
    return any(varies_along(expanded, axis) for axis in axes)


@dataclass(frozen=True)
class ValueGuard:
    """A layout decision the trace read off the values of a constant argument of one op.

    The op fingerprints of a replay name tensors by the op that produced them, not by their
    values; a buffer (ALiBi's slopes, a fixed mask) of another instance of the architecture
    may differ. A replay recomputes each guard on the argument it sees and traces afresh where
    the decision would come out otherwise, so every model gets the group its own values allow.

    Attributes:
        position: the constant's index in ``flat_arguments(args, kwargs)`` of the op.
        shape: the shape it is broadcast to.
        axes: the axes its neurons vary along.
        varies: :func:`constant_varies` at the trace.
        values: where the layout holds the constant's values themselves (embedding rows read at
            fixed indices), a copy of them; the guard then holds only for equal values.
    """

    position: int
    shape: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    varies: bool = False
    values: Tensor | None = None

    def holds(self, arguments: list | tuple) -> bool:
        """``True`` if the decision is the same for this call's arguments of the op."""
        if self.position >= len(arguments) or not isinstance(arguments[self.position], Tensor):
            return False
        argument = arguments[self.position]
        if self.values is not None:
            return argument.shape == self.values.shape and torch.equal(argument.detach().cpu(), self.values)
        return constant_varies(argument, self.shape, self.axes) == self.varies


def rows_along_last(ids: Tensor) -> Tensor:
    return ids.reshape(-1, ids.shape[-1]) if ids.dim() else ids.reshape(1, 1)


def neuron_axes_last(nodes: Tensor) -> tuple[list[int], int] | None:
    """``(order, n)`` where the neurons of ``nodes`` lie on ``k >= 2`` axes, the last among them: ``order``
    permutes those axes to the end (``n`` neurons per position: each head's features of
    ``q.view(b, T, heads, d)`` or of its ``transpose(1, 2)``); ``None`` for the usual row of features on
    the last axis alone, or neurons that do not reach the last axis."""
    axes = [axis for axis in range(nodes.dim()) if varies_along(nodes, axis)]
    if len(axes) < 2 or axes[-1] != nodes.dim() - 1:
        return None
    return [axis for axis in range(nodes.dim()) if axis not in axes] + axes, math.prod(nodes.shape[a] for a in axes)


def neuron_rows(ids: Tensor, layout: tuple[list[int], int] | None) -> Tensor:
    """``ids`` as rows of the neuron axes (:func:`neuron_axes_last`), or along the last axis."""
    return rows_along_last(ids) if layout is None else ids.permute(*layout[0]).reshape(-1, layout[1])


def feature_row(nodes: Tensor) -> Tensor | None:
    """The neurons on the last axis if every position holds the same ones (and all are neurons)."""
    rows = rows_along_last(nodes)
    if not bool((rows == rows[:1]).all()) or bool((rows[0] < 0).any()):
        return None
    return rows[0].clone()


def channel_row(nodes: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor | None:
    """The neurons on axis 1 of a ``[b, C, *S]`` value (a convolution's channels) if every
    datapoint and position holds the same ones (and all are neurons)."""
    if len(shape) < 3:
        return None
    ids = broadcast_ids(nodes, shape)
    row = ids.reshape(shape[0], shape[1], -1)[0, :, 0]
    if bool((row < 0).any()) or not torch.equal(ids, broadcast_ids(row.reshape(1, -1, *[1] * (len(shape) - 2)), shape)):
        return None
    return row.clone()


def neuron_row(meta: Any, shape: torch.Size | tuple[int, ...]) -> tuple[Tensor | None, bool]:
    """``(row, channels)``: the neurons of a value of ``shape`` — on axis 1 of a ``[b, C, *S]`` map whose last axis
    holds positions (``channels``: :func:`channel_row`; a map of one channel too, whose last axis would otherwise
    pass for a row of one neuron repeated), else on its last axis (:func:`feature_row`); ``row`` is ``None`` where
    neither holds one neuron per place."""
    positions_last = len(shape) >= 3 and meta.comps is not None and varies_along(
        broadcast_ids(meta.comps, shape), len(shape) - 1)
    row = channel_row(meta.nodes, shape) if positions_last else None
    if row is not None:
        return row, True
    return feature_row(meta.nodes), False


def _describe(value: Any) -> Any:
    """A hashable description of a non-tensor argument (ints, slices, dtypes ...)."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype | torch.device):
        return value
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    if value is Ellipsis:
        return "..."
    if isinstance(value, torch.Size | tuple | list):
        return tuple(_describe(item) for item in value)
    return type(value).__name__


#: values ``tree_flatten`` keeps as leaves, by exact type (a subclass may be a registered node)
_LEAF_TYPES = frozenset((int, float, bool, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device,
                         torch.memory_format, torch.layout))


def _add_leaves(value: Any, leaves: list) -> None:
    kind = type(value)
    if kind is tuple or kind is list:
        for item in value:
            _add_leaves(item, leaves)
    elif kind is dict:
        for item in value.values():
            _add_leaves(item, leaves)
    elif kind in _LEAF_TYPES or isinstance(value, Tensor):
        leaves.append(value)
    elif kind is torch.Size:  # pytree reads it as its sizes
        leaves.extend(value)
    else:  # torch.Size, a namedtuple, a registered container: as pytree reads it
        leaves.extend(tree_flatten(value)[0])


#: types :func:`_describe` returns as they are
_SELF_DESCRIBED = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))


def flat_leaves(value: Any) -> list:
    """``tree_flatten(value)[0]``: the same leaves in the same order, read directly where
    ``value`` nests only plain tuples, lists and dicts (pytree's generic walk costs a
    replay more than the ops it checks); other containers are read by pytree itself."""
    leaves: list = []
    _add_leaves(value, leaves)
    return leaves


def flat_arguments(args: tuple, kwargs: dict) -> list | tuple:
    """``tree_flatten((args, kwargs))``'s leaves, without pytree's cost for the usual flat call."""
    if not kwargs:
        for value in args:
            kind = type(value)
            if kind is tuple or kind is list or kind is dict or not (kind in _LEAF_TYPES or isinstance(value, Tensor)):
                return flat_leaves(args)
        return args
    leaves: list = []
    _add_leaves(args, leaves)
    _add_leaves(kwargs, leaves)
    return leaves


class OpLog:
    """Numbers every op of a forward and fingerprints it: name, arguments (tensors by the op
    that produced them), output shapes. Two runs with equal fingerprints performed the same
    computation on tensors of the same shapes, so a trace's layout can be reused."""

    def __init__(self, inputs: Tensor, param_names: dict[int, str]) -> None:
        self.count = 0
        self.fingerprints: list[tuple] = []
        #: ``id(tensor) -> (tensor, (op, position))`` of every tensor an op of the forward made
        self._producer: dict[int, tuple[Tensor, tuple[int, int]]] = {id(inputs): (inputs, (-1, 0))}
        self._param_names = param_names

    def source(self, tensor: Tensor) -> Any:
        """``(op, position)`` of the op output ``tensor`` is (``(-1, 0)``: the input),
        ``("param", name)`` for a parameter of the model, else ``"external"``."""
        entry = self._producer.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1]
        name = self._param_names.get(id(tensor))
        return ("param", name) if name is not None else "external"

    def step(self, name: str, args: tuple, kwargs: dict, output: Any) -> int:
        flat = flat_arguments(args, kwargs)
        arguments = tuple(self.source(v) if isinstance(v, Tensor) else _describe(v) for v in flat)
        outputs = (output,) if isinstance(output, Tensor) else flat_leaves(output)
        shapes = tuple(tuple(v.shape) if isinstance(v, Tensor) else _describe(v) for v in outputs)
        index = self.count
        self.count += 1
        for position, value in enumerate(outputs):
            if isinstance(value, Tensor):
                self._producer[id(value)] = (value, (index, position))
        self.fingerprints.append((name, arguments, shapes))
        return index


class PlanMismatch(Exception):
    """A replay performed other ops than the trace it reuses (raised to fall back to a trace)."""


class CheckedOpLog(OpLog):
    """An :class:`OpLog` that compares every op with the fingerprint a trace logged for it, as
    the op is logged (a replay of a cached plan), instead of keeping fingerprints of its own.

    :meth:`step` returns the op's index, or raises :class:`PlanMismatch` at the first op whose
    fingerprint differs from the trace's (name, arguments by producer, output shapes: exactly
    what :meth:`OpLog.step` would have logged, compared with ``==`` as those tuples would be) or
    that is one op more than the trace had. :attr:`mismatch` keeps that op's index, so a forward
    that catches the exception is still known to have differed. It builds no tuples for the
    ops that match: a replay of a small model runs this for every op of its forward.
    """

    def __init__(self, inputs: Tensor, param_names: dict[int, str], expected: list[tuple]) -> None:
        super().__init__(inputs, param_names)
        self.expected = expected
        self.mismatch: int | None = None

    def step(self, name: str, args: tuple, kwargs: dict, output: Any) -> int:
        index = self.count
        if self.mismatch is not None or index >= len(self.expected):
            self._differs(index)
        expected_name, expected_arguments, expected_shapes = self.expected[index]
        if name != expected_name:
            self._differs(index)
        flat = flat_arguments(args, kwargs)
        if len(flat) != len(expected_arguments):
            self._differs(index)
        producer = self._producer
        for value, expected in zip(flat, expected_arguments):
            if isinstance(value, Tensor):
                entry = producer.get(id(value))
                if (entry[1] if entry is not None and entry[0] is value else self.source(value)) != expected:
                    self._differs(index)
            elif type(value) in _SELF_DESCRIBED:  # _describe(value) is value itself
                if value != expected:
                    self._differs(index)
            elif _describe(value) != expected:
                self._differs(index)
        if type(output) is torch.Size:  # .size() / .shape: its sizes are its leaves, each described as itself
            if output != expected_shapes:
                self._differs(index)
            self.count = index + 1
            return index
        outputs = (output,) if isinstance(output, Tensor) else flat_leaves(output)
        if len(outputs) != len(expected_shapes):
            self._differs(index)
        for position, (value, shape) in enumerate(zip(outputs, expected_shapes)):
            if isinstance(value, Tensor):
                # a torch.Size equals the tuple of its sizes; never a non-tuple description
                if not isinstance(shape, tuple) or value.shape != shape:
                    self._differs(index)
                producer[id(value)] = (value, (index, position))
            elif _describe(value) != shape:
                self._differs(index)
        self.count = index + 1
        return index

    def _differs(self, index: int) -> None:
        if self.mismatch is None:
            self.mismatch = index
        raise PlanMismatch(self.mismatch)


# The names these had before issue 27 made them public, for rule files written against them
# (tests/convert/test_convert_layering.py lists any use); new code uses the public names.
_Neurons = Neurons
_Raw = Raw
_Param = Param
_Scores = Scores
_Opaque = Opaque
_OpLog = OpLog
_TORCH_DIR = TORCH_DIR
_GRADGRAPH_DIR = GRADGRAPH_DIR
_broadcast = broadcast_ids
_feature_row = feature_row
_ids_like = ids_like
_rows_along_last = rows_along_last
_varies_along = varies_along
