"""Trace rule for a constant ``F.pad`` of the feature (channel) axis of neuron values.

The CIFAR ResNets' "option A" shortcut (``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``, ResNet-20/32/56
as most CIFAR model zoos train them) widens a map by ``2p`` channels of zeros so that it can be added to
the block's output; an MLP's ``F.pad(h, (0, k))`` does the same to features. The padded value holds, along
that axis, ``lo`` constant neurons, a copy of the input's neurons and ``hi`` constant neurons:

* the copy is a new set per run of the input's row, tied to it by MERGE edges (as a pooling's copy), so a
  permutation of the input's neurons moves it with them;
* each constant block is a new set with no incoming edge, whose act is the pad value (read from the padded
  tensor, like every set's) and whose grad is the loss's gradient at those places. Its neurons are
  interchangeable (they all hold the same constant), so the group may permute them among themselves.

The padded row's sets are cuts of the layout (``tracer.cuts``), carried along ties: the set a residual add
makes of ``h + pad(x)`` is cut where the pad's sets change, so its pieces are permuted with their partners.

The components are the input's: padding features adds no position. A pad of the *positions* of a value whose
features are its last axes (a token shift ``F.pad(h, (0, 0, 1, -1))`` of ``[b, T, d]``, as RWKV and many
token-mixing MLPs write it; a channels-last map ``[b, H, W, C]``) is read as a map's positions are: a tied copy
of the features at a new grid of positions, whose new places hold the constant. A pad of the features *and* of other
axes in one call and a pad that crops one side while widening the other are refused by name. Pads by
copying (reflect / replicate / circular) and crops (no positive side) never reach this rule: they run as
indexing (:func:`~gradgraph.convert.trace.rules_conv.padding_parts`), and copies of a channel are refused
where a convolution or a linear map reads them (one neuron twice). The spatial axes of a map have their own
rule (:meth:`~gradgraph.convert.trace.rules_conv.ConvRules.pads_positions`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import broadcast_ids, KEY_STRIDE, Neurons, varies_along
from gradgraph.convert.trace.rules_conv import pad_arguments
from gradgraph.graph import NodeKind

__all__ = ["PadRules", "pad_amounts"]


def pad_amounts(pad: Any, dim: int) -> list[tuple[int, int]]:
    """``F.pad``'s ``pad`` as ``(before, after)`` per axis ``0 .. dim - 1`` (``pad`` lists the last axis first)."""
    pairs = [(0, 0)] * dim
    for index in range(len(pad) // 2):
        pairs[dim - 1 - index] = (int(pad[2 * index]), int(pad[2 * index + 1]))
    return pairs


def _first_feature_axis(nodes: Tensor) -> int:
    """The first axis along which the neurons vary; the last axis where none does (one feature ``[b, T, 1]``)."""
    return next((axis for axis in range(nodes.dim()) if varies_along(nodes, axis)), nodes.dim() - 1)


class PadRules:
    """The pad rules of :class:`~gradgraph.convert.trace.tracer.Tracer` for neuron values (a mixin)."""

    def pads_neuron_values(self, args: tuple, kwargs: dict) -> bool:
        """Whether this rule reads ``F.pad(x, pad, "constant", value)`` of neuron values: a pad of an axis along
        which the neurons vary (features, a map's channels), or of the positions of a value
        whose features are its last axes (tokens ``[b, T, d]``, a channels-last map ``[b, H, W, C]``:
        :meth:`position_pad`). The positions of a map ``[b, C, *S]`` are
        :meth:`~gradgraph.convert.trace.rules_conv.ConvRules.pads_positions`'s."""
        x, pad, mode = pad_arguments(args, kwargs)
        meta = self.meta(x) if isinstance(x, Tensor) else None
        if not isinstance(meta, Neurons) or meta.comps is None or pad is None or len(pad) % 2 \
                or len(pad) // 2 > x.dim() or mode != "constant":
            return False
        nodes = broadcast_ids(meta.nodes, x.shape)
        padded = [axis for axis, pair in enumerate(pad_amounts(pad, x.dim())) if pair != (0, 0)]
        if any(varies_along(nodes, axis) for axis in padded):
            return True
        # positions before the features: tokens [b, T, d] (a map [b, C, *S] has its positions after them)
        return bool(padded) and all(axis < _first_feature_axis(nodes) for axis in padded)

    def join_as_pad(self, name: str, parts: list, dim: int, output: Tensor) -> bool:
        """``cat([h, zeros])``, ``cat([c, h, c])`` along the features or a map's channels, every constant part
        filled with one value: the constant ``F.pad`` of that axis it equals (GatedGraphConv pads its input to its
        width so; :meth:`neuron_pad`). Returns whether it applied; a join with constants along positions (a
        key/value cache) or with constants that are not one value stays the caller's refusal."""
        places = [place for place, part in enumerate(parts) if self.meta(part) is not None]
        if len(places) != 1 or not isinstance(self.meta(parts[places[0]]), Neurons):
            return False
        place = places[0]
        x, constants = parts[place], parts[:place] + parts[place + 1:]  # (the caller left out empty constants)
        fill = constants[0].detach().reshape(-1)[0] if constants else None
        if fill is None or any(not bool((part.detach() == fill).all()) for part in constants):
            return False  # not one value: no pad
        axis = dim % x.dim()
        if not varies_along(broadcast_ids(self.meta(x).nodes, x.shape), axis):
            return False  # not the neurons' axis: positions (a cache) or one feature
        before = sum(part.shape[axis] for part in parts[:place])
        after = sum(part.shape[axis] for part in parts[place + 1:])
        args = (x, (0, 0) * (x.dim() - 1 - axis) + (before, after), "constant", float(fill))
        if not self.pads_neuron_values(args, {}):
            return False
        self.neuron_pad(name, args, {}, output)
        return True

    def neuron_pad(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """A constant ``F.pad`` of the feature axis (see the module docstring) or, where no feature axis is padded,
        of the positions before the features (:meth:`position_pad`)."""
        x, pad, _ = pad_arguments(args, kwargs)  # (reflect / replicate / circular pads and crops: indexing)
        meta = self.meta(x)
        nodes, comps = broadcast_ids(meta.nodes, x.shape), broadcast_ids(meta.comps, x.shape)
        padded = [(axis, pair) for axis, pair in enumerate(pad_amounts(pad, x.dim())) if pair != (0, 0)]
        feature_axes = [axis for axis, _ in padded if varies_along(nodes, axis)]
        if not feature_axes:
            return self.position_pad(name, x, [axis for axis, _ in padded], nodes, comps, output)
        if len(padded) > 1:
            raise self.unsupported(name, f"pads the feature axis {feature_axes[0]} and other axes "
                                   f"({[axis for axis, _ in padded if axis != feature_axes[0]]}) of a value of shape "
                                   f"{list(x.shape)} in one call; pad them in two F.pad calls, the features alone")
        axis, (before, after) = padded[0]
        if before < 0 or after < 0:
            raise self.unsupported(name, f"a pad that crops one side of the feature axis {axis} of a value of shape "
                                   f"{list(x.shape)} and widens the other; crop by slicing (x[..., a:b]) first")
        if varies_along(comps, axis):
            raise self.unsupported(name, f"pads axis {axis} of a value of shape {list(x.shape)}, along which both "
                                   "the neurons and the components vary; gradgraph pads a feature axis that holds "
                                   "the same neurons at every datapoint and position")
        moved = nodes.movedim(axis, -1).reshape(-1, x.shape[axis])
        row = moved[0]
        if bool((row < 0).any()) or not bool((moved == row).all()):
            raise self.unsupported(name, f"pads axis {axis} of a value of shape {list(x.shape)} whose neurons differ "
                                   "between places (or are statistics); gradgraph pads one row of neurons")
        copied, created = self.tied_copy(row, self.path() or name, "pad")
        blocks = []
        for size, where in ((before, "before"), (after, "after")):
            if size:
                constant = self.new_set(size, NodeKind.RESIDUAL, f"{self.path() or name} pad {where}", "pad")
                created.append(constant)
                blocks.append(constant.first + torch.arange(size))
            else:
                blocks.append(torch.empty(0, dtype=torch.long))
        new_row = torch.cat([blocks[0], copied, blocks[1]])
        # the layout cuts whatever the padded row is tied to (the output of a residual add) where its
        # sets change, carried along the ties: else one tie to three sets would pin them all
        self.cuts.update(neuron_set.first for neuron_set in created)
        shape = [1] * output.dim()
        shape[axis] = new_row.numel()
        new_nodes = broadcast_ids(new_row.reshape(shape), output.shape).clone()
        # the components do not vary along the padded axis: each place's is its input neighbour's
        new_comps = broadcast_ids(comps.narrow(axis, 0, 1), output.shape).clone()
        new = Neurons(new_nodes, new_comps, {neuron_set.index: 0 for neuron_set in created})
        created[0].grad_records.append((output, new_nodes, new_comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def position_pad(self, name: str, x: Tensor, padded: list[int], nodes: Tensor, comps: Tensor,
                     output: Tensor) -> None:
        """``F.pad`` of the positions of a value whose features are its last axes (``[b, T, d]``: a token shift
        ``F.pad(h, (0, 0, 1, -1))``; ``[b, H, W, C]``): as a pad of a map's positions, the padded value is a copy
        of the features (tied to them, MERGE edges) at a new grid of positions, whose new places hold the
        constant (their act, read from the padded tensor); the positions keep their components by index
        (:meth:`padded_comps`)."""
        datapoint = comps // KEY_STRIDE
        first = _first_feature_axis(nodes)
        varying = [axis for axis in range(x.dim()) if varies_along(datapoint, axis)]
        # the datapoints on axis 0 (a sequence-first model's [T, b, d] transposed to [b, T, d] too); with one
        # datapoint nothing varies, and only the model's own datapoint axis says which axis it is
        if first == 0 or varying not in ([0], []) or (not varying and self.datapoint_dim != 0):
            raise self.unsupported(name, f"pads the positions of a value of shape {list(x.shape)} whose datapoints "
                                   "are not its first axis alone, or whose features are not its last axes")
        if 0 in padded:
            raise self.unsupported(name, f"pads the datapoint axis 0 of a value of shape {list(x.shape)}: the new rows "
                                   "would be datapoints of no input")
        features = tuple(x.shape[first:])
        row = nodes.reshape(-1, math.prod(features))
        if bool((row[0] < 0).any()) or not bool((row == row[:1]).all()):
            raise self.unsupported(name, f"pads the positions of a value of shape {list(x.shape)} whose positions "
                                   "hold different neurons (or statistics); gradgraph pads one row of features")
        copied, created = self.tied_copy(row[0], self.path() or name, "pad")
        new_nodes = broadcast_ids(copied.reshape(1, *[1] * (first - 1), *features), output.shape).clone()
        new_comps = broadcast_ids(self.padded_comps(comps, first, tuple(output.shape[:first])).reshape(
            *output.shape[:first], *[1] * len(features)), output.shape).clone()
        new = Neurons(new_nodes, new_comps, {neuron_set.index: 0 for neuron_set in created})
        created[0].grad_records.append((output, new_nodes, new_comps))
        self.set_meta(output, new)
        self.observe(output, new)

    def padded_comps(self, comps: Tensor, first: int, shape: tuple[int, ...]) -> Tensor:
        """The components ``[b, *grid]`` of a padded grid of ``shape`` (axes ``0 .. first - 1``), by index: an index
        inside the input's grid keeps its component (so the padded value lines up with every other value of
        those positions: ``cat([F.pad(h[..., :k], (0, 0, 1, -1)), h[..., k:]], -1)`` holds one component per
        position), one outside it gets a new key, the same for every datapoint."""
        grid = comps[(slice(None),) * first + (0,) * (comps.dim() - first)]
        result = torch.empty(shape, dtype=torch.long)
        result[tuple(slice(0, size) for size in grid.shape)] = grid
        inside = torch.zeros(shape[1:], dtype=torch.bool)
        inside[tuple(slice(0, size) for size in grid.shape[1:])] = True
        outside = ~inside
        if bool(outside.any()):
            keys = torch.tensor(self.new_key(int(outside.sum())))
            datapoint = grid.reshape(grid.shape[0], -1)[:, :1] // KEY_STRIDE
            result[:, outside] = datapoint * KEY_STRIDE + keys
        return result
