"""The names of the neuron sets a convolutional network's graph is made of.

A set's origin (the module path, or the op where the forward has no module) is what a refusal names to the
user: "the activation of the 'block.conv_b tap 3' output neurons is not finite". The plan keeps them as
``set_names`` (``make_plan(trace)``); the tests write out every set of a small CNN in order, inside modules and
with the same ops at the model's root, and check the graph exact against a per-datapoint autograd loop (float64,
1e-10).

Written for the survivors of the mutation runs of ``convert/trace/rules_conv.py`` (docs/mutation.md, "Not
equivalent and not killed": names in messages only); each test names the mutants it kills, as a fresh
``.mutation/convert-conv/`` numbers them, each checked with ``MUTANT_UNDER_TEST``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from convert_values import squared
from torch import nn
from traced_models import assert_matches_autograd_loop

import gradgraph
from gradgraph.errors import UnsupportedModuleError
from gradgraph.convert.layout import make_plan
from gradgraph.convert.trace import trace_model

DTYPE = torch.float64


def origins(model, inputs) -> list[str]:
    """Every neuron set's origin, in the graph's node order."""
    return [origin for _, _, origin in make_plan(trace_model(model, inputs, model)).set_names]


def assert_exact_by_loop(model, inputs):
    """Converted afresh, per-sample gradients equal to one backward pass per datapoint (1e-10)."""
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, inputs, None, squared)


class Block(nn.Module):
    """``conv1``, then ``conv_a(h) + conv_b(relu(h))`` (``conv_a`` makes ``h`` the act of ``conv1``'s channels,
    so ``conv_b``'s read of ``relu(h)`` takes a set of its own), a group norm, a max pooling, a pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_a, self.conv_b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.norm, self.pool, self.shuffle = nn.GroupNorm(2, 4), nn.MaxPool2d(2), nn.PixelShuffle(2)

    def forward(self, x):
        h = self.conv1(x)
        h = self.conv_a(h) + self.conv_b(torch.relu(h))
        return self.shuffle(self.pool(torch.relu(self.norm(h))))


class TwoHeads(nn.Module):
    """The block's map flattened into ``head`` and, through a tanh, ``head2``."""

    def __init__(self):
        super().__init__()
        self.block, self.head, self.head2 = Block(), nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        features = self.block(x).flatten(1)
        return self.head(features) + self.head2(torch.tanh(features))


def taps(prefix: str) -> list[str]:
    return [f"{prefix} tap {tap}" for tap in range(9)]


def positions(prefix: str) -> list[str]:
    return [f"{prefix} position {position}" for position in range(16)]


def test_the_sets_of_a_cnn_are_named_by_their_modules():
    """Kills ``spatial_pool`` 40, 45 (the pooled copy named ``None`` or by the op: ``'torch.nn.functional.
    max_pool2d'``), ``tied_copy`` 4 and ``sets_per_run`` 24 (every tied copy named ``None``), ``pixel_shuffle`` 58,
    64, ``channel_norm`` 141, 147 (the shuffle's and the norm's set named ``None`` or by the op), ``tap_gather``
    60 (the set ``conv_b``'s read of ``relu(h)`` takes named ``'block.conv_b None'``), 87, 92 (the taps named
    ``None``, or ``'tap 0'``...), ``spread_positions`` 68, 92, 97 (``head2``'s sets per position named
    ``'head2 None'``, the copies per position ``None`` or ``'torch.nn.functional.linear position 0'``...) and 120
    (the flattened map's spread not kept, so ``head2`` spreads it afresh: 16 more sets)."""
    torch.manual_seed(0)
    model = TwoHeads().to(DTYPE)
    inputs = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == [
        "input", "block.conv1", *taps("block.conv_a"), "block.conv_a",
        "block.conv_b gradgraph.convert.trace.rules_conv.gather_taps", *taps("block.conv_b"), "block.conv_b",
        "block Tensor.add", "block.norm", "block.pool", "block.shuffle", *positions("head"), "head",
        *["head2 torch.nn.functional.linear"] * 16, "head2",
    ]


class AtTheRoot(nn.Module):
    """The same ops with no modules around them: two convolutions, a group norm, a max pooling, a pixel shuffle,
    a linear head, all functional."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4, 4, 3, 3))
        self.gain, self.head = nn.Parameter(torch.ones(4)), nn.Parameter(torch.randn(1, 16))

    def forward(self, x):
        h = F.conv2d(F.conv2d(x, self.w1, padding=1), self.w2, padding=1)
        h = F.pixel_shuffle(F.max_pool2d(torch.relu(F.group_norm(h, 2, self.gain)), 2), 2)
        return F.linear(h.flatten(1), self.head)


def test_the_sets_of_a_cnn_without_modules_are_named_by_their_ops():
    """A convolution's taps are named ``'conv tap k'`` where there is no module path. Kills ``tap_gather`` 93, 94
    (``'XXconvXX tap 0'``, ``'CONV tap 0'``), and at the root the mutants of the test above that name a set by
    ``path and name`` (``spatial_pool`` 45, ``pixel_shuffle`` 64, ``channel_norm`` 147, ``spread_positions`` 97:
    an empty name)."""
    torch.manual_seed(1)
    model = AtTheRoot().to(DTYPE)
    inputs = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    linear = "torch.nn.functional.linear"  # a convolution of neurons is its taps read by one linear map
    assert origins(model, inputs) == [
        "input", linear, *taps("conv"), linear, "torch.nn.functional.group_norm", "torch.nn.functional.max_pool2d",
        "torch.pixel_shuffle", *positions(linear), linear,
    ]


class ReadTwice(nn.Module):
    """``side`` reads ``conv``'s map ``h`` (making ``h`` its channels' act) and ``head`` the flattened ``relu(h)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.side, self.head = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 1, 2), nn.Linear(12, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.side(h).flatten(1).sum(-1, keepdim=True) + self.head(torch.relu(h).flatten(1))


def test_a_flattened_map_of_another_version_takes_a_set_named_by_its_reader():
    """The flattened ``relu(h)`` is another version of ``conv``'s channels than their act, so the head's read
    first gives it a set of its own, ``'head torch.nn.functional.linear'``, then copies per position. Kills
    ``spread_positions`` 68 (that set named ``'head None'``)."""
    torch.manual_seed(2)
    model = ReadTwice().to(DTYPE)
    inputs = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == ["input", "conv", *[f"side tap {tap}" for tap in range(4)], "side",
                                      "head torch.nn.functional.linear",
                                      *[f"head position {position}" for position in range(4)], "head"]


class UnbatchedPool(nn.Module):
    """``F.max_pool2d`` of a ``[b, C, L]`` map: torch reads it as one unbatched ``[C, H, W]`` image."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(2, 3, 3), nn.Linear(2, 1)

    def forward(self, x):
        return self.head(F.max_pool2d(self.conv(x), 2).flatten(1))


class PooledParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.p, self.head = nn.Conv2d(2, 3, 3), nn.Parameter(torch.randn(1, 3, 2, 2)), nn.Linear(3, 1)

    def forward(self, x):
        return self.head((self.conv(x) + F.max_pool2d(self.p, 2)).flatten(1))


def test_poolings_gradgraph_does_not_read_are_refused_by_the_ops_name():
    """An unbatched pooling (its first axis is no datapoint axis) and a pooling of a parameter: refused naming
    the op and what it got. The unbatched one failed before inside the rule, reported as the user's model failing
    ("The expanded size of the tensor (1) must match..."): the rule read the pooling's axes off its input. Kills
    ``spatial_pool`` 23 (the op's name left out of both refusals) and ``channel_neurons`` 21 (of the second)."""
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "torch.nn.functional.max_pool2d: an input of shape [4, 3, 4]; gradgraph reads convolutions and pooling "
            "on batched inputs [b, channels, 2 spatial axes]")):
        gradgraph.to_graph(UnbatchedPool().to(DTYPE), torch.randn(4, 2, 6, dtype=DTYPE))
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "torch.nn.functional.max_pool2d: the parameter 'p' used where gradgraph expects neuron values")):
        gradgraph.to_graph(PooledParameter().to(DTYPE), torch.randn(4, 2, 4, 4, dtype=DTYPE))


class SameGridPools(nn.Module):
    """A pooling called with its input by keyword, and one that keeps the grid added to its input (an
    inception branch, a max filter): ``h + max_pool2d(h, 3, stride=1, padding=1)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + F.max_pool2d(input=h, kernel_size=3, stride=1, padding=1)
        return self.head(F.avg_pool2d(input=self.mix(h), kernel_size=2).flatten(1))


def test_a_pooling_by_keyword_and_one_that_keeps_the_grid_are_exact():
    """Exact; the same-grid pooling's values sit at its input's components, so the sum with its input is one
    value per position, and the graph has 17 components per datapoint: the 16 positions of the 4 x 4 grid (the
    2 x 2 grid of the average pooling shares their keys) and the head's one. Kills ``spatial_pool`` 3, 5, 6 (the
    input read by position only, or under a misspelt keyword)."""
    torch.manual_seed(3)
    model = SameGridPools().to(DTYPE)
    inputs = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert graph.act.shape[1] == 3 * 17


class ReadThenNormed(nn.Module):
    """``c(h) + d(relu(norm(h)))`` with ``h = a(x)``: ``c`` reads ``h`` first (``h`` becomes the act of ``a``'s
    channels), then the group norm reads ``h`` (its normalised value is another version of the same neurons)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.norm = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1), nn.GroupNorm(2, 4)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.a(x)
        return self.c(h) + self.d(torch.relu(self.norm(h)))


def test_a_group_norm_of_channels_whose_act_is_taken_copies_them_under_the_ops_name():
    """The normalised value cannot be the act of ``a``'s channels (``c`` took ``h``), so ``channel_norm``'s
    ``fix_act`` copies it into a set of its own, named by the module and the op (mut40). Exact against a loop over
    the datapoints. Kills ``channel_norm`` 118 (``fix_act``'s name ``None``: ``'norm None'``)."""
    torch.manual_seed(4)
    model, inputs = ReadThenNormed().to(DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == ["input", "a", *[f"c tap {tap}" for tap in range(9)], "c",
                                      "norm torch.nn.functional.group_norm", "norm", "d tap 0", "d", "Tensor.add"]
