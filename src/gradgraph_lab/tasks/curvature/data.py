"""Batches of the curvature task: networks of the SIREN zoo, stacked, and the task's metric.

A :class:`CurvatureSource` holds the networks of one split as stacked tensors (factors,
weights, biases, standard estimates, exact targets) and serves :class:`CurvatureBatch` es;
:meth:`CurvatureBatch.graphs` builds the PyG batch of their GradGraphs with
:class:`~gradgraph_lab.data.curvature.GraphBatcher`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.data import Batch

from gradgraph_lab.data.curvature import CurvatureData, GraphBatcher
from gradgraph_lab.data.siren_zoo import standard_estimate
from gradgraph.nn.sparse import ChannelBlockPattern

__all__ = ["CurvatureBatch", "CurvatureSource", "normalised_l2", "relative_squared_error"]

#: Floor of denominators and logarithms (targets and estimates are non-negative).
_TINY = 1e-30


# ----------------------------------------------------------------------------- batches
@dataclass
class CurvatureBatch:
    """``G`` networks of the zoo, stacked (``N`` nodes, ``E`` edges, ``B`` inputs, ``P = E + K``).

    Attributes:
        act, grad: ``[G, N, B]`` factors at the 128 seen points.
        weight: ``[G, E]``; bias: ``[G, N]``.
        standard: ``[G, P]`` the standard estimate ``mean_i g_i²`` (edges, then bias nodes).
        target: ``[G, P]`` the exact Fisher diagonal over 1024 independent points.
        source: the :class:`CurvatureSource` (architecture slots, graph batcher).
    """

    act: Tensor
    grad: Tensor
    weight: Tensor
    bias: Tensor
    standard: Tensor
    target: Tensor
    source: "CurvatureSource"

    @property
    def num_graphs(self) -> int:
        """``G``."""
        return int(self.act.shape[0])

    def per_sample_grads(self) -> Tensor:
        """``[G, P, B]`` ``∂f(x_i)/∂θ`` for every weight (``act[src]·grad[dst]``) then every bias."""
        src, dst = self.source.edge_index
        edge = self.act[:, src] * self.grad[:, dst]
        return torch.cat([edge, self.grad[:, self.source.bias_nodes]], dim=1)

    def graphs(
        self,
        act: Tensor | None = None,
        grad: Tensor | None = None,
        *,
        extra_x: Tensor | None = None,
        extra_edge_attr: Tensor | None = None,
        component_x: Tensor | None = None,
    ) -> Batch:
        """A PyG batch of the ``G`` GradGraphs, optionally with replaced factors and extra features."""
        return self.source.batcher(
            self.act if act is None else act,
            self.grad if grad is None else grad,
            self.weight,
            self.bias,
            extra_x=extra_x,
            extra_edge_attr=extra_edge_attr,
            component_x=component_x,
        )


class CurvatureSource:
    """Networks of the zoo served as precollated :class:`CurvatureBatch` es (a
    :class:`~gradgraph_lab.tasks.training.BatchSource`). Standard estimates and flattened targets
    are computed once.

    Args:
        data: the networks.
        batcher: shared PyG batch builder (one per template).
    """

    def __init__(self, data: CurvatureData, batcher: GraphBatcher | None = None) -> None:
        self.data = data
        self.batcher = batcher or GraphBatcher(data.template)
        self.edge_index = data.template.edge_index
        self.bias_nodes = data.bias_nodes
        self.num_edges = int(self.edge_index.shape[1])
        src, dst = self.edge_index
        layer = data.template.layer
        # Parameter kind (layer of the weight/bias, weight or bias): lets shared per-parameter
        # models tell the six tensors of the SIREN apart without breaking permutation symmetry.
        self.param_kind = torch.cat([2 * (layer[dst] - 1), 2 * (layer[self.bias_nodes] - 1) + 1])
        self.num_param_kinds = int(self.param_kind.max()) + 1
        self.input_nodes = torch.nonzero(layer == 0).reshape(-1)
        # The kind of the weights *into* each node (input nodes: 0, never read).
        self.node_edge_kind = (2 * (layer - 1)).clamp_min(0)
        self._patterns: dict[int, ChannelBlockPattern] = {}
        standard_chunks = []
        for start in range(0, len(data), 256):
            edge, node = standard_estimate(data.act[start : start + 256], data.grad[start : start + 256], self.edge_index)
            standard_chunks.append(torch.cat([edge, node[:, self.bias_nodes]], dim=1))
        self.standard = torch.cat(standard_chunks)
        self.target = data.targets()

    def __len__(self) -> int:
        return len(self.data)

    def sddmm_pattern(self, num_graphs: int) -> ChannelBlockPattern:
        """The ``(src, dst)`` edge pattern with the ``num_graphs`` networks of a batch as channels (cached)."""
        if num_graphs not in self._patterns:
            src, dst = self.edge_index
            self._patterns[num_graphs] = ChannelBlockPattern.build(src, dst, int(self.data.act.shape[1]), num_graphs)
        return self._patterns[num_graphs]

    def batch(self, index: Tensor) -> CurvatureBatch:
        """The networks at ``index`` (``[G]`` long) as one batch."""
        data = self.data
        return CurvatureBatch(
            act=data.act[index],
            grad=data.grad[index],
            weight=data.weight[index],
            bias=data.bias[index],
            standard=self.standard[index],
            target=self.target[index],
            source=self,
        )

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[CurvatureBatch]:
        """Mini-batches over every network once."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start : start + batch_size])


# ----------------------------------------------------------------------------- metric
def relative_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``[G]`` ``‖pred − target‖² / ‖target‖²`` per network (the training loss, per item)."""
    return (prediction - target).square().sum(dim=-1) / target.square().sum(dim=-1).clamp_min(_TINY)


def normalised_l2(prediction: Tensor, target: Tensor) -> Tensor:
    """``[G]`` ``‖pred − target‖₂ / ‖target‖₂`` per network: the reported test error."""
    return relative_squared_error(prediction, target).sqrt()
