"""Trace rules for a recurrent loop run folded over time (docs/recurrent.md, "The folded layout").

The fused ops of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` run as their per-step loop
(``trace/recurrent.py``); run folded, the loop tells the tracer where each (layer, direction)
group and each of its steps begins and ends, and each step reads its state through
:func:`~gradgraph.convert.trace.recurrent.previous_state`. The tracer then:

* makes the neuron sets of the group's **first** step (the template) as usual, and at every
  later step hands the rules the template's sets again, in the same order, instead of new
  ones: the ``k``-th set a step creates *is* the template's ``k``-th set. So each gate, the
  state and the cell state are one neuron set over all steps, and each step's values land at
  that step's components (the components of its input ``x_t``: one per (datapoint, step));
* reads ``previous_state(h, x_t)`` as a *previous-state copy* ``P`` of the state's neurons,
  tied neuron for neuron to them (a ``MERGE`` edge ``h_i -> P_i``), living at ``x_t``'s
  components: its ``act`` at step ``t`` is ``h_{t-1}`` (the initial state at the first step),
  its ``grad`` the gradient of that read. ``W_hh`` is then one edge set ``P -> gate`` whose
  per-sample gradient is ``Σ_t δ_t ⊗ h_{t-1}``, one rank-1 term per (datapoint, step);
* keeps one copy of the edges and ties that every step repeats (a step's edge groups that
  equal one already made are dropped) and checks what folding needs, else raises
  :class:`~gradgraph.convert.trace.recurrent.FoldMismatch` and the trace starts over with the
  loop unrolled: each step creates the template's sets (same count, sizes, kinds) with the same
  labels afterwards, no two edges join one pair of neurons, the steps' components are
  disjoint, and every value a step writes into the group's sets lies at that step's components.

Before a set is handed out again, what a rule reads to decide how a fresh set behaves is reset
to its state at creation (``fresh``, ``absorbed``, the version counter, the activation label),
so the rules decide at every step as at the first; what accumulates (the act and grad records,
``pinned``, the act version) is kept, so a decision at any step holds for the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import broadcast_ids, feature_row, Neurons, NeuronSet
from gradgraph.convert.trace.recurrent import FoldMismatch
from gradgraph.graph import ActivationKind, EdgeKind, NodeKind

__all__ = ["FoldRules", "FoldGroup"]


def _same_group(a: tuple, b: tuple) -> bool:
    """Whether two edge groups (or ties) are the same edges."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _same_but_sources(a: tuple, b: tuple) -> bool:
    """Whether two weight edge groups are the same weight entries into the same neurons (their
    source neurons may differ)."""
    return a[0].shape == b[0].shape and _same_group(a[1:], b[1:])


def _labels(neuron_set: NeuronSet) -> tuple:
    """What the rules decided about a set within one step (compared between steps)."""
    return (neuron_set.size, neuron_set.kind, neuron_set.created_by, neuron_set.activation, neuron_set.absorbed,
            neuron_set.bias_param, None if neuron_set.bias_pos is None else tuple(neuron_set.bias_pos.tolist()))


@dataclass
class FoldGroup:
    """The bookkeeping of one loop run folded (a (layer, direction) of a stock module, the calls
    of one cell, or of one :func:`~gradgraph.convert.trace.recurrent.recurrent_step` function).

    Attributes:
        key: the loop's name, for messages.
        template: the sets the first step created, in creation order.
        labels: :func:`_labels` of each template set at the end of the first step.
        weights: the edge groups with a parameter the first step created: every step must
            create the same (a weight used at some steps only would get the other steps' terms).
        cursor: how many template sets the current step has been handed (``None`` outside a step).
        steps: steps ended so far.
        edges, ties: the group's edge groups and ties kept so far (one copy of each).
        mark: ``(len(tracer.edges), len(tracer.ties), records per template set)`` when the step began.
        comps: the components of the current step; ``used``: those of all steps so far;
            ``previous``: those of the step before.
        last: the states the last step returned (the next step reads them).
        varying: the weight groups (by their place among a step's) whose source neurons differ
            between steps; ``step_weights``: per step, its weight groups' sources and components.
    """

    key: Any
    template: list[NeuronSet] = field(default_factory=list)
    labels: list[tuple] = field(default_factory=list)
    weights: list[tuple] = field(default_factory=list)
    cursor: int | None = None
    steps: int = 0
    edges: list[tuple] = field(default_factory=list)
    ties: list[tuple] = field(default_factory=list)
    mark: tuple = ()
    comps: Tensor | None = None
    used: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    previous: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    last: tuple = ()
    varying: set[int] = field(default_factory=set)
    step_weights: list[tuple[list[Tensor], Tensor]] = field(default_factory=list)


class FoldRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: loops run folded over time."""

    #: the group whose step is running (``None`` between steps)
    fold: FoldGroup | None = None
    #: whether this trace folds loops at all (else previous_state is an identity)
    fold_time: bool = False
    #: the loops begun and not yet ended, by key
    fold_groups: dict[Any, FoldGroup]
    #: whether a loop ran folded in this trace
    fold_seen: bool = False
    #: (source nodes, step components) of the weights that read other neurons at different steps
    fold_sources: list[tuple[Tensor, Tensor]]

    # -------------------------------------------------------------- events from the loop
    def fold_event(self, kind: str, *args: Any) -> None:
        """A step event of a folded loop (``trace/recurrent.py``): see the module docstring."""
        if not self.fold_time:
            return
        groups = self.fold_groups
        if kind == "begin_loop":
            self.fold_seen = True
        elif kind == "begin_step":
            key, states = args
            self.fold_seen = True
            if self.fold is not None:
                raise FoldMismatch("a folded step inside another")
            group = groups.get(key)
            if group is not None and not (len(group.last) == len(states)
                                          and all(a is b for a, b in zip(group.last, states))):
                self.close_fold(groups.pop(key))  # not the state the last step returned: a new loop
                group = None
            if group is None:
                group = groups[key] = FoldGroup(key)
            self.fold = group
            group.cursor = 0
            group.comps = None
            group.mark = (len(self.edges), len(self.ties),
                          [(len(s.act_records), len(s.grad_records)) for s in group.template])
        elif kind == "end_step":
            group = self.fold
            self.end_fold_step(group)
            group.last = tuple(args[0])
            self.fold = None
        elif kind == "end_group":
            group = groups.pop(args[0], None)
            if group is not None:
                self.close_fold(group)

    def close_folds(self) -> None:
        """End every loop still open (cells and step functions: the forward has returned), then
        :meth:`check_fold_sources`."""
        groups = self.fold_groups
        for key in list(groups):
            self.close_fold(groups.pop(key))
        self.check_fold_sources()

    def check_fold_sources(self) -> None:
        """Each step's source neurons of a weight that reads other neurons at different steps
        have acts at that step's components only: else the weight's edges from them would also
        collect the terms of other steps (their ``grad`` end lives at every step)."""
        for sources, comps in self.fold_sources:
            for neuron_set in self.sets_in(sources):
                for _, nodes, record_comps in neuron_set.act_records:
                    if record_comps is None:
                        continue
                    held = record_comps[torch.isin(nodes, sources)]
                    if held.numel() and not bool(torch.isin(held, comps).all()):
                        raise FoldMismatch(f"'{neuron_set.origin}' feeds one step of a loop and has values "
                                           "at other steps")

    def fold_set(self, size: int, kind: NodeKind, origin: str, created_by: str) -> NeuronSet | None:
        """The set a rule creating one inside a folded step gets: a new one in the first step
        (kept as the template), the template's next one in later steps; ``None`` outside a step."""
        fold = self.fold
        if fold is None or fold.cursor is None or created_by == "input":
            return None
        if fold.steps == 0:
            return None  # Tracer.new_set makes it, then fold_created keeps it
        if fold.cursor >= len(fold.template):
            raise FoldMismatch(f"step creates more neuron sets than the first step ({origin})")
        neuron_set = fold.template[fold.cursor]
        fold.cursor += 1
        if (neuron_set.size, neuron_set.kind, neuron_set.created_by) != (size, kind, created_by):
            raise FoldMismatch(f"step creates another set than the first step ({origin})")
        # what a rule reads of a fresh set, as it was when the set was made
        neuron_set.fresh, neuron_set.absorbed = True, False
        neuron_set.version_counter, neuron_set.last_version = 0, 0
        neuron_set.activation = ActivationKind.IDENTITY
        if neuron_set.last is not None:
            neuron_set.folded_lasts.append(neuron_set.last)
            neuron_set.last = None
        return neuron_set

    def fold_created(self, neuron_set: NeuronSet) -> None:
        """Keep a set the first step of a folded loop created as part of the template."""
        fold = self.fold
        if fold is not None and fold.cursor is not None and fold.steps == 0 and neuron_set.created_by != "input":
            fold.template.append(neuron_set)
            fold.cursor += 1

    def end_fold_step(self, fold: FoldGroup) -> None:
        edges_at, ties_at, records_at = fold.mark
        new_edges, new_ties = self.edges[edges_at:], self.ties[ties_at:]
        del self.edges[edges_at:], self.ties[ties_at:]
        weights = [group for group in new_edges if group[3] >= 0]
        if fold.steps == 0:
            fold.labels = [_labels(s) for s in fold.template]
            fold.weights = weights
        else:
            if fold.cursor != len(fold.template):
                raise FoldMismatch("a step creates fewer neuron sets than the first step")
            if [_labels(s) for s in fold.template] != fold.labels:
                raise FoldMismatch("a step labels its neuron sets otherwise than the first step")
            if len(weights) != len(fold.weights) or not all(map(_same_but_sources, weights, fold.weights)):
                raise FoldMismatch("a step uses other weights than the first step")
            for slot, (group, first) in enumerate(zip(weights, fold.weights)):
                if not torch.equal(group[0], first[0]):
                    fold.varying.add(slot)
        fold.step_weights.append(([group[0] for group in weights], fold.comps))
        # one copy of what every step repeats; relations without a parameter (the state's copy
        # into the previous-state set, which the first step reads from the initial state) may differ
        for group in new_edges:
            if not any(_same_group(group, kept) for kept in fold.edges):
                fold.edges.append(group)
                self.edges.append(group)
        for tie in new_ties:
            if not any(_same_group(tie, kept) for kept in fold.ties):
                fold.ties.append(tie)
                self.ties.append(tie)
        # every value the step wrote into the group's sets lies at the step's components (an act
        # may also be the previous step's state, read by this step's previous-state copy)
        if fold.comps is None:
            raise FoldMismatch("a step without a previous-state read")
        act_comps = torch.cat((fold.comps, fold.previous))
        for neuron_set, (acts, grads) in zip(fold.template, records_at + [(0, 0)] * len(fold.template)):
            for records, allowed in ((neuron_set.act_records[acts:], act_comps),
                                     (neuron_set.grad_records[grads:], fold.comps)):
                for _, nodes, comps in records:
                    if comps is None:
                        continue
                    inside = comps[neuron_set.holds(nodes)]
                    if inside.numel() and not bool(torch.isin(inside, allowed).all()):
                        raise FoldMismatch(f"a step writes '{neuron_set.origin}' at another step's components")
        fold.steps += 1
        fold.cursor = None
        fold.previous = fold.comps

    def close_fold(self, fold: FoldGroup) -> None:
        """The end of a loop: no two of its edges join one pair of neurons, and the last step's
        states, which no later step reads, get their acts (where their sets' act is that version).
        A weight that reads other neurons at different steps (a projection applied per step
        outside the loop, ``cell(embed(x[:, t]), h)``) is kept per step; each step's source
        neurons must then have values at that step's components only, which
        :meth:`check_fold_sources` checks once the forward is done (later ops may read them)."""
        for slot in fold.varying:
            for sources, comps in fold.step_weights:
                self.fold_sources.append((sources[slot], comps))
        if fold.edges:
            codes = torch.cat([group[0] * self.num_nodes + group[1] for group in fold.edges])
            if torch.unique(codes).numel() != codes.numel():
                raise FoldMismatch("two edges between one pair of neurons")
        for value in fold.last:
            meta = self.meta(value)
            if isinstance(meta, Neurons) and meta.comps is not None and all(
                    self.sets[index].act_version == version for index, version in meta.versions.items()):
                self.record_act(value, meta)

    # -------------------------------------------------------------- the previous-state copy
    def previous_copy(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``previous_state(h, x_t)``: the previous-state copy (module docstring)."""
        state, like = args
        fold = self.fold
        if not self.fold_time:  # unrolled: the value itself (a constant stays a constant)
            meta = self.need_neurons(state, name)
            if meta is not None:
                new = Neurons(meta.nodes, meta.comps, dict(meta.versions), meta.unbound_index)
                self.set_meta(output, new)
                self.observe(output, new)
            return
        if fold is None or fold.cursor is None:
            raise FoldMismatch("a previous-state read outside a folded step")
        like_meta = self.need_neurons(like, name)
        if like_meta is None or like_meta.comps is None or like.dim() != output.dim():
            raise FoldMismatch("the step's input does not depend on the model input")
        comps = broadcast_ids(like_meta.comps.narrow(-1, 0, 1), output.shape).clone()
        step_comps = torch.unique(comps)
        if fold.comps is None:  # the step's components: no other step's
            if bool(torch.isin(step_comps, fold.used).any()):
                raise FoldMismatch("two steps read inputs at the same components")
            fold.comps = step_comps
            fold.used = torch.cat((fold.used, step_comps))
        elif not torch.equal(fold.comps, step_comps):
            raise FoldMismatch("the states of one step are read at different components")
        width = output.shape[-1]
        meta = self.need_neurons(state, name)
        origin = f"{self.path() or name} previous state"
        if meta is None:  # a constant initial state (zeros, or a buffer): its values are the act
            if bool(state.requires_grad):
                raise FoldMismatch("an initial state that is no neuron value")
            copy = self.new_set(width, NodeKind.RESIDUAL, origin, "previous")
            if self.constant_varies(state, tuple(output.shape), (output.dim() - 1,)):
                copy.pinned = True  # a constant that tells the units apart fixes them
        else:
            if meta.comps is None:
                raise FoldMismatch("a state that does not depend on the model input")
            row = feature_row(meta.nodes)
            comp_rows = meta.comps.reshape(-1, meta.comps.shape[-1])
            if row is None or not bool((comp_rows == comp_rows[:, :1]).all()) or \
                    torch.unique(row).numel() != row.numel():
                raise FoldMismatch("a state that is not one neuron per feature")
            # the state's own act where its sets take this version as their act; else (an LSTM cell's
            # given (h, sigmoid(h)): two versions of one set) the copy's act is enough, and no new
            # set is made here, which the first step only would make
            if all(self.sets[index].act_version in (None, version) for index, version in meta.versions.items()):
                meta = self.fix_act(state, meta, name)
            for index in meta.versions:
                self.separate_part_read(self.sets[index], row)
            copy = self.new_set(width, NodeKind.RESIDUAL, origin, "previous")
            copied = copy.first + torch.arange(width)
            self.edges.append((row.clone(), copied, EdgeKind.MERGE, -1, None, None))
            self.ties.append((row.clone(), copied))
        nodes = broadcast_ids(copy.first + torch.arange(width), output.shape).clone()
        new = Neurons(nodes, comps, {copy.index: 0})
        copy.act_version, copy.fresh = 0, False
        copy.act_records.append((output, nodes, comps))
        copy.grad_records.append((output, nodes, comps))
        self.set_meta(output, new)
        self.observe(output, new)
