"""A graph from a cached plan: the one backward pass, the factors, the edge values and biases.

:func:`fill_factors` resolves the tensors a :class:`~gradgraph.convert.plan.TracePlan` records, runs
the one backward pass and writes ``act`` / ``grad`` ``[N, B]``; :func:`assemble` puts a
:class:`~gradgraph.GradGraph` together from the plan's shared structure, the model's parameter
values (``edge_attr``, the bias vector) and the fresh factors. What either derives from the plan
alone is worked out once per plan (``plan.derived``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gradgraph.capture import check_finite
from gradgraph.convert.plan import Record, SlotCopy, TracePlan
from gradgraph.convert.separation import check_separate
from gradgraph.convert.trace import UnsupportedOperationError
from gradgraph.graph import GradGraph


def _resolve(source: tuple, x: Tensor, captured: dict[int, tuple[tuple, dict, Any]]) -> Tensor:
    if source[0] == "input":
        return x
    args, kwargs, output = captured[source[1]]
    if source[0] == "out":
        return output if isinstance(output, Tensor) and source[2] == 0 else tree_flatten(output)[0][source[2]]
    recipe = source[2]
    with torch.no_grad():
        value = args[0].detach()
        if recipe[0] == "layer_norm":
            return F.layer_norm(value, recipe[1], None, None, recipe[2])
        if recipe[0] == "rms_norm":
            epsilon = torch.finfo(value.dtype).eps if recipe[1] is None else recipe[1]
            return value * torch.rsqrt(value.pow(2).mean(-1, keepdim=True) + epsilon)
        if recipe[0] == "group_norm":  # GroupNorm / InstanceNorm (trace/rules_conv.py)
            return F.group_norm(value, recipe[1], None, None, recipe[2])
        stats = [-1] + [1] * (value.dim() - 2)  # per channel, broadcast over positions (BatchNorm2d)
        return (value - args[1].reshape(stats)) / torch.sqrt(args[2].reshape(stats) + recipe[1])


def _unwritten_rows(num_nodes: int, records: list[Record]) -> list[tuple[int, int]]:
    """``[(start, stop)]`` row ranges of ``[N, B]`` that no block record writes whole."""
    covered = torch.zeros(num_nodes, dtype=torch.bool)
    for record in records:
        if record.block is not None:
            first, width = record.block
            covered[first:first + width] = True
    edges = torch.diff(torch.cat((torch.tensor([True]), covered, torch.tensor([True]))).int())
    starts = torch.nonzero(edges == -1).flatten().tolist()
    stops = torch.nonzero(edges == 1).flatten().tolist()
    return list(zip(starts, stops))


def _tiles(records: list[Record], num_nodes: int) -> bool:
    """Whether ``records`` are blocks that write rows ``0 .. N`` in order, each once (an MLP chain)."""
    row = 0
    for record in records:
        if record.block is None or record.block[0] != row:
            return False
        row += record.block[1]
    return row == num_nodes


#: at most this many nested strides describe one record's writes (else it stays a scatter)
_MAX_STRIDED_DIMS = 8


def _strided_pattern(source: Tensor, target: Tensor) -> tuple | None:
    """``(source_offset, target_offset, sizes, source_strides, target_strides)`` such that
    element ``i`` of the nested index ``sizes`` (row-major) reads flat ``source[i]`` and writes
    flat ``target[i]``, i.e. the scatter ``out[target] = value[source]`` is one strided copy
    ``out.as_strided(sizes, target_strides, target_offset).copy_(value.as_strided(sizes,
    source_strides, source_offset))``; ``None`` if the two index lists are not such a pattern or
    ``target`` writes an element twice. ``source`` / ``target``: ``[n]`` flat indices.

    Found from the innermost run outwards (the longest run of equal steps in both lists, then
    the same over the runs' starts) and checked against the lists element for element, so a
    pattern is only ever returned for exactly the same writes."""
    count = source.numel()
    if count == 0 or target.numel() != count:
        return None
    sizes: list[int] = []
    steps: list[tuple[int, int]] = []
    starts = (source, target)  # the first pair of every run so far (strided views, no copies)
    while starts[0].numel() > 1:
        if len(sizes) == _MAX_STRIDED_DIMS:
            return None
        width = starts[0].numel()
        run = min(_run_length(starts[0]), _run_length(starts[1]))
        if width % run:
            return None
        sizes.append(run)
        steps.append((int(starts[0][1] - starts[0][0]), int(starts[1][1] - starts[1][0])))
        starts = (starts[0][::run], starts[1][::run])
    sizes, steps = sizes[::-1] or [1], steps[::-1] or [(0, 0)]  # outermost first
    offsets = (int(source[0]), int(target[0]))
    for side, index in enumerate((source, target)):
        # offset + sum_d i_d * step_d, built from the innermost axis outwards: only the last
        # sum is as long as the list (the proposal above read runs; this checks every element)
        expected = torch.arange(sizes[-1]) * steps[-1][side] + offsets[side]
        for size, step in zip(sizes[-2::-1], steps[-2::-1]):
            expected = ((torch.arange(size) * step[side])[:, None] + expected[None, :]).reshape(-1)
        if not torch.equal(expected, index):
            return None
    if any(step[0] < 0 or step[1] < 0 for step in steps) or not _one_to_one(sizes, [step[1] for step in steps]) \
            and torch.unique(target).numel() != count:
        return None  # as_strided takes no negative strides; an element written twice stays a scatter
    return (offsets[0], offsets[1], tuple(sizes), tuple(step[0] for step in steps),
            tuple(step[1] for step in steps))


def _run_length(values: Tensor) -> int:
    """How many leading elements of ``values`` (``[m]``, ``m >= 2``) go by equal steps, looking at
    growing prefixes (a run is usually short: a whole-list pass only for a run that long)."""
    width, prefix = values.numel(), 256
    while True:
        head = values[:min(prefix, width)]
        differences = head[1:] - head[:-1]
        broken = torch.nonzero(differences != differences[0])
        if broken.numel():
            return int(broken[0]) + 1
        if prefix >= width:
            return width
        prefix *= 16


def _one_to_one(sizes: list[int], strides: list[int]) -> bool:
    """Whether the nested index ``sizes`` with ``strides`` (non-negative) never reaches one
    element twice, by a sufficient test (no sort of the ``prod(sizes)`` offsets): taken by
    increasing stride, every stride exceeds the farthest reach of the dimensions before it."""
    reach = 0
    for size, stride in sorted((pair for pair in zip(sizes, strides) if pair[0] > 1), key=lambda pair: pair[1]):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _pattern_in_place(record: Record, strides: tuple[int, ...]) -> tuple | None:
    """:func:`_strided_pattern` of ``record`` for a value of its shape with ``strides``: the
    source offsets are the elements' offsets in that value's memory, not row-major indices."""
    offsets = torch.zeros(record.shape, dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(record.shape, strides)):
        shape = [1] * len(record.shape)
        shape[dim] = size
        offsets += torch.arange(size).reshape(shape) * stride
    offsets = offsets.reshape(-1)
    source = offsets if record.keep is None else offsets[record.keep]
    return _strided_pattern(source, record.linear) if source.numel() == record.linear.numel() else None


def _strided_records(records: list[Record]) -> list[tuple | None]:
    """Per record, its scatter as one strided copy (:func:`_strided_pattern`), or ``None``
    (a block record, or no such pattern). A convolution's tap records read every ``k``-th
    element of the unfolded windows: a scatter with an 8-byte index per element, each read
    through a mask of the whole tensor, where a strided copy reads and writes in place."""
    patterns = []
    for record in records:
        if record.block is not None or record.linear is None:
            patterns.append(None)
            continue
        total = math.prod(record.shape)
        source = torch.arange(total) if record.keep is None else torch.nonzero(record.keep).flatten()
        patterns.append(_strided_pattern(source, record.linear))
    return patterns


def _factor(plan: TracePlan, which: str, values: list[Tensor | None], num_components: int, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """``act`` or ``grad`` ``[N, B]`` from the recorded values of ``plan.act`` / ``plan.grad``
    (``None``: no gradient reached the tensor, its elements are 0). Run under ``no_grad``."""
    records = plan.act if which == "act" else plan.grad
    derived = plan.derived
    if derived[("tiles", which)]:
        # [B, width] blocks -> [N, B]: one cat of the transposed views writes the result
        # contiguous in a single pass, as many ops as blocks
        pieces = []
        for value, record in zip(values, records):
            width = record.block[1]
            if value is None:
                pieces.append(torch.zeros(width, num_components, dtype=dtype, device=device))
                continue
            if value.shape != (num_components, width):
                value = (value if tuple(value.shape) == record.shape else value.expand(record.shape))
                value = value.reshape(num_components, width)
            pieces.append(value.T)
        result = torch.cat(pieces)
        return result if result.dtype == dtype and result.device == device else result.to(device, dtype)
    # rows that a block record writes whole need no zeros first (most of a transformer's rows)
    target = torch.empty(plan.num_nodes * num_components, dtype=dtype, device=device)
    rows = target.view(plan.num_nodes, num_components)
    for start, stop in derived[("unwritten", which)]:
        rows[start:stop].zero_()
    flats: dict[int, Tensor] = {}  # id(value) -> its flat row-major view (tap records share one value)
    for index, (value, record, pattern) in enumerate(zip(values, records, derived[("strided", which)])):
        if value is None:
            if record.block is not None:  # no gradient reached it: its rows are zero, not unwritten
                first, width = record.block
                rows[first:first + width].zero_()
            continue
        shared = tuple(value.shape) == record.shape  # (an expanded copy is no one else's: not kept)
        if not shared:
            value = value.expand(record.shape)
        if record.block is not None:
            first, width = record.block
            rows[first:first + width].copy_(value.reshape(num_components, width).T)
            continue
        if pattern is not None and shared and not value.is_contiguous():
            # a permuted view (a conv's channels-last feature map): read in place, not copied
            # row-major first; the pattern over its own strides is worked out once per strides
            key = ("strided in place", which, index, value.stride())
            if key not in derived:
                derived[key] = _pattern_in_place(record, value.stride())
            if derived[key] is not None:
                source_offset, target_offset, sizes, source_strides, target_strides = derived[key]
                target.as_strided(sizes, target_strides, target.storage_offset() + target_offset).copy_(
                    value.as_strided(sizes, source_strides, value.storage_offset() + source_offset))
                continue
        if pattern is not None:
            flat = flats.get(id(value)) if shared else None  # (values holds it: its id is not reused)
            if flat is None:
                flat = value.reshape(-1)  # a view unless value is not contiguous
                if shared:
                    flats[id(value)] = flat
            source_offset, target_offset, sizes, source_strides, target_strides = pattern
            # flat element i is storage element offset + i * step (a view of a slice has step > 1)
            step = flat.stride(0)
            target.as_strided(sizes, target_strides, target.storage_offset() + target_offset).copy_(
                flat.as_strided(sizes, tuple(stride * step for stride in source_strides),
                                flat.storage_offset() + source_offset * step))
            continue
        value = value.reshape(-1)
        if record.keep is not None:
            value = value[record.keep.to(value.device)]
        target[record.linear.to(device)] = value.to(dtype)
    return rows


def _fill_recipe(plan: TracePlan, parameters: Mapping[str, Tensor]) -> None:
    """What :func:`fill_factors` derives from the plan alone, once per plan (into ``plan.derived``):
    the distinct sources of the gradient records (and each record's position among them), the
    parameters outside the plan that require grad, and how each factor is written."""
    sources = list(dict.fromkeys(record.source for record in plan.grad))
    plan.derived["grad_sources"] = sources
    plan.derived["grad_of_record"] = [sources.index(record.source) for record in plan.grad]
    # which parameters those are follows from the plan's key: the names of those that require grad
    known = set(plan.param_names)
    plan.derived["others"] = [name for name, param in parameters.items() if param.requires_grad and name not in known]
    for which, records in (("act", plan.act), ("grad", plan.grad)):
        plan.derived[("tiles", which)] = _tiles(records, plan.num_nodes)
        plan.derived[("unwritten", which)] = _unwritten_rows(plan.num_nodes, records)
        plan.derived[("strided", which)] = _strided_records(records)
    plan.derived["fill"] = True


def fill_factors(plan: TracePlan, x: Tensor, captured: dict, objective: Tensor, parameters: Mapping[str, Tensor],
          num_datapoints: int, dtype: torch.dtype, device: torch.device,
          sums_of: Sequence[str] = ()) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``act``, ``grad`` ``[N, B]`` from the recorded tensors, with the one backward pass, and
    ``d(sum_i L_i)/dθ`` by autograd for the parameters named in ``sums_of`` (a fresh trace's
    check, :func:`gradgraph.convert.traced._check_sums`), read off the same pass; a parameter
    the loss does not reach is left out.

    ``parameters``: the model's ``named_parameters()`` as a mapping."""
    num_components = num_datapoints * plan.num_keys
    derived = plan.derived
    if "fill" not in derived:
        _fill_recipe(plan, parameters)
    tensors = [_resolve(source, x, captured) for source in derived["grad_sources"]]
    # the parameters ride along in the same backward pass, so a parameter that reaches the loss
    # through ops the trace did not follow is caught instead of silently missing
    others = derived["others"]
    if torch.is_grad_enabled():
        total = objective.sum()
    else:
        with torch.enable_grad():  # the caller is in no_grad; the sum must stay differentiable
            total = objective.sum()
    # before the one backward frees the graph: each datapoint's loss must depend on it alone
    separate = check_separate(plan, objective, derived["grad_sources"], tensors, parameters, num_datapoints)
    asked = [*others, *sums_of]
    results = torch.autograd.grad(total, tensors + [parameters[name] for name in asked] if asked else tensors,
                                  allow_unused=True)
    sums = {name: value for name, value in zip(sums_of, results[len(tensors) + len(others):]) if value is not None}
    results = results[:len(tensors) + len(others)]
    separate(results)  # the pass's gradients at the frontier are the probe's plain half
    for name, result in zip(others, results[len(tensors):]):
        if result is not None:
            raise UnsupportedOperationError(
                name.rsplit(".", 1)[0] if "." in name else "", "parameter use", "in the forward",
                f"the parameter '{name}' affects the loss through ops gradgraph did not follow (a custom "
                "autograd.Function, a tensor made inside forward, or an op without a rule); register the module "
                "with gradgraph.convert.register_elementwise or gradgraph.register_converter")
    with torch.no_grad():
        act = _factor(plan, "act", [_resolve(record.source, x, captured) for record in plan.act], num_components,
                      dtype, device)
        grad = _factor(plan, "grad", [results[index] for index in derived["grad_of_record"]], num_components, dtype,
                       device)
        for record in plan.onehot:
            if record.op is None:
                rows = record.rows
            else:
                indices = captured[record.op][0][0]
                rows = indices.detach().unsqueeze(-1).expand(record.shape).reshape(-1)
                rows = rows if record.keep is None else rows[record.keep.to(rows.device)]
            columns = record.columns.to(device)
            if record.op is not None and record.padding is not None:
                columns = columns[(rows != record.padding).to(device)]
                rows = rows[rows != record.padding]
            act[(record.first + rows).to(device), columns] = 1 if record.weights is None else record.weights.to(
                device, act.dtype)
        # one sum over all factors: a NaN or Inf anywhere makes it non-finite; only then look set by
        # set (math.isfinite of the scalar: torch.isfinite of a 0-d tensor is several ops, ~10 µs)
        if not math.isfinite((act.sum() + grad.sum()).item()):
            for first, size, origin in plan.set_names:
                where = "input" if origin == "input" else f"'{origin}' output"
                check_finite(f"activation of the {where} neurons", act[first:first + size])
                check_finite(f"backpropagated signal of the {where} neurons", grad[first:first + size])
    return act, grad, sums


def _slots_tile(slots: list[SlotCopy], num_rows: int) -> bool:
    """Whether ``slots`` write rows ``0 .. num_rows`` in order from consecutive parameter entries."""
    row = 0
    for slot in slots:
        if not isinstance(slot.rows, slice) or not isinstance(slot.places, slice) or slot.rows.start != row:
            return False
        row = slot.rows.stop
    return row == num_rows


def _bias_pieces(slots: list[SlotCopy], num_nodes: int, whole: Mapping[str, slice]) -> list | None:
    """The bias vector ``[N]`` as consecutive pieces, in row order: a count of zeros (rows no
    bias writes) or ``(name, places)``, the entries of a parameter that fill the next rows
    (``places`` ``None``: all of them). ``None`` unless every slot writes consecutive rows from
    consecutive entries, each row at most once. ``whole``: ``slice(0, numel)`` per parameter."""
    if not all(isinstance(slot.rows, slice) and slot.rows.step in (None, 1) and isinstance(slot.places, slice)
               and slot.places.step in (None, 1) for slot in slots):
        return None
    row, pieces = 0, []
    for slot in sorted(slots, key=lambda slot: slot.rows.start):
        if slot.rows.start < row:
            return None
        if slot.rows.start > row:
            pieces.append(slot.rows.start - row)
        pieces.append((slot.name, None if slot.places == whole.get(slot.name) else slot.places))
        row = slot.rows.stop
    if row < num_nodes:
        pieces.append(num_nodes - row)
    return pieces


#: above this many edges a plan writes edge values slot by slot, not by one gather (whose index,
#: 8 bytes per edge, the plan would keep)
_MAX_GATHER_EDGES = 1 << 22


def _assembly_recipe(plan: TracePlan) -> None:
    """What :func:`assemble` derives from the plan alone, once per plan (into ``plan.derived``)."""
    whole = {name: slice(0, math.prod(shape)) for name, shape in zip(plan.param_names, plan.param_shapes)}
    # every edge a weight entry, weight after weight (MLP chains): (name, places), places None
    # for a whole parameter (its flat view as it is: no indexing op)
    tiles = _slots_tile(plan.weights, plan.num_edges)
    plan.derived["weight_pieces"] = [(slot.name, None if slot.places == whole.get(slot.name) else slot.places)
                                      for slot in plan.weights] if tiles else None
    plan.derived["unweighted"] = None
    plan.derived["weight_gather"] = None
    if not tiles and len(plan.weights) > 1 and plan.num_edges <= _MAX_GATHER_EDGES:
        # one gather from the parameters' entries (and a trailing 1 for edges no parameter
        # writes) instead of one indexed write per slot: a small model's slots are many and cheap,
        # their Python is what costs
        names = list(dict.fromkeys(slot.name for slot in plan.weights))
        offsets, total = {}, 0
        for name in names:
            offsets[name] = total
            total += whole[name].stop
        index = torch.full((plan.num_edges,), total, dtype=torch.long)  # total: the trailing 1
        for slot in plan.weights:  # in order: a later slot writing a row wins, as the writes do
            places = slot.places
            places = torch.arange(places.start or 0, places.stop, places.step or 1) if isinstance(places, slice) \
                else places
            index[slot.rows] = offsets[slot.name] + places
        plan.derived["weight_gather"] = (names, index)
    elif not tiles:
        covered = torch.zeros(plan.num_edges, dtype=torch.bool)
        for slot in plan.weights:
            covered[slot.rows] = True
        # edges no parameter writes (relations) have weight 1
        plan.derived["unweighted"] = None if bool(covered.all()) else torch.nonzero(~covered).flatten()
    plan.derived["bias_pieces"] = _bias_pieces(plan.biases, plan.num_nodes, whole)
    plan.derived["zeros"] = {}


def _entries(parameters: Mapping[str, Tensor], name: str, places: slice | None) -> Tensor:
    flat = parameters[name].reshape(-1)
    return flat if places is None else flat[places]


def _bias(plan: TracePlan, parameters: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[N]``: every neuron's bias, 0 where no parameter gives one (run under ``no_grad``).

    Where the bias slots are consecutive pieces (:func:`_bias_pieces`; every plan of ``Linear``
    layers) the vector is one ``cat`` of the parameters' entries and zero runs the plan keeps,
    instead of zero-filling ``[N]`` and one indexed write per slot (~10 µs each)."""
    pieces = plan.derived["bias_pieces"]
    if pieces:
        values = [piece if isinstance(piece, int) else _entries(parameters, *piece) for piece in pieces]
        if all(isinstance(value, int) or (value.dtype == dtype and value.device == device) for value in values):
            return torch.cat([_zeros(plan, value, dtype, device) if isinstance(value, int) else value
                              for value in values])
    bias = torch.zeros(plan.num_nodes, dtype=dtype, device=device)
    for slot in plan.biases:
        slot.write(bias, parameters[slot.name].reshape(-1))
    return bias


def _zeros(plan: TracePlan, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[count]`` zeros kept by the plan per dtype and device (only ever read: ``cat`` copies them)."""
    key = (count, dtype, device)
    zeros = plan.derived["zeros"].get(key)
    if zeros is None:
        zeros = plan.derived["zeros"][key] = torch.zeros(count, dtype=dtype, device=device)
    return zeros


def assemble(plan: TracePlan, parameters: Mapping[str, Tensor], act: Tensor, grad: Tensor,
              num_datapoints: int) -> GradGraph:
    """A GradGraph from a plan's shared structure, the model's values (``parameters``: its
    ``named_parameters()`` as a mapping) and fresh factors.

    The graph is a shallow copy of the plan's template (as PyG's transforms copy ``Data``):
    it shares the read-only structure tensors and gets its own ``x``, ``edge_attr``, factors,
    ``component_sample`` and lists.
    """
    device, dtype = act.device, act.dtype
    if "zeros" not in plan.derived:
        _assembly_recipe(plan)
    with torch.no_grad():
        weight_pieces = plan.derived["weight_pieces"]
        if weight_pieces is not None:
            edge_attr = torch.cat([_entries(parameters, name, places) for name, places in weight_pieces])
            if edge_attr.dtype != dtype or edge_attr.device != device:
                edge_attr = edge_attr.to(device, dtype)
        elif plan.derived["weight_gather"] is not None:
            names, index = plan.derived["weight_gather"]
            flats = [parameters[name].reshape(-1) for name in names]
            flats.append(torch.ones(1, dtype=flats[0].dtype, device=flats[0].device))
            key = ("weight_gather", str(flats[0].device))
            if key not in plan.derived:
                plan.derived[key] = index.to(flats[0].device)
            edge_attr = torch.cat(flats)[plan.derived[key]]
            if edge_attr.dtype != dtype or edge_attr.device != device:
                edge_attr = edge_attr.to(device, dtype)
        else:
            edge_attr = torch.empty(plan.num_edges, dtype=dtype, device=device)
            if plan.derived["unweighted"] is not None:
                edge_attr[plan.derived["unweighted"].to(device)] = 1
            for slot in plan.weights:
                slot.write(edge_attr, parameters[slot.name].reshape(-1))
        bias = _bias(plan, parameters, dtype, device)
    graph = copy.copy(plan.template_on(device))
    # what setting the fields one by one does, without PyG's per-key dispatch (a third of a small
    # model's assembly): a fresh shallow copy holds no attribute caches to invalidate
    graph._store._mapping.update(
        x=bias[:, None], edge_attr=edge_attr[:, None], act=act, grad=grad,
        component_sample=plan.component_sample(num_datapoints, device), num_datapoints=num_datapoints,
        param_names=list(plan.param_names), param_shapes=[list(shape) for shape in plan.param_shapes])
    return graph
