"""gradgraph: learning on neural-network gradients with PyTorch Geometric.

A network and a batch become a :class:`GradGraph` whose nodes (neurons) carry the
rank-1 factors ``act`` and ``grad`` of every datapoint's gradient; GradMetaNet layers in
:mod:`gradgraph.nn` learn on it.
"""

from gradgraph.errors import DatapointCouplingError, GradGraphError, NonFiniteFactorError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, EdgeKind, GradGraph, NodeKind
from gradgraph.modules import Sine
from gradgraph.capture import capture
from gradgraph.convert import convert_closure, recurrent_step, register_converter, registered_converters, to_graph
from gradgraph import symmetry

__version__ = "0.1.0"

__all__ = [
    "ActivationKind",
    "DatapointCouplingError",
    "EdgeKind",
    "GradGraph",
    "GradGraphError",
    "NodeKind",
    "NonFiniteFactorError",
    "Sine",
    "UnsupportedModuleError",
    "capture",
    "convert_closure",
    "recurrent_step",
    "register_converter",
    "registered_converters",
    "symmetry",
    "to_graph",
]
