"""The trace itself: a ``TorchFunctionMode`` that runs every op and follows neurons through it.

The rules for affine maps and embeddings, elementwise ops and norms, attention, shape ops and the
rest live in their own modules (``rules_*.py``) as mixins of :class:`Tracer`; this one holds the
bookkeeping, the input and the dispatch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import rnn as rnn_utils
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gradgraph.convert.trace.decompositions import decomposition, is_softmax, softmax_parts
from gradgraph.convert.trace.meta import (
    broadcast_ids, ids_like, KEY_STRIDE, Neurons, NeuronSet, Opaque, OpLog, Param,
    Raw, Scores, TraceAbort, UnsupportedOperationError, user_frame, ValueGuard, varies_along, constant_varies,
    flat_arguments, of_datapoints, set_containing,
)
from gradgraph.convert.trace.ops import (
    ACTIVATION_OPS, ADDMM, BADDBMM, BATCH_NORM, COMPARISONS, CONSTANT_FACTORIES, CONVOLUTION, BINARY_ADD, BINARY_MUL,
    BINARY_OTHER, DROPOUT_TRAINING_DEFAULT, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MAX_MIN, EMBEDDING, IDENTITY_OPS,
    IN_PLACE_HINT, IN_PLACE_OPERATORS, LAYER_NORM, LINEAR, MASK_FILL, MATMUL, DETACHES,
    numpy_keywords, op_name, REDUCTIONS, RMS_NORM, RRELU, SDPA, SHAPE_OPS, SHAPED_LIKE, SOFTMAX, UNARY, VALUE_READS,
    WHERE,
)
from gradgraph.convert.trace.in_place import IN_PLACE_CANDIDATES, out_of_place_call, StaleValues
from gradgraph.convert.trace.rules_affine import AffineRules
from gradgraph.convert.trace.rules_attention import AttentionRules
from gradgraph.convert.trace.rules_conv import ConvRules, gather_taps, InputReadAgain, PIXEL_SHUFFLES, SPATIAL_POOLS
from gradgraph.convert.trace.rules_data import Data, DataRules
from gradgraph.convert.trace.rules_elementwise import ElementwiseRules
from gradgraph.convert.trace.rules_masks import MaskRules
from gradgraph.convert.trace.rules_graph import GATHERS, GraphRules, rank_within, SCATTERS, SCATTERS_IN_PLACE
from gradgraph.convert.trace.recurrent import previous_state
from gradgraph.convert.trace.rules_norm import NormRules
from gradgraph.convert.trace.rules_pad import PadRules
from gradgraph.convert.trace.rules_recurrent import FoldRules
from gradgraph.convert.trace.rules_reduction import ReductionRules
from gradgraph.convert.trace.rules_shape import ShapeRules
from gradgraph.errors import UnsupportedModuleError
from gradgraph.graph import EdgeKind, NodeKind
from gradgraph.value_reads import tensors_in


def _is_in_place(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the op writes into one of its arguments (``add_``, ``+=``, ``x[i] = v``, ``relu(x, True)``)."""
    if name.endswith("_") and not name.endswith("__") or name in IN_PLACE_OPERATORS or kwargs.get("inplace") is True:
        return True
    return (name.startswith("torch.nn.functional.") and len(args) > 1 and args[-1] is True
            and name.split(".")[-1] in {"relu", "leaky_relu", "elu", "hardtanh", "relu6", "selu", "celu"})


#: torch's packed-sequence functions: a refusal met inside one is about the packing
_PACKING = {function.__code__: name for name, function in vars(rnn_utils).items()
            if name in ("pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "unpack_sequence",
                        "unpad_sequence") and callable(function)}


def _in_packing(reason: str) -> str:
    """``reason``, or what to do instead where the op runs inside ``torch.nn.utils.rnn``'s packing: its
    reorder of the batch by length and the ``PackedSequence`` that interleaves the datapoints' steps are
    what gradgraph cannot follow, not the op the trace stopped at."""
    frame = sys._getframe(1)
    while frame is not None:
        name = _PACKING.get(frame.f_code)
        if name is not None:
            return (f"inside torch.nn.utils.rnn.{name}: packed sequences are not supported (a PackedSequence "
                    "interleaves the datapoints' steps by length, and gradgraph follows a batch axis of datapoints). "
                    "Pass the padded batch to the RNN and read each sequence's last step as "
                    "output[torch.arange(b), lengths - 1] (for a unidirectional RNN the same values as the packed "
                    f"run's; {reason})")
        frame = frame.f_back
    return reason


class Tracer(AffineRules, ElementwiseRules, MaskRules, ReductionRules, NormRules, AttentionRules, DataRules, ConvRules,
             GraphRules, FoldRules, ShapeRules, PadRules, TorchFunctionMode):
    """Runs ops and follows neurons and components through them (see the module docstring)."""

    def __init__(self, model: nn.Module, num_datapoints: int, datapoint_dim: int = 0,
                 datapoints: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_datapoints = num_datapoints if datapoints is None else int(datapoints.max()) + 1
        self.datapoint_dim = datapoint_dim
        #: the datapoint of each row on axis 0 (PyG's batch vector) and the row's rank among its
        #: datapoint's rows (its position), or None: the rows along datapoint_dim are the datapoints
        self.row_datapoints: Tensor | None = None
        self.row_rank: Tensor | None = None
        if datapoints is not None:
            self.row_datapoints = datapoints
            self.row_rank = rank_within(datapoints)
            self.rows_per_datapoint = int(torch.bincount(datapoints).max())
        self.metas: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, meta); keeps tensors alive
        self.sets: list[NeuronSet] = []
        self.edges: list[tuple[Tensor, Tensor, EdgeKind, int, Tensor | None, Tensor | None]] = []
        self.ties: list[tuple[Tensor, Tensor]] = []
        #: id -> tensor: embedding indices, read again when the factors are filled in
        self.read_indices: dict[int, Tensor] = {}
        #: nodes where the layout cuts a set into pieces (the two halves of a fused gated unit)
        self.cuts: set[int] = set()
        #: id -> value: the opaque values of datapoints an op made under ``torch.no_grad()``, marked cut
        #: (cut_gradient); one a custom autograd.Function's forward returned is given a gradient after it
        #: (``grad_fn`` set on the same tensor), which lifts the mark where it is next read (lift_reattached)
        self.made_without_gradient: dict[int, Tensor] = {}
        self.attention: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = []
        #: per grouped op, the set of every group's output (TraceResult.grouped), and the node span of those
        #: still claimed alike with the group of each of its nodes (note_group_parts)
        self.grouped: list[list[int]] = []
        self.grouped_spans: dict[int, tuple[int, int, Tensor]] = {}
        self.grouped_op_running = 0  # inside a grouped op's decomposition (its reads of each group's part)
        # (set, version) of position values an op of slope other than one changed -> that op and where it ran
        self.changed_positions: dict[tuple[int, int], str] = {}
        self.num_nodes = 0
        self.keys: list[int] = []
        self.param_names: list[str] = []
        self.param_shapes: list[list[int]] = []
        self.params: list[Tensor] = []
        self._param_index: dict[int, int] = {}
        self.name_of_parameter = {id(p): name for name, p in model.named_parameters()}
        self._param_objects = {id(p): p for p in model.parameters()}
        self.module_stack: list[str] = []
        self.module_types: list[str] = []
        self.module_paths = {id(module): name for name, module in model.named_modules()}
        self.input_comps: Tensor | None = None  # per flat input element: its component, -1 until read
        self.input_tensor: Tensor | None = None
        self.input_set: NeuronSet | None = None
        #: whether a convolution that first reads the model input reads it as windows (read_input_taps)
        self.input_taps = True
        self.log: OpLog | None = None
        self.op_index = -1
        self.captured: dict[int, tuple[tuple, dict, Any]] = {}  # op index -> (args, kwargs, output)
        self.stale = StaleValues()  # what in-place ops run out of place left behind (trace/in_place.py)
        #: id(tensor) -> (tensor, op index, recipe): values computed by the tracer itself from
        #: an op's arguments (a norm's normalised input), so a replay can recompute them
        self.derived: dict[int, tuple[Tensor, int, tuple]] = {}
        #: op index -> layout decisions read off its constant arguments' values (checked by a replay)
        self.value_guards: dict[int, list[ValueGuard]] = {}
        #: for an in-place scatter into a constant: ``OpLog.source`` of its base, read before the op ran
        self.scatter_base: Any = None
        #: loops run folded over time (rules_recurrent.py): the one whose step runs, all open ones
        self.fold = None
        self.fold_groups = {}
        self.fold_time = False
        self.fold_sources = []

    # -------------------------------------------------------------- bookkeeping
    def meta(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return None
        entry = self.metas.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1]
        if id(value) in self._param_objects:
            return Param(self.param_index(value), torch.arange(value.numel()).reshape(value.shape))
        return None

    def set_meta(self, tensor: Tensor, meta: Any) -> None:
        self.metas[id(tensor)] = (tensor, meta)
        if self.grouped_spans and isinstance(meta, Neurons):
            self.note_group_parts(meta.nodes)

    def note_group_parts(self, nodes: Tensor) -> None:
        """A value holding the outputs of some groups of a grouped op but not all (``y[:, :2] * 2`` after a
        grouped convolution) may treat them unlike the others, which the graph would not show: that op's
        groups are no longer claimed alike (``TraceResult.grouped`` loses the record)."""
        for number, (low, high, group_of_node) in list(self.grouped_spans.items()):
            inside = nodes[(nodes >= low) & (nodes < high)]
            if inside.numel() and torch.unique(group_of_node[inside - low]).numel() != int(group_of_node[-1]) + 1:
                self.grouped[number] = []
                del self.grouped_spans[number]

    def param_index(self, param: Tensor) -> int:
        index = self._param_index.get(id(param))
        if index is None:
            index = len(self.param_names)
            self._param_index[id(param)] = index
            self.param_names.append(self.name_of_parameter[id(param)])
            self.param_shapes.append(list(param.shape))
            self.params.append(param)
        return index

    def constant_varies(self, constant: Tensor, shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
        """:func:`~gradgraph.convert.trace.meta.constant_varies` for an argument of the current op,
        recorded as a :class:`ValueGuard` so a replay of the plan makes the same decision."""
        varies = constant_varies(constant, tuple(shape), tuple(axes))
        self.add_guard(self.op_index, constant, shape=tuple(shape), axes=tuple(axes), varies=varies)
        return varies

    def add_guard(self, op: int, constant: Tensor, **decision: Any) -> None:
        """Record a :class:`ValueGuard` on ``constant``, an argument of op ``op``."""
        args, kwargs, _ = self.captured[op]
        position = next(i for i, value in enumerate(flat_arguments(args, kwargs)) if value is constant)
        self.value_guards.setdefault(op, []).append(ValueGuard(position, **decision))

    def path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def location(self) -> str:
        frame, _ = user_frame(sys._getframe(1))
        if frame is None:
            return "<unknown location>"
        name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {name}"

    def unsupported(self, op: str, reason: str) -> UnsupportedOperationError:
        # a name made as f"{path} {op}" starts with a space at the model's root, where the path is ''
        return UnsupportedOperationError(self.path(), op.strip(), self.location(), _in_packing(reason),
                                         self.module_types[-1] if self.module_types else None)

    def input_neurons(self, width: int, op: str, reading: str) -> NeuronSet:
        """The input's neuron set (pinned), made by its first reader; every reader must read
        ``width`` features (``reading`` says how, for the error naming ``op``)."""
        if self.input_set is None:
            self.input_set = self.new_set(width, NodeKind.INPUT, "input", "input")
            self.input_set.pinned = True
        elif getattr(self.input_set, "read_through_taps", False):
            # the input was read as a convolution's windows (rules_conv.read_input_taps) and is read again:
            # trace_model traces afresh with the input read as channels
            raise TraceAbort(InputReadAgain(op))
        if self.input_set.size != width:
            raise self.unsupported(op, f"the input is read {reading} here but {self.input_set.size} elsewhere")
        return self.input_set

    def new_set(self, size: int, kind: NodeKind, origin: str, created_by: str) -> NeuronSet:
        origin = origin.strip()  # the rules name a set f"{path} {op}", and at the model's root the path is ''
        if self.fold is not None:  # a later step of a loop run folded gets the first step's sets
            reused = self.fold_set(size, kind, origin, created_by)
            if reused is not None:
                return reused
        neuron_set = NeuronSet(len(self.sets), self.num_nodes, size, kind, origin, created_by=created_by,
                               created_at=self.op_index)
        self.sets.append(neuron_set)
        self.num_nodes += size
        if self.fold is not None:
            self.fold_created(neuron_set)
        return neuron_set

    def set_of(self, node: int) -> NeuronSet:
        return set_containing(self.sets, node)

    def record_groups(self, outputs: list[Tensor] | None) -> None:
        """Keep the output set of every group of a grouped op (``TraceResult.grouped``), when each
        group's output is the whole of one set of its own (as the ``F.linear`` of a group makes it)."""
        if not outputs:
            return
        sets = []
        for output in outputs:
            meta = self.meta(output)
            if not isinstance(meta, Neurons):
                return
            found = self.sets_in(meta.nodes)
            if len(found) != 1 or found[0].size != output.shape[-1] or found[0].created_by != "affine":
                return
            sets.append(found[0].index)
        if sets != list(range(sets[0], sets[0] + len(sets))):
            return  # made one after the other by the op: consecutive sets, consecutive nodes
        first, last = self.sets[sets[0]], self.sets[sets[-1]]
        sizes = torch.tensor([self.sets[index].size for index in sets])
        self.grouped_spans[len(self.grouped)] = (first.first, last.first + last.size,
                                                 torch.repeat_interleave(torch.arange(len(sets)), sizes))
        self.grouped.append(sets)

    def sets_in(self, nodes: Tensor) -> list[NeuronSet]:
        values = torch.unique(nodes[nodes >= 0]).tolist()
        found: dict[int, NeuronSet] = {}
        for value in values:
            neuron_set = self.set_of(value)
            found[neuron_set.index] = neuron_set
        return list(found.values())

    def new_key(self, count: int = 1) -> list[int]:
        start = len(self.keys)
        self.keys.extend(range(start, start + count))
        return list(range(start, start + count))

    def next_version(self, versions: dict[int, int]) -> dict[int, int]:
        result = {}
        for index in versions:
            neuron_set = self.sets[index]
            neuron_set.version_counter += 1
            result[index] = neuron_set.version_counter
        return result

    def observe(self, tensor: Tensor, meta: Neurons) -> None:
        """Remember ``tensor`` as the newest value of its sets (their act if nothing fixes it)."""
        if meta.comps is None:
            return
        for index, version in meta.versions.items():
            neuron_set = self.sets[index]
            if version > neuron_set.last_version or (version == neuron_set.last_version and (
                    neuron_set.last is None or tensor.numel() >= neuron_set.last[0].numel())):
                # the same version seen through a smaller view (a stock RNN's input terms xw, computed for the whole
                # sequence, read step by step as xw[:, t]) keeps the fuller value: every step's components
                neuron_set.last_version = version
                neuron_set.last = (tensor, meta.nodes, meta.comps)

    # -------------------------------------------------------------- input
    def bind_input(self, tensor: Tensor) -> None:
        self.input_tensor = tensor
        self.log = OpLog(tensor, self.name_of_parameter)
        self.set_meta(tensor, Raw(torch.arange(tensor.numel()).reshape(tensor.shape)))

    def datapoint_of(self, element: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(datapoint, within, per_datapoint)`` of flat input elements: the datapoint axis's
        index and the element's rank among its datapoint's elements (the other axes in order)."""
        shape = self.input_tensor.shape
        if not shape:
            return torch.zeros_like(element), element, 1
        axis = self.datapoint_dim
        inner = math.prod(shape[axis + 1:])
        if self.row_datapoints is not None:  # rows of several datapoints (axis 0): a row's rank is its position
            row = element // inner
            return (self.row_datapoints[row], self.row_rank[row] * inner + element % inner,
                    self.rows_per_datapoint * inner)
        datapoint = (element // inner) % shape[axis]
        within = (element // (inner * shape[axis])) * inner + element % inner
        return datapoint, within, math.prod(shape) // max(shape[axis], 1)

    def neurons_from_raw(self, tensor: Tensor, meta: Raw, what: str) -> Neurons:
        """Fix the layout of the input: the last axis of ``tensor`` holds features (or ids)."""
        element = meta.element
        datapoint, within, per_datapoint = self.datapoint_of(element)
        if tensor.dim() < 1:
            raise self.unsupported(what, "the input must have a datapoint axis")
        integer = not tensor.is_floating_point()
        if not integer and tensor.dim() >= 3 and getattr(self.input_set, "read_as_channels", False):
            # an input map a convolution read as channels, read again elementwise (x + conv(x)): as channels
            return self.channel_input(tensor, meta, what)
        if integer:  # token ids: every element is one position
            comps = self.assign_comps(element, datapoint, within)
            return Neurons(ids_like(tensor), comps, {})
        width = tensor.shape[-1]
        first_row = element.reshape(-1, width)
        if per_datapoint % width or not bool((first_row - first_row[:, :1] == first_row[:1] - first_row[:1, :1]).all()):
            raise self.unsupported(what, "the input's features are not its last axis")
        feature = first_row[0] - first_row[0].min()
        position = within // width
        if not torch.equal(feature.sort().values, torch.arange(width)):
            # rows gathered from strided places (image patches cut by reshape/permute): a feature is
            # its place in the row, a position the rank of the row among the datapoint's rows
            feature = torch.argsort(torch.argsort(feature))
            row_start = within.reshape(-1, width).min(1).values
            rank = torch.unique(row_start, return_inverse=True)[1]
            position = rank[:, None].expand(-1, width).reshape(within.shape)
        self.input_neurons(width, what, f"with {width} features")
        nodes = self.input_set.first + broadcast_ids(feature, tensor.shape).clone()
        comps = self.assign_comps(element, datapoint, position)
        if tensor.requires_grad:
            self.input_set.grad_records.append((tensor, nodes, comps))
        return Neurons(nodes, comps, {self.input_set.index: 0})

    def assign_comps(self, element: Tensor, datapoint: Tensor, position: Tensor) -> Tensor:
        count = int(position.max()) + 1 if position.numel() else 1
        while len(self.keys) < count:
            self.new_key()
        comps = datapoint * KEY_STRIDE + position
        if self.input_comps is None:
            self.input_comps = torch.full((self.input_tensor.numel(),), -1, dtype=torch.long)
        known = self.input_comps[element.reshape(-1)]
        if bool(((known >= 0) & (known != comps.reshape(-1))).any()):
            raise self.unsupported("input", "the input is read with two different layouts")
        self.input_comps[element.reshape(-1)] = comps.reshape(-1)
        return comps.clone()

    # -------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        parts = decomposition(func, args, kwargs)
        if parts is None and is_softmax(func) and self.softmax_over_positions(args, kwargs):
            parts = softmax_parts(func, args, kwargs)
        if parts is not None:
            grouped = getattr(parts, "groups", 1) > 1
            self.grouped_op_running += grouped
            try:
                with self:  # the parts run under the trace: its rules follow them
                    result = parts()
            finally:
                self.grouped_op_running -= grouped
            self.record_groups(getattr(parts, "group_outputs", None))
            return result
        name = op_name(func)
        kwargs = numpy_keywords(name, kwargs)
        try:
            stale = self.stale.read(name, args, kwargs)
            if stale is not None:
                raise self.unsupported(name, StaleValues.message(stale))
            # relu_(h), h += r on neuron values: run out of place (trace/in_place.py); attention scores
            # changed in place keep their own rules (rules_attention.py), the replay follows the log
            in_place = out_of_place_call(func, name, args, kwargs) if name in IN_PLACE_CANDIDATES else None
            if in_place is not None:
                in_place_name, target = name, args[0] if args else kwargs.get("input")
                # attention scores changed in place by a constant keep their own rules; by a value
                # the trace follows (MPNet's scores += a learned position bias) they run out of
                # place, so the rule for that sum decides (it names a learned score bias)
                if isinstance(self.meta(target), Neurons) or (isinstance(self.meta(target), Scores) and any(
                        isinstance(self.meta(value), Neurons | Param) for value in (*args[1:], *kwargs.values())
                        if isinstance(value, Tensor))):
                    func, name, args, kwargs = in_place
                else:
                    in_place = None
            # a scatter into a constant (PyG's src.new_zeros(size).scatter_add_(...)) makes a new value
            # (trace/rules_graph.py); every other in-place op on values the trace follows is refused
            scatter_into_constant = name in SCATTERS_IN_PLACE and bool(args) and self.meta(args[0]) is None
            if _is_in_place(name, args, kwargs) and not scatter_into_constant:
                # refused before it runs: an in-place op changes a value the trace already recorded
                flat, _ = tree_flatten((args, kwargs))
                if any(isinstance(self.meta(value), Neurons | Raw) for value in flat if isinstance(value, Tensor)):
                    raise self.unsupported(name, IN_PLACE_HINT)
                if args and isinstance(args[0], Tensor) and self.read_indices.get(id(args[0])) is args[0]:
                    raise self.unsupported(name, "changes in place the indices an embedding already read (the "
                                           "factors read them after the forward); change a copy (.clone())")
            # which op made a scatter's base, read before the scatter writes into it (rules_graph.py)
            self.scatter_base = self.log.source(args[0]) if scatter_into_constant else None
            output = func(*args, **kwargs)
            if in_place is not None:
                self.stale.mark(target, output, in_place_name)
            self.op_index = self.log.step(name, args, kwargs, output)
            flat, _ = tree_flatten((args, kwargs))
            tracked = [(value, self.meta(value)) for value in flat if isinstance(value, Tensor)]
            tracked = [(value, meta) for value, meta in tracked if meta is not None]
            if not tracked:
                return output
            if self.made_without_gradient:
                tracked = self.lift_reattached(tracked)
            self.captured[self.op_index] = (args, kwargs, output)
            out_flat, _ = tree_flatten(output)
            if not any(isinstance(value, Tensor) for value in out_flat):
                if name in VALUE_READS:  # the values leave the trace: a permutation of their neurons must not move them
                    self.check_value_read(name, tracked)
                    self.mark_opaque(output, name, "hands the values to Python", [meta for _, meta in tracked])
                return output
            self.dispatch(name, func, args, kwargs, output, tracked)
            if (name in DETACHES or not torch.is_grad_enabled()) and self.of_datapoints(tracked):
                self.cut_gradient(name, output)
            return output
        except UnsupportedModuleError as error:
            raise TraceAbort(error) from None

    def softmax_over_positions(self, args: tuple, kwargs: dict) -> bool:
        """Whether a softmax's axis holds positions of neuron values (tokens, one score per token after
        ``h @ query``): one neuron along it, components varying. The trace runs such a softmax as its parts
        (:func:`~gradgraph.convert.trace.decompositions.softmax_parts`); a softmax over features, over attention
        scores or over anything else keeps its rule."""
        first = args[0] if args else kwargs.get("input")
        meta = self.meta(first)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(meta, Neurons) or meta.comps is None or not isinstance(dim, int) or first.dim() == 0 \
                or not bool((meta.nodes >= 0).all()):  # a statistic (a sum over features) keeps the rule's refusal
            return False
        axis = dim % first.dim()
        return not varies_along(meta.nodes, axis) and varies_along(meta.comps, axis)

    def dispatch(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        if name in CONSTANT_FACTORIES:
            return  # zeros_like(x): a constant, whatever x is
        if name in SHAPED_LIKE and self.meta(args[0]) is None:
            return  # index.expand_as(src): a constant given another tensor's shape (PyG's broadcast of an index)
        if name in SHAPED_LIKE and len(tracked) > 1 and self.is_data(args[0], self.meta(args[0])):
            # mask.expand_as(h), mask[:, None, None].expand_as(scores): data given the shape (or dtype) of another
            # tensor, whose values it does not read; refused before as mixing datapoints, or as moving scores
            like = args[1] if len(args) > 1 else kwargs["other"]
            shape_only = torch.empty((), dtype=like.dtype).expand(like.shape)
            return self.data_op(name, func, (args[0], shape_only), {}, output, [(args[0], self.meta(args[0]))])
        metas = [meta for _, meta in tracked]
        if all(self.is_data(value, meta) for value, meta in tracked) and name not in EMBEDDING:
            return self.data_op(name, func, args, kwargs, output, tracked)
        if name in ELEMENTWISE_FUNCTIONS:
            return self.unary(args[0], output, name, ELEMENTWISE_FUNCTIONS[name])
        if any(isinstance(meta, Opaque) for meta in metas):
            # h.masked_fill(h <= c, 0), torch.where(h > c, h, 0), h * (h > c)
            if self.masks_compared_neurons(name, args, kwargs, output, tracked):
                return None
            if any(isinstance(meta, Param) for meta in metas):
                value = next(value for value, meta in tracked if isinstance(meta, Opaque))
                self.need_neurons(value, f"{name} with the parameter "
                                  f"'{self.param_names[next(m for m in metas if isinstance(m, Param)).index]}'")
            opaque = next(meta for meta in metas if isinstance(meta, Opaque))
            return self.mark_opaque(output, opaque.op, opaque.reason, metas, location=opaque.location,
                                    path=opaque.path)
        if name in COMPARISONS and all(isinstance(meta, Neurons) for meta in metas):
            return self.comparison(name, args, output, tracked)
        # convolutions (run as gather_taps + F.linear, trace/rules_conv.py) and spatial pooling
        if func is gather_taps:
            return self.tap_gather(name, args, kwargs, output)
        if func is previous_state:  # a recurrent loop run folded (rules_recurrent.py)
            return self.previous_copy(name, args, kwargs, output)
        if func is F.pad and self.pads_neuron_values(args, kwargs):  # features, tokens (trace/rules_pad.py)
            return self.neuron_pad(name, args, kwargs, output)
        if func in SPATIAL_POOLS or (func is F.pad and self.pads_positions(args, kwargs)):
            return self.spatial_pool(name, args, kwargs, output)
        if func in PIXEL_SHUFFLES:
            return self.pixel_shuffle(name, args, kwargs, output)
        if func is F.group_norm or func is F.instance_norm:
            return self.channel_norm(name, func, args, kwargs, output)
        if name in GATHERS or name in SCATTERS:  # message passing over a data graph (trace/rules_graph.py)
            return self.graph_op(name, args, kwargs, output)
        if name == "Tensor.__getitem__" and self.gathers_positions(args):  # x[src], x[:, src]: a gather
            return self.gather_positions(name, args[0], self.gather_axis(args), self.gather_index(args), output)
        if name in LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.affine(name, args[0], weight, bias, output, transposed=False)
        if name in ADDMM:
            bias, x, weight = args[0], args[1], args[2]
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                raise self.unsupported(name, "addmm with alpha/beta other than 1")
            return self.affine(name, x, weight, bias, output, transposed=True)
        if name in MATMUL:
            left, right = (args[1], args[0]) if name == "Tensor.__rmatmul__" else (args[0], args[1])
            return self.matmul(name, left, right, output)
        if name in BADDBMM:
            return self.biased_scores(name, args, kwargs, output)
        if name in EMBEDDING:
            indices = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            options = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]))
            options.update({key: value for key, value in kwargs.items() if key not in ("input", "weight")})
            if options.get("max_norm") is not None:
                raise self.unsupported(name, "max_norm renormalises the table in place during the forward")
            if options.get("scale_grad_by_freq"):
                raise self.unsupported(name, "scale_grad_by_freq scales a row's gradient by its count in the whole "
                                       "batch, so datapoints' gradients are not separate")
            return self.embedding(name, indices, weight, output, options.get("padding_idx"))
        if name in SDPA:
            return self.sdpa(name, args, kwargs, output)
        if name in CONVOLUTION:  # a batched one runs as gather_taps + F.linear (trace/rules_conv.py)
            raise self.unsupported(name, "a convolution of an input without a datapoint axis ([channels, *spatial]); "
                                   "gradgraph reads convolutions of batches [b, channels, *spatial]")
        if name in LAYER_NORM or name in RMS_NORM:
            return self.norm(name, args, kwargs, output)
        if name in BATCH_NORM:
            return self.batch_norm(name, args, kwargs, output)
        if any(isinstance(meta, Scores) for meta in metas):
            return self.scores_op(name, args, kwargs, output, tracked)
        if name in SHAPE_OPS or name in IDENTITY_OPS or name == "Tensor.__getitem__":
            if name in DROPOUT_TRAINING_DEFAULT:
                training = kwargs.get("training", args[2] if len(args) > 2 else DROPOUT_TRAINING_DEFAULT[name])
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                if training and p > 0:
                    raise self.unsupported(name, "active dropout changes the function; call model.eval()")
            return self.shape_op(name, func, args, kwargs, output, tracked)
        if name in UNARY:
            if name == RRELU and kwargs.get("training", args[3] if len(args) > 3 else False):
                raise self.unsupported(name, "an active RReLU draws a random slope per element (training mode); "
                                       "call model.eval(), where it is a leaky ReLU of slope (lower + upper) / 2")
            x = args[0] if args else kwargs.get("input")  # torch.sigmoid(input=h): no positional argument
            activation = ACTIVATION_OPS.get(name)
            held = [value for value, meta in tracked if isinstance(meta, Neurons)]
            if len(held) == 1 and held[0] is not x and not isinstance(self.meta(x), Raw):
                # torch.pow(2.0, h), torch.clamp(c, min=h): elementwise in the one neuron value, the first operand a
                # constant (they failed at the next layer, "not computed from the model input", naming no op)
                x, activation = held[0], None
            operands = [meta for value, meta in tracked if isinstance(meta, Param) and value is not x]
            if operands:  # torch.pow(h, p), clamp(h, min=p): the parameter is no bias or scale
                raise self.parameter_operand_refused(name, operands[0])
            constants = tuple(value for value in (*args, *kwargs.values())
                              if isinstance(value, Tensor) and value is not x)  # clamp's bounds, pow's exponent
            return self.unary(x, output, name, activation, constants)
        if name in ELEMENTWISE_MAX_MIN and isinstance(args[1] if len(args) > 1 else kwargs.get("other"), Tensor):
            return self.binary(ELEMENTWISE_MAX_MIN[name], args, kwargs, output)  # h.max(g): torch.maximum(h, g)
        if name in BINARY_ADD or name in BINARY_MUL or name in BINARY_OTHER:
            return self.binary(name, args, kwargs, output)
        if name in SOFTMAX:
            return self.softmax(name, args, kwargs, output)
        if name in REDUCTIONS:
            return self.reduction(name, args, kwargs, output)
        if name in MASK_FILL or name in WHERE:
            return self.mask_op(name, args, kwargs, output)
        used = [meta for meta in metas if isinstance(meta, Param)]
        if used:
            kind = "a convolution" if "conv" in name else "this op"
            raise self.unsupported(
                name, f"{kind} uses the parameter '{self.param_names[used[0].index]}', and gradgraph has no rule "
                "for it, so its gradient cannot be written as rank-1 terms on the graph; register a converter for "
                "the module (gradgraph.register_converter) or write it with linear maps")
        return self.mark_opaque(output, name, "gradgraph has no rule for this op", metas)

    # -------------------------------------------------------------- opaque values
    def mark_opaque(self, output: Any, op: str, reason: str, metas: list, *, location: str | None = None,
                    path: str | None = None) -> None:
        sets: set[int] = set()
        for meta in metas:
            if isinstance(meta, Neurons):
                sets.update(meta.versions)
            elif isinstance(meta, Opaque):
                sets.update(meta.sets)
            elif isinstance(meta, Scores):
                sets.update(meta.query.versions)
                sets.update(meta.key.versions)
        for index in sets:
            self.sets[index].pinned = True
        opaque = Opaque(op, location or self.location(), self.path() if path is None else path, _in_packing(reason),
                        sets, of_datapoints=any(of_datapoints(meta) for meta in metas),
                        cut=next((meta.cut for meta in metas if isinstance(meta, Opaque) and meta.cut), None))
        for value in tree_flatten(output)[0]:
            if isinstance(value, Tensor):
                self.set_meta(value, opaque)

    def of_datapoints(self, tracked: list[tuple[Tensor, Any]]) -> bool:
        """Whether any of an op's ``(value, meta)`` varies with the datapoints (:func:`~.meta.of_datapoints`), the
        integer input and the data made from it (masks, ids) left out."""
        return any(of_datapoints(meta) and not self.is_data(value, meta) for value, meta in tracked)

    def check_value_read(self, op: str, tracked: list[tuple[Tensor, Any]]) -> None:
        """Refuse a read of the datapoints' values into Python (``h.max().item()``, ``float(h[0, 0])``, ``if
        h.mean() > 0``) when there are several datapoints: the number (or branch) is one for the whole batch, so
        what the forward computes from it for one datapoint depends on the others' values, though autograd sees a
        constant — every per-sample gradient would differ from the datapoint's own, silently. One datapoint, a
        parameter's value, or the data's masks and ids (``mask.any()``, ``ids.max()``) are read freely."""
        if self.num_datapoints > 1 and self.of_datapoints(tracked):
            raise self.unsupported(op, (
                f"hands values of the datapoints to Python (a number or a branch), one for all "
                f"{self.num_datapoints} datapoints: what the forward computes from it for one datapoint depends on "
                "the others, which autograd cannot see, so every per-sample gradient would be wrong. Compute it with "
                "tensor ops within each datapoint (h.amax(-1, keepdim=True) for h.max().item()), move a check of "
                "the values out of forward, or convert one datapoint at a time"))

    def cut_gradient(self, op: str, output: Any) -> None:
        """Mark the opaque values an op made from datapoints' values without gradient (a ``detach``, which has no
        rule, or an op without a rule, a statistic of the batch among them, under ``torch.no_grad()``) as cut: the
        model's output must not be made from them (:meth:`cut_in_output`). Values with a rule (a ``tanh`` under
        ``no_grad``, a custom ``autograd.Function``'s forward) stay the datapoint's own and are not marked."""
        without_gradient = op not in DETACHES
        how = f"{op} under torch.no_grad()" if without_gradient else op
        for value in tensors_in(output):
            meta = self.meta(value)
            if isinstance(meta, Opaque):
                # a copy, as the opaque value may share its meta with the value it was made from
                self.set_meta(value, dataclasses.replace(meta, cut=meta.cut or f"{how} at {self.location()}"))
                if without_gradient:
                    self.made_without_gradient[id(value)] = value

    def lift_reattached(self, tracked: list[tuple[Tensor, Any]]) -> list[tuple[Tensor, Any]]:
        """``tracked`` with the cut lifted from each value made under ``torch.no_grad()`` that has a gradient now:
        a custom ``autograd.Function`` runs its forward without gradient and then gives the tensor it returned a
        ``grad_fn``, so its values are differentiated after all. Each read is lifted anew (the value stays in the
        table and its stored meta keeps the mark): the rules read an opaque value's meta only through an op's
        ``tracked`` list, and the output through :meth:`cut_in_output`, both lifted."""
        return [(value, dataclasses.replace(meta, cut=None))
                if self.made_without_gradient.get(id(value)) is value and value.grad_fn is not None else (value, meta)
                for value, meta in tracked]

    def cut_in_output(self, output: Any) -> str | None:
        """Where the gradient of datapoints' values the model's output is made from was cut, with several
        datapoints (the output checked by ``trace_model``); ``None`` if it was not."""
        outputs = self.lift_reattached([(value, self.meta(value)) for value in tensors_in(output)])
        cuts = [meta.cut for _, meta in outputs if isinstance(meta, Opaque) and meta.cut]
        return cuts[0] if cuts and self.num_datapoints > 1 else None

    def need_neurons(self, value: Any, what: str) -> Neurons | None:
        """The neuron ids of ``value`` (fixing the input's layout); ``None`` for constants."""
        meta = self.meta(value)
        if meta is None or isinstance(meta, Neurons):
            return meta
        if isinstance(meta, Data):
            if meta.element is None or not value.is_floating_point():
                return None  # a constant of the datapoints (a mask, position ids)
            # the integer input cast to float and read as features (uint8 pixels / 255)
            neurons = self.neurons_from_raw(value, Raw(meta.element), what)
            self.set_meta(value, neurons)
            return neurons
        if isinstance(meta, Raw):
            neurons = self.neurons_from_raw(value, meta, what)
            self.set_meta(value, neurons)
            return neurons
        if isinstance(meta, Opaque):
            raise UnsupportedOperationError(
                meta.path, meta.op, meta.location,
                f"{meta.reason}, and its result reaches {what} at {self.location()}"
                + (f" (module '{self.path()}')" if self.path() else "")
                + ". Write it with supported ops, register it with gradgraph.convert.register_elementwise "
                "if it is elementwise, or register a converter for the whole module",
            )
        if isinstance(meta, Scores):
            raise self.unsupported(what, "attention scores used as neuron values")
        which = f" '{self.param_names[meta.index]}'" if isinstance(meta, Param) else ""
        raise self.unsupported(what, f"the parameter{which} used where gradgraph expects neuron values (arithmetic "
                               "on a parameter before it meets the input: a learned slope, scale or mask)")


# The names these had before issue 27 made them public, for rule files written against them
# (tests/convert/test_convert_layering.py lists any use); new code uses the public names.
_Tracer = Tracer
