"""Model -> GradGraph: :func:`to_graph` and :func:`convert_closure`, the converter registry, and
the readers of a model's structure that the symmetry actions use.

Every model no registered converter matches goes through one converter, the trace
(:mod:`gradgraph.convert.traced`); ``convert_mlp``, ``convert_attention``, ``convert_traced``
and ``convert_traced_closure`` are deprecated aliases (:mod:`gradgraph.convert.deprecated`).
"""

from gradgraph.convert.registry import (
    Converter,
    convert_closure,
    register_converter,
    registered_converters,
    set_fallback,
    to_graph,
)
from gradgraph.convert.trace import UnsupportedOperationError, recurrent_step, register_elementwise
from gradgraph.convert.trace.stock_attention import self_attention
from gradgraph.convert.traced import convert_closure_traced, to_graph_traced
from gradgraph.convert.plan import clear_structure_cache
from gradgraph.convert.mlp import DenseLayer, mlp_layers
from gradgraph.convert.attention import TransformerStructure, transformer_structure
from gradgraph.convert.deprecated import convert_attention, convert_mlp, convert_traced, convert_traced_closure

# asked last: reads any forward no registered converter matches (MLP chains included)
set_fallback(to_graph_traced, convert_closure_traced)

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
    "recurrent_step",
    "register_converter",
    "register_elementwise",
    "registered_converters",
    "self_attention",
    "to_graph",
    "transformer_structure",
]
