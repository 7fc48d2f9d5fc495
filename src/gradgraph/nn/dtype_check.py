"""The check that a graph's float fields have the dtype of the model reading them."""

from __future__ import annotations

from torch import nn

from gradgraph.errors import GradGraphError


def check_graph_dtype(model: nn.Module, graph) -> None:
    """Raise a :class:`~gradgraph.GradGraphError` naming both dtypes unless ``graph.x`` (a
    :class:`~gradgraph.GradGraph` or a PyG ``Batch``) has the dtype of ``model``'s parameters
    (torch's own error, deep inside a linear layer, names neither the graph nor the remedy)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    features = getattr(graph, "x", None)
    if parameter is None or features is None or features.dtype == parameter.dtype:
        return
    raise GradGraphError(
        f"{type(model).__name__} has {parameter.dtype} parameters but the graph's features are {features.dtype}: "
        f"convert one to the other (model.to({features.dtype}), or gradgraph.testing.as_float64_batch(graphs, "
        f"{parameter.dtype}) / a float cast of the graph's x, edge_attr, act and grad)")
