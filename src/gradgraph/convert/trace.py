"""The traced converter: read the computation a model performs, op by op, and build its graph.

``to_graph`` runs the model's own ``forward`` once under a
:class:`torch.overrides.TorchFunctionMode`. Every torch function, ``Tensor`` method and
operator the forward calls passes through :meth:`_Tracer.__torch_function__`, which runs it
and then *replays* it on integer id tensors that say, for every element of every tensor,

* which **neuron** it belongs to (``nodes``: a node id, ``-1`` where the element is no
  neuron's value, e.g. a normalisation statistic), and
* which **component** it belongs to (``comps``: ``datapoint * KEY_STRIDE + key``, where a
  *key* names a position: a token, a patch, a class token, a pooled vector).

Shape ops (``view``, ``reshape``, ``permute``, ``transpose``, ``split``, slicing, ``cat`` …)
need no rule of their own: the same call on the id tensors moves the ids exactly as it
moves the values, so a head split ``[b, T, d] -> [b, H, T, d_h]`` or a fused ``qkv`` slice is
followed whatever code wrote it. The rules are for the ops that *create* neurons or relate
them:

=======================  ===================================================================
op                       what the tracer does
=======================  ===================================================================
affine map               ``F.linear``, ``@`` / ``matmul`` / ``mm`` with a parameter, ``addmm``
                         (``transformers``' ``Conv1D``): a new neuron set, one edge per weight
                         entry, the bias as node values; the input's values become the source
                         neurons' ``act``
``F.embedding``          a TOKEN input neuron per table row (one-hot ``act``), an edge per
                         table entry; with constant indices (``arange``) it is a position
                         embedding, bound to the components of the tensor it is added to
elementwise unary        activations, scalar arithmetic, casts: a new *version* of the same
                         neurons (the first named activation labels the set)
elementwise binary       same neurons: a new version; different neurons (residual add, gated
                         product): tied sets, the sum absorbed into a fresh affine output or
                         written to a new MERGE set; a parameter varying per neuron: a scale
                         (NORM_SCALE edges) or a bias
norms                    ``layer_norm``, ``rms_norm`` (and hand-written ones from reductions):
                         the input's ``act`` is the normalised value, NORM_SCALE edges carry
                         ``γ``, ``β`` is the bias of a NORM set
reductions               over all neurons of a set: a statistic (no neuron); over positions
                         (mean / CLS pooling): a new set at a new component key
attention                ``q @ kᵀ`` (scaled, masked, softmaxed) then ``@ v``, or
                         ``F.scaled_dot_product_attention``: heads found from the id layout,
                         an ATTENTION set for the output, QUERY_KEY / VALUE_ATTENTION /
                         QUERY_ATTENTION relations, heads as permutation blocks
=======================  ===================================================================

Anything else yields an *opaque* tensor. That is fine after the last parameterised op
(pooling, a loss computed in ``forward``); an opaque tensor that reaches a parameterised op
raises :class:`UnsupportedOperationError` naming the source line and module of the op that
made it, what it was, and what to do.

Why a torch-function trace (not ``torch.fx`` or ``torch.export``): it runs the real
forward on real inputs, so Python control flow, ``transformers`` models, masks built at run
time and shape arithmetic all work unchanged, and the error for an unsupported op points at
the user's own source line. ``torch.fx`` fails on data-dependent control flow and reports
trace-internal node names; ``torch.export`` needs export-friendly code and lowers ops to ATen,
losing ``F.linear`` / ``F.layer_norm`` as units.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, EdgeKind, NodeKind

__all__ = [
    "KEY_STRIDE",
    "TraceResult",
    "UnsupportedOperationError",
    "register_elementwise",
    "trace_model",
]

#: ``comps = datapoint * KEY_STRIDE + key``: room for this many position keys per datapoint.
KEY_STRIDE = 1 << 24

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRADGRAPH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ----------------------------------------------------------------------- op tables
def _op_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if name.startswith("TensorBase.") or name.startswith("Tensor."):
        return "Tensor." + name.split(".", 1)[1]
    if "__get__" in name:
        return "Tensor." + name.split(".")[0] + " (attribute)"
    if module.startswith("torch._C._nn") or module == "torch.nn.functional":
        return f"torch.nn.functional.{name}"
    if module.startswith("torch._C._special") or module == "torch.special":
        return f"torch.special.{name.removeprefix('special_')}"
    if module.startswith("torch._C._fft") or module == "torch.fft":
        return f"torch.fft.{name.removeprefix('fft_')}"
    return f"torch.{name}" if module.startswith("torch") or not module else f"{module}.{name}"


def _names(*functions: Any) -> set[str]:
    return {_op_name(function) for function in functions}


def _method(*names: str) -> set[str]:
    return {f"Tensor.{name}" for name in names}


# Shape ops: replayed on the id tensors.
_SHAPE_OPS = _method(
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze",
    "expand", "expand_as", "__getitem__", "split", "chunk", "narrow", "movedim", "moveaxis", "swapaxes",
    "swapdims", "unbind", "select", "view_as", "reshape_as", "clone", "tensor_split", "split_with_sizes",
    "repeat", "T (attribute)", "mT (attribute)", "mH (attribute)", "H (attribute)",
) | _names(
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.split, torch.chunk, torch.narrow, torch.movedim, torch.swapaxes, torch.unbind, torch.select, torch.t,
    torch.clone, torch.tensor_split, torch.cat, torch.concat, torch.stack, torch.broadcast_to,
) | {"torch.concatenate", "Tensor.broadcast_to"}
# Casts and eval-mode no-ops: identity on the values' neurons.
_IDENTITY_OPS = _method("to", "float", "double", "half", "bfloat16", "type_as", "type", "cpu", "cuda") | {
    "torch.nn.functional.dropout", "torch.dropout", "Tensor.__getitem__ (no-op)",
}
_ACTIVATIONS: dict[str, ActivationKind] = {
    **{name: ActivationKind.RELU for name in _names(torch.relu, F.relu) | _method("relu")},
    **{name: ActivationKind.LEAKY_RELU for name in _names(F.leaky_relu)},
    **{name: ActivationKind.GELU for name in _names(F.gelu)},
    **{name: ActivationKind.SILU for name in _names(F.silu)},
    **{name: ActivationKind.TANH for name in _names(torch.tanh, F.tanh) | _method("tanh")},
    **{name: ActivationKind.SIGMOID for name in _names(torch.sigmoid, F.sigmoid) | _method("sigmoid")},
    **{name: ActivationKind.SINE for name in _names(torch.sin) | _method("sin")},
}
_UNARY = set(_ACTIVATIONS) | _names(
    F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.logsigmoid,
    F.softsign, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.cos, torch.erf,
    torch.square, torch.reciprocal, torch.clamp, torch.pow, torch.exp2, torch.log1p, torch.expm1, torch.sign,
    torch.special.erf, torch.special.expit, torch.nan_to_num,
) | _method(
    "exp", "log", "sqrt", "rsqrt", "abs", "neg", "__neg__", "cos", "erf", "square", "reciprocal", "clamp", "pow",
    "clamp_min", "clamp_max", "float_power", "sign", "log1p", "expm1",
)
_BINARY_ADD = _method("__add__", "__radd__", "__sub__", "__rsub__", "add", "sub") | _names(torch.add, torch.sub)
_BINARY_MUL = _method("__mul__", "__rmul__", "__truediv__", "__rtruediv__", "mul", "div") | _names(
    torch.mul, torch.div
)
_BINARY_OTHER = _method("__pow__", "__rpow__", "maximum", "minimum") | _names(torch.maximum, torch.minimum)
_REDUCTIONS = _method("sum", "mean", "var", "std", "amax", "amin", "norm", "logsumexp", "max", "min") | _names(
    torch.sum, torch.mean, torch.var, torch.std, torch.amax, torch.amin, torch.norm, torch.logsumexp
)
_JOINS = _names(torch.cat, torch.stack) | {"torch.concatenate", "torch.concat"}
_CONCATENATIONS = _names(torch.cat) | {"torch.concatenate", "torch.concat"}
_POOLS = _method("sum", "mean") | _names(torch.sum, torch.mean)
_SOFTMAX = _names(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax) | _method("softmax", "log_softmax")
_MASK_FILL = _method("masked_fill") | _names(torch.masked_fill)
_WHERE = _names(torch.where)
_MATMUL = _method("__matmul__", "__rmatmul__", "matmul", "mm", "bmm") | _names(torch.matmul, torch.mm, torch.bmm)
_LINEAR = _names(F.linear)
_ADDMM = _names(torch.addmm) | _method("addmm")
_EMBEDDING = _names(F.embedding)
_LAYER_NORM = _names(F.layer_norm)
_RMS_NORM = {"torch.nn.functional.rms_norm", "torch.rms_norm"}
_BATCH_NORM = _names(F.batch_norm)
_SDPA = _names(F.scaled_dot_product_attention)
_LOST_TRACK = (
    "its input is not computed from the model input by ops gradgraph follows (a custom autograd.Function, a "
    "tensor made inside forward, or .detach()); register the module that computes it with "
    "gradgraph.convert.register_elementwise if it is elementwise, or register a converter for it"
)
_IN_PLACE_HINT = "in-place ops on tensors gradgraph follows are unsupported; use the out-of-place form (inplace=False)"
# Queries that return no tensor (size, dim, dtype ...) pass through without a rule.

#: Registered by :func:`register_elementwise`: module types and functions treated as one
#: elementwise op, with the activation label they give a neuron set.
_ELEMENTWISE_MODULES: dict[type[nn.Module], ActivationKind] = {}
_ELEMENTWISE_FUNCTIONS: dict[str, ActivationKind] = {}


def register_elementwise(target: type[nn.Module] | Callable[..., Tensor],
                         activation: ActivationKind = ActivationKind.IDENTITY) -> None:
    """Declare a module type or a torch function elementwise, for the traced converter.

    Most custom activations need nothing: an activation written with torch ops
    (``x * torch.sigmoid(1.702 * x)``) is followed op by op. Register a module whose forward
    uses ops gradgraph does not know (a custom ``autograd.Function``, ``torch.special``
    functions, a C++ extension), or a torch function that is elementwise but unknown. The
    traced converter then treats one call as one elementwise op: same neurons, a new value,
    and ``activation`` as the label of the neuron set (``IDENTITY`` = no named activation;
    the label decides the scale symmetries gradgraph may apply, so name one only if the
    function really is it).

    Args:
        target: an ``nn.Module`` subclass (every instance, subclasses included) or a torch
            function such as ``torch.special.erfinv``.
        activation: the :class:`~gradgraph.ActivationKind` to label the neurons with.

    Example::

        class Snake(nn.Module):            # uses an op the tracer has no rule for
            def forward(self, x):
                return x + torch.sin(x).pow(2)

        gradgraph.convert.register_elementwise(Snake)
    """
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_elementwise: {target.__name__} is not an nn.Module subclass")
        _ELEMENTWISE_MODULES[target] = ActivationKind(activation)
    elif callable(target):
        _ELEMENTWISE_FUNCTIONS[_op_name(target)] = ActivationKind(activation)
    else:
        raise TypeError(f"register_elementwise: expected a module type or a function, got {target!r}")


# ----------------------------------------------------------------------- metadata
@dataclass
class _Neurons:
    """Ids of a tensor that holds neuron values (full shape, int64, on the CPU)."""

    nodes: Tensor  # node id per element, -1 = no neuron (a statistic)
    comps: Tensor | None  # component per element; None = not bound to datapoints yet
    versions: dict[int, int]  # neuron set -> version of its values held here
    unbound_index: Tensor | None = None  # for unbound embedding outputs: table row per element


@dataclass
class _Raw:
    """A tensor derived from the model input before any affine map fixed its layout."""

    element: Tensor  # flat input element index per element


@dataclass
class _Param:
    """A parameter or a view of one."""

    index: int  # into TraceResult.param_names
    pos: Tensor  # flat position in the parameter per element


@dataclass
class _Scores:
    """Attention scores (or weights) of ``q @ kᵀ``: rows are queries, columns keys."""

    query: _Neurons
    key: _Neurons
    batch_shape: tuple[int, ...]


@dataclass
class _Opaque:
    """Values gradgraph cannot follow (fine after the last parameterised op)."""

    op: str
    location: str
    path: str
    reason: str
    sets: set[int] = field(default_factory=set)


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
    last: tuple[Tensor, Tensor, Tensor] | None = None
    last_version: int = 0
    version_counter: int = 0
    fresh: bool = True
    absorbed: bool = False
    pinned: bool = False
    read_by_affine: bool = False
    created_by: str = "affine"  # affine | input | token | norm | merge | attention | scale | pool | embedding


@dataclass
class TraceResult:
    """What a trace found: neuron sets, edges, symmetry relations and recorded tensors.

    ``edges`` is a list of ``(src [k], dst [k], kind, param, pos [k] | None, weight [k] | None)``
    in creation order; ``ties`` pairs of nodes that one permutation must move together;
    ``heads`` per attention op a list of ``(q, k, v, o)`` node rows.
    """

    sets: list[NeuronSet]
    edges: list[tuple[Tensor, Tensor, EdgeKind, int, Tensor | None, Tensor | None]]
    ties: list[tuple[Tensor, Tensor]]
    attention: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]]
    param_names: list[str]
    param_shapes: list[list[int]]
    params: list[Tensor]
    num_datapoints: int
    output: Any
    num_nodes: int
    keys: list[int]


# ----------------------------------------------------------------------- the tracer
def _ids_like(tensor: Tensor, value: int = -1) -> Tensor:
    return torch.full(tuple(tensor.shape), value, dtype=torch.long)


def _broadcast(ids: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    return ids.expand(*shape) if tuple(ids.shape) != tuple(shape) else ids


def _varies_along(ids: Tensor, axis: int) -> bool:
    if ids.shape[axis] <= 1:
        return False
    first = ids.narrow(axis, 0, 1)
    return not bool((ids == first).all())


def _rows_along_last(ids: Tensor) -> Tensor:
    return ids.reshape(-1, ids.shape[-1]) if ids.dim() else ids.reshape(1, 1)


def _feature_row(nodes: Tensor) -> Tensor | None:
    """The neurons on the last axis if every position holds the same ones (and all are neurons)."""
    rows = _rows_along_last(nodes)
    if not bool((rows == rows[:1]).all()) or bool((rows[0] < 0).any()):
        return None
    return rows[0].clone()


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


class _OpLog:
    """Numbers every op of a forward and fingerprints it: name, arguments (tensors by the op
    that produced them), output shapes. Two runs with equal fingerprints performed the same
    computation on tensors of the same shapes, so a trace's layout can be reused."""

    def __init__(self, inputs: Tensor, param_names: dict[int, str]) -> None:
        self.count = 0
        self.fingerprints: list[tuple] = []
        self._producer: dict[int, tuple[Tensor, int, int]] = {id(inputs): (inputs, -1, 0)}
        self._param_names = param_names

    def source(self, tensor: Tensor) -> Any:
        entry = self._producer.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1], entry[2]
        name = self._param_names.get(id(tensor))
        return ("param", name) if name is not None else "external"

    def step(self, name: str, args: tuple, kwargs: dict, output: Any) -> int:
        flat = tree_flatten((args, kwargs))[0]
        arguments = tuple(self.source(v) if isinstance(v, Tensor) else _describe(v) for v in flat)
        outputs = tree_flatten(output)[0]
        shapes = tuple(tuple(v.shape) if isinstance(v, Tensor) else _describe(v) for v in outputs)
        index = self.count
        self.count += 1
        for position, value in enumerate(outputs):
            if isinstance(value, Tensor):
                self._producer[id(value)] = (value, index, position)
        self.fingerprints.append((name, arguments, shapes))
        return index


class _Tracer(TorchFunctionMode):
    """Runs ops and follows neurons and components through them (see the module docstring)."""

    def __init__(self, model: nn.Module, num_datapoints: int, datapoint_dim: int = 0) -> None:
        super().__init__()
        self.model = model
        self.num_datapoints = num_datapoints
        self.datapoint_dim = datapoint_dim
        self.metas: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, meta); keeps tensors alive
        self.sets: list[NeuronSet] = []
        self.edges: list[tuple[Tensor, Tensor, EdgeKind, int, Tensor | None, Tensor | None]] = []
        self.ties: list[tuple[Tensor, Tensor]] = []
        self.attention: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = []
        self.num_nodes = 0
        self.keys: list[int] = []
        self.param_names: list[str] = []
        self.param_shapes: list[list[int]] = []
        self.params: list[Tensor] = []
        self._param_index: dict[int, int] = {}
        self._param_name = {id(p): name for name, p in model.named_parameters()}
        self._param_objects = {id(p): p for p in model.parameters()}
        self.module_stack: list[str] = []
        self.module_types: list[str] = []
        self._module_paths = {id(module): name for name, module in model.named_modules()}
        self.input_nodes: Tensor | None = None  # per flat input element
        self.input_comps: Tensor | None = None
        self.input_tensor: Tensor | None = None
        self.input_set: NeuronSet | None = None
        self.log: _OpLog | None = None
        self.op_index = -1
        self.captured: dict[int, tuple[tuple, dict, Any]] = {}  # op index -> (args, kwargs, output)
        #: id(tensor) -> (tensor, op index, recipe): values computed by the tracer itself from
        #: an op's arguments (a norm's normalised input), so a replay can recompute them
        self.derived: dict[int, tuple[Tensor, int, tuple]] = {}

    # -------------------------------------------------------------- bookkeeping
    def meta(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return None
        entry = self.metas.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1]
        if id(value) in self._param_objects:
            return _Param(self.param_index(value), torch.arange(value.numel()).reshape(value.shape))
        return None

    def set_meta(self, tensor: Tensor, meta: Any) -> None:
        self.metas[id(tensor)] = (tensor, meta)

    def param_index(self, param: Tensor) -> int:
        index = self._param_index.get(id(param))
        if index is None:
            index = len(self.param_names)
            self._param_index[id(param)] = index
            self.param_names.append(self._param_name[id(param)])
            self.param_shapes.append(list(param.shape))
            self.params.append(param)
        return index

    def path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def location(self) -> str:
        frame = sys._getframe(1)
        while frame is not None:
            filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(_TORCH_DIR) and not filename.startswith(_GRADGRAPH_DIR):
                name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
                return f"{os.path.basename(filename)}:{frame.f_lineno} in {name}"
            frame = frame.f_back
        return "<unknown location>"

    def unsupported(self, op: str, reason: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(self.path(), op, self.location(), reason,
                                         self.module_types[-1] if self.module_types else None)

    def new_set(self, size: int, kind: NodeKind, origin: str, created_by: str) -> NeuronSet:
        neuron_set = NeuronSet(len(self.sets), self.num_nodes, size, kind, origin, created_by=created_by)
        self.sets.append(neuron_set)
        self.num_nodes += size
        return neuron_set

    def set_of(self, node: int) -> NeuronSet:
        low, high = 0, len(self.sets) - 1
        while low < high:  # sets are sorted by first node
            middle = (low + high + 1) // 2
            if self.sets[middle].first <= node:
                low = middle
            else:
                high = middle - 1
        return self.sets[low]

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

    def observe(self, tensor: Tensor, meta: _Neurons) -> None:
        """Remember ``tensor`` as the newest value of its sets (their act if nothing fixes it)."""
        if meta.comps is None:
            return
        for index, version in meta.versions.items():
            neuron_set = self.sets[index]
            if version >= neuron_set.last_version:
                neuron_set.last_version = version
                neuron_set.last = (tensor, meta.nodes, meta.comps)

    # -------------------------------------------------------------- input
    def bind_input(self, tensor: Tensor) -> None:
        self.input_tensor = tensor
        self.log = _OpLog(tensor, self._param_name)
        self.set_meta(tensor, _Raw(torch.arange(tensor.numel()).reshape(tensor.shape)))

    def _datapoint_of(self, element: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(datapoint, within, per_datapoint)`` of flat input elements: the datapoint axis's
        index and the element's rank among its datapoint's elements (the other axes in order)."""
        shape = self.input_tensor.shape
        if not shape:
            return torch.zeros_like(element), element, 1
        axis = self.datapoint_dim
        inner = math.prod(shape[axis + 1:])
        datapoint = (element // inner) % shape[axis]
        within = (element // (inner * shape[axis])) * inner + element % inner
        return datapoint, within, math.prod(shape) // max(shape[axis], 1)

    def neurons_from_raw(self, tensor: Tensor, meta: _Raw, what: str) -> _Neurons:
        """Fix the layout of the input: the last axis of ``tensor`` holds features (or ids)."""
        element = meta.element
        datapoint, within, per_datapoint = self._datapoint_of(element)
        if tensor.dim() < 1:
            raise self.unsupported(what, "the input must have a datapoint axis")
        integer = not tensor.is_floating_point()
        if self.input_comps is None:
            self.input_nodes = torch.full((self.input_tensor.numel(),), -1, dtype=torch.long)
            self.input_comps = torch.full((self.input_tensor.numel(),), -1, dtype=torch.long)
        if integer:  # token ids: every element is one position
            comps = self._assign_comps(element, datapoint, within)
            return _Neurons(_ids_like(tensor), comps, {})
        width = tensor.shape[-1]
        first_row = element.reshape(-1, width)
        feature = first_row[0] - first_row[0].min()
        if per_datapoint % width or not bool((first_row - first_row[:, :1] == feature).all()):
            raise self.unsupported(what, "the input's features are not its last axis")
        if self.input_set is None:
            self.input_set = self.new_set(width, NodeKind.INPUT, "input", "input")
            self.input_set.pinned = True
        if self.input_set.size != width:
            raise self.unsupported(what, f"the input is read with {width} features here but "
                                   f"{self.input_set.size} elsewhere")
        nodes = self.input_set.first + _broadcast(feature, tensor.shape).clone()
        comps = self._assign_comps(element, datapoint, within // width)
        if tensor.requires_grad:
            self.input_set.grad_records.append((tensor, nodes, comps))
        return _Neurons(nodes, comps, {self.input_set.index: 0})

    def _assign_comps(self, element: Tensor, datapoint: Tensor, position: Tensor) -> Tensor:
        count = int(position.max()) + 1 if position.numel() else 1
        while len(self.keys) < count:
            self.new_key()
        comps = datapoint * KEY_STRIDE + position
        known = self.input_comps[element.reshape(-1)]
        if bool(((known >= 0) & (known != comps.reshape(-1))).any()):
            raise self.unsupported("input", "the input is read with two different layouts")
        self.input_comps[element.reshape(-1)] = comps.reshape(-1)
        return comps.clone()

    # -------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = _op_name(func)
        output = func(*args, **kwargs)
        self.op_index = self.log.step(name, args, kwargs, output)
        flat, _ = tree_flatten((args, kwargs))
        tracked = [(value, self.meta(value)) for value in flat if isinstance(value, Tensor)]
        tracked = [(value, meta) for value, meta in tracked if meta is not None]
        if not tracked:
            return output
        self.captured[self.op_index] = (args, kwargs, output)
        out_flat, _ = tree_flatten(output)
        if not any(isinstance(value, Tensor) for value in out_flat):
            return output
        if name.endswith("_") and not name.endswith("__") or kwargs.get("inplace") is True or (
            name.startswith("torch.nn.functional.") and len(args) > 1 and args[-1] is True and "dropout" not in name
            and name.split(".")[-1] in {"relu", "leaky_relu", "elu", "hardtanh", "relu6", "selu", "celu"}
        ):
            if any(isinstance(meta, _Neurons | _Raw) for _, meta in tracked):
                raise self.unsupported(name, _IN_PLACE_HINT)
        self.dispatch(name, func, args, kwargs, output, tracked)
        return output

    def dispatch(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        metas = [meta for _, meta in tracked]
        if name in _ELEMENTWISE_FUNCTIONS:
            return self.unary(args[0], output, name, _ELEMENTWISE_FUNCTIONS[name])
        if any(isinstance(meta, _Opaque) for meta in metas):
            if any(isinstance(meta, _Param) for meta in metas):
                value = next(value for value, meta in tracked if isinstance(meta, _Opaque))
                self.need_neurons(value, f"{name} with the parameter "
                                  f"'{self.param_names[next(m for m in metas if isinstance(m, _Param)).index]}'")
            opaque = next(meta for meta in metas if isinstance(meta, _Opaque))
            return self.mark_opaque(output, opaque.op, opaque.reason, metas, location=opaque.location,
                                    path=opaque.path)
        if name in _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.affine(name, args[0], weight, bias, output, transposed=False)
        if name in _ADDMM:
            bias, x, weight = args[0], args[1], args[2]
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                raise self.unsupported(name, "addmm with alpha/beta other than 1")
            return self.affine(name, x, weight, bias, output, transposed=True)
        if name in _MATMUL:
            left, right = (args[1], args[0]) if name == "Tensor.__rmatmul__" else (args[0], args[1])
            return self.matmul(name, left, right, output)
        if name in _EMBEDDING:
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
        if name in _SDPA:
            return self.sdpa(name, args, kwargs, output)
        if name in _LAYER_NORM or name in _RMS_NORM:
            return self.norm(name, args, kwargs, output)
        if name in _BATCH_NORM:
            return self.batch_norm(name, args, kwargs, output)
        if any(isinstance(meta, _Scores) for meta in metas):
            return self.scores_op(name, args, kwargs, output, tracked)
        if name in _SHAPE_OPS or name in _IDENTITY_OPS or name == "Tensor.__getitem__":
            if name in _IDENTITY_OPS and name.endswith("dropout"):
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                if training and p > 0:
                    raise self.unsupported(name, "active dropout changes the function; call model.eval()")
            return self.shape_op(name, func, args, kwargs, output, tracked)
        if name in _UNARY:
            return self.unary(args[0], output, name, _ACTIVATIONS.get(name))
        if name in _BINARY_ADD or name in _BINARY_MUL or name in _BINARY_OTHER:
            return self.binary(name, args, kwargs, output)
        if name in _SOFTMAX:
            return self.softmax(name, args, kwargs, output)
        if name in _REDUCTIONS:
            return self.reduction(name, args, kwargs, output)
        if name in _MASK_FILL or name in _WHERE:
            return self.mask_op(name, args, kwargs, output)
        used = [meta for meta in metas if isinstance(meta, _Param)]
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
            if isinstance(meta, _Neurons):
                sets.update(meta.versions)
            elif isinstance(meta, _Opaque):
                sets.update(meta.sets)
            elif isinstance(meta, _Scores):
                sets.update(meta.query.versions)
                sets.update(meta.key.versions)
        for index in sets:
            self.sets[index].pinned = True
        opaque = _Opaque(op, location or self.location(), self.path() if path is None else path, reason, sets)
        for value in tree_flatten(output)[0]:
            if isinstance(value, Tensor):
                self.set_meta(value, opaque)

    def need_neurons(self, value: Any, what: str) -> _Neurons | None:
        """The neuron ids of ``value`` (fixing the input's layout); ``None`` for constants."""
        meta = self.meta(value)
        if meta is None or isinstance(meta, _Neurons):
            return meta
        if isinstance(meta, _Raw):
            neurons = self.neurons_from_raw(value, meta, what)
            self.set_meta(value, neurons)
            return neurons
        if isinstance(meta, _Opaque):
            raise UnsupportedOperationError(
                meta.path, meta.op, meta.location,
                f"{meta.reason}, and its result reaches {what} at {self.location()}"
                + (f" (module '{self.path()}')" if self.path() else "")
                + ". Write it with supported ops, register it with gradgraph.convert.register_elementwise "
                "if it is elementwise, or register a converter for the whole module",
            )
        if isinstance(meta, _Scores):
            raise self.unsupported(what, "attention scores used as neuron values")
        raise self.unsupported(what, "a parameter used where gradgraph expects neuron values")

    # -------------------------------------------------------------- shape ops
    def shape_op(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        metas = [meta for _, meta in tracked]
        kinds = {type(meta) for meta in metas}
        if kinds == {_Param}:
            return self.replay(func, args, kwargs, output, lambda pos: _Param(metas[0].index, pos),
                               lambda meta: meta.pos)
        if kinds == {_Raw}:
            return self.replay(func, args, kwargs, output, _Raw, lambda meta: meta.element)
        if _Param in kinds or _Raw in kinds:
            # a class token concatenated to tokens, or a raw input joined to neurons
            return self.join_parts(name, func, args, kwargs, output)
        for value, meta in tracked:
            if isinstance(meta, _Neurons) and meta.comps is None and name in _JOINS:
                raise self.unsupported(name, "concatenating values that do not depend on the input")
        if name in _JOINS:
            parts = args[0] if args else kwargs["tensors"]
            # an empty constant (a key/value cache before its first entry) joins nothing
            kept = [part for part in parts if self.meta(part) is not None or part.numel() > 0]
            if any(self.meta(part) is None for part in kept):
                raise self.unsupported(name, "concatenating neuron values with constants (for transformers "
                                       "models, call them with use_cache=False)")
            args = (kept, *args[1:]) if args else args
            kwargs = kwargs if args else {**kwargs, "tensors": kept}
        nodes = self.replay_ids(func, args, kwargs, lambda meta: meta.nodes)
        bound = all(meta.comps is not None for meta in metas)
        comps = self.replay_ids(func, args, kwargs, lambda meta: meta.comps) if bound else None
        versions: dict[int, int] = {}
        for meta in metas:
            for index, version in meta.versions.items():
                if versions.get(index, version) != version:
                    raise self.unsupported(name, "joins two versions of the same neurons along their features (as "
                                           "rotary position embeddings' rotate_half does); rotary embeddings are not "
                                           "supported")
                versions[index] = version
        index_meta = None
        if any(meta.unbound_index is not None for meta in metas):
            index_meta = self.replay_ids(func, args, kwargs, lambda meta: meta.unbound_index)
        outputs = output if isinstance(output, tuple | list) else [output]
        node_outs = nodes if isinstance(nodes, tuple | list) else [nodes]
        comp_outs = comps if isinstance(comps, tuple | list) else [comps] * len(outputs)
        index_outs = index_meta if isinstance(index_meta, tuple | list) else [index_meta] * len(outputs)
        for value, node_ids, comp_ids, index_ids in zip(outputs, node_outs, comp_outs, index_outs):
            if isinstance(value, Tensor):
                meta = _Neurons(node_ids, comp_ids, dict(versions), index_ids)
                self.set_meta(value, meta)
                self.observe(value, meta)

    def replay_ids(self, func: Any, args: tuple, kwargs: dict, pick: Callable[[Any], Tensor | None]) -> Any:
        def substitute(value: Any) -> Any:
            if isinstance(value, Tensor):
                meta = self.meta(value)
                if meta is not None:
                    ids = pick(meta)
                    if ids is None:
                        return _ids_like(value)
                    return ids
            return value

        new_args, new_kwargs = tree_map(substitute, (args, kwargs))
        new_kwargs = {key: value for key, value in new_kwargs.items() if key not in ("dtype", "memory_format")}
        if func in (Tensor.to, Tensor.type, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.cpu,
                    Tensor.cuda, Tensor.type_as, F.dropout, torch.dropout):
            return new_args[0]
        with torch.no_grad():
            return func(*new_args, **new_kwargs)

    def replay(self, func: Any, args: tuple, kwargs: dict, output: Any, make: Callable[[Tensor], Any],
               pick: Callable[[Any], Tensor]) -> None:
        """Apply a shape op to a parameter's positions or the raw input's element ids."""
        result = self.replay_ids(func, args, kwargs, pick)
        outputs = output if isinstance(output, tuple | list) else [output]
        results = result if isinstance(result, tuple | list) else [result]
        for value, ids in zip(outputs, results):
            if isinstance(value, Tensor):
                self.set_meta(value, make(ids))

    def join_parts(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """``cat`` of a class token (a parameter) with token neurons along positions."""
        if name not in _CONCATENATIONS:
            raise self.unsupported(name, "mixes a parameter or the raw input with neuron values")
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        neuron_parts = [self.need_neurons(part, name) if not isinstance(self.meta(part), _Param) else None
                        for part in parts]
        bound = [meta for meta in neuron_parts if meta is not None and meta.comps is not None]
        if not bound:
            raise self.unsupported(name, "no part of this concatenation depends on the input")
        axis = dim % output.dim()
        datapoint_axes = [a for a in range(output.dim()) if _varies_along(bound[0].comps // KEY_STRIDE, a)]
        datapoint_axis = datapoint_axes[0] if len(datapoint_axes) == 1 else 0
        if axis == output.dim() - 1 or axis == datapoint_axis:
            raise self.unsupported(name, "a parameter concatenated along the feature or datapoint axis")
        width = output.shape[-1]
        merged = self.new_set(width, NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
        merged_nodes = merged.first + torch.arange(width)
        comps_parts, node_parts, tokens = [], [], []
        for part, meta in zip(parts, neuron_parts):
            if meta is None:  # the parameter: a class-token set with the parameter as bias
                param = self.meta(part)
                token = self.new_set(width, NodeKind.RESIDUAL, f"{self.path()} class token", "token_param")
                pos = param.pos
                first = pos.reshape(-1, width)
                if not bool((first == first[:1]).all()):
                    raise self.unsupported(name, "a concatenated parameter that differs between positions; "
                                           "use one token per parameter")
                token.bias_param, token.bias_pos = param.index, first[0].clone()
                count = part.shape[axis]
                keys = torch.tensor(self.new_key(count))
                shape = [1] * part.dim()
                shape[axis] = count
                datapoint_shape = [1] * part.dim()
                datapoint_shape[datapoint_axis] = part.shape[datapoint_axis]
                comps = (torch.arange(part.shape[datapoint_axis]).reshape(datapoint_shape) * KEY_STRIDE
                         + keys.reshape(shape))
                comps = _broadcast(comps, part.shape).clone()
                self.edges.append((token.first + torch.arange(width), merged_nodes, EdgeKind.MERGE, -1, None, None))
                self.ties.append((token.first + torch.arange(width), merged_nodes))
                node_parts.append(_broadcast(token.first + torch.arange(width), part.shape))
                comps_parts.append(comps)
                tokens.append(token)
            else:
                row = _feature_row(meta.nodes)
                if row is None:
                    raise self.unsupported(name, "concatenates tensors whose features are not one neuron set")
                self.fix_act(part, meta, name)
                self.edges.append((row, merged_nodes, EdgeKind.MERGE, -1, None, None))
                self.ties.append((row, merged_nodes))
                node_parts.append(meta.nodes)
                comps_parts.append(meta.comps)
        comps = torch.cat(comps_parts, dim=axis)
        token_nodes = torch.cat(node_parts, dim=axis)
        for token in tokens:  # their factors live at the class-token positions of the output
            token.grad_records.append((output, token_nodes, comps))
            token.act_records.append((output, token_nodes, comps))
            token.act_version = 0
        meta = _Neurons(_broadcast(merged_nodes, output.shape).clone(), comps, {merged.index: 0})
        merged.grad_records.append((output, meta.nodes, comps))
        self.set_meta(output, meta)
        self.observe(output, meta)

    # -------------------------------------------------------------- affine maps
    def param_view(self, value: Any, name: str, role: str) -> _Param:
        meta = self.meta(value)
        if not isinstance(meta, _Param):
            raise self.unsupported(name, f"its {role} is not a parameter of the model (or a view of one); "
                                   "gradgraph converts affine maps whose weights are parameters")
        return meta

    def fix_act(self, value: Tensor, meta: _Neurons, what: str) -> _Neurons:
        """Make ``value`` the act of its neurons; split off a new set where another version is the act."""
        conflicts = [index for index, version in meta.versions.items()
                     if self.sets[index].act_version not in (None, version)]
        if conflicts:
            meta = self.materialize(value, meta, f"{self.path()} {what}")
        for index, version in meta.versions.items():
            neuron_set = self.sets[index]
            neuron_set.act_version = version
            neuron_set.fresh = False
        self.record_act(value, meta)
        return meta

    def record_act(self, value: Tensor, meta: _Neurons) -> None:
        for index in meta.versions:
            self.sets[index].act_records.append((value, meta.nodes, meta.comps))

    def materialize(self, value: Tensor, meta: _Neurons, origin: str, kind: NodeKind = NodeKind.RESIDUAL) -> _Neurons:
        """A new MERGE set holding ``value``'s neurons (one new neuron per neuron on its last axis)."""
        row = _feature_row(meta.nodes)
        if row is None:
            raise self.unsupported(origin, "these values do not hold one neuron per feature")
        width = len(row)
        merged = self.new_set(width, kind, origin, "merge")
        merged_nodes = merged.first + torch.arange(width)
        self.edges.append((row, merged_nodes, EdgeKind.MERGE, -1, None, None))
        self.ties.append((row, merged_nodes))
        new = _Neurons(_broadcast(merged_nodes, value.shape).clone(), meta.comps, {merged.index: 0})
        merged.grad_records.append((value, new.nodes, new.comps))
        self.set_meta(value, new)
        self.observe(value, new)
        return new

    def affine(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor, *,
               transposed: bool) -> None:
        meta = self.need_neurons(x, f"the affine map {name}")
        if meta is None:
            raise self.unsupported(name, _LOST_TRACK)
        weight_view = self.param_view(weight, name, "weight")
        if weight_view.pos.dim() != 2:
            raise self.unsupported(name, f"a weight of shape {list(weight.shape)}; expected a matrix")
        positions = weight_view.pos.T if transposed else weight_view.pos  # [out, in]
        rows = _rows_along_last(meta.nodes)
        if meta.comps is None:
            raise self.unsupported(name, "an affine map of values that do not depend on the input")
        comp_rows = meta.comps.reshape(-1, meta.comps.shape[-1])
        if not bool((rows == rows[:1]).all()) or not bool((comp_rows == comp_rows[:, :1]).all()):
            raise self.unsupported(
                name, "applied to an axis that holds positions or datapoints, not features (e.g. a Linear over "
                "tokens, as in MLP-Mixer); gradgraph needs affine maps over the last, feature axis")
        sources = rows[0].clone()
        if bool((sources < 0).any()):
            raise self.unsupported(name, "its input holds values that are not neurons (e.g. a statistic)")
        meta = self.fix_act(x, meta, name)
        sources = _rows_along_last(meta.nodes)[0].clone()
        for index in meta.versions:
            self.sets[index].read_by_affine = True
        width = positions.shape[0]
        created = self.new_set(width, NodeKind.HIDDEN, self.path() or name, "affine")
        targets = created.first + torch.arange(width)
        self.edges.append((sources.repeat(width), targets.repeat_interleave(len(sources)), EdgeKind.LINEAR,
                           weight_view.index, positions.reshape(-1).clone(), None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            if bias_view.pos.numel() != width:
                raise self.unsupported(name, f"a bias of shape {list(bias.shape)} for {width} outputs")
            created.bias_param, created.bias_pos = bias_view.index, bias_view.pos.reshape(-1).clone()
        out_nodes = _broadcast(targets, output.shape).clone()
        out_comps = _broadcast(meta.comps.narrow(-1, 0, 1), output.shape).clone()
        new = _Neurons(out_nodes, out_comps, {created.index: 0})
        created.grad_records.append((output, out_nodes, out_comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def matmul(self, name: str, left: Tensor, right: Tensor, output: Tensor) -> None:
        left_meta, right_meta = self.meta(left), self.meta(right)
        if isinstance(right_meta, _Param) and not isinstance(left_meta, _Param):
            return self.affine(name, left, right, None, output, transposed=True)
        if isinstance(left_meta, _Param):
            raise self.unsupported(name, "a parameter on the left of a matmul; write x @ W (features last)")
        if isinstance(left_meta, _Scores):
            return self.attend(name, left_meta, right, output)
        query = self.need_neurons(left, name)
        key = self.need_neurons(right, name)
        if query is None or key is None:
            constant = left if query is None else right
            raise self.unsupported(name, f"a matmul of neurons with a constant of shape {list(constant.shape)}")
        # q @ kᵀ: the contracted axes hold the query / key dims of each head
        self.set_meta(output, _Scores(query, key, tuple(output.shape[:-2])))

    # -------------------------------------------------------------- embeddings
    def embedding(self, name: str, indices: Tensor, weight: Tensor, output: Tensor,
                  padding_idx: int | None = None) -> None:
        table = self.param_view(weight, name, "table")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += table.pos.shape[0]
        index_meta = self.meta(indices)
        if isinstance(index_meta, _Raw):
            index_meta = self.neurons_from_raw(indices, index_meta, name)
        elif isinstance(index_meta, _Neurons | _Opaque | _Scores):
            raise self.unsupported(name, "embedding indices computed from neuron values")
        rows, width = table.pos.shape
        tokens = self.new_set(rows, NodeKind.TOKEN, f"{self.path() or name} table rows", "token")
        tokens.pinned = True
        created = self.new_set(width, NodeKind.RESIDUAL, self.path() or name, "embedding")
        targets = created.first + torch.arange(width)
        self.edges.append((tokens.first + torch.arange(rows).repeat_interleave(width), targets.repeat(rows),
                           EdgeKind.EMBEDDING, table.index, table.pos.reshape(-1).clone(), None))
        out_nodes = _broadcast(targets, output.shape).clone()
        row_index = _broadcast(indices.detach().cpu().unsqueeze(-1), output.shape).clone()
        if index_meta is None:  # constant indices (positions): bound when added to token values
            new = _Neurons(out_nodes, None, {created.index: 0}, unbound_index=row_index)
            created.token_set = tokens  # type: ignore[attr-defined]
            tokens.padding_idx = padding_idx  # type: ignore[attr-defined]
        else:
            comps = _broadcast(index_meta.comps.unsqueeze(-1), output.shape).clone()
            new = _Neurons(out_nodes, comps, {created.index: 0})
            created.grad_records.append((output, out_nodes, comps))
            tokens.onehot_records.append((row_index, out_nodes, comps, self.op_index, padding_idx))
        self.set_meta(output, new)
        self.observe(output, new)

    def bind(self, value: Tensor, meta: _Neurons, shape: torch.Size, comps: Tensor, result: Tensor) -> _Neurons:
        """Give unbound neurons (position embeddings) the components of the tensor they join."""
        nodes = _broadcast(meta.nodes, shape).clone()
        for index in meta.versions:
            neuron_set = self.sets[index]
            neuron_set.grad_records.append((result, nodes, comps))
            token_set = getattr(neuron_set, "token_set", None)
            if token_set is not None and meta.unbound_index is not None:
                token_set.onehot_records.append((_broadcast(meta.unbound_index, shape).clone(), nodes, comps, None,
                                                 getattr(token_set, "padding_idx", None)))
        return _Neurons(nodes, comps, meta.versions)

    def position_parameter(self, name: str, param: _Param, shape: torch.Size, result: Tensor) -> _Neurons:
        """A parameter added to token values that varies over positions: a position embedding."""
        pos = _broadcast(param.pos, shape) if param.pos.dim() <= len(shape) else param.pos
        width = shape[-1]
        flat = param.pos.reshape(-1, width) if param.pos.shape[-1] == width else None
        if flat is None:
            raise self.unsupported(name, "a parameter added to neurons that does not vary per feature")
        rows = flat.shape[0]
        tokens = self.new_set(rows, NodeKind.TOKEN, f"{self.path() or name} positions", "token")
        tokens.pinned = True
        created = self.new_set(width, NodeKind.RESIDUAL, self.path() or name, "embedding")
        targets = created.first + torch.arange(width)
        self.edges.append((tokens.first + torch.arange(rows).repeat_interleave(width), targets.repeat(rows),
                           EdgeKind.EMBEDDING, param.index, flat.reshape(-1).clone(), None))
        row_of_pos = torch.full((int(param.pos.max()) + 1,), -1, dtype=torch.long)
        row_of_pos[flat.reshape(-1)] = torch.arange(rows).repeat_interleave(width)
        meta = _Neurons(_broadcast(targets, shape).clone(), None, {created.index: 0},
                        unbound_index=row_of_pos[pos])
        created.token_set = tokens  # type: ignore[attr-defined]
        return meta

    # -------------------------------------------------------------- elementwise
    def unary(self, x: Any, output: Tensor, name: str, activation: ActivationKind | None) -> None:
        meta = self.need_neurons(x, name)
        if meta is None:
            return None
        versions = self.next_version(meta.versions)
        for index in meta.versions:
            neuron_set = self.sets[index]
            if activation is not None and neuron_set.activation is ActivationKind.IDENTITY and not neuron_set.absorbed:
                neuron_set.activation = activation
            elif activation is None or neuron_set.activation is not ActivationKind.IDENTITY:
                neuron_set.elementwise_ops = getattr(neuron_set, "elementwise_ops", 0) + 1  # type: ignore[attr-defined]
        new = _Neurons(meta.nodes, meta.comps, versions, meta.unbound_index)
        self.set_meta(output, new)
        self.observe(output, new)

    def _operand(self, value: Any, name: str) -> Any:
        if isinstance(value, Tensor):
            meta = self.meta(value)
            if isinstance(meta, _Raw):
                return self.need_neurons(value, name)
            return meta
        return None

    def binary(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        left, right = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if name in ("Tensor.__rsub__", "Tensor.__radd__", "Tensor.__rmul__", "Tensor.__rtruediv__",
                    "Tensor.__rpow__"):
            left, right = right, left
        operands = [(left, self._operand(left, name)), (right, self._operand(right, name))]
        neurons = [(value, meta) for value, meta in operands if isinstance(meta, _Neurons)]
        params = [(value, meta) for value, meta in operands if isinstance(meta, _Param)]
        additive = name in _BINARY_ADD
        if not neurons:
            raise self.unsupported(name, "arithmetic on parameters inside the forward (other than as a weight, "
                                   "a bias, a scale or a position embedding)")
        if params:
            return self.with_parameter(name, neurons[0], params[0], output, additive)
        if len(neurons) == 1:
            value, meta = neurons[0]
            other = right if value is left else left
            if isinstance(other, Tensor) and other.dim() and meta.comps is not None:
                self.check_constant(name, meta, other, output.shape)
            return self.unary(value, output, name, None)
        (a_value, a), (b_value, b) = neurons
        shape = output.shape
        if a.comps is None and b.comps is None:
            raise self.unsupported(name, "arithmetic on two values that do not depend on the input")
        comps = _broadcast(a.comps if a.comps is not None else b.comps, shape)
        if a.comps is None:
            a = self.bind(a_value, a, shape, comps.clone(), output)
        if b.comps is None:
            b = self.bind(b_value, b, shape, comps.clone(), output)
        a_nodes, b_nodes = _broadcast(a.nodes, shape), _broadcast(b.nodes, shape)
        comps = _broadcast(a.comps, shape)
        if torch.equal(a_nodes, b_nodes) or bool((a_nodes < 0).all()) or bool((b_nodes < 0).all()):
            # the same neurons (x * sigmoid(x)), or neurons and a statistic of them (x - mean)
            base = a if not bool((a_nodes < 0).all()) else b
            versions = self.next_version({**a.versions, **b.versions}) if torch.equal(a_nodes, b_nodes) \
                else self.next_version(base.versions)
            new = _Neurons(_broadcast(base.nodes, shape).clone(), comps.clone(), versions)
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        if bool((a_nodes < 0).any()) or bool((b_nodes < 0).any()):
            raise self.unsupported(name, "combines neurons with values that are partly not neurons")
        pairs = torch.unique(torch.stack((a_nodes.reshape(-1), b_nodes.reshape(-1))), dim=1)
        if torch.unique(pairs[0]).numel() != pairs.shape[1] or torch.unique(pairs[1]).numel() != pairs.shape[1]:
            # not one neuron of b per neuron of a (e.g. rotary embeddings mixing dims): no symmetry claimed
            for index in list(a.versions) + list(b.versions):
                self.sets[index].pinned = True
            versions = self.next_version(a.versions)
            new = _Neurons(a_nodes.clone(), comps.clone(), {**versions, **self.next_version(b.versions)})
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        kind = EdgeKind.RESIDUAL if additive else EdgeKind.GATE
        fresh = [(meta, other) for meta, other in ((b, a), (a, b)) if self.absorbable(meta)]
        if fresh:
            into, other = fresh[0]
            into_nodes, other_nodes = _broadcast(into.nodes, shape), _broadcast(other.nodes, shape)
            pairs = torch.unique(torch.stack((other_nodes.reshape(-1), into_nodes.reshape(-1))), dim=1)
            self.edges.append((pairs[0].clone(), pairs[1].clone(), kind, -1, None, None))
            self.ties.append((pairs[0].clone(), pairs[1].clone()))
            target = self.sets[next(iter(into.versions))]
            target.absorbed = True
            if not additive:
                target.gated = True  # type: ignore[attr-defined]
                for index in other.versions:
                    self.sets[index].gated = True  # type: ignore[attr-defined]
            new = _Neurons(into_nodes.clone(), comps.clone(), self.next_version(into.versions))
        else:
            merged = self.new_set(int(pairs.shape[1]), NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
            order = torch.argsort(pairs[0])
            a_sorted, b_sorted = pairs[0][order], pairs[1][order]
            merged_nodes = merged.first + torch.arange(pairs.shape[1])
            for source in (a_sorted, b_sorted):
                self.edges.append((source.clone(), merged_nodes, kind, -1, None, None))
                self.ties.append((source.clone(), merged_nodes))
            lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
            lookup[a_sorted] = merged_nodes
            new_nodes = lookup[a_nodes]
            new = _Neurons(new_nodes, comps.clone(), {merged.index: 0})
            merged.grad_records.append((output, new_nodes, new.comps))
            if not additive:
                merged.gated = True  # type: ignore[attr-defined]
        self.set_meta(output, new)
        self.observe(output, new)

    def absorbable(self, meta: _Neurons) -> bool:
        """Values that are exactly a fresh affine output: a residual sum may live in its neurons."""
        if len(meta.versions) != 1 or meta.comps is None:
            return False
        index, version = next(iter(meta.versions.items()))
        neuron_set = self.sets[index]
        if neuron_set.created_by != "affine" or not neuron_set.fresh or neuron_set.absorbed or version != 0:
            return False
        rows = _rows_along_last(meta.nodes)
        return rows.shape[1] == neuron_set.size and bool((rows == rows[:1]).all())

    def check_constant(self, name: str, meta: _Neurons, constant: Tensor, shape: torch.Size) -> None:
        """A constant that differs between neurons of one set breaks their permutation symmetry."""
        expanded = _broadcast(constant.detach().cpu(), shape)
        nodes = _broadcast(meta.nodes, shape)
        for axis in range(len(shape)):
            if _varies_along(nodes, axis) and expanded.shape[axis] > 1 and _varies_along(expanded, axis):
                for index in meta.versions:
                    self.sets[index].pinned = True
                return

    def with_parameter(self, name: str, neurons: tuple[Tensor, _Neurons], param: tuple[Tensor, _Param],
                       output: Tensor, additive: bool) -> None:
        value, meta = neurons
        param_value, param_meta = param
        shape = output.shape
        if meta.comps is None:
            raise self.unsupported(name, "arithmetic between a parameter and values that do not depend on the input")
        nodes = _broadcast(meta.nodes, shape)
        pos = _broadcast(param_meta.pos, shape)
        sources = _feature_row(nodes)
        pos_rows = pos.reshape(-1, shape[-1])
        per_feature = bool((pos_rows == pos_rows[:1]).all())
        if sources is None:
            raise self.unsupported(name, "a parameter combined with values that are not one neuron per feature")
        if additive and not per_feature:
            embedded = self.position_parameter(name, param_meta, shape, output)
            return self.binary_with(name, value, meta, embedded, output)
        if not per_feature:
            raise self.unsupported(name, "a parameter multiplying neurons that differs between positions")
        positions = pos_rows[0].clone()
        if additive:
            target = self.sets[next(iter(meta.versions))] if len(meta.versions) == 1 else None
            if target is not None and self.absorbable(meta) and target.bias_param < 0 \
                    and torch.equal(sources, target.first + torch.arange(target.size)):
                target.bias_param, target.bias_pos = param_meta.index, positions
                new = _Neurons(nodes.clone(), _broadcast(meta.comps, shape).clone(), dict(meta.versions))
                target.grad_records = [(output, new.nodes, new.comps)]
                self.set_meta(output, new)
                self.observe(output, new)
                return None
            created = self.new_set(len(sources), NodeKind.NORM, f"{self.path()} {name}", "scale")
            created.bias_param, created.bias_pos = param_meta.index, positions
            kind, weight_param, weight_pos = EdgeKind.RESIDUAL, -1, None
        else:
            created = self.new_set(len(sources), NodeKind.NORM, f"{self.path()} {name}", "scale")
            kind, weight_param, weight_pos = EdgeKind.NORM_SCALE, param_meta.index, positions
        meta = self.fix_act(value, meta, name)
        sources = _rows_along_last(_broadcast(meta.nodes, shape))[0].clone()
        targets = created.first + torch.arange(len(sources))
        self.edges.append((sources, targets, kind, weight_param, weight_pos, None))
        self.ties.append((sources, targets))
        lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
        lookup[sources] = targets
        new = _Neurons(lookup[_broadcast(meta.nodes, shape)], _broadcast(meta.comps, shape).clone(),
                       {created.index: 0})
        created.grad_records.append((output, new.nodes, new.comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def binary_with(self, name: str, value: Tensor, meta: _Neurons, embedded: _Neurons, output: Tensor) -> None:
        placeholder = torch.empty(0)
        self.set_meta(placeholder, embedded)
        self.binary(name, (value, placeholder), {}, output)

    # -------------------------------------------------------------- reductions
    def _dims(self, args: tuple, kwargs: dict, ndim: int) -> list[int]:
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
        if dim is None:
            return list(range(ndim))
        dims = [dim] if isinstance(dim, int) else list(dim)
        return sorted(d % ndim for d in dims)

    def reduction(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        meta = self.need_neurons(x, name)
        if meta is None or meta.comps is None:
            return self.mark_opaque(output, name, "a reduction of values that do not depend on the input",
                                    [meta] if meta else [])
        if isinstance(output, tuple):  # max / min with dim return (values, indices)
            return self.mark_opaque(output, name, "max/min with indices", [meta])
        dims = self._dims(args, kwargs, x.dim())
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        if name.endswith("norm") and len(args) > 2:
            keepdim = bool(kwargs.get("keepdim", False))
        neuron_axes = [axis for axis in range(x.dim()) if _varies_along(meta.nodes, axis)]
        comp_axes = [axis for axis in range(x.dim()) if _varies_along(meta.comps, axis)]
        datapoint = meta.comps // KEY_STRIDE
        datapoint_axes = [axis for axis in range(x.dim()) if _varies_along(datapoint, axis)]
        reduced_neurons = [axis for axis in dims if axis in neuron_axes]
        reduced_comps = [axis for axis in dims if axis in comp_axes]

        def collapse(ids: Tensor) -> Tensor:
            for axis in reversed(dims):
                ids = ids.narrow(axis, 0, 1)
                if not keepdim:
                    ids = ids.squeeze(axis)
            return ids.clone()

        if any(axis in datapoint_axes for axis in dims):
            return self.mark_opaque(output, name, "a reduction over datapoints", [meta])
        if reduced_neurons and not reduced_comps:
            if set(reduced_neurons) != set(neuron_axes):
                return self.mark_opaque(output, name, "a reduction over part of the features", [meta])
            stat = _Neurons(torch.full(tuple(output.shape), -1, dtype=torch.long), collapse(meta.comps), {})
            self.set_meta(output, stat)
            return None
        if reduced_comps and not reduced_neurons:
            if name not in _POOLS:
                return self.mark_opaque(output, name, "a reduction over positions other than sum/mean", [meta])
            pooled_nodes = collapse(meta.nodes)
            rows = _rows_along_last(pooled_nodes)
            if output.dim() == 0 or not bool((rows == rows[:1]).all()):
                return self.mark_opaque(output, name, "pooling that does not keep one neuron per feature", [meta])
            self.observe(x, meta)
            pooled = self.new_set(rows.shape[1], NodeKind.RESIDUAL, f"{self.path()} {name}", "pool")
            pooled_ids = pooled.first + torch.arange(rows.shape[1])
            self.edges.append((rows[0].clone(), pooled_ids, EdgeKind.MERGE, -1, None, None))
            self.ties.append((rows[0].clone(), pooled_ids))
            key = self.new_key()[0]
            comps = collapse(datapoint) * KEY_STRIDE + key
            nodes = _broadcast(pooled_ids, output.shape).clone()
            new = _Neurons(nodes, _broadcast(comps, output.shape).clone(), {pooled.index: 0})
            pooled.grad_records.append((output, nodes, new.comps))
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        return self.mark_opaque(output, name, "a reduction over features and positions together", [meta])

    def softmax(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        meta = self.need_neurons(args[0], name)
        if meta is None:
            return None
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        axis = dim % args[0].dim()
        if _varies_along(meta.nodes, axis) and meta.comps is not None and not _varies_along(meta.comps, axis):
            neuron_axes = [a for a in range(args[0].dim()) if _varies_along(meta.nodes, a)]
            if neuron_axes == [axis]:
                return self.unary(args[0], output, name, None)  # softmax over all features of a set
        return self.mark_opaque(output, name, "a softmax across positions or part of the features", [meta])

    def mask_op(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        if name in _WHERE:
            condition, left, right = args[0], args[1], args[2]
            values = [value for value in (left, right) if isinstance(self.meta(value), _Neurons)]
            if len(values) == 1 and not isinstance(self.meta(condition), _Neurons):
                meta = self.meta(values[0])
                self.check_constant(name, meta, condition, output.shape)
                return self.unary(values[0], output, name, None)
            return self.mark_opaque(output, name, "where() between several neuron values", [])
        meta = self.need_neurons(args[0], name)
        if meta is None:
            return None
        self.check_constant(name, meta, args[1], output.shape)
        return self.unary(args[0], output, name, None)

    # -------------------------------------------------------------- norms
    def norm(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        x = args[0]
        layer_norm = name in _LAYER_NORM
        normalized_shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = (args[3] if len(args) > 3 else kwargs.get("bias")) if layer_norm else None
        eps = args[4 if layer_norm else 3] if len(args) > (4 if layer_norm else 3) else kwargs.get("eps")
        meta = self.need_neurons(x, name)
        if meta is None:
            if weight is None and bias is None:
                return None
            raise self.unsupported(name, _LOST_TRACK)
        if len(tuple(normalized_shape)) != 1:
            raise self.unsupported(name, f"normalized_shape {tuple(normalized_shape)}; gradgraph supports norms over "
                                   "the last axis")
        neuron_axes = [axis for axis in range(x.dim()) if _varies_along(meta.nodes, axis)]
        if neuron_axes not in ([x.dim() - 1], []) or meta.comps is None:
            raise self.unsupported(name, "a norm whose last axis is not the features of its input")
        with torch.no_grad():
            if layer_norm:
                normalised = F.layer_norm(x.detach(), tuple(normalized_shape), None, None,
                                          1e-5 if eps is None else eps)
            else:
                squares = x.detach().pow(2).mean(-1, keepdim=True)
                epsilon = torch.finfo(x.dtype).eps if eps is None else eps
                normalised = x.detach() * torch.rsqrt(squares + epsilon)
        # the input's act is its normalised value: then NORM_SCALE edges carry gamma's gradient
        recipe = ("layer_norm", tuple(normalized_shape), 1e-5 if eps is None else eps) if layer_norm else (
            "rms_norm", None if eps is None else eps)
        self.derived[id(normalised)] = (normalised, self.op_index, recipe)
        versions = self.next_version(meta.versions)
        normalised_meta = _Neurons(meta.nodes, meta.comps, versions)
        self.set_meta(normalised, normalised_meta)
        normalised_meta = self.fix_act(normalised, normalised_meta, name)
        sources = _rows_along_last(normalised_meta.nodes)[0].clone()
        created = self.new_set(len(sources), NodeKind.NORM, self.path() or name, "norm")
        targets = created.first + torch.arange(len(sources))
        if weight is not None:
            weight_view = self.param_view(weight, name, "weight")
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, weight_view.index,
                               weight_view.pos.reshape(-1).clone(), None))
        else:
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, -1, None, None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            created.bias_param, created.bias_pos = bias_view.index, bias_view.pos.reshape(-1).clone()
        self.ties.append((sources, targets))
        nodes = _broadcast(targets, output.shape).clone()
        new = _Neurons(nodes, meta.comps.clone(), {created.index: 0})
        created.grad_records.append((output, nodes, new.comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def batch_norm(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        if training:
            raise self.unsupported(name, "batch norm in training mode mixes the datapoints of a batch, so their "
                                   "gradients are not separate rank-1 terms; call model.eval()")
        x, running_mean, running_var = args[0], args[1], args[2]
        weight = args[3] if len(args) > 3 else kwargs.get("weight")
        bias = args[4] if len(args) > 4 else kwargs.get("bias")
        eps = args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)
        meta = self.need_neurons(x, name)
        if meta is None:
            raise self.unsupported(name, _LOST_TRACK)
        if x.dim() != 2:
            raise self.unsupported(name, f"batch norm on a [{', '.join(map(str, x.shape))}] tensor; gradgraph "
                                   "supports BatchNorm1d on [b, features]")
        with torch.no_grad():
            normalised = (x.detach() - running_mean) / torch.sqrt(running_var + eps)
        self.derived[id(normalised)] = (normalised, self.op_index, ("batch_norm", eps))
        for index in meta.versions:  # running statistics are buffers: no permutation moves them
            self.sets[index].pinned = True
        normalised_meta = _Neurons(meta.nodes, meta.comps, self.next_version(meta.versions))
        self.set_meta(normalised, normalised_meta)
        normalised_meta = self.fix_act(normalised, normalised_meta, name)
        sources = normalised_meta.nodes[0].clone()
        created = self.new_set(len(sources), NodeKind.NORM, self.path() or name, "norm")
        created.pinned = True
        targets = created.first + torch.arange(len(sources))
        if weight is not None:
            weight_view = self.param_view(weight, name, "weight")
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, weight_view.index, weight_view.pos.clone(),
                               None))
        else:
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, -1, None, None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            created.bias_param, created.bias_pos = bias_view.index, bias_view.pos.clone()
        nodes = _broadcast(targets, output.shape).clone()
        new = _Neurons(nodes, meta.comps.clone(), {created.index: 0})
        created.grad_records.append((output, nodes, new.comps))
        self.set_meta(output, new)
        self.observe(output, new)

    # -------------------------------------------------------------- attention
    def scores_op(self, name: str, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        scores = [meta for _, meta in tracked if isinstance(meta, _Scores)]
        others = [meta for _, meta in tracked if not isinstance(meta, _Scores)]
        allowed = _UNARY | _BINARY_ADD | _BINARY_MUL | _SOFTMAX | _MASK_FILL | _WHERE | _IDENTITY_OPS | {
            "Tensor.__getitem__"}
        if len(scores) == 1 and not others and (name in allowed or name in _SHAPE_OPS):
            meta = scores[0]
            if name in _SHAPE_OPS and name not in _IDENTITY_OPS and tuple(output.shape[:-2]) != meta.batch_shape:
                return self.mark_opaque(output, name, "reshapes attention scores", [meta])
            if name in _SOFTMAX:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
                if dim % output.dim() != output.dim() - 1:
                    return self.mark_opaque(output, name, "a softmax of scores over queries", [meta])
            self.set_meta(output, meta)
            return None
        return self.mark_opaque(output, name, "combines attention scores with neuron values", scores + others)

    def attend(self, name: str, scores: _Scores, value: Tensor, output: Tensor) -> None:
        value_meta = self.need_neurons(value, name)
        if value_meta is None:
            raise self.unsupported(name, "attention weights applied to a constant")
        self.attention_output(name, scores.query, scores.key, value, value_meta, output)

    def sdpa(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if bound.get("dropout_p", 0.0):
            raise self.unsupported(name, "attention dropout changes the function; pass dropout_p=0 in eval mode")
        if bound.get("enable_gqa", False):
            raise self.unsupported(name, "grouped-query attention (enable_gqa)")
        query = self.need_neurons(bound["query"], name)
        key = self.need_neurons(bound["key"], name)
        value = self.need_neurons(bound["value"], name)
        if query is None or key is None or value is None:
            raise self.unsupported(name, "attention over constant queries, keys or values")
        key_t = _Neurons(key.nodes.transpose(-2, -1), key.comps.transpose(-2, -1), key.versions)
        self.attention_output(name, query, key_t, bound["value"], value, output)

    def attention_output(self, name: str, query: _Neurons, key_t: _Neurons, value: Tensor, value_meta: _Neurons,
                         output: Tensor) -> None:
        if query.comps is None or value_meta.comps is None:
            raise self.unsupported(name, "attention over values that do not depend on the input")
        shape = output.shape
        if output.dim() < 3:
            raise self.unsupported(name, "attention without a head or batch axis")
        if not torch.equal(_broadcast(query.comps.narrow(-1, 0, 1), query.comps.shape), query.comps):
            raise self.unsupported(name, "queries whose last axis is not their features")
        batch_shape = tuple(shape[:-2])
        q_rows = _broadcast(query.nodes, (*batch_shape, *query.nodes.shape[-2:])).narrow(-2, 0, 1)
        k_rows = _broadcast(key_t.nodes, (*batch_shape, *key_t.nodes.shape[-2:])).narrow(-1, 0, 1)
        v_rows = _broadcast(value_meta.nodes, (*batch_shape, *value_meta.nodes.shape[-2:])).narrow(-2, 0, 1)
        q_rows = q_rows.reshape(-1, query.nodes.shape[-1])
        k_rows = k_rows.reshape(-1, key_t.nodes.shape[-2])
        v_rows = v_rows.reshape(-1, value_meta.nodes.shape[-1])
        triples = torch.cat((q_rows, k_rows, v_rows), dim=1)
        unique, inverse = torch.unique(triples, dim=0, return_inverse=True)
        # keep heads in order of first appearance
        first_seen = torch.full((unique.shape[0],), triples.shape[0], dtype=torch.long)
        first_seen.scatter_reduce_(0, inverse, torch.arange(triples.shape[0]), reduce="amin")
        order = torch.argsort(first_seen)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        heads = unique[order]
        head_dim, value_dim = q_rows.shape[1], v_rows.shape[1]
        if bool((heads < 0).any()):
            raise self.unsupported(name, "queries, keys or values that are not neurons")
        all_q = heads[:, :head_dim].reshape(-1)
        all_k = heads[:, head_dim:2 * head_dim].reshape(-1)
        all_v = heads[:, 2 * head_dim:].reshape(-1)
        if len(set(all_q.tolist())) != all_q.numel() or len(set(all_v.tolist())) != all_v.numel() \
                or len(set(all_k.tolist())) != all_k.numel():
            raise self.unsupported(name, "heads that share query, key or value neurons (multi-query or grouped "
                                   "attention)")
        created = self.new_set(len(heads) * value_dim, NodeKind.ATTENTION, self.path() or name, "attention")
        o_rows = created.first + torch.arange(len(heads) * value_dim).reshape(len(heads), value_dim)
        block = []
        for head in range(len(heads)):
            q, k, v = heads[head, :head_dim], heads[head, head_dim:2 * head_dim], heads[head, 2 * head_dim:]
            block.append((q.clone(), k.clone(), v.clone(), o_rows[head].clone()))
            self.edges.append((q.clone(), k.clone(), EdgeKind.QUERY_KEY, -1, None, None))
            self.edges.append((v.clone(), o_rows[head].clone(), EdgeKind.VALUE_ATTENTION, -1, None, None))
            self.edges.append((q.repeat_interleave(value_dim), o_rows[head].repeat(head_dim),
                               EdgeKind.QUERY_ATTENTION, -1, None, None))
        self.attention.append(block)
        for meta in (query, key_t, value_meta):
            self.observe_attention_input(meta)
        head_of_row = rank[inverse].reshape(*batch_shape) if batch_shape else rank[inverse].reshape(())
        nodes = o_rows[head_of_row]  # [*batch, dv]
        nodes = _broadcast(nodes.unsqueeze(-2), shape).clone()
        comps = _broadcast(query.comps.narrow(-1, 0, 1), (*batch_shape, shape[-2], 1))
        comps = _broadcast(comps, shape).clone()
        new = _Neurons(nodes, comps, {created.index: 0})
        created.grad_records.append((output, nodes, comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def observe_attention_input(self, meta: _Neurons) -> None:
        for index in meta.versions:
            self.sets[index].fresh = False


# ----------------------------------------------------------------------- running it
class _ModuleTracker:
    """Global module hooks: the module path stack for messages, and registered elementwise modules."""

    def __init__(self, tracer: Any, replay: bool = False) -> None:
        self.tracer = tracer
        self.replay = replay
        self.handles: list[Any] = []
        self.patched: list[nn.Module] = []

    def __enter__(self) -> "_ModuleTracker":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        paths = self.tracer._module_paths

        def pre(module: nn.Module, args: Any) -> None:
            self.tracer.module_stack.append(paths.get(id(module), type(module).__name__))
            self.tracer.module_types.append(type(module).__name__)

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.tracer.module_stack:
                self.tracer.module_stack.pop()
                self.tracer.module_types.pop()

        # a replay raises nothing that names a module, so it skips the per-call hooks
        self.handles = [] if self.replay else [register_module_forward_pre_hook(pre),
                                               register_module_forward_hook(post)]
        for module in self.tracer.model.modules():
            activation = next((kind for cls, kind in _ELEMENTWISE_MODULES.items() if isinstance(module, cls)), None)
            if activation is not None:
                self._patch(module, activation)
            elif isinstance(module, nn.MultiheadAttention):
                self._patch_attention(module)
        return self

    def _patch(self, module: nn.Module, activation: ActivationKind) -> None:
        original = module.forward
        tracer = self.tracer

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            with torch._C.DisableTorchFunction():
                output = original(x, *args, **kwargs)
            tracer.op_index = tracer.log.step(f"module {type(module).__name__}", (x, *args), kwargs, output)
            tracer.captured[tracer.op_index] = ((x, *args), kwargs, output)
            if not self.replay:
                tracer.unary(x, output, type(module).__name__, activation)
            return output

        module.forward = forward  # type: ignore[method-assign]
        self.patched.append(module)

    def _patch_attention(self, module: nn.MultiheadAttention) -> None:
        from gradgraph.convert.attention import _check_attention, self_attention

        original = module.forward
        path = self.tracer._module_paths.get(id(module), "")
        tracer = self.tracer

        def forward(query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                    key_padding_mask: Tensor | None = None, need_weights: bool = True,
                    attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[Tensor, None]:
            # the stock module runs one fused kernel on its packed in_proj_weight; gradgraph's
            # functional form computes the same with F.linear on row slices, which the trace follows
            _check_attention(path, module)
            key = query if key is None else key
            value = key if value is None else value
            if not (query is key and key is value):
                raise UnsupportedOperationError(
                    path, "nn.MultiheadAttention", tracer.location(),
                    "cross-attention (query, key and value differ) is not supported; self-attention takes "
                    "one tensor (for a bare module pass nothing for key/value in forward_kwargs)",
                    "MultiheadAttention")
            if is_causal and attn_mask is None:
                length = query.shape[1] if module.batch_first else query.shape[0]
                attn_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
            return self_attention(module, query, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                  path=path), None

        del original
        module.forward = forward  # type: ignore[method-assign]
        self.patched.append(module)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.patched:
            del module.forward
        self.tracer.module_stack.clear()
        self.tracer.module_types.clear()


def trace_model(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any],
                datapoint_dim: int = 0) -> tuple[_Tracer, Any, Tensor]:
    """Run ``forward(x)`` under the tracer; returns ``(tracer, output, x)``.

    ``x`` is the input as the model saw it (a leaf that requires grad for float inputs);
    ``inputs.shape[datapoint_dim]`` counts the datapoints.
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        raise GradGraphError("the model's parameters are on the 'meta' device (no values); load or materialise "
                             "its weights (e.g. model.to_empty(device='cpu') and load a state dict) first")
    tracer = _Tracer(model, inputs.shape[datapoint_dim] if inputs.dim() else 1, datapoint_dim)
    x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
    tracer.bind_input(x)
    with torch.enable_grad(), _ModuleTracker(tracer), tracer:
        output = _run_forward(model, forward, x)
    return tracer, output, x


def _user_frame(traceback: Any) -> str:
    """``file:line in Class.forward`` of the innermost frame of the user's code in a traceback."""
    found = "<unknown location>"
    while traceback is not None:
        code = traceback.tb_frame.f_code
        filename = os.path.abspath(code.co_filename)
        if not filename.startswith(_TORCH_DIR) and not filename.startswith(_GRADGRAPH_DIR):
            found = f"{os.path.basename(filename)}:{traceback.tb_lineno} in {getattr(code, 'co_qualname', code.co_name)}"
        traceback = traceback.tb_next
    return found


def _run_forward(model: nn.Module, forward: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``forward(x)``; torch's own errors from the model's code become a GradGraphError that
    names the input and the line of the forward that failed."""
    try:
        return forward(x)
    except (RuntimeError, IndexError, ValueError) as error:
        if isinstance(error, GradGraphError):
            raise
        raise GradGraphError(
            f"{_user_frame(error.__traceback__)}: {type(model).__name__} failed on inputs of shape "
            f"{list(x.shape)} ({x.dtype}): {type(error).__name__}: {error}") from error


class PlanMismatch(Exception):
    """A replay performed other ops than the trace it reuses (raised to fall back to a trace)."""


class _Replayer(TorchFunctionMode):
    """Runs a forward, checks each op against a trace's fingerprints and keeps the wanted ones.

    The cheap path of a converter that has seen the architecture: no id tensors, no rules,
    only the tensors the graph's factors come from.
    """

    def __init__(self, model: nn.Module, fingerprints: list[tuple], wanted: set[int]) -> None:
        super().__init__()
        self.model = model
        self.fingerprints = fingerprints
        self.wanted = wanted
        self.captured: dict[int, tuple[tuple, dict, Any]] = {}
        self.module_stack: list[str] = []
        self.module_types: list[str] = []
        self._module_paths = {id(module): name for name, module in model.named_modules()}
        self.log: _OpLog | None = None
        self.op_index = -1

    def location(self) -> str:
        return "<replay>"

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        index = self.log.step(_op_name(func), args, kwargs, output)
        if index >= len(self.fingerprints) or self.log.fingerprints[-1] != self.fingerprints[index]:
            raise PlanMismatch(index)
        if index in self.wanted:
            self.captured[index] = (args, kwargs, output)
        return output


def replay_model(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any], fingerprints: list[tuple],
                 wanted: set[int]) -> tuple[_Replayer, Any, Tensor]:
    """Run ``forward(x)`` checking it against ``fingerprints``; raises :class:`PlanMismatch` if it differs."""
    replayer = _Replayer(model, fingerprints, wanted)
    x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
    replayer.log = _OpLog(x, {id(p): name for name, p in model.named_parameters()})
    with torch.enable_grad(), _ModuleTracker(replayer, replay=True), replayer:
        output = _run_forward(model, forward, x)
    if replayer.log.count != len(fingerprints):
        raise PlanMismatch(replayer.log.count)
    return replayer, output, x


def output_sets(tracer: _Tracer, output: Any) -> set[int]:
    """The neuron sets whose values reach the model output (directly or through opaque ops)."""
    sets: set[int] = set()
    for value in tree_flatten(output)[0]:
        meta = tracer.meta(value) if isinstance(value, Tensor) else None
        if isinstance(meta, _Neurons):
            sets.update(meta.versions)
        elif isinstance(meta, _Opaque):
            sets.update(meta.sets)
    return sets
