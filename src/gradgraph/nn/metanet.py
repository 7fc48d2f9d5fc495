"""What GradMetaNet and GradMetaNet++ share: their size config, input encoders and output heads."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.component_readout import ComponentReadout
from gradgraph.nn.context import GraphContext
from gradgraph.nn.edge_encoding import EdgeKindEncoding
from gradgraph.nn.encoding import PositionalEncoding
from gradgraph.nn.linear import Linear
from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.nn.readout import InvariantReadout

__all__ = ["NUM_FACTORS", "GradMetaNetConfig", "MetaNetwork", "component_inputs"]

#: ``act`` and ``grad``: the per-component inputs of every neuron before ``component_x``.
NUM_FACTORS = 2


@dataclass
class GradMetaNetConfig:
    """The sizes of a :class:`~gradgraph.nn.GradMetaNet`, in one place.

    Build the model with :meth:`GradMetaNet.from_config(config, **outputs)
    <gradgraph.nn.GradMetaNet.from_config>`; configs that hold more than the model's sizes
    (a task's model config, the learned optimizer's) subclass or contain this one.

    Attributes:
        hidden_channels: ``C``, width of node states.
        component_channels: ``C_z``, width of per-component states (``None``: ``C``).
        num_component_layers: ``K`` component layers (0: the model never reads ``act``/``grad``).
        num_node_layers: ``M`` node layers.
        product_channels: ``P`` of the decoder's component-wise product.
        component_edge_messages: whether the component layers also pass per-component
            messages along every weight (:class:`~gradgraph.nn.ComponentConv`'s edge terms,
            cost ``O(E·B·C_z)``); ``False`` leaves the paper's ``L_Γb`` (cost ``O(N·B·C_z)``).
    """

    hidden_channels: int = 32
    component_channels: int | None = None
    num_component_layers: int = 2
    num_node_layers: int = 2
    product_channels: int = 16
    component_edge_messages: bool = True


def component_inputs(graph: GradGraph | Batch, model: str) -> Tensor:
    """``[N, B, 2 + F]``: ``act`` and ``grad`` of every neuron and component, then ``component_x``.

    Raises:
        GradGraphError: naming ``model`` if ``act``/``grad`` are not both ``[N, B]`` or
            ``component_x`` is not ``[N, B, F]``.
    """
    if graph.act.shape != graph.grad.shape or graph.act.dim() != 2:
        raise GradGraphError(
            f"{model}: act and grad must both be [N, B]; got {list(graph.act.shape)} and {list(graph.grad.shape)}"
        )
    factors = torch.stack([graph.act, graph.grad], dim=-1)
    extra = getattr(graph, "component_x", None)
    if extra is not None:
        if extra.dim() != 3 or extra.shape[:2] != graph.act.shape:
            raise GradGraphError(
                f"{model}: component_x must have shape [N, B, F] = [{graph.act.shape[0]}, "
                f"{graph.act.shape[1]}, F]; got {list(extra.shape)}"
            )
        factors = torch.cat([factors, extra.to(factors.dtype)], dim=-1)
    return factors


class MetaNetwork(nn.Module):
    r"""Base of :class:`~gradgraph.nn.GradMetaNet` and :class:`~gradgraph.nn.GradMetaNetPlusPlus`:
    the input encoders and the output heads they share (a subclass builds its body between them).

    **Encoders** (:meth:`build_encoders`): edge features
    :math:`e = \Theta_e\, \mathrm{edge\_attr} + q_e` (:class:`EdgeKindEncoding` :math:`q`),
    node embeddings :math:`\Theta_x x_n + p_n` (:class:`PositionalEncoding` :math:`p`) and
    per-component inputs :math:`\Theta_a [\mathrm{act}_{n,i}, \mathrm{grad}_{n,i} \Vert c_{n,i}]`
    (``c`` the optional ``component_x [N, B, F]``). Their input widths are explicit:
    ``x [N, 1]``, ``edge_attr [E, 1]`` and no ``component_x`` by default, as
    :func:`~gradgraph.to_graph` makes them; a graph with extra columns needs the widths
    passed (``node_in_channels=...``), or ``-1`` to infer them at the first call (PyG's lazy
    :class:`~torch_geometric.nn.Linear`; then ``parameters()`` holds uninitialised ones until a
    first forward, e.g. a dry run on one example graph under ``torch.no_grad()``).

    **Heads** (:meth:`build_heads`): a per-edge/per-node decoder (the subclass's), an
    :class:`InvariantReadout` (one output per graph) and a :class:`ComponentReadout` (one
    per graph and component); an output width of 0 builds no head and returns ``None``.
    """

    def build_encoders(
        self,
        channels: int,
        *,
        node_in_channels: int,
        edge_in_channels: int,
        component_in_channels: int,
        max_layers: int,
        max_positions: int,
    ) -> None:
        """Build ``edge_encoder``, ``edge_kind_encoding``, ``node_encoder`` and ``positional_encoding``,
        of width ``channels``; :meth:`build_factor_encoder` adds the per-component one."""
        widths = {"node_in_channels": node_in_channels, "edge_in_channels": edge_in_channels,
                  "component_in_channels": component_in_channels}
        if any(width < -1 or (width == 0 and name != "component_in_channels") for name, width in widths.items()):
            raise GradGraphError(
                f"{type(self).__name__}: input widths must be >= 1 (component_in_channels >= 0), or -1 "
                f"to infer them at the first call; got {widths}"
            )
        self.node_in_channels = node_in_channels
        self.edge_in_channels = edge_in_channels
        self.component_in_channels = component_in_channels
        self.edge_encoder = Linear(edge_in_channels, channels)
        self.edge_kind_encoding = EdgeKindEncoding(channels)
        self.node_encoder = Linear(node_in_channels, channels)
        self.positional_encoding = PositionalEncoding(channels, max_layers=max_layers, max_positions=max_positions)

    def build_factor_encoder(self, channels: int) -> None:
        """Build ``factor_encoder``: ``[act, grad ‖ component_x]`` (``2 + component_in_channels``) ``-> channels``."""
        factor_in = -1 if self.component_in_channels == -1 else NUM_FACTORS + self.component_in_channels
        self.factor_encoder = Linear(factor_in, channels)

    def build_heads(
        self,
        decoder: nn.Module | None,
        *,
        edge_out_channels: int,
        node_out_channels: int,
        graph_channels: int,
        graph_out_channels: int,
        component_channels: int,
        component_out_channels: int,
        density_readout_hidden: int,
        component_density_heads: int,
    ) -> None:
        """Keep ``decoder`` (``None`` when ``edge_out_channels = node_out_channels = 0``) and build the
        readouts: ``readout`` on ``[N, graph_channels]`` states, ``component_readout`` on
        ``[N, B, component_channels]`` states; with ``component_density_heads > 0`` that readout has a
        :class:`ComponentDensity` and its MLP is ``density_readout_hidden`` wide (else
        ``component_channels``, :class:`ComponentReadout`'s default)."""
        self.decoder = decoder
        self.edge_out_channels = edge_out_channels
        self.node_out_channels = node_out_channels
        self.readout = InvariantReadout(graph_channels, graph_out_channels) if graph_out_channels else None
        self.component_readout = (
            ComponentReadout(
                component_channels,
                component_out_channels,
                hidden_channels=density_readout_hidden if component_density_heads else None,
                density_heads=component_density_heads,
            )
            if component_out_channels
            else None
        )

    @staticmethod
    def check_output_widths(owner: str, *widths: int) -> None:
        """Raise a :class:`GradGraphError` naming ``owner`` if an output width or layer count is negative."""
        if min(widths, default=0) < 0:
            raise GradGraphError(f"{owner}: layer counts and output widths must be >= 0, got {widths}")

    @classmethod
    def for_graph_prediction(cls, graph_out_channels: int, *args: Any, **kwargs: Any) -> MetaNetwork:
        """The model for a graph-level task: ``graph [G, graph_out_channels]`` and no edge or node
        head unless asked (``edge_out_channels=``/``node_out_channels=`` in ``kwargs``).

        The defaults of the constructor build the per-weight decoder, which a graph-level task
        never reads and pays for in every forward; this leaves it out. ``args``/``kwargs`` go
        to the constructor (sizes, input widths, ...).
        """
        if graph_out_channels < 1:
            raise GradGraphError(f"{cls.__name__}.for_graph_prediction: graph_out_channels must be >= 1")
        kwargs.setdefault("edge_out_channels", 0)
        kwargs.setdefault("node_out_channels", 0)
        return cls(*args, graph_out_channels=graph_out_channels, **kwargs)

    # ------------------------------------------------------------------ forward pieces
    def check_inputs(self, graph: GradGraph | Batch) -> None:
        """One check of what the encoders read: ``x [N, F]`` and ``edge_attr [E, F]`` two-dimensional,
        widths of ``x``/``edge_attr``/``component_x`` and the floating dtype of the graph against the
        model's (no read-back from the device).

        Raises:
            GradGraphError: naming the model, the field, its shape and the width or dtype expected.
        """
        name = type(self).__name__
        dtype = self.positional_encoding.layer.weight.dtype  # never lazy
        for field in ("x", "edge_attr", "act"):
            value = getattr(graph, field, None)
            if value is not None and value.is_floating_point() and value.dtype != dtype:
                raise GradGraphError(
                    f"{name}: graph.{field} is {value.dtype} but the model's parameters are {dtype}; "
                    f"convert one of them (model.to({value.dtype}) or graph.to({dtype}) / "
                    f"to_graph(..., dtype={dtype}))"
                )
        for field, rows in (("x", "N"), ("edge_attr", "E")):
            # a 1-D field's last axis is its rows: read as feature columns, a lazy (or so-sized)
            # encoder would take all rows as one vector, added to every node or edge
            shape = getattr(graph, field).shape
            if len(shape) != 2:
                raise GradGraphError(
                    f"{name}: graph.{field} must have shape [{rows}, F] (features on its last axis); got {list(shape)}"
                )
        extra = getattr(graph, "component_x", None)
        columns = {
            "x": (graph.x.shape[-1], self.node_in_channels, "node_in_channels"),
            "edge_attr": (graph.edge_attr.shape[-1], self.edge_in_channels, "edge_in_channels"),
        }
        if hasattr(self, "factor_encoder"):
            columns["component_x"] = (0 if extra is None else extra.shape[-1], self.component_in_channels,
                                      "component_in_channels")
        for field, (got, expected, option) in columns.items():
            if expected != -1 and got != expected:
                raise GradGraphError(
                    f"{name}: graph.{field} has {got} feature columns but the model was built with "
                    f"{option}={expected}; pass {option}={got} (or -1 to infer it at the first call)"
                )

    def encode_edges(self, graph: GradGraph | Batch) -> Tensor:
        """``[E, C]`` edge features: :math:`\\Theta_e\\, \\mathrm{edge\\_attr} + q_e`."""
        return self.edge_encoder(graph.edge_attr) + self.edge_kind_encoding(graph)

    def encode_nodes(self, graph: GradGraph | Batch) -> Tensor:
        """``[N, C]`` node embeddings: :math:`\\Theta_x x_n + p_n`."""
        return self.node_encoder(graph.x) + self.positional_encoding(graph)

    def encode_factors(self, graph: GradGraph | Batch) -> Tensor:
        """``[N, B, C_z]``: :math:`\\Theta_a [\\mathrm{act}, \\mathrm{grad} \\Vert c]` per neuron and component."""
        return self.factor_encoder(component_inputs(graph, type(self).__name__))

    def outputs(
        self,
        graph: GradGraph | Batch,
        context: GraphContext,
        decoded: tuple[Tensor, Tensor] | None,
        graph_states: Tensor,
        component_states: Tensor | None,
    ) -> GradMetaNetOutput:
        """The heads' outputs from the decoder's ``(edge [E, k], node [N, k])``, the states the
        invariant readout pools ``[N, C]`` and the per-component states ``[N, B, C_z]``."""
        edge = node = None
        if decoded is not None:
            edge, node = decoded
            edge = edge[:, : self.edge_out_channels] if self.edge_out_channels else None
            node = node[:, : self.node_out_channels] if self.node_out_channels else None
        graph_out = None
        if self.readout is not None:
            graph_out = self.readout(graph_states, context.node_batch, context.num_graphs)
        component_out = None
        if self.component_readout is not None:
            fixed = graph.perm_group < 0
            component_out = self.component_readout(component_states, context.node_batch, context.num_graphs, fixed,
                                                   context.nodes_per_graph())
        return GradMetaNetOutput(edge=edge, node=node, graph=graph_out, component=component_out)

    # ------------------------------------------------------------------ the rest
    def reset_parameters(self) -> None:
        """Re-initialise every learnable parameter."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    @property
    def flow(self) -> str:
        """Deprecated name of :attr:`direction`."""
        warnings.warn(f"{type(self).__name__}.flow is deprecated, read .direction", FutureWarning, stacklevel=2)
        return self.direction

    def outputs_repr(self) -> str:
        """``out=(edge=.., node=.., graph=.., component=..)`` for ``__repr__``."""
        graph = self.readout.out_channels if self.readout is not None else 0
        component = self.component_readout.out_channels if self.component_readout is not None else 0
        return f"out=(edge={self.edge_out_channels}, node={self.node_out_channels}, graph={graph}, component={component})"
