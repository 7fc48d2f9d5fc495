"""What one trace of a forward found: :class:`TraceResult`, the one object the later stages read.

As ``torch.fx`` hands a ``Graph`` to its passes, :func:`gradgraph.convert.trace.trace_model`
hands a :class:`TraceResult` to the layout (:func:`gradgraph.convert.layout.make_plan`), the
plan's records (:func:`gradgraph.convert.plan.plan_records`) and the chain capture: the neuron
sets, the edge groups and relations, the parameters used, the ops (fingerprints, value guards,
the tensors recorded per op) and what the model returned. The tracer itself — the
``TorchFunctionMode``, its id tensors and rule state — is gone once the forward ran; nothing
after the trace reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from gradgraph.convert.trace.meta import NeuronSet, OpLog, ValueGuard, set_containing
from gradgraph.errors import GradGraphError
from gradgraph.graph import EdgeKind

__all__ = ["EdgeGroup", "TraceResult"]

#: One group of edges a rule created: ``(src [E], dst [E], kind, param, positions [E] | None,
#: None)`` — ``param`` indexes :attr:`TraceResult.param_names` (-1: a relation with weight 1
#: and no parameter), ``positions`` the flat entry of the parameter each edge's weight is.
EdgeGroup = tuple[Tensor, Tensor, EdgeKind, int, "Tensor | None", None]


@dataclass
class TraceResult:
    """The neurons, relations and ops one trace of a forward found.

    Node ids are ``0 .. num_nodes``; every :class:`NeuronSet` holds ``first .. first + size``
    and the sets are in creation order (the input first, where it is read as features).
    Components are ``datapoint * KEY_STRIDE + key`` with ``num_keys`` keys.

    Attributes:
        sets: the neuron sets, with the tensors their ``act`` / ``grad`` / one-hot rows are
            read from (their ``*_records``) and what the rules decided (``pinned``, ...).
        num_nodes: ``N``, the nodes of all sets.
        edges: the edge groups (:data:`EdgeGroup`), in creation order.
        ties: ``(a [n], b [n])`` node pairs one permutation must move together.
        attention: per attention op, per head ``(query, key, value, output)`` node ids.
        cuts: nodes where the layout cuts a set in two (the halves of a fused gated unit).
        num_keys: ``K``, the position keys the trace used (0 where none was read).
        param_names, param_shapes, params: the parameters the forward used, in first-use order;
            ``param`` of an edge group or ``bias_param`` of a set indexes them.
        fingerprints: per op of the forward ``(name, arguments by producer, output shapes)``.
        value_guards: op index -> decisions read off a constant argument's values.
        output_sets: the sets whose values reach the model's output.
        captured: op index -> ``(args, kwargs, output)`` of every op that touched a traced value.
        module_outputs: ``(module path, (op, position))`` per module call, in the order the calls
            returned: the op whose output the module returned.
        output: what the forward returned.
        inputs: the input as the model saw it (a leaf that requires grad for float inputs).
        num_datapoints: ``b``.
        grouped: per grouped op (a grouped or depthwise convolution, run as one ``F.linear`` per
            group), the set index of every group's output, in group order: the groups of one op are
            alike by construction, so :func:`~gradgraph.convert.layout.make_plan` may let whole
            groups move (their output sets hold nothing else).
    """

    sets: list[NeuronSet]
    num_nodes: int
    edges: list[EdgeGroup]
    ties: list[tuple[Tensor, Tensor]]
    attention: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]]
    cuts: set[int]
    num_keys: int
    param_names: list[str]
    param_shapes: list[list[int]]
    params: list[Tensor]
    fingerprints: list[tuple]
    value_guards: dict[int, list[ValueGuard]]
    output_sets: set[int]
    captured: dict[int, tuple[tuple, dict, Any]]
    module_outputs: list[tuple[str, Any]]
    output: Any
    inputs: Tensor
    num_datapoints: int
    #: whether the fused recurrent loops ran folded over time (docs/recurrent.md); a replay runs them so too
    fold_time: bool = False
    #: the op log (producer of every tensor) and the values the rules computed themselves
    log: OpLog = field(repr=False, default=None)
    derived: dict[int, tuple[Tensor, int, tuple]] = field(repr=False, default_factory=dict)
    grouped: list[list[int]] = field(default_factory=list)

    def source_of(self, tensor: Tensor) -> tuple:
        """Where a recorded tensor comes from, so a later call finds it again: ``("input",)``,
        ``("out", op, position)`` (an op's output) or ``("derived", op, recipe)`` (a value a rule
        computed from op ``op``'s arguments, a norm's normalised input)."""
        derived = self.derived.get(id(tensor))
        if derived is not None and derived[0] is tensor:
            return ("derived", derived[1], derived[2])
        found = self.log.source(tensor)
        if found == (-1, 0):
            return ("input",)
        if not isinstance(found, tuple) or found[0] == "param":
            raise GradGraphError("internal: a recorded tensor was produced by no op of the trace")
        return ("out", found[0], found[1])

    def set_of(self, node: int) -> NeuronSet:
        """The neuron set holding node ``node``."""
        return set_containing(self.sets, node)
