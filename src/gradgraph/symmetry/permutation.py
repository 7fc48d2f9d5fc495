"""Permutation symmetries: hidden neurons of a network, nodes of a graph, components.

Conventions: a *layer permutation* ``perm`` (a ``LongTensor [d]``) uses gather order,
as ``x[perm]`` does: new neuron ``i`` is old neuron ``perm[i]``. A *node permutation*
``node_perm [N]`` of a graph maps old node ``n`` to new node ``node_perm[n]``.

The symmetry group of a graph is described by three node fields. Nodes of one
``perm_group`` may be exchanged; a group is made of ``perm_block`` blocks that a symmetry
may permute as wholes (the heads of an attention block; an MLP layer is one block), and
inside a block the nodes of every kind at the same rank of one ``perm_tie`` move
together (query dim ``i`` with key dim ``i``, value dim ``i`` with output dim ``i``). A
group element is therefore a permutation of blocks plus, per block and tie, a
permutation of ranks. Graphs without ``perm_block``/``perm_tie`` (built by older
converters) are read as one block and one tie per group.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradgraph.convert.mlp import mlp_layers
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph

__all__ = [
    "edge_permutation",
    "hidden_perms_to_node_permutation",
    "move_values",
    "perm_structure",
    "permute_components",
    "permute_hidden",
    "permute_model",
    "permute_nodes",
    "random_hidden_perms",
    "random_node_permutation",
]

# Values that move with their node / edge; every other field describes the architecture.
NODE_VALUE_KEYS = ("x", "act", "grad", "component_x")
EDGE_VALUE_KEYS = ("edge_attr",)
# Labels a symmetry must preserve: a node may only move to a slot with the same labels.
NODE_LABEL_KEYS = ("layer", "node_kind", "activation", "perm_group", "perm_tie")


def _check_layer_perms(sizes: Sequence[int], perms: Sequence[Tensor], what: str) -> list[Tensor]:
    if len(perms) != len(sizes):
        raise GradGraphError(f"{what}: expected {len(sizes)} permutations (one per hidden layer), got {len(perms)}")
    checked = []
    for index, (size, perm) in enumerate(zip(sizes, perms)):
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (size,) or not torch.equal(torch.sort(perm).values, torch.arange(size)):
            raise GradGraphError(
                f"{what}: permutation {index} must be a permutation of range({size}), got shape {list(perm.shape)}"
            )
        checked.append(perm)
    return checked


def random_hidden_perms(model: nn.Module, generator: torch.Generator | None = None) -> list[Tensor]:
    """One random permutation ``[d_l]`` per hidden layer of an MLP chain."""
    layers = mlp_layers(model)
    return [torch.randperm(layer.linear.out_features, generator=generator) for layer in layers[:-1]]


def permute_hidden(target: nn.Module | GradGraph, perms: Sequence[Tensor]) -> nn.Module | GradGraph:
    """Permute the hidden neurons of an MLP chain, or the same action on its graph.

    For a model, returns a permuted deep copy that computes the same function: rows of
    ``W_l`` and ``b_l`` and columns of ``W_{l+1}`` are permuted by ``perms[l]``. For a
    GradGraph, returns the graph of that permuted model (see :func:`permute_nodes`).

    Args:
        target: an MLP chain, or the GradGraph of one.
        perms: one ``LongTensor [d_l]`` per hidden layer, gather order.
    """
    if isinstance(target, GradGraph):
        return permute_nodes(target, hidden_perms_to_node_permutation(target, perms))
    model = copy.deepcopy(target)
    layers = mlp_layers(model)
    perms = _check_layer_perms([layer.linear.out_features for layer in layers[:-1]], perms, "permute_hidden")
    with torch.no_grad():
        for layer, following, perm in zip(layers, layers[1:], perms):
            layer.linear.weight.copy_(layer.linear.weight[perm])
            if layer.linear.bias is not None:
                layer.linear.bias.copy_(layer.linear.bias[perm])
            following.linear.weight.copy_(following.linear.weight[:, perm])
    return model


def hidden_perms_to_node_permutation(graph: GradGraph, perms: Sequence[Tensor]) -> Tensor:
    """The node permutation ``[N]`` of an MLP graph that matches per-layer ``perms``."""
    groups = sorted(int(g) for g in torch.unique(graph.perm_group[graph.perm_group >= 0]))
    sizes = [int((graph.perm_group == group).sum()) for group in groups]
    perms = _check_layer_perms(sizes, perms, "permute_hidden")
    node_perm = torch.arange(graph.num_nodes)
    for group, perm in zip(groups, perms):
        nodes = torch.nonzero(graph.perm_group == group).flatten()
        nodes = nodes[torch.argsort(graph.position[nodes])]
        # old neuron perm[i] becomes new neuron i
        node_perm[nodes[perm]] = nodes
    return node_perm


def permute_nodes(graph: GradGraph, node_perm: Tensor) -> GradGraph:
    """Move node and edge values between slots: old node ``n`` becomes node ``node_perm[n]``.

    Values (``x``, ``act``, ``grad``, ``edge_attr``) move; the architecture's slot
    description (``edge_index``, ``*_param*``, ``position``, labels) stays. The edge
    ``s -> d`` moves to the slot ``node_perm[s] -> node_perm[d]`` of the same kind.
    Works on a single graph and on a ``Batch``.

    Raises:
        GradGraphError: if ``node_perm`` is not a permutation, moves a node to a slot with
            another layer, kind, activation or permutation group, or maps an edge to a
            pair of nodes that no edge of the same kind joins (not a symmetry).
    """
    num_nodes = graph.num_nodes
    node_perm = torch.as_tensor(node_perm, dtype=torch.long, device=graph.edge_index.device)
    if node_perm.shape != (num_nodes,) or not torch.equal(
        torch.sort(node_perm).values, torch.arange(num_nodes, device=node_perm.device)
    ):
        raise GradGraphError(f"permute_nodes: node_perm must be a permutation of range({num_nodes})")
    for key in NODE_LABEL_KEYS + ("batch",):
        labels = getattr(graph, key, None)
        if isinstance(labels, Tensor) and not torch.equal(labels[node_perm], labels):
            raise GradGraphError(f"permute_nodes: the permutation moves nodes across different '{key}' values")
    result = graph.clone()
    for key in NODE_VALUE_KEYS:
        if getattr(graph, key, None) is not None:  # component_x is optional
            setattr(result, key, move_values(getattr(graph, key), node_perm))

    destination = edge_permutation(graph, node_perm)
    for key in EDGE_VALUE_KEYS:
        setattr(result, key, move_values(getattr(graph, key), destination))
    return result


def move_values(values: Tensor, destination: Tensor) -> Tensor:
    """Scatter rows to new places: row ``r`` of ``values`` goes to row ``destination[r]``.

    Use it with a node permutation for ``[N, ...]`` node values and with
    :func:`edge_permutation` for ``[E, ...]`` edge values, e.g. to say how a model's
    per-edge output must move when its input graph is permuted.
    """
    moved = torch.empty_like(values)
    moved[destination] = values
    return moved


def edge_permutation(graph: GradGraph, node_perm: Tensor) -> Tensor:
    """Where every edge goes under a node permutation: ``[E]``, old edge -> new edge slot.

    The edge ``s -> d`` of kind ``k`` goes to the slot ``node_perm[s] -> node_perm[d]`` of
    kind ``k``.

    Raises:
        GradGraphError: if some edge has no such slot (``node_perm`` is not a symmetry of
            the architecture) or the graph has parallel edges of one kind.
    """
    num_nodes = graph.num_nodes
    node_perm = torch.as_tensor(node_perm, dtype=torch.long, device=graph.edge_index.device)
    src, dst = graph.edge_index
    kind = graph.edge_kind
    slot_key = (kind * num_nodes + dst) * num_nodes + src
    moved_key = (kind * num_nodes + node_perm[dst]) * num_nodes + node_perm[src]
    order = torch.argsort(slot_key)
    sorted_keys = slot_key[order]
    if sorted_keys.numel() > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise GradGraphError("edge_permutation: the graph has parallel edges of one kind; slots are ambiguous")
    found = torch.searchsorted(sorted_keys, moved_key).clamp_(max=max(len(order) - 1, 0))
    if len(order) and not torch.equal(sorted_keys[found], moved_key):
        raise GradGraphError("edge_permutation: the permutation maps an edge onto no edge; it is not a symmetry")
    return order[found]


def perm_structure(graph: GradGraph) -> tuple[Tensor, Tensor, Tensor]:
    """``(perm_group, perm_block, perm_tie)``, each ``[N]``; defaults where a graph lacks the last two.

    Without ``perm_block``/``perm_tie`` every group is one block with one tie (MLP layers).
    """
    group = graph.perm_group
    default = torch.where(group >= 0, torch.zeros_like(group), torch.full_like(group, -1))
    block = getattr(graph, "perm_block", None)
    tie = getattr(graph, "perm_tie", None)
    return group, default if block is None else block, default if tie is None else tie


def _tied_table(nodes: Tensor, kinds: Tensor, position: Tensor, where: str) -> Tensor:
    """``[K, n]``: the nodes of one (block, tie), one row per neuron set, each row sorted by position.

    Nodes of one kind (``kinds`` is kind and layer) are one row, or several tied sets of that
    kind and depth (the two inputs of a gated unit): each set is a run of consecutive node
    indices holding every position once, so they split into runs of ``n`` in index order.
    """
    rows = []
    for kind in torch.unique(kinds).tolist():
        members = torch.sort(nodes[kinds == kind]).values
        width = len(torch.unique(position[members]))
        if len(members) % width:
            raise GradGraphError(f"random_node_permutation: {where} ties sets whose positions do not match")
        for run in members.reshape(-1, width):
            if len(torch.unique(position[run])) != width:
                raise GradGraphError(f"random_node_permutation: {where} ties sets whose positions do not match")
            rows.append(run[torch.argsort(position[run])])
    if len({len(row) for row in rows}) != 1:
        raise GradGraphError(f"random_node_permutation: {where} ties kinds with different numbers of nodes")
    return torch.stack(rows)


def random_node_permutation(graph: GradGraph, generator: torch.Generator | None = None) -> Tensor:
    """A random node permutation ``[N]``: a uniform element of the graph's symmetry group.

    In every permutation group the blocks are shuffled, then inside every block and tie
    the ranks are shuffled, moving the tied nodes of all kinds together (see the module
    docstring). Nodes with ``perm_group == -1`` stay; in a ``Batch`` each graph's groups
    are shuffled independently.

    Raises:
        GradGraphError: if the blocks of a group differ in structure, or a tie joins kinds
            with different numbers of nodes.
    """
    group, block, tie = perm_structure(graph)
    batch = getattr(graph, "batch", None)
    key = group if batch is None else batch * (int(group.max()) + 2) + group + 1
    key = torch.where(group >= 0, key, torch.full_like(key, -1))
    # a row of a tie is one neuron set: nodes of one kind and one layer (a traced residual
    # stream ties several sets of one kind; _tied_table splits sets of one kind and depth)
    kinds = graph.node_kind * (int(graph.layer.max()) + 1 if graph.num_nodes else 1) + graph.layer
    node_perm = torch.arange(graph.num_nodes)
    for value in torch.unique(key[key >= 0]).tolist():
        nodes = torch.nonzero(key == value).flatten()
        blocks = torch.unique(block[nodes]).tolist()
        one_set = len(torch.unique(kinds[nodes])) == 1 and len(torch.unique(graph.position[nodes])) == len(nodes)
        if len(blocks) == 1 and len(torch.unique(tie[nodes])) == 1 and one_set:
            # One flat set of interchangeable neurons (an MLP layer, FFN hidden neurons).
            node_perm[nodes] = nodes[torch.randperm(len(nodes), generator=generator)]
            continue
        # tables[b][t] = [K, n] nodes of block b, tie t; all blocks must look alike.
        tables = []
        for value_block in blocks:
            in_block = nodes[block[nodes] == value_block]
            ties = torch.unique(tie[in_block]).tolist()
            tables.append(
                {
                    value_tie: _tied_table(
                        in_block[tie[in_block] == value_tie], kinds[in_block[tie[in_block] == value_tie]],
                        graph.position, f"group {value}, block {value_block}, tie {value_tie}",
                    )
                    for value_tie in ties
                }
            )
        shapes = [{t: (tuple(graph.node_kind[table[:, 0]].tolist()), table.shape[1]) for t, table in by_tie.items()}
                  for by_tie in tables]
        if any(shape != shapes[0] for shape in shapes):
            raise GradGraphError(f"random_node_permutation: the blocks of permutation group {value} differ")
        block_perm = torch.randperm(len(blocks), generator=generator)
        for new_block, old_block in enumerate(block_perm.tolist()):
            for value_tie, old_table in tables[old_block].items():
                new_table = tables[new_block][value_tie]
                ranks = torch.randperm(old_table.shape[1], generator=generator)
                # old rank ranks[i] of the old block becomes rank i of the new block
                node_perm[old_table[:, ranks]] = new_table
    return node_perm


def permute_model(model: nn.Module, graph: GradGraph, node_perm: Tensor) -> nn.Module:
    """Apply a node permutation of ``graph`` to the model it was converted from.

    Works for any converted model, through the parameter slots: the permuted graph's weights
    and biases are written back with :meth:`GradGraph.to_parameters` into a deep copy of
    ``model``. Parameters the graph does not cover (and buffers other than a BatchNorm's running
    statistics, which move with its channels) are left as they are. For
    ``node_perm`` from :func:`random_node_permutation` the result computes the same function
    and converts to ``permute_nodes(graph, node_perm)`` (tested on MLPs, residual MLPs,
    GPT-, BERT- and ViT-style models).

    Args:
        model: the model ``graph`` was converted from.
        graph: its GradGraph (one graph, not a Batch).
        node_perm: ``[N]``, old node ``n`` becomes node ``node_perm[n]``; must be a symmetry
            of the graph (:func:`permute_nodes` checks it).

    Returns:
        The permuted copy of ``model``.
    """
    permuted = permute_nodes(graph, node_perm)
    values = permuted.to_parameters(permuted.weight, permuted.bias)
    result = copy.deepcopy(model)
    named = dict(result.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if name not in named:
                raise GradGraphError(f"permute_model: the graph has parameter '{name}', which the model lacks")
            named[name].copy_(value.to(named[name].dtype))
        _move_running_statistics(result, graph, node_perm)
    return result


def _move_running_statistics(model: nn.Module, graph: GradGraph, node_perm: Tensor) -> None:
    """A BatchNorm's running statistics (buffers, no slots of the graph) move as its bias does:
    the channel whose bias node goes to the slot of channel ``c'`` takes statistic ``c'``. The
    converter lets a BatchNorm's channels move only when the statistics it read are those of the
    module that owns its bias (``trace/rules_elementwise.py``), so this is the whole action."""
    node_perm = torch.as_tensor(node_perm, dtype=torch.long)
    for module_name, module in model.named_modules():
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if not isinstance(mean, Tensor) or not isinstance(var, Tensor) or getattr(module, "bias", None) is None:
            continue
        bias_name = f"{module_name}.bias" if module_name else "bias"
        if bias_name not in graph.param_names:
            continue
        nodes = torch.nonzero(graph.node_param == graph.param_names.index(bias_name)).flatten()
        old_channel, new_channel = graph.node_param_pos[nodes], graph.node_param_pos[node_perm[nodes]]
        for buffer in (mean, var):
            moved = buffer.clone()
            moved[new_channel] = buffer[old_channel]
            buffer.copy_(moved)


def permute_components(graph: GradGraph, perm: Tensor) -> GradGraph:
    """Reorder the components: new component ``i`` is old component ``perm[i]``.

    Works on a graph and on a ``Batch`` (the same order for every graph).
    """
    perm = torch.as_tensor(perm, dtype=torch.long)
    size = graph.act.shape[1]
    if perm.shape != (size,) or not torch.equal(torch.sort(perm).values, torch.arange(size)):
        raise GradGraphError(f"permute_components: perm must be a permutation of range({size})")
    result = graph.clone()
    result.act = graph.act[:, perm]
    result.grad = graph.grad[:, perm]
    if getattr(graph, "component_x", None) is not None:
        result.component_x = graph.component_x[:, perm]
    result.component_sample = graph.component_sample[..., perm]
    return result
