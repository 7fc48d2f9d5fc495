"""Trace rules for masks and comparisons of neuron values: ``torch.where``, ``masked_fill`` and a comparison
of the same neurons (``h.masked_fill(h <= c, 0)``, ``torch.where(h > 0, h, 0.1 * h)``), each a function of every
neuron's own values. Split from ``rules_elementwise.py`` (session 22), whose unary rule they hand the result to."""

from __future__ import annotations

import torch
from torch import Tensor

from gradgraph.convert.trace.meta import broadcast_ids, Neurons, Opaque, Param
from gradgraph.convert.trace.ops import BINARY_MUL, COMPARISON_CASTS, MASK_FILL, WHERE


def mask_operands(name: str, args: tuple, kwargs: dict) -> tuple:
    """``torch.where``'s ``(condition, input, other)`` or ``masked_fill``'s ``(input, mask, value)``, each given by
    position or keyword (``torch.where(mask, h, other=0.0)``, ``h.masked_fill(mask=m, value=0.0)``); ``None``
    where one is not given."""
    keys = ("condition", "input", "other") if name in WHERE else ("input", "mask", "value")
    return tuple(args) + tuple(kwargs.get(key) for key in keys[len(args):])


class MaskRules:
    """Mixin of :class:`~gradgraph.convert.trace.tracer.Tracer`: masks and comparisons (the elementwise rules'
    ``unary``, ``check_constant`` and ``check_constant_operands`` do the rest)."""

    def mask_op(self, name: str, args: tuple, kwargs: dict, output: Tensor) -> None:
        args = mask_operands(name, args, kwargs)
        # a parameter selected (torch.where's value) or filled in (masked_fill's value) is no bias or scale of
        # the neurons: read as elementwise in the neurons alone, its gradient would be lost
        selected = (args[1], args[2]) if name in WHERE else (args[2],)
        param = next((meta for meta in map(self.meta, selected) if isinstance(meta, Param)), None)
        if param is not None:
            raise self.unsupported(name, f"the parameter '{self.param_names[param.index]}' is a value the op selects "
                                   "(torch.where's value or masked_fill's fill value), which gradgraph has no rank-1 "
                                   "terms for; it reads a parameter added to neurons (a bias) or multiplied with them "
                                   "(a scale): write h + b or h * s")
        if name in WHERE:
            condition, left, right = args[0], args[1], args[2]
            values = [value for value in (left, right) if isinstance(self.meta(value), Neurons)]
            if len(values) == 1 and not isinstance(self.meta(condition), Neurons):
                # the condition and the other value: torch.where(mask, h, table) with a table per neuron pins them
                self.check_constant_operands(name, self.meta(values[0]), args, values[0], output.shape)
                return self.unary(values[0], output, name, None)
            return self.mark_opaque(output, name, "where() between several neuron values", [])
        meta = self.need_neurons(args[0], name)
        if meta is None:
            return None
        self.check_constant(name, meta, args[1], output.shape)
        return self.unary(args[0], output, name, None)

    def comparison(self, name: str, args: tuple, output: Tensor, tracked: list) -> None:
        """``h <= c`` of neuron values and a constant (PyG's ``StdAggregation``:
        ``out.masked_fill(out <= sqrt(eps), 0)``): a boolean of each neuron's own value, with no gradient.
        The trace follows it only into a mask of the same neurons at the same components
        (:meth:`masks_compared_neurons`), whose result is then a function of each neuron's own values; any
        other use reads it as a value without a rule, and where it reaches the output it pins the
        compared sets (it is an :class:`Opaque` holding them)."""
        metas = [meta for _, meta in tracked]
        if len(tracked) != 1 or metas[0].comps is None:  # h1 <= h2: a boolean of two neurons
            return self.mark_opaque(output, name, "gradgraph has no rule for this op", metas)
        value, meta = tracked[0]
        shape = output.shape
        self.check_constant_operands(name, meta, args, value, shape)  # a threshold per neuron pins their set
        compared = Neurons(broadcast_ids(meta.nodes, shape).clone(), broadcast_ids(meta.comps, shape).clone(),
                           dict(meta.versions))
        self.set_meta(output, Opaque(name, self.location(), self.path(), "a comparison of neuron values, read "
                                     "otherwise than as a mask of the same neurons", set(meta.versions), compared))

    def masks_compared_neurons(self, name: str, args: tuple, kwargs: dict, output: Tensor, tracked: list) -> bool:
        """Whether ``name`` masks neurons by a :meth:`comparison` of the same neurons at the same components
        (``h.masked_fill(h <= c, 0)``, ``torch.where(h > c, h, 0)``, ``h * (h > c).float()``): then it is an
        elementwise function of each neuron's own values, a new version of them. A cast of the comparison
        stays one. ``False`` for anything else (the caller reads it as a value without a rule)."""
        opaque = [(value, meta) for value, meta in tracked if isinstance(meta, Opaque)]
        if len(opaque) != 1 or opaque[0][1].compared is None:
            return False
        condition, compared = opaque[0][0], opaque[0][1].compared
        if name in COMPARISON_CASTS and len(tracked) == 1 and args and args[0] is condition:
            if output.shape != condition.shape:
                return False
            self.set_meta(output, opaque[0][1])
            return True
        neurons = [(value, meta) for value, meta in tracked if isinstance(meta, Neurons)]
        if name in WHERE and len(neurons) == 2 and len(tracked) == 3:
            return self.where_of_compared_neurons(name, args, kwargs, output, condition, compared, neurons)
        if len(neurons) != 1 or len(tracked) != 2 or neurons[0][1].comps is None:
            return False  # a parameter filled in, or two values masked: no rule
        value, meta = neurons[0]
        if name in MASK_FILL or name in WHERE:
            args = mask_operands(name, args, kwargs)
        if name in MASK_FILL:
            placed = len(args) > 1 and args[0] is value and args[1] is condition
        elif name in WHERE:
            placed = len(args) > 2 and args[0] is condition
        else:
            placed = name in BINARY_MUL
        shape = output.shape
        if not placed or not torch.equal(broadcast_ids(compared.nodes, shape), broadcast_ids(meta.nodes, shape)) \
                or not torch.equal(broadcast_ids(compared.comps, shape), broadcast_ids(meta.comps, shape)):
            return False
        self.check_constant_operands(name, meta, args, value, shape)  # torch.where(h > c, h, table)
        self.unary(value, output, name, None)
        return True

    def where_of_compared_neurons(self, name: str, args: tuple, kwargs: dict, output: Tensor, condition: Tensor,
                                  compared: Neurons, neurons: list) -> bool:
        """``torch.where(h > 0, h, 0.1 * h)`` (a leaky ReLU or an ELU written by hand): both values and the
        comparison hold the same neurons at the same components, so the result is a piecewise function of each
        neuron's own value, a new version of them (labelled ``OTHER``, as ``h * tanh(h)`` is). It was refused
        as "a comparison of neuron values, read otherwise than as a mask of the same neurons"."""
        args = mask_operands(name, args, kwargs)
        shape = output.shape
        if len(args) < 3 or args[0] is not condition or {id(args[1]), id(args[2])} != {id(v) for v, _ in neurons}:
            return False
        nodes, comps = broadcast_ids(compared.nodes, shape), broadcast_ids(compared.comps, shape)
        for _, meta in neurons:
            if meta.comps is None or not torch.equal(broadcast_ids(meta.nodes, shape), nodes) \
                    or not torch.equal(broadcast_ids(meta.comps, shape), comps):
                return False
        self.op_of_the_same_neurons(tuple(meta for _, meta in neurons), nodes.clone(), comps.clone(), output)
        return True
