"""Permutation symmetries of attention models: heads, per-head dims, feed-forward neurons.

Self-attention computes, for every head ``h``, ``softmax(q_h k_hᵀ / sqrt(d_h)) v_h`` and
then ``out_proj`` of the heads side by side. Three kinds of permutation leave the
function unchanged:

* **heads** — reorder the heads (the query, key, value rows of ``in_proj`` and the
  columns of ``out_proj`` move head by head);
* **query/key dims** — inside a head, permute the query dims and the key dims together
  (``q_h k_hᵀ`` is a sum over them);
* **value/output dims** — inside a head, permute the value dims and the matching
  columns of ``out_proj`` together;

and, in an encoder layer, **feed-forward hidden neurons** (rows of ``linear1``, columns
of ``linear2``), as in an MLP.

Conventions follow :mod:`gradgraph.symmetry.permutation`: permutations are in gather
order (new index ``i`` is old index ``perm[i]``). For one attention block,
:class:`HeadPermutation` says: new head ``h`` is old head ``heads[h]``, and its query/key
dim ``i`` is dim ``query_key[h, i]`` of that old head (``value_output`` likewise). Each
action exists on a model (a permuted deep copy computing the same function) and on its
GradGraph (a node permutation; converting the permuted model gives exactly the permuted
graph).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.convert.attention import transformer_structure
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph, NodeKind
from gradgraph.symmetry.permutation import perm_structure, permute_nodes

__all__ = [
    "HeadPermutation",
    "TransformerPermutation",
    "identity_transformer_permutation",
    "permute_ffn_hidden",
    "permute_heads",
    "permute_query_key",
    "permute_transformer",
    "permute_value_output",
    "random_transformer_permutation",
    "transformer_node_permutation",
]


def _is_permutation(perm: Tensor, size: int) -> bool:
    return perm.shape == (size,) and torch.equal(torch.sort(perm).values, torch.arange(size))


@dataclass(frozen=True)
class HeadPermutation:
    """A symmetry of one attention block (``H`` heads of ``d_h`` dims), gather order.

    Attributes:
        heads: ``[H]``; new head ``h`` is old head ``heads[h]``.
        query_key: ``[H, d_h]``; query and key dim ``i`` of new head ``h`` are dim
            ``query_key[h, i]`` of old head ``heads[h]``.
        value_output: ``[H, d_h]``; value dim ``i`` of new head ``h`` (and merged-head
            output dim, i.e. ``out_proj`` column) is dim ``value_output[h, i]`` of old
            head ``heads[h]``.
    """

    heads: Tensor
    query_key: Tensor
    value_output: Tensor

    @classmethod
    def identity(cls, num_heads: int, head_dim: int) -> HeadPermutation:
        """The identity on ``num_heads`` heads of ``head_dim`` dims."""
        dims = torch.arange(head_dim).repeat(num_heads, 1)
        return cls(torch.arange(num_heads), dims, dims.clone())

    def check(self, num_heads: int, head_dim: int, where: str) -> None:
        """Raise :class:`GradGraphError` unless this permutes ``num_heads`` heads of ``head_dim`` dims."""
        if not _is_permutation(torch.as_tensor(self.heads), num_heads):
            raise GradGraphError(f"{where}: heads must be a permutation of range({num_heads}), got {self.heads}")
        for name in ("query_key", "value_output"):
            table = torch.as_tensor(getattr(self, name))
            if table.shape != (num_heads, head_dim) or not all(_is_permutation(row, head_dim) for row in table):
                raise GradGraphError(
                    f"{where}: {name} must be [{num_heads}, {head_dim}], one permutation of range({head_dim}) "
                    f"per head; got shape {list(table.shape)}"
                )

    def gather_index(self, which: str) -> Tensor:
        """``[H * d_h]`` old index of every new dim of the packed tensor (``'query_key'`` or ``'value_output'``).

        New dim ``h * d_h + i`` is old dim ``heads[h] * d_h + table[h, i]``.
        """
        table = getattr(self, which)
        head_dim = table.shape[1]
        return (self.heads[:, None] * head_dim + table).reshape(-1)


@dataclass(frozen=True)
class TransformerPermutation:
    """A symmetry of a whole attention model.

    Attributes:
        attention: one :class:`HeadPermutation` per attention block, in forward order.
        ffn: one ``[d_ff]`` permutation of the feed-forward hidden neurons per encoder
            layer, in forward order (empty for a bare ``nn.MultiheadAttention``).
    """

    attention: list[HeadPermutation]
    ffn: list[Tensor]


# ------------------------------------------------------------------------- sizes
def _model_sizes(model: nn.Module) -> tuple[list[tuple[int, int]], list[int]]:
    structure = transformer_structure(model)
    heads = [(attention.num_heads, attention.head_dim) for _, attention in structure.attentions]
    return heads, [part.layer.linear1.out_features for part in structure.layers]


def _graph_groups(graph: GradGraph) -> tuple[list[int], list[int]]:
    """Permutation groups of the attention blocks and of the FFN layers, in forward order."""
    if getattr(graph, "batch", None) is not None:
        raise GradGraphError("transformer symmetries act on one graph; use random_node_permutation on a Batch")
    group = graph.perm_group
    attention, ffn = [], []
    for value in torch.unique(group[group >= 0]).tolist():
        kinds = graph.node_kind[group == value]
        if bool((kinds == NodeKind.QUERY).any()):
            attention.append(value)
        elif bool((kinds == NodeKind.FFN_HIDDEN).all()):
            ffn.append(value)
    return attention, ffn


def _kind_table(graph: GradGraph, group: int, kind: NodeKind) -> Tensor:
    """``[H, d_h]`` nodes of one kind of one attention group, by head then by dim."""
    _, block, _ = perm_structure(graph)
    nodes = torch.nonzero((graph.perm_group == group) & (graph.node_kind == kind)).flatten()
    order = torch.argsort(block[nodes] * (int(graph.position.max()) + 1) + graph.position[nodes])
    num_heads = len(torch.unique(block[nodes]))
    return nodes[order].reshape(num_heads, -1)


def _graph_sizes(graph: GradGraph) -> tuple[list[tuple[int, int]], list[int]]:
    attention, ffn = _graph_groups(graph)
    heads = [tuple(_kind_table(graph, group, NodeKind.QUERY).shape) for group in attention]
    return heads, [int((graph.perm_group == group).sum()) for group in ffn]


def _sizes(target: nn.Module | GradGraph) -> tuple[list[tuple[int, int]], list[int]]:
    return _graph_sizes(target) if isinstance(target, GradGraph) else _model_sizes(target)


def identity_transformer_permutation(target: nn.Module | GradGraph) -> TransformerPermutation:
    """The identity :class:`TransformerPermutation` of an attention model or its graph."""
    heads, ffn = _sizes(target)
    return TransformerPermutation([HeadPermutation.identity(*shape) for shape in heads],
                                  [torch.arange(size) for size in ffn])


def random_transformer_permutation(
    target: nn.Module | GradGraph,
    generator: torch.Generator | None = None,
    *,
    heads: bool = True,
    query_key: bool = True,
    value_output: bool = True,
    ffn: bool = True,
) -> TransformerPermutation:
    """A random :class:`TransformerPermutation`; the flags switch each kind of action on or off.

    Args:
        target: an attention model (see :func:`gradgraph.convert.transformer_structure`)
            or its GradGraph.
        generator: source of randomness.
        heads, query_key, value_output, ffn: which actions to draw; the others are the
            identity.
    """
    identity = identity_transformer_permutation(target)
    blocks = []
    for block in identity.attention:
        num_heads, head_dim = block.query_key.shape

        def draw(enabled: bool, default: Tensor) -> Tensor:
            if not enabled:
                return default
            return torch.stack([torch.randperm(head_dim, generator=generator) for _ in range(num_heads)])

        blocks.append(
            HeadPermutation(
                torch.randperm(num_heads, generator=generator) if heads else block.heads,
                draw(query_key, block.query_key),
                draw(value_output, block.value_output),
            )
        )
    hidden = [torch.randperm(len(perm), generator=generator) if ffn else perm for perm in identity.ffn]
    return TransformerPermutation(blocks, hidden)


def _check(target: nn.Module | GradGraph, permutation: TransformerPermutation, where: str) -> None:
    heads, ffn = _sizes(target)
    if len(permutation.attention) != len(heads) or len(permutation.ffn) != len(ffn):
        raise GradGraphError(
            f"{where}: the model has {len(heads)} attention block(s) and {len(ffn)} feed-forward layer(s), got "
            f"{len(permutation.attention)} head permutation(s) and {len(permutation.ffn)} FFN permutation(s)"
        )
    for index, (block, shape) in enumerate(zip(permutation.attention, heads)):
        block.check(*shape, f"{where}: attention block {index}")
    for index, (perm, size) in enumerate(zip(permutation.ffn, ffn)):
        if not _is_permutation(torch.as_tensor(perm), size):
            raise GradGraphError(f"{where}: FFN permutation {index} must be a permutation of range({size})")


# ----------------------------------------------------------------------- actions
def transformer_node_permutation(graph: GradGraph, permutation: TransformerPermutation) -> Tensor:
    """The node permutation ``[N]`` (old node -> new node) of a transformer graph for ``permutation``."""
    _check(graph, permutation, "transformer_node_permutation")
    attention_groups, ffn_groups = _graph_groups(graph)
    node_perm = torch.arange(graph.num_nodes)
    for group, block in zip(attention_groups, permutation.attention):
        for kind, table in (
            (NodeKind.QUERY, block.query_key),
            (NodeKind.KEY, block.query_key),
            (NodeKind.VALUE, block.value_output),
            (NodeKind.ATTENTION, block.value_output),
        ):
            nodes = _kind_table(graph, group, kind)
            # new (h, i) is old (heads[h], table[h, i])
            old = nodes[block.heads[:, None], table]
            node_perm[old.reshape(-1)] = nodes.reshape(-1)
    for group, perm in zip(ffn_groups, permutation.ffn):
        nodes = torch.nonzero(graph.perm_group == group).flatten()
        nodes = nodes[torch.argsort(graph.position[nodes])]
        node_perm[nodes[perm]] = nodes
    return node_perm


def permute_transformer(
    target: nn.Module | GradGraph, permutation: TransformerPermutation
) -> nn.Module | GradGraph:
    """Apply ``permutation`` to an attention model (function-preserving) or to its GradGraph.

    For a model, returns a permuted deep copy: the query and key rows of ``in_proj_weight``
    / ``in_proj_bias`` are gathered with ``HeadPermutation.gather_index('query_key')``, the
    value rows and the columns of ``out_proj.weight`` with ``gather_index('value_output')``,
    and the rows of ``linear1`` / columns of ``linear2`` with the FFN permutation. For a
    GradGraph, returns ``permute_nodes(graph, transformer_node_permutation(graph, permutation))``,
    which equals the graph of the permuted model on the same batch.
    """
    if isinstance(target, GradGraph):
        return permute_nodes(target, transformer_node_permutation(target, permutation))
    _check(target, permutation, "permute_transformer")
    model = copy.deepcopy(target)
    structure = transformer_structure(model)
    with torch.no_grad():
        for (_, attention), block in zip(structure.attentions, permutation.attention):
            width = attention.embed_dim
            query_key, value_output = block.gather_index("query_key"), block.gather_index("value_output")
            rows = torch.cat([query_key, width + query_key, 2 * width + value_output])
            attention.in_proj_weight.copy_(attention.in_proj_weight[rows])
            if attention.in_proj_bias is not None:
                attention.in_proj_bias.copy_(attention.in_proj_bias[rows])
            attention.out_proj.weight.copy_(attention.out_proj.weight[:, value_output])
        for part, perm in zip(structure.layers, permutation.ffn):
            linear1, linear2 = part.layer.linear1, part.layer.linear2
            linear1.weight.copy_(linear1.weight[perm])
            if linear1.bias is not None:
                linear1.bias.copy_(linear1.bias[perm])
            linear2.weight.copy_(linear2.weight[:, perm])
    return model


def _replace(target: nn.Module | GradGraph, **changes: object) -> TransformerPermutation:
    identity = identity_transformer_permutation(target)
    attention = identity.attention
    for name in ("heads", "query_key", "value_output"):
        if name in changes:
            values = list(changes[name])  # type: ignore[call-overload]
            if len(values) != len(attention):
                raise GradGraphError(f"permute_{name}: expected {len(attention)} permutation(s), one per attention "
                                     f"block, got {len(values)}")
            attention = [
                HeadPermutation(**{**block.__dict__, name: torch.as_tensor(value, dtype=torch.long)})
                for block, value in zip(attention, values)
            ]
    ffn = identity.ffn
    if "ffn" in changes:
        ffn = [torch.as_tensor(perm, dtype=torch.long) for perm in changes["ffn"]]  # type: ignore[attr-defined]
    return TransformerPermutation(attention, ffn)


def permute_heads(target: nn.Module | GradGraph, heads: Sequence[Tensor]) -> nn.Module | GradGraph:
    """Reorder the heads of every attention block: ``heads[l]`` is ``[H]``, gather order."""
    return permute_transformer(target, _replace(target, heads=heads))


def permute_query_key(target: nn.Module | GradGraph, perms: Sequence[Tensor]) -> nn.Module | GradGraph:
    """Permute query and key dims together inside every head: ``perms[l]`` is ``[H, d_h]``."""
    return permute_transformer(target, _replace(target, query_key=perms))


def permute_value_output(target: nn.Module | GradGraph, perms: Sequence[Tensor]) -> nn.Module | GradGraph:
    """Permute value dims and ``out_proj`` columns together inside every head: ``perms[l]`` is ``[H, d_h]``."""
    return permute_transformer(target, _replace(target, value_output=perms))


def permute_ffn_hidden(target: nn.Module | GradGraph, perms: Sequence[Tensor]) -> nn.Module | GradGraph:
    """Permute the feed-forward hidden neurons of every encoder layer: ``perms[l]`` is ``[d_ff]``."""
    return permute_transformer(target, _replace(target, ffn=perms))
