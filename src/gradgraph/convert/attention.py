"""Stock torch attention models, read by module: which attention module, layers and ``Linear`` s.

:func:`transformer_structure` recognises the stock chain ``[nn.Linear] -> attention module ->
[nn.Linear]`` (``nn.MultiheadAttention`` as self-attention, ``nn.TransformerEncoderLayer``,
``nn.TransformerEncoder``); :mod:`gradgraph.symmetry.attention` uses it to act on such models
by module (heads, per-head dims, feed-forward neurons).

Conversion does not need it: every stock module, alone or inside any model, is traced like any
other code, the trace running :func:`gradgraph.convert.trace.stock_attention.self_attention`
for each ``nn.MultiheadAttention``; the layout is the one ``docs/attention.md`` describes.
Components: ``B = b * T``, component ``i * T + t`` is token ``t`` of datapoint ``i``; the
input is ``[b, T, d_in]`` when the attention modules are ``batch_first``, else ``[T, b, d_in]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gradgraph.convert.activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES
from gradgraph.convert.trace.stock_attention import check_attention, check_dropout, check_stock, self_attention
from gradgraph.errors import UnsupportedModuleError
from gradgraph.graph import ActivationKind

__all__ = [
    "ATTENTION_MODULES",
    "EncoderLayerParts",
    "TransformerStructure",
    "self_attention",  # where it was before it moved to the trace (gradgraph.convert.trace.stock_attention)
    "transformer_structure",
]

#: Module types the structure reader is built around (the "core" of a model).
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


def _check_layer(path: str, layer: nn.TransformerEncoderLayer) -> EncoderLayerParts:
    check_stock(path, layer, nn.TransformerEncoderLayer, ("forward", "_sa_block", "_ff_block"))
    check_attention(_join(path, "self_attn"), layer.self_attn)
    for name in ("dropout", "dropout1", "dropout2"):
        dropout = getattr(layer, name)
        check_dropout(_join(path, name), dropout, dropout.p)
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
        check_attention(core_path, core)
        layers: list[EncoderLayerParts] = []
        attentions = [(core_path, core)]
    elif isinstance(core, nn.TransformerEncoderLayer):
        layers = [_check_layer(core_path, core)]
    else:
        check_stock(core_path, core, nn.TransformerEncoder, ("forward",))
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
