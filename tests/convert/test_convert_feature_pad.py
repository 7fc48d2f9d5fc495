"""A constant ``F.pad`` of the feature axis (``trace/rules_pad.py``): the CIFAR ResNets' "option A" shortcut
(``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``) and an MLP's padded features convert exactly, with a group
that keeps the function; pads that copy neurons, pad several axes at once or crop are refused by name.

Before the rule every one of these was refused as "gradgraph has no rule for this op" (checked on main at
45c75d1), so the exactness tests fail there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.nn import GradMetaNet
from gradgraph.testing import assert_equivariant
from convert_values import exact, refused, squared
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, randomise_batch_norms


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


class OptionABlock(nn.Module):
    """A CIFAR ResNet basic block whose shortcut, where the width doubles, is the strided input padded
    with zero channels (He et al. 2016's option A, as akamaster/pytorch_resnet_cifar10 writes it)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(h + shortcut)


class CifarResNet(nn.Module):
    """A ResNet-8 of the CIFAR family (option A shortcuts): stem, three stages of one block, global pool, head."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.stages = nn.Sequential(OptionABlock(width, width, 1), OptionABlock(width, 2 * width, 2),
                                    OptionABlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.stages(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _resnet() -> CifarResNet:
    torch.manual_seed(0)
    return randomise_batch_norms(CifarResNet()).double().eval()


def _zero_channels(graph) -> torch.Tensor:
    """``[N]`` bool: the pads' constant zero channels — no incoming edge, act 0 everywhere, not the input."""
    has_source = torch.zeros(graph.num_nodes, dtype=torch.bool)
    has_source[graph.edge_index[1]] = True
    return ~has_source & (graph.act == 0).all(1) & (graph.node_kind != gradgraph.NodeKind.INPUT)


def test_cifar_resnet_with_option_a_shortcuts_is_exact():
    model = _resnet()
    inputs, targets = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    graph = assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    # the zero channels are nodes of their own: 2 + 2 at the second stage, 4 + 4 at the third
    assert int((graph.node_kind == gradgraph.NodeKind.RESIDUAL).sum()) > 0
    assert int(_zero_channels(graph).sum()) == 12
    again = gradgraph.to_graph(model, inputs + 1, targets, _cross_entropy)  # the cached plan
    gradgraph.convert.clear_structure_cache()
    fresh = gradgraph.to_graph(model, inputs + 1, targets, _cross_entropy)
    torch.testing.assert_close(again.act, fresh.act, atol=0, rtol=0)
    torch.testing.assert_close(again.grad, fresh.grad, atol=0, rtol=0)


def test_the_inferred_group_of_an_option_a_resnet_keeps_its_function():
    model = _resnet()
    inputs, targets = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 0])
    moved, graph, perm = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=3)
    assert moved > 0
    # the zero channels (2 + 2 and 4 + 4 nodes) are free to permute among themselves (they hold the same
    # constant), and the group maps them onto zero channels only
    zero = _zero_channels(graph)
    assert int(zero.sum()) == 12
    assert bool(zero[perm][zero].all())
    groups = graph.perm_group[zero]
    assert bool((groups >= 0).all()) and torch.unique(groups).numel() < int(zero.sum())
    # GradMetaNet's outputs move with the group on this graph
    torch.manual_seed(0)
    small = GradMetaNet(4, num_component_layers=1, num_node_layers=1, edge_out_channels=1, node_out_channels=1,
                        graph_out_channels=1).double()
    assert_equivariant(small, [graph])


def test_the_mean_gradient_of_an_option_a_resnet_is_the_mean_of_its_per_sample_gradients():
    graph = gradgraph.to_graph(_resnet(), torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2]),
                               _cross_entropy)
    per_sample = graph.per_sample_grads()
    for name, mean in graph.mean_grad().items():
        torch.testing.assert_close(mean, per_sample[name].mean(0), atol=1e-12, rtol=0, msg=name)


class PaddedMLP(nn.Module):
    def __init__(self, before: int, after: int, value: float) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4 + before + after, 2)
        self.pad, self.value = (before, after), value

    def forward(self, x):
        return self.b(F.pad(torch.tanh(self.a(x)), self.pad, value=self.value))


@pytest.mark.parametrize("before, after, value", [(1, 2, 0.0), (0, 3, 0.5), (2, 0, -1.5)])
def test_padded_features_of_an_mlp_are_constant_neurons(before, after, value):
    torch.manual_seed(1)
    model = PaddedMLP(before, after, value).double()
    inputs = torch.randn(5, 3, dtype=torch.float64)
    graph = exact(model, inputs)
    # the padded places hold the constant: their act is the pad value for every datapoint
    assert graph.num_nodes == 3 + 4 + 4 + before + after + 2
    pads = [first for first in range(graph.num_nodes) if torch.all(graph.act[first] == value)]
    assert len(pads) >= before + after
    assert_group_keeps_function(model, inputs, None, squared, seed=2)


class TokenPad(nn.Module):
    """Features of tokens ``[b, T, d]`` padded on the last axis: the tokens stay the components."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(F.pad(F.gelu(self.a(x)), (1, 1)))


def test_padded_features_of_tokens_keep_their_token_components():
    torch.manual_seed(2)
    graph = exact(TokenPad().double(), torch.randn(3, 5, 3, dtype=torch.float64))
    assert graph.num_components == 15


class HiddenPad(nn.Module):
    def __init__(self, pad, mode: str = "constant", channels: int = 4) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 4, 3, padding=1)
        self.second = nn.Conv1d(channels, 2, 3)
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return self.second(F.pad(torch.tanh(self.first(x)), self.pad, mode=self.mode)).flatten(1)


def _map():
    return torch.randn(2, 3, 7, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["replicate", "reflect", "circular"])
def test_a_pad_that_copies_channels_is_refused_where_the_copies_are_read(mode):
    """These pads run as indexing (rules_conv.padding_parts); the copied channel is one neuron twice."""
    refused(HiddenPad((1, 1, 1, 1), mode, channels=6).double(), _map(),
            " (module 'second' of type Conv1d): gradgraph.convert.trace.rules_conv.gather_taps: its channels are not "
            "distinct neurons (a statistic, or one neuron twice)")


def test_a_pad_of_channels_and_positions_in_one_call_is_refused_with_the_remedy():
    refused(HiddenPad((1, 1, 1, 1), channels=6).double(), _map(),
            ": torch.nn.functional.pad: pads the feature axis 1 and other axes ([2]) of a value of shape [2, 4, 7] "
            "in one call; pad them in two F.pad calls, the features alone")


def test_a_crop_of_the_channels_converts_and_a_crop_with_a_widening_is_refused():
    torch.manual_seed(4)
    exact(HiddenPad((0, 0, 0, -1), channels=3).double(), _map())  # a slice (rules_conv.padding_parts)
    refused(HiddenPad((0, 0, -1, 2), channels=5).double(), _map(),
            ": torch.nn.functional.pad: a pad that crops one side of the feature axis 1 of a value of shape "
            "[2, 4, 7] and widens the other; crop by slicing (x[..., a:b]) first")


def test_the_channels_and_the_positions_padded_in_two_calls_convert():
    class TwoPads(HiddenPad):
        def forward(self, x):
            h = F.pad(torch.tanh(self.first(x)), (0, 0, 1, 1))
            return self.second(F.pad(h, (1, 1))).flatten(1)

    torch.manual_seed(3)
    exact(TwoPads((0, 0), channels=6).double(), _map())


class TokenShift(nn.Module):
    """Half the features of each token replaced by the previous token's (a token shift, RWKV's
    ``nn.ZeroPad2d((0, 0, 1, -1))`` / ``F.pad(x, (0, 0, 1, -1))`` as token-mixing MLPs write it), then a
    residual MLP and mean pooling over the tokens."""

    def __init__(self, shift) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.shift = shift

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        shifted = torch.cat([self.shift(h[..., :2]), h[..., 2:]], dim=-1)
        h = h + F.gelu(self.mix(shifted))
        return self.head(h.mean(1))


@pytest.mark.parametrize("shift", [lambda h: F.pad(h, (0, 0, 1, -1)), nn.ZeroPad2d((0, 0, 1, -1)),
                                   lambda h: F.pad(h, (0, 0, 2, 0), value=0.25)[:, :-2]],
                         ids=["F.pad", "ZeroPad2d", "two-tokens-by-a-constant"])
def test_a_token_shift_is_exact_and_its_group_keeps_the_function(shift):
    torch.manual_seed(5)
    model = TokenShift(shift).double()
    inputs = torch.randn(3, 5, 3, dtype=torch.float64)
    exact(model, inputs)
    moved, _, _ = assert_group_keeps_function(model, inputs, None, squared, seed=1)
    assert moved > 0


class ChannelsLast(nn.Module):
    """A channels-last map ``[b, H, W, C]`` (ConvNeXt's block layout between its permutes) padded on both
    spatial axes, then a per-position Linear and a mean over the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = F.pad(F.silu(self.a(x)), (0, 0, 1, 1, 0, 2), value=-1.0)
        return self.b(h).mean((1, 2))


def test_a_channels_last_map_padded_on_its_positions_is_exact():
    torch.manual_seed(6)
    model = ChannelsLast().double()
    inputs = torch.randn(2, 3, 4, 2, dtype=torch.float64)
    graph = exact(model, inputs)
    assert graph.num_components >= 2 * 5 * 6  # the padded grid's positions are components
    assert_group_keeps_function(model, inputs, None, squared, seed=2)


def test_a_pad_of_the_datapoint_axis_is_refused():
    class PadBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 0)))[1:].sum(1)

    refused(PadBatch().double(), torch.randn(3, 5, 3, dtype=torch.float64),
            ": torch.nn.functional.pad: pads the datapoint axis 0 of a value of shape [3, 5, 4]: the new rows would "
            "be datapoints of no input")


class OneFeatureShift(nn.Module):
    """One feature of ``[b, T, 4]`` shifted two tokens down (``F.pad`` of a ``[b, T, 1]`` value), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(torch.cat([F.pad(h[..., :1], (0, 0, 2, -2)), h[..., 1:]], dim=-1)).mean(1)


def test_a_token_shift_of_one_feature_is_exact():
    """``[b, T, 1]``: one neuron along the tokens, which the map rule would read as ``T`` copies of a channel
    (found by the sequence fuzzer's shift step: refused as "no rule" before)."""
    torch.manual_seed(7)
    exact(OneFeatureShift().double(), torch.randn(3, 4, 3, dtype=torch.float64))


JOINED = {
    "zeros after": (lambda h: torch.cat([h, h.new_zeros(h.shape[0], 2)], -1), lambda h: F.pad(h, (0, 2))),
    "halves around": (lambda h: torch.cat([torch.full((h.shape[0], 1), 0.5, dtype=h.dtype), h,
                                           torch.full((h.shape[0], 2), 0.5, dtype=h.dtype)], 1),
                      lambda h: F.pad(h, (1, 2), value=0.5)),
}


class JoinedMLP(nn.Module):
    """``out(tanh(b(join(tanh(a(x))))))``, ``join`` a cat with constants or the ``F.pad`` it equals."""

    def __init__(self, join) -> None:
        super().__init__()
        self.join = join
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4 + join(torch.zeros(1, 4)).shape[1] - 4, 5), \
            nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(self.join(torch.tanh(self.a(x))))))


@pytest.mark.parametrize("kind", sorted(JOINED))
def test_a_cat_of_features_with_a_constant_is_the_pad_it_equals(kind):
    """``cat([h, zeros])`` (GatedGraphConv's input padded to its width) converts as ``F.pad`` does, graph for graph;
    refused before session 19 ("concatenating neuron values with constants")."""
    join, pad = JOINED[kind]
    torch.manual_seed(0)
    model = JoinedMLP(join).double()
    inputs, targets = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    graph = assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=1)
    padded = JoinedMLP(pad).double()
    padded.load_state_dict(model.state_dict())
    reference = gradgraph.to_graph(padded, inputs, targets, _cross_entropy)
    for key in ("act", "grad", "x", "edge_attr", "edge_index", "node_kind", "edge_kind"):
        torch.testing.assert_close(getattr(graph, key), getattr(reference, key), atol=0, rtol=0, msg=key)


class JoinedMap(nn.Module):
    """A map's channels joined with zero channels (``cat([m, zeros], 1)``), then a convolution and a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(5, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        m = torch.relu(self.conv1(x))
        m = torch.cat([m, m.new_zeros(m.shape[0], 2, *m.shape[2:])], 1)
        return self.head(torch.relu(self.conv2(m)).mean((2, 3)))


def test_a_cat_of_channels_with_zero_channels_is_exact_with_a_true_group():
    torch.manual_seed(0)
    model = JoinedMap().double()
    inputs, targets = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1])
    assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=2)
    assert moved > 0


class OtherConstants(nn.Module):
    """Constants that are no pad: an ``arange`` joined to the features, zeros joined along the tokens."""

    def __init__(self, along: str) -> None:
        super().__init__()
        self.along = along
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4 if along == "tokens" else 6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.along == "tokens":
            h = torch.cat([h.new_zeros(h.shape[0], 1, 4), h], 1)
        else:
            h = torch.cat([h, torch.arange(2, dtype=h.dtype).expand(*h.shape[:-1], 2)], -1)
        return self.out(h).sum(1)


@pytest.mark.parametrize("along", ["tokens", "features"])
def test_a_cat_with_constants_that_are_no_feature_pad_is_refused(along):
    refused(OtherConstants(along).double(), torch.randn(2, 5, 3, dtype=torch.float64),
            " torch.cat: concatenating neuron values with constants (for transformers models, call them with "
            "use_cache=False)")
