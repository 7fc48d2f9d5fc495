"""The structure a message layer needs from a (batch of) GradGraph(s), computed once per forward."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.nn.sparse import ChannelBlockPattern

__all__ = ["STRUCTURE_FIELDS", "STRUCTURE_MEMO", "GraphContext", "equal_blocks"]

#: Name of an optional dict in a graph's ``__dict__`` by which its owner promises that the
#: graph's structure (``edge_index``, ``layer``, ``batch``) never changes: every graph that
#: shares that dict object gets the same context structure (layer groups, sparse patterns),
#: computed once. Set only by code that batches graphs of one fixed architecture
#: (:class:`gradgraph.optim.batching.ArchitectureCache`,
#: :class:`gradgraph_lab.data.curvature.GraphBatcher`); without it nothing is reused.
STRUCTURE_MEMO = "_structure_memo"


def equal_blocks(batch: Tensor, num_graphs: int) -> int:
    """``n`` if ``batch`` is ``[0]*n + [1]*n + ... + [G-1]*n`` (``[N]`` node→graph), else 0.

    Reads ``batch`` back to the host (:meth:`GraphContext.nodes_per_graph` does it once per context).
    """
    num_nodes = batch.numel()
    if num_graphs < 1 or num_nodes % num_graphs:
        return 0
    per_graph = num_nodes // num_graphs
    expected = torch.arange(num_graphs, device=batch.device).repeat_interleave(per_graph)
    return per_graph if torch.equal(batch, expected) else 0


class _ContextFields(NamedTuple):
    edge_index: Tensor
    edge_features: Tensor
    node_batch: Tensor
    num_graphs: int
    layer_group: Tensor
    num_layer_groups: int
    cache: dict[Any, Any]


#: Fields that fix the structure the :attr:`GraphContext.cache` memoises; replacing any of
#: them (``_replace``) starts an empty cache.
STRUCTURE_FIELDS = ("edge_index", "node_batch", "num_graphs", "layer_group", "num_layer_groups")


class GraphContext(_ContextFields):
    """Connectivity and grouping of a graph or a batch, shared by every layer of a model.

    A named tuple. Build it with :meth:`from_graph`, or by hand:
    ``GraphContext(edge_index, edge_features, node_batch, num_graphs, layer_group,
    num_layer_groups)`` — every context built without a ``cache`` gets its own empty one, and
    ``context._replace(edge_index=...)`` (or any other structural field) starts a new one, so
    no sparse pattern of one graph is ever used on another.

    Attributes:
        edge_index: ``[2, E]`` forward edges, source -> destination.
        edge_features: ``[E, D]`` edge features every layer gates its messages with
            (GradMetaNet passes its encoded ``edge_attr``).
        node_batch: ``[N]`` graph of every node (zeros for a single graph).
        num_graphs: ``G``.
        layer_group: ``[N]`` index of the node's ``(graph, layer)`` group, in
            ``range(num_layer_groups)``; used for per-layer means.
        num_layer_groups: number of distinct ``(graph, layer)`` pairs.
        cache: memo of what depends on the structure only (sparse patterns, see
            :meth:`pattern`; :meth:`nodes_per_graph`), shared by all layers of a forward.
    """

    __slots__ = ()

    def __new__(
        cls,
        edge_index: Tensor,
        edge_features: Tensor,
        node_batch: Tensor,
        num_graphs: int,
        layer_group: Tensor,
        num_layer_groups: int,
        cache: dict[Any, Any] | None = None,
    ) -> GraphContext:
        # A fresh dict per context: a shared default would hand one graph's patterns to another.
        return super().__new__(
            cls, edge_index, edge_features, node_batch, num_graphs, layer_group, num_layer_groups,
            {} if cache is None else cache,
        )

    def _replace(self, **changes: Any) -> GraphContext:
        """A copy with ``changes``; it shares :attr:`cache` only if no structural field changes."""
        if "cache" not in changes and any(name in changes for name in STRUCTURE_FIELDS):
            changes["cache"] = {}
        return super()._replace(**changes)

    def pattern(self, direction: str, channels: int) -> ChannelBlockPattern:
        """The channel-block sparse pattern for messages along (``"forward"``: rows are
        destinations) or against (``"backward"``: rows are sources) the edges; built once
        per forward and shared by every layer of that width."""
        if direction not in ("forward", "backward"):
            raise GradGraphError(f"GraphContext.pattern: direction must be 'forward' or 'backward', got {direction!r}")
        key = (direction, channels)
        if key not in self.cache:
            src, dst = self.edge_index
            forward, backward = ChannelBlockPattern.build_pair(dst, src, self.num_nodes, channels)
            self.cache[("forward", channels)] = forward
            self.cache[("backward", channels)] = backward
        return self.cache[key]

    def nodes_per_graph(self) -> int:
        """``n`` if every graph has ``n`` nodes and ``node_batch`` is ``[0]*n + [1]*n + ...``
        (a batch of one architecture), else 0; checked once per context (it reads the
        tensor back to the host) and remembered in :attr:`cache`.

        Lets a layer view ``[N, ...]`` states as ``[G, n, ...]`` instead of padding them.
        """
        if "nodes_per_graph" not in self.cache:
            self.cache["nodes_per_graph"] = equal_blocks(self.node_batch, self.num_graphs)
        return self.cache["nodes_per_graph"]

    @property
    def num_nodes(self) -> int:
        """``N``."""
        return int(self.node_batch.shape[0])

    @classmethod
    def from_graph(cls, graph, edge_features: Tensor | None = None) -> GraphContext:
        """Build the context of a :class:`~gradgraph.GradGraph` or a PyG ``Batch`` of them.

        Args:
            graph: a GradGraph or a Batch (needs ``edge_index``, ``layer``).
            edge_features: ``[E, D]``; defaults to ``graph.edge_attr``.
        """
        edge_index = graph.edge_index
        num_nodes = int(graph.num_nodes)
        if edge_features is None:
            edge_features = graph.edge_attr
        if edge_features.shape[0] != edge_index.shape[1]:
            raise GradGraphError(
                f"GraphContext: edge_features has {edge_features.shape[0]} rows but the graph has "
                f"{edge_index.shape[1]} edges (edge_index {list(edge_index.shape)})"
            )
        memo = graph.__dict__.get(STRUCTURE_MEMO)
        shared = None if memo is None else memo.get("context")
        if shared is not None and shared.edge_index is edge_index:
            return shared._replace(edge_features=edge_features)
        batch = getattr(graph, "batch", None)
        if batch is None:
            batch = torch.zeros(num_nodes, dtype=torch.long, device=edge_index.device)
            num_graphs = 1
        else:
            num_graphs = int(graph.num_graphs)
        layer = graph.layer
        if layer.shape != (num_nodes,):
            raise GradGraphError(f"GraphContext: graph.layer must have shape [{num_nodes}], got {list(layer.shape)}")
        # Group key (graph, layer), made dense so that scatter outputs stay small.
        key = batch * (int(layer.max()) + 1) + layer
        _, layer_group = torch.unique(key, return_inverse=True)
        context = cls(
            edge_index=edge_index,
            edge_features=edge_features,
            node_batch=batch,
            num_graphs=num_graphs,
            layer_group=layer_group,
            num_layer_groups=int(layer_group.max()) + 1 if num_nodes else 0,
        )
        if memo is not None:
            memo["context"] = context  # its pattern cache is then shared too
        return context
