"""A zoo of random SIRENs, each with its own input distribution, and their exact Fisher diagonals.

Every network is a SIREN ``1 -> 32 -> 32 -> 1`` (``Linear -> Sine -> Linear -> Sine -> Linear``)
whose weights and biases are all drawn from ``N(0, 1)``, as in GradMetaNet's curvature
experiment. Each network also draws ``p ~ U[0, 1]``, which picks its input distribution
``X_p`` from a one-parameter family (see :func:`sample_inputs`).

For a scalar regression output ``f_θ(x)`` the Fisher information (Gauss-Newton matrix with
unit noise) is ``F = E_x[∇θ f(x) ∇θ f(x)ᵀ]``; its diagonal is ``E_x[(∂f/∂θ)²]``. In output
mode (``loss_fn=None``) a :class:`~gradgraph.GradGraph` holds ``∂f(x_i)/∂W_kj =
act[j, i] * grad[k, i]`` and ``∂f(x_i)/∂b_k = grad[k, i]``, so the empirical diagonal over
``n`` points is computed *exactly* from the factors:

    F_edge[j -> k] = mean_i act[j, i]² grad[k, i]²,        F_node[k] = mean_i grad[k, i]²

(per layer that is ``(grad²) (act²)ᵀ / n``), without forming a per-sample gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.convert import to_graph
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.modules import Sine

__all__ = [
    "InputFamily",
    "fisher_diagonal",
    "make_siren",
    "sample_inputs",
    "siren_graph",
    "standard_estimate",
]


@dataclass(frozen=True)
class InputFamily:
    r"""The one-parameter family of input distributions ``X_p``, ``p ∈ [0, 1]``.

    ``X_p = N(μ_p, σ_p²)`` with ``μ_p = center_range·(2p − 1)`` and
    ``σ_p = min_width + (max_width − min_width)·p``.

    Why this family: ``p`` moves *and* widens the input distribution, so it changes which
    part of the (oscillating) SIREN function the Fisher averages over, and how much the
    per-sample gradients vary — narrow distributions (small ``p``) give nearly constant
    gradients and an easy Fisher, wide ones (large ``p``) a hard one. Because the family
    has one parameter, ``p`` is identifiable from the 128 input points (the input neuron's
    ``act`` row *is* ``x``), which is what lets a learned estimator beat plain averaging.

    Attributes:
        center_range: the mean moves over ``[−center_range, center_range]``.
        min_width: standard deviation at ``p = 0``.
        max_width: standard deviation at ``p = 1``.
    """

    center_range: float = 1.0
    min_width: float = 0.1
    max_width: float = 1.0

    def __post_init__(self) -> None:
        if not (self.min_width > 0 and self.max_width >= self.min_width):
            raise GradGraphError(
                f"InputFamily needs 0 < min_width <= max_width, got {self.min_width}, {self.max_width}"
            )
        if self.center_range < 0:
            raise GradGraphError(f"InputFamily.center_range must be >= 0, got {self.center_range}")

    def mean(self, p: float) -> float:
        """``μ_p``."""
        return self.center_range * (2.0 * p - 1.0)

    def std(self, p: float) -> float:
        """``σ_p``."""
        return self.min_width + (self.max_width - self.min_width) * p


def make_siren(
    hidden: tuple[int, ...] = (32, 32),
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    w0: float = 1.0,
) -> nn.Sequential:
    """A SIREN ``1 -> hidden... -> 1`` with every weight and bias drawn from ``N(0, 1)``.

    Args:
        hidden: widths of the hidden layers (each followed by :class:`~gradgraph.Sine`).
        generator: random source (for reproducible zoos).
        dtype: parameter dtype.
        w0: the sine frequency.

    Returns:
        ``nn.Sequential(Linear, Sine, ..., Linear)`` mapping ``[b, 1] -> [b, 1]``.
    """
    if not hidden or any(width < 1 for width in hidden):
        raise GradGraphError(f"make_siren needs at least one hidden layer of width >= 1, got {hidden}")
    widths = [1, *hidden, 1]
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        linear = nn.Linear(d_in, d_out, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(d_out, d_in, generator=generator, dtype=dtype))
            linear.bias.copy_(torch.randn(d_out, generator=generator, dtype=dtype))
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(Sine(w0))
    return nn.Sequential(*layers)


def sample_inputs(
    family: InputFamily, p: float, num_points: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``num_points`` i.i.d. draws from ``X_p``; shape ``[num_points, 1]``."""
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise GradGraphError(f"p must lie in [0, 1], got {p}")
    if num_points < 1:
        raise GradGraphError(f"num_points must be >= 1, got {num_points}")
    noise = torch.randn(num_points, 1, generator=generator, dtype=dtype)
    return family.mean(p) + family.std(p) * noise


def fisher_diagonal(graph: GradGraph) -> tuple[Tensor, Tensor]:
    """The exact empirical Fisher diagonal over the graph's components (output mode).

    Args:
        graph: one :class:`~gradgraph.GradGraph` built with ``loss_fn=None`` (its ``grad``
            holds ``∂f(x_i)/∂u``), ``B`` components = ``B`` datapoints.

    Returns:
        ``(edge [E], node [N])``: ``mean_i (∂f(x_i)/∂W)²`` per edge and
        ``mean_i (∂f(x_i)/∂b)²`` per node (meaningful where the node has a bias,
        ``graph.node_param >= 0``; zero is *not* forced elsewhere).
    """
    src, dst = graph.edge_index
    act_sq, grad_sq = graph.act.square(), graph.grad.square()
    num = graph.act.shape[1]
    # (act² ⊙ grad²) summed over components; a gather keeps it valid for any edge order.
    edge = (act_sq[src] * grad_sq[dst]).sum(dim=1) / num
    node = grad_sq.sum(dim=1) / num
    return edge, node


def standard_estimate(act: Tensor, grad: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
    """The standard Fisher-diagonal estimator ``mean_i g_i²`` from factors, batched.

    Args:
        act: ``[..., N, B]`` activations.
        grad: ``[..., N, B]`` backpropagated signals (output mode).
        edge_index: ``[2, E]`` edges shared by every leading index (one architecture).

    Returns:
        ``(edge [..., E], node [..., N])``, the same formula as :func:`fisher_diagonal`
        applied to the ``B`` given components.
    """
    src, dst = edge_index
    act_sq, grad_sq = act.square(), grad.square()
    # einsum over components: per edge, sum_i act[src, i]² grad[dst, i]².
    edge = (act_sq[..., src, :] * grad_sq[..., dst, :]).mean(dim=-1)
    node = grad_sq.mean(dim=-1)
    return edge, node


def siren_graph(model: nn.Module, inputs: Tensor) -> GradGraph:
    """``to_graph(model, inputs, loss_fn=None)``: the output-mode gradients ``∇θ f(x_i)``."""
    return to_graph(model, inputs, loss_fn=None)
