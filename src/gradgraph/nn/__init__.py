"""GradMetaNet and its layers: equivariant networks on GradGraphs.

One concept a file, as in ``torch_geometric.nn.conv``:

- :class:`GraphContext` — connectivity and grouping shared by every layer of a forward.
- :class:`GradGraphConv` — base class of message layers (subclass it for your own).
- :class:`ComponentConv` — layer over per-neuron, per-component states ``[N, B, C]``.
- :class:`ComponentPool` — symmetric pooling over components ``[N, B, C] -> [N, kC]``.
- :class:`NodeConv` — layer over per-neuron states ``[N, C]``.
- :class:`PositionalEncoding` — layer / kind / fixed-neuron index embeddings.
- :class:`EdgeKindEncoding` — embedding of every edge's kind.
- :class:`EdgeProductDecoder` — one output per weight and per bias.
- :class:`InvariantReadout` — one output per graph.
- :class:`ComponentReadout` — one output per graph and component.
- :class:`ComponentDensity` — a learned kernel density over each graph's components.
- :class:`GradMetaNet` — the model built from them; :class:`GradMetaNetConfig` its sizes;
  :func:`outputs_to_parameters`.
- :class:`MetaNetwork` — the encoders and output heads GradMetaNet and GradMetaNet++ share.
- :class:`ComponentAttention`, :class:`NeuronAttention` — attention across a neuron's components / a graph's neurons.
- :class:`ComponentProductDecoder` — GradMetaNet++'s per-component product decoder.
- :class:`GradMetaNetPlusPlus` — GradMetaNet++ built from them.
"""

from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.nn.context import GraphContext
from gradgraph.nn.conv import GradGraphConv
from gradgraph.nn.component_conv import ComponentConv
from gradgraph.nn.density import ComponentDensity
from gradgraph.nn.component_readout import ComponentReadout
from gradgraph.nn.node_conv import NodeConv
from gradgraph.nn.pool import ComponentPool
from gradgraph.nn.encoding import PositionalEncoding
from gradgraph.nn.edge_encoding import EdgeKindEncoding
from gradgraph.nn.decoder import EdgeProductDecoder
from gradgraph.nn.readout import InvariantReadout
from gradgraph.nn.metanet import GradMetaNetConfig, MetaNetwork
from gradgraph.nn.gradmetanet import GradMetaNet, LayerFactory, outputs_to_parameters
from gradgraph.nn.canonical import ScaleEquivariant
from gradgraph.nn.component_attention import ComponentAttention
from gradgraph.nn.neuron_attention import NeuronAttention
from gradgraph.nn.component_decoder import ComponentProductDecoder
from gradgraph.nn.gradmetanet_pp import GradMetaNetPlusPlus

__all__ = [
    "ComponentConv",
    "ComponentDensity",
    "ComponentPool",
    "ComponentReadout",
    "EdgeKindEncoding",
    "EdgeProductDecoder",
    "GradGraphConv",
    "GradMetaNet",
    "GradMetaNetConfig",
    "GradMetaNetOutput",
    "GraphContext",
    "InvariantReadout",
    "LayerFactory",
    "MetaNetwork",
    "NodeConv",
    "PositionalEncoding",
    "ScaleEquivariant",
    "outputs_to_parameters",
    "ComponentAttention",
    "NeuronAttention",
    "ComponentProductDecoder",
    "GradMetaNetPlusPlus",
]
