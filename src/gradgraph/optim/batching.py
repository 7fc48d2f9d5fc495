"""The learned optimizer's per-step graph work, done once per architecture instead of every step.

Every step of a learned optimizer converts the same network on a new batch: the GradGraph
it gets has the same structure (``edge_index``, kinds, layers, parameter slots, …) as the
step before, and only the values change — the rank-1 factors ``act``/``grad`` ``[N, B]``,
the biases ``x`` and the weights ``edge_attr``. Two things recomputed that structure from
scratch at every step (measured on digits, README: 15% and 8% of a step):

* ``Batch.from_data_list`` collates ~20 structural tensors of the ``P`` graphs;
* :meth:`GradGraph.mean_grad` groups the edges into weight blocks (``torch.unique`` per
  parameter) before the one matmul per block that reads the gradient.

:class:`ArchitectureCache` keeps, per architecture, a collated template batch. A batch of
graphs whose structure matches the reference graph's (the same tensors, as the converter's
cached plans hand out, or equal ones) is a shallow copy of the template with the four value
tensors concatenated. Anything else — another architecture, another batch size — is collated
afresh and becomes the new reference. The weight blocks are shared by GradGraph itself
between graphs that hold the same structure tensors. The results are the tensors
``Batch.from_data_list`` and ``mean_grad`` give (tested bit-identical).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Batch

from gradgraph.graph import GradGraph
from gradgraph.nn.context import STRUCTURE_MEMO

__all__ = ["ArchitectureCache"]

#: the fields of a GradGraph that change from step to step; every other field is structure.
VALUE_FIELDS = ("act", "grad", "x", "edge_attr")
#: per-step fields a graph may carry (``to_graph`` keeps the per-datapoint losses)
OPTIONAL_VALUE_FIELDS = ("loss",)


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, Tensor) or isinstance(right, Tensor):
        if not (isinstance(left, Tensor) and isinstance(right, Tensor)):
            return False
        if left is right:
            return True
        return (left.shape == right.shape and left.dtype == right.dtype and left.device == right.device
                and bool(torch.equal(left, right)))
    return left == right


class ArchitectureCache:
    """Collated structure of the last architecture seen (module docstring).

    Shapes:
        - :meth:`batch`: ``P`` GradGraphs of one architecture -> a ``Batch`` (as
          ``Batch.from_data_list``), ``act``/``grad`` ``[P·N, B]``, ``x`` ``[P·N, F]``,
          ``edge_attr`` ``[P·E, D]``
        - :meth:`mean_grad`: a GradGraph -> ``{name: [*param.shape]}`` (as :meth:`GradGraph.mean_grad`)
    """

    def __init__(self) -> None:
        self._reference: GradGraph | None = None
        self._structure: dict[str, Any] = {}
        self._templates: dict[int, Batch] = {}
        self._values: tuple[str, ...] = VALUE_FIELDS

    def _matches(self, graph: GradGraph) -> bool:
        if self._reference is None or set(graph.keys()) != set(self._structure) | set(self._values):
            return False
        return all(_same(graph[key], value) for key, value in self._structure.items())

    def _adopt(self, graph: GradGraph) -> bool:
        """Make ``graph`` the reference if no reference matches it; ``True`` if it matched one."""
        if self._matches(graph):
            return True
        if not all(key in graph for key in VALUE_FIELDS):
            return False  # not a graph this cache understands: never a reference
        self._reference = graph
        self._values = VALUE_FIELDS + tuple(key for key in OPTIONAL_VALUE_FIELDS if key in graph)
        self._structure = {key: graph[key] for key in graph.keys() if key not in self._values}
        self._templates = {}
        return False

    def mean_grad(self, graph: GradGraph) -> dict[str, Tensor]:
        """:meth:`GradGraph.mean_grad` of ``graph`` (adopting it as the reference if none matches).

        The weight blocks the mean reads are grouped once per architecture: GradGraph shares
        them between graphs that hold the same structure tensors, as every conversion from
        one cached plan does.
        """
        # Graphs converted from one cached plan hold the same structure tensors, and GradGraph
        # shares the weight blocks of such graphs itself.
        self._adopt(graph)
        return graph.mean_grad()

    def batch(self, graphs: list[GradGraph]) -> Batch:
        """``Batch.from_data_list(graphs)``, collating the structure only when the architecture changes."""
        if not all(self._adopt(graph) for graph in graphs) or len(graphs) not in self._templates:
            collated = Batch.from_data_list(graphs)
            if all(self._matches(graph) for graph in graphs):
                # Every batch copied from this template shares the memo: GradMetaNet's
                # context structure (layer groups, sparse patterns) is built once too.
                collated.__dict__[STRUCTURE_MEMO] = {}
                self._templates[len(graphs)] = collated
                # Callers set fields on what they get (the meta-model sets the factors it
                # reads): hand out a copy, so the template keeps exactly the collated fields.
                return copy.copy(collated)
            return collated
        batch = copy.copy(self._templates[len(graphs)])  # shares the structure tensors, owns its fields
        for key in self._values:
            values = [graph[key] for graph in graphs]
            batch[key] = values[0] if len(values) == 1 else torch.cat(values)
        return batch
