"""The rules of ``trace/rules_conv.py`` (taps, padding, channels, pixel shuffles, a flatten into a head,
group and instance norms), checked by value: what run conv 1 (docs/mutation.md, group ``convert-conv``)
found unchecked, and the corners of the file the group's other test files do not reach.

Every conversion is float64 against torch.func's per-sample gradients or a per-datapoint autograd loop
(1e-10); a refusal is matched in full after its location (``file:line in name``: under mutmut the innermost
frame outside torch and gradgraph is mutmut's trampoline, so the location is matched by its form only). Each
test names the mutants it kills (``mutmut show NAME`` in ``.mutation/convert-conv/``, ``f 12`` standing for
``gradgraph.convert.trace.rules_conv.f__mutmut_12`` or ``…rules_conv.xǁConvRulesǁf__mutmut_12``), each
checked with ``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn, Tensor
from convert_values import exact, refused, squared, TokenMixing, TwiceFlattened, UnboundPositions
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph.convert import to_graph_traced, UnsupportedOperationError
from gradgraph.convert.trace.ops import LOST_TRACK

DTYPE = torch.float64


# ----------------------------------------------------------------------- group and instance norms
class PlainGroupNorm(nn.Module):
    """``Conv2d -> GroupNorm(affine=False) -> Conv2d -> mean over positions -> Linear``."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(groups, 4, affine=False), \
            nn.Conv2d(4, 3, 2)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))).mean((2, 3)))


def test_a_group_norm_without_its_affine_parameters_is_exact():
    """``channel_norm`` with ``weight=None``: the NORM_SCALE edges carry no parameter. Exact."""
    torch.manual_seed(0)
    exact(PlainGroupNorm().to(DTYPE), torch.randn(3, 2, 5, 5, dtype=DTYPE))


# ----------------------------------------------------------------------- a flatten into a head
def test_spread_positions_leaves_other_layouts_to_the_affine_rule_and_refuses_a_position_twice():
    """``spread_positions``: values without components (a position table) and rows that differ (a Linear
    over tokens) are left to the affine rule, which refuses them in its words; a flattened map that holds
    one channel at one position twice is refused by ``spread_positions`` itself."""
    torch.manual_seed(14)
    refused(TwiceFlattened().to(DTYPE), torch.randn(5, 2, 4, 4, dtype=DTYPE),
            " (module 'head' of type Linear): torch.nn.functional.linear: an affine map over features that hold one "
            "neuron at one position twice")
    refused(UnboundPositions().to(DTYPE), torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(8)),
            " (module 'proj' of type Linear): torch.nn.functional.linear: an affine map of values that do not depend "
            "on the input")
    refused(TokenMixing().to(DTYPE), torch.randn(5, 4, 3, dtype=DTYPE),
            " (module 'mix' of type Linear): torch.nn.functional.linear: applied to an axis that holds positions or "
            "datapoints, not features (e.g. a Linear over tokens, as in MLP-Mixer); gradgraph needs affine maps over "
            "the last, feature axis")


# ----------------------------------------------------------------------- pixel shuffles
class Shuffled(nn.Module):
    """``Conv2d(2, 12) -> F.pixel_shuffle(·, 2)`` (or ``Conv2d(2, 3) -> F.pixel_unshuffle(·, 2)``) ``-> tanh ->
    Conv2d(·, 2, 1) ->`` mean over positions; the shuffle called by position, or with the factor by keyword
    (``pixel_unshuffle``'s input too)."""

    def __init__(self, unshuffle: bool, keywords: bool) -> None:
        super().__init__()
        self.unshuffle, self.keywords = unshuffle, keywords
        self.c1, self.c3 = nn.Conv2d(2, 3 if unshuffle else 12, 3, padding=1), nn.Conv2d(12 if unshuffle else 3, 2, 1)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        if self.unshuffle:
            h = F.pixel_unshuffle(input=h, downscale_factor=2) if self.keywords else F.pixel_unshuffle(h, 2)
        else:
            h = F.pixel_shuffle(h, upscale_factor=2) if self.keywords else F.pixel_shuffle(h, 2)
        return self.c3(torch.tanh(h)).mean((2, 3))


def merge_sources(graph) -> dict[int, list[int]]:
    """Each node's MERGE sources (the neurons whose values it holds)."""
    sources: dict[int, list[int]] = {}
    for (source, target), kind in zip(graph.edge_index.T.tolist(), graph.edge_kind.tolist()):
        if kind == gradgraph.EdgeKind.MERGE:
            sources.setdefault(target, []).append(source)
    return sources


def output_channel_nodes(graph, weight: str) -> dict[int, int]:
    """The node of each output channel of a convolution (the target of its weight's edges)."""
    index = graph.param_names.index(weight)
    per_channel = math.prod(graph.param_shapes[index][1:])
    where = graph.edge_param == index
    return {int(target): int(position) // per_channel
            for target, position in zip(graph.edge_index[1, where].tolist(), graph.edge_param_pos[where].tolist())}


def held_channels(graph, before: str, after: str) -> list[list[int]]:
    """For each input channel of the pointwise convolution ``after``, the output channels of ``before``
    whose values it reads: its tap neuron's MERGE source (a shuffled channel) and that one's MERGE sources."""
    sources, channel_of = merge_sources(graph), output_channel_nodes(graph, before)
    index = graph.param_names.index(after)
    shape = graph.param_shapes[index]
    where = graph.edge_param == index
    held: dict[int, list[int]] = {}
    for tap, position in zip(graph.edge_index[0, where].tolist(), graph.edge_param_pos[where].tolist()):
        (shuffled,) = sources[tap]
        held.setdefault(int(position) % shape[1], sorted(channel_of[node] for node in sources[shuffled]))
    return [held[channel] for channel in range(shape[1])]


def assert_shuffled_act(graph, shuffled: Tensor, channels: int) -> None:
    """The nodes joined (MERGE) to ``c1``'s channels ``4c..4c+3`` (one per shuffled channel ``c``) hold
    ``shuffled[i, c]`` as their act at datapoint ``i``'s components, one per position (row-major)."""
    b, positions = shuffled.shape[0], math.prod(shuffled.shape[2:])
    sources, channel_of = merge_sources(graph), output_channel_nodes(graph, "c1.weight")
    keys = graph.act.shape[1] // b
    assert graph.component_sample.tolist() == [i for i in range(b) for _ in range(keys)]
    found = []
    for node, held in sources.items():
        held_channels = sorted(channel_of.get(source, -1) for source in held)
        if held_channels and held_channels[0] >= 0:
            c = held_channels[0] // 4
            assert held_channels == list(range(4 * c, 4 * c + 4))
            act = graph.act[node].reshape(b, keys)
            torch.testing.assert_close(act[:, :positions], shuffled[:, c].reshape(b, positions), atol=1e-12, rtol=0)
            found.append(c)
    assert sorted(found) == list(range(channels))


@pytest.mark.parametrize("keywords", [False, True])
@pytest.mark.parametrize("unshuffle", [False, True])
def test_a_pixel_shuffle_joins_each_channel_to_the_channels_it_holds(unshuffle, keywords):
    """``pixel_shuffle`` / ``replay_channels``: exact on a grid that is not square, called by position or by
    keyword; each shuffled channel is joined (MERGE) to exactly the channels the definition puts in it:
    ``pixel_shuffle(h, 2)[:, c]`` holds ``h[:, 4c:4c + 4]``, ``pixel_unshuffle(h, 2)[:, c]`` holds ``h[:, c // 4]``.
    Kills pixel_shuffle 3, 5, 6, 47, 113 and replay_channels 3, 5, 7-15, 17, 20, 21."""
    torch.manual_seed(21)
    graph = exact(Shuffled(unshuffle, keywords).to(DTYPE), torch.randn(3, 2, 4, 6, dtype=DTYPE))
    expected = [[c // 4] for c in range(12)] if unshuffle else [list(range(4 * c, 4 * c + 4)) for c in range(3)]
    assert held_channels(graph, "c1.weight", "c3.weight") == expected


class ShuffledOut(nn.Module):
    """A super-resolution head: ``F.pixel_shuffle(Conv2d(2, 8, 1)(x), 2)`` is the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.c1(x), 2)


def test_a_pixel_shuffle_that_is_the_output_has_the_shuffled_values_as_its_act():
    """The shuffled channels that no later op reads take the shuffled map as their act: node ``c`` (the one
    joined to ``c1``'s channels ``4c..4c+3``) holds ``out[i, c]`` at datapoint ``i``'s component of each
    position (row-major), on a grid that is not square. Exact. Kills pixel_shuffle 128."""
    torch.manual_seed(22)
    model, inputs = ShuffledOut().to(DTYPE), torch.randn(3, 2, 2, 3, dtype=DTYPE)
    graph = exact(model, inputs)
    assert_shuffled_act(graph, model(inputs).detach(), 2)


def test_a_pixel_shuffle_of_a_map_without_one_datapoint_axis_is_refused_by_name():
    """``pixel_shuffle`` of ``[b, T, C, H, W]`` (several frames per datapoint): refused by the shuffle's
    name, as a map that is not ``[b, channels, H, W]`` (``channel_neurons``' words). Kills pixel_shuffle 9,
    channel_neurons 4-8."""

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(3, 16), nn.Linear(2, 2)

        def forward(self, x):
            h = self.a(x).reshape(x.shape[0], 2, 8, 1, 1)
            return self.out(F.pixel_shuffle(h, 2).reshape(x.shape[0], 2, 2, 4).mean(-1)).sum(1)

    refused(Frames().to(DTYPE), torch.randn(3, 3, dtype=DTYPE),
            " torch.pixel_shuffle: an input of shape [3, 2, 8, 1, 1]; gradgraph reads convolutions and pooling on "
            "batched inputs [b, channels, 2 spatial axes]")


# ----------------------------------------------------------------------- padding modes
class ReflectNarrow(nn.Module):
    """``Conv2d(padding=1, padding_mode=mode)`` over a map with an axis of 2 places (reflect pads it to
    ``[1, 0, 1, 0]``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_of_an_axis_of_two_places_are_exact(mode):
    """``_source_index`` where an axis has 2 places (reflect's period is 2). Exact. Kills _source_index 19, 31."""
    torch.manual_seed(23)
    exact(ReflectNarrow(mode).to(DTYPE), torch.randn(3, 2, 2, 5, dtype=DTYPE))


class ShuffledTwice(nn.Module):
    """The shuffled map read by a convolution as it is and after a tanh: two versions of its neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 8, 1), nn.Conv2d(2, 3, 2), nn.Conv2d(2, 3, 2)

    def forward(self, x):
        h = F.pixel_shuffle(self.c1(x), 2)
        return (self.c2(h) + self.c3(torch.tanh(h))).mean((2, 3))


def test_a_pixel_shuffle_read_in_two_versions_is_exact():
    """The shuffled channels start at version 0 of their new set, so its tanh (version 1) is told apart
    from them where both are read as taps: the shuffled nodes keep the shuffled values as their act. Exact.
    Kills pixel_shuffle 122."""
    torch.manual_seed(24)
    model, inputs = ShuffledTwice().to(DTYPE), torch.randn(3, 2, 2, 3, dtype=DTYPE)
    graph = exact(model, inputs)
    assert_shuffled_act(graph, F.pixel_shuffle(model.c1(inputs), 2).detach(), 2)


# ----------------------------------------------------------------------- group and instance norms, by value
class Normed(nn.Module):
    """``Conv2d(2, 4) -> norm -> tanh -> Conv2d(4, 3, 2) ->`` mean over positions ``-> Linear``; ``norm`` is
    ``GroupNorm(2, 4, eps=0.5)`` or ``InstanceNorm2d(4, affine=True, eps=0.5)`` (an eps far from torch's
    default, so a norm read with another eps is told apart)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 2), nn.Linear(3, 2)
        self.norm = nn.GroupNorm(2, 4, eps=0.5) if kind == "group" else nn.InstanceNorm2d(4, affine=True, eps=0.5)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))).mean((2, 3)))


@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize("kind", ["group", "instance"])
def test_group_and_instance_norms_with_their_own_eps_are_exact(kind, batch):
    """``channel_norm`` reads ``eps`` (handed by keyword) and the channels from the first datapoint (a batch
    of one too). Exact. Kills channel_norm 48, 52, 53, 136."""
    torch.manual_seed(25)
    exact(Normed(kind).to(DTYPE), torch.randn(batch, 2, 4, 5, dtype=DTYPE))


class NormedFeatures(nn.Module):
    """``GroupNorm(2, 4)`` of ``[b, 4]`` features (no positions) between two Linear maps."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.norm.weight.normal_()

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.a(x))))


def test_a_group_norm_of_features_without_positions_is_exact():
    """``channel_norm`` over ``[b, C]``: one position, so the channels are read at position 0. Exact.
    Kills channel_norm 137."""
    torch.manual_seed(26)
    exact(NormedFeatures().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class RunningInstanceNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.head = nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), \
            nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.a(x)).mean((2, 3)))


class NormOverTokens(nn.Module):
    """``GroupNorm`` applied to ``[b, T, d]`` token features: axis 1 holds positions, not channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(3, 4), nn.GroupNorm(1, 5), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(self.a(x))).sum(1)


class ConstantScale(nn.Module):
    """``F.group_norm`` whose weight (or bias) is a buffer, not a parameter."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.a, self.head = nn.Conv2d(2, 4, 3), nn.Linear(4, 2)
        self.register_buffer("constant", torch.rand(4) + 0.5)

    def forward(self, x):
        roles = {self.role: self.constant}
        return self.head(F.group_norm(self.a(x), 2, **roles).mean((2, 3)))


def test_norms_refuse_running_statistics_other_layouts_and_constant_scales_by_name():
    """``channel_norm``'s refusals, in full: an InstanceNorm with running statistics in eval, a GroupNorm whose
    axis 1 holds token positions (``channel_neurons`` named by the norm), and a weight or bias that is a buffer
    (``param_view`` named by the norm and the role). Kills channel_norm 56, 58, 62, 63, 65-72, 83, 156, 157, 161,
    162, 173, 174, 178, 179 and channel_neurons 91-96."""
    torch.manual_seed(27)
    refused(RunningInstanceNorm().to(DTYPE).eval(), torch.randn(3, 2, 5, 5, dtype=DTYPE),
            " (module 'norm' of type InstanceNorm2d): torch.nn.functional.instance_norm: instance norm with running "
            "statistics (track_running_stats in eval); gradgraph reads it with the input's statistics only")
    refused(NormOverTokens().to(DTYPE), torch.randn(3, 5, 3, dtype=DTYPE),
            " (module 'norm' of type GroupNorm): torch.nn.functional.group_norm: its input does not hold channels on "
            "axis 1 (neurons) and positions on the spatial axes of each datapoint on axis 0; gradgraph reads "
            "convolutions and pooling over [b, channels, *spatial] with channels as neurons")
    for role in ("weight", "bias"):
        refused(ConstantScale(role).to(DTYPE), torch.randn(3, 2, 5, 5, dtype=DTYPE),
                f" torch.nn.functional.group_norm: its {role} is not a parameter of the model (or a view of one); "
                "gradgraph converts affine maps whose weights are parameters")


# ----------------------------------------------------------------------- the model input read as channels
class TwoSlices(nn.Module):
    """Two convolutions, each of its own slice of the input's channels (``x[:, :2]``, ``x[:, 2:]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(2, 3, 2), nn.Conv2d(2, 3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x[:, :2]) + self.b(x[:, 2:])).mean((2, 3)))


class PermutedVideo(nn.Module):
    """``[b, T, C, H, W] -> [b, C, T, H, W]`` read by a ``Conv3d`` (a video's), with ``C`` not ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv3d(4, 3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.permute(0, 2, 1, 3, 4))).mean((2, 3, 4)))


class PointFrames(nn.Module):
    """Frames of one pixel and one channel, ``[b, T, 1, 1, 1] -> [b * T, 1, 1, 1]``, each read by a
    ``Conv2d(1, 3, 1)``, then the frames' features joined per datapoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 1), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.reshape(-1, 1, 1, 1))).reshape(x.shape[0], 6))


class SmallFrames(nn.Module):
    """Three frames of 2 x 2 pixels, ``[b, 3, 1, 2, 2] -> [b * 3, 1, 2, 2]``, each read by a ``Conv2d(1, 2, 3,
    padding=2)`` (a 4 x 4 output grid), then the frames' features joined per datapoint: 48 keys for the output
    grids of the three frames, more than the input's 12 or any other grid's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=2), nn.Linear(96, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.reshape(-1, 1, 2, 2))).reshape(x.shape[0], 96))


@pytest.mark.parametrize("kind", ["two slices", "permuted video", "point frames", "small frames"])
def test_the_input_read_as_channels_in_other_layouts_is_exact(kind):
    """``channel_input``: a slice of the input's channels reads the channels it holds (two slices, two sets
    of input neurons), the permuted video is told by its datapoint axis (``C`` differs from ``b``), and a
    merged video whose frames hold one element each, or whose frames' grids need more keys than any other
    (``position_comps``: a key per position of each row of a datapoint). Exact. Kills channel_input 31, 33, 40,
    104 and position_comps 11."""
    model = {"two slices": TwoSlices, "permuted video": PermutedVideo, "point frames": PointFrames,
             "small frames": SmallFrames}[kind]
    shape = {"two slices": (3, 4, 3, 4), "permuted video": (2, 3, 4, 3, 3), "point frames": (3, 2, 1, 1, 1),
             "small frames": (3, 3, 1, 2, 2)}[kind]
    torch.manual_seed(28)
    inputs = torch.randn(*shape, dtype=DTYPE)
    graph = exact(model().to(DTYPE), inputs)
    if kind == "two slices":  # the 4 input neurons (in order) hold the 4 channels at their positions
        nodes = torch.nonzero(graph.node_kind == int(gradgraph.NodeKind.INPUT)).flatten()
        act = graph.act[nodes].reshape(nodes.numel(), 3, -1)[:, :, :12]
        torch.testing.assert_close(act, inputs.reshape(3, 4, 12).permute(1, 0, 2), atol=0, rtol=0)


class Transposed(nn.Module):
    """A ``Conv1d`` of the input with its first two axes swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.conv(x.transpose(0, 1)).mean(2)).sum(0, keepdim=True).expand(3, -1)


class Unflattened(nn.Module):
    """A ``Conv1d`` of ``[b, 12]`` inputs reshaped to ``[b, 3, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.conv(x.reshape(x.shape[0], 3, 4)).mean(2))


#: channel_input's refusal of the input read with other axes than its own (mut52: before, in the words of the refusal
#: above, "a convolution whose input's first axis is not the datapoints", untrue of these values)
OTHER_AXES = (
    " gradgraph.convert.trace.rules_conv.gather_taps: a convolution of the model input read with other axes than its "
    "own (a frame x[:, t] of a [b, T, C, L] input, x.flatten(1, 2)): two such reads would put two input values on one "
    "input neuron at one position. The input is read as channels as [b, C, *S] (whole or sliced), with a channel axis "
    "of size 1 added, merged [b * T, C, *S], or with its axes after the datapoints permuted")


def test_a_convolution_of_the_input_without_its_datapoints_first_is_refused_by_name():
    """``channel_input``'s refusal (and ``read_input_taps``'), in full: the input with its first two axes swapped
    (whole, and a slice of it), a sequence-first input (``datapoint_dim=1``) and a flat input reshaped to more
    than one channel (since mut52 in words of its own). Kills channel_input 6, 43, 44, 54, 62-67 (runs conv 1-3's
    numbers), read_input_taps 13-19, channel_neurons 15."""
    torch.manual_seed(29)
    message = (" gradgraph.convert.trace.rules_conv.gather_taps: a convolution whose input's first axis is not the "
               "datapoints")
    refused(Transposed().to(DTYPE), torch.randn(3, 3, 4, dtype=DTYPE), " (module 'conv' of type Conv1d):" + message)
    refused(Unflattened().to(DTYPE), torch.randn(3, 12, dtype=DTYPE), " (module 'conv' of type Conv1d):" + OTHER_AXES)
    sliced = Transposed().to(DTYPE)
    sliced.conv = nn.Conv1d(2, 2, 2).to(DTYPE)
    sliced.forward = lambda x: sliced.head(sliced.conv(x.transpose(0, 1)[:, :2]).mean(2)).sum(0, keepdim=True).expand(
        3, -1)
    refused(sliced, torch.randn(3, 3, 4, dtype=DTYPE), " (module 'conv' of type Conv1d):" + message)
    sequence_first = Unflattened().to(DTYPE)
    sequence_first.forward = lambda x: sequence_first.head(sequence_first.conv(x.transpose(0, 1)).mean(2))
    gradgraph.convert.clear_structure_cache()
    pattern = r"^\S+:\d+ in \S+" + re.escape(" (module 'conv' of type Conv1d):" + message) + "$"
    with pytest.raises(UnsupportedOperationError, match=pattern):
        to_graph_traced(sequence_first, torch.randn(3, 4, 4, dtype=DTYPE), loss_fn=squared, datapoint_dim=1)


class Frames(nn.Module):
    """``Conv1d``s of the frames of a ``[b, T, 3, 5]`` input: ``"two frames"``, ``a(x[:, 0]) + b(x[:, 1])``;
    ``"one frame"``, ``a(x[:, 1])``; ``"flattened"``, ``c(x.flatten(1, 2))``; each ``-> tanh ->`` mean over
    positions ``-> Linear``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Conv1d(3, 4, 3), nn.Conv1d(3, 4, 3), nn.Conv1d(6, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if self.kind == "two frames":
            mixed = self.a(x[:, 0]) + self.b(x[:, 1])
        else:
            mixed = self.a(x[:, 1]) if self.kind == "one frame" else self.c(x.flatten(1, 2))
        return self.head(torch.tanh(mixed).mean(2))


@pytest.mark.parametrize("kind", ["two frames", "one frame", "flattened"])
def test_a_convolution_of_frames_of_the_input_is_refused_in_its_own_words(kind):
    """``channel_input`` reads as channels the input ``[b, C, *S]``, merged ``[b * T, C, *S]`` or permuted; a value
    of the input with other axes — a frame ``x[:, t]`` of ``[b, T, C, L]``, ``x.flatten(1, 2)`` — is refused, in
    full, naming what it reads instead of "a convolution whose input's first axis is not the datapoints" (their
    first axis *is* the datapoints; the words before mut52). Why it is not lifted: read with its axis 1 as channels
    (at rank 0 among its datapoint's rows), every frame puts its element ``(c, p)`` on input neuron ``c`` at
    position ``p`` of its datapoint. Kills ``channel_input`` 15 (``or`` for the first ``and`` of ``merged``: every
    value with fewer axes than the input read so): the two frames convert with exact per-sample gradients (each
    convolution's tap copies hold its own frame's windows) but the input neurons' ``act`` holds frame 1 only, though
    ``a``'s tap copies, tied to them, are read from frame 0 (checked by hand on a copy with the mutant; also 14, for
    a frame ``tuple(shape[2:]) == x.shape[1:]``). mut40 and mut47 found the one frame and the flattened input exact
    under 15: one value read alone cannot collide, but the code cannot tell a second read apart."""
    torch.manual_seed(52)
    inputs = torch.randn(3, 2, 3, 5, dtype=DTYPE)
    assert not torch.equal(inputs[:, 0], inputs[:, 1])  # the two frames differ: one act cannot hold both
    module = {"two frames": "a", "one frame": "a", "flattened": "c"}[kind]
    refused(Frames(kind).to(DTYPE), inputs, f" (module '{module}' of type Conv1d):" + OTHER_AXES)


# ----------------------------------------------------------------------- the model input read as windows
class Reader(nn.Module):
    """``Conv2d(2, 3, kernel, stride, padding)`` of the model input ``-> tanh ->`` mean over positions ``-> Linear``."""

    def __init__(self, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, kernel, stride, padding), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def window_factors(model: Reader, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """The windows ``U [b, C * k, L]`` of the first convolution (``F.unfold``: channel-major, tap-minor) and
    ``dL_i/dU`` of each datapoint's loss, by autograd through the convolution written as ``W U + bias``."""
    conv = model.conv
    windows = F.unfold(inputs, conv.kernel_size, stride=conv.stride, padding=conv.padding).requires_grad_()
    size = [(inputs.shape[2 + axis] + 2 * conv.padding[axis] - conv.kernel_size[axis]) // conv.stride[axis] + 1
            for axis in range(2)]
    out = (conv.weight.reshape(conv.out_channels, -1) @ windows + conv.bias[:, None]).reshape(
        inputs.shape[0], conv.out_channels, *size)
    loss = squared(model.head(torch.tanh(out).mean((2, 3))), None)
    (grad,) = torch.autograd.grad(loss.sum(), windows)
    return windows.detach(), grad


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 2, 1)])
def test_the_input_read_as_windows_has_their_values_as_act_and_their_gradients_as_grad(kernel, stride, padding):
    """``patch_taps`` (windows that tile the input, here with a remainder row no window covers) and
    ``read_input_taps`` (overlapping, padded windows): the input neurons are (channel, tap) pairs, one
    component per window, their act the window's values and their grad ``dL_i/dU``. Exact. Kills patch_taps
    66-69, 71, 79, 105, 112."""
    torch.manual_seed(30)
    model, inputs = Reader(kernel, stride, padding).to(DTYPE), torch.randn(3, 2, 5, 4, dtype=DTYPE)
    graph = exact(model, inputs)
    windows, grad = window_factors(model, inputs)
    nodes = torch.nonzero(graph.node_kind == int(gradgraph.NodeKind.INPUT)).flatten()
    nodes = nodes[graph.position[nodes].argsort()]
    assert nodes.numel() == windows.shape[1]
    keys, count = graph.act.shape[1] // 3, windows.shape[2]
    assert keys == count + 1  # a component per window and one of the pooled features: the input grid has none
    assert graph.component_sample.tolist() == [i for i in range(3) for _ in range(keys)]
    act, ours = graph.act[nodes].reshape(-1, 3, keys), graph.grad[nodes].reshape(-1, 3, keys)
    torch.testing.assert_close(act[:, :, :count], windows.permute(1, 0, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours[:, :, :count], grad.permute(1, 0, 2), atol=1e-12, rtol=0)
    assert not act[:, :, count:].any() and not ours[:, :, count:].any()


@pytest.mark.parametrize("padding", [0, 1])
def test_a_convolution_of_inputs_of_one_element_each_is_exact(padding):
    """``[b, 1, 1]`` inputs read by a ``Conv1d`` as windows that tile them (``patch_taps``) or as padded windows
    (``read_input_taps``): each datapoint's first element is its only one. Exact. Kills read_input_taps 47,
    patch_taps 149."""

    class Single(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv1d(1, 3, 1 + 2 * padding, padding=padding), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(x)).mean(2))

    torch.manual_seed(31)
    exact(Single().to(DTYPE), torch.randn(3, 1, 1, dtype=DTYPE))


def test_patches_of_an_input_read_otherwise_first_or_transposed_are_refused_by_name():
    """``patch_taps``'s refusals, in full: patches of an input whose first reader read it with another width
    (a pointwise convolution), named by the patch reader and how it reads; and patches of the input with its
    first two axes swapped, or with its datapoints moved to the last axis. Kills patch_taps 5, 10, 16, 19-24,
    92, 93."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.point, self.patch, self.head = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 2, stride=2), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.point(x).mean((2, 3)) + self.patch(x).mean((2, 3)))

    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv1d(3, 2, 2, stride=2), nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.conv(x.transpose(0, 1)).mean(2)).sum(0, keepdim=True).expand(3, -1)

    torch.manual_seed(32)
    refused(Twice().to(DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE),
            " (module 'patch' of type Conv2d): gradgraph.convert.trace.rules_conv.gather_taps: the input is read as 8 "
            "features per patch here but 2 elsewhere")
    refused(Swapped().to(DTYPE), torch.randn(3, 3, 4, dtype=DTYPE),
            " (module 'conv' of type Conv1d): gradgraph.convert.trace.rules_conv.gather_taps: a convolution whose "
            "input's first axis is not the datapoints")
    last = Twice().to(DTYPE)  # the datapoints moved to the last axis of a [3, 2, 2, 3] input (shape kept)
    last.forward = lambda x: last.head(last.point(x.transpose(0, 3)).mean((2, 3))).sum(0, keepdim=True).expand(3, -1)
    refused(last, torch.randn(3, 2, 2, 3, dtype=DTYPE),
            " (module 'point' of type Conv2d): gradgraph.convert.trace.rules_conv.gather_taps: a convolution whose "
            "input's first axis is not the datapoints")


# ----------------------------------------------------------------------- group norms and the symmetry
class GroupNormAfter(nn.Module):
    """``GroupNorm(2, 4)`` of one convolution's channels ``a(x)``, with another convolution's set ``c(x)`` made
    between theirs and the norm's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(2, 4, 3), nn.Conv2d(2, 3, 3)
        self.norm, self.b, self.head = nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 2), nn.Linear(6, 2)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        a, c = torch.tanh(self.a(x)), torch.tanh(self.c(x))
        pooled = torch.tanh(self.b(torch.tanh(self.norm(a)))).mean((2, 3))
        return self.head(torch.cat([pooled, c.mean((2, 3))], 1))


def test_a_group_norm_cuts_its_channels_at_its_own_group_borders():
    """``channel_norm``'s cuts, at the norm's (and its input's) group borders wherever their sets lie: the
    first two channels never share a permutation group with the last two, and sampled group elements keep
    the function and the graph. Exact. Kills channel_norm 208."""
    torch.manual_seed(33)
    model, inputs = GroupNormAfter().to(DTYPE), torch.randn(3, 2, 5, 5, dtype=DTYPE)
    graph = exact(model, inputs)
    norm = graph.perm_group[graph.node_kind == int(gradgraph.NodeKind.NORM)].tolist()
    assert len(set(norm[:2])) == 1 and len(set(norm[2:])) == 1 and norm[0] >= 0 and norm[0] != norm[2], norm
    for seed in range(4):
        moved, _, _ = assert_group_keeps_function(model, inputs, None, squared, seed=seed)
        assert moved > 0


# ----------------------------------------------------------------------- F.pad's other modes, by hand
class PaddedByHand(nn.Module):
    """``F.pad(h, pad, mode)`` of a feature map, written in the forward (not a convolution's padding_mode)."""

    def __init__(self, pad: tuple, mode: str) -> None:
        super().__init__()
        self.pad, self.mode = pad, mode
        self.a, self.b, self.head = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 2), nn.Linear(3, 2)

    def forward(self, x):
        h = F.pad(torch.tanh(self.a(x)), self.pad, mode=self.mode)
        return self.head(torch.tanh(self.b(h)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_an_asymmetric_pad_of_both_spatial_axes_is_exact(mode):
    """``padding_parts`` with pads that differ per side and per axis, one side 0: ``(1, 0, 2, 1)`` (last axis
    first). Exact. Kills padding_parts 72, 73, 77."""
    torch.manual_seed(34)
    exact(PaddedByHand((1, 0, 2, 1), mode).to(DTYPE), torch.randn(3, 2, 4, 5, dtype=DTYPE))


@pytest.mark.parametrize("pad", [(1, 1, 1), (1, 1, 1, 1, 1, 1, 1, 1, 1, 1)])
def test_a_pad_torch_refuses_is_refused_as_torch_refuses_it(pad):
    """``padding_parts`` leaves a pad of odd length, or of more axes than the map has, to torch, whose
    error reaches the user as the model's (the decomposition would drop the extra entries). Kills
    padding_parts 32, 33, 40."""
    torch.manual_seed(35)
    model, inputs = PaddedByHand(pad, "replicate").to(DTYPE), torch.randn(3, 2, 4, 5, dtype=DTYPE)
    with pytest.raises(RuntimeError) as expected:
        model(inputs)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.GradGraphError) as error:
        gradgraph.to_graph(model, inputs, None, squared)
    assert str(error.value).endswith(f"RuntimeError: {expected.value}"), str(error.value)


class NormedTwice(nn.Module):
    """A GroupNorm's output read by a convolution as it is and after a tanh: two versions of its neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm = nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4)
        self.b, self.c = nn.Conv2d(4, 3, 2), nn.Conv2d(4, 3, 2)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        h = self.norm(self.a(x))
        return (self.b(h) + self.c(torch.tanh(h))).mean((2, 3))


def test_a_group_norm_read_in_two_versions_keeps_its_output_as_the_norm_neurons_act():
    """The norm's neurons start at version 0 of their new set, so their tanh (version 1) is told apart
    from them: the NORM nodes (in order, one per channel) hold the norm's output as their act. Exact.
    Kills channel_norm 249."""
    torch.manual_seed(36)
    model, inputs = NormedTwice().to(DTYPE), torch.randn(3, 2, 3, 4, dtype=DTYPE)
    graph = exact(model, inputs)
    nodes = torch.nonzero(graph.node_kind == int(gradgraph.NodeKind.NORM)).flatten()
    keys = graph.act.shape[1] // 3
    output = model.norm(model.a(inputs)).detach().reshape(3, 4, 12).permute(1, 0, 2)
    torch.testing.assert_close(graph.act[nodes].reshape(4, 3, keys)[:, :, :12], output, atol=1e-12, rtol=0)


class PooledPositions(nn.Module):
    """A position table over ``arange`` pooled (``F.avg_pool1d``) before it joins any token value: neurons
    without components."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 2)

    def forward(self, ids):
        pooled = F.avg_pool1d(self.positions(torch.arange(ids.shape[1] + 1)).T[None], 2, 1)
        return self.out(torch.tanh(self.tokens(ids) + pooled[0].T)).sum(1)


def test_pooling_of_values_without_components_is_refused_by_name():
    """``channel_neurons``' refusal of neurons that have no components yet, named by the pooling op.
    Kills channel_neurons 24, 27-30."""
    torch.manual_seed(37)
    refused(PooledPositions().to(DTYPE), torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(8)),
            " torch.avg_pool1d: " + LOST_TRACK)


class InputAndItsView(nn.Module):
    """``conv(x) + x[:, :]``: the input map read by a convolution, then a view of it read elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x) + x[:, :]).mean((2, 3)))


def test_a_view_of_the_input_read_after_a_convolution_read_it_as_channels_is_exact():
    """The input read as channels by a convolution, then a view of it (a new tensor) read elementwise: the view
    keeps the channel layout. Exact. (It kills no mutant: ``channel_input`` 144 and 151, ``read_as_channels`` not
    set, survive it — the view's read does not reach ``neurons_from_raw``; a view taken before the convolution does:
    ``test_a_raw_view_of_the_input_read_after_a_convolution_read_it_as_channels_is_exact``.)"""
    torch.manual_seed(38)
    exact(InputAndItsView().to(DTYPE), torch.randn(3, 2, 4, 5, dtype=DTYPE))


# ----------------------------------------------------------------------- convolutions called as functions
class Functional(nn.Module):
    """``F.conv2d`` / ``F.conv1d`` called by hand: integer stride, padding and dilation by keyword, the
    defaults, ``padding='same'`` with an even kernel (torch puts the odd pad after), ``'valid'`` and
    ``groups=2`` with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 4, 2, 2))
        self.w3, self.b3 = nn.Parameter(torch.randn(4, 2, 2)), nn.Parameter(torch.randn(4))
        self.w4 = nn.Parameter(torch.randn(3, 4, 2))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x, self.w1, self.b1, stride=2, padding=1, dilation=1))
        h = torch.tanh(F.conv2d(h, self.w2, padding="same", dilation=1))  # kernel 2: one pad before, none after
        h = torch.tanh(F.conv2d(h, self.w2, padding="valid"))
        h = h.flatten(2)
        h = torch.tanh(F.conv1d(h, self.w3, self.b3, groups=2))
        return self.head(torch.tanh(F.conv1d(input=h, weight=self.w4)).mean(2))


def test_convolutions_called_by_hand_with_integer_and_string_arguments_are_exact():
    """``convolution_parts``, ``_per_axis`` and ``_padding`` for ``F.conv*d`` called with integers,
    the defaults, ``'same'`` with an even kernel, ``'valid'`` and groups with a bias. Exact. Kills _per_axis 2,
    4 and _padding 26."""
    torch.manual_seed(39)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's once-per-process note on 'same' with an even kernel
        exact(Functional().to(DTYPE), torch.randn(3, 2, 7, 6, dtype=DTYPE))


class InputTwice(nn.Module):
    """``a(x) + b(tanh(x))``: the model input read as channels as it is and after a tanh (two versions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) + self.b(torch.tanh(x))).mean((2, 3)))


def test_the_input_read_as_channels_in_two_versions_keeps_its_values_as_act():
    """``channel_input``'s neurons start at version 0 of the input set, so their tanh (version 1) is told apart:
    the input nodes hold the input's channels as their act. Exact. Kills channel_input 169."""
    torch.manual_seed(40)
    inputs = torch.randn(3, 2, 3, 4, dtype=DTYPE)
    graph = exact(InputTwice().to(DTYPE), inputs)
    nodes = torch.nonzero(graph.node_kind == int(gradgraph.NodeKind.INPUT)).flatten()
    act = graph.act[nodes].reshape(nodes.numel(), 3, -1)[:, :, :12]
    torch.testing.assert_close(act, inputs.reshape(3, 2, 12).permute(1, 0, 2), atol=0, rtol=0)


class PooledCat(nn.Module):
    """Average pooling of ``m.repeat(1, 2, 1, 1)`` (one neuron twice; ``cat([m, m], 1)`` converts since session 19,
    its second part a tied copy) or of ``cat([m, m.mean(1, keepdim=True)], 1)`` (a statistic over the channels as a
    channel)."""

    def __init__(self, statistic: bool) -> None:
        super().__init__()
        self.statistic = statistic
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(4 if statistic else 6, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        joined = torch.cat([m, m.mean(1, keepdim=True)], 1) if self.statistic else m.repeat(1, 2, 1, 1)
        return self.head(F.avg_pool2d(joined, 2).mean((2, 3)))


@pytest.mark.parametrize("statistic", [False, True])
def test_pooling_of_channels_that_are_not_distinct_neurons_is_refused_by_name(statistic):
    """``channel_neurons``' refusal of a row of channels that holds a neuron twice or a statistic, in full.
    Kills channel_neurons 101, 102, 107-112."""
    torch.manual_seed(41)
    refused(PooledCat(statistic).to(DTYPE), torch.randn(3, 2, 6, 6, dtype=DTYPE),
            " torch.nn.functional.avg_pool2d: its channels are not distinct neurons (a statistic, or one neuron twice)")


class ShiftedHalves(nn.Module):
    """Average pooling of ``cat([a(x)[..., :2], c(x)[..., 2:]], 1)``: distinct channels, but ``a``'s at positions 0
    and 1 and ``c``'s at 2 and 3, so the components vary along the channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.head = nn.Conv1d(2, 2, 1), nn.Conv1d(2, 2, 1), nn.Linear(4, 2)

    def forward(self, x):
        joined = torch.cat([torch.tanh(self.a(x))[..., :2], torch.tanh(self.c(x))[..., 2:]], 1)
        return self.head(F.avg_pool1d(joined, 2).mean(2))


def test_pooling_of_channels_at_other_positions_per_channel_is_refused_by_name():
    """``channel_neurons``' layout refusal, in full: a map whose channels are distinct neurons but sit at
    positions that differ from channel to channel. Kills channel_neurons 55, 56."""
    torch.manual_seed(42)
    refused(ShiftedHalves().to(DTYPE), torch.randn(3, 2, 4, dtype=DTYPE),
            " torch.avg_pool1d: its input does not hold channels on axis 1 (neurons) and positions on "
            "the spatial axes of each datapoint on axis 0; gradgraph reads convolutions and pooling over "
            "[b, channels, *spatial] with channels as neurons")


# ----------------------------------------------------------------------- a flatten into a head, by value
class FlattenHead(nn.Module):
    """``Linear`` over ``h.flatten(1)`` of a ``[b, C, H, W]`` map: ``h`` a convolution's output, or the input image
    that a convolution read as channels first (its first channel is node 0)."""

    def __init__(self, image: bool) -> None:
        super().__init__()
        self.image = image
        self.conv, self.head = nn.Conv2d(2, 3, 2), nn.Linear(2 * 9 if image else 3 * 4, 2)
        self.side = nn.Linear(3, 2) if image else None

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(x.flatten(1)) + self.side(h.mean((2, 3))) if self.image else self.head(h.flatten(1))


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("batch", [3, 1])
def test_a_flattened_map_read_by_a_linear_head_is_exact(batch, image):
    """``spread_positions`` on a convolution's map or on the input image (its first neuron is node 0), a batch of
    one too (one row). Exact. Kills spread_positions 45-47, 49, 50, 78."""
    torch.manual_seed(43)
    exact(FlattenHead(image).to(DTYPE), torch.randn(batch, 2, 3, 3, dtype=DTYPE))


class FlattenStatistic(nn.Module):
    """``cat([m, m.mean(1, keepdim=True)], 1).flatten(1)`` read by a ``Linear``: a statistic among the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 2), nn.Linear(4 * 4, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        return self.head(torch.cat([m, m.mean(1, keepdim=True)], 1).flatten(1))


def test_a_flattened_map_with_a_statistic_among_its_channels_is_left_to_the_affine_rule():
    """``spread_positions`` leaves a row with a statistic (node ``-1``) to the affine rule, which refuses it.
    Kills spread_positions 34, 44."""
    torch.manual_seed(44)
    refused(FlattenStatistic().to(DTYPE), torch.randn(3, 2, 3, 3, dtype=DTYPE),
            " (module 'head' of type Linear): torch.nn.functional.linear: applied to an axis that holds positions or "
            "datapoints, not features (e.g. a Linear over tokens, as in MLP-Mixer); gradgraph needs affine maps over "
            "the last, feature axis")


class TwoHeads(nn.Module):
    """One flattened map read by two ``Linear`` heads, and by a tanh before a third."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b, self.c = nn.Conv2d(2, 3, 2), nn.Linear(12, 2), nn.Linear(12, 2), nn.Linear(12, 2)

    def forward(self, x):
        flat = torch.tanh(self.conv(x)).flatten(1)
        return self.a(flat) + self.b(flat) + self.c(torch.tanh(flat))


def test_a_flattened_map_read_by_several_heads_is_exact():
    """``spread_positions`` stores the spread meta on the flattened value, so a second head reads the same
    copies, and a tanh of it a later version of them. Exact. Kills spread_positions 117, 121."""
    torch.manual_seed(45)
    exact(TwoHeads().to(DTYPE), torch.randn(3, 2, 3, 3, dtype=DTYPE))


class PatchesThenChannels(nn.Module):
    """The input's patches (``Conv2d(2, 3, 2, stride=2)``), then a view of the input read as channels by a
    ``Conv2d(2, 3, 3, padding=1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.point, self.head = nn.Conv2d(2, 3, 2, stride=2), nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.patch(x).mean((2, 3)) + self.point(x[:, :]).mean((2, 3)))


def test_the_input_read_as_channels_after_its_patches_is_refused_by_name():
    """``channel_input``'s width check: the input read as 8 features per patch, then as 2 channels, refused by
    the second reader and how it reads. Kills channel_input 146, 147."""
    torch.manual_seed(46)
    refused(PatchesThenChannels().to(DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE),
            " (module 'point' of type Conv2d): gradgraph.convert.trace.rules_conv.gather_taps: the input is read as 2 "
            "channels here but 8 elsewhere")


# ----------------------------------------------------------------------- pooling, the input grid's keys (mut40)
class ClassTokenPooled(nn.Module):
    """Token ids, a class token prepended (its component the newest key, first), a max pool of stride 1 over the
    tokens (a same-size grid), the pooled and the original tokens concatenated along the features, a Linear, learned
    positions, a mean over the tokens."""

    def __init__(self, width: int = 3, tokens: int = 4) -> None:
        super().__init__()
        self.embed, self.cls = nn.Embedding(7, width), nn.Parameter(torch.randn(1, 1, width))
        self.mix, self.positions = nn.Linear(2 * width, width), nn.Parameter(torch.randn(tokens + 1, width) / 3)
        self.head = nn.Linear(width, 2)

    def forward(self, ids):
        h = torch.cat([self.cls.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1)
        pooled = F.max_pool1d(h.transpose(1, 2), 3, 1, 1).transpose(1, 2)
        return self.head(torch.tanh(self.mix(torch.cat([pooled, h], dim=-1)) + self.positions)).mean(1)


def test_a_same_size_pooling_of_tokens_after_a_class_token_keeps_their_components():
    """``spatial_pool`` hands ``position_comps`` the input grid's components (``like``): a same-size pooling keeps
    them by index, so the pooled tokens line up with the tokens they are joined to. The class token's component is
    first and not key 0, so grids numbered afresh would put two components at one position. Exact against a loop
    over the datapoints, one component per (datapoint, token) and one for the mean. Kills spatial_pool 68, 73
    (``like`` dropped)."""
    torch.manual_seed(61)
    model = ClassTokenPooled().to(DTYPE)
    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(9))
    gradgraph.convert.clear_structure_cache()
    graph = assert_matches_autograd_loop(model, ids, None, squared)
    assert graph.num_components == 3 * (5 + 1)


class OneChannelPooled(nn.Module):
    """``Conv1d(2, 1)`` (one channel) ``-> tanh -> max_pool1d(·, 2) -> Conv1d(1, 2) ->`` mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv1d(2, 1, 3, padding=1), nn.Conv1d(1, 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(F.max_pool1d(torch.tanh(self.a(x)), 2))).mean(2))


def test_a_pooling_of_a_one_channel_map_is_exact():
    """``spatial_pool`` reads the input grid's components at channel 0 (every channel holds the same ones, which
    ``channel_neurons`` checks): a map of one channel has no other. Exact against a loop over the datapoints.
    Kills spatial_pool 81 (channel 1 read: an ``IndexError`` inside the rule)."""
    torch.manual_seed(62)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(OneChannelPooled().to(DTYPE), torch.randn(3, 2, 6, dtype=DTYPE), None, squared)


def _pad_without_a_rule(module: str) -> str:
    """The refusal of a constant ``F.pad`` no rule takes, read by ``module``'s ``Linear``, as a full match (the two
    locations by their form: under mutmut the user's frame is the trampoline's)."""
    where = r"\S+:\d+ in \S+"
    message = (": torch.nn.functional.pad: gradgraph has no rule for this op, and its result reaches "
               f"torch.nn.functional.linear with the parameter '{module}.weight' at ")
    rest = (f" (module '{module}'). Write it with supported ops, register it with "
            "gradgraph.convert.register_elementwise if it is elementwise, or register a converter for the whole module")
    return f"^{where}{re.escape(message)}{where}{re.escape(rest)}$"


# ----------------------------------------------------------------------- a constant pad of a map's positions (mut40)
class PaddedStatistic(nn.Module):
    """A constant ``F.pad`` of the positions of ``cat([m, m.mean(1, keepdim=True)], 1)`` (a statistic over the
    channels as a channel: no channel row of neurons), read by a ``Conv1d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.b, self.head = nn.Conv1d(2, 3, 3), nn.Conv1d(4, 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        joined = torch.cat([m, m.mean(1, keepdim=True)], 1)
        return self.head(torch.tanh(self.b(F.pad(joined, (1, 0)))).mean(2))


def test_a_constant_pad_of_a_map_without_a_channel_row_is_refused_as_an_op_without_a_rule():
    """``pads_positions`` takes a constant pad of a map's positions only where its channels are one row of neurons
    (``channel_row``); a map with a statistic among its channels is no such map, and the pad is refused as an op
    without a rule, in full. Kills pads_positions 28 (``and`` for the second ``or``: the pad taken on because its
    components vary along the positions, then refused by the pooling rule's words, "its channels are not distinct
    neurons")."""
    torch.manual_seed(63)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=_pad_without_a_rule("b")):
        gradgraph.to_graph(PaddedStatistic().to(DTYPE), torch.randn(3, 2, 6, dtype=DTYPE), None, squared)


# ----------------------------------------------------------------------- the input read as channels (mut40)
class ViewBeforeTheConvolution(nn.Module):
    """``conv(x) + v`` with ``v`` a view of the input taken *before* the convolution read ``x`` (``x[:, :]``,
    ``x.view(x.shape)``): ``v`` is still a raw view of the input when the sum reads it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, 2)

    def forward(self, x):
        v = x[:, :] if self.how == "slice" else x.view(x.shape)
        return self.head(torch.tanh(self.conv(x) + v).mean((2, 3)))


@pytest.mark.parametrize("how", ["slice", "view"])
def test_a_raw_view_of_the_input_read_after_a_convolution_read_it_as_channels_is_exact(how):
    """``channel_input`` marks the input set ``read_as_channels``, so that a raw view of the input read afterwards
    (``neurons_from_raw``) is read as channels too. Exact against a loop over the datapoints. Kills channel_input
    144, 151 (the mark not set: the view read as 5 features of its last axis, refused as "the input is read with 5
    features here but 2 elsewhere")."""
    torch.manual_seed(64)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(ViewBeforeTheConvolution(how).to(DTYPE), torch.randn(3, 2, 4, 5, dtype=DTYPE), None,
                                 squared)


# ----------------------------------------------------------------------- a flatten into a head, one datapoint (mut40)
class FlattenedWhole(nn.Module):
    """``head(tanh(conv(x)).flatten())[None]``: a forward written for one datapoint, the whole map flattened into one
    axis (no datapoint axis left) and read by a ``Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Conv2d(2, 3, 2), nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)).flatten())[None]


def test_a_map_of_one_datapoint_flattened_into_one_axis_and_read_by_a_linear_is_exact():
    """A batch of one: ``h.flatten()`` is a one-axis value of (channel, position) pairs of that datapoint, which
    ``spread_positions`` spreads as it does ``h.flatten(1)``. Exact against autograd on the one datapoint. Kills
    spread_positions 4 (``x.dim() == 1`` for ``== 0``: the one-axis value left to the affine rule, refused as
    "applied to an axis that holds positions or datapoints")."""
    torch.manual_seed(65)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(FlattenedWhole().to(DTYPE), torch.randn(1, 2, 3, 3, dtype=DTYPE), None, squared)


# ----------------------------------------------------------------------- a crop spelled for every axis (mut40)
class CroppedEveryAxis(nn.Module):
    """``F.pad(m, pad)`` with a pair for every axis of ``m [b, C, L]``, zero but for a crop of the positions
    (``(0, -1, 0, 0, 0, 0)`` or ``(-1, 0, 0, 0, 0, 0)``), read by a ``Conv1d``."""

    def __init__(self, pad: tuple) -> None:
        super().__init__()
        self.pad = pad
        self.a, self.b, self.head = nn.Conv1d(2, 3, 2), nn.Conv1d(3, 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(F.pad(torch.tanh(self.a(x)), self.pad))).mean(2))


@pytest.mark.parametrize("pad", [(0, -1, 0, 0, 0, 0), (-1, 0, 0, 0, 0, 0)])
def test_a_crop_with_a_pair_for_every_axis_is_a_slice_and_exact(pad):
    """``padding_parts`` takes a pad with a pair for every axis (``len(pad) // 2 == x.dim()``) and runs a crop as a
    slice. Exact against a loop over the datapoints. Kills padding_parts 16 (``>=`` for ``>``: the pad left to the
    rules, refused as an op without a rule)."""
    torch.manual_seed(66)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(CroppedEveryAxis(pad).to(DTYPE), torch.randn(3, 2, 6, dtype=DTYPE), None, squared)


# ----------------------------------------------------------------------- a pad naming the channel axis (mut44)
class PaddedNamingChannels(nn.Module):
    """A convolution's map ``[b, 3, *S]`` padded with a constant (0.5) by ``pad``, which may give pairs for the
    channel and datapoint axes too, then a second convolution and a head; ``on_input`` pads the model input
    instead (TF-style "same" padding of the image), ``added`` the channels the pad adds."""

    def __init__(self, pad: tuple, spatial: int = 1, on_input: bool = False, added: int = 0) -> None:
        super().__init__()
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        self.pad, self.on_input = pad, on_input
        self.a = conv(2 + (added if on_input else 0), 3, 2)
        self.b, self.head = conv(3 + (0 if on_input else added), 2, 2), nn.Linear(2, 2)

    def forward(self, x):
        h = F.pad(x, self.pad, value=0.5) if self.on_input else x
        h = torch.tanh(self.a(h))
        if not self.on_input:
            h = F.pad(h, self.pad, value=0.5)
        return self.head(torch.tanh(self.b(h)).flatten(2).mean(2))


ZERO_PAIRS = [((1, 0, 0, 0), 1, False), ((0, 2, 0, 0, 0, 0), 1, False), ((1, 0, 0, 1, 0, 0, 0, 0), 2, False),
              ((1, 1, 0, 0), 1, True), ((0, 1, 1, 0, 0, 0), 2, True)]


@pytest.mark.parametrize(("pad", "spatial", "on_input"), ZERO_PAIRS)
def test_a_constant_pad_with_zero_pairs_for_the_channel_and_datapoint_axes_is_the_pad_of_the_positions(
        pad, spatial, on_input):
    """``F.pad(m, (1, 0, 0, 0))``: the pair for the channel axis (and the datapoint axis) given, and zero, of a map
    or of the model input. The op is the pad of the spatial axes alone, element for element, so ``pads_positions``
    takes it as that pad: exact against a loop over the datapoints, the same graph as the spatial pad's (every
    tensor), and three sampled elements of the inferred group keep the function and map the graph to the permuted
    model's. It was refused as an op without a rule, a refusal stricter than needed (runs conv 7-10's
    ``pads_positions`` 6, 19, 21, 23: the length check weakened converted it exactly; lifted by mut44, issue 31).
    Kills, as run conv 11 numbers the lifted function, pads_positions 21 (``>=``: a pair for every axis refused),
    22, 23 (``any(None)``, ``2 / …``: a ``TypeError``) and 26 (the spatial pair read as well: every pad refused)."""
    from strategies import assert_same_graph

    torch.manual_seed(70)
    model = PaddedNamingChannels(pad, spatial, on_input).to(DTYPE)
    inputs = torch.randn(3, 2, *[6] * spatial, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    graph = assert_matches_autograd_loop(model, inputs, None, squared)
    plain = PaddedNamingChannels(pad[:2 * spatial], spatial, on_input).to(DTYPE)
    plain.load_state_dict(model.state_dict())
    assert_same_graph(graph, gradgraph.to_graph(plain, inputs, None, squared), atol=0)
    for seed in range(3):
        assert_group_keeps_function(model, inputs, None, squared, seed=seed)


def test_a_constant_pad_adding_channels_to_the_model_input_stays_refused_as_an_op_without_a_rule():
    """``F.pad(x, (0, 0, 1, 0))`` of the model input: a pair for the channel axis that is not zero adds a constant
    channel, which no input neuron holds; ``pads_positions`` still turns it away (and no other rule takes it), so
    it stays refused as an op without a rule, in full. (A map's channels padded so are a pad of neuron values,
    ``rules_pad.py``'s.) Kills, as run conv 11 numbers the lifted function, pads_positions 6 (``and`` for the
    last ``or``), 24, 25 (the pairs read from ``3 * …`` or ``x.dim() + 2``) and 27 (``True`` for any pad the guard
    turns away): the pad taken on, and the rule fails on the input's two channels against the padded three, an
    error reported as the model's, not a refusal."""
    torch.manual_seed(71)
    gradgraph.convert.clear_structure_cache()
    model = PaddedNamingChannels((0, 0, 1, 0), on_input=True, added=1).to(DTYPE)
    with pytest.raises(UnsupportedOperationError, match=_pad_without_a_rule("a")):
        gradgraph.to_graph(model, torch.randn(3, 2, 6, dtype=DTYPE), None, squared)


# ---- issue 31, branch mut51: the structural edges' parameter (run conv 18)


class WeightlessConvEdges(nn.Module):
    """``Conv2d -> GroupNorm(affine=False) -> max_pool2d -> pixel_shuffle -> Conv2d -> mean -> Linear``: the
    pooling's copy and the shuffle are joined by MERGE edges, the norm by NORM_SCALE edges without a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4, affine=False), nn.Conv2d(1, 3, 2)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.norm(self.a(x))), 2)
        return self.head(torch.tanh(self.b(F.pixel_shuffle(h, 2))).mean((2, 3)))


def test_the_merge_and_weightless_norm_edges_of_a_map_carry_edge_param_minus_one():
    """``graph.py``: ``edge_param`` is "-1 if the edge is structural", a field a user reads. The MERGE edges of a
    pooling's copy (``tied_copy``) and of a pixel shuffle, and the NORM_SCALE edges of a group norm without its
    affine parameters, carry ``-1``; every other edge a valid parameter index. Kills ``tied_copy`` 20,
    ``channel_norm`` 169 and ``pixel_shuffle`` 82 (the edges written with parameter ``-2``, listed equivalent by
    runs convert 10 and conv 1-3 as "every reader asks ``>= 0``"; run elementwise 29 killed their kind elsewhere);
    exact against torch.func."""
    torch.manual_seed(5)
    graph = exact(WeightlessConvEdges().to(DTYPE), torch.randn(3, 2, 6, 6, dtype=DTYPE))
    for kind in (gradgraph.EdgeKind.MERGE, gradgraph.EdgeKind.NORM_SCALE):
        structural = graph.edge_kind == int(kind)
        assert int(structural.sum()) > 0, kind
        assert set(graph.edge_param[structural].tolist()) == {-1}, kind
    valid = (graph.edge_param == -1) | ((graph.edge_param >= 0) & (graph.edge_param < len(graph.param_names)))
    assert bool(valid.all())
