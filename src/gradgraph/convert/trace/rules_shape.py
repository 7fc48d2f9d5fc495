"""Trace rules for shape ops: views, reshapes, permutes, indexing, ``cat`` / ``stack`` and casts.

A shape op moves values without computing new ones, so the trace follows neurons through it by
running the same op on their ids (:meth:`ShapeRules.replay_ids`): the result's node and component
ids are the op applied to the arguments' ids. The same replay follows a parameter's positions and
the raw input's elements until they meet an op with a rule. ``cat`` of parts at different versions
of one set (``rotate_half``) and of a class token with the tokens (:meth:`ShapeRules.join_parts`)
are the joins with rules of their own; a join with a constant is refused, since its values would be
read as ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from gradgraph.convert.trace.meta import (
    broadcast_ids, feature_row, ids_like, KEY_STRIDE, neuron_row, Neurons, Param, Raw, Resampled, varies_along,
)
from gradgraph.convert.trace.ops import (
    CONCATENATIONS, DROPOUT_TRAINING_DEFAULT, JOINED_INPUT_REMEDY, JOINS, op_name, SHAPED_LIKE,
)
from gradgraph.convert.trace.rules_data import Data
from gradgraph.graph import EdgeKind, NodeKind

__all__ = ["ShapeRules"]


class ShapeRules:
    """Shape-op rules of :class:`~gradgraph.convert.trace.tracer.Tracer` (a mixin)."""

    def shape_op(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, tracked: list) -> None:
        # data (h[range(b), lengths - 1], a mask's index) indexes: it is no value of the result
        tracked = [(value, meta) for value, meta in tracked if not isinstance(meta, Data)]
        other = (args[1] if len(args) > 1 else kwargs.get("other")) if name in SHAPED_LIKE and args else None
        if isinstance(other, Tensor):  # view_as / reshape_as / expand_as / type_as read only the other's shape
            tracked = [(value, meta) for value, meta in tracked if value is args[0]]
            args = (args[0], torch.empty(other.shape, dtype=torch.long), *args[2:])
            kwargs = {key: value for key, value in kwargs.items() if key != "other"}
        metas = [meta for _, meta in tracked]
        kinds = {type(meta) for meta in metas}
        if Resampled in kinds:
            return self.resampled_shape_op(name, func, args, kwargs, output, metas)
        if kinds == {Param}:
            self.check_joined_constants(name, args, kwargs, f"the parameter '{self.param_names[metas[0].index]}'",
                                        "make it a parameter of the joined shape (the constant's entries then "
                                        "get gradients you can ignore), or join the results of the ops instead")
            return self.replay(func, args, kwargs, output, lambda pos: Param(metas[0].index, pos),
                               lambda meta: meta.pos)
        if kinds == {Raw}:
            self.check_joined_constants(name, args, kwargs, "the model's input", JOINED_INPUT_REMEDY)
            return self.replay(func, args, kwargs, output, Raw, lambda meta: meta.element)
        if Param in kinds or Raw in kinds:
            # a class token concatenated to tokens, or a raw input joined to neurons
            return self.join_parts(name, func, args, kwargs, output)
        for value, meta in tracked:
            if isinstance(meta, Neurons) and meta.comps is None and name in JOINS:
                raise self.unsupported(name, "concatenating values that do not depend on the input")
        if name in JOINS:
            parts = args[0] if args else kwargs["tensors"]
            # an empty constant (a key/value cache before its first entry) joins nothing
            kept = [part for part in parts if self.meta(part) is not None or part.numel() > 0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            concatenation = name in CONCATENATIONS
            if concatenation and any(self.meta(part) is None for part in kept) and self.join_as_pad(
                    name, kept, dim, output):
                return None  # cat([h, zeros]) along the features: a constant pad (rules_pad.py)
            if any(self.meta(part) is None for part in kept):
                raise self.unsupported(name, "concatenating neuron values with constants (for transformers "
                                       "models, call them with use_cache=False)")
            args = (kept, *args[1:]) if args else args
            kwargs = kwargs if args else {**kwargs, "tensors": kept}
            copies = self.copy_repeated_parts(name, kept, dim) if concatenation else {}
            if copies:
                return self.join_copies(name, kept, dim, copies, output)
        nodes = self.replay_ids(func, args, kwargs, lambda meta: meta.nodes)
        bound = all(meta.comps is not None for meta in metas)
        comps = self.replay_ids(func, args, kwargs, lambda meta: meta.comps) if bound else None
        versions = self.joined_versions(name, metas)
        index_meta = None
        if any(meta.unbound_index is not None for meta in metas):
            index_meta = self.replay_ids(func, args, kwargs, lambda meta: meta.unbound_index)
        outputs = output if isinstance(output, tuple | list) else [output]
        node_outs = nodes if isinstance(nodes, tuple | list) else [nodes]
        comp_outs = comps if isinstance(comps, tuple | list) else [comps] * len(outputs)
        index_outs = index_meta if isinstance(index_meta, tuple | list) else [index_meta] * len(outputs)
        for value, node_ids, comp_ids, index_ids in zip(outputs, node_outs, comp_outs, index_outs):
            if isinstance(value, Tensor):
                meta = Neurons(node_ids, comp_ids, dict(versions), index_ids)
                self.set_meta(value, meta)
                self.observe(value, meta)

    def check_joined_constants(self, name: str, args: tuple, kwargs: dict, what: str, remedy: str) -> None:
        """Refuse ``cat`` / ``stack`` of ``what`` (the input's elements or a parameter's positions, which
        the trace follows by replaying the op on their ids) with a constant tensor: the replay would
        read the constant's values as ids (a prepended token id 7 as the input's element 7)."""
        if name not in JOINS:
            return
        parts = args[0] if args else kwargs.get("tensors", ())
        constants = [part for part in parts if isinstance(part, Tensor) and self.meta(part) is None and part.numel()]
        if constants:
            raise self.unsupported(name, f"joins {what} with a constant of shape {list(constants[0].shape)}, whose "
                                   f"entries belong to no datapoint and no parameter; {remedy}")

    def joined_versions(self, name: str, metas: list) -> dict[int, int]:
        """The versions of a value made of ``metas``' values: each set's, a new one where parts
        hold a set at different versions (:meth:`join_versions`)."""
        versions: dict[int, int] = {}
        mixed: set[int] = set()
        for meta in metas:
            for index, version in meta.versions.items():
                if versions.get(index, version) != version:
                    mixed.add(index)
                versions[index] = version
        if mixed:
            versions.update(self.join_versions(name, metas, mixed))
        return versions

    def copy_repeated_parts(self, name: str, parts: list, dim: int) -> dict[int, Neurons]:
        """Tied copies for the parts of a ``cat`` along the neurons' axis (the features, or a map's
        channels) that hold a neuron an earlier part holds: CReLU's ``cat([relu(h), relu(-h)])``,
        ``cat([h, h ** 2])``, PNA's scalers ``cat([h, h * s, h / s])``, ``cat([h, h])``. Returns
        ``{place of the part: its copy's meta}``: each copy is a set of its own (one per run of the
        part's row that lies in one set), tied neuron for neuron to what it copies, so a permutation
        of ``h`` moves every copy with it; :meth:`join_copies` gives the copies their part's grad, and
        the op that reads the result their act. Parts whose neurons no other part holds are left as
        they are (``rotate_half``'s two halves at two versions: :meth:`join_versions`)."""
        metas = [self.meta(part) for part in parts]
        if any(meta.unbound_index is not None for meta in metas):
            return {}
        seen: set[int] = set()
        copies: dict[int, Neurons] = {}
        for place, (part, meta) in enumerate(zip(parts, metas)):
            if part.dim() < 2 or part.numel() == 0:  # nn.Linear(4, 0)'s output holds no neuron
                continue
            row, channels = neuron_row(meta, part.shape)
            if row is None or dim % part.dim() != (1 if channels else part.dim() - 1):
                continue  # not joined along its neurons' axis
            if seen.intersection(row.tolist()) and torch.unique(row).numel() == row.numel():
                copied, created = self.tied_copy(row, f"{self.path() or name} part {place}", "merge")
                for index in meta.versions:  # a copy of part of a set reads that part (materialize)
                    self.separate_part_read(self.sets[index], row)
                    # read by the copy's edges: a later sum absorbed into it would close a cycle of sets
                    # (cat([relu(c), relu(-c)])[:, :3] + y with c part of y; refused as "internal" before)
                    self.sets[index].fresh = False
                placed = copied.reshape(1, -1, *[1] * (part.dim() - 2)) if channels else copied
                copies[place] = Neurons(broadcast_ids(placed, part.shape).clone(), meta.comps,
                                        {copy.index: 0 for copy in created})
            seen.update(row.tolist())
        return copies

    def join_copies(self, name: str, parts: list, dim: int, copies: dict[int, Neurons], output: Tensor) -> None:
        """``cat`` of ``parts`` with the tied copies :meth:`copy_repeated_parts` made standing in
        for theirs; each copy's grad is the output's gradient at its part's places."""
        metas = [copies.get(place, self.meta(part)) for place, part in enumerate(parts)]
        axis = dim % output.dim()
        nodes = torch.cat([broadcast_ids(meta.nodes, part.shape) for meta, part in zip(metas, parts)], axis)
        comps = torch.cat([broadcast_ids(meta.comps, part.shape) for meta, part in zip(metas, parts)], axis)
        meta = Neurons(nodes, comps, self.joined_versions(name, metas))
        for place, copy in copies.items():
            at_copy = torch.cat([broadcast_ids(copy.nodes, part.shape) if other == place
                                 else torch.full(tuple(part.shape), -1, dtype=torch.long)
                                 for other, part in enumerate(parts)], axis)
            self.sets[next(iter(copy.versions))].grad_records.append((output, at_copy, comps))
        self.set_meta(output, meta)
        self.observe(output, meta)

    def join_versions(self, name: str, metas: list, mixed: set[int]) -> dict[int, int]:
        """A new version of sets joined from parts at different versions (``rotate_half``:
        ``cat((-x2, x1))``; GPT-J's ``rotate_every_two``: ``stack((-x2, x1), -1)`` of the odd and
        even features): allowed where each neuron is in one part only, since then every neuron's
        new value is a function of its own; two copies of a neuron are refused."""
        if name not in JOINS:
            raise self.unsupported(name, "joins two versions of the same neurons")
        for index in mixed:
            seen: set[int] = set()
            for meta in metas:
                if index not in meta.versions:
                    continue
                nodes = meta.nodes[self.sets[index].holds(meta.nodes)]
                part = set(torch.unique(nodes).tolist())
                if part & seen:
                    raise self.unsupported(name, "joins two versions of the same neurons along their features, one "
                                           "neuron in two parts; gradgraph has one value per neuron")
                seen |= part
        return self.next_version({index: 0 for index in mixed})

    def replay_ids(self, func: Any, args: tuple, kwargs: dict, pick: Callable[[Any], Tensor | None], *,
                   data: bool = False) -> Any:
        """``func`` applied to the ids ``pick`` takes from each tracked argument; data arguments
        keep their values (they index) unless ``data`` asks for their element ids."""
        def substitute(value: Any) -> Any:
            if isinstance(value, Tensor):
                meta = self.meta(value)
                if meta is not None and (data or not isinstance(meta, Data)):
                    ids = pick(meta)
                    if ids is None:
                        return ids_like(value)
                    return ids
            return value

        new_args, new_kwargs = tree_map(substitute, (args, kwargs))
        new_kwargs = {key: value for key, value in new_kwargs.items() if key not in ("dtype", "memory_format")}
        if func in (Tensor.to, Tensor.type, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.cpu,
                    Tensor.cuda, Tensor.type_as) or op_name(func) in DROPOUT_TRAINING_DEFAULT:
            return new_args[0]
        with torch.no_grad():
            return func(*new_args, **new_kwargs)

    def replay(self, func: Any, args: tuple, kwargs: dict, output: Any, make: Callable[[Tensor], Any],
               pick: Callable[[Any], Tensor], *, data: bool = False) -> None:
        """Apply a shape op to a parameter's positions or the raw input's (or data's) element ids."""
        result = self.replay_ids(func, args, kwargs, pick, data=data)
        outputs = output if isinstance(output, tuple | list) else [output]
        results = result if isinstance(result, tuple | list) else [result]
        for value, ids in zip(outputs, results):
            if isinstance(value, Tensor):
                self.set_meta(value, make(ids))

    def resampled_shape_op(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any, metas: list) -> None:
        """A shape op of a resampled table (``rules_affine.resample_parameter``): its element rows move. A join
        with other parts of the same parameter (DINOv2's ``cat([class_position, resampled_grid])``) gives one
        table: a part that is the parameter itself reads one entry with weight 1."""
        index = metas[0].index
        self.check_joined_constants(name, args, kwargs, f"the resampled parameter '{self.param_names[index]}'",
                                    "join the results of the ops instead (the table added first)")
        if any(not isinstance(meta, Param | Resampled) or meta.index != index for meta in metas):
            raise self.unsupported(name, f"joins the resampled parameter '{self.param_names[index]}' with other "
                                   "values; gradgraph follows a resampled table joined only with parts of itself")
        tables = list({id(meta.taps): meta for meta in metas if isinstance(meta, Resampled)}.values())
        if len(tables) == 1 and all(isinstance(meta, Resampled) for meta in metas):
            table = tables[0]
            return self.replay(func, args, kwargs, output, lambda pos: Resampled(index, pos, table.taps, table.weights),
                               lambda meta: meta.pos)
        width = max(table.taps.shape[1] for table in tables)
        taps, weights, rows_of = [], [], {}
        offset = 0
        for meta in {id(meta): meta for meta in metas}.values():
            if isinstance(meta, Resampled):
                key = id(meta.taps)
                if key not in rows_of:
                    rows_of[key] = offset
                    taps.append(torch.nn.functional.pad(meta.taps, (0, width - meta.taps.shape[1])))
                    weights.append(torch.nn.functional.pad(meta.weights, (0, width - meta.weights.shape[1])))
                    offset += meta.taps.shape[0]
            else:  # the parameter itself: each element reads its own entry, weight 1
                flat = meta.pos.reshape(-1, 1)
                rows_of[id(meta)] = offset
                taps.append(torch.nn.functional.pad(flat, (0, width - 1)))
                weights.append(torch.nn.functional.pad(torch.ones(flat.shape, dtype=torch.float64), (0, width - 1)))
                offset += flat.shape[0]
        joined_taps, joined_weights = torch.cat(taps), torch.cat(weights)

        def rows(meta: Any) -> Tensor:
            if isinstance(meta, Resampled):
                return meta.pos + rows_of[id(meta.taps)]
            return torch.arange(meta.pos.numel()).reshape(meta.pos.shape) + rows_of[id(meta)]

        return self.replay(func, args, kwargs, output, lambda pos: Resampled(index, pos, joined_taps, joined_weights),
                           rows)

    def join_parts(self, name: str, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """``cat`` of a class token (a parameter) with token neurons along positions."""
        if name not in CONCATENATIONS:
            raise self.unsupported(name, "mixes a parameter or the raw input with neuron values")
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        neuron_parts = [self.need_neurons(part, name) if not isinstance(self.meta(part), Param) else None
                        for part in parts]
        bound = [meta for meta in neuron_parts if meta is not None and meta.comps is not None]
        if not bound:
            raise self.unsupported(name, "no part of this concatenation depends on the input")
        axis = dim % output.dim()
        datapoint_axes = [a for a in range(output.dim()) if varies_along(bound[0].comps // KEY_STRIDE, a)]
        datapoint_axis = datapoint_axes[0] if len(datapoint_axes) == 1 else 0
        if axis == output.dim() - 1 or axis == datapoint_axis:
            raise self.unsupported(name, "a parameter concatenated along the feature or datapoint axis")
        width = output.shape[-1]
        merged = self.new_set(width, NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
        merged_nodes = merged.first + torch.arange(width)
        comps_parts, token_parts, tokens = [], [], []
        merged_rows: set[tuple[int, ...]] = set()
        for part, meta in zip(parts, neuron_parts):
            if meta is None:  # the parameter: a class-token set per distinct token, the parameter as bias
                param = self.meta(part)
                count = part.shape[axis]
                # one set per distinct row of the parameter along the joined axis (YOLOS' detection
                # tokens, register tokens: one parameter of several tokens); a token repeated over
                # positions is one set at each of them, as are its copies over the datapoints
                rows = [param.pos.select(axis, place).reshape(-1, width) for place in range(count)]
                if any(not bool((row == row[:1]).all()) for row in rows):
                    raise self.unsupported(name, "a concatenated parameter that differs between datapoints")
                by_row: dict[tuple[int, ...], Any] = {}
                token_ids = torch.empty(tuple(part.shape), dtype=torch.long)
                for place, row in enumerate(rows):
                    key = tuple(row[0].tolist())
                    if key not in by_row:
                        label = "class token" if len(by_row) == 0 else f"class token {len(by_row)}"
                        token = self.new_set(width, NodeKind.RESIDUAL, f"{self.path()} {label}", "token_param")
                        token.bias_param, token.bias_pos = param.index, row[0].clone()
                        self.edges.append((token.first + torch.arange(width), merged_nodes, EdgeKind.MERGE, -1,
                                           None, None))
                        self.ties.append((token.first + torch.arange(width), merged_nodes))
                        tokens.append(token)
                        by_row[key] = token
                    token_ids.select(axis, place).copy_(
                        broadcast_ids(by_row[key].first + torch.arange(width), token_ids.select(axis, place).shape))
                keys = torch.tensor(self.new_key(count))
                shape = [1] * part.dim()
                shape[axis] = count
                datapoint_shape = [1] * part.dim()
                datapoint_shape[datapoint_axis] = part.shape[datapoint_axis]
                comps = (torch.arange(part.shape[datapoint_axis]).reshape(datapoint_shape) * KEY_STRIDE
                         + keys.reshape(shape))
                comps = broadcast_ids(comps, part.shape).clone()
                token_parts.append(token_ids)
                comps_parts.append(comps)
            else:
                row = feature_row(meta.nodes)
                if row is None:
                    raise self.unsupported(name, "concatenates tensors whose features are not one neuron set")
                self.fix_act(part, meta, name)
                if tuple(row.tolist()) not in merged_rows:  # one set's positions on both sides of a token
                    # (Dinov2's cat([h[:, :1], registers, h[:, 1:]])): one edge per neuron, not two parallel ones
                    merged_rows.add(tuple(row.tolist()))
                    self.edges.append((row, merged_nodes, EdgeKind.MERGE, -1, None, None))
                    self.ties.append((row, merged_nodes))
                token_parts.append(torch.full_like(broadcast_ids(meta.nodes, part.shape), -1))
                comps_parts.append(meta.comps)
        comps = torch.cat(comps_parts, dim=axis)
        # the tokens' factors live at their positions of the output, and only theirs: the other places hold
        # the joined neurons' values, whose grad is not the output's where an activation came between (a
        # tanh(h) joined: dL/dtanh(h) written over dL/dh; found by mut23, caught only by _check_sums)
        token_nodes = torch.cat(token_parts, dim=axis)
        for token in tokens:
            token.grad_records.append((output, token_nodes, comps))
            token.act_records.append((output, token_nodes, comps))
            token.act_version = 0
        meta = Neurons(broadcast_ids(merged_nodes, output.shape).clone(), comps, {merged.index: 0})
        merged.grad_records.append((output, meta.nodes, comps))
        self.set_meta(output, meta)
        self.observe(output, meta)
