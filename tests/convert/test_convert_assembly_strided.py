"""The assembly's strided-copy fast path (``convert/assembly.py``: ``_strided_pattern``,
``_run_length``, ``_one_to_one``, ``_pattern_in_place``) against its ground truth, the scatter it
replaces (``out[target] = value[source]``), and the duplicates a brute-force ``unique`` finds.

Written for the mutation run of ``assembly.py`` (docs/mutation.md, convert/): the convert tests
in its list reach these functions only through patterns they never miss, so a mutant that
gives up a pattern (the scatter path then writes the same values) or builds a wrong one for
an index they do not make survived. Each test names the mutants it was checked to kill with
``MUTANT_UNDER_TEST``.
"""

from __future__ import annotations

import itertools

import pytest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradgraph.convert.assembly import _one_to_one, _pattern_in_place, _run_length, _strided_pattern
from gradgraph.convert.plan import Record


def _nested(sizes, strides, offset):
    """``[prod(sizes)]`` flat offsets ``offset + sum_d i_d * strides[d]`` of the row-major
    nested index ``sizes`` (the brute-force reference, by itertools)."""
    return torch.tensor([offset + sum(i * s for i, s in zip(index, strides))
                         for index in itertools.product(*(range(size) for size in sizes))], dtype=torch.long)


def _copy_equals_scatter(pattern, source, target):
    """The strided copy ``pattern`` describes writes what the scatter ``out[target] = value[source]`` writes."""
    value = torch.arange(1, int(source.max()) + 2, dtype=torch.float64) * 1.5
    length = int(target.max()) + 1
    scattered = torch.zeros(length, dtype=torch.float64)
    scattered[target] = value[source]
    source_offset, target_offset, sizes, source_strides, target_strides = pattern
    copied = torch.zeros(length, dtype=torch.float64)
    copied.as_strided(sizes, target_strides, target_offset).copy_(value.as_strided(sizes, source_strides, source_offset))
    return torch.equal(copied, scattered)


nested_index = st.integers(1, 4).flatmap(lambda dims: st.tuples(
    st.lists(st.integers(1, 4), min_size=dims, max_size=dims),
    st.lists(st.integers(0, 12), min_size=dims, max_size=dims),
    st.lists(st.integers(0, 12), min_size=dims, max_size=dims),
    st.integers(0, 5), st.integers(0, 5)))


@settings(max_examples=300, deadline=None)
@given(nested_index)
def test_a_nested_strided_index_is_found_exactly_when_it_writes_each_element_once(case):
    """For any nested index with non-negative strides on both sides, a pattern is returned
    exactly when the target writes no element twice (brute force: ``unique``), and the copy it
    describes writes what the scatter writes.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``_strided_pattern`` 1-5, 9, 11, 12, 14, 21, 24,
    28, 29, 31, 32, 34, 38, 40, 43-51, 54, 56, 59, 60, 70-77, 80, 81, 85, 93-95, 97-99 (docs/mutation.md
    lists any it does not)."""
    sizes, source_strides, target_strides, source_offset, target_offset = case
    source = _nested(sizes, source_strides, source_offset)
    target = _nested(sizes, target_strides, target_offset)
    pattern = _strided_pattern(source, target)
    writes_once = torch.unique(target).numel() == target.numel()
    assert (pattern is not None) == writes_once, (sizes, source_strides, target_strides, pattern)
    if pattern is not None:
        assert _copy_equals_scatter(pattern, source, target)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40), st.lists(st.integers(0, 30), min_size=1, max_size=40))
def test_any_index_pair_gets_a_pattern_only_if_the_copy_is_the_scatter(source, target):
    """Arbitrary index lists (most are no pattern, some are runs by chance): a pattern, when
    returned, reproduces the scatter; lists of different lengths never get one."""
    source, target = torch.tensor(source), torch.tensor(target)
    pattern = _strided_pattern(source, target)
    if source.numel() != target.numel() or torch.unique(target).numel() != target.numel():
        assert pattern is None
    elif pattern is not None:
        assert _copy_equals_scatter(pattern, source, target)


def test_steps_going_backwards_or_past_the_dimension_limit_stay_a_scatter():
    """A reversed index (a negative step: ``as_strided`` takes none) and a nine-deep nesting
    (past ``_MAX_STRIDED_DIMS`` = 8) get no pattern; eight deep does."""
    assert _strided_pattern(torch.arange(6), torch.arange(6).flip(0)) is None
    assert _strided_pattern(torch.arange(6).flip(0), torch.arange(6)) is None
    eight = _nested([2] * 8, [3 ** d for d in range(8)][::-1], 0)
    assert _strided_pattern(torch.arange(256), eight) is not None
    nine = _nested([2] * 9, [3 ** d for d in range(9)][::-1], 0)
    assert _strided_pattern(torch.arange(512), nine) is None
    assert _strided_pattern(torch.arange(0), torch.arange(0)) is None
    one = _strided_pattern(torch.tensor([4]), torch.tensor([7]))
    assert one == (4, 7, (1,), (0,), (0,))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6000), st.integers(-3, 3), st.integers(-5, 5), st.data())
def test_the_run_length_is_the_longest_equal_step_prefix(length, step, start, data):
    """``_run_length`` against a Python scan, for runs shorter and longer than its first
    prefix (256) and its second (4096), broken at a drawn place or not at all.

    Checked to fail on ``_run_length`` 10, 12, 16, 20, 21 (2, 22, 25 change only how far it
    looks per pass: equivalent in value, docs/mutation.md)."""
    values = start + step * torch.arange(length)
    broken_at = data.draw(st.integers(1, length))  # values[broken_at:] shifted: the run ends there
    if broken_at < length:
        values[broken_at:] += data.draw(st.sampled_from([-7, -1, 1, 5]))
    steps = (values[1:] - values[:-1]).tolist()
    expected = 1 + next((i for i, d in enumerate(steps) if d != steps[0]), len(steps))
    assert _run_length(values) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 20)), min_size=1, max_size=4))
def test_one_to_one_is_a_sufficient_test_that_holds_for_nested_strides(dims):
    """``_one_to_one`` never says one-to-one where the brute-force offsets repeat; and it says
    so for strides that nest (each, by increasing stride, past the reach of those below it),
    whatever the order of the dimensions and their size-1 dimensions.

    Checked to fail on ``_one_to_one`` 2, 4, 6, 12, 18-23."""
    sizes, strides = [size for size, _ in dims], [stride for _, stride in dims]
    offsets = _nested(sizes, strides, 0)
    if _one_to_one(sizes, strides):
        assert torch.unique(offsets).numel() == offsets.numel()
    reach, nests = 0, True
    for size, stride in sorted((pair for pair in dims if pair[0] > 1), key=lambda pair: pair[1]):
        nests = nests and stride > reach
        reach += stride * (size - 1)
    if nests:
        assert _one_to_one(sizes, strides)


def test_one_to_one_in_the_cases_worked_by_hand():
    assert _one_to_one([3, 2], [2, 1]) and _one_to_one([2, 3], [1, 2])  # rows of 2 / 3 side by side
    assert not _one_to_one([2, 3], [2, 1])  # 0 1 2 / 2 3 4: element 2 twice
    assert _one_to_one([4, 1, 1], [1, 0, 0]) and _one_to_one([1, 5], [7, 1])  # size-1 axes read nothing
    assert not _one_to_one([2, 2], [0, 1]) and not _one_to_one([3], [0])
    assert _one_to_one([2, 2, 2], [4, 2, 1]) and not _one_to_one([2, 2, 2], [3, 2, 1])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 3), st.booleans())
def test_a_record_read_in_place_from_a_permuted_value_copies_what_its_scatter_writes(b, t, d, first, masked):
    """A record of a ``[b, t, d]`` value held in memory as a permuted (non-contiguous) tensor:
    ``_pattern_in_place`` with the value's strides gives a copy from its memory that writes
    what ``out[linear] = value.reshape(-1)[keep]`` writes; with a keep mask over the last
    feature, the same for the kept elements; a record whose mask keeps another count, none.

    Checked to fail on ``_pattern_in_place`` 15, 16, 26, 28, 34 (3, 5: the offsets float,
    29: a count mismatch passed on, which ``_strided_pattern`` refuses — equivalent, below)."""
    value = torch.arange(1.0, b * t * d + 1, dtype=torch.float64).reshape(d, t, b).permute(2, 1, 0)
    keep = None
    count = b * t * d
    if masked and d > 1:
        keep = torch.ones(b, t, d, dtype=torch.bool)
        keep[..., -1] = False
        keep = keep.reshape(-1)
        count = int(keep.sum())
    # the kept elements, row-major over [b, t, d], go to rows first .. of a [N, b * t] factor, column (i, j)
    rows = torch.arange(d)[None, None, :].expand(b, t, d) + first
    columns = torch.arange(b * t).reshape(b, t, 1).expand(b, t, d)
    linear = (rows * (b * t) + columns).reshape(-1)
    linear = linear if keep is None else linear[keep]
    record = Record(("out", 0, 0), (b, t, d), keep, linear)
    pattern = _pattern_in_place(record, value.stride())
    assert pattern is not None
    expected = torch.zeros((first + d) * b * t, dtype=torch.float64)
    expected[linear] = value.reshape(-1) if keep is None else value.reshape(-1)[keep]
    source_offset, target_offset, sizes, source_strides, target_strides = pattern
    got = torch.zeros_like(expected)
    got.as_strided(sizes, target_strides, target_offset).copy_(
        value.as_strided(sizes, source_strides, value.storage_offset() + source_offset))
    assert torch.equal(got, expected)
    assert count == linear.numel()
    short = Record(("out", 0, 0), (b, t, d), keep, linear[:-1]) if linear.numel() > 1 else None
    if short is not None:
        assert _pattern_in_place(short, value.stride()) is None


def test_each_record_gets_its_strided_copy_or_none():
    """``_strided_records``: a block record none (it is one copy already), a record whose kept
    elements (every other one) go to evenly spaced places a pattern, checked against its
    scatter, one without a mask a pattern, one whose places are shuffled none.

    Checked to fail on ``_strided_records`` 3, 4, 10, 14 (the pattern not looked for, or
    looked for over every element where a mask keeps some: a scatter instead, the same values;
    2 is equivalent: a record has a ``block`` exactly when it has no ``linear``)."""
    from gradgraph.convert.assembly import _strided_records

    keep = torch.arange(12) % 2 == 0
    masked = Record(("out", 1, 0), (3, 4), keep, torch.arange(6) * 3 + 1)
    whole = Record(("out", 2, 0), (2, 3), None, torch.tensor([0, 2, 4, 10, 12, 14]))
    shuffled = Record(("out", 3, 0), (2, 2), None, torch.tensor([3, 0, 2, 1]))
    block = Record(("input",), (5, 4), None, None, (0, 4))
    patterns = _strided_records([block, masked, whole, shuffled])
    assert patterns[0] is None and patterns[3] is None
    assert patterns[1] is not None and patterns[2] is not None
    assert _copy_equals_scatter(patterns[1], torch.nonzero(keep).flatten(), masked.linear)
    assert _copy_equals_scatter(patterns[2], torch.arange(6), whole.linear)


# ------------------------------------------------------------ slots of a parameter, end to end
DTYPE = torch.float64


def _squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


class PickedRows(torch.nn.Module):
    """``l2(tanh(linear(x, w[pick], b[pick])))``: a layer of ``pick``'s rows of a 12-row ``w`` / ``b``."""

    def __init__(self, pick):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.randn(12, 4)), torch.nn.Parameter(torch.randn(12))
        self.l2, self.pick = torch.nn.Linear(6, 3), pick

    def forward(self, x):
        return self.l2(torch.tanh(torch.nn.functional.linear(x, self.w[self.pick], self.b[self.pick])))


@pytest.mark.parametrize("pick", [slice(0, 12, 2), slice(1, 12, 2), [0, 3, 1, 7, 9, 11]],
                         ids=["even-rows", "odd-rows", "listed-rows"])
def test_a_layer_of_strided_or_listed_rows_of_a_parameter_carries_those_entries(pick):
    """Edges and biases of a layer made of every other row (a strided slice: slots with a step)
    or of listed rows (index slots) of a parameter carry exactly those entries; per-sample
    gradients exact, on a fresh trace and on the cached plan's replay.

    Checked to fail (``MUTANT_UNDER_TEST``) on ``_bias_pieces`` 3 (its places' step not
    checked: a strided slot's entries read as consecutive ones)."""
    from traced_models import assert_exact_per_sample_grads

    torch.manual_seed(0)
    model = PickedRows(pick).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    for _ in range(2):
        graph = assert_exact_per_sample_grads(model, inputs, targets, _squared_error)
        own = graph.edge_param == graph.param_names.index("w")
        assert torch.equal(graph.edge_attr[own, 0], model.w.detach()[pick].reshape(-1))
        assert torch.equal(graph.x[4:10, 0], model.b.detach()[pick])


class OneLayerResidual(torch.nn.Module):
    """``x + l1(x)``: one weight (one slot) and the residual edges, which no parameter writes."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + self.l1(x)


def test_edges_no_parameter_writes_carry_one_beside_a_single_weight_slot():
    """A plan whose one weight slot does not tile the edges (the residual's edges have no
    parameter) writes that slot's entries and 1 on every other edge.

    Checked to fail on ``_assembly_recipe`` 72, 75, 77, 80-82, 84, 86, 87 (the slot-by-slot
    branch: the edges without a parameter not found, or not set to 1)."""
    from traced_models import assert_exact_per_sample_grads

    torch.manual_seed(0)
    model = OneLayerResidual().to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    for _ in range(2):
        graph = assert_exact_per_sample_grads(model, inputs, targets, _squared_error)
        own = graph.edge_param == graph.param_names.index("l1.weight")
        assert int(own.sum()) == 16 and int((~own).sum()) > 0
        assert torch.equal(graph.edge_attr[own, 0], model.l1.weight.detach().reshape(-1))
        assert torch.equal(graph.edge_attr[~own, 0], torch.ones(int((~own).sum()), dtype=DTYPE))



class Normed(torch.nn.Module):
    """``l2(tanh(norm(l1(x))))`` with a norm whose scale and shift are parameters."""

    def __init__(self, norm):
        super().__init__()
        self.l1, self.l2, self.norm = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), norm

    def forward(self, x):
        return self.l2(torch.tanh(self.norm(self.l1(x))))


def _batch_norm():
    """``BatchNorm1d`` in eval mode with running statistics of its own (not 0 / 1) and eps 0.25."""
    norm = torch.nn.BatchNorm1d(6, eps=0.25).eval()
    generator = torch.Generator().manual_seed(2)
    norm.running_mean.copy_(torch.randn(6, generator=generator))
    norm.running_var.copy_(torch.rand(6, generator=generator) + 0.5)
    return norm


@pytest.mark.parametrize("norm", [
    lambda: torch.nn.RMSNorm(6, eps=0.25), lambda: torch.nn.RMSNorm(6),
    lambda: torch.nn.GroupNorm(2, 6, eps=0.25), lambda: torch.nn.LayerNorm(6, eps=0.25), _batch_norm,
], ids=["rms-eps", "rms-default-eps", "group", "layer", "batch-eval"])
def test_a_norms_normalized_value_is_recomputed_with_its_own_eps(norm):
    """The normalized value a norm's scale multiplies is recomputed from the recorded input
    (``_resolve``'s recipes): with a large ``eps`` (0.25) a wrong or missing ``eps`` changes
    every per-sample gradient of the scale; each exact, on a fresh trace and on the replay.

    Checked to fail on ``_resolve`` 44, 48, 51 (RMSNorm's ``eps`` ignored, read from the wrong
    place, subtracted), 61, 63-71 (GroupNorm's recipe not recognised, or run on ``None``) and
    the batch-norm recipe's (docs/mutation.md lists which of 72-91 it kills)."""
    from traced_models import assert_exact_per_sample_grads

    torch.manual_seed(0)
    model = Normed(norm()).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 4, dtype=DTYPE, generator=generator)
    targets = torch.randn(5, 3, dtype=DTYPE, generator=generator)
    for _ in range(2):
        assert_exact_per_sample_grads(model, inputs, targets, _squared_error)
