"""Trace rules for norms: ``layer_norm`` and ``rms_norm`` over the features (or each head's features),
``batch_norm`` in eval mode. The input's act is its normalised value, the weight a scale on
``NORM_SCALE`` edges, the bias the bias of a ``NORM`` set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradgraph.convert.trace.meta import (
    broadcast_ids, feature_row, neuron_axes_last, neuron_rows, Neurons, Param, rows_along_last, varies_along,
)
from gradgraph.convert.trace.ops import LAYER_NORM, LOST_TRACK
from gradgraph.graph import EdgeKind, NodeKind


class NormRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: norms."""

    def norm(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        x = args[0]
        layer_norm = name in LAYER_NORM
        normalized_shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = (args[3] if len(args) > 3 else kwargs.get("bias")) if layer_norm else None
        eps = args[4 if layer_norm else 3] if len(args) > (4 if layer_norm else 3) else kwargs.get("eps")
        meta = self.need_neurons(x, name)
        if meta is None:
            if weight is None and bias is None:
                return None
            raise self.unsupported(name, LOST_TRACK)
        if len(tuple(normalized_shape)) != 1:
            raise self.unsupported(name, f"normalized_shape {tuple(normalized_shape)}; gradgraph supports norms over "
                                   "the last axis")
        neuron_axes = [axis for axis in range(x.dim()) if varies_along(meta.nodes, axis)]
        # a norm of each head's features (Phi's LayerNorm of q.view(b, T, heads, d).transpose(1, 2)): one
        # statistic per head, the weight [d] shared by the heads
        layout = neuron_axes_last(broadcast_ids(meta.nodes, x.shape)) if meta.comps is not None else None
        per_part = layout is not None
        if not per_part and (neuron_axes not in ([x.dim() - 1], []) or meta.comps is None):
            raise self.unsupported(name, "a norm whose last axis is not the features of its input")
        with torch.no_grad():
            if layer_norm:
                normalised = F.layer_norm(x.detach(), tuple(normalized_shape), None, None,
                                          1e-5 if eps is None else eps)
            else:
                squares = x.detach().pow(2).mean(-1, keepdim=True)
                epsilon = torch.finfo(x.dtype).eps if eps is None else eps
                normalised = x.detach() * torch.rsqrt(squares + epsilon)
        # the input's act is its normalised value: then NORM_SCALE edges carry gamma's gradient
        recipe = ("layer_norm", tuple(normalized_shape), 1e-5 if eps is None else eps) if layer_norm else (
            "rms_norm", None if eps is None else eps)
        self.derived[id(normalised)] = (normalised, self.op_index, recipe)
        versions = self.next_version(meta.versions)
        normalised_meta = Neurons(meta.nodes, meta.comps, versions)
        self.set_meta(normalised, normalised_meta)
        normalised_meta = self.fix_act(normalised, normalised_meta, name)
        if per_part:
            self.separate_parts(meta, neuron_axes[:-1], neuron_axes[-1:])
            sources = feature_row(neuron_rows(broadcast_ids(normalised_meta.nodes, x.shape), layout))
            if sources is None:
                raise self.unsupported(name, "a norm of each head's features whose heads hold other neurons at "
                                       "other positions")
        else:
            sources = rows_along_last(normalised_meta.nodes)[0].clone()
        self.check_sources_are_neurons(name, sources)

        def position_row(pos: Tensor) -> Tensor:  # the weight's entry of every source ([d] over the heads)
            return neuron_rows(broadcast_ids(pos, x.shape), layout)[0].clone()
        # one norm set per source set the features lie in (a norm of cat([h1, h2])): the statistic is
        # symmetric in all its features, so each part still permutes on its own, with its source
        targets, created_sets, runs = self.sets_per_run(sources, NodeKind.NORM, self.path() or name, "norm")
        if weight is not None:
            weight_view = self.param_view(weight, name, "weight")
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, weight_view.index,
                               position_row(weight_view.pos), None))
        else:
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, -1, None, None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            bias_positions = position_row(bias_view.pos)
            for (low, high), created in zip(runs, created_sets):
                created.bias_param, created.bias_pos = bias_view.index, bias_positions[low:high].clone()
        for low, high in runs:
            self.ties.append((sources[low:high], targets[low:high]))
        if per_part:
            lookup = torch.full((self.num_nodes,), -1, dtype=torch.long)
            lookup[sources] = targets
            nodes = lookup[broadcast_ids(normalised_meta.nodes, output.shape)]
        else:
            nodes = broadcast_ids(targets, output.shape).clone()
        new = Neurons(nodes, meta.comps.clone(), {created.index: 0 for created in created_sets})
        created_sets[0].grad_records.append((output, nodes, new.comps))  # one record writes every set's grad
        self.set_meta(output, new)
        self.observe(output, new)

    def check_sources_are_neurons(self, name: str, sources: Tensor) -> None:
        """Refuse a norm whose features hold a statistic of neurons (``cat([h, (h ** 2).sum(-1, keepdim=True)])``):
        its scale of that feature would be an edge from no neuron (``make_plan`` refused it with an internal error)."""
        if bool((sources < 0).any()):
            raise self.unsupported(name, "a norm of a value whose features hold a statistic of neurons (a sum or mean "
                                   "over features joined to them): the statistic is no neuron, so its scale has no "
                                   "rank-1 terms; normalise the neurons before joining the statistic")

    def batch_norm(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        if isinstance(self.meta(args[0]), Param):  # BiT's WeightStandardizedConv2d: F.batch_norm of its weight
            raise self.unsupported(name, "a batch norm of a parameter (weight standardization) is arithmetic on the "
                                   "parameter before it meets the input, whose gradient is not a rank-1 term of the "
                                   "graph; convert a copy with the standardized weights as plain parameters")
        if training:
            raise self.unsupported(name, "batch norm in training mode mixes the datapoints of a batch, so their "
                                   "gradients are not separate rank-1 terms; call model.eval()")
        x, running_mean, running_var = args[0], args[1], args[2]
        weight = args[3] if len(args) > 3 else kwargs.get("weight")
        bias = args[4] if len(args) > 4 else kwargs.get("bias")
        eps = args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)
        # BatchNorm1d/2d/3d over [b, channels, *positions]: channels are the neurons (trace/rules_conv.py)
        meta = self.need_neurons(x, name) if x.dim() == 2 else self.channel_neurons(x, name, x.dim() - 2)[0]
        if meta is None:
            raise self.unsupported(name, LOST_TRACK)
        stats = [-1] + [1] * (x.dim() - 2)  # the running statistics per channel, broadcast over positions
        with torch.no_grad():
            normalised = (x.detach() - running_mean.reshape(stats)) / torch.sqrt(running_var.reshape(stats) + eps)
        self.derived[id(normalised)] = (normalised, self.op_index, ("batch_norm", eps))
        # the running statistics are buffers: symmetry.permute_model moves them with the channels of
        # the module whose bias they share (a BatchNorm with affine=True); other statistics pin them
        movable = bias is not None and any(
            getattr(module, "bias", None) is bias and getattr(module, "running_mean", None) is running_mean
            and getattr(module, "running_var", None) is running_var for module in self.model.modules())
        if not movable:
            for index in meta.versions:
                self.sets[index].pinned = True
        normalised_meta = Neurons(meta.nodes, meta.comps, self.next_version(meta.versions))
        self.set_meta(normalised, normalised_meta)
        normalised_meta = self.fix_act(normalised, normalised_meta, name)
        sources = normalised_meta.nodes.reshape(x.shape[0], x.shape[1], -1)[0, :, 0].clone()
        self.check_sources_are_neurons(name, sources)
        if torch.unique(sources).numel() != sources.numel():  # (the gradient check refused it, blaming a constant)
            raise self.unsupported(name, "a batch norm of a value that holds one neuron in two channels "
                                   "(h.repeat(1, 2), cat([h, h])): each channel has a scale and shift of its own, "
                                   "which one neuron cannot carry; normalise before repeating the neurons")
        # per channel, nothing mixed: one norm set per source set the channels lie in (a DenseNet's
        # BatchNorm over cat([h, z]) is a norm of h and a norm of z, each permuted with its source)
        targets, created_sets, runs = self.sets_per_run(sources, NodeKind.NORM, self.path() or name, "norm")
        for (low, high), created in zip(runs, created_sets):
            created.pinned = not movable
            if movable:
                self.ties.append((sources[low:high], targets[low:high]))
        if weight is not None:
            weight_view = self.param_view(weight, name, "weight")
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, weight_view.index, weight_view.pos.clone(),
                               None))
        else:
            self.edges.append((sources, targets, EdgeKind.NORM_SCALE, -1, None, None))
        if bias is not None:
            bias_view = self.param_view(bias, name, "bias")
            for (low, high), created in zip(runs, created_sets):
                created.bias_param, created.bias_pos = bias_view.index, bias_view.pos[low:high].clone()
        nodes = broadcast_ids(targets.reshape(-1, *[1] * (x.dim() - 2)), output.shape).clone()
        new = Neurons(nodes, broadcast_ids(meta.comps, output.shape).clone(),
                      {created.index: 0 for created in created_sets})
        created_sets[0].grad_records.append((output, nodes, new.comps))  # one record writes every set's grad
        self.set_meta(output, new)
        self.observe(output, new)
