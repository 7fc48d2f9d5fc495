"""Attention models -> GradGraph: every (datapoint, token) pair is one rank-1 component.

Every affine map of an attention block acts on each token separately, so the gradient
of a datapoint's loss with respect to its weight is a sum over tokens of rank-1 terms,
``dL/dW = sum_t g_t a_tᵀ``. The graph therefore has ``B = b * T`` components, component
``i * T + t`` being token ``t`` of datapoint ``i`` (``component_sample`` maps it to ``i``),
and :meth:`GradGraph.per_sample_grads` sums a datapoint's tokens back up.

Supported models (module types are matched exactly by behaviour: a subclass that
overrides ``forward`` is rejected):

* ``nn.MultiheadAttention`` used as self-attention: ``model(x, x, x, **forward_kwargs)[0]``
  is the output. ``batch_first`` either way, with or without bias. ``kdim``/``vdim``
  other than ``embed_dim``, ``add_bias_kv`` and ``add_zero_attn`` are rejected.
* ``nn.TransformerEncoderLayer`` (``norm_first`` either way; ReLU, GELU or another
  elementwise activation of :data:`gradgraph.convert.mlp.ACTIVATION_MODULES`) and
  ``nn.TransformerEncoder`` stacks of them, with or without a final ``norm``.
* A wrapper of one of those: an ``nn.Sequential`` or custom module whose forward is the
  chain ``[nn.Linear] -> attention module -> [nn.Linear]`` (input projection and output
  head both optional), the head applied to every token. Call-time keyword arguments
  (``forward_kwargs``, e.g. masks) go to the wrapper's forward, which passes them on.
  Anything computed between the chain's modules (positional encodings, pooling,
  activations) is detected and rejected.

The input is ``[b, T, d_in]`` when the attention module is ``batch_first``, else
``[T, b, d_in]``; ``loss_fn(output, targets)`` receives the model's output as the model
returns it and must reduce tokens and features to one loss per datapoint, ``[b]``.
Dropout must be inactive (``model.eval()`` or ``p = 0``). Masks (``attn_mask`` /
``src_mask`` / ``mask``, boolean or additive, ``[T, T]`` or ``[b * heads, T, T]``, and key
padding masks) are honoured.

Hooks cannot see the per-head query/key/value tensors: ``nn.MultiheadAttention`` calls a
fused function on its packed ``in_proj_weight``. So the converter runs the model's own
forward and replaces the output of every attention module with a functional
re-implementation (a forward hook) that records ``q``, ``k``, ``v`` and the merged-head
output. The graph layout is described in ``docs/attention.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.capture import LossFn, Recorder, capture, check_finite
from gradgraph.convert.mlp import ACTIVATION_MODULES
from gradgraph.convert.registry import _register_builtin, register_converter
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, EdgeKind, GradGraph, NodeKind

__all__ = [
    "ATTENTION_MODULES",
    "EncoderLayerParts",
    "TransformerStructure",
    "convert_attention",
    "self_attention",
    "transformer_structure",
]

#: Module types the attention converter is built around (the "core" of a model).
ATTENTION_MODULES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
)
_ACTIVATION_FUNCTIONS: dict[Any, ActivationKind] = {
    F.relu: ActivationKind.RELU,
    torch.relu: ActivationKind.RELU,
    F.gelu: ActivationKind.GELU,
}
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_INPUT_KEY = "model:input"
_SUPPORTED_CHAIN = "the attention converter supports [nn.Linear] -> attention module -> [nn.Linear] chains"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------- structure
@dataclass(frozen=True)
class EncoderLayerParts:
    """One ``nn.TransformerEncoderLayer`` of a model.

    Attributes:
        path: module path of the layer inside the model.
        layer: the layer.
        activation: the elementwise activation of its feed-forward block.
    """

    path: str
    layer: nn.TransformerEncoderLayer
    activation: ActivationKind

    def sub(self, name: str) -> str:
        """Module path of the layer's submodule ``name`` (e.g. ``'norm1'``)."""
        return _join(self.path, name)


@dataclass(frozen=True)
class TransformerStructure:
    """What :func:`transformer_structure` found in a model.

    Attributes:
        core_path: module path of the attention module (``""`` if it is the model).
        core: that ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` or
            ``nn.TransformerEncoder``.
        attentions: ``[(path, nn.MultiheadAttention)]`` in forward order.
        layers: the encoder layers in forward order (empty for a bare attention module).
        final_norm: ``(path, nn.LayerNorm)`` of an encoder's final norm, or ``None``.
        linears: ``[(path, nn.Linear)]`` outside the core (input projection / head; which
            is which is read from the forward pass at conversion time).
        batch_first: layout of the inputs, ``[b, T, d]`` if ``True`` else ``[T, b, d]``.
        embed_dim: width ``d`` of the residual stream.
    """

    core_path: str
    core: nn.Module
    attentions: list[tuple[str, nn.MultiheadAttention]]
    layers: list[EncoderLayerParts]
    final_norm: tuple[str, nn.LayerNorm] | None
    linears: list[tuple[str, nn.Linear]] = field(default_factory=list)
    batch_first: bool = False
    embed_dim: int = 0


def _contains_attention(model: nn.Module) -> bool:
    return any(isinstance(module, ATTENTION_MODULES) for module in model.modules())


def _check_stock(path: str, module: nn.Module, base: type[nn.Module], methods: tuple[str, ...]) -> None:
    for method in methods:
        if getattr(type(module), method) is not getattr(base, method):
            raise UnsupportedModuleError(
                path,
                type(module).__name__,
                f"overrides {base.__name__}.{method}; only the stock computation is modelled",
            )


def _check_dropout(path: str, module: nn.Module, p: float) -> None:
    if module.training and p > 0:
        raise UnsupportedModuleError(
            path,
            type(module).__name__,
            f"active dropout (p={p}) makes the function random; call model.eval() or build it with dropout=0",
        )


def _check_attention(path: str, attention: nn.MultiheadAttention) -> None:
    name = type(attention).__name__
    _check_stock(path, attention, nn.MultiheadAttention, ("forward",))
    if not attention._qkv_same_embed_dim:
        raise UnsupportedModuleError(
            path,
            name,
            f"kdim={attention.kdim} / vdim={attention.vdim} differ from embed_dim={attention.embed_dim}; separate "
            "query/key/value projections (cross-attention) are not supported",
        )
    if attention.bias_k is not None:
        raise UnsupportedModuleError(path, name, "add_bias_kv=True (learned extra key/value tokens) is not supported")
    if attention.add_zero_attn:
        raise UnsupportedModuleError(path, name, "add_zero_attn=True is not supported")
    _check_dropout(path, attention, attention.dropout)


def _check_layer(path: str, layer: nn.TransformerEncoderLayer) -> EncoderLayerParts:
    _check_stock(path, layer, nn.TransformerEncoderLayer, ("forward", "_sa_block", "_ff_block"))
    _check_attention(_join(path, "self_attn"), layer.self_attn)
    for name in ("dropout", "dropout1", "dropout2"):
        dropout = getattr(layer, name)
        _check_dropout(_join(path, name), dropout, dropout.p)
    for name in ("norm1", "norm2"):
        norm = getattr(layer, name)
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (layer.self_attn.embed_dim,):
            raise UnsupportedModuleError(_join(path, name), type(norm).__name__, "expected a LayerNorm over embed_dim")
    for name in ("linear1", "linear2"):
        if not isinstance(getattr(layer, name), nn.Linear):
            raise UnsupportedModuleError(_join(path, name), type(getattr(layer, name)).__name__, "expected nn.Linear")
    activation = layer.activation
    if isinstance(activation, nn.Module):
        kind = next((k for cls, k in ACTIVATION_MODULES.items() if type(activation) is cls), None)
        where, what = _join(path, "activation"), type(activation).__name__
    else:
        kind = _ACTIVATION_FUNCTIONS.get(activation)
        where, what = _join(path, "activation"), getattr(activation, "__name__", repr(activation))
    if kind is None:
        raise UnsupportedModuleError(where, what, "no elementwise activation rule for it (use relu, gelu or a module "
                                                  "of gradgraph.convert.mlp.ACTIVATION_MODULES)")
    return EncoderLayerParts(path, layer, kind)


def transformer_structure(model: nn.Module) -> TransformerStructure:
    """Find and check the attention module of ``model`` and the ``nn.Linear`` around it.

    Args:
        model: an ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
            ``nn.TransformerEncoder``, or a wrapper holding exactly one of them plus at
            most two ``nn.Linear`` (input projection, output head).

    Returns:
        The :class:`TransformerStructure`.

    Raises:
        UnsupportedModuleError: naming the module path and type of the first part the
            attention converter does not handle (no or several attention modules, a
            subclass with its own forward, kdim/vdim, active dropout, unknown activation,
            a wrapper module with parameters that is not ``nn.Linear``, ...).
    """
    cores = [(path, module) for path, module in model.named_modules() if isinstance(module, ATTENTION_MODULES)]
    outermost = [
        (path, module)
        for path, module in cores
        if not any(other != path and (other == "" or path.startswith(other + ".")) for other, _ in cores)
    ]
    if not outermost:
        raise UnsupportedModuleError("", type(model).__name__, "contains no nn.MultiheadAttention / Transformer module")
    if len(outermost) > 1:
        path, module = outermost[1]
        raise UnsupportedModuleError(
            path,
            type(module).__name__,
            f"a second attention module besides '{outermost[0][0]}'; one attention module, encoder layer or "
            "encoder stack per model is supported",
        )
    core_path, core = outermost[0]
    final_norm = None
    if isinstance(core, nn.MultiheadAttention):
        _check_attention(core_path, core)
        layers: list[EncoderLayerParts] = []
        attentions = [(core_path, core)]
    elif isinstance(core, nn.TransformerEncoderLayer):
        layers = [_check_layer(core_path, core)]
    else:
        _check_stock(core_path, core, nn.TransformerEncoder, ("forward",))
        layers = []
        for index, layer in enumerate(core.layers):
            path = _join(core_path, f"layers.{index}")
            if not isinstance(layer, nn.TransformerEncoderLayer):
                raise UnsupportedModuleError(path, type(layer).__name__, "expected nn.TransformerEncoderLayer")
            layers.append(_check_layer(path, layer))
        if core.norm is not None:
            norm_path = _join(core_path, "norm")
            width = layers[0].layer.self_attn.embed_dim
            if not isinstance(core.norm, nn.LayerNorm) or tuple(core.norm.normalized_shape) != (width,):
                raise UnsupportedModuleError(norm_path, type(core.norm).__name__, "expected a LayerNorm over embed_dim")
            final_norm = (norm_path, core.norm)
    if layers:
        attentions = [(part.sub("self_attn"), part.layer.self_attn) for part in layers]
    first = attentions[0][1]
    for path, attention in attentions:
        if attention.batch_first != first.batch_first or attention.embed_dim != first.embed_dim:
            raise UnsupportedModuleError(path, "MultiheadAttention", "layers disagree on batch_first or embed_dim")

    linears: list[tuple[str, nn.Linear]] = []
    if list(model.parameters(recurse=False)) or list(model.buffers(recurse=False)):
        if core_path != "":
            raise UnsupportedModuleError(
                "", type(model).__name__, f"the wrapper holds parameters or buffers of its own; {_SUPPORTED_CHAIN}"
            )
    for path, module in model.named_modules() if core_path else ():
        if path == "" or path == core_path or path.startswith(core_path + "."):
            continue
        if isinstance(module, nn.Linear):
            linears.append((path, module))
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            raise UnsupportedModuleError(
                path, type(module).__name__, f"a wrapper module with parameters; {_SUPPORTED_CHAIN}"
            )
    if len(linears) > 2:
        raise UnsupportedModuleError(
            linears[2][0], "Linear", f"a third nn.Linear around '{core_path}'; {_SUPPORTED_CHAIN}"
        )
    return TransformerStructure(
        core_path=core_path,
        core=core,
        attentions=attentions,
        layers=layers,
        final_norm=final_norm,
        linears=linears,
        batch_first=bool(first.batch_first),
        embed_dim=int(first.embed_dim),
    )


# ---------------------------------------------------------------- functional pass
def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean masks mark forbidden positions (``True``); float masks are added to scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _score_mask(
    path: str, attn_mask: Tensor | None, key_padding_mask: Tensor | None, shape: tuple[int, int, int, int],
    dtype: torch.dtype,
) -> Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` as one additive mask broadcastable to ``[b, H, T, S]``."""
    batch, heads, length, source = shape
    total = None
    if attn_mask is not None:
        total = _additive_mask(attn_mask, dtype)
        if total.shape == (length, source):
            pass
        elif total.shape == (batch * heads, length, source):
            total = total.reshape(batch, heads, length, source)
        else:
            raise GradGraphError(
                f"'{path}': attn_mask must have shape [{length}, {source}] or [{batch * heads}, {length}, {source}], "
                f"got {list(attn_mask.shape)}"
            )
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, source):
            raise GradGraphError(
                f"'{path}': key_padding_mask must have shape [{batch}, {source}], got {list(key_padding_mask.shape)}"
            )
        padding = _additive_mask(key_padding_mask, dtype)[:, None, None, :]
        total = padding if total is None else total + padding
    return total


def self_attention(
    attention: nn.MultiheadAttention,
    tokens: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    recorder: Recorder | None = None,
    path: str = "",
) -> Tensor:
    r"""Self-attention of ``attention`` on ``tokens``, written out head by head.

    .. math::
        q = z W_q^\top + b_q,\; k = z W_k^\top + b_k,\; v = z W_v^\top + b_v,\qquad
        o_h = \mathrm{softmax}\big(q_h k_h^\top / \sqrt{d_h} + M\big)\, v_h,\qquad
        y = [o_1, \dots, o_H] W_o^\top + b_o

    Records (with gradients) ``'<path>:query'``, ``':key'``, ``':value'`` ``[.., d]``,
    ``':heads'`` (the merged-head output ``o``, the input of ``out_proj``) and
    ``':output'``, all in the module's layout.

    Args:
        attention: the module (``kdim == vdim == embed_dim``, no extra key/value bias).
        tokens: ``[b, T, d]`` if ``attention.batch_first`` else ``[T, b, d]``.
        attn_mask: ``[T, T]`` or ``[b * H, T, T]``, boolean (``True`` = may not attend) or
            additive.
        key_padding_mask: ``[b, T]``, boolean (``True`` = padding) or additive.
        recorder: where to record; ``None`` records nothing.
        path: module path used in the recorded names and in errors.

    Returns:
        ``[b, T, d]`` (or ``[T, b, d]``), what ``attention(tokens, tokens, tokens)[0]`` returns.
    """
    width, heads, head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
    batch_first = attention.batch_first

    def record(name: str, tensor: Tensor) -> Tensor:
        if recorder is None:
            return tensor
        return recorder.record(f"{path}:{name}", tensor, grad=True)

    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    projected = []
    for index, name in enumerate(("query", "key", "value")):
        rows = slice(index * width, (index + 1) * width)
        projected.append(record(name, F.linear(tokens, weight[rows], None if bias is None else bias[rows])))

    def split_heads(tensor: Tensor) -> Tensor:  # -> [b, H, T, d_h]
        tensor = tensor if batch_first else tensor.transpose(0, 1)
        return tensor.reshape(tensor.shape[0], tensor.shape[1], heads, head_dim).transpose(1, 2)

    query, key, value = (split_heads(tensor) for tensor in projected)
    scores = query @ key.transpose(-2, -1) * head_dim**-0.5
    mask = _score_mask(path, attn_mask, key_padding_mask, tuple(scores.shape), scores.dtype)
    if mask is not None:
        scores = scores + mask
    mixed = torch.softmax(scores, dim=-1) @ value  # [b, H, T, d_h]
    merged = mixed.transpose(1, 2).reshape(mixed.shape[0], mixed.shape[2], width)
    merged = record("heads", merged if batch_first else merged.transpose(0, 1))
    return record("output", F.linear(merged, attention.out_proj.weight, attention.out_proj.bias))


def _first_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    parameters = list(inspect.signature(type(module).forward).parameters)
    return kwargs.get(parameters[1]) if len(parameters) > 1 else None


class _ForwardRun:
    """``forward(inputs, recorder)`` for :func:`capture`: the model's own forward, with hooks.

    Hooks record what the graph needs, replace every attention module's output by
    :func:`self_attention` (which records q/k/v and the merged heads), and check that the
    modules around the attention module form an unbroken chain: each one's input is the
    previous one's output, unchanged, and the model returns the last one's output.
    """

    def __init__(
        self, model: nn.Module, structure: TransformerStructure, forward_kwargs: Mapping[str, Any]
    ) -> None:
        self.model = model
        self.structure = structure
        self.forward_kwargs = dict(forward_kwargs)
        self.chain: list[str] = []  # outer Linears and the core, in call order
        self._expected: tuple[Tensor, int, str] | None = None

    # chain checks --------------------------------------------------------------
    def _check_input(self, path: str, module: nn.Module, value: Any) -> None:
        tensor, version, origin = self._expected
        if value is not tensor or tensor._version != version:
            raise UnsupportedModuleError(
                path,
                type(module).__name__,
                f"its input is not {origin}, unchanged: the model computes something in between; {_SUPPORTED_CHAIN}",
            )

    def _chain_pre_hook(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            is_core = path == self.structure.core_path
            if not is_core and not isinstance(module, nn.Linear):
                raise UnsupportedModuleError(path, type(module).__name__, f"called in the forward; {_SUPPORTED_CHAIN}")
            if path in self.chain:
                raise UnsupportedModuleError(path, type(module).__name__, "called more than once (shared weights)")
            self._check_input(path, module, _first_input(module, args, kwargs))
            self.chain.append(path)

        return hook

    def _chain_hook(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            tensor = output[0] if isinstance(module, nn.MultiheadAttention) else output
            self._expected = (tensor, tensor._version, f"the output of '{path}'")

        return hook

    # recording -----------------------------------------------------------------
    def _attention_hook(self, path: str, recorder: Recorder):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
            bound.apply_defaults()
            call = bound.arguments
            if call["key"] is not call["query"] or call["value"] is not call["query"]:
                raise UnsupportedModuleError(
                    path, type(module).__name__, "called with key/value other than the query (cross-attention)"
                )
            if call["query"].dim() != 3:
                raise GradGraphError(f"'{path}': expected batched [.., .., d] tokens, got {list(call['query'].shape)}")
            replaced = self_attention(
                module,
                call["query"],
                attn_mask=call["attn_mask"],
                key_padding_mask=call["key_padding_mask"],
                recorder=recorder,
                path=path,
            )
            return (replaced, output[1])

        return hook

    def _record_hook(self, path: str, recorder: Recorder):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            recorder.record(f"{path}:input", args[0], grad=True)
            recorder.record(f"{path}:output", output, grad=True)

        return hook

    def __call__(self, inputs: Tensor, recorder: Recorder) -> Tensor:
        structure, model = self.structure, self.model
        modules = dict(model.named_modules())
        core = structure.core_path
        inside_core = [path for path in modules if path == core or (core == "" or path.startswith(core + "."))]
        handles = []
        try:
            for path, _ in structure.attentions:
                handles.append(
                    modules[path].register_forward_hook(self._attention_hook(path, recorder), with_kwargs=True)
                )
            recorded = [part.path for part in structure.layers]
            for part in structure.layers:
                recorded += [part.sub(name) for name in ("norm1", "norm2", "linear1", "linear2")]
            if structure.final_norm is not None:
                recorded.append(structure.final_norm[0])
            recorded += [path for path, _ in structure.linears]
            for path in recorded:
                handles.append(modules[path].register_forward_hook(self._record_hook(path, recorder)))
            # The chain: the core, the outer Linears, and any other leaf module outside the core
            # (which is then rejected when called).
            chain = [core] + [
                path for path, module in modules.items()
                if path not in inside_core and path != "" and not list(module.children())
            ]
            for path in chain:
                handles.append(modules[path].register_forward_pre_hook(self._chain_pre_hook(path), with_kwargs=True))
                handles.append(modules[path].register_forward_hook(self._chain_hook(path), with_kwargs=True))

            tokens = inputs if structure.batch_first else inputs.transpose(0, 1)
            recorder.record(_INPUT_KEY, tokens, grad=True)
            self._expected = (tokens, tokens._version, "the model input")
            if core == "" and isinstance(model, nn.MultiheadAttention):
                output = model(tokens, tokens, tokens, **self.forward_kwargs)[0]
            else:
                output = model(tokens, **self.forward_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if core not in self.chain:
            raise UnsupportedModuleError(core, type(structure.core).__name__, "never called by the model's forward")
        if output is not self._expected[0] or output._version != self._expected[1]:
            raise UnsupportedModuleError(
                "", type(model).__name__,
                f"the model's output is not {self._expected[2]}, unchanged; {_SUPPORTED_CHAIN}",
            )
        return output


# ------------------------------------------------------------------- graph layout
@dataclass
class _NodeSet:
    """Consecutive nodes holding one recorded tensor's last dimension."""

    offset: int
    size: int
    name: str
    value_key: str
    grad_key: str
    normalised_by: tuple[str, float] | None = None  # (recorded LayerNorm input, eps)
    read_as_value: bool = False

    @property
    def nodes(self) -> Tensor:
        return torch.arange(self.offset, self.offset + self.size)


class _GraphBuilder:
    """Accumulates nodes, edges and the parameter maps of one GradGraph."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self.param_of = {id(param): name for name, param in model.named_parameters()}
        self.param_names: list[str] = []
        self.param_shapes: list[list[int]] = []
        self.sets: list[_NodeSet] = []
        self.node_fields: dict[str, list[Tensor]] = {
            key: [] for key in (
                "kind", "layer", "activation", "perm_group", "perm_block", "perm_tie", "position", "bias",
                "node_param", "node_param_pos",
            )
        }
        edge_keys = ("src", "dst", "kind", "weight", "param", "pos")
        self.edge_fields: dict[str, list[Tensor]] = {key: [] for key in edge_keys}
        self.num_nodes = 0
        self.num_groups = 0

    def param_index(self, param: Tensor) -> int:
        name = self.param_of[id(param)]
        if name not in self.param_names:
            self.param_names.append(name)
            self.param_shapes.append(list(param.shape))
        return self.param_names.index(name)

    def new_group(self) -> int:
        self.num_groups += 1
        return self.num_groups - 1

    def add_nodes(
        self,
        size: int,
        kind: NodeKind,
        layer: int,
        *,
        name: str,
        value_key: str,
        grad_key: str | None = None,
        bias: Tensor | None = None,
        bias_offset: int = 0,
        activation: ActivationKind = ActivationKind.IDENTITY,
        perm: tuple[int, Tensor, int] | None = None,
    ) -> _NodeSet:
        """``size`` nodes; ``bias[bias_offset + i]`` is node ``i``'s bias; ``perm = (group, block [size], tie)``."""
        fields = self.node_fields
        full = lambda value: torch.full((size,), int(value), dtype=torch.long)  # noqa: E731
        fields["kind"].append(full(kind))
        fields["layer"].append(full(layer))
        fields["activation"].append(full(activation))
        if perm is None:
            fields["perm_group"].append(full(-1))
            fields["perm_block"].append(full(-1))
            fields["perm_tie"].append(full(-1))
        else:
            group, block, tie = perm
            fields["perm_group"].append(full(group))
            fields["perm_block"].append(block.to(torch.long))
            fields["perm_tie"].append(full(tie))
        fields["position"].append(torch.arange(size))
        if bias is None:
            fields["bias"].append(torch.zeros(size, dtype=self.dtype))
            fields["node_param"].append(full(-1))
            fields["node_param_pos"].append(full(-1))
        else:
            # structure is assembled on the CPU and the finished graph moved to the factors' device
            fields["bias"].append(bias.detach()[bias_offset : bias_offset + size].to("cpu", self.dtype))
            fields["node_param"].append(full(self.param_index(bias)))
            fields["node_param_pos"].append(bias_offset + torch.arange(size))
        node_set = _NodeSet(self.num_nodes, size, name, value_key, grad_key or value_key)
        self.sets.append(node_set)
        self.num_nodes += size
        return node_set

    def _add_edges(self, src: Tensor, dst: Tensor, kind: EdgeKind, weight: Tensor, param: int, pos: Tensor) -> None:
        fields = self.edge_fields
        fields["src"].append(src)
        fields["dst"].append(dst)
        fields["kind"].append(torch.full((len(src),), int(kind), dtype=torch.long))
        fields["weight"].append(weight.detach().reshape(-1).to("cpu", self.dtype))
        fields["param"].append(torch.full((len(src),), param, dtype=torch.long))
        fields["pos"].append(pos)

    def dense(self, src: _NodeSet, dst: _NodeSet, weight: Tensor, kind: EdgeKind, row_offset: int = 0) -> None:
        """Edge ``src_j -> dst_k`` carries ``weight[row_offset + k, j]``; row-major order."""
        if src.normalised_by is not None:
            raise GradGraphError(f"internal: the {src.name} neurons feed a LayerNorm and a weight matrix")
        src.read_as_value = True
        rows = torch.arange(dst.size).repeat_interleave(src.size)
        cols = torch.arange(src.size).repeat(dst.size)
        block = weight[row_offset : row_offset + dst.size]
        self._add_edges(src.offset + cols, dst.offset + rows, kind, block, self.param_index(weight),
                        (row_offset + rows) * src.size + cols)

    def one_to_one(self, src: _NodeSet, dst: _NodeSet, kind: EdgeKind, scale: Tensor | None = None) -> None:
        """Edge ``src_i -> dst_i`` for every ``i``; weight ``scale[i]``, or a structural 1."""
        index = torch.arange(src.size)
        if scale is None:
            self._add_edges(src.offset + index, dst.offset + index, kind, torch.ones(src.size), -1,
                            torch.full((src.size,), -1))
        else:
            self._add_edges(src.offset + index, dst.offset + index, kind, scale, self.param_index(scale), index)

    def within_heads(self, src: _NodeSet, dst: _NodeSet, kind: EdgeKind, head_dim: int) -> None:
        """Structural edges ``src_{h,i} -> dst_{h,j}`` for every head ``h`` and dims ``i, j``."""
        heads = src.size // head_dim
        head = torch.arange(heads).repeat_interleave(head_dim * head_dim)
        i = torch.arange(head_dim).repeat_interleave(head_dim).repeat(heads)
        j = torch.arange(head_dim).repeat(head_dim * heads)
        count = len(head)
        self._add_edges(src.offset + head * head_dim + i, dst.offset + head * head_dim + j, kind, torch.ones(count),
                        -1, torch.full((count,), -1))

    def layer_norm(self, src: _NodeSet, dst: _NodeSet, path: str, norm: nn.LayerNorm) -> None:
        """``src_j -> dst_j`` carrying ``gamma_j``; ``src`` then holds the normalised value as ``act``."""
        if src.read_as_value:
            raise GradGraphError(f"internal: the {src.name} neurons feed a weight matrix and a LayerNorm")
        src.normalised_by = (f"{path}:input", norm.eps)
        self.one_to_one(src, dst, EdgeKind.NORM_SCALE, norm.weight)

    def build(self, values: dict[str, Tensor], grads: dict[str, Tensor], batch_first: bool) -> GradGraph:
        """Assemble the graph; node factors come from the recorded ``values``/``grads``."""

        def components(tensor: Tensor) -> Tensor:  # [.., .., f] -> [f, b * T]
            tensor = tensor if batch_first else tensor.transpose(0, 1)
            return tensor.reshape(-1, tensor.shape[-1]).T

        acts, signals = [], []
        for node_set in self.sets:
            if node_set.normalised_by is not None:
                key, eps = node_set.normalised_by
                value = F.layer_norm(values[key], (node_set.size,), eps=eps)
            else:
                value = values[node_set.value_key]
            act, grad = components(value), components(grads[node_set.grad_key])
            if act.shape[0] != node_set.size:
                raise GradGraphError(f"internal: {node_set.name} has {act.shape[0]} features, expected {node_set.size}")
            check_finite(f"activation of the {node_set.name} neurons", act)
            check_finite(f"backpropagated signal of the {node_set.name} neurons", grad)
            acts.append(act)
            signals.append(grad)
        for name, param in self.model.named_parameters():
            if name not in self.param_names:
                raise UnsupportedModuleError(
                    name.rpartition(".")[0], "Parameter", f"'{name}' is not used by any modelled computation"
                )
        tokens = values[_INPUT_KEY]
        num_datapoints, num_tokens = (tokens.shape[0], tokens.shape[1]) if batch_first else (tokens.shape[1],
                                                                                              tokens.shape[0])
        node = {key: torch.cat(value) for key, value in self.node_fields.items()}
        edge = {key: torch.cat(value) for key, value in self.edge_fields.items()}
        return GradGraph(
            x=node["bias"][:, None].to(self.dtype),
            edge_index=torch.stack([edge["src"], edge["dst"]]),
            edge_attr=edge["weight"][:, None].to(self.dtype),
            act=torch.cat(acts).contiguous(),
            grad=torch.cat(signals).contiguous(),
            layer=node["layer"],
            node_kind=node["kind"],
            edge_kind=edge["kind"],
            activation=node["activation"],
            perm_group=node["perm_group"],
            perm_block=node["perm_block"],
            perm_tie=node["perm_tie"],
            position=node["position"],
            node_param=node["node_param"],
            node_param_pos=node["node_param_pos"],
            edge_param=edge["param"],
            edge_param_pos=edge["pos"],
            component_sample=torch.arange(num_datapoints).repeat_interleave(num_tokens),
            num_datapoints=num_datapoints,
            param_names=self.param_names,
            param_shapes=self.param_shapes,
        ).to(acts[0].device)


def _lay_out_attention(
    builder: _GraphBuilder, tokens: _NodeSet, path: str, attention: nn.MultiheadAttention, layer: int
) -> _NodeSet:
    """Query, key, value (layer ``layer``) and merged-head output (``layer + 1``) nodes of one block.

    Returns the merged-head output nodes; the caller connects them to ``out_proj``'s outputs.
    """
    width, head_dim = attention.embed_dim, attention.head_dim
    group = builder.new_group()
    head = torch.arange(width) // head_dim
    bias = attention.in_proj_bias
    projections = {}
    for index, (name, kind, edge_kind, tie) in enumerate(
        [("query", NodeKind.QUERY, EdgeKind.QUERY, 0), ("key", NodeKind.KEY, EdgeKind.KEY, 0),
         ("value", NodeKind.VALUE, EdgeKind.VALUE, 1)]
    ):
        projections[name] = builder.add_nodes(
            width, kind, layer, name=f"'{path}' {name}", value_key=f"{path}:{name}", bias=bias,
            bias_offset=index * width, perm=(group, head, tie),
        )
        builder.dense(tokens, projections[name], attention.in_proj_weight, edge_kind, row_offset=index * width)
    merged = builder.add_nodes(
        width, NodeKind.ATTENTION, layer + 1, name=f"'{path}' merged-head", value_key=f"{path}:heads",
        perm=(group, head, 1),
    )
    builder.one_to_one(projections["query"], projections["key"], EdgeKind.QUERY_KEY)
    builder.one_to_one(projections["value"], merged, EdgeKind.VALUE_ATTENTION)
    builder.within_heads(projections["query"], merged, EdgeKind.QUERY_ATTENTION, head_dim)
    return merged


def _lay_out_encoder_layer(builder: _GraphBuilder, stream: _NodeSet, part: EncoderLayerParts, layer: int) -> tuple[
    _NodeSet, int
]:
    """Nodes and edges of one encoder layer reading ``stream``; returns its output nodes and depth."""
    module = part.layer
    attention = module.self_attn
    width = attention.embed_dim
    norm1, norm2, linear1, linear2 = (part.sub(name) for name in ("norm1", "norm2", "linear1", "linear2"))
    linear1_module, linear2_module = module.linear1, module.linear2

    def feed_forward(source: _NodeSet, depth: int) -> _NodeSet:
        hidden = builder.add_nodes(
            linear1_module.out_features, NodeKind.FFN_HIDDEN, depth, name=f"'{part.path}' feed-forward hidden",
            value_key=f"{linear2}:input", grad_key=f"{linear1}:output", bias=linear1_module.bias,
            activation=part.activation,
            perm=(builder.new_group(), torch.zeros(linear1_module.out_features), 0),
        )
        builder.dense(source, hidden, linear1_module.weight, EdgeKind.FFN_IN)
        return hidden

    if module.norm_first:
        normed = builder.add_nodes(width, NodeKind.NORM, layer + 1, name=f"'{norm1}' output",
                                   value_key=f"{norm1}:output", bias=module.norm1.bias)
        builder.layer_norm(stream, normed, norm1, module.norm1)
        merged = _lay_out_attention(builder, normed, part.sub("self_attn"), attention, layer + 2)
        after_attention = builder.add_nodes(width, NodeKind.RESIDUAL, layer + 4, name=f"'{part.path}' residual",
                                            value_key=f"{norm2}:input", bias=attention.out_proj.bias)
        builder.dense(merged, after_attention, attention.out_proj.weight, EdgeKind.ATTENTION_OUT)
        builder.one_to_one(stream, after_attention, EdgeKind.RESIDUAL)
        normed2 = builder.add_nodes(width, NodeKind.NORM, layer + 5, name=f"'{norm2}' output",
                                    value_key=f"{norm2}:output", bias=module.norm2.bias)
        builder.layer_norm(after_attention, normed2, norm2, module.norm2)
        hidden = feed_forward(normed2, layer + 6)
        output = builder.add_nodes(width, NodeKind.RESIDUAL, layer + 7, name=f"'{part.path}' output",
                                   value_key=f"{part.path}:output", bias=linear2_module.bias)
        builder.dense(hidden, output, linear2_module.weight, EdgeKind.FFN_OUT)
        builder.one_to_one(after_attention, output, EdgeKind.RESIDUAL)
        return output, layer + 7
    merged = _lay_out_attention(builder, stream, part.sub("self_attn"), attention, layer + 1)
    summed = builder.add_nodes(width, NodeKind.RESIDUAL, layer + 3, name=f"'{norm1}' input",
                               value_key=f"{norm1}:input", bias=attention.out_proj.bias)
    builder.dense(merged, summed, attention.out_proj.weight, EdgeKind.ATTENTION_OUT)
    builder.one_to_one(stream, summed, EdgeKind.RESIDUAL)
    normed = builder.add_nodes(width, NodeKind.NORM, layer + 4, name=f"'{norm1}' output",
                               value_key=f"{norm1}:output", bias=module.norm1.bias)
    builder.layer_norm(summed, normed, norm1, module.norm1)
    hidden = feed_forward(normed, layer + 5)
    summed2 = builder.add_nodes(width, NodeKind.RESIDUAL, layer + 6, name=f"'{norm2}' input",
                                value_key=f"{norm2}:input", bias=linear2_module.bias)
    builder.dense(hidden, summed2, linear2_module.weight, EdgeKind.FFN_OUT)
    builder.one_to_one(normed, summed2, EdgeKind.RESIDUAL)
    output = builder.add_nodes(width, NodeKind.NORM, layer + 7, name=f"'{norm2}' output",
                               value_key=f"{norm2}:output", bias=module.norm2.bias)
    builder.layer_norm(summed2, output, norm2, module.norm2)
    return output, layer + 7


def _lay_out(builder: _GraphBuilder, model: nn.Module, structure: TransformerStructure, chain: list[str],
             input_width: int) -> None:
    modules = dict(model.named_modules())
    core_at = chain.index(structure.core_path)
    before, after = chain[:core_at], chain[core_at + 1 :]
    for extra in (before[1:], after[1:]):
        if extra:
            raise UnsupportedModuleError(extra[0], "Linear", f"a second nn.Linear on one side of the attention "
                                                             f"module; {_SUPPORTED_CHAIN}")
    stream = builder.add_nodes(input_width, NodeKind.INPUT, 0, name="input", value_key=_INPUT_KEY)
    depth = 0
    if before:
        projection = modules[before[0]]
        depth += 1
        projected = builder.add_nodes(projection.out_features, NodeKind.RESIDUAL, depth,
                                      name=f"'{before[0]}' output", value_key=f"{before[0]}:output",
                                      bias=projection.bias)
        builder.dense(stream, projected, projection.weight, EdgeKind.LINEAR)
        stream = projected
    if not structure.layers:
        path, attention = structure.attentions[0]
        merged = _lay_out_attention(builder, stream, path, attention, depth + 1)
        depth += 3
        output = builder.add_nodes(attention.embed_dim, NodeKind.RESIDUAL, depth, name=f"'{path}' output",
                                   value_key=f"{path}:output", bias=attention.out_proj.bias)
        builder.dense(merged, output, attention.out_proj.weight, EdgeKind.ATTENTION_OUT)
        stream = output
    for part in structure.layers:
        stream, depth = _lay_out_encoder_layer(builder, stream, part, depth)
    if structure.final_norm is not None:
        path, norm = structure.final_norm
        depth += 1
        normed = builder.add_nodes(structure.embed_dim, NodeKind.NORM, depth, name=f"'{path}' output",
                                   value_key=f"{path}:output", bias=norm.bias)
        builder.layer_norm(stream, normed, path, norm)
        stream = normed
    if after:
        head = modules[after[0]]
        depth += 1
        output = builder.add_nodes(head.out_features, NodeKind.OUTPUT, depth, name=f"'{after[0]}' output",
                                   value_key=f"{after[0]}:output", bias=head.bias)
        builder.dense(stream, output, head.weight, EdgeKind.LINEAR)
        stream = output
    # The model's output neurons are OUTPUT whatever produced them (like an MLP's).
    builder.node_fields["kind"][-1] = torch.full((stream.size,), int(NodeKind.OUTPUT), dtype=torch.long)


# ---------------------------------------------------------------------- converter
def convert_attention(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> GradGraph:
    """Convert an attention model and a batch of token sequences into a GradGraph, ``B = b * T``.

    Args:
        model: see the module docstring for the supported models.
        inputs: ``[b, T, d_in]`` if the attention module is ``batch_first``, else ``[T, b, d_in]``.
        targets: passed to ``loss_fn``.
        loss_fn: ``loss_fn(output, targets) -> [b]``, reducing tokens and features.
        forward_kwargs: keyword arguments of the model's forward (masks).

    Returns:
        The :class:`~gradgraph.GradGraph`; ``component_sample [b * T]`` maps each token
        component to its datapoint. Layout: ``docs/attention.md``.

    Raises:
        UnsupportedModuleError: a part of the model the converter does not handle, named by path.
        GradGraphError: bad input shapes or dtypes, bad masks, a bad loss, non-finite factors.
    """
    structure = transformer_structure(model)
    where = structure.core_path or type(model).__name__
    layout = "[b, T, d]" if structure.batch_first else "[T, b, d]"
    if inputs.dim() != 3:
        raise GradGraphError(
            f"inputs must be token sequences of shape {layout} for '{where}' (batch_first={structure.batch_first}), "
            f"got {list(inputs.shape)}"
        )
    widths = {structure.embed_dim} | {linear.in_features for _, linear in structure.linears}
    if inputs.shape[-1] not in widths:
        expected = " or ".join(str(width) for width in sorted(widths))
        raise GradGraphError(
            f"inputs must have {expected} features (embed_dim of '{where}' or an input projection's "
            f"in_features), got shape {list(inputs.shape)}"
        )
    dtype = structure.attentions[0][1].in_proj_weight.dtype
    if inputs.dtype != dtype:
        raise GradGraphError(f"inputs have dtype {inputs.dtype} but '{structure.attentions[0][0]}' has {dtype}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise GradGraphError(f"inputs hold no datapoint or no token (shape {list(inputs.shape)})")

    run = _ForwardRun(model, structure, forward_kwargs or {})
    datapoints_first = inputs if structure.batch_first else inputs.transpose(0, 1)
    recorded = capture(model, datapoints_first, targets=targets, loss_fn=loss_fn, forward=run)
    builder = _GraphBuilder(model, dtype)
    _lay_out(builder, model, structure, run.chain, int(inputs.shape[-1]))
    return builder.build(recorded.values, recorded.grads, structure.batch_first)


_register_builtin(_contains_attention, convert_attention, name="attention")
