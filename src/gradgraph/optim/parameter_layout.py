"""Where every parameter entry of a network sits in its GradGraph's edge and node slots.

GradMetaNet's outputs are per edge ``[E, k]`` and per node ``[N, k]``; the learned update needs
them per parameter entry. :class:`ParameterLayout` reads the graph's slot maps once per
architecture and turns the outputs of ``G`` graphs into ``{name: [G, *shape, k]}`` with one gather
(``outputs_to_parameters`` loops over graphs, which a per-step optimizer cannot afford).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradgraph.graph import GradGraph

__all__ = ["ParameterLayout"]


@dataclass
class ParameterLayout:
    """Where every parameter entry sits in a graph's ``[E + N]`` edge-then-node slots.

    Attributes:
        names: parameter names, as in ``named_parameters()``.
        shapes: their shapes.
        index: ``{name: [numel]}`` slot of every entry; ``E + N`` (one past the end, a row
            of zeros) for entries no edge or node carries.
        num_edges, num_nodes: ``E``, ``N`` of one graph.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    index: dict[str, Tensor] = field(default_factory=dict)
    num_edges: int = 0
    num_nodes: int = 0

    @classmethod
    def from_graph(cls, graph: GradGraph) -> "ParameterLayout":
        """Read the slot maps (``edge_param``/``edge_param_pos``, ``node_param``/…) of one graph."""
        num_edges, num_nodes = int(graph.edge_index.shape[1]), int(graph.num_nodes)
        shapes = [tuple(int(s) for s in shape) for shape in graph.param_shapes]
        layout = cls(list(graph.param_names), shapes, num_edges=num_edges, num_nodes=num_nodes)
        device = graph.edge_index.device  # the slot maps live where the graph's values do
        for param_index, (name, shape) in enumerate(zip(layout.names, shapes)):
            slots = torch.full((math.prod(shape),), num_edges + num_nodes, dtype=torch.long, device=device)
            edges = (graph.edge_param == param_index).nonzero().reshape(-1)
            slots[graph.edge_param_pos[edges]] = edges
            nodes = (graph.node_param == param_index).nonzero().reshape(-1)
            slots[graph.node_param_pos[nodes]] = nodes + num_edges
            layout.index[name] = slots
        return layout

    def scatter(self, edge_values: Tensor, node_values: Tensor, num_graphs: int) -> dict[str, Tensor]:
        """``[G·E, k]``, ``[G·N, k]`` (graph-major) -> ``{name: [G, *shape, k]}``."""
        k = edge_values.shape[-1]
        slots = torch.cat(
            [
                edge_values.reshape(num_graphs, self.num_edges, k),
                node_values.reshape(num_graphs, self.num_nodes, k),
                edge_values.new_zeros(num_graphs, 1, k),
            ],
            dim=1,
        )
        return {
            name: slots[:, self.index[name]].reshape(num_graphs, *shape, k)
            for name, shape in zip(self.names, self.shapes)
        }
