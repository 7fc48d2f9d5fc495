"""`Linear`: PyG's ``Linear`` with a faster product for narrow outputs on the CPU.

GradMetaNet applies small maps (``C -> C'`` with ``C'`` of 8 or fewer in the learned
optimizer's meta-model) to per-component states of ``N·B`` rows (10,496 for the MNIST-1D
MLP at batch 128). On the CPU, torch's ``F.linear`` (``x Wᵀ``, a ``[rows, in] @ [in, out]``
BLAS product) is several times slower for such narrow outputs than the same product taken
the other way round, ``(W xᵀ)ᵀ`` (``[out, in] @ [in, rows]``, the result read through a
transposed view): measured with torch 2.13 (CPU wheel, one thread) on a 2-core AMD EPYC,
10,496 rows, float32: ``8 -> 8`` 199 µs vs 35 µs, ``64 -> 8`` 802 µs vs 191 µs, while for
16 or more outputs the two tie or ``F.linear`` wins (``benchmarks/linear.py`` prints the
ratios side by side, so a reader can check them on their own machine). :func:`linear` takes
the faster form where the measurements say it is faster and ``F.linear`` everywhere else;
both compute the same sums of the same products (equal up to floating-point rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import Linear as PyGLinear

__all__ = ["Linear", "batched_linear", "linear", "prefers_transposed"]

#: outputs of at most this many channels take the transposed product on the CPU (measured above)
NARROW_OUT_CHANNELS = 8
#: ... when the input has at least this many rows (below it both forms take a few µs)
MIN_ROWS = 1024


def prefers_transposed(rows: int, out_channels: int, device: torch.device) -> bool:
    """Whether ``(W xᵀ)ᵀ`` is the faster form of ``x Wᵀ`` for ``rows`` rows and ``out_channels``
    outputs on ``device`` (the CPU, narrow outputs, many rows; module docstring)."""
    return device.type == "cpu" and out_channels <= NARROW_OUT_CHANNELS and rows >= MIN_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r""":math:`x W^\top + b` as ``F.linear``, taking the faster product for narrow outputs (module docstring).

    Args:
        x: ``[*, in]``.
        weight: ``[out, in]``.
        bias: ``[out]`` or ``None``.

    Returns:
        ``[*, out]`` (for the transposed product, a view with the rows as its last-moving axis).
    """
    in_channels = x.shape[-1]
    rows = x.numel() // in_channels if in_channels else 0
    if x.dim() < 2 or not prefers_transposed(rows, weight.shape[0], x.device):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, in_channels).t()
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r""":math:`x_g W_g^\top + b_g` for every ``g`` of a stack: one batched product.

    Args:
        x: ``[G, rows, in]``.
        weight: ``[G, out, in]``.
        bias: ``[G, out]`` or ``None``.

    Returns:
        ``[G, rows, out]``.
    """
    if prefers_transposed(x.shape[1], weight.shape[1], x.device):
        transposed = x.transpose(1, 2)
        out = torch.bmm(weight, transposed) if bias is None else torch.baddbmm(bias[:, :, None], weight, transposed)
        return out.transpose(1, 2)
    # a contiguous [G, in, out]: bmm with a transposed view of [G, out, in] took 2-3x as long
    columns = weight.transpose(1, 2).contiguous()
    return torch.bmm(x, columns) if bias is None else torch.baddbmm(bias[:, None, :], x, columns)


class Linear(PyGLinear):
    r"""PyG's :class:`torch_geometric.nn.Linear`, :math:`x' = x W^\top + b`, computed by :func:`linear`.

    The same parameters, initialisations, lazy ``in_channels=-1`` and state-dict keys as PyG's;
    only the product is chosen for speed (module docstring).

    Shapes:
        - **input:** ``[*, in_channels]``
        - **output:** ``[*, out_channels]``
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply the map to ``x [*, in_channels]``."""
        return linear(x, self.weight, self.bias)
