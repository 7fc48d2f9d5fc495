"""Trace -> GradGraph: neuron sets, their factors, and the symmetry group the trace proves.

:func:`convert_traced` runs :func:`gradgraph.convert.trace.trace_model`, the one backward
pass, and then lays the graph out:

* **nodes** — the neuron sets in the order the forward created them (the input first),
  each split where an attention op gave its neurons different roles (a fused ``qkv``
  output becomes query, key and value sets). ``layer`` is the set's index in that order,
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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.capture import LossFn, check_finite, per_datapoint_objective
from gradgraph.convert.trace import (
    KEY_STRIDE,
    NeuronSet,
    UnsupportedOperationError,
    _Tracer,
    output_sets,
    trace_model,
)
from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, EdgeKind, GradGraph, NodeKind

__all__ = ["convert_traced"]


def convert_traced(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> GradGraph:
    """Convert any model whose forward gradgraph can follow; see :func:`gradgraph.to_graph`.

    Args:
        model: the network (``model.eval()`` for dropout; batch norm in eval mode).
        inputs: ``[b, ...]``: features last for float inputs (``[b, d]``, ``[b, T, d]``,
            images flattened by the model), token ids ``[b, T]`` for models starting with
            an embedding.
        targets, loss_fn, forward_kwargs: as for :func:`gradgraph.to_graph`; ``loss_fn``
            receives the model's output as the model returns it (a tensor, a tuple, a
            ``transformers`` ``ModelOutput``) and returns ``[b]``.

    Returns:
        A :class:`~gradgraph.GradGraph` with ``B = b * K`` components.
    """
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise GradGraphError(f"inputs must be a batch [b, ...] with b > 0, got shape {list(inputs.shape)}")
    kwargs = dict(forward_kwargs or {})
    def forward(x: Tensor) -> Any:
        try:
            return model(x, **kwargs)
        except TypeError as error:
            if "argument" not in str(error):
                raise
            raise GradGraphError(
                f"to_graph: calling {type(model).__name__}(inputs, **forward_kwargs) failed: {error}. Pass the "
                "model's other arguments through forward_kwargs") from error

    tracer, output, _ = trace_model(model, inputs, forward)
    if not tracer.params:
        raise GradGraphError(f"{type(model).__name__}: the forward used no parameter of the model")
    num_datapoints = inputs.shape[0]
    if loss_fn is None and not isinstance(output, Tensor):
        raise GradGraphError(f"output mode (loss_fn=None) needs a tensor output; the model returned "
                             f"{type(output).__name__}. Pass a loss_fn that reads it")
    objective = per_datapoint_objective(output, targets, loss_fn, num_datapoints)
    return _build(tracer, output, objective, num_datapoints, inputs.dtype if inputs.is_floating_point()
                  else tracer.params[0].dtype)


# --------------------------------------------------------------------- factors
def _component_index(comps: Tensor, num_keys: int) -> Tensor:
    return (comps // KEY_STRIDE) * num_keys + comps % KEY_STRIDE


def _factors(tracer: _Tracer, objective: Tensor, num_datapoints: int, dtype: torch.dtype,
             device: torch.device) -> tuple[Tensor, Tensor, int]:
    num_keys = max(len(tracer.keys), 1)
    num_components = num_datapoints * num_keys
    act = torch.zeros(tracer.num_nodes, num_components, dtype=dtype, device=device)
    grad = torch.zeros_like(act)
    wanted: dict[int, Tensor] = {}
    for neuron_set in tracer.sets:
        for tensor, _, _ in neuron_set.grad_records:
            if tensor.requires_grad:
                wanted[id(tensor)] = tensor
    tensors = list(wanted.values())
    # the parameters ride along in the same backward pass, so a parameter that reaches the loss
    # through ops the trace did not follow is caught instead of silently missing
    known = {id(param) for param in tracer.params}
    others = [(name, param) for name, param in tracer.model.named_parameters()
              if param.requires_grad and id(param) not in known]
    results = torch.autograd.grad(objective.sum(), tensors + [param for _, param in others], allow_unused=True)
    for (name, _), result in zip(others, results[len(tensors):]):
        if result is not None:
            raise UnsupportedOperationError(
                name.rsplit(".", 1)[0] if "." in name else "", "parameter use", "in the forward",
                f"the parameter '{name}' affects the loss through ops gradgraph did not follow (a custom "
                "autograd.Function, a tensor made inside forward, or an op without a rule); register the module "
                "with gradgraph.convert.register_elementwise or gradgraph.register_converter")
    gradient_of = {id(t): r for t, r in zip(tensors, results)}

    def scatter(target: Tensor, values: Tensor, nodes: Tensor, comps: Tensor) -> None:
        values = values.expand(nodes.shape) if tuple(values.shape) != tuple(nodes.shape) else values
        keep = (nodes >= 0) & (comps >= 0)
        rows = nodes[keep].to(device)
        columns = _component_index(comps[keep], num_keys).to(device)
        target[rows, columns] = values[keep.to(values.device)].to(dtype)

    for neuron_set in tracer.sets:
        records = neuron_set.act_records or ([neuron_set.last] if neuron_set.last is not None else [])
        for value, nodes, comps in records:
            if comps is not None:
                scatter(act, value.detach(), nodes, comps)
        for index, nodes, comps in neuron_set.onehot_records:
            keep = (nodes >= 0) & (comps >= 0)
            rows = (neuron_set.first + index[keep]).to(device)
            act[rows, _component_index(comps[keep], num_keys).to(device)] = 1
        for tensor, nodes, comps in neuron_set.grad_records:
            result = gradient_of.get(id(tensor))
            if result is not None and nodes is not None:
                scatter(grad, result.detach(), nodes, comps)
    if not bool(torch.isfinite(act.sum() + grad.sum())):
        for neuron_set in tracer.sets:
            rows = slice(neuron_set.first, neuron_set.first + neuron_set.size)
            check_finite(f"activation of the neurons of '{neuron_set.origin}'", act[rows])
            check_finite(f"backpropagated signal of the neurons of '{neuron_set.origin}'", grad[rows])
    return act, grad, num_keys


# --------------------------------------------------------------------- layout
class _UnionFind:
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


def _roles(tracer: _Tracer) -> Tensor:
    """Per node: the NodeKind an attention op gave it, or -1."""
    roles = torch.full((tracer.num_nodes,), -1, dtype=torch.long)
    for block in tracer.attention:
        for q, k, v, o in block:
            roles[q], roles[k], roles[v], roles[o] = (int(NodeKind.QUERY), int(NodeKind.KEY), int(NodeKind.VALUE),
                                                      int(NodeKind.ATTENTION))
    return roles


def _final_sets(tracer: _Tracer, roles: Tensor) -> tuple[Tensor, list[tuple[NeuronSet, int, int, int]]]:
    """Split created sets where roles change; returns ``(set_of_node [N], [(created, start, stop, role)])``."""
    pieces: list[tuple[NeuronSet, int, int, int]] = []
    set_of_node = torch.empty(tracer.num_nodes, dtype=torch.long)
    for neuron_set in tracer.sets:
        start = neuron_set.first
        stop = neuron_set.first + neuron_set.size
        role = roles[start:stop]
        cuts = [start] + [start + i for i in range(1, neuron_set.size) if role[i] != role[i - 1]] + [stop]
        for low, high in zip(cuts, cuts[1:]):
            set_of_node[low:high] = len(pieces)
            pieces.append((neuron_set, low, high, int(roles[low])))
    return set_of_node, pieces


def _build(tracer: _Tracer, output: Any, objective: Tensor, num_datapoints: int, dtype: torch.dtype) -> GradGraph:
    device = tracer.params[0].device
    act, grad, num_keys = _factors(tracer, objective, num_datapoints, dtype, device)
    num_nodes = tracer.num_nodes
    roles = _roles(tracer)
    set_of_node, pieces = _final_sets(tracer, roles)
    reaching_output = output_sets(tracer, output)

    # ---- edges
    sources, targets, kinds, params, positions, weights = [], [], [], [], [], []
    flat_params = [param.detach().reshape(-1) for param in tracer.params]
    for src, dst, kind, param, pos, _ in tracer.edges:
        sources.append(src)
        targets.append(dst)
        kinds.append(torch.full((len(src),), int(kind), dtype=torch.long))
        params.append(torch.full((len(src),), param, dtype=torch.long))
        positions.append(pos if pos is not None else torch.full((len(src),), -1, dtype=torch.long))
        if param >= 0:
            weights.append(flat_params[param][pos.to(device)].to(dtype))
        else:
            weights.append(torch.ones(len(src), dtype=dtype, device=device))
    edge_index = torch.stack((torch.cat(sources), torch.cat(targets))) if sources else torch.empty(2, 0,
                                                                                                   dtype=torch.long)
    edge_kind = torch.cat(kinds) if kinds else torch.empty(0, dtype=torch.long)

    # ---- node labels
    node_param = torch.full((num_nodes,), -1, dtype=torch.long)
    node_param_pos = torch.full((num_nodes,), -1, dtype=torch.long)
    bias = torch.zeros(num_nodes, dtype=dtype, device=device)
    activation = torch.full((num_nodes,), int(ActivationKind.IDENTITY), dtype=torch.long)
    for neuron_set in tracer.sets:
        rows = slice(neuron_set.first, neuron_set.first + neuron_set.size)
        if neuron_set.bias_param >= 0:
            node_param[rows] = neuron_set.bias_param
            node_param_pos[rows] = neuron_set.bias_pos
            bias[rows] = flat_params[neuron_set.bias_param][neuron_set.bias_pos.to(device)].to(dtype)
        label = neuron_set.activation
        if getattr(neuron_set, "elementwise_ops", 0) and label is not ActivationKind.IDENTITY:
            label = ActivationKind.OTHER
        elif getattr(neuron_set, "elementwise_ops", 0) and neuron_set.created_by == "affine" \
                and not neuron_set.absorbed:
            label = ActivationKind.OTHER
        activation[rows] = int(label)

    # ---- symmetry classes over final sets
    union = _UnionFind(len(pieces))
    node_union = _UnionFind(num_nodes)
    for a, b in tracer.ties:
        for x, y in zip(a.tolist(), b.tolist()):
            union.union(int(set_of_node[x]), int(set_of_node[y]))
            node_union.union(x, y)
    for block in tracer.attention:
        for q, k, v, o in block:
            for nodes in (k, v, o):
                union.union(int(set_of_node[q[0]]), int(set_of_node[nodes[0]]))
        first = block[0][0][0]
        for q, _, _, _ in block[1:]:
            union.union(int(set_of_node[first]), int(set_of_node[q[0]]))
    has_attention = bool(tracer.attention)
    classes: dict[int, list[int]] = {}
    for index in range(len(pieces)):
        classes.setdefault(union.find(index), []).append(index)

    node_kind = torch.empty(num_nodes, dtype=torch.long)
    for index, (neuron_set, low, high, role) in enumerate(pieces):
        kind = neuron_set.kind
        if role >= 0:
            kind = NodeKind(role)
        elif neuron_set.created_by == "affine" and neuron_set.index in reaching_output and not neuron_set.absorbed:
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

    perm_group = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_block = torch.full((num_nodes,), -1, dtype=torch.long)
    perm_tie = torch.full((num_nodes,), -1, dtype=torch.long)
    position = torch.empty(num_nodes, dtype=torch.long)
    for index, (_, low, high, _) in enumerate(pieces):
        position[low:high] = torch.arange(high - low)
    attention_nodes = roles >= 0
    group = 0
    for root in sorted(classes):
        members = classes[root]
        member_sets = [pieces[m][0] for m in members]
        nodes = torch.cat([torch.arange(pieces[m][1], pieces[m][2]) for m in members])
        if any(s.pinned or s.index in reaching_output or s.created_by in ("input", "token") for s in member_sets):
            continue
        if bool(attention_nodes[nodes].any()):
            if not bool(attention_nodes[nodes].all()) or not _assign_heads(tracer, nodes, set_of_node, perm_block,
                                                                          perm_tie, position, pieces):
                continue
        else:
            slots = torch.tensor([node_union.find(n) for n in nodes.tolist()])
            ranks = _flat_ranks(nodes, slots, set_of_node)
            if ranks is None:
                continue
            position[nodes] = ranks
            perm_block[nodes] = 0
            perm_tie[nodes] = 0
        perm_group[nodes] = group
        group += 1

    layer = set_of_node.clone()
    sample = torch.arange(num_datapoints).repeat_interleave(num_keys)
    return GradGraph(
        x=bias[:, None],
        edge_index=edge_index.to(device),
        edge_attr=(torch.cat(weights) if weights else torch.empty(0, dtype=dtype, device=device))[:, None],
        act=act,
        grad=grad,
        layer=layer.to(device),
        node_kind=node_kind.to(device),
        edge_kind=edge_kind.to(device),
        activation=activation.to(device),
        perm_group=perm_group.to(device),
        perm_block=perm_block.to(device),
        perm_tie=perm_tie.to(device),
        position=position.to(device),
        node_param=node_param.to(device),
        node_param_pos=node_param_pos.to(device),
        edge_param=torch.cat(params).to(device) if params else torch.empty(0, dtype=torch.long, device=device),
        edge_param_pos=torch.cat(positions).to(device) if positions else torch.empty(0, dtype=torch.long,
                                                                                      device=device),
        component_sample=sample.to(device),
        num_datapoints=num_datapoints,
        param_names=list(tracer.param_names),
        param_shapes=[list(shape) for shape in tracer.param_shapes],
        num_nodes=num_nodes,
    )


def _flat_ranks(nodes: Tensor, slots: Tensor, set_of_node: Tensor) -> Tensor | None:
    """Rank of every node's orbit slot, if each slot holds exactly one node of every member set."""
    unique_slots, slot_index = torch.unique(slots, return_inverse=True)
    member_sets = set_of_node[nodes]
    num_sets = len(torch.unique(member_sets))
    counts = torch.bincount(slot_index, minlength=len(unique_slots))
    if not bool((counts == num_sets).all()):
        return None
    pairs = torch.unique(torch.stack((slot_index, member_sets)), dim=1)
    if pairs.shape[1] != len(nodes):
        return None
    # rank slots by the order of the first member set's nodes, so an untied set keeps its order
    first_set = member_sets.min()
    order = torch.full((len(unique_slots),), -1, dtype=torch.long)
    in_first = member_sets == first_set
    order[slot_index[in_first]] = torch.arange(int(in_first.sum()))
    if bool((order < 0).any()):
        return None
    return order[slot_index]


def _assign_heads(tracer: _Tracer, nodes: Tensor, set_of_node: Tensor, perm_block: Tensor, perm_tie: Tensor,
                  position: Tensor, pieces: list) -> bool:
    """Heads as blocks of one attention op; q/k tied (tie 0), v/o tied (tie 1)."""
    node_set = set(nodes.tolist())
    blocks = [block for block in tracer.attention if int(block[0][0][0]) in node_set]
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
