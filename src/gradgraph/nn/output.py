"""What every gradgraph model returns: per-edge, per-node and per-graph outputs."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["GradMetaNetOutput"]


class GradMetaNetOutput(NamedTuple):
    """Outputs of a model on a :class:`~gradgraph.GradGraph` or a batch of them.

    Any of them may be ``None`` when the model has no such head.

    Attributes:
        edge: ``[E, k_edge]`` one row per edge (weight), in the graph's edge order; write
            it into weight space with ``graph.to_parameters(edge, node)``.
        node: ``[N, k_node]`` one row per node (neuron / bias slot).
        graph: ``[num_graphs, k_graph]`` one row per graph; invariant outputs.
        component: ``[num_graphs, B, k_component]`` one row per graph and component
            (datapoint or token), e.g. weights of the datapoints; invariant to neuron
            permutations, permuted with the components.
    """

    edge: Tensor | None
    node: Tensor | None
    graph: Tensor | None
    component: Tensor | None = None

    def __repr__(self) -> str:
        # Shapes, as PyG's `Data` prints them: whole tensors would bury the structure.
        fields = ", ".join(
            f"{name}={'None' if value is None else list(value.shape)}" for name, value in zip(self._fields, self)
        )
        return f"{type(self).__name__}({fields})"
