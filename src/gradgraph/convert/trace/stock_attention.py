"""What the trace runs for ``nn.MultiheadAttention``: checks of the module and its functional form.

``nn.MultiheadAttention`` calls one fused kernel on its packed ``in_proj_weight``, so the trace
(:mod:`gradgraph.convert.trace.run`) runs :func:`self_attention` in its place: the same
computation written with ``F.linear`` on row slices, head splits, ``q @ kᵀ``, masks,
``softmax`` and ``@ v``, which the trace follows op by op. :func:`check_attention` refuses the
settings this form does not compute (``kdim`` / ``vdim`` other than ``embed_dim``,
``add_bias_kv``, ``add_zero_attn``, a subclass's own ``forward``, active dropout); the
structure reader :mod:`gradgraph.convert.attention` uses the same checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.errors import GradGraphError, UnsupportedModuleError

__all__ = ["check_attention", "check_dropout", "check_stock", "self_attention"]


def check_stock(path: str, module: nn.Module, base: type[nn.Module], methods: tuple[str, ...]) -> None:
    """Refuse a subclass of ``base`` that overrides one of ``methods`` (only the stock computation is modelled)."""
    for method in methods:
        if getattr(type(module), method) is not getattr(base, method):
            raise UnsupportedModuleError(
                path,
                type(module).__name__,
                f"overrides {base.__name__}.{method}; only the stock computation is modelled",
            )


def check_dropout(path: str, module: nn.Module, p: float) -> None:
    """Refuse active dropout (``p > 0`` in training mode) of the module at ``path``."""
    if module.training and p > 0:
        raise UnsupportedModuleError(
            path,
            type(module).__name__,
            f"active dropout (p={p}) makes the function random; call model.eval() or build it with dropout=0",
        )


def check_attention(path: str, attention: nn.MultiheadAttention) -> None:
    """Refuse an ``nn.MultiheadAttention`` (at module ``path``) whose computation :func:`self_attention` is not."""
    name = type(attention).__name__
    check_stock(path, attention, nn.MultiheadAttention, ("forward",))
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
    check_dropout(path, attention, attention.dropout)


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
    probabilities: list[Tensor] | None = None,
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
        probabilities: a list the attention probabilities ``[b, H, T, T]`` are appended to (for the
            weights ``need_weights=True`` asks for), or ``None``.

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
    weights = torch.softmax(scores, dim=-1)
    if probabilities is not None:
        probabilities.append(weights)
    mixed = weights @ value  # [b, H, T, d_h]
    merged = mixed.transpose(1, 2).reshape(mixed.shape[0], mixed.shape[2], width)
    merged = merged if batch_first else merged.transpose(0, 1)
    return F.linear(merged, attention.out_proj.weight, attention.out_proj.bias)
