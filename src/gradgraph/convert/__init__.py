"""Model -> GradGraph converters and the registry that dispatches between them."""

from gradgraph.convert.registry import Converter, register_converter, registered_converters, to_graph
from gradgraph.convert.mlp import DenseLayer, convert_mlp, mlp_layers  # registers the MLP converter

__all__ = [
    "Converter",
    "DenseLayer",
    "convert_mlp",
    "mlp_layers",
    "register_converter",
    "registered_converters",
    "to_graph",
]
