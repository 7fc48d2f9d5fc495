"""Trace rules for attention: scores ``q @ kᵀ``, their masks and softmax, ``@ v``, and SDPA."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gradgraph.convert.trace.meta import KEY_STRIDE, broadcast_ids, Neurons, Param, Scores, varies_along
from gradgraph.convert.trace.ops import (
    BINARY_ADD, BINARY_MUL, IDENTITY_OPS, MASK_FILL, REDUCTIONS, SHAPE_OPS, SOFTMAX, UNARY, WHERE, out_of_place_name,
)
from gradgraph.convert.trace.rules_data import Data
from gradgraph.graph import EdgeKind, NodeKind

_RESHAPES = {"Tensor.view", "Tensor.reshape", "torch.reshape", "Tensor.view_as", "Tensor.reshape_as"}


def _grouped(heads: Tensor, head_dim: int) -> bool:
    """Whether heads ``[H, q | k | v]`` share whole key and value heads: two heads' keys (values)
    are the same neurons or disjoint ones, and heads with one key head share one value head."""
    keys, values = heads[:, head_dim:2 * head_dim], heads[:, 2 * head_dim:]
    for part in (keys, values):
        rows = torch.unique(part, dim=0)
        if torch.unique(rows).numel() != rows.numel():  # two different rows share a neuron
            return False
    pairs = torch.unique(torch.cat((keys, values), dim=1), dim=0)
    return pairs.shape[0] == torch.unique(keys, dim=0).shape[0] == torch.unique(values, dim=0).shape[0]


def _parameters_behind(tensor: Tensor, names: dict[int, str], limit: int = 10_000) -> list[str]:
    """Names of the parameters ``tensor`` is computed from (a walk of its autograd graph), for messages."""
    found: list[str] = []
    seen: set[int] = set()
    pending = [tensor.grad_fn] if tensor.grad_fn is not None else []
    if tensor.grad_fn is None and id(tensor) in names:
        return [names[id(tensor)]]
    while pending and len(seen) < limit:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in names and names[id(variable)] not in found:
            found.append(names[id(variable)])
        pending.extend(child for child, _ in node.next_functions if child is not None)
    return found


def _datapoints_of_scores(meta: Scores, shape: tuple[int, ...]) -> Tensor:
    """The datapoint of each score's query (``[*batch, Tq, Tk]``, read off the queries' components)."""
    comps = broadcast_ids(meta.query.comps, (*shape[:-2], *meta.query.comps.shape[-2:]))
    return (comps[..., :, :1] // KEY_STRIDE).expand(*shape).contiguous()


def _scores_first(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A shape op's arguments with the scores first: ``torch.flip(input=scores, dims=...)`` gives them by keyword."""
    if not args and "input" in kwargs:
        return (kwargs["input"],), {key: value for key, value in kwargs.items() if key != "input"}
    return args, kwargs


def _replayed(name: str, args: tuple, kwargs: dict, ids: Tensor) -> Any:
    """The shape op ``name`` (a function, a method or an attribute read) run on ``ids`` in place of the scores, with
    its other arguments; it raises where the op cannot be replayed so."""
    owner, _, attribute = name.partition(".")
    attribute = attribute.removesuffix(" (attribute)")
    if name.endswith(" (attribute)"):
        return getattr(ids, attribute)
    return getattr(Tensor if owner == "Tensor" else torch, attribute)(ids, *args[1:], **kwargs)


def _moves_datapoints(name: str, args: tuple, kwargs: dict, output: Tensor, meta: Scores) -> bool:
    """Whether a shape op on scores that keeps their batch shape moves scores between datapoints (``flip``,
    ``roll``, an index, a transpose of equal axes): the op replayed on each score's datapoint. An op that
    cannot be replayed so counts as moving them."""
    args, kwargs = _scores_first(args, kwargs)
    if meta.query.comps is None or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return True
    try:
        moved = _replayed(name, args, kwargs, _datapoints_of_scores(meta, tuple(args[0].shape)))
        expected = _datapoints_of_scores(meta, tuple(output.shape))
    except (AttributeError, RuntimeError, TypeError, IndexError, ValueError):
        return True
    return not isinstance(moved, Tensor) or moved.shape != expected.shape or not torch.equal(moved, expected)


def _entries_of_scores(shape: tuple[int, ...]) -> Tensor:
    """The entry of their batch (``[*batch, Tq, Tk]``: a datapoint's head) each score of this shape belongs to."""
    entries = torch.arange(math.prod(shape[:-2])).reshape(shape[:-2])
    return entries[..., None, None].expand(shape).contiguous()


def _moves_between_heads(name: str, args: tuple, kwargs: dict, output: Tensor) -> bool:
    """Whether a shape op on scores that keeps their batch shape and their datapoints moves scores between the batch's
    entries, the heads of a datapoint (``scores[:, [1, 0]]``, ``roll(1, 1)``; a transpose of the heads and queries
    where there are as many): the op replayed on each score's entry. Asked after :func:`_moves_datapoints`, which
    refuses what it cannot replay (the same op on a tensor of the same shape)."""
    args, kwargs = _scores_first(args, kwargs)
    moved = _replayed(name, args, kwargs, _entries_of_scores(tuple(args[0].shape)))
    return not torch.equal(moved, _entries_of_scores(tuple(output.shape)))


def _changes_positions(scores: Tensor, output: Tensor) -> bool:
    """Whether a shape op that keeps the scores' batch shape changes how many queries or keys they hold
    (a slice, an index or a repeat of positions; a transpose of the two, ``scores.mT``, does not)."""
    before, after = tuple(scores.shape[-2:]), tuple(output.shape[-2:])
    return after != before and after != before[::-1]


def _swaps_unequal_axes(scores: Tensor, output: Tensor) -> bool:
    """Whether a shape op that keeps the scores' batch shape swaps their query and key axes where their numbers
    differ (``scores.mT`` of ``[.., Tq, Tk]``, ``Tq != Tk``)."""
    before = tuple(scores.shape[-2:])
    return before[0] != before[1] and tuple(output.shape[-2:]) == before[::-1]


#: elementwise bounds of scores by a constant (``torch.maximum(scores, floor)``)
_SCORE_BOUNDS = {"torch.maximum", "torch.minimum", "Tensor.maximum", "Tensor.minimum"}
#: reductions whose two-tensor call is elementwise (``torch.max(scores, floor)``)
_BINARY_FORM_OF_REDUCTIONS = {"torch.max", "torch.min", "Tensor.max", "Tensor.min"}


class AttentionRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: attention ops."""

    # -------------------------------------------------------------- attention
    def scores_op(self, name: str, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        scores = [meta for _, meta in tracked if isinstance(meta, Scores)]
        # a mask computed from the input ids is a constant of the datapoints, like any mask
        others = [meta for _, meta in tracked if not isinstance(meta, Scores | Data)]
        allowed = UNARY | BINARY_ADD | BINARY_MUL | SOFTMAX | MASK_FILL | WHERE | IDENTITY_OPS | _SCORE_BOUNDS | {
            "Tensor.__getitem__"}
        if name in _BINARY_FORM_OF_REDUCTIONS and len(args) > 1 and isinstance(args[1], Tensor):
            allowed = allowed | {name}  # torch.max(scores, floor): elementwise (XGLM's and OPT's clamp at finfo.min)
        if len(scores) == 1 and args and self.meta(args[0]) is scores[0]:
            # scores changed in place (``scores /= sqrt(d)``, ``masked_fill_``) are the same scores as
            # the out-of-place op would give: no value the factors come from is written
            name = out_of_place_name(name) or name
        if len(scores) == 1 and not others and (name in allowed or name in SHAPE_OPS):
            meta = scores[0]
            scores_value = next(value for value, known in tracked if known is meta)
            if not isinstance(output, Tensor):  # split, chunk, unbind: a bare AttributeError (the tuple's shape) before
                return self.mark_opaque(output, name, "splits attention scores into parts, which gradgraph does not "
                                        "follow", scores)
            if name in SHAPE_OPS and name not in IDENTITY_OPS and tuple(output.shape[:-2]) != meta.batch_shape:
                meta = self.reshape_score_batch(meta, output) if name in _RESHAPES else None
                if meta is None:
                    return self.mark_opaque(output, name, "reshapes attention scores", scores)
            elif name in SHAPE_OPS and name not in IDENTITY_OPS and _swaps_unequal_axes(scores_value, output):
                # (k @ qᵀ).mT of a cross attention: the rows become the queries, which the scores' meta does not
                # follow (refused as a move between datapoints before, the replay failing on the new shape)
                return self.mark_opaque(output, name, "swaps the query and key axes of attention scores whose "
                                        "queries and keys differ in number ((k @ qᵀ).mT), which gradgraph does not "
                                        "follow: write the scores as q @ kᵀ", scores)
            elif name in SHAPE_OPS and name not in IDENTITY_OPS and _changes_positions(scores_value, output):
                # scores[..., :2, :] or [..., :2]: no move between datapoints, but the scores no longer match their
                # queries' or keys' positions (refused as a move between datapoints, or at the product with v)
                return self.mark_opaque(
                    output, name, "changes the query or key positions attention scores hold (a slice, an index "
                    "or a repeat of them), which gradgraph does not follow: select queries on the attention's "
                    "output instead ((scores.softmax(-1) @ v)[..., :2, :] is scores[..., :2, :].softmax(-1) @ v) "
                    "and leave keys out with a mask (scores.masked_fill(mask, float('-inf')))", scores)
            elif name in SHAPE_OPS and name not in IDENTITY_OPS and _moves_datapoints(name, args, kwargs, output, meta):
                # flip / roll / an index / a transpose of equal axes over the batch: the batch shape is kept,
                # but a datapoint's attention would read another's scores (converted wrongly before)
                return self.mark_opaque(output, name, "moves attention scores between datapoints (one datapoint's "
                                        "attention would read another's scores)", scores)
            elif name in SHAPE_OPS and name not in IDENTITY_OPS and _moves_between_heads(name, args, kwargs, output):
                # scores[:, [1, 0]], roll(1, 1), transpose(1, 2) with as many heads as queries: a head attends with
                # another head's scores, which a permutation of the heads does not commute with (the full group of
                # the heads was claimed: a false symmetry); the heads stay in place, as for a constant per head
                for index in list(meta.query.versions) + list(meta.key.versions):
                    self.sets[index].pinned = True
            if name in SOFTMAX:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
                if dim is None:  # F.softmax(scores), nn.Softmax(): PyTorch's implicit (deprecated) choice
                    dim = 0 if output.dim() in (0, 1, 3) else 1
                if dim % output.dim() != output.dim() - 1:
                    over = "queries" if dim % output.dim() == output.dim() - 2 else "another axis than the keys"
                    return self.mark_opaque(output, name, f"a softmax of scores over {over}", [meta])
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, Tensor) and not isinstance(self.meta(value), Scores):
                    self.pin_heads_if_distinct(value, meta.query, meta.key, tuple(output.shape))
            self.set_meta(output, meta)
            return None
        if others:
            return self.mark_opaque(output, name, "combines attention scores with neuron values (a learned bias "
                                    "added to the scores, as T5's relative position bias, is not supported)",
                                    scores + others)
        if name in REDUCTIONS:  # (the score-bound form of max / min returned above)
            return self.mark_opaque(output, name, "reduces attention scores (a max over the keys for a hand-written "
                                    "stable softmax, a sum of their exponentials); gradgraph reads attention weights "
                                    "made by a softmax of the scores over the keys: write it as torch.softmax / "
                                    "F.softmax, which is stable", scores)
        return self.mark_opaque(output, name, "uses attention scores in a way gradgraph has no rule for (it follows "
                                "them through elementwise ops with constants, masks and a softmax over the keys)",
                                scores)

    def pin_heads_if_distinct(self, constant: Tensor, query: Neurons, key: Neurons, shape: tuple[int, ...]) -> None:
        """A mask or bias that differs between heads (ALiBi's slopes) keeps them in place."""
        batch = len(shape) - 2
        if constant.dim() == 0 or batch <= 0:
            return
        try:
            query_nodes = torch.broadcast_to(query.nodes, (*shape[:-2], *query.nodes.shape[-2:]))
        except RuntimeError:
            query_nodes = None
        if query_nodes is not None:
            head_axes = tuple(axis for axis in range(batch) if varies_along(query_nodes, axis))
            if not self.constant_varies(constant, shape, head_axes):
                return
        for index in list(query.versions) + list(key.versions):
            self.sets[index].pinned = True

    def reshape_score_batch(self, meta: Scores, output: Tensor) -> Scores | None:
        """Scores ``[b * H, Tq, Tk]`` viewed as ``[b, H, Tq, Tk]`` (or back): the queries and keys
        they come from take the same batch shape; ``None`` if the last two axes change."""
        batch = tuple(output.shape[:-2])
        if output.dim() < 2 or tuple(output.shape[-2:]) != (meta.query.nodes.shape[-2], meta.key.nodes.shape[-1]):
            return None
        parts = []
        for side in (meta.query, meta.key):
            if tuple(side.nodes.shape[:-2]) != meta.batch_shape or side.comps is None:
                return None
            parts.append(Neurons(side.nodes.reshape(*batch, *side.nodes.shape[-2:]),
                                  side.comps.reshape(*batch, *side.comps.shape[-2:]), side.versions))
        return Scores(parts[0], parts[1], batch)

    def biased_scores(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``baddbmm(bias, q, kᵀ, beta, alpha)``: scores ``q @ kᵀ`` scaled, plus a constant bias."""
        bound = dict(zip(("input", "batch1", "batch2", "beta", "alpha"), args))
        bound.update(kwargs)
        bias = bound["input"]
        if isinstance(self.meta(bias), Neurons | Param | Scores):
            raise self.unsupported(name, "a bias of attention scores that depends on parameters (a learned bias "
                                   "added to the scores is not supported)")
        query = self.need_neurons(bound["batch1"], name)
        key = self.need_neurons(bound["batch2"], name)
        if query is None or key is None:
            raise self.unsupported(name, "a batched matmul of neurons with a constant; gradgraph reads baddbmm as "
                                   "attention scores q @ kᵀ plus a bias")
        if bound.get("beta", 1) != 0:
            self.pin_heads_if_distinct(bias, query, key, tuple(output.shape))
        self.set_meta(output, Scores(query, key, tuple(output.shape[:-2])))

    def attend(self, name: str, scores: Scores, value: Tensor, output: Tensor) -> None:
        value_meta = self.need_neurons(value, name)
        if value_meta is None:
            raise self.unsupported(name, "attention weights applied to a constant")
        self.attention_output(name, scores.query, scores.key, value, value_meta, output)

    def sdpa(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if bound.get("dropout_p", 0.0):
            raise self.unsupported(name, "attention dropout changes the function; pass dropout_p=0 in eval mode")
        query = self.need_neurons(bound["query"], name)
        key = self.need_neurons(bound["key"], name)
        value = self.need_neurons(bound["value"], name)
        if query is None or key is None or value is None:
            raise self.unsupported(name, "attention over constant queries, keys or values")
        if bound.get("enable_gqa", False):
            key, value = self.repeat_key_value_heads(name, bound["query"], key, value)
        key_t = Neurons(key.nodes.transpose(-2, -1), key.comps.transpose(-2, -1), key.versions)
        mask = bound.get("attn_mask")
        if isinstance(mask, Tensor) and (mask.requires_grad or not isinstance(self.meta(mask), Data | None)):
            # the rule reads the mask as a constant: a gradient through it would be dropped
            behind = _parameters_behind(mask, self.name_of_parameter)
            what = f"the parameter(s) {behind}" if behind else "neuron values or the input"
            raise self.unsupported(name, f"an attn_mask computed from {what} (a learned bias of the attention "
                                   "scores, as T5's relative position bias): its gradient is not a rank-1 term of "
                                   "the graph, and gradgraph reads attn_mask as a constant. Pass a mask that does "
                                   "not depend on parameters; a learned score bias is not supported")
        if isinstance(mask, Tensor):
            self.pin_heads_if_distinct(bound["attn_mask"], query, key_t, tuple(query.nodes.shape[:-1]) + (
                key.nodes.shape[-2],))
        self.attention_output(name, query, key_t, bound["value"], value, output)

    def repeat_key_value_heads(self, name: str, query: Tensor, key: Neurons,
                               value: Neurons) -> tuple[Neurons, Neurons]:
        """SDPA's ``enable_gqa``: query head ``h`` of ``H`` reads key/value head ``h // (H / H_kv)``
        (axis -3), as ``repeat_interleave`` of the key and value heads gives; the heads of a group
        then share whole key and value heads, which :meth:`attention_output` reads as grouped."""
        if query.dim() < 3 or key.nodes.dim() < 3 or query.shape[-3] % key.nodes.shape[-3]:
            raise self.unsupported(name, f"grouped-query attention (enable_gqa) with query {list(query.shape)} and "
                                   f"key {list(key.nodes.shape)}; attn_implementation=\"eager\" converts")
        groups = query.shape[-3] // key.nodes.shape[-3]
        if groups == 1:
            return key, value

        def repeat(meta: Neurons) -> Neurons:
            comps = None if meta.comps is None else meta.comps.repeat_interleave(groups, dim=-3)
            return Neurons(meta.nodes.repeat_interleave(groups, dim=-3), comps, meta.versions)

        return repeat(key), repeat(value)

    def attention_output(self, name: str, query: Neurons, key_t: Neurons, value: Tensor, value_meta: Neurons,
                         output: Tensor) -> None:
        if query.comps is None or value_meta.comps is None:
            raise self.unsupported(name, "attention over values that do not depend on the input")
        shape = output.shape
        if output.dim() < 3:
            raise self.unsupported(name, "attention without a head or batch axis")
        if not torch.equal(broadcast_ids(query.comps.narrow(-1, 0, 1), query.comps.shape), query.comps):
            raise self.unsupported(name, "queries whose last axis is not their features")
        batch_shape = tuple(shape[:-2])
        self.check_one_datapoint(name, query, key_t, value_meta, batch_shape)
        q_rows = broadcast_ids(query.nodes, (*batch_shape, *query.nodes.shape[-2:])).narrow(-2, 0, 1)
        k_rows = broadcast_ids(key_t.nodes, (*batch_shape, *key_t.nodes.shape[-2:])).narrow(-1, 0, 1)
        v_rows = broadcast_ids(value_meta.nodes, (*batch_shape, *value_meta.nodes.shape[-2:])).narrow(-2, 0, 1)
        q_rows = q_rows.reshape(-1, query.nodes.shape[-1])
        k_rows = k_rows.reshape(-1, key_t.nodes.shape[-2])
        v_rows = v_rows.reshape(-1, value_meta.nodes.shape[-1])
        triples = torch.cat((q_rows, k_rows, v_rows), dim=1)
        unique, inverse = torch.unique(triples, dim=0, return_inverse=True)
        # keep heads in order of first appearance
        first_seen = torch.full((unique.shape[0],), triples.shape[0], dtype=torch.long)
        first_seen.scatter_reduce_(0, inverse, torch.arange(triples.shape[0]), reduce="amin")
        order = torch.argsort(first_seen)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        heads = unique[order]
        head_dim, value_dim = q_rows.shape[1], v_rows.shape[1]
        if bool((heads < 0).any()):
            raise self.unsupported(name, "queries, keys or values that are not neurons")
        all_q = heads[:, :head_dim].reshape(-1)
        all_k = heads[:, head_dim:2 * head_dim].reshape(-1)
        all_v = heads[:, 2 * head_dim:].reshape(-1)
        shared = len(set(all_k.tolist())) != all_k.numel() or len(set(all_v.tolist())) != all_v.numel()
        if len(set(all_q.tolist())) != all_q.numel() or (shared and not _grouped(heads, head_dim)):
            raise self.unsupported(name, "heads that share some of their query, key or value neurons but not whole "
                                   "heads (grouped-query attention repeats whole key/value heads)")
        # grouped-query attention (``shared``): the heads of a group read one key/value head, and a head
        # permutation would have to keep groups together, which the layout does not express; it fixes the
        # block itself (its q, k, v and output pieces are one class, which ``layout._assign_heads`` turns down
        # where heads repeat key/value nodes), so nothing is pinned here: the parts of these sets that no head
        # reads stay as free as those of any other attention's sets
        created = self.new_set(len(heads) * value_dim, NodeKind.ATTENTION, self.path() or name, "attention")
        o_rows = created.first + torch.arange(len(heads) * value_dim).reshape(len(heads), value_dim)
        block = []
        for head in range(len(heads)):
            q, k, v = heads[head, :head_dim], heads[head, head_dim:2 * head_dim], heads[head, 2 * head_dim:]
            block.append((q.clone(), k.clone(), v.clone(), o_rows[head].clone()))
            self.edges.append((q.clone(), k.clone(), EdgeKind.QUERY_KEY, -1, None, None))
            self.edges.append((v.clone(), o_rows[head].clone(), EdgeKind.VALUE_ATTENTION, -1, None, None))
            self.edges.append((q.repeat_interleave(value_dim), o_rows[head].repeat(head_dim),
                               EdgeKind.QUERY_ATTENTION, -1, None, None))
        self.attention.append(block)
        for meta in (query, key_t, value_meta):
            self.observe_attention_input(meta)
        head_of_row = rank[inverse].reshape(*batch_shape) if batch_shape else rank[inverse].reshape(())
        nodes = o_rows[head_of_row]  # [*batch, dv]
        nodes = broadcast_ids(nodes.unsqueeze(-2), shape).clone()
        comps = broadcast_ids(query.comps.narrow(-1, 0, 1), (*batch_shape, shape[-2], 1))
        comps = broadcast_ids(comps, shape).clone()
        new = Neurons(nodes, comps, {created.index: 0})
        created.grad_records.append((output, nodes, comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def check_one_datapoint(self, name: str, query: Neurons, key_t: Neurons, value: Neurons,
                            batch_shape: tuple[int, ...]) -> None:
        """Refuse attention in which a query attends to a key or value of another datapoint (attention
        over the rows of a joined PyG batch, or over a batch put on the sequence axis): its output would
        mix datapoints, and the rule's components would hide it (issue 27: such a model converted with
        per-sample gradients off by 0.2)."""
        if key_t.comps is None:
            return
        q = broadcast_ids(query.comps, (*batch_shape, *query.comps.shape[-2:]))[..., :, 0] // KEY_STRIDE
        k = broadcast_ids(key_t.comps, (*batch_shape, *key_t.comps.shape[-2:]))[..., 0, :] // KEY_STRIDE
        v = broadcast_ids(value.comps, (*batch_shape, *value.comps.shape[-2:]))[..., :, 0] // KEY_STRIDE
        if not bool((q[..., :, None] == k[..., None, :]).all()) or k.shape != v.shape or not torch.equal(k, v):
            raise self.unsupported(name, "attention between positions of different datapoints (over the rows of a "
                                   "joined batch, or over the batch axis): one datapoint's output would depend on "
                                   "another's. Attend within each datapoint ([b, T, d] inputs)")

    def observe_attention_input(self, meta: Neurons) -> None:
        for index in meta.versions:
            self.sets[index].fresh = False
