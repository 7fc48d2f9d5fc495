"""Batches of the INR-editing task: stacked SIRENs of one architecture, served without a loop.

An :class:`InrSource` holds ``M`` INRs as stacked tensors (graph-order weights and biases,
the loss-mode factors at the probe points, the edit target on the full grid) and serves
:class:`InrBatch` es; :meth:`InrBatch.graphs` builds the PyG batch of their GradGraphs with
:class:`~gradgraph_lab.data.curvature.GraphBatcher` (one ``Batch.from_data_list`` per batch size,
then only value tensors are swapped in).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Batch

from gradgraph_lab.data.curvature import GraphBatcher
from gradgraph_lab.data.inr_zoo import InrLayout, InrZoo
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph

__all__ = ["InrBatch", "InrSource", "mse_per_inr"]

_VALUE_FIELDS = ("x", "edge_attr", "act", "grad")


def mse_per_inr(rendered: Tensor, target: Tensor) -> Tensor:
    """``[G]`` mean squared error over the ``R²`` pixels of each INR: the task's metric."""
    return (rendered - target).square().mean(dim=-1)


@dataclass
class InrBatch:
    """``G`` INRs (``N`` nodes, ``E`` edges, ``B`` probe points, ``R²`` pixels).

    Attributes:
        weight: ``[G, E]``; bias: ``[G, N]`` the INRs' parameters in graph order.
        act, grad: ``[G, N, B]`` factors of ``∇θ (f(x_i) − I_edited(x_i))²``.
        target: ``[G, R²]`` the edited (dilated) image on the full grid.
        source: the :class:`InrSource` (architecture, batcher, layout, grid).
    """

    weight: Tensor
    bias: Tensor
    act: Tensor
    grad: Tensor
    target: Tensor
    source: "InrSource"

    @property
    def num_graphs(self) -> int:
        """``G``."""
        return int(self.weight.shape[0])

    def graphs(self, *, extra_x: Tensor | None = None) -> Batch:
        """The PyG batch of the ``G`` GradGraphs; ``extra_x [G, N, F]`` is appended to ``x``."""
        return self.source.batcher(self.act, self.grad, self.weight, self.bias, extra_x=extra_x)

    def render(self, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``[G, R²]`` the INRs (or the ones with ``weight``/``bias`` in graph order) on the full grid."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        return self.source.layout.render(weight, bias, self.source.coords)


class InrSource:
    """INRs served as :class:`InrBatch` es (a :class:`~gradgraph_lab.tasks.training.BatchSource`).

    Args:
        weight: ``[M, E]``; bias: ``[M, N]``; act, grad: ``[M, N, B]``; target: ``[M, R²]``.
        template: a graph of the shared architecture (its slots are used; values are cast
            to ``weight``'s dtype and moved to its device).
        coords: ``[R², 2]`` the pixel grid the target lives on.
        w0: the SIRENs' ``ω₀``.
        batcher: an existing batcher to share (same template, dtype and device).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        act: Tensor,
        grad: Tensor,
        target: Tensor,
        template: GradGraph,
        coords: Tensor,
        w0: float,
        batcher: GraphBatcher | None = None,
    ) -> None:
        count = weight.shape[0]
        if any(t.shape[0] != count for t in (bias, act, grad, target)):
            raise GradGraphError(
                "InrSource: weight, bias, act, grad, target need the same number of INRs, got "
                f"{[t.shape[0] for t in (weight, bias, act, grad, target)]}"
            )
        if coords.shape != (target.shape[1], 2):
            raise GradGraphError(f"InrSource: coords must be [R², 2] = [{target.shape[1]}, 2], got {list(coords.shape)}")
        self.weight, self.bias, self.act, self.grad, self.target = weight, bias, act, grad, target
        self.device, self.dtype = weight.device, weight.dtype
        self.template = _cast_template(template, self.dtype, self.device)
        self.coords = coords.to(self.device, self.dtype)
        self.layout = InrLayout(self.template, w0).to(self.device)
        self.batcher = batcher or GraphBatcher(self.template)
        layer = self.template.layer
        #: ``[N]`` layer of every node; ``[E]`` layer of every edge's target node.
        self.node_layer = layer
        self.edge_layer = layer[self.template.edge_index[1]]
        self.num_layers = int(layer.max()) + 1
        self.output_nodes = torch.nonzero(layer == layer.max()).reshape(-1)

    @classmethod
    def from_zoo(cls, zoo: InrZoo, index: Tensor, *, device: Any = "cpu", batcher: GraphBatcher | None = None,
                 dtype: torch.dtype = torch.float32) -> "InrSource":
        """The INRs ``index`` (``[m]`` long) of ``zoo``, on ``device``."""
        tensors = [getattr(zoo, name)[index].to(device=device, dtype=dtype)
                   for name in ("weight", "bias", "act", "grad", "target")]
        return cls(*tensors, template=zoo.template, coords=zoo.coords, w0=zoo.config.w0, batcher=batcher)

    def __len__(self) -> int:
        return int(self.weight.shape[0])

    def batch(self, index: Tensor) -> InrBatch:
        """The INRs at ``index`` (``[G]`` long) as one batch."""
        return InrBatch(self.weight[index], self.bias[index], self.act[index], self.grad[index], self.target[index],
                        self)

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[InrBatch]:
        """Mini-batches over every INR once."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        order = order.to(self.device)
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start : start + batch_size])


def _cast_template(template: GradGraph, dtype: torch.dtype, device: Any) -> GradGraph:
    graph = copy.copy(template).to(device)
    for name in _VALUE_FIELDS:
        setattr(graph, name, getattr(graph, name).to(dtype))
    return graph
