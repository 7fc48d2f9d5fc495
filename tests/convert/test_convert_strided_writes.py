"""A record's scatter into ``act`` / ``grad`` written as one strided copy (``assembly._strided_pattern``).

The pattern must describe exactly the same writes as the scatter it replaces, or be ``None``:
checked against the scatter itself on random index lists (which are rarely patterns) and on
nested strided ones (which always are), and end to end on a ResNet, whose tap records are
patterns, against the same conversion with every record left a scatter.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradgraph
from gradgraph.convert import assembly
from strategies import assert_same_graph


def scatter(source, target, values, size):
    out = torch.zeros(size, dtype=values.dtype)
    out[target] = values[source]
    return out


def strided(pattern, values, size):
    source_offset, target_offset, sizes, source_strides, target_strides = pattern
    out = torch.zeros(size, dtype=values.dtype)
    out.as_strided(sizes, target_strides, target_offset).copy_(values.as_strided(sizes, source_strides, source_offset))
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_pattern_writes_what_the_scatter_writes(data):
    count = data.draw(st.integers(1, 12))
    source = torch.tensor(data.draw(st.lists(st.integers(0, 15), min_size=count, max_size=count)))
    target = torch.tensor(data.draw(st.lists(st.integers(0, 30), min_size=count, max_size=count)))
    pattern = assembly._strided_pattern(source, target)
    if pattern is None:
        return
    values = torch.randn(16, dtype=torch.float64)
    assert torch.equal(strided(pattern, values, 31), scatter(source, target, values, 31))
    assert torch.unique(target).numel() == count  # a pattern never writes an element twice


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_nested_strided_writes_are_found(data):
    dims = data.draw(st.integers(1, 4))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims))
    # target strides of a row-major box inside a bigger one: never two writes to one element
    outer = [size + data.draw(st.integers(0, 2)) for size in sizes]
    target_strides = [1] * dims
    for dim in range(dims - 2, -1, -1):
        target_strides[dim] = target_strides[dim + 1] * outer[dim + 1]
    source_strides = [data.draw(st.integers(0, 5)) for _ in range(dims)]
    source_offset, target_offset = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    grid = torch.meshgrid(*[torch.arange(size) for size in sizes], indexing="ij")
    source = (source_offset + sum(index * stride for index, stride in zip(grid, source_strides))).reshape(-1)
    target = (target_offset + sum(index * stride for index, stride in zip(grid, target_strides))).reshape(-1)
    pattern = assembly._strided_pattern(source, target)
    assert pattern is not None
    values = torch.randn(int(source.max()) + 1, dtype=torch.float64)
    size = int(target.max()) + 1
    assert torch.equal(strided(pattern, values, size), scatter(source, target, values, size))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 6)), min_size=1, max_size=4))
def test_one_to_one_is_never_wrong(dims):
    """``_one_to_one`` may say False for an injective index, never True for one that repeats."""
    sizes, strides = [size for size, _ in dims], [stride for _, stride in dims]
    grid = torch.meshgrid(*[torch.arange(size) for size in sizes], indexing="ij")
    offsets = sum(index * stride for index, stride in zip(grid, strides)).reshape(-1)
    if assembly._one_to_one(sizes, strides):
        assert torch.unique(offsets).numel() == offsets.numel()


def test_repeated_or_irregular_writes_stay_scatters():
    assert assembly._strided_pattern(torch.arange(4), torch.tensor([0, 1, 1, 2])) is None  # element 1 twice
    assert assembly._strided_pattern(torch.arange(4), torch.tensor([0, 1, 2, 4])) is None
    assert assembly._strided_pattern(torch.arange(4), torch.tensor([3, 2, 1, 0])) is None  # negative stride
    assert assembly._strided_pattern(torch.tensor([0, 2, 4]), torch.tensor([5, 6, 7])) == (0, 5, (3,), (2,), (1,))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv, self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        return self.fc(F.relu(self.conv(h) + self.down(h)).mean((2, 3)))


class Grouped(nn.Module):
    """A depthwise and a grouped convolution: their per-group parts read slices of a feature map
    (a value whose flat view steps by more than 1 element)."""

    def __init__(self):
        super().__init__()
        self.stem, self.depthwise = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same", groups=4)
        self.grouped, self.fc = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.depthwise(F.relu(self.stem(x))))
        return self.fc(F.relu(self.grouped(h)).mean((2, 3)))


@pytest.mark.parametrize("make", [SmallResNet, Grouped])
def test_a_cnn_graph_is_the_same_with_strided_writes(monkeypatch, make):
    torch.manual_seed(0)
    model = make().to(torch.float64).eval()
    x, y = torch.randn(3, 3, 7, 7, dtype=torch.float64), torch.randint(0, 3, (3,))
    loss = lambda output, targets: F.cross_entropy(output, targets, reduction="none")  # noqa: E731
    gradgraph.convert.clear_structure_cache()
    first = gradgraph.to_graph(model, x, y, loss)
    cached = gradgraph.to_graph(model, x, y, loss)
    plan = next(iter(gradgraph.convert.plan.PLAN_CACHE._entries.values()))
    # the tap records (every k-th element of the unfolded windows) are written as strided copies
    patterns = plan.derived[("strided", "act")]
    scattered = [record for record, pattern in zip(plan.act, patterns)
                 if record.block is None and pattern is None and record.linear.numel()]  # (empty: no writes)
    assert sum(pattern is not None for pattern in patterns) >= 9 and not scattered
    monkeypatch.setattr(assembly, "_strided_records", lambda records: [None] * len(records))
    gradgraph.convert.clear_structure_cache()
    reference = gradgraph.to_graph(model, x, y, loss)
    for graph in (first, cached):
        assert_same_graph(graph, reference, atol=0)
        assert torch.equal(graph.act, reference.act) and torch.equal(graph.grad, reference.grad)
