"""Trace rules for message passing over a data graph: gathers and scatters along a position axis.

A graph neural network (PyG's ``GCNConv``, ``GINConv``, ``SAGEConv``, or a hand-written layer) moves
features between the *nodes of the input graph* with two ops whose index is data, not parameters::

    x_j = x.index_select(-2, src)                         # gather: [b, N, C] -> [b, E, C]
    out = zeros.scatter_add_(-2, dst.expand_as(m), m)     # scatter: [b, E, C] -> [b, N, C]
    out = zeros.index_add_(-2, dst, m)                    #   (or scatter_reduce: sum, mean, max, min, prod)

The data graph's nodes are positions, as a sequence's tokens are: channels are the neurons and
one rank-1 component lives at each (datapoint, data-graph node) — and at each (datapoint,
data-graph edge) for the messages. Both ops are linear in their input with coefficients that do
not depend on any value (a message may be scaled by a constant edge weight before the scatter,
GCN's normalisation), so like a convolution's taps (``rules_conv.py``) they make a *tied copy* of
the channels: C new neurons, each tied to the channel it copies by a MERGE edge, living at the
output's positions (the edges for a gather, the nodes for a scatter). No weight sits on these
edges; the weights of the layers' ``Linear``s are ordinary edges between neurons that live at
the same positions, so ``per_sample_grads()`` / ``mean_grad()`` stay the ``act * grad`` sums over a
datapoint's components and are exact. Permuting channels moves every copy with them.

What is refused, by name: a gather or scatter along the datapoint axis or the feature axis, an
index computed from neuron values or differing between channels, a scatter into a base that is
not all zeros. Max / min / product aggregation (``scatter_reduce`` with ``amax``, ``amin``, ``prod``:
``SAGEConv(aggr="max")``) is not linear in the messages, but like a max pooling over a map's positions it is
per channel: the aggregated copy's act is read from the tensor and the messages' grad from autograd (zero
where a max did not pick the message), so every weight's ``act * grad`` sum stays exact and a channel
permutation commutes with it. Attention over
neighbours (``GATConv``) multiplies messages by coefficients computed from parameters and is
refused where those coefficients meet the messages. ``docs/gnn.md`` says what converts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import broadcast_ids, feature_row, KEY_STRIDE, Neurons, Param, varies_along

__all__ = ["GraphRules", "GATHERS", "SCATTERS", "SCATTERS_IN_PLACE", "rank_among_rows", "rank_within"]

#: ``index_select(x, dim, index)``: rows of a position axis, read at data indices
GATHERS = {"Tensor.index_select", "torch.index_select"}
#: scatters along a position axis: ``(self, dim, index, src)``
SCATTERS_IN_PLACE = {"Tensor.scatter_add_", "Tensor.index_add_", "Tensor.scatter_reduce_"}
SCATTERS = SCATTERS_IN_PLACE | {"Tensor.scatter_add", "torch.scatter_add", "Tensor.index_add", "torch.index_add",
                                "Tensor.scatter_reduce", "torch.scatter_reduce"}
#: ops whose result is all zeros whatever their arguments' values
_ZERO_FACTORIES = {"Tensor.new_zeros", "torch.zeros", "torch.zeros_like"}
#: ... and all ones: the identity of a product, the base PyG's ``MulAggregation`` scatters into
_ONE_FACTORIES = {"Tensor.new_ones", "torch.ones", "torch.ones_like"}
#: the reductions of ``scatter_reduce``: each per channel, so a tied copy of the channels (every one torch has)
_REDUCTIONS = {"sum", "mean", "amax", "amin", "prod"}
_ATTENTION_HINT = (
    "attention over a data graph's neighbours computed with ops gradgraph has no rule for (PyG's "
    "(x * att).sum(-1) scores, a softmax with a detached maximum) is refused; PyG's GATConv converts (run op "
    "by op), GATv2Conv and TransformerConv do not (docs/gnn.md)")


def rank_within(groups: Tensor) -> Tensor:
    """``[n]`` -> ``[n]``: each element's rank among the elements of its group, in order
    (``[0, 0, 1, 0, 1] -> [0, 1, 0, 2, 1]``)."""
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups) if groups.numel() else groups.new_zeros(0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel()) - starts[groups[order]]
    return rank


def rank_among_rows(datapoints: Tensor) -> Tensor:
    """:func:`rank_within` of the rows' datapoints where some datapoint has several rows (a video's frames
    as ``[b * T, ...]``, tokens pooled in pairs); zeros where each has one (ids a layout left at ``-1``
    included, which ``rank_within`` does not take)."""
    if torch.unique(datapoints).numel() < datapoints.numel():
        return rank_within(datapoints)
    return torch.zeros_like(datapoints)


class GraphRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: gathers and scatters over a data
    graph's nodes (see the module docstring)."""

    def graph_op(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """Dispatch a gather or a scatter (``name`` in :data:`GATHERS` / :data:`SCATTERS`)."""
        if output.numel() == 0:
            return None  # nothing gathered (a data graph without edges): an empty constant
        if name in GATHERS:
            bound = dict(zip(("input", "dim", "index"), args))
            bound.update(kwargs)
            return self.gather_positions(name, bound["input"], int(bound["dim"]), bound["index"], output)
        names = ("input", "dim", "index", "src", "reduce") if "scatter_reduce" in name else (
            ("input", "dim", "index", "source") if "index_add" in name else ("input", "dim", "index", "src"))
        bound = dict(zip(names, args))
        bound.update(kwargs)
        src = bound.get("src", bound.get("source"))
        reduce = bound.get("reduce", "sum")
        if reduce not in _REDUCTIONS:
            raise self.unsupported(name, f"reduce='{reduce}', which gradgraph has no rule for (it reads "
                                   f"{', '.join(sorted(_REDUCTIONS))})")
        if isinstance(bound.get("alpha", 1), Tensor):
            raise self.unsupported(name, "an alpha that is a tensor; gradgraph reads a constant number")
        return self.scatter_positions(name, bound["input"], int(bound["dim"]), bound["index"], src, output,
                                      one_dimensional="index_add" in name, reduce=reduce)

    def gather_axis(self, args: tuple) -> int:
        """The axis ``x[..., index]`` indexes (see :meth:`gathers_positions`)."""
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        return len(key) - 1

    def gather_index(self, args: tuple) -> Tensor:
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        return key[-1]

    def gathers_positions(self, args: tuple) -> bool:
        """Whether ``x[key]`` is a gather of positions with repeats (``x[src]``, ``x[:, src]``: full
        slices, then one 1-D integer tensor that names a position twice) of values that hold one neuron
        row on their last axis. Indexing without repeats (a permutation, a slice) stays a shape op: it
        moves each neuron's values to another place and copies none. Repeats would hold one neuron twice
        at one position, which the graph cannot: the gather's tied copy lives at the gathered positions."""
        if len(args) < 2:
            return False
        x, key = args[0], args[1] if isinstance(args[1], tuple) else (args[1],)
        index = key[-1] if key else None
        if not isinstance(x, Tensor) or not isinstance(index, Tensor) or index.dim() != 1 \
                or index.dtype not in (torch.int64, torch.int32) or len(key) >= x.dim():
            return False
        if any(not (isinstance(part, slice) and part == slice(None)) for part in key[:-1]):
            return False
        meta = self.meta(x)
        if not isinstance(meta, Neurons) or meta.comps is None or feature_row(broadcast_ids(meta.nodes, x.shape)) is None:
            return False
        return torch.unique(index).numel() != index.numel()

    # -------------------------------------------------------------- checks
    def _graph_operand(self, name: str, value: Tensor, what: str) -> Neurons:
        meta = self.meta(value)
        if isinstance(meta, Param):
            raise self.unsupported(name, f"the parameter '{self.param_names[meta.index]}' as its {what}; gradgraph "
                                   "gathers and scatters neuron values along a data graph's nodes")
        neurons = self.need_neurons(value, name)
        if neurons is None or neurons.comps is None:
            raise self.unsupported(name, f"its {what} does not depend on the input")
        return neurons

    def _constant_index(self, name: str, index: Any) -> None:
        if not isinstance(index, Tensor):
            raise self.unsupported(name, "an index that is no tensor")
        meta = self.meta(index)
        if meta is not None and not self.is_data(index, meta):
            raise self.unsupported(name, "an index computed from neuron values or parameters (a top-k, an argmax, a "
                                   f"learned edge choice); {_ATTENTION_HINT}")

    def _position_axis(self, name: str, shape: torch.Size, comps: Tensor, axis: int, what: str) -> tuple[int, ...]:
        """Check that ``axis`` holds positions of each datapoint, the axes after it features (neurons)
        at one component per position; returns the datapoint axes (among those before ``axis``)."""
        if axis == len(shape) - 1:
            raise self.unsupported(name, f"{what} along the feature axis (the neurons); gradgraph reads message "
                                   "passing as gathers and scatters along the data graph's node axis, features last")
        self._check_trailing(name, comps, axis)
        datapoint = comps // KEY_STRIDE
        datapoint_axes = tuple(a for a in range(axis + 1) if varies_along(datapoint, a))
        if axis in datapoint_axes:
            remedy = ("gradgraph reads a joined batch's values with its rows on axis 0 and features after them"
                      if self.row_datapoints is not None else
                      "A data graph's nodes are positions of one datapoint: pass a PyG batch with "
                      "to_graph(..., datapoints=batch.batch), a batch of graph signals as [b, num_nodes, features] "
                      "with one edge_index for all, or one graph with datapoints=torch.zeros(num_nodes)")
            raise self.unsupported(name, f"{what} along the datapoint axis {axis} of a tensor of shape {list(shape)}: "
                                   f"it mixes datapoints. {remedy}")
        return datapoint_axes

    def _check_trailing(self, name: str, comps: Tensor, axis: int) -> None:
        if any(varies_along(comps, a) for a in range(axis + 1, comps.dim())):
            raise self.unsupported(name, f"values whose features (the axes after axis {axis}) sit at different "
                                   "positions; gradgraph gathers and scatters positions whose features are neurons")

    def _joined_rows(self, name: str, shape: torch.Size, comps: Tensor, axis: int) -> bool:
        """Whether a gather or scatter along ``axis`` reads rows of several datapoints joined on axis 0
        (``to_graph(..., datapoints=batch)``): ``[rows, *features]`` values, indexed along the rows
        (also where the rows it reads happen to hold one datapoint only)."""
        if self.row_datapoints is None or axis != 0 or len(shape) < 2:
            return False
        self._check_trailing(name, comps, axis)
        return True

    def _row_comps(self, datapoints: Tensor, shape: torch.Size) -> Tensor:
        """Components of rows ``[n, *features]`` whose datapoints are ``datapoints [n]``: a row's position
        is its rank among its datapoint's rows (a data-graph node's rank in its graph, as the input's)."""
        keys = rank_within(datapoints)
        count = int(keys.max()) + 1 if keys.numel() else 1
        while len(self.keys) < count:
            self.new_key()
        ids = (datapoints * KEY_STRIDE + keys).reshape(-1, *[1] * (len(shape) - 1))
        return broadcast_ids(ids, shape).clone()

    def _scatter_rows(self, name: str, sources: Tensor, index: Tensor, rows: int) -> Tensor:
        """The datapoint of each of a joined scatter's ``rows`` result rows, from the datapoints of its
        messages ``sources [E]`` landing at rows ``index [E]``. A result with one row per row of the input
        (a data-graph node) has the input rows' datapoints (rows no message reaches too); any other (a
        pooling by the batch vector, one row per graph) takes its messages'. A row reached by two
        datapoints' messages (an edge between two graphs) mixes datapoints and is refused."""
        if rows == len(self.row_datapoints):
            datapoints = self.row_datapoints.clone()
        else:
            datapoints = torch.full((rows,), -1, dtype=torch.long)
            datapoints[index] = sources
            if bool((datapoints < 0).any()):
                raise self.unsupported(name, f"row {int((datapoints < 0).nonzero()[0])} of the result receives no "
                                       f"message, and its {rows} rows are not the input's {len(self.row_datapoints)} "
                                       "rows (its nodes), so gradgraph cannot tell which datapoint it belongs to")
        if bool((datapoints[index] != sources).any()):
            edge = int((datapoints[index] != sources).nonzero()[0])
            raise self.unsupported(name, f"message {edge} goes from datapoint {int(sources[edge])} to a row of datapoint "
                                   f"{int(datapoints[index[edge]])}: an edge between two graphs of the batch mixes "
                                   "datapoints (check edge_index against the batch vector)")
        return datapoints

    def _position_comps(self, datapoint: Tensor, shape: torch.Size, datapoint_axes: tuple[int, ...],
                        axis: int) -> Tensor:
        """Components of an output of ``shape`` whose positions are the axes up to ``axis`` (the
        features after it): the datapoint of each element times ``KEY_STRIDE`` plus the flat index of
        its position over those axes that are not datapoint axes. Position ``p`` shares key ``p`` with
        every other grid (the data graph's node ``p``, edge ``p``): each weight joins neurons of one grid."""
        axes = [a for a in range(axis + 1) if a not in datapoint_axes]
        sizes = [shape[a] for a in axes]
        count = math.prod(sizes) if sizes else 1
        while len(self.keys) < count:
            self.new_key()
        grid = torch.arange(count).reshape(sizes) if sizes else torch.zeros((), dtype=torch.long)
        view = [1] * len(shape)
        for a, size in zip(axes, sizes):
            view[a] = size
        return broadcast_ids(datapoint * KEY_STRIDE + grid.reshape(view), shape).clone()

    def _copy_to(self, name: str, value: Tensor, meta: Neurons, output: Tensor, comps: Tensor, what: str,
                 axis: int) -> None:
        """The tied copy of ``value``'s features (the neurons on the axes after ``axis``, the same at every
        position) at ``output``'s components ``comps`` (the module docstring)."""
        meta = self.fix_act(value, meta, name)  # the channels' own act: their values at their positions
        features = tuple(value.shape[axis + 1:])
        block = broadcast_ids(meta.nodes, value.shape).reshape(-1, math.prod(features))
        row = block[0].clone()
        if not bool((block == row).all()) or bool((row < 0).any()) or torch.unique(row).numel() != row.numel():
            raise self.unsupported(name, f"its {what} does not hold the same neurons at every position, one per "
                                   f"feature (a statistic, or one neuron twice). If it is an attention score: "
                                   f"{_ATTENTION_HINT}")
        for index in meta.versions:
            self.separate_part_read(self.sets[index], row)
        copied, created = self.tied_copy(row, f"{self.path() or name} {what}", "graph")
        nodes = broadcast_ids(copied.reshape(features), output.shape).clone()
        new = Neurons(nodes, comps, {copy.index: 0 for copy in created})
        created[0].grad_records.append((output, nodes, comps))  # one record writes every copy's grad
        self.set_meta(output, new)
        self.observe(output, new)

    # -------------------------------------------------------------- the rules
    def gather_positions(self, name: str, x: Tensor, dim: int, index: Tensor, output: Tensor) -> None:
        """``x.index_select(dim, index)`` along a position axis: a tied copy of the features living at
        the gathered positions (a message ``x_j`` per data-graph edge)."""
        self._constant_index(name, index)
        meta = self._graph_operand(name, x, "input")
        axis = dim % x.dim()
        comps = broadcast_ids(meta.comps, x.shape)
        if self._joined_rows(name, x.shape, comps, axis):  # graphs joined into one x [n, F], PyG's batch vector
            rows = comps.reshape(x.shape[0], -1)[:, 0] // KEY_STRIDE
            self.add_guard(self.op_index, index, values=index.detach().cpu().clone())
            out_comps = self._row_comps(rows[index.detach().cpu().long()], output.shape)
            return self._copy_to(name, x, meta, output, out_comps, "gather", axis)
        datapoint_axes = self._position_axis(name, x.shape, comps, axis, "a gather")
        datapoint = (comps // KEY_STRIDE).narrow(axis, 0, 1)
        out_comps = self._position_comps(broadcast_ids(datapoint, output.shape), output.shape, datapoint_axes, axis)
        self._copy_to(name, x, meta, output, out_comps, "gather", axis)

    def scatter_positions(self, name: str, base: Tensor, dim: int, index: Tensor, src: Tensor, output: Tensor, *,
                          one_dimensional: bool, reduce: str = "sum") -> None:
        """``base.scatter_add_(dim, index, src)`` (and ``index_add_``, ``scatter_reduce`` with any of its
        reductions) along a position axis, into a constant all-zero ``base`` (all ones for a product): a tied
        copy of ``src``'s features living at the output's positions (the aggregated messages at each data-graph
        node)."""
        self._constant_index(name, index)
        if self.meta(base) is not None:
            raise self.unsupported(name, "a scatter into values that depend on the input or on parameters; gradgraph "
                                   "reads a scatter into zeros (src.new_zeros(...).scatter_add_(...)), then a sum")
        if not isinstance(src, Tensor) or src.dim() != base.dim():
            raise self.unsupported(name, "a source of another rank than the result")
        if src.numel() == 0:
            return None  # no message: the result is the zeros it was made as, a constant
        meta = self._graph_operand(name, src, "source")
        axis = dim % src.dim()
        comps = broadcast_ids(meta.comps, src.shape)
        joined = self._joined_rows(name, src.shape, comps, axis)
        datapoint_axes = () if joined else self._position_axis(name, src.shape, comps, axis, "a scatter")
        # the base is made by a zeros factory: a replay's fingerprints name the same producer op, so the
        # base is zeros there too (read before the in-place scatter wrote into it: tracer.scatter_base)
        producer = self.scatter_base if name in SCATTERS_IN_PLACE else self.log.source(base)
        made_by = self.log.fingerprints[producer[0]][0] if isinstance(producer, tuple) and isinstance(
            producer[0], int) and producer[0] >= 0 else None
        if made_by not in _ZERO_FACTORIES and not (reduce == "prod" and made_by in _ONE_FACTORIES):
            raise self.unsupported(name, f"a scatter into a tensor made by {made_by or 'the caller'}; gradgraph reads "
                                   "a scatter into zeros made inside forward (src.new_zeros(size), torch.zeros, "
                                   "zeros_like; ones for reduce='prod'), then adds what else is needed")
        if not one_dimensional:
            if tuple(index.shape) != tuple(src.shape):
                raise self.unsupported(name, f"an index of shape {list(index.shape)} for a source of shape "
                                       f"{list(src.shape)}; gradgraph reads an index broadcast from one index per "
                                       "position (index.view(...).expand_as(src))")
            others = tuple(a for a in range(src.dim()) if a != axis)
            if self.constant_varies(index, tuple(index.shape), others):
                raise self.unsupported(name, "an index that differs between features or datapoints; gradgraph "
                                       "scatters whole positions (one index per position along the node axis)")
        if joined:
            rows = index if one_dimensional else index.reshape(src.shape[0], -1)[:, 0]
            self.add_guard(self.op_index, index, values=index.detach().cpu().clone())
            sources = comps.reshape(src.shape[0], -1)[:, 0] // KEY_STRIDE
            datapoints = self._scatter_rows(name, sources, rows.detach().cpu().long(), output.shape[0])
            return self._copy_to(name, src, meta, output, self._row_comps(datapoints, output.shape), "scatter", axis)
        datapoint = (comps // KEY_STRIDE).narrow(axis, 0, 1)
        out_comps = self._position_comps(broadcast_ids(datapoint, output.shape), output.shape, datapoint_axes, axis)
        self._copy_to(name, src, meta, output, out_comps, "scatter", axis)
