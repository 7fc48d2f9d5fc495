"""Trace rules for affine maps (``F.linear``, ``matmul`` / ``addmm`` with a parameter) and embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradgraph.convert.trace.meta import (
    broadcast_ids, ids_like, neuron_row, Neurons, NeuronSet, Opaque, Param, Raw, Resampled, rows_along_last, Scores,
)
from gradgraph.convert.trace.ops import LOST_TRACK
from gradgraph.convert.trace.rules_data import Data
from gradgraph.graph import EdgeKind, NodeKind


def _dense_edges(sources: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(src, dst)`` of every source to every target, target after target (a weight's row-major
    order); each target's run written by one expand-copy (``repeat_interleave``'s index is O(P))."""
    return sources.repeat(len(targets)), targets[:, None].expand(-1, len(sources)).reshape(-1)


class AffineRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: affine maps and embedding tables."""

    # -------------------------------------------------------------- affine maps
    def param_view(self, value: Any, name: str, role: str) -> Param:
        meta = self.meta(value)
        if not isinstance(meta, Param):
            raise self.unsupported(name, f"its {role} is not a parameter of the model (or a view of one); "
                                   "gradgraph converts affine maps whose weights are parameters")
        return meta

    def fix_act(self, value: Tensor, meta: Neurons, what: str) -> Neurons:
        """Make ``value`` the act of its neurons; split off a new set where another version is the act."""
        conflicts = [index for index, version in meta.versions.items()
                     if self.sets[index].act_version not in (None, version)]
        if conflicts:
            meta = self.materialize(value, meta, f"{self.path()} {what}")
        for index, version in meta.versions.items():
            neuron_set = self.sets[index]
            neuron_set.act_version = version
            neuron_set.fresh = False
        self.record_act(value, meta)
        return meta

    def record_act(self, value: Tensor, meta: Neurons) -> None:
        for index in meta.versions:
            records = self.sets[index].act_records
            if records and records[-1][0] is value and records[-1][1] is meta.nodes:
                continue  # the same value read again (the gate blocks of one state): written once
            records.append((value, meta.nodes, meta.comps))

    def separate_mixed_part(self, meta: Neurons) -> None:
        """Values whose neurons an op mixes (a mean or softmax over their features): where they
        hold only part of a set, that part is separated from the rest (:meth:`separate_part_read`)."""
        present = torch.unique(meta.nodes[meta.nodes >= 0])
        for index in meta.versions:
            self.separate_part_read(self.sets[index], present)

    def separate_part_read(self, neuron_set: NeuronSet, sources: Tensor) -> None:
        """An op that reads or mixes only part of a set (an affine map of ``h.chunk(2)[0]``, the
        mean of ``h[:, ::2]``): a permutation of the whole set would move those neurons onto the
        others. A contiguous part becomes a piece of its own (``tracer.cuts``: each piece is
        permuted by itself); any other part pins the set."""
        inside = torch.unique(sources[neuron_set.holds(sources)])
        if inside.numel() == 0 or inside.numel() == neuron_set.size:
            return
        if not self.grouped_op_running:  # (a grouped op reads each group's part: blocks are made of those)
            neuron_set.read_in_part = True
        low, high = int(inside[0]), int(inside[-1]) + 1
        if inside.numel() == high - low:
            self.cuts.update((low, high))
        else:
            neuron_set.pinned = True

    def materialize(self, value: Tensor, meta: Neurons, origin: str) -> Neurons:
        """New MERGE neurons holding ``value``'s neurons (one new neuron per neuron on its last axis,
        or on axis 1 of a ``[b, C, *S]`` map whose channels are its neurons), each tied to the
        neuron it copies: one new set per run of the row that lies in one set
        (:meth:`~gradgraph.convert.trace.rules_conv.ConvRules.tied_copy`), so a copy of
        ``cat([h, z])`` is a copy of ``h`` and a copy of ``z``, each permuted with its source (one
        set tied to both would pin them: a DenseNet's concatenations lost every symmetry so).

        Where the last axis holds a neuron twice (``cat([h, h])``), each copy gets a neuron of
        its own and no symmetry is claimed for them (a permutation of ``h`` would have to move
        both copies together, which the layout's ties do not express).
        """
        row, channels = neuron_row(meta, value.shape)  # a map's channels, or the features
        if row is None:
            raise self.unsupported(origin, "these values do not hold one neuron per feature")
        width = len(row)
        if torch.unique(row).numel() == width:
            merged_nodes, created = self.tied_copy(row, origin, "merge")
            # The copy reads its sources; where they are part of a set (h[:, ::2], cat([h1, h3])[:, ::2]),
            # the set is cut or pinned there, as for any partial read: the tie moves the copy with its sources.
            for index in meta.versions:
                self.separate_part_read(self.sets[index], row)
        else:
            merged = self.new_set(width, NodeKind.RESIDUAL, origin, "merge")
            merged_nodes, created = merged.first + torch.arange(width), [merged]
            self.edges.append((row, merged_nodes, EdgeKind.MERGE, -1, None, None))
            merged.pinned = True
            for index in meta.versions:
                self.sets[index].pinned = True
        placed = merged_nodes.reshape(1, -1, *[1] * (value.dim() - 2)) if channels else merged_nodes
        new = Neurons(broadcast_ids(placed, value.shape).clone(), meta.comps, {copy.index: 0 for copy in created})
        created[0].grad_records.append((value, new.nodes, new.comps))  # one record writes every copy's grad
        self.set_meta(value, new)
        self.observe(value, new)
        return new

    def affine(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor, *,
               transposed: bool) -> None:
        meta = self.need_neurons(x, f"the affine map {name}")
        if meta is None and self.zero_state_affine(name, x, weight, bias, output, transposed=transposed):
            return
        if meta is None:
            raise self.unsupported(name, LOST_TRACK)
        meta = self.spread_positions(name, x, meta)  # a flattened [channels, positions] map (rules_conv)
        weight_view = self.param_view(weight, name, "weight")
        if weight_view.pos.dim() != 2:
            raise self.unsupported(name, f"a weight of shape {list(weight.shape)}; expected a matrix")
        positions = weight_view.pos.T if transposed else weight_view.pos  # [out, in]
        if positions.shape[1] == 0:  # nn.Linear(0, k) after nn.Linear(d, 0): failed inside rows_along_last before
            raise self.unsupported(name, f"an affine map of a value with no features (shape {list(x.shape)}, a "
                                   "layer of width 0 before it): it has no neurons to read. Remove the layer of "
                                   "width 0, or give it a width of at least 1")
        rows = rows_along_last(meta.nodes)
        if meta.comps is None:
            raise self.unsupported(name, "an affine map of values that do not depend on the input")
        comp_rows = meta.comps.reshape(-1, meta.comps.shape[-1])
        if not bool((rows == rows[:1]).all()) or not bool((comp_rows == comp_rows[:, :1]).all()):
            raise self.unsupported(
                name, "applied to an axis that holds positions or datapoints, not features (e.g. a Linear over "
                "tokens, as in MLP-Mixer); gradgraph needs affine maps over the last, feature axis")
        sources = rows[0].clone()
        if bool((sources < 0).any()):
            raise self.unsupported(name, "its input holds values that are not neurons (e.g. a statistic)")
        if torch.unique(comp_rows[:, 0]).numel() != comp_rows.shape[0]:
            self.check_no_copies(name, (meta.nodes,), meta.comps)
        if torch.unique(sources).numel() != sources.numel():
            # one neuron on two features (cat([h, h])): its weights would be parallel edges
            meta = self.materialize(x, meta, f"{self.path() or name} input")
        meta = self.fix_act(x, meta, name)
        sources = rows_along_last(meta.nodes)[0].clone()
        for index in meta.versions:
            self.separate_part_read(self.sets[index], sources)
        width = positions.shape[0]
        created = self.new_set(width, NodeKind.HIDDEN, self.path() or name, "affine")
        targets = created.first + torch.arange(width)
        self.edges.append((*_dense_edges(sources, targets), EdgeKind.LINEAR, weight_view.index,
                           positions.reshape(-1).clone(), None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            if bias_view.pos.numel() != width:
                raise self.unsupported(name, f"a bias of shape {list(bias.shape)} for {width} outputs")
            created.bias_param, created.bias_pos = bias_view.index, bias_view.pos.reshape(-1).clone()
        out_nodes = broadcast_ids(targets, output.shape).clone()
        out_comps = broadcast_ids(meta.comps.narrow(-1, 0, 1), output.shape).clone()
        new = Neurons(out_nodes, out_comps, {created.index: 0})
        created.grad_records.append((output, out_nodes, out_comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def zero_state_affine(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None, output: Tensor, *,
                          transposed: bool) -> bool:
        """An affine map of a constant zero (an RNN's ``h0 = torch.zeros(...)`` made in ``forward``):
        ``W · 0 + b`` is the bias alone, and ``W`` gets no gradient from it. The output becomes a view
        of the bias (a bias of the neurons it is added to) or, with no bias, a constant. ``True`` if
        handled; the zero is a value guard, so a replay with another state traces afresh."""
        if not isinstance(x, Tensor) or x.requires_grad or bool(x.any()):
            return False
        self.param_view(weight, name, "weight")
        self.add_guard(self.op_index, x, values=x.detach().cpu().clone())
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            width = weight.shape[1] if transposed else weight.shape[0]
            if bias_view.pos.numel() != width:
                raise self.unsupported(name, f"a bias of shape {list(bias.shape)} for {width} outputs")
            positions = broadcast_ids(bias_view.pos.reshape(-1), output.shape).clone()
            self.set_meta(output, Param(bias_view.index, positions))
        return True

    def matmul(self, name: str, left: Tensor, right: Tensor, output: Tensor) -> None:
        left_meta, right_meta = self.meta(left), self.meta(right)
        if isinstance(right_meta, Param) and not isinstance(left_meta, Param):
            return self.affine(name, left, right, None, output, transposed=True)
        if isinstance(left_meta, Param):
            raise self.unsupported(name, "a parameter on the left of a matmul; write x @ W (features last)")
        if isinstance(left_meta, Scores):
            return self.attend(name, left_meta, right, output)
        query = self.need_neurons(left, name)
        key = self.need_neurons(right, name)
        if query is None or key is None:
            constant = left if query is None else right
            raise self.unsupported(name, f"a matmul of neurons with a constant of shape {list(constant.shape)}")
        # q @ kᵀ: the contracted axes hold the query / key dims of each head
        self.set_meta(output, Scores(query, key, tuple(output.shape[:-2])))

    # -------------------------------------------------------------- embeddings
    def embedding(self, name: str, indices: Tensor, weight: Tensor, output: Tensor,
                  padding_idx: int | None = None) -> None:
        table = self.param_view(weight, name, "table")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += table.pos.shape[0]
        index_meta = self.meta(indices)
        data = isinstance(index_meta, Data)
        self.read_indices[id(indices)] = indices
        if isinstance(index_meta, Raw):
            index_meta = self.neurons_from_raw(indices, index_meta, name)
        elif data:  # position ids or token types computed from the input ids
            comps = self.data_index_comps(indices, index_meta)
            index_meta = None if comps is None else Neurons(ids_like(indices), comps, {})
        elif isinstance(index_meta, Neurons | Opaque | Scores):
            raise self.unsupported(name, "embedding indices computed from neuron values")
        tokens, created, targets = self.table_sets(name, "table rows", table.index, table.pos)
        out_nodes = broadcast_ids(targets, output.shape).clone()
        row_index = broadcast_ids(indices.detach().cpu().unsqueeze(-1), output.shape).clone()
        if index_meta is None:  # constant indices (positions): bound when added to token values
            new = Neurons(out_nodes, None, {created.index: 0}, unbound_index=row_index)
            created.token_set = tokens  # type: ignore[attr-defined]
            tokens.padding_idx = padding_idx  # type: ignore[attr-defined]
            # where the indices are read again on a later call (they may differ between calls)
            tokens.index_source = (self.op_index, indices, data)  # type: ignore[attr-defined]
        else:
            comps = broadcast_ids(index_meta.comps.unsqueeze(-1), output.shape).clone()
            new = Neurons(out_nodes, comps, {created.index: 0})
            created.grad_records.append((output, out_nodes, comps))
            tokens.onehot_records.append((row_index, out_nodes, comps, self.op_index, padding_idx))
        self.set_meta(output, new)
        self.observe(output, new)

    def bind(self, value: Tensor, meta: Neurons, shape: torch.Size, comps: Tensor, result: Tensor) -> Neurons:
        """Give unbound neurons (position embeddings) the components of the tensor they join."""
        nodes = broadcast_ids(meta.nodes, shape).clone()
        for index in meta.versions:
            neuron_set = self.sets[index]
            neuron_set.grad_records.append((result, nodes, comps))
            token_set = getattr(neuron_set, "token_set", None)
            weighted = getattr(token_set, "weighted", None)
            if weighted is not None and meta.unbound_index is not None:  # a resampled table's rows
                where = broadcast_ids(meta.unbound_index, shape)
                token_set.weighted_records.append((weighted[0][where], weighted[1][where], nodes, comps))
            elif token_set is not None and meta.unbound_index is not None:
                rows = broadcast_ids(meta.unbound_index, shape).clone()
                token_set.onehot_records.append((rows, nodes, comps, self.index_op(token_set, rows),
                                                 getattr(token_set, "padding_idx", None)))
        return Neurons(nodes, comps, meta.versions)

    def index_op(self, token_set: Any, rows: Tensor) -> int | None:
        """The embedding op whose indices, read again on a later call, give ``rows`` (else ``None``:
        the rows are constants of the architecture, kept as they are)."""
        source = getattr(token_set, "index_source", None)
        if source is None:
            return None
        op, indices, data = source
        expanded = indices.detach().cpu().unsqueeze(-1)
        try:
            reread = expanded.expand(rows.shape)
        except RuntimeError:
            reread = None
        if reread is not None and torch.equal(reread, rows):
            return op
        if data:
            raise self.unsupported("embedding", "its indices are computed from the input and their positions move "
                                   "before they join the token values; pass them in (e.g. position_ids) or compute "
                                   "them with elementwise ops on the ids")
        # the layout keeps these rows: a later call (another instance's buffer) must read the same indices
        self.add_guard(op, indices, values=indices.detach().cpu().clone())
        return None

    def resample_parameter(self, name: str, x: Tensor, param: Param, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``F.interpolate`` of a parameter ``[N, C, *S]`` (a position table resized to the input's grid).

        Interpolation is linear and acts on each ``(n, c)`` map alike: output position ``t`` is
        ``sum_s A[t, s] x[n, c, s]``, ``A`` a constant of the sizes and options, read off the same call on
        the one-hot maps (float64). The result is a :class:`Resampled` value: each element names the
        parameter entries it reads and their weights; added to the token values it becomes a table of rows
        whose activation at a position is its interpolation weight (``rules_affine.resampled_positions``).
        """
        sizes, out_sizes = tuple(x.shape[2:]), tuple(output.shape[2:])
        if x.dim() < 3 or output.dim() != x.dim() or tuple(output.shape[:2]) != tuple(x.shape[:2]):
            raise self.unsupported(name, f"resamples the parameter '{self.param_names[param.index]}' of shape "
                                   f"{list(x.shape)}: gradgraph reads an interpolated table of shape [N, C, *spatial]")
        count = math.prod(sizes)
        basis = torch.eye(count, dtype=torch.float64).reshape(count, 1, *sizes)
        options = {key: value for key, value in kwargs.items() if key != "input"}
        maps = F.interpolate(basis, *args[1:], **options)  # [count, 1, *out_sizes]: column s of A
        if tuple(maps.shape[2:]) != out_sizes:  # (the same options on the same sizes: never, checked)
            raise self.unsupported(name, "resampling the one-hot maps gave another grid than the call")
        matrix = maps.reshape(count, -1).t()  # [T', S]
        taps = max(int((matrix != 0).sum(1).max()), 1)
        order = matrix.abs().argsort(dim=1, descending=True, stable=True)[:, :taps]  # [T', J] the entries read
        weights = matrix.gather(1, order)
        pos = broadcast_ids(param.pos, x.shape).reshape(x.shape[0], x.shape[1], count)
        read = pos[:, :, order]  # [N, C, T', J] the parameter entries each output element reads
        rows = read.shape[0] * read.shape[1] * read.shape[2]
        self.set_meta(output, Resampled(param.index, torch.arange(rows).reshape(output.shape), read.reshape(rows, taps),
                                        weights.expand(*read.shape).reshape(rows, taps).clone()))

    def table_sets(self, name: str, label: str, param: int, entries: Tensor) -> tuple[NeuronSet, NeuronSet, Tensor]:
        """The neurons of a table read by rows (an embedding, a position table): a ``TOKEN`` set of its ``R``
        rows, a ``RESIDUAL`` set of its ``C`` features, and an ``EMBEDDING`` edge from every row to every feature
        carrying the parameter's entry ``entries [R, C]`` (flat positions in parameter ``param``). Returns the two
        sets and the feature set's node ids ``[C]``."""
        rows, width = entries.shape
        tokens = self.new_set(rows, NodeKind.TOKEN, f"{self.path() or name} {label}", "token")
        created = self.new_set(width, NodeKind.RESIDUAL, self.path() or name, "embedding")
        targets = created.first + torch.arange(width)
        self.edges.append((tokens.first + torch.arange(rows).repeat_interleave(width), targets.repeat(rows),
                           EdgeKind.EMBEDDING, param, entries.reshape(-1).clone(), None))
        return tokens, created, targets

    def resampled_positions(self, name: str, meta: Resampled, shape: torch.Size, channels: bool) -> Neurons:
        """A resampled position table added to token values (``rules_affine.resample_parameter``).

        As :meth:`position_parameter`, the table's rows are ``TOKEN`` input neurons joined to a new set by
        ``EMBEDDING`` edges that carry the parameter; the rows a position reads are those its interpolation
        reads, each with its weight as the activation instead of 1. So the gradient of a table entry, the sum
        over positions of weight x the position's backpropagated signal, is a sum of rank-1 terms, exactly.
        """
        table = self.param_names[meta.index]
        axis = 1 if channels else len(shape) - 1  # a map's channels [b, C, *S], or the features of tokens
        width = shape[axis]
        pos = meta.pos.reshape(*[1] * (len(shape) - meta.pos.dim()), *meta.pos.shape)
        if pos.dim() != len(shape) or pos.shape[axis] != width:
            raise self.unsupported(name, f"adds the resampled parameter '{table}' without a value per feature")
        flat = pos.movedim(axis, -1).reshape(-1, width)  # [P, C]: the value's element rows, one per position
        taps, weights = meta.taps[flat], meta.weights[flat]  # [P, C, J]
        if not torch.equal(weights, weights[:, :1].expand_as(weights)):
            raise self.unsupported(name, f"adds the resampled parameter '{table}' with weights that differ "
                                   "between features; gradgraph reads a table resampled alike for every feature (of "
                                   "a map, its channels: the raw input's last axis is read as its features)")
        live = weights[:, 0] != 0  # [P, J]
        keys = taps.transpose(1, 2)[live]  # [L, C]: the entries of every row read, one per feature
        rows, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if rows.unique().numel() != rows.numel():  # an entry in two rows: not one table row per position
            raise self.unsupported(name, f"adds the resampled parameter '{table}' whose positions read its entries "
                                   "in different groupings of the features")
        tokens, created, targets = self.table_sets(name, "positions", meta.index, rows)
        read = torch.full(live.shape, -1, dtype=torch.long)
        read[live] = inverse
        tokens.weighted = (read, torch.where(live, weights[:, 0], 0.0))  # type: ignore[attr-defined]
        position_of_row = torch.full((int(meta.pos.max()) + 1,), -1, dtype=torch.long)
        position_of_row[flat.reshape(-1)] = torch.arange(flat.shape[0]).repeat_interleave(width)
        created.token_set = tokens  # type: ignore[attr-defined]
        nodes = targets.reshape(-1, *[1] * (len(shape) - 2)) if channels else targets
        return Neurons(broadcast_ids(nodes, shape).clone(), None, {created.index: 0},
                       unbound_index=position_of_row[broadcast_ids(pos, shape)])

    def position_parameter(self, name: str, param: Param, shape: torch.Size, result: Tensor) -> Neurons:
        """A parameter added to token values that varies over positions: a position embedding."""
        pos = broadcast_ids(param.pos, shape) if param.pos.dim() <= len(shape) else param.pos
        width = shape[-1]
        flat = param.pos.reshape(-1, width) if param.pos.shape[-1] == width else None
        if flat is None:
            raise self.unsupported(name, "a parameter added to neurons that does not vary per feature")
        rows = flat.shape[0]
        tokens, created, targets = self.table_sets(name, "positions", param.index, flat)
        row_of_pos = torch.full((int(param.pos.max()) + 1,), -1, dtype=torch.long)
        row_of_pos[flat.reshape(-1)] = torch.arange(rows).repeat_interleave(width)
        meta = Neurons(broadcast_ids(targets, shape).clone(), None, {created.index: 0},
                        unbound_index=row_of_pos[pos])
        created.token_set = tokens  # type: ignore[attr-defined]
        return meta
