"""Per-parameter and per-component inputs of the learned optimizer.

Two kinds of inputs, both computed for ``P`` inner runs ("particles") at once, every
tensor carrying that leading ``P`` axis:

* **per-parameter features** (the paper's 19): the parameter ``θ``, its gradient ``∇``,
  six momenta of ``∇`` (EMAs with decays :data:`MOMENTUM_DECAYS`) and eleven time
  features ``tanh(t / s − 1)`` (``s`` log-spaced from 1 to 1e5). ``θ``, ``∇`` and the
  momenta are clipped to ``[−1, 1]`` and then divided by their root mean square over the
  tensor (per particle, per channel), so a feature's scale never depends on the tensor's
  size or on the task's loss scale.
* **per-component factor channels** for GradMetaNet: the batch's rank-1 factors
  ``(act, grad)`` and EMAs of them over steps (decays :data:`FACTOR_DECAYS`), each
  normalised by its root mean square over a layer's neurons and the components, so the
  channels of every layer are O(1). The EMAs are indexed by position in the batch, as in
  the authors' prototype (each step brings new datapoints; the EMA carries a summary of
  recent factor statistics per batch slot).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FACTOR_DECAYS",
    "MOMENTUM_DECAYS",
    "NUM_PARAMETER_FEATURES",
    "SECOND_MOMENT_DECAY",
    "TIME_SCALES",
    "flat_parameter_features",
    "normalize_factors",
    "parameter_features",
    "segment_rms_normalize",
    "time_features",
    "update_emas",
]

#: decays of the six gradient momenta that are features of every parameter.
MOMENTUM_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
#: scales ``s`` of the eleven time features ``tanh(t / s - 1)``.
TIME_SCALES: tuple[float, ...] = tuple(float(10 ** (k / 2)) for k in range(11))
#: decays of the EMAs of the per-component factors GradMetaNet reads (6, as the paper).
FACTOR_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
#: decay of the squared-gradient EMA behind the optional Adam direction (not a feature).
SECOND_MOMENT_DECAY = 0.999
#: θ, ∇, 6 momenta, 11 time features.
NUM_PARAMETER_FEATURES = 2 + len(MOMENTUM_DECAYS) + len(TIME_SCALES)

_EPS = 1e-12


def update_emas(emas: Tensor, value: Tensor, decays: Tensor) -> Tensor:
    """One EMA step for several decays at once.

    ``ema_k ← d_k ema_k + (1 − d_k) value``.

    Args:
        emas: ``[..., K]`` the current EMAs.
        value: ``[...]`` the new value.
        decays: ``[K]``.

    Returns:
        ``[..., K]`` the new EMAs.
    """
    return decays * emas + (1 - decays) * value.unsqueeze(-1)


def time_features(step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[P] -> [P, 11]``: ``tanh(t / s − 1)`` for every scale ``s`` in :data:`TIME_SCALES`."""
    scales = torch.tensor(TIME_SCALES, dtype=dtype, device=step.device)
    return torch.tanh(step.to(dtype).unsqueeze(-1) / scales - 1)


def _rms_normalize(values: Tensor, reduce_dims: tuple[int, ...]) -> Tensor:
    """``values / sqrt(mean(values², reduce_dims) + eps)``."""
    return values * torch.rsqrt(values.square().mean(dim=reduce_dims, keepdim=True) + _EPS)


def parameter_features(param: Tensor, grad: Tensor, momenta: Tensor) -> Tensor:
    """The clipped, per-tensor normalised features of one parameter tensor.

    Args:
        param: ``[P, *shape]`` values (``P`` particles).
        grad: ``[P, *shape]`` mean gradient.
        momenta: ``[P, *shape, 6]`` gradient momenta.

    Returns:
        ``[P, *shape, 8]``: θ, ∇, 6 momenta, each clipped to ``[−1, 1]`` and divided by its
        root mean square over the tensor (per particle). Time features are added by the
        caller, since they are the same for every parameter.
    """
    stacked = torch.cat([param.unsqueeze(-1), grad.unsqueeze(-1), momenta], dim=-1).clamp(-1, 1)
    reduce_dims = tuple(range(1, stacked.dim() - 1))
    return _rms_normalize(stacked, reduce_dims)


def segment_rms_normalize(values: Tensor, segments: Tensor) -> Tensor:
    """Divide ``values [P, D, C]`` by their RMS over each segment of ``D`` (per particle, per channel).

    The flat form of normalising several tensors laid end to end: ``segments [D, S]`` is the one-hot
    matrix of which of the ``S`` tensors each entry belongs to, so two small products replace a mean
    per tensor (measured faster than an ``index_add`` along ``D``, which loops over its entries).
    The same numbers as :func:`_rms_normalize` over each tensor, up to the order of the sums.
    """
    counts = segments.sum(0)  # [S]
    means = torch.einsum("pdc,ds->psc", values.square(), segments) / counts.clamp_min(1)[:, None]
    return values * torch.einsum("psc,ds->pdc", torch.rsqrt(means + _EPS), segments)


def flat_parameter_features(param: Tensor, grad: Tensor, momenta: Tensor, segments: Tensor) -> Tensor:
    """:func:`parameter_features` of several tensors laid end to end, in one pass.

    Args:
        param: ``[P, D]`` the values of every tensor, flattened and concatenated.
        grad: ``[P, D]`` their mean gradients.
        momenta: ``[P, D, 6]`` their gradient momenta.
        segments: ``[D, S]`` one-hot: the tensor (of ``S``) each entry belongs to.

    Returns:
        ``[P, D, 8]``: θ, ∇, 6 momenta, clipped to ``[−1, 1]`` and divided by their RMS over their
        own tensor (per particle, per channel).
    """
    stacked = torch.cat([param.unsqueeze(-1), grad.unsqueeze(-1), momenta], dim=-1).clamp(-1, 1)
    return segment_rms_normalize(stacked, segments)


def normalize_factors(values: Tensor, layer: Tensor, num_graphs: int) -> Tensor:
    """Divide factor channels by their RMS over each (graph, layer)'s neurons and components.

    Dividing every neuron of a layer by the same positive number commutes with permuting
    the neurons, so GradMetaNet stays equivariant.

    Args:
        values: ``[G·N, B, C]`` the channels of ``G`` graphs of one architecture (``N``
            nodes each), graph-major, as PyG batches them.
        layer: ``[N]`` layer label of each node of one graph.
        num_graphs: ``G``.

    Returns:
        ``[G·N, B, C]``.
    """
    num_nodes = layer.shape[0]
    grouped = values.reshape(num_graphs, num_nodes, *values.shape[1:])
    num_layers = int(layer.max()) + 1
    squares = grouped.square().mean(dim=2)  # [G, N, C]
    sums = squares.new_zeros(num_graphs, num_layers, squares.shape[-1]).index_add_(1, layer, squares)
    counts = torch.bincount(layer, minlength=num_layers).to(values.dtype)
    scale = torch.rsqrt(sums / counts[None, :, None] + _EPS)  # [G, L, C]
    return (grouped * scale[:, layer].unsqueeze(2)).reshape(values.shape)
