"""Stock torch attention modules: what they are made of, and the functional form the trace follows.

``nn.MultiheadAttention`` calls one fused kernel on its packed ``in_proj_weight``, so the
traced converter (:mod:`gradgraph.convert.trace`) runs :func:`self_attention` in its place:
the same computation written with ``F.linear`` on row slices, head splits, ``q @ kᵀ``,
masks, ``softmax`` and ``@ v``, which the trace follows op by op. Every stock module —
``nn.MultiheadAttention`` as self-attention (``batch_first`` either way, with or without
bias), ``nn.TransformerEncoderLayer`` (``norm_first`` either way) and
``nn.TransformerEncoder`` stacks, alone or inside any model — is converted that way: one
converter, whose layout for the stock modules is the one ``docs/attention.md`` describes.

:func:`transformer_structure` recognises the stock chain ``[nn.Linear] -> attention module ->
[nn.Linear]``; :mod:`gradgraph.symmetry.attention` uses it to act on such models by module
(heads, per-head dims, feed-forward neurons), and :func:`convert_attention` converts only such
models (the traced converter, with the stock chain's input checks).

Components: ``B = b * T``, component ``i * T + t`` is token ``t`` of datapoint ``i``; the
input is ``[b, T, d_in]`` when the attention modules are ``batch_first``, else ``[T, b, d_in]``.
Dropout must be inactive (``model.eval()`` or ``p = 0``). ``kdim``/``vdim`` other than
``embed_dim``, ``add_bias_kv`` and ``add_zero_attn`` are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.capture import LossFn
from gradgraph.convert.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, GradGraph

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
        kind = ACTIVATION_FUNCTIONS.get(activation)
        where, what = _join(path, "activation"), getattr(activation, "__name__", repr(activation))
    if kind is None:
        raise UnsupportedModuleError(where, what, "no elementwise activation rule for it (use relu, gelu or a module "
                                                  "of gradgraph.convert.activations.ACTIVATION_MODULES)")
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
    path: str = "",
) -> Tensor:
    r"""Self-attention of ``attention`` on ``tokens``, written out head by head.

    .. math::
        q = z W_q^\top + b_q,\; k = z W_k^\top + b_k,\; v = z W_v^\top + b_v,\qquad
        o_h = \mathrm{softmax}\big(q_h k_h^\top / \sqrt{d_h} + M\big)\, v_h,\qquad
        y = [o_1, \dots, o_H] W_o^\top + b_o

    The traced converter runs this in place of the module's fused kernel, so it sees the
    query, key and value projections, the heads and the merged-head output ``o`` (the input
    of ``out_proj``) as separate ops.

    Args:
        attention: the module (``kdim == vdim == embed_dim``, no extra key/value bias).
        tokens: ``[b, T, d]`` if ``attention.batch_first`` else ``[T, b, d]``.
        attn_mask: ``[T, T]`` or ``[b * H, T, T]``, boolean (``True`` = may not attend) or
            additive.
        key_padding_mask: ``[b, T]``, boolean (``True`` = padding) or additive.
        path: module path used in errors.

    Returns:
        ``[b, T, d]`` (or ``[T, b, d]``), what ``attention(tokens, tokens, tokens)[0]`` returns.
    """
    width, heads, head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
    batch_first = attention.batch_first

    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    projected = []
    for index in range(3):  # query, key, value rows of the packed projection
        rows = slice(index * width, (index + 1) * width)
        projected.append(F.linear(tokens, weight[rows], None if bias is None else bias[rows]))

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
    merged = merged if batch_first else merged.transpose(0, 1)
    return F.linear(merged, attention.out_proj.weight, attention.out_proj.bias)


def convert_attention(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> GradGraph:
    """Convert a stock attention model (see the module docstring) with the traced converter, ``B = b * T``.

    :func:`gradgraph.to_graph` converts these models (and any other) the same way; this entry
    point accepts only models :func:`transformer_structure` recognises and checks the input's
    layout, width and dtype against them first.

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

    from gradgraph.convert.traced import convert_traced  # the traced converter imports this module

    return convert_traced(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
                          datapoint_dim=0 if structure.batch_first else 1)
