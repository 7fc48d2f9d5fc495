"""Trace rules for reductions and softmax: a sum, mean, max or norm over features (a statistic) or over
positions (a pooling: a new set at a new component), and a softmax over features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import (
    broadcast_ids, channel_row, KEY_STRIDE, Neurons, rows_along_last, varies_along,
)
from gradgraph.convert.trace.ops import POOLS
from gradgraph.convert.trace.rules_graph import rank_among_rows

#: per-neuron maxima / minima over positions (a text CNN's max over time): pooling, as sum and mean
_ORDER_POOLS = {"Tensor.max", "Tensor.min", "Tensor.amax", "Tensor.amin", "torch.amax", "torch.amin", "torch.max",
                "torch.min"}
#: a vector norm over positions (ConvNeXt V2's global response norm, ``linalg.vector_norm`` read as
#: ``Tensor.norm``): per channel and, like a mean or a max, positively homogeneous
_NORM_POOLS = {"Tensor.norm", "torch.norm"}
#: reductions a norm computes its statistic with; over part of the features (each head's
#: features), one statistic per part (:meth:`ReductionRules.separate_parts`)
_PART_STATISTICS = {"Tensor.mean", "torch.mean", "Tensor.var", "torch.var", "Tensor.std", "torch.std",
                    "Tensor.norm", "torch.norm"}

#: reductions whose third positional argument is ``unbiased``, their fourth ``keepdim`` (``var(input, dim, unbiased,
#: keepdim)``; ``keepdim`` is otherwise keyword-only)
_UNBIASED_THIRD = {"Tensor.var", "torch.var", "Tensor.std", "torch.std"}

#: reductions that, over an axis of stacked values, are elementwise in them (sum, mean, maximum, minimum)
_STACKED_REDUCTIONS = {f"{prefix}.{op}" for prefix in ("Tensor", "torch")
                       for op in ("sum", "mean", "max", "min", "amax", "amin")}


class ReductionRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: reductions and softmax."""

    def _dims(self, args: tuple, kwargs: dict, ndim: int) -> list[int]:
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
        if dim is None:
            return list(range(ndim))
        dims = [dim] if isinstance(dim, int) else list(dim)
        return sorted(d % ndim for d in dims)

    def reduction(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        meta = self.need_neurons(x, name)
        if meta is None or meta.comps is None:
            return self.mark_opaque(output, name, "a reduction of values that do not depend on the input",
                                    [meta] if meta else [])
        indices = None
        if isinstance(output, tuple):  # max / min with dim return (values, indices)
            if name not in _ORDER_POOLS or len(output) != 2:
                return self.mark_opaque(output, name, "max/min with indices", [meta])
            output, indices = output  # the values may pool over positions (max over time); indices are opaque
            self.mark_opaque(indices, name, "the indices of a max/min", [])
        dims = self._dims(args, kwargs, x.dim())
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        if name.endswith("norm") and len(args) > 2:
            keepdim = bool(kwargs.get("keepdim", False))
        if name in _UNBIASED_THIRD:
            # var(input, dim, unbiased, keepdim): the third is unbiased (read as keepdim before, the statistic's ids
            # got an axis too many or too few and the trace failed as if the model had; branch mut45, issue 31)
            keepdim = bool(kwargs.get("keepdim", args[3] if len(args) > 3 else False))
        neuron_axes = [axis for axis in range(x.dim()) if varies_along(meta.nodes, axis)]
        comp_axes = [axis for axis in range(x.dim()) if varies_along(meta.comps, axis)]
        datapoint = meta.comps // KEY_STRIDE
        datapoint_axes = [axis for axis in range(x.dim()) if varies_along(datapoint, axis)]
        reduced_neurons = [axis for axis in dims if axis in neuron_axes]
        reduced_comps = [axis for axis in dims if axis in comp_axes]

        def collapse(ids: Tensor) -> Tensor:
            for axis in reversed(dims):
                ids = ids.narrow(axis, 0, 1)
                if not keepdim:
                    ids = ids.squeeze(axis)
            return ids.clone()

        if any(axis in datapoint_axes for axis in dims):
            return self.mark_opaque(output, name, "a reduction over datapoints", [meta])
        if not reduced_neurons and not reduced_comps:  # over axes of size 1 (one position left): same values
            new = Neurons(collapse(meta.nodes), collapse(meta.comps), self.next_version(meta.versions))
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        if reduced_neurons and not reduced_comps:
            if set(reduced_neurons) != set(neuron_axes):
                if len(dims) == 1 and name in _STACKED_REDUCTIONS \
                        and self.merge_stacked(name, x, meta, dims[0], output, keepdim):
                    return None  # JumpingKnowledge's torch.stack(xs, -1).max(-1): elementwise over the xs
                if indices is not None or name not in _PART_STATISTICS:
                    return self.mark_opaque(output, name, "a reduction over part of the features", [meta])
                # a statistic of each part (Qwen3's RMSNorm of each head's query): it is combined with
                # the part's own neurons again, so each part must keep its neurons under the group
                self.separate_parts(meta, [axis for axis in neuron_axes if axis not in reduced_neurons],
                                    reduced_neurons)
            else:
                self.separate_mixed_part(meta)
            stat = Neurons(torch.full(tuple(output.shape), -1, dtype=torch.long), collapse(meta.comps), {})
            self.set_meta(output, stat)
            return None
        if reduced_comps and not reduced_neurons:
            if name not in POOLS and name not in _ORDER_POOLS and name not in _NORM_POOLS:
                return self.mark_opaque(output, name, "a reduction over positions other than sum/mean/max/min/norm",
                                        [meta])
            if output.dim() >= 3 and all(axis >= 2 for axis in dims) \
                    and channel_row(meta.nodes, x.shape) is not None:
                # a map [b, C, *S] pooled over some of its positions, or with keepdim (an SE block's
                # x.mean((2, 3), keepdim=True)): per channel, the positions left stay components
                self.spatial_pool(name, (x,), {}, output)
                return None
            if bool((meta.nodes < 0).any()):  # its pooled set would have edges from no neuron (node -1)
                return self.mark_opaque(output, name, "pooling a statistic (a sum or norm over the features) over "
                                        "positions", [meta])
            pooled_nodes, pooled_datapoints = collapse(meta.nodes), collapse(datapoint)
            # one neuron whose last axis left holds positions or datapoints, not features ([b, T] pooled to
            # [b]): read along a trailing axis of one feature, or the datapoints would pass for its features
            one_neuron = pooled_nodes.dim() > 0 and not varies_along(pooled_nodes, pooled_nodes.dim() - 1) \
                and varies_along(collapse(meta.comps), pooled_nodes.dim() - 1)
            if one_neuron:
                pooled_nodes, pooled_datapoints = pooled_nodes[..., None], pooled_datapoints[..., None]
            rows = rows_along_last(pooled_nodes)
            if output.dim() == 0 or not bool((rows == rows[:1]).all()):
                return self.mark_opaque(output, name, "pooling that does not keep one neuron per feature", [meta])
            self.observe(x, meta)
            # one pooled set per set the row holds (a pooled cat of group outputs: rules_conv.tied_copy)
            pooled_ids, created = self.tied_copy(rows[0].clone(), f"{self.path()} {name}", "pool")
            # several pooled rows of one datapoint (tokens pooled in pairs, a video's frames each pooled over
            # its positions): a key per row of the datapoint, so no neuron holds two values at one component
            rank = rank_among_rows(rows_along_last(pooled_datapoints)[:, 0])
            keys = torch.tensor(self.new_key(int(rank.max()) + 1 if rank.numel() else 1))
            comps = pooled_datapoints * KEY_STRIDE + keys[rank].reshape(*pooled_datapoints.shape[:-1], 1)
            comps = comps[..., 0] if one_neuron else comps
            nodes = broadcast_ids(pooled_ids, output.shape).clone()
            new = Neurons(nodes, broadcast_ids(comps, output.shape).clone(), {pooled.index: 0 for pooled in created})
            created[0].grad_records.append((output, nodes, new.comps))
            self.set_meta(output, new)
            self.observe(output, new)
            return None
        return self.mark_opaque(output, name, "a reduction over features and positions together", [meta])

    def separate_parts(self, meta: Neurons, kept: list[int], reduced: list[int]) -> None:
        """A statistic over the ``reduced`` neuron axes of a value, one per index of its ``kept``
        neuron axes: each part (the neurons at one index of ``kept``) is separated from the rest of
        its set (:meth:`separate_part_read`), so no permutation moves a neuron into another part."""
        nodes = meta.nodes
        for axis in range(nodes.dim()):
            if axis not in kept and axis not in reduced:
                nodes = nodes.narrow(axis, 0, 1)
        order = [axis for axis in range(nodes.dim()) if axis not in kept and axis not in reduced] + kept + reduced
        parts = nodes.permute(*order).reshape(-1, math.prod(nodes.shape[axis] for axis in reduced))
        for part in torch.unique(parts, dim=0):
            part = part[part >= 0]
            for index in meta.versions:
                self.separate_part_read(self.sets[index], part)

    def softmax(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        meta = self.need_neurons(args[0], name)
        if meta is None:
            return None
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        if dim is None:  # F.softmax(h), nn.Softmax(): PyTorch's implicit (deprecated) choice, as it computes
            dim = 0 if args[0].dim() in (0, 1, 3) else 1
        axis = dim % args[0].dim()
        if varies_along(meta.nodes, axis) and meta.comps is not None and not varies_along(meta.comps, axis):
            neuron_axes = [a for a in range(args[0].dim()) if varies_along(meta.nodes, a)]
            if neuron_axes == [axis]:
                self.separate_mixed_part(meta)
                return self.unary(args[0], output, name, None)  # softmax over all features of a set
        return self.mark_opaque(output, name, "a softmax across positions or part of the features", [meta])
