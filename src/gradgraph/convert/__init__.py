"""Model -> GradGraph converters and the registry that dispatches between them."""

from gradgraph.convert.registry import Converter, register_converter, registered_converters, to_graph
from gradgraph.convert.mlp import (  # registers the MLP converter
    DenseLayer,
    clear_structure_cache,
    convert_mlp,
    mlp_layers,
)
# registered after the MLP converter, so it is asked first
from gradgraph.convert.attention import (
    TransformerStructure,
    convert_attention,
    self_attention,
    transformer_structure,
)

__all__ = [
    "Converter",
    "DenseLayer",
    "TransformerStructure",
    "clear_structure_cache",
    "convert_attention",
    "convert_mlp",
    "mlp_layers",
    "register_converter",
    "registered_converters",
    "self_attention",
    "to_graph",
    "transformer_structure",
]
