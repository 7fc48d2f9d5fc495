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

The components are the input's: padding features adds no position. A pad of the features *and* of other
axes in one call and a pad that crops one side while widening the other are refused by name. Pads by
copying (reflect / replicate / circular) and crops (no positive side) never reach this rule: they run as
indexing (:func:`~gradgraph.convert.trace.rules_conv.padding_parts`), and copies of a channel are refused
where a convolution or a linear map reads them (one neuron twice). The spatial axes of a map have their own
rule (:meth:`~gradgraph.convert.trace.rules_conv.ConvRules.pads_positions`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import broadcast_ids, Neurons, varies_along
from gradgraph.graph import NodeKind

__all__ = ["PadRules", "pad_amounts"]


def pad_amounts(pad: Any, dim: int) -> list[tuple[int, int]]:
    """``F.pad``'s ``pad`` as ``(before, after)`` per axis ``0 .. dim - 1`` (``pad`` lists the last axis first)."""
    pairs = [(0, 0)] * dim
    for index in range(len(pad) // 2):
        pairs[dim - 1 - index] = (int(pad[2 * index]), int(pad[2 * index + 1]))
    return pairs


class PadRules:
    """The feature-pad rule of :class:`~gradgraph.convert.trace.tracer.Tracer` (a mixin)."""

    def pads_features(self, args: tuple, kwargs: dict) -> bool:
        """Whether ``F.pad`` pads an axis of neuron values along which the neurons vary (features,
        a map's channels): then :meth:`feature_pad` has the rule (or the refusal)."""
        bound = dict(zip(("input", "pad", "mode", "value"), args))
        bound.update(kwargs)
        x, pad = bound.get("input"), bound.get("pad")
        meta = self.meta(x) if isinstance(x, Tensor) else None
        if not isinstance(meta, Neurons) or meta.comps is None or pad is None or len(pad) % 2 \
                or len(pad) // 2 > x.dim():
            return False
        nodes = broadcast_ids(meta.nodes, x.shape)
        return any(pair != (0, 0) and varies_along(nodes, axis)
                   for axis, pair in enumerate(pad_amounts(pad, x.dim())))

    def feature_pad(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        """``F.pad(x, pad, "constant", value)`` of the feature axis of neuron values (see the module docstring)."""
        bound = dict(zip(("input", "pad", "mode", "value"), args))
        bound.update(kwargs)
        x = bound["input"]  # (reflect / replicate / circular pads and crops ran as indexing: decompositions.py)
        meta = self.meta(x)
        nodes, comps = broadcast_ids(meta.nodes, x.shape), broadcast_ids(meta.comps, x.shape)
        padded = [(axis, pair) for axis, pair in enumerate(pad_amounts(bound["pad"], x.dim())) if pair != (0, 0)]
        feature_axes = [axis for axis, _ in padded if varies_along(nodes, axis)]
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
