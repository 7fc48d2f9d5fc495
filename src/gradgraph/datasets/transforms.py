"""Input normalisation for GradGraphs: one scale per layer, so models see comparable magnitudes.

The factors of one network span many orders of magnitude (``grad`` shrinks with the loss, ``act``
grows with the input scale and the weights), and they differ between the networks of a zoo far
more than their patterns do. :class:`NormalizeFactors` divides, in every graph separately,

* ``act`` and ``grad`` of the nodes of each layer (``graph.layer``) by their RMS over those
  nodes and all components,
* the weights (``edge_attr[:, 0]``) of each parameter (``graph.edge_param``) and the biases
  (``x[:, 0]``, by ``graph.node_param``) by their RMS,

and, with ``log_scales=True``, appends the removed scales as features, so a model can still
read them: ``x`` gains the columns ``log RMS(act)``, ``log RMS(grad)`` of the node's layer and
``log RMS(bias)`` of its bias's parameter (0 for a node without one); ``edge_attr`` gains
``log RMS(weight)`` of the edge's parameter (0 for a structural edge).

The scales are invariant to permuting a layer's neurons and to permuting the components, so the
transform commutes with those symmetries (tested); it is not scale-equivariant (a rescaled ReLU
neuron changes its layer's RMS).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph

__all__ = ["NormalizeFactors"]


class NormalizeFactors(BaseTransform):
    r"""Divide ``act``, ``grad``, weights and biases by their per-layer RMS (a PyG transform).

    For the nodes :math:`\mathcal{N}_l` of layer :math:`l` and :math:`B` components,

    .. math::
        \mathrm{act}_{n,i} \leftarrow \frac{\mathrm{act}_{n,i}}{\max(\epsilon, r_l)},\qquad
        r_l = \Big(\frac{1}{|\mathcal{N}_l| B}\sum_{m \in \mathcal{N}_l}\sum_i \mathrm{act}_{m,i}^2\Big)^{1/2},

    and the same for ``grad`` (its own :math:`r_l`), for the weights of each parameter and
    the biases of each parameter. Applied to one graph (a dataset's ``transform``), not to a
    :class:`~torch_geometric.data.Batch` (whose layers mix graphs). Returns new tensors:
    the input graph's are left as they were.

    Args:
        act, grad, weights: which of the three to normalise (``weights`` covers biases).
        log_scales: append the log-RMS scales as columns of ``x`` (3: act, grad, bias) and
            ``edge_attr`` (1: weight); see the module doc.
        eps: the smallest scale divided by (an all-zero layer stays zero).

    Shapes: ``act``, ``grad`` ``[N, B]`` stay; ``x`` ``[N, F] -> [N, F + 3]`` and ``edge_attr``
    ``[E, D] -> [E, D + 1]`` with ``log_scales``.
    """

    def __init__(self, act: bool = True, grad: bool = True, weights: bool = True, log_scales: bool = False,
                 eps: float = 1e-12) -> None:
        self.act = act
        self.grad = grad
        self.weights = weights
        self.log_scales = log_scales
        self.eps = eps

    def forward(self, data: GradGraph) -> GradGraph:
        """The normalised graph (``data`` is a shallow copy made by ``BaseTransform.__call__``)."""
        if isinstance(data, Batch):
            raise GradGraphError("NormalizeFactors normalises one graph at a time (a Batch's layers mix graphs); "
                                 "use it as the dataset's transform")
        layer = data.layer
        act_scale = self._group_rms(data.act, layer)
        grad_scale = self._group_rms(data.grad, layer)
        weight_scale = self._group_rms(data.edge_attr[:, :1], data.edge_param, skip_negative=True)
        bias_scale = self._group_rms(data.x[:, :1], data.node_param, skip_negative=True)
        if self.act:
            data.act = data.act / act_scale[:, None]
        if self.grad:
            data.grad = data.grad / grad_scale[:, None]
        if self.weights:
            data.edge_attr = torch.cat([data.edge_attr[:, :1] / weight_scale[:, None], data.edge_attr[:, 1:]], 1)
            data.x = torch.cat([data.x[:, :1] / bias_scale[:, None], data.x[:, 1:]], 1)
        if self.log_scales:
            has_bias = (data.node_param >= 0)[:, None]
            structural = (data.edge_param < 0)[:, None]
            data.x = torch.cat([data.x, act_scale.log()[:, None], grad_scale.log()[:, None],
                                bias_scale.log()[:, None].masked_fill(~has_bias, 0.0)], 1)
            data.edge_attr = torch.cat([data.edge_attr, weight_scale.log()[:, None].masked_fill(structural, 0.0)], 1)
        return data

    def _group_rms(self, values: Tensor, group: Tensor, skip_negative: bool = False) -> Tensor:
        """``[len(values)]``: each row's group RMS (over the group's rows and all columns), at least
        ``eps``; 1 for rows of group < 0 when ``skip_negative`` (structural edges, nodes without a bias)."""
        kept = group >= 0 if skip_negative else torch.ones_like(group, dtype=torch.bool)
        scale = torch.ones(len(values), dtype=values.dtype, device=values.device)
        if bool(kept.any()):
            mean_square = scatter(values[kept].square().mean(1), group[kept], dim=0, reduce="mean")
            scale[kept] = mean_square.sqrt().clamp_min(self.eps)[group[kept]]
        return scale

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(act={self.act}, grad={self.grad}, weights={self.weights}, "
                f"log_scales={self.log_scales})")
