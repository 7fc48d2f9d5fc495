"""Model -> GradGraph converters and the registry that dispatches between them."""

from gradgraph.convert.registry import (
    Converter,
    _set_fallback,
    convert_closure,
    register_converter,
    registered_converters,
    to_graph,
)
from gradgraph.convert.trace import UnsupportedOperationError, register_elementwise
from gradgraph.convert.traced import convert_traced, convert_traced_closure
from gradgraph.convert.mlp import (
    DenseLayer,
    clear_structure_cache,
    convert_mlp,
    mlp_layers,
)
# stock attention modules convert through the trace; this module holds what it runs for them
from gradgraph.convert.attention import (
    TransformerStructure,
    convert_attention,
    self_attention,
    transformer_structure,
)

# asked last: reads any forward no registered converter matches (MLP chains included)
_set_fallback(convert_traced, convert_traced_closure)

__all__ = [
    "Converter",
    "DenseLayer",
    "TransformerStructure",
    "UnsupportedOperationError",
    "clear_structure_cache",
    "convert_attention",
    "convert_closure",
    "convert_traced",
    "convert_traced_closure",
    "convert_mlp",
    "mlp_layers",
    "register_converter",
    "register_elementwise",
    "registered_converters",
    "self_attention",
    "to_graph",
    "transformer_structure",
]
