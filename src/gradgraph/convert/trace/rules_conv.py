"""Trace rules for convolutions, spatial pooling and a flatten into a linear head.

A convolution is an affine map of its input's *taps*: with ``U[b, p, (i, t)] = x_pad[b, i, p·s + t·d]``
(channel ``i``, kernel tap ``t``, output position ``p``), ``conv(x)[b, o, p] = Σ_{i,t} W[o, i, t] U[b, p, (i, t)]``
and ``dL/dW[o, i, t] = Σ_p g[o, p] U[i, t, p]``: one rank-1 term per (datapoint, output position).
So the trace runs every batched ``F.conv1d/2d/3d`` as its parts (a decomposition, the same under
a replay): :func:`gather_taps` (one op: pad, unfold, lay taps out per position) then one
``F.linear`` per group. The rule of :func:`gather_taps` gives the taps neurons of their own: one
*tap set* of ``C`` neurons per kernel tap, each tied neuron for neuron to the ``C`` channels it
copies (a MERGE edge ``channel i -> tap t of channel i``), living at the output positions. The
affine rule then makes the weight edges ``tap t of channel i -> output channel o`` as for any
linear map, so ``per_sample_grads()`` / ``mean_grad()`` are the usual ``act[src] * grad[dst]`` sums
and are exact. Channels are the neurons; permuting channels moves every tap set with them.
``docs/convolutions.md`` says why this layout and what it costs.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_unary

from gradgraph.convert.trace.meta import (
    broadcast_ids, channel_row, KEY_STRIDE, Neurons, Param, Raw, rows_along_last, varies_along,
)
from gradgraph.convert.trace.ops import LOST_TRACK
from gradgraph.convert.trace.rules_graph import rank_among_rows, rank_within
from gradgraph.graph import EdgeKind, NodeKind

__all__ = ["ConvRules", "InputReadAgain", "gather_taps", "convolution_parts", "padding_parts", "PIXEL_SHUFFLES",
           "SPATIAL_POOLS"]

#: the batched convolutions the trace runs as :func:`gather_taps` + ``F.linear``
CONVOLUTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

#: per-channel ops over positions (max, average, adaptive, power-average pooling; resampling by
#: ``F.interpolate``, which ``nn.Upsample`` calls): each output channel reads only its own channel of
#: one datapoint, so its values are a copy of the channels at a new grid (autograd gives their grads)
SPATIAL_POOLS = {
    F.interpolate,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices, F.max_pool2d_with_indices,
    F.max_pool3d_with_indices, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d_with_indices, F.adaptive_max_pool3d_with_indices, F.lp_pool1d, F.lp_pool2d,
}
if hasattr(F, "lp_pool3d"):
    SPATIAL_POOLS.add(F.lp_pool3d)

#: channels moved into positions and back (their rule: :meth:`ConvRules.pixel_shuffle`)
PIXEL_SHUFFLES = {F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle}


class InputReadAgain(Exception):
    """The model input, read by a convolution as windows (:meth:`ConvRules.read_input_taps`), is read
    again: :func:`~gradgraph.convert.trace.run.trace_model` traces afresh reading it as channels."""


def gather_taps(input: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...]) -> Tensor:
    """The taps of a convolution's windows, ``[b, C, *S] -> [b, *S_out, C * k]`` (``k = prod(kernel_size)``).

    ``out[b, p, i * k + t] = x_pad[b, i, p * stride + t * dilation]`` with zero padding
    ``padding[axis] = (before, after)``; taps ``t`` in row-major kernel order, so
    ``F.linear(out, W.reshape(O, C * k))`` is ``F.conv*d(x, W, stride=, padding=, dilation=)``
    moved to channels last. One torch function (overridable), so the trace sees it as one op.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(gather_taps, (input,), input, kernel_size, stride, padding, dilation)
    spatial = len(kernel_size)
    pad = [side for before_after in reversed(padding) for side in before_after]  # F.pad: last axis first
    x = F.pad(input, pad) if any(pad) else input
    for axis in range(spatial):
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        x = x.unfold(2 + axis, span, stride[axis])  # the window on a new last axis
        if dilation[axis] > 1:
            x = x[..., ::dilation[axis]]
    # [b, C, *S_out, *kernel] -> [b, *S_out, C, *kernel] -> [b, *S_out, C * k]
    order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
    sizes = tuple(x.shape[2:2 + spatial])
    return x.permute(order).reshape(x.shape[0], *sizes, x.shape[1] * math.prod(kernel_size))


def _per_axis(value: Any, spatial: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,) * spatial


def _padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per spatial axis; ``'same'`` puts the odd one after, as torch does."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        totals = [step * (size - 1) for size, step in zip(kernel, dilation)]
        return tuple((total // 2, total - total // 2) for total in totals)
    return tuple((side, side) for side in _per_axis(padding, len(kernel)))


def convolution_parts(func: Any, args: tuple, kwargs: dict) -> Any:
    """A function running the batched convolution ``func(*args, **kwargs)`` as :func:`gather_taps`
    and one ``F.linear`` per group, or ``None`` (an unbatched input: the trace's own rule refuses it)."""
    if func not in CONVOLUTIONS:
        return None
    bound = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args))
    bound.update(kwargs)
    x, weight = bound.get("input"), bound.get("weight")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dim() != weight.dim():
        return None
    spatial = CONVOLUTIONS[func]
    kernel = tuple(weight.shape[2:])
    stride = _per_axis(bound.get("stride", 1), spatial)
    dilation = _per_axis(bound.get("dilation", 1), spatial)
    padding = _padding(bound.get("padding", 0), kernel, dilation)
    groups = int(bound.get("groups", 1))
    bias = bound.get("bias")

    def run() -> Tensor:
        channels, out_channels = x.shape[1] // groups, weight.shape[0] // groups
        taps = math.prod(kernel)
        outputs = []
        # the taps of every channel at once (channel-major: a group's columns are consecutive)
        windows = gather_taps(x, kernel, stride, padding, dilation)
        for group in range(groups):
            part = windows if groups == 1 else windows[..., group * channels * taps:(group + 1) * channels * taps]
            rows = slice(group * out_channels, (group + 1) * out_channels)
            group_weight = weight if groups == 1 else weight[rows]
            group_bias = bias if bias is None or groups == 1 else bias[rows]
            outputs.append(F.linear(part, group_weight.reshape(out_channels, channels * taps), group_bias))
        if groups > 1:  # alike by construction: the tracer records them (Tracer.record_groups)
            run.group_outputs = outputs
        out = outputs[0] if groups == 1 else torch.cat(outputs, dim=-1)
        return out.movedim(-1, 1)

    run.groups = groups
    return run


def _source_index(size: int, before: int, after: int, mode: str) -> list[int]:
    """For each place of an axis padded by ``(before, after)``, the place of the input it copies."""
    places = range(-before, size + after)
    if mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        return [min(place % period, period - place % period) if size > 1 else 0 for place in places]
    if mode == "replicate":
        return [min(max(place, 0), size - 1) for place in places]
    return [place % size for place in places]  # circular


def pad_arguments(args: tuple, kwargs: dict) -> tuple[Any, Any, str]:
    """``F.pad``'s ``(input, pad, mode)`` however they were passed (``mode`` ``"constant"`` where not given)."""
    bound = dict(zip(("input", "pad", "mode", "value"), args))
    bound.update(kwargs)
    return bound.get("input"), bound.get("pad"), bound.get("mode", "constant")


def padding_parts(func: Any, args: tuple, kwargs: dict) -> Any:
    """``F.pad`` with mode ``reflect`` / ``replicate`` / ``circular`` (a convolution's
    ``padding_mode``) as indexing with constant indices, which the trace follows as a shape op:
    each padded place holds the neuron and component of the place it copies. ``None`` for other calls."""
    if func is not F.pad:
        return None
    x, pad, mode = pad_arguments(args, kwargs)
    if not isinstance(x, Tensor) or not isinstance(pad, list | tuple) or len(pad) % 2 or len(pad) // 2 > x.dim():
        return None
    if mode == "constant" and all(isinstance(side, int) and side <= 0 for side in pad):
        return lambda: _crop(x, pad)
    if mode not in ("reflect", "replicate", "circular"):
        return None

    def run() -> Tensor:
        result = x
        for pair in range(len(pad) // 2):  # pairs start from the last axis
            axis = x.dim() - 1 - pair
            before, after = pad[2 * pair], pad[2 * pair + 1]
            if before or after:
                index = torch.tensor(_source_index(x.shape[axis], before, after, mode), device=x.device)
                result = result[(slice(None),) * axis + (index,)]
        return result

    return run


def _crop(x: Tensor, pad: list | tuple) -> Tensor:
    """``F.pad(x, pad)`` for pads of no positive side: a slice of ``x`` (all zero: ``x`` itself; Swin
    pads every map to a multiple of its window, by nothing when it already is one), as a new tensor."""
    index = [slice(None)] * x.dim()
    for pair in range(len(pad) // 2):  # pairs start from the last axis
        axis = x.dim() - 1 - pair
        index[axis] = slice(-pad[2 * pair], x.shape[axis] + pad[2 * pair + 1])
    return x[tuple(index)].clone()


class ConvRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: taps, spatial pooling, flatten into a head."""

    # -------------------------------------------------------------- channels
    def channel_neurons(self, x: Tensor, name: str, spatial: int) -> tuple[Neurons, Tensor, Tensor]:
        """``x [b, C, *S]``'s ids, with ``C`` neurons on axis 1 and a position per spatial
        element; returns ``(meta, channel row [C], datapoint [b])``. The model input becomes an
        input set of ``C`` channel neurons."""
        if x.dim() != spatial + 2:
            raise self.unsupported(name, f"an input of shape {list(x.shape)}; gradgraph reads convolutions and "
                                   f"pooling on batched inputs [b, channels, {spatial} spatial axes]")
        meta = self.meta(x)
        if isinstance(meta, Raw) and x.is_floating_point():
            meta = self.channel_input(x, meta, name)
        else:
            meta = self.need_neurons(x, name)
        if meta is None or meta.comps is None:
            raise self.unsupported(name, LOST_TRACK)
        nodes, comps = broadcast_ids(meta.nodes, x.shape), broadcast_ids(meta.comps, x.shape)
        row = nodes.reshape(x.shape[0], x.shape[1], -1)[0, :, 0]
        datapoint = comps // KEY_STRIDE
        if not torch.equal(nodes, broadcast_ids(row.reshape(1, -1, *[1] * spatial), x.shape)) \
                or varies_along(comps, 1) or any(varies_along(datapoint, axis) for axis in range(1, x.dim())):
            raise self.unsupported(name, "its input does not hold channels on axis 1 (neurons) and positions on the "
                                   "spatial axes of each datapoint on axis 0; gradgraph reads convolutions and pooling "
                                   "over [b, channels, *spatial] with channels as neurons")
        if bool((row < 0).any()) or torch.unique(row).numel() != row.numel():
            raise self.unsupported(name, "its channels are not distinct neurons (a statistic, or one neuron twice)")
        return meta, row.clone(), datapoint.reshape(x.shape[0], -1)[:, 0].clone()

    def channel_input(self, x: Tensor, meta: Raw, name: str) -> Neurons:
        """The model input ``[b, C, *S]`` read as ``C`` input neurons at one component per position."""
        element = meta.element
        datapoint, within, _ = self.datapoint_of(element)
        shape = self.input_tensor.shape
        # an input without a channel axis, given one of size 1 ([b, T] -> [b, 1, T]; AST's spectrogram
        # [b, T, F] -> [b, 1, F, T]): one input neuron, a component per element of each datapoint
        unsqueezed = len(shape) == x.dim() - 1 and x.shape[1] == 1
        # an input whose datapoint axis is merged with the next ones ([b, T, C, H, W] -> [b * T, C, H, W], a
        # video's frames): x's axis 1 holds the channels, each (row, position) its datapoint's own component
        merged = len(shape) > x.dim() and x.shape[0] == math.prod(shape[:len(shape) - x.dim() + 1]) \
            and tuple(shape[len(shape) - x.dim() + 1:]) == tuple(x.shape[1:])
        # the whole input with its axes after the datapoints' permuted ([b, T, C, H, W] -> [b, C, T, H, W], a
        # video's 3-D convolution): x's axis 1 holds the channels, as for a merged input
        permuted = len(shape) == x.dim() and tuple(x.shape) != tuple(shape) and x.numel() == math.prod(shape) \
            and x.shape[0] == shape[0]
        if any(varies_along(datapoint, axis) for axis in range(1, x.dim())) or self.datapoint_dim != 0:
            raise self.unsupported(name, "a convolution whose input's first axis is not the datapoints")
        if len(shape) != x.dim() and not unsqueezed and not merged:
            # any other number of axes: a frame x[:, t] of [b, T, C, L] read with its axis 1 as channels puts its
            # element (c, p) on channel c at position p of its datapoint, as every other frame's (c, p): two frames
            # read so are one neuron at one component with two values, and the input neurons' act holds only one
            raise self.unsupported(name, (
                "a convolution of the model input read with other axes than its own (a frame x[:, t] of a [b, T, C, L] "
                "input, x.flatten(1, 2)): two such reads would put two input values on one input neuron at one "
                "position. The input is read as channels as [b, C, *S] (whole or sliced), with a channel axis of "
                "size 1 added, merged [b * T, C, *S], or with its axes after the datapoints permuted"))
        if unsqueezed:
            channels, channel, position = 1, torch.zeros_like(element), within
        elif merged or permuted:
            inner = math.prod(x.shape[2:])
            channels = x.shape[1]
            channel = broadcast_ids(torch.arange(channels).reshape(1, -1, *[1] * (x.dim() - 2)), x.shape)
            rank = rank_within(datapoint.reshape(x.shape[0], -1)[:, 0])  # the row's rank among its datapoint's
            place = broadcast_ids(torch.arange(inner).reshape(1, 1, *x.shape[2:]), x.shape)
            position = broadcast_ids(rank.reshape(-1, *[1] * (x.dim() - 1)), x.shape) * inner + place
        else:
            # channel and position from the input's own layout [b, C, *S], so a slice of the
            # channels (a grouped convolution's group) reads the channels it holds
            inner = math.prod(shape[2:])
            channels, channel, position = shape[1], (element // inner) % shape[1], element % inner
        self.input_neurons(channels, name, f"as {channels} channels").read_as_channels = True  # type: ignore
        comps = self.assign_comps(element, datapoint, position)
        nodes = self.input_set.first + channel
        if x.requires_grad:
            self.input_set.grad_records.append((x, nodes, comps))
        neurons = Neurons(nodes, comps, {self.input_set.index: 0})
        self.set_meta(x, neurons)
        return neurons

    def position_comps(self, datapoint: Tensor, sizes: tuple[int, ...], shape: torch.Size, axis: int,
                       like: Tensor | None = None) -> Tensor:
        """Components ``datapoint * KEY_STRIDE + p`` for the flat position ``p`` of a grid of
        ``sizes`` whose axes start at ``axis`` of ``shape``. Grids share keys (key ``p`` is position ``p``
        of every grid): each weight joins neurons of one grid, so sharing keeps every gradient exact
        and keeps the component count at ``b`` times the largest grid.

        ``like``: the input grid's components ``[rows, *grid]``. Where the grid keeps its sizes and the input
        holds one component per position of each row, the output keeps them by index, so it lines up with the
        values it is joined to: tokens numbered otherwise than ``0 .. T - 1`` (a class token's key first), read
        by a same-size convolution or pooling and concatenated with themselves along the features."""
        if like is not None and tuple(like.shape[1:]) == tuple(sizes):
            flat = like.reshape(like.shape[0], -1)
            if flat.shape[1] < 2 or bool((flat.sort(1).values.diff(dim=1) != 0).all()):
                grid = like.reshape(like.shape[0], *[1] * (axis - 1), *sizes, *[1] * (len(shape) - axis - len(sizes)))
                return broadcast_ids(grid, shape).clone()
        count = math.prod(sizes)
        # rows of one datapoint on axis 0 (a video's frames as [b * T, C, H, W]): each row's grid gets keys of
        # its own, after those of the datapoint's rows before it
        rows = datapoint.reshape(-1)
        rank = rank_among_rows(rows)
        needed = count * (int(rank.max()) + 1 if rank.numel() else 1)
        while len(self.keys) < needed:
            self.new_key()
        grid = torch.arange(count).reshape(sizes)
        grid = grid.reshape(1, *[1] * (axis - 1), *sizes, *[1] * (len(shape) - axis - len(sizes)))
        dp = (rows * KEY_STRIDE + rank * count).reshape(-1, *[1] * (len(shape) - 1))
        return broadcast_ids(dp + grid, shape).clone()

    def tied_copy(self, row: Tensor, origin: str, created_by: str) -> tuple[Tensor, list]:
        """New neurons, one per neuron of ``row``, each tied to it (one MERGE edge per neuron), so
        the permutation of the channels moves the copy with them. Returns ``(new nodes aligned
        with row, new sets)``: one new set per run of ``row`` that lies in one set, so every tie
        pairs a set with a set of its own size (a copy of ``cat([a, b])`` is a copy of ``a`` and a
        copy of ``b``: one set tied to both would pin them)."""
        nodes, created, runs = self.sets_per_run(row, NodeKind.RESIDUAL, origin, created_by)
        for (low, high), copy in zip(runs, created):
            copied = copy.first + torch.arange(high - low)
            self.edges.append((row[low:high].clone(), copied, EdgeKind.MERGE, -1, None, None))
            self.ties.append((row[low:high].clone(), copied))
        return nodes, created

    def sets_per_run(self, row: Tensor, kind: NodeKind, origin: str,
                     created_by: str) -> tuple[Tensor, list, list[tuple[int, int]]]:
        """New sets of ``kind``, one per run of ``row`` that lies in one set, together one new
        neuron per neuron of ``row``: ``(new nodes aligned with row, new sets, (low, high) of each
        run)``. The caller adds the edges and ties (a copy's MERGE edges, a norm's scale edges)."""
        owner = torch.tensor([self.set_of(int(node)).index for node in row.tolist()])
        starts = [0, *(torch.nonzero(owner[1:] != owner[:-1]).flatten() + 1).tolist(), len(row)]
        runs = list(zip(starts, starts[1:]))
        created = [self.new_set(high - low, kind, origin, created_by) for low, high in runs]
        return torch.cat([copy.first + torch.arange(copy.size) for copy in created]), created, runs

    # -------------------------------------------------------------- taps
    def tap_gather(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """:func:`gather_taps`: one tap set of ``C`` neurons per kernel tap (see the module docstring)."""
        x, kernel, stride, padding, dilation = args
        spatial = len(kernel)
        taps = math.prod(kernel)
        meta = self.meta(x)
        if isinstance(meta, Raw) and x.is_floating_point() and tuple(stride) == tuple(kernel) \
                and not any(side for pair in padding for side in pair) and all(step == 1 for step in dilation) \
                and x.shape == self.input_tensor.shape:  # the whole input, not a group's channels
            return self.patch_taps(name, x, meta, kernel, output)
        if isinstance(meta, Raw) and x.is_floating_point() and x.shape == self.input_tensor.shape \
                and self.input_set is None and self.datapoint_dim == 0 and self.input_taps:
            return self.read_input_taps(name, x, meta, kernel, output)
        meta, row, datapoint = self.channel_neurons(x, name, spatial)
        meta = self.fix_act(x, meta, name)  # the channels' own act: their values at their positions
        row = broadcast_ids(meta.nodes, x.shape).reshape(x.shape[0], x.shape[1], -1)[0, :, 0].clone()
        for index in meta.versions:
            self.separate_part_read(self.sets[index], row)
        copies, created = zip(*(self.tied_copy(row, f"{self.path() or 'conv'} tap {tap}", "tap")
                                for tap in range(taps)))
        feature_nodes = torch.stack(copies, dim=1).reshape(-1)  # channel-major, tap-minor
        nodes = broadcast_ids(feature_nodes, output.shape).clone()
        comps = self.position_comps(datapoint, tuple(output.shape[1:-1]), output.shape, 1,
                                    like=broadcast_ids(meta.comps, x.shape)[:, 0])
        new = Neurons(nodes, comps, {copy.index: 0 for sets in created for copy in sets})
        created[0][0].grad_records.append((output, nodes, comps))  # one record writes every tap set's grad
        self.set_meta(output, new)
        self.observe(output, new)

    def patch_taps(self, name: str, x: Tensor, meta: Raw, kernel: tuple[int, ...], output: Tensor) -> None:
        """Windows that tile the model input (a ViT's patch embedding): ``C * k`` input neurons
        (channel, then place in the patch) at one component per patch, as before convolutions
        had taps, so patch embeddings keep their graphs."""
        spatial = len(kernel)
        element = meta.element
        datapoint, _, _ = self.datapoint_of(element)
        if varies_along(datapoint, 1) or any(varies_along(datapoint, 2 + axis) for axis in range(spatial)):
            raise self.unsupported(name, "a convolution whose input's first axis is not the datapoints")
        channels, sizes = x.shape[1], tuple(x.shape[2:])
        counts = [size // step for size, step in zip(sizes, kernel)]
        width = channels * math.prod(kernel)
        grids = torch.meshgrid(*(torch.arange(size) for size in sizes), indexing="ij")
        inside = torch.ones(sizes, dtype=torch.bool)
        feature = torch.zeros(sizes, dtype=torch.long)
        position = torch.zeros(sizes, dtype=torch.long)
        for grid, step, count in zip(grids, kernel, counts):
            inside &= grid < count * step  # a remainder no window covers is read by nothing
            feature = feature * step + grid % step
            position = position * count + grid // step
        feature = torch.arange(channels).reshape(-1, *[1] * spatial) * math.prod(kernel) + feature
        # a pointwise kernel's patches are the input's channels at its positions: a later elementwise read
        # of the input map (x + conv1x1(x)) reads it so too (tracer.neurons_from_raw)
        self.input_neurons(width, name, f"as {width} features per patch").read_as_channels = all(  # type: ignore
            step == 1 for step in kernel)
        keep = broadcast_ids(inside, x.shape)
        nodes = torch.where(keep, self.input_set.first + broadcast_ids(feature, x.shape), -1)
        comps = torch.full(tuple(x.shape), -1, dtype=torch.long)
        comps[keep] = self.assign_comps(element[keep], datapoint[keep], broadcast_ids(position, x.shape)[keep])
        if x.requires_grad:
            self.input_set.grad_records.append((x, nodes, comps))
        first_of_datapoint = datapoint.reshape(datapoint.shape[0], -1)[:, 0]
        out_nodes = broadcast_ids(self.input_set.first + torch.arange(width), output.shape).clone()
        out_comps = self.position_comps(first_of_datapoint, tuple(counts), output.shape, 1)
        new = Neurons(out_nodes, out_comps, {self.input_set.index: 0})
        self.set_meta(output, new)

    def read_input_taps(self, name: str, x: Tensor, meta: Raw, kernel: tuple[int, ...], output: Tensor) -> None:
        """A convolution that is the first reader of the model input ``[b, C, *S]``: the input is
        ``C * k`` neurons (channel, then kernel tap), their ``act`` the window values at the
        convolution's *output* positions and their ``grad`` the gradient of those values, as a
        patch embedding's are. The input grid then has no components of its own, so a strided
        first convolution (the Small CNN Zoo's) gives ``b`` times its output grid components,
        not its input grid. A later read of the input in any other way (a residual from the
        input, a second convolution) raises :class:`InputReadAgain` (``tracer.input_neurons``), and
        the model is traced again with the input read as channels (``tracer.input_taps = False``)."""
        element = meta.element
        datapoint, _, _ = self.datapoint_of(element)
        if any(varies_along(datapoint, axis) for axis in range(1, x.dim())):
            raise self.unsupported(name, "a convolution whose input's first axis is not the datapoints")
        width = x.shape[1] * math.prod(kernel)
        self.input_neurons(width, name, f"as {width} (channel, tap) features")
        self.input_set.read_through_taps = True  # type: ignore[attr-defined]
        nodes = broadcast_ids(self.input_set.first + torch.arange(width), output.shape).clone()
        first_of_datapoint = datapoint.reshape(datapoint.shape[0], -1)[:, 0]
        comps = self.position_comps(first_of_datapoint, tuple(output.shape[1:-1]), output.shape, 1)
        new = Neurons(nodes, comps, {self.input_set.index: 0})
        if output.requires_grad:
            self.input_set.grad_records.append((output, nodes, comps))
        self.set_meta(output, new)

    # -------------------------------------------------------------- pooling
    def spatial_pool(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        """Max / average / adaptive / power-average pooling, ``F.interpolate`` and a constant
        ``F.pad`` of the spatial axes: per channel over positions, so a new set of ``C`` neurons
        tied to the channels (MERGE edges) at the output grid's positions."""
        x = args[0] if args else kwargs["input"]
        param = self.meta(x)
        if isinstance(param, Param) and name.endswith("interpolate"):
            return self.resample_parameter(name, x, param, args, kwargs, output)
        values = output[0] if isinstance(output, tuple) else output
        spatial = values.dim() - 2  # (a reduction without keepdim has fewer spatial axes than x)
        # max_pool2d & co. also take an unbatched [C, *S] input: its first axis holds no datapoints
        pool_axes = re.search(r"pool([123])d", name)
        meta, row, datapoint = self.channel_neurons(x, name, int(pool_axes[1]) if pool_axes else x.dim() - 2)
        for index in meta.versions:
            self.separate_part_read(self.sets[index], row)
        pooled, created = self.tied_copy(row, self.path() or name, "pool")
        nodes = broadcast_ids(pooled.reshape(1, -1, *[1] * spatial), values.shape).clone()
        comps = self.position_comps(datapoint, tuple(values.shape[2:]), values.shape, 2,
                                    like=broadcast_ids(meta.comps, x.shape)[:, 0])
        new = Neurons(nodes, comps, {copy.index: 0 for copy in created})
        created[0].grad_records.append((values, nodes, comps))
        self.set_meta(values, new)
        self.observe(values, new)
        if isinstance(output, tuple):
            self.mark_opaque(output[1], name, "the indices of a max pooling", [])

    def pixel_shuffle(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``F.pixel_shuffle`` / ``F.pixel_unshuffle`` (sub-pixel convolution: ESPCN, super-resolution
        decoders): channels moved into positions, or back. The output's channels are a new set of
        neurons at the output grid, each joined by MERGE edges from the input channels whose values it
        holds. Both sets are pinned: a permutation of the output channels would move whole blocks of
        input channels in order, which the group does not express, and any other permutation of the
        input channels changes which place a value lands at."""
        x = args[0] if args else kwargs["input"]
        meta, row, datapoint = self.channel_neurons(x, name, 2)
        for index in meta.versions:
            self.separate_part_read(self.sets[index], row)
        # which input channels each output channel holds: the op replayed on channel numbers
        with torch.no_grad():
            channel = torch.arange(x.shape[1]).reshape(1, -1, 1, 1).expand(1, -1, *x.shape[2:])
            sources = self.replay_channels(name, args, kwargs, channel)
        out_channels = output.shape[1]
        created = self.new_set(out_channels, NodeKind.RESIDUAL, self.path() or name, "pixel_shuffle")
        created.pinned = True
        for index in meta.versions:
            self.sets[index].pinned = True
        for out in range(out_channels):
            held = torch.unique(sources[0, out])
            self.edges.append((row[held].clone(), torch.full((held.numel(),), created.first + out), EdgeKind.MERGE,
                               -1, None, None))
        nodes = broadcast_ids((created.first + torch.arange(out_channels)).reshape(1, -1, 1, 1), output.shape).clone()
        comps = self.position_comps(datapoint, tuple(output.shape[2:]), output.shape, 2)
        new = Neurons(nodes, comps, {created.index: 0})
        created.grad_records.append((output, nodes, comps))
        self.set_meta(output, new)
        self.observe(output, new)

    @staticmethod
    def replay_channels(name: str, args: tuple, kwargs: dict, channel: Tensor) -> Tensor:
        """``F.pixel_shuffle`` / ``F.pixel_unshuffle`` of ``args`` applied to the channel numbers ``channel``."""
        factor = args[1] if len(args) > 1 else kwargs.get("upscale_factor", kwargs.get("downscale_factor"))
        shuffle = F.pixel_shuffle if name.endswith("pixel_shuffle") else F.pixel_unshuffle
        return shuffle(channel, factor)

    def pads_positions(self, args: tuple, kwargs: dict) -> bool:
        """Whether ``F.pad(x, pad, "constant", value)`` pads only the spatial axes of a map
        ``[b, C, *S]`` whose channels are neurons (a causal convolution's left padding): then,
        as pooling, each channel of one datapoint is read alone, and the padded map is a copy of
        the channels at a larger grid whose new places hold the constant (their act, read from
        the tensor); so is one of the model input's spatial axes, whose channels become input
        neurons there (``transformers``' MobileNetV2 and EfficientNet pad the image so). Pairs for
        the channel and datapoint axes may be given if they are zero (``F.pad(m, (1, 0, 0, 0))``):
        the op is then the pad of the spatial axes alone, element for element. The map's components need not
        vary along its spatial axes (a ``[b, C]`` value broadcast over positions, ``h[:, :, None].expand(...)``):
        the copy gets components of its own for every place. Reflect /
        replicate / circular padding are indexing (:func:`padding_parts`); a constant pad of
        anything else (features, the datapoint axis) has no rule."""
        x, pad, mode = pad_arguments(args, kwargs)
        if mode != "constant" or not isinstance(x, Tensor) or x.dim() < 3 or len(pad) % 2 \
                or len(pad) // 2 > x.dim() or any(pad[2 * (x.dim() - 2):]):
            return False
        meta = self.meta(x)
        if isinstance(meta, Raw) and x.is_floating_point():
            return True  # the model input [b, C, *S] (TF-style "same" padding): channel_neurons reads it
        # any map whose channels are one neuron each: spatial_pool reads the pad as a copy of each channel at
        # fresh components for every place of the padded grid, whatever the map's components along its spatial
        # axes (positions of a feature map; one per datapoint where a [b, C] value is broadcast over positions)
        return isinstance(meta, Neurons) and meta.comps is not None and channel_row(meta.nodes, x.shape) is not None

    # -------------------------------------------------------------- flatten into a head
    def spread_positions(self, name: str, x: Tensor, meta: Neurons) -> Neurons:
        """An affine map over a last axis that holds (channel, position) pairs of one datapoint
        (``h.flatten(1)`` of ``[b, C, H, W]`` read by a ``Linear``): each position's channels
        become a set of their own (tied to the channels, MERGE edges), all at one new component
        per datapoint, so the head's weights are ordinary edges. Other layouts are returned as
        they are (the affine rule decides)."""
        if meta.comps is None or x.dim() == 0:
            return meta
        last = x.dim() - 1
        comps = broadcast_ids(meta.comps, x.shape)
        datapoint = comps // KEY_STRIDE
        if not varies_along(comps, last) or varies_along(datapoint, last):
            return meta
        rows = rows_along_last(broadcast_ids(meta.nodes, x.shape))
        keys = rows_along_last(comps % KEY_STRIDE)
        if not bool((rows == rows[:1]).all()) or not bool((keys == keys[:1]).all()) or bool((rows[0] < 0).any()):
            return meta
        row, key_row = rows[0], keys[0]
        if torch.unique(torch.stack((row, key_row)), dim=1).shape[1] != row.numel():
            raise self.unsupported(name, "an affine map over features that hold one neuron at one position twice")
        meta = self.fix_act(x, meta, name)  # the channels' act: their values at their positions
        row = rows_along_last(broadcast_ids(meta.nodes, x.shape))[0]
        for index in meta.versions:
            self.separate_part_read(self.sets[index], torch.unique(row))
        # the neurons at each position get copies of their own (a position's channels, or one
        # pooled vector of a cat of several), all at one new component
        new_row = torch.empty_like(row)
        created = []
        for key in torch.unique(key_row).tolist():
            at_key = key_row == key
            new_row[at_key], sets = self.tied_copy(row[at_key].clone(), f"{self.path() or name} position {key}",
                                                   "flatten")
            created.extend(sets)
        key = self.new_key()[0]
        nodes = broadcast_ids(new_row, x.shape).clone()
        new = Neurons(nodes, (datapoint * KEY_STRIDE + key).clone(), {copy.index: 0 for copy in created})
        created[0].grad_records.append((x, nodes, new.comps))
        self.set_meta(x, new)
        self.observe(x, new)
        return new

    # -------------------------------------------------------------- group and instance norms
    def channel_norm(self, name: str, func: Any, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``F.group_norm`` / ``F.instance_norm`` (with the input's statistics) over ``[b, C, *S]``:
        as a layer norm, the input's act is its normalised value, ``γ`` is on NORM_SCALE edges
        and ``β`` the bias of a NORM set. The statistic of a group mixes its channels, so channels
        move only within their group (the layout cuts them at group borders); with one channel per
        group (InstanceNorm) every channel permutation moves whole groups and keeps the function."""
        group_norm = func is F.group_norm
        names = ("input", "num_groups", "weight", "bias", "eps") if group_norm else (
            "input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x, weight, bias, eps = bound["input"], bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
        if not group_norm and not bound.get("use_input_stats", True):
            raise self.unsupported(name, "instance norm with running statistics (track_running_stats in eval); "
                                   "gradgraph reads it with the input's statistics only")
        channels = x.shape[1]
        groups = int(bound["num_groups"]) if group_norm else channels
        meta, row, _ = self.channel_neurons(x, name, x.dim() - 2)
        with torch.no_grad():
            normalised = F.group_norm(x.detach(), groups, None, None, eps)
        self.derived[id(normalised)] = (normalised, self.op_index, ("group_norm", groups, eps))
        normalised_meta = Neurons(meta.nodes, meta.comps, self.next_version(meta.versions))
        self.set_meta(normalised, normalised_meta)
        normalised_meta = self.fix_act(normalised, normalised_meta, name)
        sources = broadcast_ids(normalised_meta.nodes, x.shape).reshape(x.shape[0], channels, -1)[0, :, 0].clone()
        created = self.new_set(channels, NodeKind.NORM, self.path() or name, "norm")
        targets = created.first + torch.arange(channels)
        if weight is not None:
            weight_view = self.param_view(weight, name, "weight")
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, weight_view.index,
                               weight_view.pos.reshape(-1).clone(), None))
        else:
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, -1, None, None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            created.bias_param, created.bias_pos = bias_view.index, bias_view.pos.reshape(-1).clone()
        self.ties.append((sources, targets))
        per_group = channels // groups
        # a statistic over several channels: they move only within their group, so cut both ends at the
        # group borders (one channel per group, as InstanceNorm: any permutation moves whole groups)
        if 1 < groups and per_group > 1:
            source_sets = self.sets_in(sources)
            whole = len(source_sets) == 1 and torch.equal(sources, source_sets[0].first + torch.arange(channels))
            # sources that are not one set in order (a concatenation, a reordered read) are not cut, and need no
            # pin: each is tied to its NORM neuron, and the layout frees a class only where every slot holds one
            # node of each of its pieces (layout._flat_ranks), so a source moves only with its NORM neuron, inside
            # that neuron's group piece: every group keeps its sources
            for nodes in (targets, sources) if whole else (targets,):
                self.cuts.update(int(nodes[0]) + border for border in range(0, channels + 1, per_group))
        spatial = x.dim() - 2
        nodes = broadcast_ids(targets.reshape(-1, *[1] * spatial), output.shape).clone()
        new = Neurons(nodes, broadcast_ids(meta.comps, output.shape).clone(), {created.index: 0})
        created.grad_records.append((output, nodes, new.comps))
        self.set_meta(output, new)
        self.observe(output, new)
