"""The assembly's own checks and writes (``convert/assembly.py``: ``fill_factors``, ``assemble``, ``_resolve``,
``_factor``, ``_tiles``, ``_slots_tile``, ``_bias``) against their ground truth.

Written for the mutation runs of ``assembly.py`` (docs/mutation.md, convert/): the convert tests in
its list convert models whose every parameter the plan follows, on a fresh trace and a replay, so a
mutant that drops the check of a parameter the trace did not follow, the check of the summed
gradients, or the message a user reads survived. Every conversion here is float64 and checked
against torch.func's per-sample gradients (``assert_exact_per_sample_grads``) or a per-datapoint
autograd loop at 1e-10; errors are matched in full. Each test names the mutants it was checked to
kill with ``MUTANT_UNDER_TEST``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from traced_models import assert_exact_per_sample_grads, reference_per_sample_grads

import gradgraph
from gradgraph.convert import register_elementwise
from gradgraph.convert.plan import PLAN_CACHE
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES

DTYPE = torch.float64


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


def _batch(inputs=3, outputs=2, size=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, inputs, dtype=DTYPE, generator=generator),
            torch.randn(size, outputs, dtype=DTYPE, generator=generator))


@pytest.fixture
def registered():
    """``register_elementwise`` for the test's own module types, undone afterwards."""
    types = []

    def register(module_type):
        register_elementwise(module_type)
        types.append(module_type)

    yield register
    for module_type in types:
        ELEMENTWISE_MODULES.pop(module_type, None)


# ------------------------------------------------------------ fill_factors: the one backward pass
def test_a_conversion_called_under_no_grad_still_runs_its_backward_pass():
    """A caller inside ``torch.no_grad()`` (an evaluation loop): the objective's sum is taken under
    ``enable_grad``, and the graph is exact, on a fresh trace and on the replay.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``fill_factors`` 24 (that sum ``None``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs, targets = _batch()
    PLAN_CACHE.clear()
    for _ in range(2):
        with torch.no_grad():
            graph = gradgraph.to_graph(model, inputs, targets, squared_error)
        reference = reference_per_sample_grads(model, inputs, targets, squared_error)
        ours = graph.per_sample_grads()
        assert set(ours) == set(reference)
        for name, value in reference.items():
            torch.testing.assert_close(ours[name], value, atol=1e-10, rtol=0, msg=name)


def test_the_fill_recipe_is_made_once_per_plan_and_its_replays_are_exact(monkeypatch):
    """``_fill_recipe`` derives what ``fill_factors`` needs from the plan alone, once per plan (its docstring): three
    conversions of one model (a fresh trace, then two replays of its cached plan) make it once, and each graph is
    exact. A second model of another width gets a plan, and a recipe, of its own.

    Checked to fail on ``fill_factors`` 4, 5 (the key that marks the recipe made misspelt, ``"XXfillXX"`` or
    ``"FILL"``: the recipe made again at every call)."""
    from gradgraph.convert import assembly

    made = []
    fill_recipe = assembly._fill_recipe

    def counted(plan, parameters):
        made.append(plan)
        fill_recipe(plan, parameters)

    monkeypatch.setattr(assembly, "_fill_recipe", counted)
    torch.manual_seed(0)
    inputs, targets = _batch()
    PLAN_CACHE.clear()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    for _ in range(3):
        assert_exact_per_sample_grads(model, inputs, targets, squared_error)
    assert len(made) == 1
    wider = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    for _ in range(2):
        assert_exact_per_sample_grads(wider, inputs, targets, squared_error)
    assert len(made) == 2 and made[1] is not made[0]


class WithUnused(nn.Module):
    """An MLP with a parameter that requires grad and that ``forward`` never reads."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_a_parameter_the_forward_never_reads_is_left_out_and_the_rest_is_exact():
    """A parameter outside the plan rides along in the backward pass; one the loss does not reach
    (no gradient) is no error and is not in the graph; the others' per-sample gradients are exact,
    on a fresh trace (with its check of the summed gradients) and on the replay.

    Checked to fail on ``fill_factors`` 57, 60 (the pass's results cut at ``len(tensors) -
    len(others)``: the sums read off the wrong gradients, the frontier short of one), 64, 65 (the
    loop over the outside parameters unpacking one-tuples) and 66 (a parameter with no gradient
    refused)."""
    torch.manual_seed(0)
    model = WithUnused().to(DTYPE)
    inputs, targets = _batch()
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = gradgraph.to_graph(model, inputs, targets, squared_error)
        ours = graph.per_sample_grads()
        reference = reference_per_sample_grads(model, inputs, targets, squared_error)
        assert set(ours) == {"l1.weight", "l1.bias", "l2.weight", "l2.bias"}
        for name in ours:
            torch.testing.assert_close(ours[name], reference[name], atol=1e-10, rtol=0, msg=name)
        assert torch.equal(reference["unused"], torch.zeros(5, 3, dtype=DTYPE))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.full((4,), 0.3))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Holder()


class NestedOffset(nn.Module):
    """``l2(shift(l1(x), block.inner.offset))``: the unfollowed parameter is ``block.inner.offset`` (two dots).
    (A registered module that owns a trainable parameter is refused before the trace, by
    ``traced._check_registered_elementwise``; a parameter passed to one reaches this check.)"""

    def __init__(self):
        super().__init__()
        self.l1, self.block, self.shift, self.l2 = nn.Linear(3, 4), Block(), Shift(), nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(self.shift(self.l1(x), self.block.inner.offset))


class Shift(nn.Module):
    """``tanh(x + s)``, registered elementwise: its second argument is read by no rule."""

    def forward(self, x, s):
        return torch.tanh(x + s)


class TopLevelOffset(nn.Module):
    """``l2(shift(l1(x), offset))``: the unfollowed parameter is the model's own ``offset`` (no dot)."""

    def __init__(self):
        super().__init__()
        self.l1, self.shift, self.l2 = nn.Linear(3, 4), Shift(), nn.Linear(4, 2)
        self.offset = nn.Parameter(torch.full((4,), 0.3))

    def forward(self, x):
        return self.l2(self.shift(self.l1(x), self.offset))


_UNFOLLOWED = ("affects the loss through ops gradgraph did not follow (a custom autograd.Function, a tensor made "
               "inside forward, or an op without a rule); register the module with "
               "gradgraph.convert.register_elementwise or gradgraph.register_converter")


@pytest.mark.parametrize("model_type, module_type, message", [
    (NestedOffset, Shift, "in the forward (module 'block.inner'): parameter use: the parameter "
                          "'block.inner.offset' "),
    (TopLevelOffset, Shift, "in the forward: parameter use: the parameter 'offset' "),
], ids=["nested", "top-level"])
def test_a_parameter_that_reaches_the_loss_through_ops_no_rule_followed_is_refused_by_name(
        model_type, module_type, message, registered):
    """A parameter the plan does not hold but whose gradient the backward pass finds nonzero (read
    inside a module registered as elementwise) is refused, naming the parameter and its module
    (the name up to its last dot; none for the model's own parameter), in full.

    Checked to fail on ``fill_factors`` 40, 48 (the outside parameters not asked for: the graph
    would leave the parameter out silently) and 67-96 (the message's parts)."""
    registered(module_type)
    torch.manual_seed(0)
    model = model_type().to(DTYPE)
    inputs, targets = _batch()
    PLAN_CACHE.clear()
    with pytest.raises(gradgraph.UnsupportedModuleError, match=f"^{re.escape(message + _UNFOLLOWED)}$"):
        gradgraph.to_graph(model, inputs, targets, squared_error)


class LearnedSnake(nn.Module):
    """``x + sin(α x)^2 / α`` with ``α`` another module's parameter: registered elementwise, so the
    path from ``α`` through it is one no rule follows."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


class SharedSnake(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.act = LearnedSnake(self.inp.bias)

    def forward(self, x):
        return self.head(self.act(self.inp(x)))


def test_the_sums_of_a_fresh_trace_are_read_off_its_backward_pass_and_checked():
    """``inp.bias`` is in the plan (as a bias) and also read by a registered activation: the
    graph's summed gradient of it misses that path, and the check of the sums (autograd's side
    read off ``fill_factors``' backward pass) refuses the conversion.

    Checked to fail on ``fill_factors`` 40, 48 (no sums asked for) and 52 (the sums dropped: the
    check sees none and passes a silently wrong graph)."""
    register_elementwise(LearnedSnake)
    try:
        torch.manual_seed(0)
        model = SharedSnake().to(DTYPE)
        inputs, targets = _batch()
        PLAN_CACHE.clear()
        with pytest.raises(gradgraph.UnsupportedModuleError,
                           match=r"^in the forward \(module 'inp'\): parameter use: the graph's gradient of 'inp.bias' "
                                 r"\(summed over datapoints\) differs from autograd's by "):
            gradgraph.to_graph(model, inputs, targets, squared_error)
    finally:
        ELEMENTWISE_MODULES.pop(LearnedSnake, None)


def test_a_non_finite_backpropagated_signal_is_named_by_its_set():
    """A loss whose gradient is NaN where its value is finite (``sqrt`` at 0, times 0): ``act`` is
    finite, ``grad`` is not; the error names the first set's backpropagated signal, in full.

    Checked to fail on ``fill_factors`` 183 (the name ``None``) and 187 (the set's rows read as an
    empty slice: no error at all)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs, _ = _batch()
    PLAN_CACHE.clear()
    with pytest.raises(gradgraph.NonFiniteFactorError,
                       match=r"^backpropagated signal of the input neurons has 15 non-finite value\(s\) \(shape "
                             r"\[3, 5\]\); check the inputs, the loss and the model's weights$"):
        gradgraph.to_graph(model, inputs, None, lambda output, _: (output * 0).sqrt().sum(-1))


# ------------------------------------------------------------ assemble, _bias: values in the factors' dtype
def _float64_values(model, seed=3):
    """Every parameter redrawn in float64 (values a float32 copy would round: ``randn`` in float32
    and then ``.double()`` gives values float32 holds exactly)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, dtype=DTYPE, generator=generator))
    return model


class Residual(nn.Module):
    """``x + l1(x)``: one weight slot that does not tile the edges (slot by slot)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 3)

    def forward(self, x):
        return x + self.l1(x)


class TwoResiduals(nn.Module):
    """``h + l2(h)`` after ``h = tanh(l1(x))``: two weight slots and the residual's edges (one gather)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return h + self.l2(h)


class ListedRows(nn.Module):
    """``l2(tanh(linear(x, w[pick], b[pick])))`` with listed rows: index slots (the bias filled slot by slot)."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(6))
        self.l2 = nn.Linear(4, 3)

    def forward(self, x):
        pick = [4, 0, 5, 2]
        return self.l2(torch.tanh(nn.functional.linear(x, self.w[pick], self.b[pick])))


@pytest.mark.parametrize("model_type", [Residual, TwoResiduals, ListedRows])
def test_edge_values_and_biases_are_the_parameters_float64_values_on_every_path(model_type):
    """Edge values and biases written slot by slot (a single non-tiling slot, index slots) or by one
    gather: ``edge_attr`` and ``x`` are float64 and hold each parameter's float64 entries exactly
    (every parameter redrawn in float64), 1 on the edges no parameter writes and 0 on the nodes no
    bias writes; per-sample gradients exact, on a fresh trace and on the replay.

    Checked to fail on ``assemble`` 67, 70 (the slot-by-slot ``edge_attr`` in the default dtype,
    float32: every entry rounded) and ``_bias`` 28, 31 (the zero-filled bias likewise)."""
    torch.manual_seed(0)
    model = _float64_values(model_type().to(DTYPE))
    inputs, targets = _batch(outputs=3)
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = assert_exact_per_sample_grads(model, inputs, targets, squared_error)
        assert graph.edge_attr.dtype == DTYPE and graph.x.dtype == DTYPE
        names = list(graph.param_names)
        for name, param in model.named_parameters():
            own = graph.edge_param == names.index(name)
            if name.endswith("weight") or name == "w":
                expected = param.detach()[[4, 0, 5, 2]] if name == "w" else param.detach()
                assert torch.equal(graph.edge_attr[own, 0], expected.reshape(-1)), name
        unweighted = graph.edge_param < 0
        assert torch.equal(graph.edge_attr[unweighted, 0], torch.ones(int(unweighted.sum()), dtype=DTYPE))
        biases = torch.cat([param.detach()[[4, 0, 5, 2]] if name == "b" else param.detach()
                            for name, param in model.named_parameters() if name.endswith("bias") or name == "b"])
        assert torch.equal(torch.sort(graph.x[graph.x[:, 0] != 0, 0]).values, torch.sort(biases).values)


class MixedPrecision(nn.Module):
    """``tanh(l1(x.float()))`` then ``l2`` in float32, back to float64 and a float64 ``shift``: the
    weights are float32, the factors float64 (the inputs' dtype)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.randn(4, dtype=DTYPE))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.float()))).double() + self.shift


def test_float32_weights_of_a_float64_graph_are_cast_to_its_dtype():
    """A model computing part of its forward in float32 (its weights float32) and converted on
    float64 inputs: the edge values, read by one gather, are the float32 weights cast to float64,
    and the graph's per-sample gradients are the float32 forward's to float32 precision.

    Checked to fail on ``assemble`` 57, 58, 60, 62, 64 (the gathered values not cast: float32 edges,
    or ``None``)."""
    torch.manual_seed(0)
    model = MixedPrecision()
    inputs, targets = _batch(outputs=4)
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = gradgraph.to_graph(model, inputs, targets, squared_error)
        assert graph.edge_attr.dtype == DTYPE and graph.x.dtype == DTYPE and graph.act.dtype == DTYPE
        names = list(graph.param_names)
        for name in ("l1.weight", "l2.weight"):
            own = graph.edge_param == names.index(name)
            assert torch.equal(graph.edge_attr[own, 0], model.get_parameter(name).detach().double().reshape(-1))
        reference = reference_per_sample_grads(model, inputs, targets, squared_error)
        ours = graph.per_sample_grads()
        for name, value in reference.items():
            torch.testing.assert_close(ours[name].to(value.dtype), value, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------ _factor: rows no gradient reaches
class DeadMiddle(nn.Module):
    """``l3(h)`` with ``h = tanh(l1(x))``, and between them ``l2(h)``, computed and dropped: a
    tiling plan whose middle grad record no gradient reaches."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        self.l2(h)
        return self.l3(h)


def test_a_dropped_layer_between_two_used_ones_gets_zero_grad_rows_and_the_rest_is_exact():
    """The grad blocks tile the rows, and the middle one (``l2``'s output, dropped) gets no
    gradient: its rows are zero and the rows after it (``l3``'s output) keep their signal; ``l2``'s
    per-sample gradients are zero, the rest exact, on a fresh trace and on the replay.

    Checked to fail on ``_factor`` 27 (the tiling loop stopped at the record with no gradient:
    the rows after it lost)."""
    torch.manual_seed(0)
    model = DeadMiddle().to(DTYPE)
    inputs, targets = _batch()
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = assert_exact_per_sample_grads(model, inputs, targets, squared_error)
        assert graph.grad.shape == (12, 5)
        assert torch.equal(graph.grad[7:10], torch.zeros(3, 5, dtype=DTYPE))
        expected = 2 * (model(inputs) - targets).detach()
        torch.testing.assert_close(graph.grad[10:].T, expected, atol=1e-12, rtol=0)


class EmbeddedDeadMiddle(nn.Module):
    """``DeadMiddle`` over an embedding of token ids: the grad records start after the table's rows
    (the ids get no gradient), so they do not tile and ``grad`` is written record by record."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.l1, self.l2, self.l3 = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, ids):
        h = torch.tanh(self.l1(self.emb(ids)))
        self.l2(h)
        return self.l3(h)


@pytest.fixture
def uninitialized_memory_is_nan():
    """``torch.empty`` filled with NaN (deterministic mode's ``fill_uninitialized_memory``), so a row
    left unwritten shows instead of holding whatever the allocator gave."""
    import torch.utils.deterministic

    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_rows_of_a_block_no_gradient_reaches_are_zeroed_in_the_record_by_record_path(uninitialized_memory_is_nan):
    """The general path starts from ``torch.empty`` (NaN here) and zeroes only the rows no record
    writes; a block record no gradient reaches (``l2``'s output) must be zeroed too. Its rows are 0,
    the per-sample gradients exact, on a fresh trace and on the replay.

    Checked to fail on ``_factor`` 78, 80 (those rows not zeroed: NaN, refused as a non-finite
    signal), which survive without NaN-filled memory (``torch.empty`` often returns zeros)."""
    torch.manual_seed(0)
    model = EmbeddedDeadMiddle().to(DTYPE)
    ids = torch.tensor([0, 3, 1, 4, 2])
    targets = torch.randn(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = assert_exact_per_sample_grads(model, ids, targets, squared_error)
        assert graph.grad.shape == (18, 5)
        assert torch.equal(graph.grad[:5], torch.zeros(5, 5, dtype=DTYPE))  # the table's rows
        assert torch.equal(graph.grad[13:16], torch.zeros(3, 5, dtype=DTYPE))  # l2's output


def test_a_permuted_value_whose_memory_order_needs_too_many_strides_is_copied_row_major():
    """``_factor`` directly: a record of a 9-axis value held transposed (``permute`` of every axis):
    its row-major writes are one run (a pattern), but its elements' memory offsets nest nine deep,
    past ``_MAX_STRIDED_DIMS``, so no in-place pattern; the value is then read row-major. ``grad``
    is the value's elements in row-major order, one row per neuron.

    Checked to fail on ``_factor`` 110 (the missing in-place pattern unpacked)."""
    from types import SimpleNamespace

    from gradgraph.convert.assembly import _strided_records, _unwritten_rows
    from gradgraph.convert.plan import Record

    base = torch.arange(512, dtype=DTYPE).reshape((2,) * 9)
    value = base.permute(*range(8, -1, -1))  # not contiguous; row-major order is not memory order
    record = Record(("out", 0, 0), tuple(value.shape), None, torch.arange(512))  # [256 rows, B = 2]
    plan = SimpleNamespace(grad=[record], num_nodes=256, derived={
        ("tiles", "grad"): False, ("unwritten", "grad"): _unwritten_rows(256, [record]),
        ("strided", "grad"): _strided_records([record])})
    assert plan.derived[("strided", "grad")][0] is not None
    grad = _factor_of(plan, value)
    assert torch.equal(grad, value.reshape(256, 2))
    assert plan.derived[("strided in place", "grad", 0, value.stride())] is None


def _factor_of(plan, value):
    from gradgraph.convert.assembly import _factor

    with torch.no_grad():
        return _factor(plan, "grad", [value], 2, DTYPE, torch.device("cpu"))


class Float32Table(nn.Module):
    """A float32 embedding read by float64 layers: on token ids the factors take the first
    parameter's dtype (float32), and the layers' float64 weights tile the edges."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.l1, self.l2 = nn.Linear(4, 4).to(DTYPE), nn.Linear(4, 2).to(DTYPE)

    def forward(self, ids):
        return self.l2(torch.tanh(self.l1(self.emb(ids).to(DTYPE))))


def test_tiled_float64_weights_of_a_float32_graph_are_cast_to_its_dtype():
    """The edge values of a tiling plan (one ``cat`` of the weights) whose weights are float64 in
    a float32 graph: cast to float32, each weight's entries in order; per-sample gradients to
    float32 precision, on a fresh trace and on the replay.

    Checked to fail on ``assemble`` 18, 19, 21, 23, 25 (the concatenated weights not cast: float64
    edges beside float32 factors, or ``None``)."""
    torch.manual_seed(0)
    model = Float32Table()
    _float64_values(model.l1), _float64_values(model.l2, seed=4)
    ids = torch.tensor([0, 3, 1, 4, 2])
    targets = torch.randn(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    PLAN_CACHE.clear()
    for _ in range(2):
        graph = gradgraph.to_graph(model, ids, targets, squared_error)
        assert graph.act.dtype == torch.float32 and graph.edge_attr.dtype == torch.float32
        names = list(graph.param_names)
        for name in ("l1.weight", "l2.weight"):
            own = graph.edge_param == names.index(name)
            expected = model.get_parameter(name).detach().to(torch.float32).reshape(-1)
            assert torch.equal(graph.edge_attr[own, 0], expected), name
        reference = reference_per_sample_grads(model, ids, targets, squared_error)
        ours = graph.per_sample_grads()
        for name, value in reference.items():
            torch.testing.assert_close(ours[name].to(value.dtype), value, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------ _resolve: batch norm over positions
class NormedPositions(nn.Module):
    """``head(flatten(tanh(norm(mix(x)))))`` on ``[b, C, L]``: ``mix`` a 1x1 convolution (channels
    as neurons, positions as keys), an eval ``BatchNorm1d(C)`` normalizes per channel over them."""

    def __init__(self, channels=3, length=4):
        super().__init__()
        self.mix = nn.Conv1d(channels, channels, 1)
        self.norm = nn.BatchNorm1d(channels, eps=0.25).eval()
        self.head = nn.Linear(channels * length, 2)
        generator = torch.Generator().manual_seed(2)
        self.norm.running_mean.copy_(torch.randn(channels, generator=generator))
        self.norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.mix(x))).flatten(1))


def test_a_batch_norm_over_positions_recomputes_its_normalized_value_per_channel():
    """The eval batch norm's normalized value (what its scale multiplies) is recomputed from the
    recorded input with the running statistics broadcast per channel over the positions of a
    ``[b, C, L]`` value; the per-sample gradients exact, on a fresh trace and on the replay.

    Checked to fail on ``_resolve`` 80, 82 (the statistics' broadcast shape ``[-1, 2]`` or ``[-1]``
    for a 3-d value: an error, or the channels' statistics spread over the positions)."""
    torch.manual_seed(0)
    model = NormedPositions().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 2, dtype=DTYPE, generator=generator)
    PLAN_CACHE.clear()
    for _ in range(2):
        assert_exact_per_sample_grads(model, inputs, targets, squared_error)


# ------------------------------------------------------------ _tiles, _slots_tile: their docstrings written out
def test_tiles_only_for_blocks_that_write_the_rows_in_order_from_zero():
    """``_tiles``: blocks that start where the previous one ended, from row 0, up to ``N``; blocks
    out of order whose widths sum to ``N``, a gap, a short end or a non-block record do not tile.

    Checked to fail on ``_tiles`` 6 (``block[0] == row`` refused: out-of-order blocks taken as
    tiling)."""
    from gradgraph.convert.assembly import _tiles
    from gradgraph.convert.plan import Record

    def block(first, width):
        return Record(("input",), (5, width), None, None, (first, width))

    assert _tiles([block(0, 4), block(4, 2)], 6)
    assert not _tiles([block(4, 2), block(0, 4)], 6)
    assert not _tiles([block(0, 4), block(5, 2)], 7)
    assert not _tiles([block(0, 4)], 6)
    assert not _tiles([block(0, 4), Record(("out", 0, 0), (5, 2), None, torch.arange(10))], 6)


def test_slots_tile_only_with_slices_of_rows_and_of_entries_in_order():
    """``_slots_tile``: weight slots tile the edges when each writes the next slice of rows from a
    slice of entries; an index of rows or of entries (a gather, in whatever order) does not.

    Checked to fail on ``_slots_tile`` 4 (``and`` for the first ``or``: index entries taken as
    consecutive ones, index rows read as a slice)."""
    from gradgraph.convert.assembly import _slots_tile
    from gradgraph.convert.plan import SlotCopy

    assert _slots_tile([SlotCopy("a", slice(0, 2), slice(0, 2)), SlotCopy("b", slice(2, 5), slice(1, 4))], 5)
    assert not _slots_tile([SlotCopy("a", slice(0, 2), torch.tensor([1, 0]))], 2)
    assert not _slots_tile([SlotCopy("a", torch.tensor([0, 1]), slice(0, 2))], 2)
    assert not _slots_tile([SlotCopy("a", slice(1, 3), slice(0, 2))], 3)
