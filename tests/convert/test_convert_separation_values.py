"""Per-function checks of ``convert/separation.py`` (issue 31, runs separation 1-2): the probe weights as the
module docstring writes them, the frontier walk on small autograd graphs, the datapoint of each recorded element,
and the comparison ``p_n = v_{d(n)} g_n`` with its tolerance, against hand-made records whose errors are known
exactly (the conversion tests reach these only through whole models, where no error sits near the tolerance)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from gradgraph.convert import separation
from gradgraph.convert.plan import Record
from gradgraph.errors import DatapointCouplingError, GradGraphError

DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps


def test_the_probe_weights_are_one_plus_the_fractional_part_of_i_times_the_golden_ratio():
    phi = (math.sqrt(5) - 1) / 2
    assert separation._PHI == pytest.approx(phi, abs=1e-15)
    weights = separation.probe_weights(7, torch.float32, torch.device("cpu"))
    assert weights.dtype == torch.float32 and weights.shape == (7,)
    expected = torch.tensor([1 + (i * phi) % 1 for i in range(7)], dtype=torch.float32)
    torch.testing.assert_close(weights, expected, atol=1e-7, rtol=0)
    assert float(weights[0]) == 1.0 and torch.unique(weights).numel() == 7
    many = separation.probe_weights(1000, DTYPE, torch.device("cpu"))
    assert bool((many >= 1).all() and (many < 2).all()) and torch.unique(many).numel() == 1000


def _leaf(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=DTYPE, requires_grad=True)


def test_the_frontier_is_the_first_recorded_tensors_on_each_path_from_the_losses():
    x, w = _leaf(3, 2), _leaf(2, 2, seed=1)
    h1 = x @ w
    h2 = torch.tanh(h1)
    h3 = h2 * 2
    parameters = {"w": w}
    # the losses reach h3 first; h2 and h1 lie behind it
    assert separation.frontier((h3 ** 2).sum(1), [h1, h2, h3], parameters) == [2]
    # a second path to h1 past h2
    assert separation.frontier((h3 ** 2).sum(1) + h1.sum(1), [h1, h2, h3], parameters) == [0, 2]
    # the same tensor recorded twice: the first index
    assert separation.frontier(h2.sum(1), [h1, h2, h2], parameters) == [1]
    # the input itself (a leaf) recorded: found through its AccumulateGrad node
    assert separation.frontier((x * 3).sum(1), [h1, x], parameters) == [1]
    # a leaf that is neither recorded nor a parameter (an input) is passed by
    assert separation.frontier((x * h2).sum(1), [h2], parameters) == [0]
    # no gradient at all: no frontier
    assert separation.frontier(torch.ones(3), [h1], parameters) == []


def test_the_frontier_tells_the_outputs_of_one_op_apart():
    x = _leaf(3, 4)
    h = torch.tanh(x)
    first, second = h.split(2, dim=1)
    assert separation.frontier(first.sum(1), [first, h], {}) == [0]
    assert separation.frontier(second.sum(1), [first, h], {}) == [1]  # past `first`'s node, to h
    assert separation.frontier(second.sum(1), [first], {}) == []


def test_a_parameter_reached_before_any_recorded_tensor_is_refused_naming_it():
    x, w, scale = _leaf(3, 2), _leaf(2, 2, seed=1), _leaf(1, seed=2)
    h = torch.tanh(x @ w)
    parameters = {"layer.weight": w, "scale": scale}
    assert separation.frontier((h * 2).sum(1), [h], parameters) == [0]  # w only behind h
    message = ("the per-datapoint losses depend on the parameter 'scale' other than through the model's forward as "
               "gradgraph traced it (a regulariser added to each loss, or a value a hook or the closure kept from "
               "inside the forward): its gradient would be missing from the graph. Return everything the loss reads "
               "from forward and add parameter penalties outside gradgraph")
    with pytest.raises(GradGraphError, match="^" + re.escape(message) + "$"):
        separation.frontier(h.sum(1) + scale ** 2, [h], parameters)
    # a parameter on a second path is found past a path that met a recorded tensor first
    with pytest.raises(GradGraphError, match="'layer.weight'"):
        separation.frontier(h.sum(1) + w.sum(), [h], parameters)


def test_the_datapoint_of_each_recorded_element():
    block = Record(("out", 1, 0), (6, 2), None, None, (4, 2))
    keep, datapoint = separation.record_datapoints(block, num_components=6, num_keys=2)
    assert keep is None
    assert datapoint.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # component c = 2 d + key, two per row
    mask = torch.tensor([True, False, True, True])
    scattered = Record(("out", 1, 0), (4,), mask, torch.tensor([5, 7, 12 + 3]))
    keep, datapoint = separation.record_datapoints(scattered, num_components=6, num_keys=2)
    assert keep is mask
    assert datapoint.tolist() == [2, 0, 1]  # (row * 6 + c) % 6 // 2


def _plan(*records, names=((0, 3, "layer"),), num_keys=1):
    return SimpleNamespace(num_keys=num_keys, derived={}, grad=list(records), set_names=list(names))


SOURCE = ("out", 3, 0)


def _scattered(linear, shape=None, keep=None, source=SOURCE):
    linear = torch.tensor(linear)
    return Record(source, shape or (linear.numel(),), keep, linear)


def _compare(plan, g, p, num_datapoints=2, sources=(SOURCE,)):
    weights = separation.probe_weights(num_datapoints, DTYPE, torch.device("cpu"))
    separation._compare(plan, list(g), tuple(p), list(sources), weights, num_datapoints)


def _coupled(datapoint, shape, origin="the neurons of 'layer'"):
    return pytest.raises(DatapointCouplingError, match="^" + re.escape(
        f"the per-datapoint losses mix datapoints: the losses of other datapoints move with datapoint {datapoint}'s "
        f"values at {origin} (a tensor of shape {list(shape)}), so one backward pass of sum(losses) cannot give each "
        "datapoint its own gradient and every per-sample gradient would be wrong. This comes from a loss_fn that "
        "compares datapoints (loss - loss.mean(), a contrastive / InfoNCE loss over the batch, hard-example mining) "
        "or from a forward that mixes the batch after its last parameterised op (x - x.mean(0), a softmax over the "
        "batch, roll / flip / cumsum / sort along it). Compute each datapoint's loss from its own output alone") + "$")


def test_the_tolerance_is_64_eps_of_the_largest_gradient():
    """Element 0 is datapoint 0's (weight 1), element 1 datapoint 1's with ``g = 0``: its error is ``p`` exactly,
    and ``max(|g|, |p|) = 1``."""
    plan = _plan(_scattered([0, 1]))  # neuron 0 at components 0 and 1
    g = torch.tensor([1.0, 0.0], dtype=DTYPE)
    for within in (63.5, 64.0):
        _compare(plan, [g], [torch.tensor([1.0, within * EPS], dtype=DTYPE)])
    with _coupled(1, (2,)):
        _compare(plan, [g], [torch.tensor([1.0, 64.5 * EPS], dtype=DTYPE)])
    with _coupled(1, (2,)):
        _compare(plan, [g], [torch.tensor([1.0, -64.5 * EPS], dtype=DTYPE)])


def test_the_tolerance_scales_with_the_weighted_gradient_too():
    """Element 0 is datapoint 1's: ``p_0 = 1.618 g_0``, so the scale is ``|p_0|``, not ``|g_0| = 1``."""
    plan = _plan(_scattered([1, 0]))
    weights = separation.probe_weights(2, DTYPE, torch.device("cpu"))
    g = torch.tensor([1.0, 0.0], dtype=DTYPE)
    _compare(plan, [g], [torch.stack([weights[1], torch.tensor(90 * EPS, dtype=DTYPE)])])
    with _coupled(0, (2,)):
        _compare(plan, [g], [torch.stack([weights[1], torch.tensor(110 * EPS, dtype=DTYPE)])])
    # and with g: the error of a large g against p = 0
    g = torch.tensor([0.0, 1e6], dtype=DTYPE)
    _compare(plan, [g], [torch.tensor([0.0, 1e6], dtype=DTYPE) + torch.tensor([50 * EPS * 1e6, 0], dtype=DTYPE)])


def test_the_coupled_datapoint_named_is_the_worst_one():
    plan = _plan(_scattered([0, 1, 2, 3]))  # neuron 0 at components 0..3
    g = torch.ones(4, dtype=DTYPE)
    weights = separation.probe_weights(4, DTYPE, torch.device("cpu"))
    p = weights * g + torch.tensor([1e-6, 0, 3e-6, 2e-6], dtype=DTYPE)
    with _coupled(2, (4,)):
        _compare(plan, [g], [p], num_datapoints=4)
    separation._compare(plan, [g], (weights * g,), [SOURCE], weights, 4)


def test_records_of_other_sources_empty_records_and_missing_gradients_are_passed_by():
    other = ("out", 9, 0)
    bad = _scattered([0, 1, 2], source=other)  # would be compared with a g of another shape
    empty = _scattered([], shape=(2,), keep=torch.tensor([False, False]))
    coupled = _scattered([0, 1])
    g = torch.ones(2, dtype=DTYPE)
    p = torch.tensor([1.0, 1.0], dtype=DTYPE)  # datapoint 1's weight is 1.618: coupled
    with _coupled(1, (2,)):
        _compare(_plan(bad, empty, coupled), [g], [p])
    with _coupled(1, (2,)):  # a source whose gradient is missing comes first
        _compare(_plan(coupled), [None, g], [p, p], sources=(other, SOURCE))
    with _coupled(1, (2,)):
        _compare(_plan(coupled), [g, g], [None, p], sources=(other, SOURCE))
    _compare(_plan(coupled), [None], [p])


def test_only_the_kept_elements_are_compared():
    keep = torch.tensor([True, False, True])
    plan = _plan(_scattered([0, 1], shape=(3,), keep=keep))
    weights = separation.probe_weights(2, DTYPE, torch.device("cpu"))
    g = torch.tensor([1.0, 5.0, 2.0], dtype=DTYPE)
    _compare(plan, [g], [torch.stack([weights[0], torch.tensor(-3.0, dtype=DTYPE), 2 * weights[1]])])
    with _coupled(1, (3,)):
        _compare(plan, [g], [torch.stack([weights[0], torch.tensor(-3.0, dtype=DTYPE), 2 * weights[0]])])


def test_a_broadcast_gradient_is_expanded_to_the_record():
    """A gradient of shape ``[1, 2]`` for a record of shape ``[2, 2]`` (neuron 0, 1 at datapoints 0, 1)."""
    plan = _plan(Record(SOURCE, (2, 2), None, None, (0, 2)))
    weights = separation.probe_weights(2, DTYPE, torch.device("cpu"))
    g = torch.tensor([[1.0, 2.0]], dtype=DTYPE)
    with _coupled(1, (1, 2)):
        _compare(plan, [g], [g.clone()])
    _compare(plan, [g.expand(2, 2) * weights[:, None]], [g.expand(2, 2) * weights[:, None] ** 2])


def test_the_origin_named_is_the_neuron_set_of_the_records_first_row():
    g, p = torch.ones(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)
    names = ((0, 2, "a"), (2, 3, "b.c"), (5, 1, "d"))
    with _coupled(1, (2,), "the neurons of 'b.c'"):
        _compare(_plan(_scattered([2 * 2 + 0, 2 * 2 + 1]), names=names), [g], [p])
    with _coupled(1, (2,), "the neurons of 'b.c'"):
        _compare(_plan(_scattered([4 * 2 + 0, 4 * 2 + 1]), names=names), [g], [p])
    with _coupled(1, (2,), "the neurons of 'd'"):
        _compare(_plan(_scattered([5 * 2 + 0, 5 * 2 + 1]), names=names), [g], [p])
    with _coupled(1, (2,), "the last traced op"):
        _compare(_plan(_scattered([6 * 2 + 0, 6 * 2 + 1]), names=names), [g], [p])
    with _coupled(1, (2, 1), "the neurons of 'b.c'"):
        _compare(_plan(Record(SOURCE, (2, 1), None, None, (3, 1)), names=names), [g.reshape(2, 1)],
                 [p.reshape(2, 1)])


def test_the_datapoints_of_a_record_are_computed_once_per_plan():
    plan = _plan(_scattered([0, 1]))
    g = torch.ones(2, dtype=DTYPE)
    weights = separation.probe_weights(2, DTYPE, torch.device("cpu"))
    _compare(plan, [g], [weights * g])
    assert set(plan.derived) == {("datapoints", 0)}
    keep, datapoint = plan.derived[("datapoints", 0)]
    assert keep is None and datapoint.tolist() == [0, 1]


def test_check_separate_does_nothing_without_a_gradient_one_datapoint_or_a_frontier():
    x = _leaf(2, 3)
    h = torch.tanh(x)
    plan = _plan(_scattered([0, 1]))
    for objective, tensors, count in ((torch.ones(2, dtype=DTYPE), [h], 2), ((h ** 2).sum(1), [h], 1),
                                      ((x ** 2).sum(1), [h], 2)):
        finish = separation.check_separate(plan, objective, [SOURCE], tensors, {}, count)
        assert finish is separation._nothing
        assert finish([None]) is None


@pytest.mark.parametrize("coupled", [False, True])
def test_check_separate_probes_the_frontier_and_compares_with_the_plain_gradient(coupled):
    """``u [3, 2]`` one block of neurons 0, 1 (component = datapoint); the losses ``|u_i|^2``, or those minus
    their mean (every datapoint's loss moves with every other's values)."""
    x = _leaf(3, 2)
    u = torch.tanh(x)
    losses = (u ** 2).sum(1)
    objective = losses - losses.mean() if coupled else losses
    plan = _plan(Record(SOURCE, (3, 2), None, None, (0, 2)))
    finish = separation.check_separate(plan, objective, [SOURCE], [u], {}, 3)
    (g,) = torch.autograd.grad(objective.sum(), [u])  # the graph was kept for this pass
    if coupled:
        with _coupled(1, (3, 2)):
            finish([g])
    else:
        finish([g])
        torch.testing.assert_close(g, 2 * u.detach(), atol=1e-15, rtol=0)


# ----------------------------------------------------------------------------- the survivors of run separation 1
def test_the_losses_themselves_recorded_are_the_frontier():
    """The objective is a recorded tensor (output 0 of its node): the walk stops there at once, before the
    parameter behind it. Kills ``frontier`` 22 (the walk started at output 1)."""
    x, w = _leaf(3, 2), _leaf(2, seed=1)
    objective = x @ w
    assert separation.frontier(objective, [objective], {"w": w}) == [0]


def test_the_walk_goes_on_past_a_leaf_and_a_node_met_twice():
    """The pending nodes are a stack: a leaf that is neither recorded nor a parameter, or a node met a second time,
    may come before a recorded tensor still pending. Kills ``frontier`` 57, 60 (``break`` for ``continue``)."""
    x = _leaf(3, 2)
    recorded = torch.tanh(x)
    assert separation.frontier((recorded * x).sum(1), [recorded], {}) == [0]  # x's leaf popped first
    twice = x * 2
    assert separation.frontier(recorded.sum(1) + (twice + twice).sum(1), [recorded], {}) == [0]


def test_the_walk_visits_each_node_once():
    """Forty diamonds (``h = h + h``) after the last recorded tensor: a walk that visits a node again on every path
    to it takes ``2^40`` steps. Kills ``frontier`` 58, 61, 62 (the seen set never read or never written: a timeout)."""
    x = _leaf(3, 2)
    recorded = torch.tanh(x)
    h = recorded
    for _ in range(40):
        h = h * 1.0 + h
    assert separation.frontier(h.sum(1), [recorded], {}) == [0]


@pytest.mark.parametrize("num_datapoints", [2, 3])
def test_a_coupled_loss_of_two_datapoints_is_refused(num_datapoints):
    """Two datapoints are enough to mix (``loss - loss.mean()``). Kills ``check_separate`` 10, 11 (the check skipped
    for fewer than three)."""
    x = _leaf(num_datapoints, 2)
    u = torch.tanh(x)
    losses = (u ** 2).sum(1)
    plan = _plan(Record(SOURCE, (num_datapoints, 2), None, None, (0, 2)))
    finish = separation.check_separate(plan, losses - losses.mean(), [SOURCE], [u], {}, num_datapoints)
    (g,) = torch.autograd.grad((losses - losses.mean()).sum(), [u])
    with pytest.raises(DatapointCouplingError):
        finish([g])


def test_the_origin_is_read_off_the_records_first_element():
    """A record whose first element is neuron 1 of set ``a`` (neurons 0, 1) and whose second is neuron 2 of ``b``;
    and a record of one element. Kills ``_origin`` 8 (the second element read)."""
    g, p = torch.ones(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)
    names = ((0, 2, "a"), (2, 3, "b"))
    with _coupled(1, (2,), "the neurons of 'a'"):
        _compare(_plan(_scattered([1 * 2 + 1, 2 * 2 + 1]), names=names), [g], [p])
    with _coupled(1, (1,), "the neurons of 'b'"):
        _compare(_plan(_scattered([3 * 2 + 1]), names=names), [g[:1]], [p[:1]])
