"""The check that every datapoint's loss depends on that datapoint alone.

gradgraph's one backward pass of ``sum_i L_i`` gives, at a recorded tensor ``u``, the signal
``g_n = sum_i dL_i/du_n``; it files ``g_n`` under the datapoint ``d(n)`` that element ``n``
belongs to. That is datapoint ``d(n)``'s own signal only if ``dL_i/du_n = 0`` for every
``i != d(n)``. The trace keeps datapoints apart up to the last op it follows; after that, the
rest of the forward (ops without a rule, a reduction or softmax over the batch, ``roll`` /
``flip`` / ``cumsum`` along it) and the loss (``loss - loss.mean()``, a contrastive / InfoNCE
loss over the batch) can mix them, and every per-sample gradient would be silently wrong (only
their sum right). This module checks it on every conversion, exactly, at the current values:

1. **Frontier walk.** From the losses' ``grad_fn``, walk autograd's graph down to the first
   recorded tensors met on each path (the *frontier*: the last tensors whose elements the plan
   files under a datapoint). A path that reaches a parameter of the model before any recorded
   tensor (a regulariser added to each loss, an activation a hook kept for the loss) would put a
   gradient outside the graph's factors: refused, naming the parameter.
2. **Probe.** ``g = d(1·L)/du`` and ``p = d(v·L)/du`` at the frontier, with ``v_i`` distinct
   weights in ``[1, 2)`` (a fixed low-discrepancy sequence, so conversions stay deterministic):
   ``p`` by one backward pass from the losses to the frontier only (the tail of the forward and
   the loss; nothing of the model before it), ``g`` read off the conversion's own backward pass of
   ``sum_i L_i`` (the same derivative). Datapoints are separate iff ``p_n = v_{d(n)} g_n`` for every recorded element
   ``n``: then ``p_n = sum_i v_i dL_i/du_n`` has one term; with coupling, ``p_n - v_{d(n)} g_n =
   sum_{i != d(n)} (v_i - v_{d(n)}) dL_i/du_n``, which vanishes only where those derivatives do
   (or, for distinct weights, on a measure-zero set of values). A loss that reads datapoint
   ``j``'s output as datapoint ``i``'s (a batch permuted after the last parameter) fails the same
   test. Tolerance: ``64 eps`` of the dtype relative to ``max |g|`` of the tensor (the two
   passes differ only by the rounding of the weights' products).

It is a first-order test at the batch's values, which is what the per-sample gradients are:
a coupling whose derivative is exactly zero here changes none of them. Cost: the walk over the
tail's autograd nodes and one backward pass through the tail and the loss. (Before issue 27
item 6 read ``g`` off the conversion's own pass, ``g`` took a second one; the two cost 0.58 ms of
a 33 ms cached conversion of a tiny GPT-2: 2 layers, d = 32, b = 8, T = 16, LM-head loss; CPU,
one thread.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradgraph.errors import DatapointCouplingError, GradGraphError

#: golden-ratio step: ``frac(i * phi)`` are distinct and spread over ``[0, 1)`` for any count
_PHI = 0.6180339887498949

#: probe weights differ from ``v_{d(n)} g_n`` by rounding only; this many eps of the dtype
_EPS_FACTOR = 64.0


def probe_weights(num_datapoints: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[b]`` distinct weights ``1 + frac(i * phi)`` in ``[1, 2)``."""
    index = torch.arange(num_datapoints, dtype=torch.float64)
    return (1.0 + torch.frac(index * _PHI)).to(dtype=dtype, device=device)


def frontier(objective: Tensor, tensors: list[Tensor], parameters: dict[str, Tensor]) -> list[int]:
    """Indices into ``tensors`` of those the losses reach without passing through another.

    Raises:
        GradGraphError: a path from the losses reaches a parameter of the model before any
            recorded tensor.
    """
    stops: dict[tuple[int, int], int] = {}
    leaves: dict[int, int] = {}
    for index, tensor in enumerate(tensors):
        if tensor.grad_fn is not None:
            stops.setdefault((id(tensor.grad_fn), tensor.output_nr), index)
        else:
            leaves.setdefault(id(tensor), index)
    parameter_names = {id(param): name for name, param in parameters.items()}
    found: set[int] = set()
    seen: set[int] = set()
    pending = [(objective.grad_fn, 0)] if objective.grad_fn is not None else []
    while pending:
        node, output_nr = pending.pop()
        hit = stops.get((id(node), output_nr))
        if hit is not None:
            found.add(hit)
            continue
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
        if variable is not None:
            hit = leaves.get(id(variable))
            if hit is not None:
                found.add(hit)
            elif id(variable) in parameter_names:
                name = parameter_names[id(variable)]
                raise GradGraphError(
                    f"the per-datapoint losses depend on the parameter '{name}' other than through the model's "
                    "forward as gradgraph traced it (a regulariser added to each loss, or a value a hook or the "
                    "closure kept from inside the forward): its gradient would be missing from the graph. Return "
                    "everything the loss reads from forward and add parameter penalties outside gradgraph")
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        for child, child_nr in node.next_functions:
            if child is not None:
                pending.append((child, child_nr))
    return sorted(found)


def record_datapoints(record: Any, num_components: int, num_keys: int) -> tuple[Tensor | None, Tensor]:
    """``(keep, datapoint)``: the flat mask of a record's elements that the plan files (``None``:
    all) and the datapoint of each filed element, in order."""
    if record.block is not None:
        width = record.block[1]
        count = num_components * width
        return None, torch.arange(count) // width // num_keys
    return record.keep, (record.linear % num_components) // num_keys


def check_separate(plan: Any, objective: Tensor, sources: list[tuple], tensors: list[Tensor],
                   parameters: dict[str, Tensor], num_datapoints: int) -> Callable[[list], None]:
    """Check that each datapoint's loss depends on that datapoint's recorded values alone (see
    the module docstring), in two halves around the conversion's one backward pass.

    Called before that pass (the autograd graph is kept): walks to the frontier and runs the
    weighted probe ``p``. Returns ``finish(results)``, to call with the gradients of ``sum_i L_i``
    at ``tensors`` that the one backward pass computed: those are the plain probe ``g`` at the
    frontier (the same derivative; a separate pass for it would repeat the tail's backward), and
    ``finish`` raises :class:`~gradgraph.errors.DatapointCouplingError` unless ``p_n = v_{d(n)} g_n``.

    Args:
        plan: the :class:`~gradgraph.convert.plan.TracePlan` (its ``grad`` records say which
            datapoint each element of a recorded tensor belongs to).
        objective: ``[b]`` the per-datapoint losses (or outputs), still differentiable.
        sources: the distinct ``source`` of the plan's gradient records, in the order of ``tensors``.
        tensors: the recorded tensors the one backward pass differentiates.
        parameters: the model's ``named_parameters()``.
        num_datapoints: ``b``.

    Raises:
        GradGraphError: (before the pass) a path from the losses reaches a parameter first.
    """
    if objective.grad_fn is None:
        return _nothing
    hits = frontier(objective, tensors, parameters)
    if num_datapoints < 2 or not hits:
        return _nothing
    chosen = [tensors[index] for index in hits]
    weights = probe_weights(num_datapoints, objective.dtype, objective.device)
    weighted = torch.autograd.grad(objective, chosen, weights, retain_graph=True, allow_unused=True)

    def finish(results: list) -> None:
        _compare(plan, [results[index] for index in hits], weighted, [sources[index] for index in hits], weights,
                 num_datapoints)

    return finish


def _nothing(results: list) -> None:
    return None


def _compare(plan: Any, plain: list, weighted: tuple, chosen_sources: list[tuple],
             weights: Tensor, num_datapoints: int) -> None:
    """Raise where ``p_n != v_{d(n)} g_n`` beyond rounding, naming the first such record."""
    num_components = num_datapoints * plan.num_keys
    derived = plan.derived
    for source, g, p in zip(chosen_sources, plain, weighted):
        if g is None or p is None:
            continue
        for position, record in enumerate(plan.grad):
            if record.source != source:
                continue
            key = ("datapoints", position)
            if key not in derived:
                derived[key] = record_datapoints(record, num_components, plan.num_keys)
            keep, datapoint = derived[key]
            g_flat, p_flat = (value.expand(record.shape).reshape(-1) if tuple(value.shape) != record.shape
                              else value.reshape(-1) for value in (g, p))
            if keep is not None:
                keep = keep.to(g_flat.device)
                g_flat, p_flat = g_flat[keep], p_flat[keep]
            if g_flat.numel() == 0:
                continue
            error = (p_flat - weights[datapoint.to(weights.device)] * g_flat).abs()
            scale = float(torch.maximum(g_flat.abs().max(), p_flat.abs().max()))
            tolerance = _EPS_FACTOR * torch.finfo(g_flat.dtype).eps * scale
            worst = int(error.argmax())
            if float(error[worst]) > tolerance:
                raise DatapointCouplingError(
                    _coupling_message(plan, record, int(datapoint[worst]), tuple(g.shape), num_components))


def _coupling_message(plan: Any, record: Any, datapoint: int, shape: tuple[int, ...], num_components: int) -> str:
    return (f"the per-datapoint losses mix datapoints: the losses of other datapoints move with datapoint "
            f"{datapoint}'s values at {_origin(plan, record, num_components)} (a tensor of shape {list(shape)}), so "
            "one backward pass of sum(losses) cannot give each datapoint its own gradient and every per-sample "
            "gradient would be wrong. This comes from a loss_fn that compares datapoints (loss - loss.mean(), a "
            "contrastive / InfoNCE loss over the batch, hard-example mining) or from a forward that mixes the "
            "batch after its last parameterised op (x - x.mean(0), a softmax over the batch, roll / flip / cumsum "
            "/ sort along it). Compute each datapoint's loss from its own output alone")


def _origin(plan: Any, record: Any, num_components: int) -> str:
    """The neuron set a record writes (by its first row), for messages."""
    row = record.block[0] if record.block is not None else int(record.linear[0]) // num_components
    for first, size, origin in plan.set_names:
        if first <= row < first + size:
            return f"the neurons of '{origin}'"
    return "the last traced op"
