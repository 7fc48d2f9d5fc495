"""Trace rules for elementwise ops: activations, residual adds, gates, arithmetic with parameters and
constants. Masks and comparisons are in ``rules_masks.py``, reductions and softmax in ``rules_reduction.py``,
norms in ``rules_norm.py``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import (
    broadcast_ids, channel_row, feature_row, KEY_STRIDE, neuron_axes_last, neuron_row, neuron_rows, Neurons,
    NeuronSet, Opaque, Param, Raw, Resampled, rows_along_last, UnsupportedOperationError, varies_along,
)
from gradgraph.convert.trace.ops import (
    BINARY_ADD, BINARY_OTHER, PARAMETER_REFUSED,
)
from gradgraph.convert.trace.rules_data import Data
from gradgraph.graph import ActivationKind, EdgeKind, NodeKind

def _one_value_per_neuron(nodes: tuple[Tensor, ...], comps: Tensor) -> bool:
    """No element that holds a neuron repeats another's ids: its neurons (one per operand in
    ``nodes``, broadcast alike) and its component. A repeat is one neuron holding two values at
    one datapoint position, where the graph has one."""
    ids = torch.stack([*(part.reshape(-1) for part in nodes), comps.reshape(-1)])
    ids = ids[:, (ids[:-1] >= 0).any(0)]
    return torch.unique(ids, dim=1).shape[1] == ids.shape[1]


def _unique_pairs(first: Tensor, second: Tensor) -> Tensor:
    """``torch.unique(torch.stack((first, second)), dim=1)`` for non-negative ids, as a 1-D unique
    of one code per pair (the same sorted columns; ``unique(dim=1)`` on a CNN's feature maps was a
    fifth of a first conversion)."""
    first, second = first.reshape(-1), second.reshape(-1)
    if first.numel() == 0:
        return torch.stack((first, second))
    scale = int(second.max()) + 1
    codes = torch.unique(first * scale + second)
    return torch.stack((codes // scale, codes % scale))


_SUBTRACTIONS = {"Tensor.__sub__", "Tensor.__rsub__", "Tensor.sub", "torch.sub"}
_PRODUCTS = {"Tensor.__mul__", "Tensor.__rmul__", "Tensor.mul", "torch.mul"}
_QUOTIENTS = {"Tensor.__truediv__", "Tensor.__rdiv__", "Tensor.div", "torch.div"}


def _slope_one(name: str, kwargs: dict, right: bool, other: Any) -> bool:
    """Whether the binary op ``name`` passes its operand on the ``right`` side (else the left) with slope one
    everywhere: an addition with ``alpha`` 1, a subtraction of the other side, a product with or a division by
    the number 1 (``__rsub__``'s and ``__rdiv__``'s sides come swapped)."""
    if name in BINARY_ADD:
        return kwargs.get("alpha", 1) == 1 and not (right and name in _SUBTRACTIONS)
    unit = isinstance(other, int | float) and not isinstance(other, bool) and other == 1
    return unit and (name in _PRODUCTS or (name in _QUOTIENTS and not right and kwargs.get("rounding_mode") is None))


class ElementwiseRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: elementwise ops, masks, comparisons."""

    # -------------------------------------------------------------- elementwise
    def unary(self, x: Any, output: Tensor, name: str, activation: ActivationKind | None,
              constants: tuple = (), *, slope_one: bool = False) -> None:
        """An elementwise op of one neuron value (with constants): the same neurons, a new version.
        ``constants``: the op's other tensor arguments (a clamp's bounds, a power's exponent); ``slope_one``: the
        op's derivative is 1 everywhere (``h + c``), which position values may take."""
        meta = self.need_neurons(x, name)
        if meta is None:
            return None
        # a tensor bound or exponent (clamp(h, min=c), pow(h, p)) that differs between neurons treats each its own
        # way, as a constant added or multiplied does: their sets are pinned (a false symmetry before); one that holds
        # neurons (clamp(h, min=g)) pairs them with h's, which no tie says: no symmetry claimed for either. Position
        # values too (pos + c, c one number per feature: their set was left free, and the join h + (pos + c) with it,
        # a false symmetry before; branch mut45, issue 31)
        for constant in constants:
            other = self.meta(constant)
            if isinstance(other, Neurons):
                for index in (*meta.versions, *other.versions):
                    self.sets[index].pinned = True
            elif isinstance(constant, Tensor) and constant.dim():
                self.check_constant(name, meta, constant, output.shape)
        changed = None
        if meta.comps is None:
            # position values get their gradient where they join the tokens (bind): an op between of slope other
            # than one would be left out of it, so such a join is refused naming the op (before, only the
            # summed-gradient check refused 2.0 * pos(arange(T)), in words naming no op)
            changed = self.changed_position_op(meta) or (None if slope_one else f"{name.strip()} at {self.location()}")
        # an op on part of a set (relu of h[:, :2], tanh of the rest) treats its neurons unlike the others:
        # that part is a piece of its own, or the set is pinned (a permutation of the whole set would move
        # the part's neurons onto the others)
        self.separate_mixed_part(meta)
        versions = self.next_version(meta.versions)
        for index in meta.versions:
            neuron_set = self.sets[index]
            if activation is not None and neuron_set.activation is ActivationKind.IDENTITY and not neuron_set.absorbed:
                neuron_set.activation = activation
            elif activation is None or neuron_set.activation is not ActivationKind.IDENTITY:
                neuron_set.elementwise_ops = getattr(neuron_set, "elementwise_ops", 0) + 1  # type: ignore[attr-defined]
        nodes, comps, unbound = meta.nodes, meta.comps, meta.unbound_index
        if tuple(nodes.shape) != tuple(output.shape):
            # h + c with a constant c of more positions ([b, 1, d] + [1, T, d]): the result holds h's values copied
            # over the new places, as h.expand(...) would (the ids at the output's shape; kept at h's, the records
            # of this value failed to expand in the assembly)
            nodes = broadcast_ids(nodes, output.shape).clone()
            comps = None if comps is None else broadcast_ids(comps, output.shape).clone()
            unbound = None if unbound is None else broadcast_ids(unbound, output.shape).clone()
        if changed is not None:
            self.changed_positions.update({item: changed for item in versions.items()})
        new = Neurons(nodes, comps, versions, unbound)
        self.set_meta(output, new)
        self.observe(output, new)

    def op_of_the_same_neurons(self, metas: tuple[Neurons, ...], nodes: Tensor, comps: Tensor, output: Tensor) -> None:
        """An op whose operands hold the same neurons at the same components (``h * tanh(h)``, ``torch.where(h > 0,
        h, 0.1 * h)``): a new version of them. ``h * tanh(h)`` is even, ``relu(h) * h`` homogeneous of degree 2: no
        longer the named activation inside, so the set is labelled ``OTHER`` (found by mut29: sign flips and
        rescalings trusted the label). On part of a set (``h[:, :2] * h[:, :2]``) the part is treated unlike the rest,
        as for a unary op: cut or pinned (a false symmetry before, session 22: only ops through ``unary`` cut it).
        ``nodes`` / ``comps``: the ids at the result's shape."""
        self.separate_mixed_part(metas[0])
        merged = {index: version for meta in metas for index, version in meta.versions.items()}
        for index in merged:
            neuron_set = self.sets[index]
            neuron_set.elementwise_ops = getattr(neuron_set, "elementwise_ops", 0) + 1  # type: ignore[attr-defined]
        new = Neurons(nodes, comps, self.next_version(merged))
        self.set_meta(output, new)
        self.observe(output, new)

    def changed_position_op(self, meta: Neurons) -> str | None:
        """The op (and where it ran) that changed these position values with a slope other than one, if any."""
        return next((self.changed_positions[item] for item in meta.versions.items() if item in self.changed_positions),
                    None)

    def _operand(self, value: Any, name: str, other: Any = None) -> Any:
        if isinstance(value, Tensor):
            meta = self.meta(value)
            if isinstance(meta, Raw) and value.is_floating_point():
                return self.need_neurons(value, name)
            if isinstance(meta, Data) and isinstance(self.meta(other), Param):
                return self.need_neurons(value, name)  # input features cast from integers, scaled by a parameter
            return meta
        return None

    def binary(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        # both operands may come by keyword (torch.mul(input=h, other=g)): a builtin hands the mode the arguments as
        # the caller wrote them
        left = args[0] if args else kwargs.get("input")
        right = args[1] if len(args) > 1 else kwargs.get("other")
        # c / h calls Tensor.__rtruediv__, which is Tensor.__rdiv__ (its name: the op's name here; the tables named
        # __rtruediv__, so 1.0 / h had no rule)
        if name in ("Tensor.__rsub__", "Tensor.__radd__", "Tensor.__rmul__", "Tensor.__rdiv__",
                    "Tensor.__rpow__"):
            left, right = right, left
        operands = [(left, self._operand(left, name, right)), (right, self._operand(right, name, left))]
        neurons = [(value, meta) for value, meta in operands if isinstance(meta, Neurons)]
        params = [(value, meta) for value, meta in operands if isinstance(meta, Param)]
        additive = name in BINARY_ADD
        resampled = [meta for _, meta in operands if isinstance(meta, Resampled)]
        if resampled:  # a position table resized by F.interpolate (rules_affine.resample_parameter)
            if not (additive and len(neurons) == 1 and neurons[0][1].comps is not None) or kwargs.get("alpha", 1) != 1:
                raise self.unsupported(name, f"uses the resampled parameter '{self.param_names[resampled[0].index]}' "
                                       "(F.interpolate of a table) otherwise than added to the token values")
            channels = neuron_row(neurons[0][1], output.shape)[1]
            embedded = self.resampled_positions(name, resampled[0], output.shape, channels)
            return self.binary_with(name, neurons[0][0], neurons[0][1], embedded, output)
        if not neurons:
            other = right if params and params[0][0] is left else left
            if len(params) == 1 and name in ("Tensor.__add__", "Tensor.__radd__", "Tensor.add", "torch.add") \
                    and isinstance(other, int | float) and kwargs.get("alpha", 1) == 1:
                # a scale written 1 + weight (Gemma's RMSNorm): the same gradient as the weight's,
                # so the op stands for the parameter (its edges carry the weight, not 1 + weight)
                self.set_meta(output, params[0][1])
                return None
            raise self.unsupported(name, "arithmetic on parameters inside the forward (other than as a weight, "
                                   "a bias, a scale, a position embedding or a constant added to a scale)")
        if params:
            if name in PARAMETER_REFUSED or name in BINARY_OTHER or kwargs.get("alpha", 1) != 1:
                raise self.parameter_operand_refused(name, params[0][1])
            return self.with_parameter(name, neurons[0], params[0], output, additive)
        if len(neurons) == 1:
            value, meta = neurons[0]
            other = right if value is left else left  # a constant: unary checks it as one of the op's constants
            return self.unary(value, output, name, None, (other,) if isinstance(other, Tensor) else (),
                              slope_one=_slope_one(name, kwargs, value is right, other))
        (a_value, a), (b_value, b) = neurons
        shape = output.shape
        if a.comps is None and b.comps is None:
            raise self.unsupported(name, "arithmetic on two values that do not depend on the input")
        for value, meta in ((a_value, a), (b_value, b)):
            if meta.comps is not None:
                continue
            changed = self.changed_position_op(meta)
            if changed is not None:
                raise self.unsupported(name, f"joins position values (a position embedding, a parameter added per "
                                       f"position) that {changed} changed before they join the token values "
                                       "(2.0 * pos, relu(pos)): their gradient is read where they join the tokens, "
                                       "which that op would leave out. Apply the op after adding them (f(h + pos)), "
                                       "or fold a constant scale into the embedding's table")
            if not _slope_one(name, kwargs, value is right, None):
                raise self.unsupported(name, "joins position values (a position embedding, a parameter added per "
                                       "position) to the token values by another op than an addition (h * pos, "
                                       "h - pos), whose gradient gradgraph does not read; add them (h + pos), "
                                       "then apply the op")
        comps = broadcast_ids(a.comps if a.comps is not None else b.comps, shape)
        if a.comps is None:
            a = self.bind(a_value, a, shape, comps.clone(), output)
        if b.comps is None:
            b = self.bind(b_value, b, shape, comps.clone(), output)
        broadcast = tuple(a.comps.shape) != tuple(shape) or tuple(b.comps.shape) != tuple(shape)
        a_nodes, b_nodes = broadcast_ids(a.nodes, shape), broadcast_ids(b.nodes, shape)
        comps = broadcast_ids(a.comps, shape)
        if bool((comps // KEY_STRIDE != broadcast_ids(b.comps, shape) // KEY_STRIDE).any()):
            # one datapoint's value combined with another's (a gather across a PyG batch's graphs):
            # the result's datapoint would depend on the other's
            raise self.unsupported(name, "combines values of different datapoints (a value gathered from another "
                                   "graph or row of the batch), so one datapoint's loss would depend on another's")
        if broadcast:
            self.check_no_copies(name, (a_nodes, b_nodes), comps)
        if torch.equal(a_nodes, b_nodes) or bool((a_nodes < 0).all()) or bool((b_nodes < 0).all()):
            # the same neurons (x * sigmoid(x)), or neurons and a statistic of them (x - mean)
            base = a if not bool((a_nodes < 0).all()) else b
            nodes = broadcast_ids(base.nodes, shape).clone()
            if torch.equal(a_nodes, b_nodes):
                return self.op_of_the_same_neurons((a, b), nodes, comps.clone(), output)
            self.separate_mixed_part(base)
            new = Neurons(nodes, comps.clone(), self.next_version(base.versions))
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        if bool((a_nodes < 0).any()) or bool((b_nodes < 0).any()):
            raise self.unsupported(name, "combines neurons with values that are partly not neurons")
        pairs = _unique_pairs(a_nodes, b_nodes)
        if torch.unique(pairs[0]).numel() != pairs.shape[1] or torch.unique(pairs[1]).numel() != pairs.shape[1]:
            if not additive and self.block_gate(name, (a_nodes, a), (b_nodes, b), comps, output):
                return None
            # not one neuron of b per neuron of a (e.g. rotary embeddings mixing dims): no symmetry claimed
            for index in list(a.versions) + list(b.versions):
                self.sets[index].pinned = True
            # the result lives in the neurons of an operand that has one neuron per element and
            # component: a gate broadcast over features (a mixture-of-experts weight times an
            # expert's output) would otherwise label every feature with the gate's one neuron
            keep = next((nodes for nodes in (a_nodes, b_nodes) if _one_value_per_neuron((nodes,), comps)), None)
            if keep is None:
                raise self.unsupported(name, "combines values broadcast from both sides (an outer product of neuron "
                                       "values), so no neuron holds one value per datapoint position")
            return self.combined_set(name, (a_nodes, b_nodes), keep, comps, output)
        kind = EdgeKind.RESIDUAL if additive else EdgeKind.GATE
        overlap = bool(torch.isin(pairs[0], pairs[1]).any())
        if overlap:
            # the operands share neurons in other places (x + x reordered, rotary's q and its
            # rotated halves): a permutation would have to commute with that reordering, which
            # ties cannot say; no symmetry is claimed
            for index in list(a.versions) + list(b.versions):
                self.sets[index].pinned = True
        fresh = [(meta, other) for meta, other in ((b, a), (a, b)) if self.absorbable(meta)]
        # a set read by this sum's edges may not hold a later sum: one whose other operand came from this sum's
        # result (y + norm(y - mean + x)) would close a cycle of sets, which the layout refused as "internal"
        for read in {index for meta in ((a, b) if not fresh else (fresh[0][1],)) for index in meta.versions}:
            self.sets[read].fresh = False
        if fresh:
            into, other = fresh[0]
            into_nodes, other_nodes = broadcast_ids(into.nodes, shape), broadcast_ids(other.nodes, shape)
            pairs = _unique_pairs(other_nodes, into_nodes)
            self.edges.append((pairs[0].clone(), pairs[1].clone(), kind, -1, None, None))
            self.ties.append((pairs[0].clone(), pairs[1].clone()))
            target = self.sets[next(iter(into.versions))]
            target.absorbed = True
            if not additive:
                target.gated = True  # type: ignore[attr-defined]
                for index in other.versions:
                    self.sets[index].gated = True  # type: ignore[attr-defined]
            new = Neurons(into_nodes.clone(), comps.clone(), self.next_version(into.versions))
        else:
            order = torch.argsort(pairs[0])
            a_sorted, b_sorted = pairs[0][order], pairs[1][order]
            # (all pinned where they overlap: the ties only group labels)
            merged, new = self.merged_set(name, (a_sorted, b_sorted), kind, a_nodes, comps.clone(), output,
                                          edges=not overlap)
            if overlap:
                merged.pinned = True
                merged_nodes = merged.first + torch.arange(merged.size)
                # a neuron paired with itself would feed its merged neuron twice: one edge per pair
                edges = torch.unique(torch.cat([torch.stack((a_sorted, merged_nodes)),
                                                torch.stack((b_sorted, merged_nodes))], dim=1), dim=1)
                self.edges.append((edges[0].clone(), edges[1].clone(), kind, -1, None, None))
            if not additive:
                merged.gated = True  # type: ignore[attr-defined]
                self.split_fused_gate((a_value, a, a_sorted), (b_value, b, b_sorted))
        self.set_meta(output, new)
        self.observe(output, new)

    def merged_set(self, name: str, sources: tuple[Tensor, ...] | list[Tensor], kind: EdgeKind, nodes: Tensor,
                   comps: Tensor, output: Tensor, *, edges: bool = True) -> tuple[NeuronSet, Neurons]:
        """A new MERGE set of one neuron per neuron of ``sources[0]``, tied neuron for neuron to each source
        (aligned node ids), with an edge of ``kind`` from each (``edges=False``: the caller adds its own); the
        result's meta where ``nodes`` (ids of ``sources[0]``'s neurons) are relabelled to it, its grad the
        output's. The merge of ``h1 + h2`` / ``h1 * h2`` (:meth:`binary`) and of stacked values
        (:meth:`merge_stacked`)."""
        merged = self.new_set(len(sources[0]), NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
        merged_nodes = merged.first + torch.arange(len(sources[0]))
        for source in sources:
            if edges:
                self.edges.append((source.clone(), merged_nodes, kind, -1, None, None))
            self.ties.append((source.clone(), merged_nodes))
        lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
        lookup[sources[0]] = merged_nodes
        new = Neurons(lookup[nodes], comps, {merged.index: 0})
        merged.grad_records.append((output, new.nodes, new.comps))
        return merged, new

    def merge_stacked(self, name: str, x: Tensor, meta: Neurons, axis: int, output: Tensor, keepdim: bool) -> bool:
        """A sum, mean, maximum or minimum over ``axis`` of ``x`` where whole values were stacked along it
        (JumpingKnowledge's ``torch.stack(xs, -1).max(-1)`` over a GNN's layer outputs, a mean of several
        layers' features): elementwise in the stacked values, as ``h1 + h2`` or ``torch.maximum(h1, h2)`` is.
        The result is a new set of one neuron per neuron of a slice, tied neuron for neuron to every slice's
        (RESIDUAL edges for a sum or mean, GATE edges for a maximum or minimum), so a permutation moves all
        of them alike. Returns whether it applied: every slice holds neurons, one per feature at each
        component, the slices' neurons pair one to one and no two slices hold neurons of one set (slices of one
        set are a statistic of each part, as a per-head norm's, or maxout's ``h.view(b, F, k).max(-1)``: the
        caller's rules for those)."""
        nodes = broadcast_ids(meta.nodes, x.shape).movedim(axis, 0)
        comps = broadcast_ids(meta.comps, x.shape).movedim(axis, 0)
        if nodes.shape[0] < 2 or bool((nodes < 0).any()) or not torch.equal(comps, comps[:1].expand_as(comps)):
            return False
        first = nodes[0]
        if not _one_value_per_neuron((first,), comps[0]):
            return False
        slices = []
        for other in nodes:
            pairs = _unique_pairs(first, other)  # sorted by the first slice's neuron
            if torch.unique(pairs[1]).numel() != pairs.shape[1] or torch.unique(pairs[0]).numel() != pairs.shape[1]:
                return False
            slices.append(pairs[1])
        if torch.unique(torch.cat(slices)).numel() != sum(len(part) for part in slices):
            return False  # a neuron in two slices
        owners = [{self.set_of(int(node)).index for node in part.tolist()} for part in slices]
        if any(a & b for i, a in enumerate(owners) for b in owners[i + 1:]):
            return False  # slices of one set: a statistic of each part (a per-head norm), or maxout
        additive = not name.endswith(("max", "min"))
        nodes, new_comps = (first.unsqueeze(axis), comps[0].unsqueeze(axis)) if keepdim else (first, comps[0])
        merged, new = self.merged_set(name, slices, EdgeKind.RESIDUAL if additive else EdgeKind.GATE, nodes,
                                      new_comps.clone(), output)
        if not additive:
            merged.gated = True  # type: ignore[attr-defined]
        self.set_meta(output, new)
        self.observe(output, new)
        return True

    def block_gate(self, name: str, a: tuple[Tensor, Neurons], b: tuple[Tensor, Neurons], comps: Tensor,
                   output: Tensor) -> bool:
        """A product whose one operand is a *gate* broadcast over blocks of the other's neurons (an
        expert's weight times all its features, an attention head's weight times the head's
        channels): each neuron of the gated operand meets one gate neuron, and no neuron is in
        both. Then a permutation of the gated neurons *within* each block keeps the product (the
        gate is the same for all of them): the product is a new set tied neuron for neuron to the
        gated one, both cut where the gate changes along a run of a set, and the gate's sets are
        fixed (moving a gate neuron would move a whole block, which cuts cannot say). Returns
        whether it applied; else the caller fixes both operands (no symmetry claimed)."""
        for (gated_nodes, gated), (gate_nodes, gate) in ((a, b), (b, a)):
            if not _one_value_per_neuron((gated_nodes,), comps):
                continue
            pairs = _unique_pairs(gated_nodes, gate_nodes)  # sorted by gated neuron
            if torch.unique(pairs[0]).numel() != pairs.shape[1] or bool(torch.isin(pairs[1], pairs[0]).any()):
                continue  # a gated neuron meets two gate neurons, or the operands share neurons
            sources, partners = pairs[0], pairs[1]
            for index in gate.versions:
                self.sets[index].pinned = True
            for index in gated.versions:
                self.separate_part_read(self.sets[index], sources)
            created = self.new_set(len(sources), NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
            created.gated = True  # type: ignore[attr-defined]
            targets = created.first + torch.arange(len(sources))
            # the gate changes between two neurons next to each other in a set: a border for both sets
            borders = torch.nonzero((partners[1:] != partners[:-1]) & (sources[1:] == sources[:-1] + 1)).flatten() + 1
            self.cuts.update(int(sources[border]) for border in borders)
            self.cuts.update(int(targets[border]) for border in borders)
            self.edges.append((sources.clone(), targets, EdgeKind.GATE, -1, None, None))
            self.edges.append((partners.clone(), targets.clone(), EdgeKind.GATE, -1, None, None))
            self.ties.append((sources.clone(), targets.clone()))
            lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
            lookup[sources] = targets
            new = Neurons(lookup[gated_nodes], comps.clone(), {created.index: 0})
            created.grad_records.append((output, new.nodes, new.comps))
            self.set_meta(output, new)
            self.observe(output, new)
            return True
        return False

    def split_fused_gate(self, *halves: tuple[Tensor, Neurons, Tensor]) -> None:
        """``silu(a) * b`` where ``a, b = w12(x).chunk(2, -1)``: cut the fused set into its halves.

        Both halves are slices of one affine output, each tied neuron for neuron to the gate's
        product, so the group permutes the two halves' rows of the fused weight by one permutation
        (the same one as the product). That holds only when the halves are two contiguous runs that
        are two disjoint contiguous runs of the set (a chunk or split in two, or two of the parts
        of ``chunk(3)``): then the layout cuts the set there (``tracer.cuts``; the rest of the set is
        a piece of its own, as for any contiguous partial read) and each piece holds one neuron of
        every orbit. Interleaved or overlapping halves (``h[..., ::2]``) are left as they are: no
        symmetry is claimed for them.
        """
        (_, a_meta, _), (_, b_meta, _) = halves
        if len(a_meta.versions) != 1 or a_meta.versions.keys() != b_meta.versions.keys():
            return
        if self.sets[next(iter(a_meta.versions))].created_by != "affine":
            return
        runs = []
        for _, _, nodes in halves:
            low, high = int(nodes.min()), int(nodes.max()) + 1
            if high - low != nodes.numel():
                return
            runs.append((low, high))
        (low_a, high_a), (low_b, high_b) = runs
        if low_a < high_b and low_b < high_a:
            return  # overlapping halves: no claim
        # a third part beside the halves (w(x).chunk(3)) is cut off as a piece of its own, as any contiguous
        # partial read is (separate_part_read): the ties still move each a_i only with its b_i and product
        for low, high in runs:
            self.cuts.update((low, high))
        for value, meta, _ in halves:  # each half's own value is its act (a's after its activation)
            self.record_act(value, meta)

    def combined_set(self, name: str, operands: tuple[Tensor, Tensor], layout: Tensor, comps: Tensor,
                     output: Tensor, kind: EdgeKind = EdgeKind.GATE) -> None:
        """The values of an op whose operands do not pair neuron for neuron (a gate broadcast over
        an expert's features, rotated dims) or pair a set with itself reordered: a new pinned set,
        one neuron per neuron of ``layout`` (an operand with one neuron per element), fed by
        ``kind`` edges (GATE, RESIDUAL for sums) from both operands' neurons.
        Neither operand's neurons can hold them: they are other values, and an affine map may read
        the operands too."""
        row = torch.unique(layout)
        created = self.new_set(len(row), NodeKind.RESIDUAL, f"{self.path()} {name}", "merge")
        created.pinned = True
        lookup = torch.full((int(row.max()) + 1,), -1, dtype=torch.long)
        lookup[row] = torch.arange(len(row))
        nodes = created.first + lookup[layout]
        # one GATE edge per (operand neuron, new neuron) pair, also where both operands hold one
        # neuron (a gate read from the values it gates): no parallel edges
        pairs = torch.unique(torch.cat([torch.stack((source.reshape(-1), nodes.reshape(-1))) for source in operands],
                                       dim=1), dim=1)
        self.edges.append((pairs[0].clone(), pairs[1].clone(), kind, -1, None, None))
        new = Neurons(nodes.clone(), comps.clone(), {created.index: 0})
        created.grad_records.append((output, new.nodes, new.comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def check_no_copies(self, name: str, nodes: tuple[Tensor, ...], comps: Tensor) -> None:
        """Refuse values that hold one neuron at one component twice (a broadcast over a new
        axis): the graph has one value per neuron and component, so copies would lose terms."""
        if not _one_value_per_neuron(nodes, comps):
            raise self.unsupported(name, "copies values of one position over a new axis (a broadcast or expand of "
                                   "a [.., 1, ..] axis), so one neuron would hold several values at one datapoint "
                                   "position; apply the op before adding the axis, or add it with a Linear")

    def parameter_operand_refused(self, name: str, param: Param) -> UnsupportedOperationError:
        """The refusal of a parameter that is no bias or scale of the neurons it meets."""
        return self.unsupported(name, f"the parameter '{self.param_names[param.index]}' is subtracted, divided by, "
                                "an exponent, a bound or scaled by alpha; gradgraph reads a parameter added to neurons "
                                "(a bias) or multiplied with them (a scale): write h + b or h * s")

    def absorbable(self, meta: Neurons) -> bool:
        """Values that are exactly a fresh affine output: a residual sum may live in its neurons."""
        if len(meta.versions) != 1 or meta.comps is None:
            return False
        index, version = next(iter(meta.versions.items()))
        neuron_set = self.sets[index]
        if neuron_set.created_by != "affine" or not neuron_set.fresh or neuron_set.absorbed or version != 0:
            return False
        rows = rows_along_last(meta.nodes)
        return rows.shape[1] == neuron_set.size and bool((rows == rows[:1]).all())

    def check_constant(self, name: str, meta: Neurons, constant: Tensor, shape: torch.Size) -> None:
        """A constant that differs between neurons of one set breaks their permutation symmetry."""
        nodes = broadcast_ids(meta.nodes, shape)
        axes = tuple(axis for axis in range(len(shape)) if varies_along(nodes, axis))
        if self.constant_varies(constant, tuple(shape), axes):
            for index in meta.versions:
                self.sets[index].pinned = True

    def check_constant_operands(self, name: str, meta: Neurons, operands: tuple, value: Tensor,
                                shape: torch.Size) -> None:
        """:meth:`check_constant` for every constant operand of an op that is elementwise in ``value``'s neurons
        (a mask, a fill value, a threshold); the neuron value itself and a comparison of it are no constants."""
        for other in operands:
            if isinstance(other, Tensor) and other is not value and not isinstance(self.meta(other), Neurons | Opaque):
                self.check_constant(name, meta, other, shape)

    def with_parameter(self, name: str, neurons: tuple[Tensor, Neurons], param: tuple[Tensor, Param],
                       output: Tensor, additive: bool) -> None:
        value, meta = neurons
        param_value, param_meta = param
        shape = output.shape
        if meta.comps is None:
            raise self.unsupported(name, "arithmetic between a parameter and values that do not depend on the input")
        nodes = broadcast_ids(meta.nodes, shape)
        pos = broadcast_ids(param_meta.pos, shape)
        comps = broadcast_ids(meta.comps, shape)
        # a map [b, C, *S] whose channels are its neurons (a layer scale gamma[:, None, None] * x)
        sources = channel_row(nodes, shape) if len(shape) >= 3 and any(
            varies_along(comps, axis) for axis in range(2, len(shape))) else None
        channels = sources is not None
        if channels:
            pos_row = pos.reshape(shape[0], shape[1], -1)[0, :, 0]
            per_feature = torch.equal(pos, broadcast_ids(pos_row.reshape(1, -1, *[1] * (len(shape) - 2)), shape))
            if not per_feature:
                raise self.unsupported(name, "a parameter combined with a feature map that differs between positions")
            pos_rows = pos_row[None]
        else:
            layout = neuron_axes_last(nodes)
            sources = feature_row(neuron_rows(nodes, layout))
            pos_rows = neuron_rows(pos, layout)
            per_feature = bool((pos_rows == pos_rows[:1]).all())
        if sources is None:
            raise self.unsupported(name, "a parameter combined with values that are not one neuron per feature")
        if additive and not per_feature:
            embedded = self.position_parameter(name, param_meta, shape, output)
            return self.binary_with(name, value, meta, embedded, output)
        if not per_feature:
            raise self.unsupported(name, "a parameter multiplying neurons that differs between positions")
        positions = pos_rows[0].clone()
        if additive:
            target = self.sets[next(iter(meta.versions))] if len(meta.versions) == 1 else None
            if target is not None and self.absorbable(meta) and target.bias_param < 0 \
                    and torch.equal(sources, target.first + torch.arange(target.size)):
                target.bias_param, target.bias_pos = param_meta.index, positions
                new = Neurons(nodes.clone(), broadcast_ids(meta.comps, shape).clone(), dict(meta.versions))
                target.grad_records = [(output, new.nodes, new.comps)]
                self.set_meta(output, new)
                self.observe(output, new)
                return None
            kind, weight_param, weight_pos = EdgeKind.RESIDUAL, -1, None
        else:
            kind, weight_param, weight_pos = EdgeKind.NORM_SCALE, param_meta.index, positions
        meta = self.fix_act(value, meta, name)
        nodes = broadcast_ids(meta.nodes, shape)
        sources = channel_row(nodes, shape) if channels else neuron_rows(nodes, neuron_axes_last(nodes))[0].clone()
        # one set per source set the features lie in (a scale of cat([h1, h2])): per feature, so each
        # part still permutes on its own, with its source
        targets, created_sets, runs = self.sets_per_run(sources, NodeKind.NORM, f"{self.path()} {name}", "scale")
        for (low, high), created in zip(runs, created_sets):
            if additive:
                created.bias_param, created.bias_pos = param_meta.index, positions[low:high].clone()
            self.ties.append((sources[low:high], targets[low:high]))
        self.edges.append((sources, targets, kind, weight_param, weight_pos, None))
        lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
        lookup[sources] = targets
        new = Neurons(lookup[broadcast_ids(meta.nodes, shape)], broadcast_ids(meta.comps, shape).clone(),
                       {created.index: 0 for created in created_sets})
        created_sets[0].grad_records.append((output, new.nodes, new.comps))  # one record writes every set's grad
        self.set_meta(output, new)
        self.observe(output, new)

    def binary_with(self, name: str, value: Tensor, meta: Neurons, embedded: Neurons, output: Tensor) -> None:
        placeholder = torch.empty(0)
        self.set_meta(placeholder, embedded)
        self.binary(name, (value, placeholder), {}, output)
