"""A trace -> the graph's layout and the symmetry group the trace proves (:func:`make_plan`).

:func:`make_plan` reads the :class:`~gradgraph.convert.trace.TraceResult` that
:func:`gradgraph.convert.trace.trace_model` returns, and nothing else of the trace. The layout:

* **nodes** — the neuron sets in the order the forward created them (the input first),
  each split where an attention op gave its neurons different roles (a fused ``qkv``
  output becomes query, key and value sets). ``layer`` is the set's depth (the longest path
  from the input, as in the MLP and stock attention layouts),
  ``position`` the neuron's rank in its permutation orbit (its index in the set for
  sets that are not tied to others).
* **components** — ``B = b * K`` where ``K`` counts the position keys the trace used
  (tokens, a class token, pooled vectors); component ``i * K + k`` is key ``k`` of
  datapoint ``i``. A neuron that does not live at a key holds 0 there, which keeps every
  per-sample gradient exact: both ends of a weight live at the same keys.
* **edges** — one per weight entry (row-major over the weight, as the MLP converter), per
  embedding-table entry, per norm scale, and the structural relations (residual,
  gate, merge, attention) with weight 1 and no parameter.
* **symmetry** — ties (residual adds, gates, norms, merges) join neuron sets into classes
  whose members one permutation must move together; a class is *fixed* if any member is
  read by the loss or the output, is an input or a table's rows, meets a constant that
  differs between its neurons, or is used by an op gradgraph cannot follow. Attention
  heads are blocks (query with key, value with output tied). Everything else is free:
  ``perm_group`` / ``perm_block`` / ``perm_tie`` / ``position`` describe exactly that group
  (see :mod:`gradgraph.symmetry.permutation`).
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

from gradgraph.convert.blocks import UnionFind, parallel_blocks
from gradgraph.convert.plan import TracePlan, plan_records, slot_copy
from gradgraph.convert.trace import NeuronSet, TraceResult
from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, EdgeKind, NodeKind

# --------------------------------------------------------------------- layout
def _roles(trace: TraceResult) -> Tensor:
    """Per node: the NodeKind an attention op gave it, or -1."""
    roles = torch.full((trace.num_nodes,), -1, dtype=torch.long)
    for block in trace.attention:
        for q, k, v, o in block:
            roles[q], roles[k], roles[v], roles[o] = (int(NodeKind.QUERY), int(NodeKind.KEY), int(NodeKind.VALUE),
                                                      int(NodeKind.ATTENTION))
    return roles


def _tied_cuts(trace: TraceResult) -> set[int]:
    """``trace.cuts`` carried across ties: a set tied neuron for neuron to a cut set is cut at
    the same places (a group norm's groups cut the channels, and so the taps and pooled copies
    of those channels), else one tie would join pieces to a whole set and pin them all.

    A walk from the cuts over the tied pairs (one pass over the ties, then each cut once): a
    CNN has thousands of ties, and a round over all of them per hop took most of its conversion.
    """
    cuts = set(trace.cuts)
    if not cuts:
        return cuts
    partners: dict[int, list[int]] = {}
    for a, b in trace.ties:
        for first, second in zip(a.tolist(), b.tolist()):
            partners.setdefault(first, []).append(second)
            partners.setdefault(second, []).append(first)
    pending = list(cuts)
    while pending:
        for partner in partners.get(pending.pop(), ()):
            if partner not in cuts:
                cuts.add(partner)
                pending.append(partner)
    return cuts


def _final_sets(trace: TraceResult, roles: Tensor) -> tuple[Tensor, list[tuple[NeuronSet, int, int, int]]]:
    """Split created sets where roles change; returns ``(set_of_node [N], [(created, start, stop, role)])``."""
    pieces: list[tuple[NeuronSet, int, int, int]] = []
    set_of_node = torch.empty(trace.num_nodes, dtype=torch.long)
    all_cuts = sorted(_tied_cuts(trace))
    for neuron_set in trace.sets:
        start = neuron_set.first
        stop = neuron_set.first + neuron_set.size
        role = roles[start:stop]
        changes = (torch.nonzero(role[1:] != role[:-1]).flatten() + 1 + start).tolist()
        # trace.cuts: where a fused output is split into parts that must not share a set (w12.chunk)
        inside = all_cuts[bisect.bisect_right(all_cuts, start):bisect.bisect_left(all_cuts, stop)]
        cuts = sorted({start, stop, *changes, *inside})
        for low, high in zip(cuts, cuts[1:]):
            set_of_node[low:high] = len(pieces)
            pieces.append((neuron_set, low, high, int(roles[low])))
    return set_of_node, pieces


def make_plan(trace: TraceResult) -> TracePlan:
    """The value-free part of the graph: layout, labels, group, slots, where factors come from."""
    num_nodes = trace.num_nodes
    roles = _roles(trace)
    set_of_node, pieces = _final_sets(trace, roles)
    reaching_output = trace.output_sets
    acts, grads, onehots, num_keys = plan_records(trace)

    # ---- edges
    sources, targets, kinds, params, positions = [], [], [], [], []
    weights: dict[int, tuple[list[tuple[int, int]], list[Tensor]]] = {}
    edge_count = 0
    for src, dst, kind, param, pos, _ in trace.edges:
        sources.append(src)
        targets.append(dst)
        kinds.append(int(kind))
        params.append(param)
        positions.append(pos if pos is not None else torch.full((len(src),), -1, dtype=torch.long))
        if param >= 0:
            rows, places = weights.setdefault(param, ([], []))
            rows.append((edge_count, edge_count + len(src)))
            places.append(pos)
        edge_count += len(src)
    # per-group labels expanded in one op each, and the edge index written in place: the O(E)
    # work of a first conversion is a few copies
    group_sizes = [len(src) for src in sources]
    edge_index = torch.empty(2, edge_count, dtype=torch.long)
    if sources:
        torch.cat(sources, out=edge_index[0])
        torch.cat(targets, out=edge_index[1])
    edge_kind = _per_group(kinds, group_sizes)
    edge_param = _per_group(params, group_sizes)
    if edge_count and bool((edge_index < 0).any()):
        # a rule made an edge from a value that holds no neuron (node -1); a message-passing layer would read
        # it as the last node, so the graph would be silently wrong: refuse it
        bad = int((edge_index < 0).any(0).nonzero()[0])
        raise GradGraphError(
            f"gradgraph made an edge of kind {EdgeKind(int(edge_kind[bad])).name} into node {int(edge_index[1, bad])} "
            "from a value that holds no neuron (a statistic such as a sum over the features, used as if it held "
            "neurons); this model is not supported. Please report it with the model")

    # ---- node labels
    node_param = torch.full((num_nodes,), -1, dtype=torch.long)
    node_param_pos = torch.full((num_nodes,), -1, dtype=torch.long)
    biases: list[tuple[str, Tensor, Tensor]] = []
    activation = torch.full((num_nodes,), int(ActivationKind.IDENTITY), dtype=torch.long)
    for neuron_set in trace.sets:
        rows = slice(neuron_set.first, neuron_set.first + neuron_set.size)
        if neuron_set.bias_param >= 0:
            node_param[rows] = neuron_set.bias_param
            node_param_pos[rows] = neuron_set.bias_pos
            biases.append((trace.param_names[neuron_set.bias_param], torch.arange(rows.start, rows.stop),
                           neuron_set.bias_pos.clone()))
        label = neuron_set.activation
        if getattr(neuron_set, "elementwise_ops", 0) and label is not ActivationKind.IDENTITY:
            label = ActivationKind.OTHER
        elif getattr(neuron_set, "elementwise_ops", 0) and neuron_set.created_by == "affine" \
                and not neuron_set.absorbed:
            label = ActivationKind.OTHER
        activation[rows] = int(label)

    # ---- symmetry classes over final sets
    union = UnionFind(len(pieces))
    node_union = UnionFind(num_nodes)
    for a, b in trace.ties:
        for x, y in zip(a.tolist(), b.tolist()):
            union.union(int(set_of_node[x]), int(set_of_node[y]))
            node_union.union(x, y)
    shared_ties, shared_pinned = _shared_parameter_ties(trace)
    for a, b in shared_ties:
        for x, y in zip(a.tolist(), b.tolist()):
            union.union(int(set_of_node[x]), int(set_of_node[y]))
            node_union.union(x, y)
    for block in trace.attention:
        for q, k, v, o in block:
            for nodes in (k, v, o):
                union.union(int(set_of_node[q[0]]), int(set_of_node[nodes[0]]))
        first = block[0][0][0]
        for q, _, _, _ in block[1:]:
            union.union(int(set_of_node[first]), int(set_of_node[q[0]]))
    has_attention = bool(trace.attention)
    classes: dict[int, list[int]] = {}
    for index in range(len(pieces)):
        classes.setdefault(union.find(index), []).append(index)

    node_kind = torch.empty(num_nodes, dtype=torch.long)
    for index, (neuron_set, low, high, role) in enumerate(pieces):
        kind = neuron_set.kind
        if role >= 0:
            kind = NodeKind(role)
        elif neuron_set.index in reaching_output and neuron_set.created_by not in ("input", "token"):
            kind = NodeKind.OUTPUT
        elif neuron_set.created_by == "affine" and (not neuron_set.absorbed or getattr(neuron_set, "gated", False)):
            members = classes[union.find(index)]
            plain = all(pieces[m][0].created_by == "affine"
                        and (not pieces[m][0].absorbed or getattr(pieces[m][0], "gated", False)) for m in members)
            if plain:
                kind = NodeKind.FFN_HIDDEN if (has_attention or len(members) > 1) else NodeKind.HIDDEN
            else:
                kind = NodeKind.RESIDUAL
        elif neuron_set.created_by == "affine":
            kind = NodeKind.RESIDUAL
        node_kind[low:high] = int(kind)

    # affine edges named by what they feed, as the stock attention layout names them
    renamed = (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION, NodeKind.FFN_HIDDEN)
    if len(edge_kind) and bool(torch.isin(node_kind, torch.tensor([int(kind) for kind in renamed])).any()):
        # O(E) masks per label: only for graphs that have such nodes (not MLP chains)
        src_kind, dst_kind = node_kind[edge_index[0]], node_kind[edge_index[1]]
        affine = edge_kind == int(EdgeKind.LINEAR)
        for kinds, side, label in (
            (NodeKind.QUERY, dst_kind, EdgeKind.QUERY), (NodeKind.KEY, dst_kind, EdgeKind.KEY),
            (NodeKind.VALUE, dst_kind, EdgeKind.VALUE), (NodeKind.ATTENTION, src_kind, EdgeKind.ATTENTION_OUT),
            (NodeKind.FFN_HIDDEN, dst_kind, EdgeKind.FFN_IN), (NodeKind.FFN_HIDDEN, src_kind, EdgeKind.FFN_OUT),
        ):
            edge_kind[affine & (side == int(kinds))] = int(label)

    perm_group = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_block = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_tie = torch.full((num_nodes,), -1, dtype=torch.long)
    position = torch.empty(num_nodes, dtype=torch.long)
    for index, (_, low, high, _) in enumerate(pieces):
        position[low:high] = torch.arange(high - low)
    attention_nodes = roles >= 0

    def class_nodes(root: int) -> Tensor:
        return torch.cat([torch.arange(pieces[m][1], pieces[m][2]) for m in classes[root]])

    ranks_of_class: dict[int, Tensor | None] = {}

    def free_ranks(root: int) -> Tensor | None:
        """The flat ranks of a class no rule fixes and no attention op splits into heads, else ``None``."""
        if root not in ranks_of_class:
            ranks_of_class[root] = _free_ranks(root)
        return ranks_of_class[root]

    def fixed(root: int) -> bool:
        # the one place that fixes token-table and position rows (a token id names its row): the
        # embedding rules leave their sets unpinned and are recognised here by created_by
        return any(s.pinned or s.index in shared_pinned or s.index in reaching_output
                   or s.created_by in ("input", "token") for s in (pieces[m][0] for m in classes[root]))

    def _free_ranks(root: int) -> Tensor | None:
        nodes = class_nodes(root)
        if fixed(root) or bool(attention_nodes[nodes].any()):
            return None
        slots = torch.tensor([node_union.find(n) for n in nodes.tolist()])
        return _flat_ranks(nodes, slots, set_of_node)

    layer = _depths(trace.edges, set_of_node, len(pieces), _back_pieces(trace, pieces))
    edge_param_pos = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
    root_of_piece = {index: root for root, members in classes.items() for index in members}
    labels = (layer, node_kind, activation)

    def class_sets(root: int) -> list[int]:
        return [pieces[m][0].index for m in classes[root]]

    blocked = parallel_blocks(trace, set_of_node, root_of_piece, free_ranks, class_nodes, class_sets, labels,
                              (edge_index, edge_kind, edge_param, edge_param_pos), (node_param, node_param_pos))
    in_blocks = {root: first for first, blocks in blocked.items() for block in blocks for root in block}
    group = 0
    for root in sorted(classes):
        if root in in_blocks:
            if in_blocks[root] != root:
                continue
            # whole groups of a grouped op move together: each group a block, each class of it a tie
            for block_index, block in enumerate(blocked[root]):
                for tie_index, member in enumerate(block):
                    nodes = class_nodes(member)
                    position[nodes] = free_ranks(member)
                    perm_block[nodes] = block_index
                    perm_tie[nodes] = tie_index
                    perm_group[nodes] = group
            group += 1
            continue
        nodes = class_nodes(root)
        if bool(attention_nodes[nodes].any()):
            if fixed(root) or not bool(attention_nodes[nodes].all()) or not _assign_heads(
                    trace, nodes, set_of_node, perm_block, perm_tie, position, pieces):
                continue
        else:
            ranks = free_ranks(root)
            if ranks is None:
                continue
            position[nodes] = ranks
            perm_block[nodes] = 0
            perm_tie[nodes] = 0
        perm_group[nodes] = group
        group += 1

    structure = {
        "edge_index": edge_index,
        "layer": layer,
        "node_kind": node_kind,
        "edge_kind": edge_kind,
        "activation": activation,
        "perm_group": perm_group,
        "perm_block": perm_block,
        "perm_tie": perm_tie,
        "position": position,
        "node_param": node_param,
        "node_param_pos": node_param_pos,
        "edge_param": edge_param,
        "edge_param_pos": edge_param_pos,
    }
    return TracePlan(
        fingerprints=list(trace.fingerprints),
        guards=dict(trace.value_guards),
        fold_time=trace.fold_time,
        act=acts,
        grad=grads,
        onehot=onehots,
        structure=structure,
        weights=[slot_copy(trace.param_names[param], _edge_rows(rows),
                            places[0] if len(places) == 1 else torch.cat(places))
                 for param, (rows, places) in weights.items()],
        biases=[slot_copy(name, rows, places) for name, rows, places in biases],
        param_names=list(trace.param_names),
        param_shapes=[list(shape) for shape in trace.param_shapes],
        num_nodes=num_nodes,
        num_edges=int(edge_index.shape[1]),
        num_keys=num_keys,
        set_names=[(neuron_set.first, neuron_set.size, neuron_set.origin) for neuron_set in trace.sets],
    )


def _per_group(values: list[int], sizes: list[int]) -> Tensor:
    """``[E]``: ``values[g]`` repeated over group ``g``'s ``sizes[g]`` edges, one fill per run of
    equal values (``repeat_interleave`` over the O(E) output was ~13 ms at 1M weights)."""
    result = torch.empty(sum(sizes), dtype=torch.long)
    start = index = 0
    while index < len(values):
        stop = start
        value = values[index]
        while index < len(values) and values[index] == value:
            stop += sizes[index]
            index += 1
        result[start:stop] = value
        start = stop
    return result


def _shared_parameter_ties(trace: TraceResult) -> tuple[list[tuple[Tensor, Tensor]], set[int]]:
    """Node pairs one permutation must move together because they share a parameter entry, and
    the sets that sharing pins: ``(ties, pinned set indices)``.

    A weight used at two call sites (a layer applied twice, a tied embedding and head) moves
    as one: the neurons its rows meet at one site move with those they meet at the other, and
    so do the neurons its columns meet. Which end of an edge meets the rows is read per call
    site (the destination for a linear map, the table row for an embedding, the source for a
    transposed use); a site where neither end is a function of the row is pinned.
    """
    uses: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for src, dst, _, param, pos, _ in trace.edges:
        if param >= 0:
            uses.setdefault(param, []).append((src, dst, pos))
    for neuron_set in trace.sets:  # a bias is a weight whose "row" is its neuron
        if neuron_set.bias_param >= 0:
            nodes = neuron_set.first + torch.arange(neuron_set.size)
            uses.setdefault(neuron_set.bias_param, []).append((nodes, nodes, neuron_set.bias_pos))
    ties: list[tuple[Tensor, Tensor]] = []
    pinned: set[int] = set()
    for param, sites in uses.items():
        if len(sites) < 2:
            only = sites[0][2]
            if only.numel() == 0 or bool((only == only[0]).all()) or not bool((torch.bincount(only) > 1).any()):
                continue  # one site using each entry once, or one entry everywhere: nothing is shared
        shape = trace.param_shapes[param]
        numel, columns = math.prod(shape), (shape[-1] if len(shape) >= 2 else 1)
        row_node = torch.full((numel,), -1, dtype=torch.long)
        column_node = torch.full((numel,), -1, dtype=torch.long)
        # sites that share no entry with another (the groups of a grouped convolution, each a
        # slice of the weight) tie nothing: only shared entries make one permutation move both
        uses_of_entry = torch.bincount(torch.cat([pos for _, _, pos in sites]), minlength=numel)
        for src, dst, pos in sites:
            if bool((uses_of_entry[pos] == 1).all()):
                continue
            rows, cols = pos // columns, pos % columns
            if _is_function(dst, rows) and _is_function(src, cols):
                at_row, at_column = dst, src
            elif _is_function(src, rows) and _is_function(dst, cols):
                at_row, at_column = src, dst
            else:
                for node in torch.cat((src, dst)).unique().tolist():
                    pinned.add(trace.set_of(node).index)
                continue
            for table, nodes in ((row_node, at_row), (column_node, at_column)):
                seen = table[pos] >= 0
                if bool(seen.any()):
                    pairs = torch.unique(torch.stack((table[pos][seen], nodes[seen])), dim=1)
                    ties.append((pairs[0], pairs[1]))
                table[pos[~seen]] = nodes[~seen]
                # an entry used twice in one site (a norm's weight shared by every head's features): the
                # nodes it meets there move together too -- unless the site uses one entry only (PReLU's one
                # slope), which any permutation keeps
                again = table[pos[~seen]] != nodes[~seen]
                if bool(again.any()) and not bool((pos == pos[0]).all()):
                    pairs = torch.unique(torch.stack((table[pos[~seen]][again], nodes[~seen][again])), dim=1)
                    ties.append((pairs[0], pairs[1]))
    return ties, pinned


def _is_function(nodes: Tensor, index: Tensor) -> bool:
    """Whether every node meets one value of ``index`` (its row or column of the weight)."""
    pairs = torch.unique(torch.stack((nodes, index)), dim=1)
    return pairs.shape[1] == torch.unique(nodes).numel()


#: relations between neurons of one step (a head's query and key dims, the two factors of a
#: gate): they do not make one neuron deeper than the other
_SAME_DEPTH_EDGES = (int(EdgeKind.QUERY_KEY), int(EdgeKind.GATE))


def _edge_rows(ranges: list[tuple[int, int]]) -> Tensor | slice:
    """The edge rows of one parameter's call sites: a slice for one site (no O(E) index)."""
    if len(ranges) == 1:
        return slice(*ranges[0])
    return torch.cat([torch.arange(start, stop) for start, stop in ranges])


def _back_pieces(trace: TraceResult, pieces: list) -> set[int]:
    """The pieces that are previous-state copies of a loop run folded (``trace/rules_recurrent.py``)."""
    return {index for index, (neuron_set, *_) in enumerate(pieces) if neuron_set.created_by == "previous"}


def _depths(edges: list[tuple], set_of_node: Tensor, num_sets: int, back: set[int] = frozenset()) -> Tensor:
    """``[N]`` depth of every node: the longest path from an input over the edges, by neuron set.

    The MLP chain's layer index and the stock attention layout's depth (query, key and value
    one step after the stream they read, merged heads one after them) are both this number.
    ``edges``: the trace's edge groups ``(src, dst, kind, ...)``. ``back``: the previous-state
    copies of folded loops; an edge into one from a later set (the state ``h_t -> P``, which
    step ``t + 1`` reads) closes the loop over time and does not count, so a copy is as deep as
    what it copies before the loop (0 for a constant initial state).
    """
    codes_of_groups = []
    for src, dst, kind, *_ in edges:
        if int(kind) in _SAME_DEPTH_EDGES or not len(src):
            continue
        # sets are consecutive node ranges in node order, so a group whose lowest and highest
        # source (and target) fall in one set relates one pair of sets: no O(edges) gather
        (src_min, src_max), (dst_min, dst_max) = torch.aminmax(src), torch.aminmax(dst)
        ends = [int(set_of_node[int(node)]) for node in (src_min, dst_min, src_max, dst_max)]
        if ends[0] == ends[2] and ends[1] == ends[3]:
            codes_of_groups.append(torch.tensor([ends[0] * num_sets + ends[1]]))
        else:
            codes_of_groups.append(torch.unique(set_of_node[src] * num_sets + set_of_node[dst]))
    codes = torch.unique(torch.cat(codes_of_groups)) if codes_of_groups else torch.empty(0, dtype=torch.long)
    pairs = torch.stack((codes // num_sets, codes % num_sets))
    pairs = pairs[:, pairs[0] != pairs[1]]
    if back:  # the edges that close a folded loop: into a previous-state copy from a later set
        closing = torch.isin(pairs[1], torch.tensor(sorted(back))) & (pairs[0] > pairs[1])
        pairs = pairs[:, ~closing]
    depth = torch.zeros(num_sets, dtype=torch.long)
    for _ in range(num_sets):  # relaxation: at most one round per set on a longest path
        deeper = depth.scatter_reduce(0, pairs[1], depth[pairs[0]] + 1, reduce="amax")
        if torch.equal(deeper, depth):
            return depth[set_of_node]
        depth = deeper
    raise GradGraphError("internal: the traced neuron sets form a cycle")


def _flat_ranks(nodes: Tensor, slots: Tensor, set_of_node: Tensor) -> Tensor | None:
    """Rank of every node's orbit slot, if each slot holds exactly one node of every member set."""
    unique_slots, slot_index = torch.unique(slots, return_inverse=True)
    member_sets = set_of_node[nodes]
    num_sets = len(torch.unique(member_sets))
    counts = torch.bincount(slot_index, minlength=len(unique_slots))
    if not bool((counts == num_sets).all()):
        return None
    distinct = torch.unique(slot_index * (int(member_sets.max()) + 1) + member_sets)  # (slot, set) pairs
    if distinct.numel() != len(nodes):
        return None
    # rank slots by the order of the first member set's nodes, so an untied set keeps its order
    first_set = member_sets.min()
    order = torch.full((len(unique_slots),), -1, dtype=torch.long)
    in_first = member_sets == first_set
    order[slot_index[in_first]] = torch.arange(int(in_first.sum()))
    if bool((order < 0).any()):
        return None
    return order[slot_index]


def _assign_heads(trace: TraceResult, nodes: Tensor, set_of_node: Tensor, perm_block: Tensor, perm_tie: Tensor,
                  position: Tensor, pieces: list) -> bool:
    """Heads as blocks of one attention op; q/k tied (tie 0), v/o tied (tie 1)."""
    node_set = set(nodes.tolist())
    blocks = [block for block in trace.attention if int(block[0][0][0]) in node_set]
    if len(blocks) != 1:
        return False
    block = blocks[0]
    covered = torch.cat([torch.cat(head) for head in block])
    if len(covered) != len(nodes) or set(covered.tolist()) != node_set:
        return False
    for head, (q, k, v, o) in enumerate(block):
        perm_block[torch.cat((q, k, v, o))] = head
        perm_tie[torch.cat((q, k))] = 0
        perm_tie[torch.cat((v, o))] = 1
        for rows in (q, k, v, o):
            position[rows] = head * len(rows) + torch.arange(len(rows))
    return True
