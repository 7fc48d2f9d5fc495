"""`PositionalEncoding`: what a neuron may know about where it sits, without breaking symmetry."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.graph import NUM_NODE_KINDS
from gradgraph.nn.context import STRUCTURE_MEMO

__all__ = ["PositionalEncoding"]


class PositionalEncoding(nn.Module):
    r"""Learned embeddings of a neuron's layer, kind and — for fixed neurons only — its index.

    .. math::
        p_n = E_{\text{layer}}[\ell_n] + E_{\text{depth}}[L_{G(n)} - \ell_n] + E_{\text{kind}}[k_n]
              + \mathbb{1}[\text{fixed}_n]\, E_{\text{position}}[\text{pos}_n]

    where :math:`\ell_n` is the layer index, :math:`L_G` the depth of the graph (so layers
    are known counted from either end), :math:`k_n` the :class:`~gradgraph.NodeKind`, and
    "fixed" means ``perm_group == -1`` (input and output neurons, whose order is meaningful).
    Hidden neurons never see their index: that is what keeps the encoding invariant to
    hidden-neuron permutations (GradMetaNet's PE).

    Args:
        channels: embedding width ``C``.
        max_layers: layer indices must be ``< max_layers``.
        max_positions: indices of fixed neurons must be ``< max_positions``.

    Shapes:
        - **input:** a GradGraph or Batch with ``layer``, ``node_kind``, ``perm_group``, ``position`` ``[N]``
        - **output:** ``[N, C]``
    """

    def __init__(self, channels: int, max_layers: int = 64, max_positions: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.max_layers = max_layers
        self.max_positions = max_positions
        self.layer = nn.Embedding(max_layers, channels)
        self.depth = nn.Embedding(max_layers, channels)
        self.kind = nn.Embedding(NUM_NODE_KINDS, channels)
        self.position = nn.Embedding(max_positions, channels)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        from gradgraph.nn.edge_encoding import load_kind_table

        load_kind_table(self.kind, state_dict, prefix + "kind.weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Re-initialise the embedding tables (small normal init)."""
        for table in (self.layer, self.depth, self.kind, self.position):
            nn.init.normal_(table.weight, std=0.1)

    def forward(self, graph) -> Tensor:
        """``[N, C]`` encodings (the equation of the class docstring)."""
        layer, layers_to_end, position, fixed = self.table_indices(graph)
        encoding = self.layer(layer) + self.depth(layers_to_end) + self.kind(graph.node_kind)
        # The indicator 1[fixed_n] of the equation, and the one place the rule "hidden neurons
        # carry no position term" is enforced: table_indices only keeps their lookup in range.
        return encoding + self.position(position) * fixed[:, None].to(encoding.dtype)

    def table_indices(self, graph) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(layer, depth - layer, position, fixed)`` ``[N]`` each, checked against the table sizes.

        ``position`` is the index of fixed neurons and 0 for hidden ones, whose index may
        exceed the table and whose term :meth:`forward` masks out anyway.

        They depend on the graph's structure only: for a graph whose owner promises a fixed
        structure (:data:`~gradgraph.nn.context.STRUCTURE_MEMO`) they are computed and checked
        once, so later calls read nothing back from the device.
        """
        memo = graph.__dict__.get(STRUCTURE_MEMO)
        key = ("positional_encoding", self.max_layers, self.max_positions)
        if memo is not None and key in memo and memo[key][0] is graph.layer:
            return memo[key][1]
        layer = graph.layer
        batch = getattr(graph, "batch", None)
        if batch is None:
            batch = torch.zeros_like(layer)
        if int(layer.max()) >= self.max_layers:
            raise GradGraphError(
                f"PositionalEncoding: a graph has layer index {int(layer.max())} but max_layers={self.max_layers}; "
                "build the model with a larger max_layers"
            )
        depth = scatter(layer, batch, dim=0, reduce="max")[batch]
        fixed = graph.perm_group < 0
        position = torch.where(fixed, graph.position, torch.zeros_like(graph.position))
        if bool(fixed.any()) and int(position.max()) >= self.max_positions:
            raise GradGraphError(
                f"PositionalEncoding: an input/output neuron has position {int(position.max())} but "
                f"max_positions={self.max_positions}; build the model with a larger max_positions"
            )
        indices = (layer, depth - layer, position, fixed)
        if memo is not None:
            memo[key] = (graph.layer, indices)
        return indices

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, max_layers={self.max_layers}, "
            f"max_positions={self.max_positions})"
        )
