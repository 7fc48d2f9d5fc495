"""Whole groups of a grouped op as the blocks of one permutation group (:func:`parallel_blocks`).

A grouped or depthwise convolution computes every group alike, so exchanging whole groups — a group's
input channels, its kernels and its output channels with another group's — keeps the function.
:func:`gradgraph.convert.layout.make_plan` asks :func:`parallel_blocks` which of its symmetry classes
move so, and claims it only where it is proven on the graph (:func:`_is_automorphism`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from gradgraph.convert.trace import TraceResult

__all__ = ["UnionFind", "parallel_blocks"]


class UnionFind:
    """Disjoint sets of ``0 .. size - 1`` (path halving; the smaller root wins a union)."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def parallel_blocks(trace: TraceResult, set_of_node: Tensor, root_of_piece: dict[int, int],
                    free_ranks: Callable[[int], Tensor | None], class_nodes: Callable[[int], Tensor],
                    class_sets: Callable[[int], list[int]], labels: tuple[Tensor, ...],
                    edges: tuple[Tensor, Tensor, Tensor, Tensor], node_params: tuple[Tensor, Tensor]
                    ) -> dict[int, list[list[int]]]:
    """Symmetry classes that move as whole blocks: the groups of a grouped op (a grouped or depthwise
    convolution, which the trace runs as one ``F.linear`` per group on a slice of its weight and
    records in ``trace.grouped``).

    A grouped op's parameter, whose call sites use disjoint entries, site ``g`` reading the neurons of
    one free class and writing those of another, all of them different, relates class ``in_g`` to
    ``out_g`` as block ``g`` of one group: exchanging whole blocks (group ``g``'s input channels, its
    kernels and its output channels with group ``g'``'s) keeps the function when the blocks are alike. Sites of several
    such parameters that share a class chain their blocks (two depthwise convolutions in a row), each op
    with one site in every block (an op whose group spans two groups of another joins them into a block
    that is a group of neither: no blocks). Every block gets one tie per class, matched across blocks by
    the role that put the class there; the blocks' classes must match tie by tie in role and size.

    Claimed only where it is proven on the graph: the exchange of blocks 0 and 1 and the cyclic shift of
    all blocks (which generate every exchange) must each map the layers, kinds and activations of the
    nodes to themselves and every edge to an edge of its kind and parameter, with one entry of each
    parameter going to one entry. Otherwise the classes stay flat groups of their own, each moving
    within its group only.

    Returns:
        ``{first class root: blocks}``, ``blocks[b]`` the class roots of block ``b``, one per tie, in tie order.
    """
    grouped = {tuple(sets) for sets in trace.grouped if sets}
    if not grouped:
        return {}
    sites: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for src, dst, _, param, pos, _ in trace.edges:
        if param >= 0 and pos is not None and len(src):
            sites.setdefault(param, []).append((src, dst, pos))
    links: list[list[tuple[int, int]]] = []
    link_outputs: list[tuple[int, ...]] = []  # per link, the grouped op's output set of every site
    root_of_node = torch.tensor([root_of_piece[piece] for piece in range(len(root_of_piece))])[set_of_node]
    for uses in sites.values():
        if len(uses) < 2:
            continue
        entries = torch.cat([pos for *_, pos in uses])
        if torch.unique(entries).numel() != entries.numel():
            continue  # an entry used twice ties its neurons (_shared_parameter_ties), it does not make blocks
        outputs = tuple(trace.set_of(int(dst[0])).index for _, dst, _ in uses)
        if outputs not in grouped:
            continue  # only the groups of one grouped op are alike by construction
        pairs = []
        for src, dst, _ in uses:
            ins, outs = root_of_node[src], root_of_node[dst]
            if not bool((ins == ins[0]).all()) or not bool((outs == outs[0]).all()):
                break
            pairs.append((int(ins[0]), int(outs[0])))
        else:
            roots = [root for pair in pairs for root in pair]
            if len(set(roots)) == len(roots):
                links.append(pairs)
                link_outputs.append(outputs)
    if not links:
        return {}
    roots = sorted({root for pairs in links for pair in pairs for root in pair})
    index = {root: i for i, root in enumerate(roots)}
    same_block, same_group = UnionFind(len(roots)), UnionFind(len(roots))
    role: dict[int, tuple[int, int]] = {}
    for number, pairs in enumerate(links):
        for into, out in pairs:
            same_block.union(index[into], index[out])
            same_group.union(index[pairs[0][0]], index[into])
            same_group.union(index[pairs[0][0]], index[out])
            for side, root in enumerate((into, out)):
                role[root] = min(role.get(root, (number, side)), (number, side))
    result: dict[int, list[list[int]]] = {}
    entries = None
    for group_root in sorted({same_group.find(i) for i in range(len(roots))}):
        members = [root for root in roots if same_group.find(index[root]) == group_root]
        by_block: dict[int, list[int]] = {}
        for root in members:
            by_block.setdefault(same_block.find(index[root]), []).append(root)
        blocks = sorted((sorted(block, key=lambda root: role[root]) for block in by_block.values()),
                        key=lambda block: min(block))
        in_group = {index[root] for root in members}
        touched = [number for number, pairs in enumerate(links) if index[pairs[0][0]] in in_group]
        if (len(blocks) < 2 or any(len(links[number]) != len(blocks) for number in touched)
                or any([role[root] for root in block] != [role[root] for root in blocks[0]] for block in blocks)
                or any(free_ranks(root) is None for root in members)):
            continue
        # Besides the grouped ops' own outputs (which no op read in part: Tracer.note_group_parts), every set
        # of the blocks must come from an op that made the sets of every block alike (a set cut into all of
        # them, or the taps of the next convolution, one set per group): a set of some blocks only is
        # per-group code, which the graph does not tell apart from another group's (a constant it was
        # multiplied by)
        own = {set_index for number in touched for set_index in link_outputs[number]}
        counts = [Counter(trace.sets[set_index].created_at for root in block for set_index in class_sets(root)
                          if set_index not in own) for block in blocks]
        if any(count != counts[0] for count in counts):
            continue
        # ... and no op outside the grouped ops read or changed part of a set of the blocks before or after
        # them (cat([h[:, :2] * 2, h[:, 2:] * 3]) feeding a depthwise convolution: its groups 0 and 2 differ)
        if any(trace.sets[set_index].read_in_part for root in members for set_index in class_sets(root)):
            continue
        orders = [[_class_order(class_nodes(root), free_ranks(root), labels) for root in block] for block in blocks]
        if any(len(order) != len(first) for block in orders for order, first in zip(block, orders[0])):
            continue
        swap = list(range(len(blocks)))
        swap[0], swap[1] = 1, 0
        shift = list(range(1, len(blocks))) + [0]
        if entries is None:
            entries = _entry_numbering(trace, edges, node_params)
        num_nodes = int(labels[0].shape[0])
        if all(_is_automorphism(_block_permutation(orders, targets, num_nodes), labels, *entries)
               for targets in (swap, shift)):
            result[min(members)] = blocks
    return result


def _entry_numbering(trace: TraceResult, edges: tuple[Tensor, Tensor, Tensor, Tensor],
                     node_params: tuple[Tensor, Tensor]
                     ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """``((edge_index, edge_kind, edge_param, edge_entry), (node_param, node_entry), uses)`` for
    :func:`_is_automorphism`: every parameter entry numbered once across all parameters (``-1``: no
    parameter) and the number of edges and nodes that use it."""
    sizes = torch.tensor([math.prod(shape) for shape in trace.param_shapes] + [0], dtype=torch.long)
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), sizes.cumsum(0)))
    edge_index, edge_kind, edge_param, edge_pos = edges
    node_param, node_pos = node_params
    edge_entry = torch.where(edge_param >= 0, offsets[edge_param.clamp(min=0)] + edge_pos, -1)
    node_entry = torch.where(node_param >= 0, offsets[node_param.clamp(min=0)] + node_pos, -1)
    used = torch.cat((edge_entry[edge_entry >= 0], node_entry[node_entry >= 0]))
    uses = torch.bincount(used, minlength=int(offsets[-1]))
    return (edge_index, edge_kind, edge_param, edge_entry), (node_param, node_entry), uses


def _class_order(nodes: Tensor, ranks: Tensor, labels: tuple[Tensor, ...]) -> Tensor:
    """A class's nodes in the order that matches them across blocks: by layer and kind, then by set
    (runs of consecutive nodes), then by rank."""
    layer, node_kind = labels[0][nodes], labels[1][nodes]
    width = int(ranks.max()) + 1 if len(ranks) else 0
    kind = node_kind * (int(layer.max()) + 1 if len(nodes) else 1) + layer
    order = torch.argsort(kind * len(nodes) * max(width, 1) + torch.arange(len(nodes)) // max(width, 1) * width
                          + ranks, stable=True)
    return nodes[order]


def _block_permutation(orders: list[list[Tensor]], targets: list[int], num_nodes: int) -> Tensor:
    """``[N]``: block ``b``'s nodes to block ``targets[b]``'s, tie by tie, in :func:`_class_order`."""
    perm = torch.arange(num_nodes)
    for block, target in enumerate(targets):
        for tie, nodes in enumerate(orders[block]):
            perm[nodes] = orders[target][tie]
    return perm


def _is_automorphism(perm: Tensor, labels: tuple[Tensor, ...], edges: tuple[Tensor, Tensor, Tensor, Tensor],
                     nodes: tuple[Tensor, Tensor], uses: Tensor) -> bool:
    """Whether the node permutation ``perm`` keeps every label, maps every edge to an edge of its kind and
    parameter and every node to one of its bias's parameter, and moves the entries of every parameter by a
    permutation (one entry to one entry).

    ``edges``: ``(edge_index, edge_kind, edge_param, edge_entry)``, ``nodes``: ``(node_param, node_entry)``;
    an entry is numbered once across all parameters (``-1``: none), ``uses`` counts the edges and nodes
    that use each. Only what ``perm`` moves is compared (a CNN has many edges): an edge between nodes
    that stay is its own image, so an entry it uses must stay too.
    """
    moved = perm != torch.arange(len(perm))
    if any(not torch.equal(label[perm][moved], label[moved]) for label in labels):
        return False
    edge_index, edge_kind, edge_param, edge_entry = edges
    node_param, node_entry = nodes
    touched = moved[edge_index[0]] | moved[edge_index[1]]
    src, dst, kind = edge_index[0][touched], edge_index[1][touched], edge_kind[touched]
    num_nodes = len(perm)
    keys = (kind * num_nodes + dst) * num_nodes + src
    images = (kind * num_nodes + perm[dst]) * num_nodes + perm[src]
    sorted_keys, order = torch.sort(keys)
    found = torch.searchsorted(sorted_keys, images).clamp(max=max(len(keys) - 1, 0))
    if len(keys) and not torch.equal(sorted_keys[found], images):
        return False
    image = order[found]
    param = edge_param[touched]
    if not torch.equal(param[image], param) or not torch.equal(node_param[perm][moved], node_param[moved]):
        return False
    entry = edge_entry[touched]
    before = torch.cat((entry, node_entry[moved]))
    after = torch.cat((entry[image], node_entry[perm][moved]))
    before, after = before[before >= 0], after[after >= 0]
    if not len(before):
        return True
    # one entry to one entry, in both directions (a scatter keeps one write per entry: the others differ)
    forward, backward = torch.full_like(uses, -1), torch.full_like(uses, -1)
    forward[before], backward[after] = after, before
    if not torch.equal(forward[before], after) or not torch.equal(backward[after], before):
        return False
    # ... of the same parameter, and an entry that moves is used by nothing that stays
    changed = before[before != after]
    return bool((torch.bincount(before, minlength=len(uses))[changed] == uses[changed]).all())

