"""Whole groups of a grouped or depthwise convolution move together (``layout._parallel_blocks``).

A grouped convolution computes every group alike, so exchanging whole groups — a group's input channels,
its kernels and its output channels with another group's — keeps the function. The layout claims it as
one permutation group whose blocks are the groups (each block: the input channels' class as tie 0, the
output channels' as tie 1), only where it is proven on the graph and no per-group code follows the op.
Each claim here is checked against the model itself: a sampled group element keeps the function exactly
(float64) and maps the graph to the permuted model's graph (``assert_group_keeps_function``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import squared
from traced_models import assert_group_keeps_function

import gradgraph

DTYPE = torch.float64


class DepthwiseSeparable(nn.Module):
    """MobileNet's block: a 1x1 expansion, a depthwise 3x3, a 1x1 projection (``kernel`` of the depthwise one)."""

    def __init__(self, kernel: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, kernel, groups=channels, padding=kernel // 2)
        self.project = nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        h = torch.relu(self.expand(x))
        return self.project(torch.relu(self.depthwise(h))).mean((2, 3))


class ConvNeXtBlock(nn.Module):
    """A depthwise 7x7 on the residual stream, a LayerNorm over the channels (channels last), an MLP."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 2, stride=2)
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up, self.down = nn.Linear(channels, 3 * channels), nn.Linear(3 * channels, channels)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        h = self.stem(x)
        y = self.norm(self.depthwise(h).permute(0, 2, 3, 1))
        y = self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.head((h + y).mean((2, 3)))


class Grouped(nn.Module):
    """A grouped convolution: ``groups`` groups of ``per_group`` input, ``multiplier * per_group`` output channels."""

    def __init__(self, groups: int = 2, per_group: int = 2, multiplier: int = 1) -> None:
        super().__init__()
        channels = groups * per_group
        self.a = nn.Conv1d(2, channels, 1)
        self.grouped = nn.Conv1d(channels, multiplier * channels, 3, groups=groups, padding=1)
        self.o = nn.Linear(multiplier * channels, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.grouped(torch.tanh(self.a(x)))).mean(-1))


def _claims_blocks(model: nn.Module, inputs: torch.Tensor, seeds: int = 4) -> tuple[int, int]:
    """``(blocks of the largest group, nodes moved by the first sample)``; every sample keeps the function."""
    torch.manual_seed(0)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    moved = [assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(seeds)]
    return int(graph.perm_block.max()) + 1, moved[0]


@pytest.mark.parametrize("kernel", [3, 1])
def test_a_depthwise_convolution_moves_its_channels_as_whole_groups(kernel):
    """Before, a depthwise convolution fixed every channel it read and wrote (each channel a group of one):
    MobileNet's expanded channels had no symmetry left. Now its 4 channels are 4 blocks of one group."""
    torch.manual_seed(1)
    model = DepthwiseSeparable(kernel).to(DTYPE)
    blocks, moved = _claims_blocks(model, torch.randn(3, 3, 6, 6, dtype=DTYPE))
    assert blocks == 4
    assert moved > 0


def test_a_convnext_block_moves_its_residual_channels_through_the_depthwise_convolution():
    torch.manual_seed(2)
    model = ConvNeXtBlock().to(DTYPE)
    blocks, moved = _claims_blocks(model, torch.randn(3, 3, 8, 8, dtype=DTYPE))
    assert blocks == 4
    assert moved > 0


@pytest.mark.parametrize(("groups", "per_group", "multiplier"), [(2, 2, 1), (3, 2, 2), (2, 1, 3)])
def test_grouped_convolutions_move_whole_groups_and_channels_within_them(groups, per_group, multiplier):
    torch.manual_seed(3)
    model = Grouped(groups, per_group, multiplier).to(DTYPE)
    blocks, _ = _claims_blocks(model, torch.randn(4, 2, 5, dtype=DTYPE))
    assert blocks == groups


class PerGroupCode(nn.Module):
    """A grouped convolution whose groups are then treated differently (``mode``): not alike any more."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.c = nn.Conv2d(4, 2, 1)
        self.mode = mode

    def forward(self, x):
        y = self.grouped(torch.relu(self.a(x)))
        if self.mode == "scale":
            y = torch.cat([y[:, :2] * 2.0, y[:, 2:] * 3.0], 1)
        elif self.mode == "activation":
            y = torch.cat([torch.relu(y[:, :2]), torch.tanh(y[:, 2:])], 1)
        elif self.mode == "shuffle":  # ShuffleNet's channel shuffle: 2 x 2 channels transposed
            b, channels, height, width = y.shape
            y = y.view(b, 2, 2, height, width).transpose(1, 2).reshape(b, channels, height, width)
        return self.c(torch.relu(y)).mean((2, 3))


class ByHand(nn.Module):
    """The groups of a grouped map written by hand, one ``F.linear`` per group on slices of one weight, each
    group's output scaled by another constant: slices of one parameter that share no entry, but not one op."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(3, 4), nn.Linear(4, 2)
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        h = torch.relu(self.a(x))
        first = F.linear(h[:, :2], self.weight[:2]) * 2.0
        second = F.linear(h[:, 2:], self.weight[2:]) * 3.0
        return self.c(torch.relu(torch.cat([first, second], 1)))


@pytest.mark.parametrize("mode", ["scale", "activation"])
def test_groups_treated_differently_after_the_op_are_not_claimed_alike(mode):
    """``y[:, :2] * 2`` and ``y[:, 2:] * 3`` after a depthwise convolution: the graph does not show the
    constants, so the exchange of groups 0 and 2 would change the function (it did in a first version,
    caught by this test's samples); the op's groups are no longer claimed alike once a value holds some
    of them only (``Tracer.note_group_parts``)."""
    torch.manual_seed(4)
    model = PerGroupCode(mode).to(DTYPE)
    blocks, _ = _claims_blocks(model, torch.randn(3, 3, 6, 6, dtype=DTYPE), seeds=6)
    assert blocks == 1


class PerGroupCodeBefore(nn.Module):
    """The channels a depthwise convolution reads treated differently before it (``mode`` on halves)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.mode = mode

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.mode == "scale":
            h = torch.cat([h[:, :2] * 2.0, h[:, 2:] * 3.0], 1)
        else:
            h = torch.cat([torch.relu(h[:, :2]), torch.tanh(h[:, 2:])], 1)
        return self.c(torch.relu(self.grouped(h))).mean((2, 3))


@pytest.mark.parametrize("mode", ["scale", "activation"])
def test_groups_whose_input_channels_were_treated_differently_are_not_claimed_alike(mode):
    """``cat([h[:, :2] * 2, h[:, 2:] * 3])`` feeding a depthwise convolution: exchanging its groups 0 and 2 changes
    the function (a second version claimed it; 4 of 6 samples changed the output), and the graph shows neither
    constant. A set read or changed in part by an op outside a grouped op (``NeuronSet.read_in_part``) makes no
    blocks."""
    torch.manual_seed(8)
    blocks, _ = _claims_blocks(PerGroupCodeBefore(mode).to(DTYPE), torch.randn(3, 3, 6, 6, dtype=DTYPE), seeds=6)
    assert blocks == 1


def test_a_channel_shuffle_after_a_depthwise_convolution_keeps_the_whole_group_moves():
    """ShuffleNet's shuffle reorders all channels at once (a value holding every group), and the 1x1
    convolution after it reads every channel: exchanging whole groups still keeps the function."""
    torch.manual_seed(4)
    model = PerGroupCode("shuffle").to(DTYPE)
    blocks, moved = _claims_blocks(model, torch.randn(3, 3, 6, 6, dtype=DTYPE), seeds=6)
    assert blocks == 4
    assert moved > 0


def test_groups_written_by_hand_are_not_claimed_alike():
    """Only the groups of one grouped op (``TraceResult.grouped``) are alike by construction."""
    torch.manual_seed(5)
    blocks, _ = _claims_blocks(ByHand().to(DTYPE), torch.randn(5, 3, dtype=DTYPE), seeds=6)
    assert blocks == 1


def test_a_grouped_convolution_whose_groups_read_different_constants_is_not_claimed():
    """A constant per channel after the op (a batch norm of fixed statistics, written with F.batch_norm):
    the channels are pinned, and no group moves."""

    class FixedStatistics(PerGroupCode):
        def forward(self, x):
            y = self.grouped(torch.relu(self.a(x)))
            mean = torch.arange(4, dtype=y.dtype)
            y = F.batch_norm(y, mean, mean + 1, training=False)
            return self.c(torch.relu(y)).mean((2, 3))

    torch.manual_seed(6)
    model = FixedStatistics("none").to(DTYPE)
    graph = gradgraph.to_graph(model, torch.randn(3, 3, 6, 6, dtype=DTYPE), None, squared)
    assert int(graph.perm_block.max()) <= 0
    assert_group_keeps_function(model, torch.randn(3, 3, 6, 6, dtype=DTYPE), None, squared)


class AfterOtherSharedParameters(nn.Module):
    """A side branch first: one ``Linear`` applied twice (a parameter at two sites that share its entries) and a
    map written as two halves of one weight (two sites, disjoint entries, no grouped op). Neither makes
    blocks; the depthwise convolution after them still does."""

    def __init__(self) -> None:
        super().__init__()
        self.side, self.halves = nn.Linear(3, 3), nn.Parameter(torch.randn(4, 3))
        self.stem = nn.Conv2d(3, 4, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.project, self.side_head = nn.Conv2d(4, 2, 1), nn.Linear(4, 2)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        side = torch.tanh(self.side(torch.tanh(self.side(pooled))))
        side = torch.cat([F.linear(side, self.halves[:2]), F.linear(side, self.halves[2:])], 1)
        h = torch.relu(self.stem(x))
        return self.project(torch.relu(self.depthwise(h))).mean((2, 3)) + self.side_head(torch.tanh(side))


def test_blocks_are_found_after_parameters_that_make_none():
    """Kills ``x_parallel_blocks`` 27 and 34 (the scan of the parameters stopped at the first one that makes no
    blocks: its entries shared, or its sites no grouped op's), checked with ``MUTANT_UNDER_TEST``."""
    torch.manual_seed(7)
    blocks, moved = _claims_blocks(AfterOtherSharedParameters().to(DTYPE), torch.randn(3, 3, 6, 6, dtype=DTYPE))
    assert blocks == 4
    assert moved > 0


class TwoStages(nn.Module):
    """Two depthwise stages: the first reads a stem written as two halves of one weight (two ops, so its groups'
    input sets come from different ops and make no blocks), the second a pointwise convolution's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.first, self.second = (nn.Conv2d(4, 4, 3, groups=4, padding=1) for _ in range(2))
        self.pointwise, self.project = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(torch.cat([F.conv2d(x, self.stem[:2]), F.conv2d(x, self.stem[2:])], 1))
        h = torch.relu(self.pointwise(torch.relu(self.first(h))))
        return self.project(torch.relu(self.second(h))).mean((2, 3))


def test_a_grouped_op_that_makes_no_blocks_does_not_stop_the_next_one():
    """The first depthwise convolution's groups are not claimed (their input sets come from two ops), the
    second's are: a group turned down by the check of its sets' ops does not end the search (``continue``, not
    ``break``; checked by hand on the code, not yet through mutmut)."""
    torch.manual_seed(9)
    model = TwoStages().to(DTYPE)
    inputs = torch.randn(3, 3, 6, 6, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    blocked = torch.unique(graph.perm_group[graph.perm_block > 0])
    assert len(blocked) == 1  # one group with blocks: the second stage's
    assert_group_keeps_function(model, inputs, None, squared)


class GroupedThenDepthwise(nn.Module):
    """A grouped convolution (2 groups, 2 -> 4 channels each), then a depthwise one over its 8 channels: the
    depthwise groups are alike in the op, but the grouped convolution before ties them in fours, so not every
    exchange of them keeps the function (channel 3 to channel 4 crosses its groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.project = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.a(x))))
        return self.project(torch.relu(self.depthwise(h))).mean((2, 3))


def test_a_depthwise_convolution_after_a_grouped_one_claims_only_what_keeps_the_function():
    """The depthwise groups are alike in their op, but the grouped convolution before ties them in fours: no
    exchange of whole groups is claimed, and what is claimed keeps the function (six samples)."""
    torch.manual_seed(10)
    blocks, _ = _claims_blocks(GroupedThenDepthwise().to(DTYPE), torch.randn(3, 3, 6, 6, dtype=DTYPE), seeds=6)
    assert blocks == 1
