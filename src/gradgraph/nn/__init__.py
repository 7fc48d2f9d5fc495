"""GradMetaNet and its layers: equivariant networks on GradGraphs."""

from gradgraph.nn.output import GradMetaNetOutput

__all__ = ["GradMetaNetOutput"]
