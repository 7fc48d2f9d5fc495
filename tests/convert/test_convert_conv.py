"""Convolutional networks convert exactly (``trace/rules_conv.py``, ``docs/convolutions.md``).

Every test is float64 against torch.func (``reference_per_sample_grads``), tolerance 1e-10,
and samples an element of the inferred group: it must keep the function and map the graph to
the permuted model's graph tensor for tensor. Before convolutions had taps, every model here
except a patch embedding was refused ("a convolution uses the parameter ..."), so each test
failed; the group tests fail if a tap set is not tied to its channels (a channel permutation
would then move a channel's weights without its taps' activations: the permuted model's
graph differs).
"""

import os
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, randomise_batch_norms

import gradgraph
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus
from gradgraph.testing import assert_equivariant
from strategies import assert_same_graph

DTYPE = torch.float64


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def check(model, inputs, targets, *, moves=True, seed=0, metanet=None):
    """Exact per-sample gradients and mean gradient, a group element that keeps function and
    graph, and GradMetaNet's outputs moving with the group; returns the graph."""
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    per_sample = graph.per_sample_grads()
    for name, mean in graph.mean_grad().items():
        torch.testing.assert_close(mean, per_sample[name].mean(0), atol=1e-12, rtol=0, msg=name)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=seed)
    if moves:
        assert moved > 0, "the channel permutation group is trivial"
    if moves if metanet is None else metanet:  # (assert_equivariant needs a group that moves nodes)
        torch.manual_seed(seed)
        small = GradMetaNet(4, num_component_layers=1, num_node_layers=1, edge_out_channels=1, node_out_channels=1,
                            graph_out_channels=1).to(DTYPE)
        assert_equivariant(small, [graph])
    return graph


# ----------------------------------------------------------------------------- models
class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        h = F.avg_pool2d(torch.tanh(self.conv2(h)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h.flatten(1))))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        make_norm = nn.BatchNorm2d if norm else (lambda channels: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm), make_norm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm), make_norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:  # the strided 1x1 shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm), make_norm(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(nn.Module):
    """ResNet-8 (stem, three basic blocks, global average pooling, linear head), narrow."""

    def __init__(self, norm=True, width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=not norm)
        self.bn = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.blocks = nn.Sequential(BasicBlock(width, width, 1, norm), BasicBlock(width, 2 * width, 2, norm),
                                    BasicBlock(2 * width, 2 * width, 2, norm))
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class DepthwiseSeparable(nn.Module):
    """MobileNet's block: depthwise 3x3 ('same'), pointwise 1x1, BatchNorm, then a grouped conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding="same", groups=4)
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.pointwise(F.relu(self.depthwise(h))))
        return self.fc(F.relu(self.grouped(h)).mean((2, 3)))


class Dilated1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 5, 3, dilation=2, padding=2)
        self.b = nn.Conv1d(5, 4, 4, padding="same", dilation=3)
        self.c = nn.Conv1d(4, 4, 2, stride=3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.fc(h.mean(-1))


class TextCNN(nn.Module):
    """Kim's 1-D text CNN: embeddings, convolutions of widths 2 and 3, max over time, a linear head."""

    def __init__(self, vocabulary=11, width=6):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.conv2 = nn.Conv1d(width, 4, 2)
        self.conv3 = nn.Conv1d(width, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)  # [b, width, T]
        pooled = [F.relu(self.conv2(h)).max(dim=2).values, F.max_pool1d(F.relu(self.conv3(h)), h.shape[2]).squeeze(2)]
        return self.fc(torch.cat(pooled, dim=1))


class ZooCNN(nn.Module):
    """The Small CNN Zoo's architecture: three 3x3 stride-2 convolutions, global average pooling, a linear head."""

    def __init__(self, width=4):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, 2), nn.Conv2d(width, width, 3, 2),
                                    nn.Conv2d(width, width, 3, 2)])
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.fc(x.mean((2, 3)))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0))
        self.b = nn.Conv3d(3, 4, 2, dilation=(1, 1, 2))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.max_pool3d(F.relu(self.a(x)), (1, 2, 2))
        return self.fc(F.relu(self.b(h)).flatten(2).amax(-1))


class NormCNN(nn.Module):
    """GroupNorm (2 groups of 3 channels) and an affine InstanceNorm between convolutions."""

    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6)
        self.b, self.inorm = nn.Conv2d(6, 4, 3, stride=2), nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.a(x)))
        h = F.relu(self.inorm(self.b(h)))
        return self.fc(h.mean((2, 3)))


# ----------------------------------------------------------------------------- tests
def test_lenet5():
    torch.manual_seed(0)
    model = LeNet5().to(DTYPE).eval()
    # GradMetaNet on its 1570 components takes ~90 s in float64: its equivariance is checked on the smaller nets
    graph = check(model, torch.randn(2, 1, 28, 28, dtype=DTYPE), torch.randint(0, 10, (2,)), metanet=False)
    # one component per (datapoint, position) of the largest grid, plus the flattened head's
    assert graph.num_components == 2 * (28 * 28 + 1)


def test_resnet8_with_batch_norm_in_eval_and_strided_shortcut():
    torch.manual_seed(1)
    model = randomise_batch_norms(ResNet8(norm=True).to(DTYPE))
    # the running statistics are buffers: permute_model moves them with the channels (else the
    # permuted model computes another function and the check fails)
    check(model, torch.randn(3, 3, 8, 8, dtype=DTYPE), torch.randint(0, 5, (3,)))


def test_batch_norm_with_statistics_of_no_module_fixes_its_channels():
    """F.batch_norm on tensors that are no module's buffers: nothing would move them, so no
    channel of the norm moves (the check would fail if they did: the function changes)."""

    class LooseNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)
            self.gamma, self.beta = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
            self.stats = (torch.randn(3), torch.rand(3) + 0.5)

        def forward(self, x):
            h = F.batch_norm(self.conv(x), *self.stats, self.gamma, self.beta, training=False)
            return self.fc(F.relu(h).mean((2, 3)))

    torch.manual_seed(11)
    model = LooseNorm().to(DTYPE).eval()
    model.stats = tuple(stat.to(DTYPE) for stat in model.stats)
    graph = check(model, torch.randn(2, 2, 5, 5, dtype=DTYPE), torch.randint(0, 2, (2,)), moves=False)
    assert bool((graph.perm_group[graph.node_kind == int(gradgraph.NodeKind.NORM)] == -1).all())


def test_residual_cnn_moves_channels_with_its_shortcuts():
    torch.manual_seed(2)
    model = ResNet8(norm=False).to(DTYPE).eval()
    check(model, torch.randn(3, 3, 8, 8, dtype=DTYPE), torch.randint(0, 5, (3,)))


def test_input_read_as_windows_and_again_is_traced_with_channels():
    """``conv(x) + x`` reads the model input as windows and again as channels: the trace starts
    over reading it as channels (one input neuron would otherwise hold two values per component)."""

    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x) + x).mean((2, 3)))

    torch.manual_seed(13)
    model = InputResidual().to(DTYPE).eval()
    inputs, targets = torch.randn(2, 3, 5, 5, dtype=DTYPE), torch.randint(0, 2, (2,))
    graph = check(model, inputs, targets, moves=False)
    assert int((graph.node_kind == int(gradgraph.NodeKind.INPUT)).sum()) == 3  # the channels
    assert_same_graph(gradgraph.to_graph(model, inputs, targets, cross_entropy), graph)  # the cached plan's replay


def test_inception_block_concatenates_branches_along_channels():
    """Branches of 1x1, 3x3, 5x5 convolutions and a max pool concatenated along channels, then a
    strided convolution and a flatten head: the next convolution's taps copy each branch's
    channels as sets of their own, so every branch keeps its channel permutations."""

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.b1, self.b3, self.b5 = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 2, 5, padding=2)
            self.mix, self.fc = nn.Conv2d(7 + 4, 5, 3, stride=2), nn.Linear(5 * 2 * 2, 3)

        def forward(self, x):
            h = F.relu(self.stem(x))
            h = torch.cat([F.relu(self.b1(h)), F.relu(self.b3(h)), F.relu(self.b5(h)), F.max_pool2d(h, 3, 1, 1)], dim=1)
            return self.fc(F.relu(self.mix(h)).flatten(1))

    torch.manual_seed(14)
    check(Inception().to(DTYPE).eval(), torch.randn(2, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (2,)))


def test_depthwise_separable_block():
    torch.manual_seed(3)
    check(DepthwiseSeparable().to(DTYPE).eval(), torch.randn(2, 3, 7, 7, dtype=DTYPE), torch.randint(0, 3, (2,)))


def test_dilated_and_padded_1d_convolutions():
    torch.manual_seed(4)
    # torch notes 'same' with an even kernel once per process (TORCH_WARN_ONCE): asserting the note failed
    # whenever another test in the process had padded so first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(Dilated1d().to(DTYPE).eval(), torch.randn(3, 3, 11, dtype=DTYPE), torch.randint(0, 2, (3,)))


def test_text_cnn_with_max_over_time():
    torch.manual_seed(5)
    check(TextCNN().to(DTYPE).eval(), torch.randint(0, 11, (3, 7)), torch.randint(0, 3, (3,)))


def test_group_norm_and_instance_norm():
    """Group norm's channels move only within their group (the statistic mixes a group's
    channels; a permutation across groups would change the function and fail the check);
    instance norm's move freely."""
    torch.manual_seed(10)
    model = NormCNN().to(DTYPE)
    with torch.no_grad():
        for norm in (model.gn, model.inorm):
            norm.weight.normal_()
            norm.bias.normal_()
    graph = check(model.eval(), torch.randn(3, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,)))
    groups = graph.perm_group[graph.node_kind == int(gradgraph.NodeKind.NORM)]
    assert len(set(groups[:3].tolist())) == 1 and set(groups[:3].tolist()).isdisjoint(groups[3:6].tolist())
    # instance norm's channels (one per group) move freely together
    assert len(set(groups[6:10].tolist())) == 1 and int(groups[6]) >= 0


class ConvAndNormReaders(nn.Module):
    """One map ``h`` read raw by a strided convolution and normalised by ``norm`` (in that order
    or the other): the two ops want different versions of ``h``'s channels as their act."""

    def __init__(self, norm, norm_first, channels):
        super().__init__()
        self.stem, self.conv, self.norm = nn.Conv2d(2, channels, 3, padding=1), nn.Conv2d(channels, 4, 3, 2, 1), norm
        self.norm_first, self.head = norm_first, nn.Linear(4 + channels, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        if self.norm_first:
            normalised = self.norm(h)
            convolved = self.conv(h)
        else:
            convolved = self.conv(h)
            normalised = self.norm(h)
        return self.head(torch.cat([torch.relu(convolved).mean((2, 3)), normalised.mean((2, 3))], dim=1))


@pytest.mark.parametrize("channels", [4, 1])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_a_map_read_by_a_convolution_and_by_a_norm(norm, norm_first, channels):
    """The convolution's taps make ``h`` the act of its channels, the norm its normalised value:
    the second reader gets a tied copy of the channels (a MERGE set over axis 1). Checked to fail
    before: with 4 channels every case was refused ("these values do not hold one neuron per
    feature": the copy was made only for values whose neurons are on the last axis); with one
    channel, the convolution reading first, the copy was made over the last axis (one neuron per
    *position*) and the summed-gradient check refused the wrong graph ("the graph's gradient of
    'norm.weight' ... differs from autograd's")."""
    torch.manual_seed(14)
    module = {"batch": nn.BatchNorm2d(channels), "group": nn.GroupNorm(min(2, channels), channels),
              "instance": nn.InstanceNorm2d(channels, affine=True)}[norm]
    model = randomise_batch_norms(ConvAndNormReaders(module, norm_first, channels).to(DTYPE))
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    graph = check(model, torch.randn(3, 2, 5, 5, dtype=DTYPE), torch.randint(0, 3, (3,)), seed=int(norm_first),
                  moves=channels > 1)
    assert int((graph.node_kind == int(gradgraph.NodeKind.RESIDUAL)).sum()) >= channels  # the copy of h's channels


class UpsamplingCNN(nn.Module):
    """A small U-Net-style net: a strided encoder, ``nn.Upsample`` back to the input grid, a skip
    connection concatenated along channels, and an ``F.interpolate`` of another mode."""

    def __init__(self, mode, align_corners):
        super().__init__()
        self.down, self.inner = nn.Conv2d(2, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners)
        self.fuse, self.head = nn.Conv2d(6, 3, 3, padding=1), nn.Linear(3, 3)
        self.mode = mode

    def forward(self, x):
        h = self.up(torch.tanh(self.inner(torch.relu(self.down(x)))))
        h = torch.relu(self.fuse(torch.cat([h, x], dim=1)))
        h = F.interpolate(h, size=(3, 5), mode="area" if self.mode == "nearest" else "nearest")
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode, align_corners", [("nearest", None), ("bilinear", False), ("bilinear", True),
                                                  ("bicubic", False)])
def test_upsampling_in_a_unet_style_block(mode, align_corners):
    """``nn.Upsample`` / ``F.interpolate`` read per channel and per datapoint, as pooling: a copy
    of the channels at the new grid. Checked to fail before: refused ("torch.nn.functional.interpolate:
    gradgraph has no rule for this op")."""
    torch.manual_seed(15)
    model = UpsamplingCNN(mode, align_corners).to(DTYPE).eval()
    check(model, torch.randn(3, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,)))


class CausalTCN(nn.Module):
    """WaveNet-style: dilated causal 1-D convolutions (a constant ``F.pad`` on the left of the
    positions), gated ``tanh * sigmoid`` units, residual and skip connections."""

    def __init__(self, channels=4, value=0.0):
        super().__init__()
        self.inp, self.value = nn.Conv1d(2, channels, 1), value
        self.filters = nn.ModuleList(nn.Conv1d(channels, channels, 2, dilation=d) for d in (1, 2, 4))
        self.gates = nn.ModuleList(nn.Conv1d(channels, channels, 2, dilation=d) for d in (1, 2, 4))
        self.residuals = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in range(3))
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        h, skip = self.inp(x), 0
        for filter_conv, gate_conv, residual, dilation in zip(self.filters, self.gates, self.residuals, (1, 2, 4)):
            padded = F.pad(h, (dilation, 0), value=self.value)
            z = torch.tanh(filter_conv(padded)) * torch.sigmoid(gate_conv(padded))
            skip, h = skip + z, h + residual(z)
        return self.head(F.relu(skip).mean(-1))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_causal_dilated_convolutions_padded_by_f_pad(value):
    """A constant ``F.pad`` of the positions is read per channel, as pooling: a copy of the channels
    at the padded grid whose new places hold the constant (its act). Checked to fail before: refused
    ("torch.nn.functional.pad: gradgraph has no rule for this op")."""
    torch.manual_seed(16)
    check(CausalTCN(value=value).to(DTYPE), torch.randn(3, 2, 12, dtype=DTYPE), torch.randint(0, 3, (3,)))


@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (-1, 0, 0, -2), (0, -1)])
def test_a_constant_pad_by_nothing_or_a_crop_is_a_slice(pad):
    """``F.pad`` whose sides are all <= 0 (Swin pads every map to a multiple of its window, by
    nothing when it already is one; a negative side crops) is a slice of its input, of channels
    or of positions. Checked to fail before: refused ("torch.nn.functional.pad: gradgraph has no
    rule for this op")."""

    class Cropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mix = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 4, 1)
            self.head = nn.Linear(4 + pad[0] + pad[1], 3)

        def forward(self, x):
            h = F.pad(torch.relu(self.conv(x)), pad)  # positions (and none of the channels)
            return self.head(F.pad(torch.relu(self.mix(h)).mean((2, 3)), pad[:2]))  # features of the pooled map

    torch.manual_seed(17)
    check(Cropped().to(DTYPE), torch.randn(3, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,)))


@pytest.mark.parametrize("family", ["hand", pytest.param("MobileNetV2", marks=pytest.mark.slow), "EfficientNet"])
def test_a_constant_pad_of_the_input_image(family):
    """TF-style "same" padding of the model input before its first convolution (``F.pad`` of the
    image: ``transformers``' MobileNetV2 with ``tf_padding``, EfficientNet's ``nn.ZeroPad2d`` stem;
    and a hand-made one with a non-zero value): the image's channels become input neurons at the
    padded grid. Exact, with their group. Checked to fail before: refused
    ("torch.nn.functional.pad: gradgraph has no rule for this op")."""
    torch.manual_seed(19)
    if family == "hand":
        backbone = nn.Sequential(nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                                 nn.ConstantPad2d(1, 0.5), nn.Conv2d(4, 5, 3), nn.ReLU())
    else:
        transformers = pytest.importorskip("transformers")
        if family == "MobileNetV2":
            backbone = transformers.MobileNetV2Model(transformers.MobileNetV2Config(
                num_channels=3, image_size=16, depth_multiplier=0.1, min_depth=4, tf_padding=True))
        else:
            backbone = transformers.EfficientNetModel(transformers.EfficientNetConfig(
                num_channels=3, image_size=16, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
                kernel_sizes=[3, 3], in_channels=[8, 8], out_channels=[8, 8], depthwise_padding=[], strides=[1, 2],
                num_block_repeats=[1, 1], expand_ratios=[1, 2], squeeze_expansion_ratio=0.25))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, nn.LazyLinear(3)

        def forward(self, pixels):
            h = self.backbone(pixels)
            h = h if isinstance(h, torch.Tensor) else h.last_hidden_state
            return self.head(h.mean((2, 3)))

    model = Classifier().to(DTYPE)
    inputs = torch.randn(2, 3, 16, 16, dtype=DTYPE)
    model(inputs)  # the head's width
    model = randomise_batch_norms(model)
    check(model, inputs, torch.randint(0, 3, (2,)), metanet=family == "hand")


def test_a_constant_pad_of_the_channels_converts():
    """Padding the channel axis adds channels that are constants: refused until trace/rules_pad.py, which
    makes them constant neurons beside a tied copy of the channels (tests/convert/test_convert_feature_pad.py)."""

    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv1d(2, 3, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(F.pad(self.conv(x), (0, 0, 1, 1)).mean(-1))

    torch.manual_seed(0)
    check(PadChannels().to(DTYPE), torch.randn(3, 2, 8, dtype=DTYPE), torch.randint(0, 3, (3,)))


class SqueezeExcite(nn.Module):
    """A squeeze-and-excitation block whose squeeze is a reduction over positions written as timm
    writes it (``x.mean((2, 3), keepdim=True)``), or over one spatial axis at a time."""

    def __init__(self, squeeze):
        super().__init__()
        self.squeeze = squeeze
        self.conv, self.reduce, self.expand = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.squeeze == "mean keepdim":
            pooled = h.mean((2, 3), keepdim=True)
        elif self.squeeze == "amax keepdim":
            pooled = h.amax((2, 3), keepdim=True)
        elif self.squeeze == "one axis at a time":
            pooled = h.mean(3, keepdim=True).sum(2, keepdim=True)
        else:  # over the width only, then a new axis
            pooled = h.mean(3)[..., None]
        h = h * torch.sigmoid(self.expand(F.relu(self.reduce(pooled))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("squeeze", ["mean keepdim", "amax keepdim", "one axis at a time", "width only"])
def test_squeeze_and_excitation_pooled_by_a_reduction_over_positions(squeeze):
    """A map pooled over some of its positions, or with ``keepdim``, is read per channel as pooling
    (the positions left stay components). Checked to fail before: refused ("Tensor.mean: pooling
    that does not keep one neuron per feature")."""
    torch.manual_seed(17)
    check(SqueezeExcite(squeeze).to(DTYPE), torch.randn(3, 3, 5, 6, dtype=DTYPE), torch.randint(0, 3, (3,)))


class DenseBlock(nn.Module):
    """A DenseNet block: each layer (BatchNorm, ReLU, 3x3 convolution) reads the concatenation of
    the stem's channels and every earlier layer's, and appends its own."""

    def __init__(self, channels=4, growth=2, layers=2, norm=True):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(*([nn.BatchNorm2d(channels + i * growth)] if norm else []), nn.ReLU(),
                          nn.Conv2d(channels + i * growth, growth, 3, padding=1)) for i in range(layers))
        self.head = nn.Linear(channels + layers * growth, 3)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = torch.cat([h, layer(h)], dim=1)
        return self.head(F.avg_pool2d(h, 2).mean((2, 3)))


@pytest.mark.parametrize("norm", [True, False])
def test_densenet_block_keeps_the_symmetry_of_each_concatenated_part(norm):
    """A copy of ``cat([h, z])`` (two ReLUs of overlapping concatenations) and a BatchNorm over it are
    one set per part, each tied to its source, so the stem's channels and each layer's output move
    on their own. Checked to fail before: one copy set tied to both parts pinned them, and the
    inferred group had one orbit (the last layer's channels) instead of three."""
    torch.manual_seed(18)
    model = randomise_batch_norms(DenseBlock(norm=norm).to(DTYPE))
    graph = check(model, torch.randn(3, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,)))
    assert len(set(graph.perm_group.tolist()) - {-1}) == 3  # the stem's channels and each layer's growth


class LayerScaleCNN(nn.Module):
    """A per-channel parameter on a feature map, as ConvNeXt / PoolFormer write their layer scale
    (``gamma[:, None, None] * branch``, ``gamma.reshape(1, -1, 1, 1)``) or a per-channel shift."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.branch, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how == "index":
            h = h + self.branch(h) * self.gamma[:, None, None]
        elif self.how == "reshape":
            h = h + self.gamma.reshape(1, -1, 1, 1) * self.branch(h)
        else:
            h = torch.tanh(self.branch(h) + self.gamma[:, None, None])
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("how", ["index", "reshape", "shift"])
def test_a_per_channel_parameter_on_a_feature_map(how):
    """A parameter ``[C, 1, 1]`` times (or plus) a map ``[b, C, H, W]``: a scale (or bias) per
    channel, as over a last feature axis. Checked to fail before: refused ("a parameter combined
    with values that are not one neuron per feature")."""
    torch.manual_seed(20)
    check(LayerScaleCNN(how).to(DTYPE), torch.randn(3, 3, 5, 5, dtype=DTYPE), torch.randint(0, 3, (3,)))


@pytest.mark.parametrize("hand_written", [False, True])
def test_global_response_norm_of_convnext_v2(hand_written):
    """ConvNeXt V2's global response norm, ``x * N(x) * gamma + beta + x`` with ``N`` a vector norm
    over each channel's positions divided by its mean over channels: ``torch.linalg.vector_norm``
    is read as ``Tensor.norm``, a per-channel pooling like a mean. ``transformers``' ConvNextV2Model
    (channels-last, tiny config, GRN parameters randomised: they start at zero) and a hand-written
    channels-first GRN after a ReLU that leaves one channel all zero (a norm of 0, whose gradient
    torch defines as 0): exact, with their group. Checked to fail before: refused
    ("torch.linalg_vector_norm: gradgraph has no rule for this op")."""
    if hand_written:

        class GRNBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
                self.gamma, self.beta = nn.Parameter(torch.randn(1, 4, 1, 1)), nn.Parameter(torch.randn(1, 4, 1, 1))

            def forward(self, x):
                h = torch.relu(self.conv(x))
                norms = torch.linalg.vector_norm(h, ord=2, dim=(2, 3), keepdim=True)
                h = self.gamma * (h * (norms / (norms.mean(dim=1, keepdim=True) + 1e-6))) + self.beta + h
                return self.head(h.mean((2, 3)))

        torch.manual_seed(18)
        model = GRNBlock().to(DTYPE)
        with torch.no_grad():
            model.conv.weight[1] = 0.0
            model.conv.bias[1] = -1.0  # channel 1 is 0 everywhere after the ReLU
        inputs = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    else:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(18)
        backbone = transformers.ConvNextV2Model(transformers.ConvNextV2Config(
            num_channels=3, hidden_sizes=[4, 8], depths=[1, 1], num_stages=2, patch_size=2))
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                if ".grn." in name:
                    param.normal_()

        class GRNBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone, self.head = backbone, nn.Linear(8, 3)

            def forward(self, pixels):
                return self.head(self.backbone(pixels).pooler_output)

        model = GRNBlock().to(DTYPE)
        inputs = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    check(model, inputs, torch.randint(0, 3, (inputs.shape[0],)), metanet=hand_written)


@pytest.mark.parametrize("unshuffle", [False, True])
def test_pixel_shuffle_moves_channels_into_positions(unshuffle):
    """A sub-pixel convolution (ESPCN): ``nn.PixelShuffle(2)`` turns 4 C channels into C channels on
    a grid twice as fine, read by a convolution after it (and ``nn.PixelUnshuffle`` back). The
    shuffled channels are a new pinned set joined to the channels they hold; the channels before the
    shuffle are pinned; the first layer's hidden channels still move. Exact, with the group.
    Checked to fail before: refused ("torch.pixel_shuffle: gradgraph has no rule for this op")."""

    class SubPixel(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 3 * 4, 3, padding=1)
            self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
            self.c3, self.head = nn.Conv2d(12 if unshuffle else 3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            h = self.shuffle(self.c2(torch.relu(self.c1(x))))
            h = self.unshuffle(torch.tanh(h)) if unshuffle else torch.tanh(h)
            return self.head(torch.relu(self.c3(h)).mean((2, 3)))

    torch.manual_seed(20)
    graph = check(SubPixel().to(DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.randint(0, 3, (3,)))
    assert int((graph.perm_group >= 0).sum()) >= 5  # c1's hidden channels


def test_weight_standardization_is_refused_by_what_it_is():
    """BiT's ``WeightStandardizedConv2d`` standardises its weight with ``F.batch_norm(weight, ...,
    training=True)``: refused as arithmetic on a parameter, not with the training-mode batch norm
    message (whose remedy, ``model.eval()``, would not help)."""

    class WeightStandardized(nn.Conv2d):
        def forward(self, x):
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                  momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding)

    model = nn.Sequential(WeightStandardized(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).to(DTYPE).eval()
    with pytest.raises(gradgraph.UnsupportedModuleError,
                       match=r"a batch norm of a parameter \(weight standardization\)"):
        gradgraph.to_graph(model, torch.randn(2, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (2,)), cross_entropy)


@pytest.mark.parametrize("seed", [39, 45, 58, 75])
def test_a_gradient_that_cancels_to_zero_is_not_refused_as_a_missing_path(seed):
    """A GroupNorm with one channel per group, then BatchNorm and average pooling: ``grad`` is
    constant over the positions the GroupNorm normalised, so its scale's gradient cancels to about
    zero and both sides are rounding noise of the terms' size. The first conversion's summed-gradient
    check refused these four seeds of the first 100 ("differs from autograd's by 9.26e-14"): it
    bounded the rounding by the gradient's own size; it now falls back to the terms' magnitudes."""
    model = nn.Sequential(nn.Conv2d(2, 2, 1, 1, 1, 2, 2, padding_mode="reflect"), nn.ReLU(), nn.GroupNorm(2, 2),
                          nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    torch.manual_seed(seed)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    model = randomise_batch_norms(model.to(DTYPE))
    gradgraph.convert.clear_structure_cache()
    assert_exact_per_sample_grads(model, torch.randn(2, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (2,)),
                                  cross_entropy)


def test_conv3d_with_max_pooling():
    torch.manual_seed(6)
    check(Conv3dNet().to(DTYPE).eval(), torch.randn(2, 2, 4, 7, 8, dtype=DTYPE), torch.randint(0, 2, (2,)))


def test_zoo_cnn_gradmetanet_outputs_move_with_the_channel_permutation():
    torch.manual_seed(7)
    model = ZooCNN().to(DTYPE).eval()
    inputs, targets = torch.randn(2, 1, 15, 15, dtype=DTYPE), torch.randint(0, 10, (2,))
    graph = check(model, inputs, targets)
    # the input is read as the first convolution's windows: components are its 7x7 output grid
    # (not the 15x15 input; the last grid is 1x1, so its mean is its one position), and the input
    # neurons are (channel, tap) pairs
    assert graph.num_components == 2 * 7 * 7
    assert int((graph.node_kind == int(gradgraph.NodeKind.INPUT)).sum()) == 9
    metanet = GradMetaNet(8, num_component_layers=1, num_node_layers=1, edge_out_channels=2, node_out_channels=1,
                          graph_out_channels=1).to(DTYPE)
    assert_equivariant(metanet, [graph])
    plusplus = GradMetaNetPlusPlus(6, num_layers=1, heads=2, graph_out_channels=1, component_out_channels=1).to(DTYPE)
    assert_equivariant(plusplus, [graph])


def test_cached_conversion_equals_the_trace():
    """A second conversion replays the plan (gather_taps captured by op index): the same graph."""
    torch.manual_seed(8)
    model = ResNet8(norm=True).to(DTYPE)
    randomise_batch_norms(model)
    inputs, targets = torch.randn(2, 3, 8, 8, dtype=DTYPE), torch.randint(0, 5, (2,))
    first = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    other_inputs = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    replayed = gradgraph.to_graph(model, other_inputs, targets, cross_entropy)
    gradgraph.convert.clear_structure_cache()
    traced = gradgraph.to_graph(model, other_inputs, targets, cross_entropy)
    assert_same_graph(replayed, traced, atol=1e-12)
    assert not torch.equal(first.act, replayed.act)


def test_unbatched_convolution_is_refused_by_name():
    """An input without a datapoint axis is refused, never converted wrongly."""
    conv = nn.Conv1d(2, 3, 3).to(DTYPE)
    with pytest.raises(gradgraph.UnsupportedModuleError, match="conv1d"):
        gradgraph.to_graph(conv, torch.randn(2, 5, dtype=DTYPE), None, None)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("spatial", [1, 2])
def test_padding_modes(mode, spatial):
    """``padding_mode`` pads with ``F.pad`` before the convolution: read as indexing (a padded
    place holds the neuron and component it copies). Before, ``F.pad`` was opaque and refused."""
    torch.manual_seed(9)
    conv = (nn.Conv1d, nn.Conv2d)[spatial - 1]
    model = nn.Sequential(conv(2, 3, 3, padding=2, padding_mode=mode), nn.Tanh(),
                          conv(3, 4, 3, padding=1, padding_mode=mode, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3))
    inputs = torch.randn(2, 2, *[5] * spatial, dtype=DTYPE)
    model = model.to(DTYPE)
    model(inputs)  # materialise the lazy head
    check(model.eval(), inputs, torch.randint(0, 3, (2,)))


@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 12)), deadline=None)
@given(spatial=st.sampled_from([1, 2]), kernel=st.integers(1, 3), stride=st.integers(1, 3),
       padding=st.sampled_from([0, 1, 2, "same", "valid"]), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), size=st.integers(5, 8), seed=st.integers(0, 100))
def test_random_convolutions_are_exact(spatial, kernel, stride, padding, dilation, groups, size, seed):
    if padding == "same":
        stride = 1  # torch refuses 'same' with strides
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d)[spatial - 1]
    first = conv(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    second = conv(4, 4, kernel, padding="same", dilation=dilation, groups=groups)
    head = nn.Linear(4, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.head = first, second, head

        def forward(self, x):
            h = torch.tanh(self.second(torch.tanh(self.first(x))))
            return self.head(h.flatten(2).mean(-1))

    model = Net().to(DTYPE).eval()
    inputs = torch.randn(2, 2, *[size] * spatial, dtype=DTYPE)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on 'same' with even kernels
        check(model, inputs, torch.randint(0, 3, (2,)), moves=False, seed=seed)


def test_whisper_encoder():
    """``transformers``' WhisperEncoder (tiny config, eager attention): two 1-D convolutions
    (the second strided) under a transformer encoder; exact, and its group moves channels and heads."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(12)
    config = transformers.WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                        num_mel_bins=4, max_source_positions=6, attn_implementation="eager")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = WhisperEncoder(config), nn.Linear(16, 3)

        def forward(self, features):
            return self.head(self.encoder(features).last_hidden_state.mean(1))

    check(Classifier().to(DTYPE).eval(), torch.randn(2, 4, 12, dtype=DTYPE), torch.randint(0, 3, (2,)))


class _Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


@st.composite
def cnn_programs(draw):
    """A random CNN: 1-D or 2-D; blocks of convolutions (kernel, stride, padding incl. 'same' and
    padding modes, dilation, groups), activations, pooling, BatchNorm / GroupNorm, residual and
    depthwise blocks; then global average pooling or a flatten into a linear head.
    Returns ``(model, input shape)``."""
    spatial = draw(st.sampled_from([1, 2]))
    conv = (nn.Conv1d, nn.Conv2d)[spatial - 1]
    size = first_size = draw(st.integers(6, 9))
    channels = first_channels = draw(st.sampled_from([2, 4]))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "pool", "norm", "residual", "depthwise"]))
        if kind == "conv":
            kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            padding = draw(st.sampled_from([0, 1, "same"]))
            stride = 1 if padding == "same" else draw(st.integers(1, 2))
            mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])) if padding == 1 else "zeros"
            span = dilation * (kernel - 1) + 1
            if size + (2 if padding == 1 else 0) < span:
                continue
            out, groups = draw(st.sampled_from([2, 4])), draw(st.sampled_from([1, 2]))
            layers += [conv(channels, out, kernel, stride, padding, dilation, groups, padding_mode=mode),
                       draw(st.sampled_from([nn.ReLU(), nn.Tanh()]))]
            size = size if padding == "same" else (size + (2 if padding == 1 else 0) - span) // stride + 1
            channels = out
        elif kind == "pool" and size >= 4:
            average = draw(st.booleans())
            layers.append(((nn.MaxPool1d, nn.MaxPool2d), (nn.AvgPool1d, nn.AvgPool2d))[average][spatial - 1](2))
            size //= 2
        elif kind == "norm":
            batch = draw(st.booleans())
            if not batch and channels // 2 * size ** spatial < 2:
                continue  # a group of one value: torch's group_norm raises (no valid program to convert)
            norm = (nn.BatchNorm1d, nn.BatchNorm2d)[spatial - 1] if batch else partial(nn.GroupNorm, 2)
            layers.append(norm(channels))
        elif kind == "residual":
            layers.append(_Residual(nn.Sequential(conv(channels, channels, 3, padding=1), nn.ReLU())))
        elif kind == "depthwise":
            layers += [conv(channels, channels, 3, padding=1, groups=channels), nn.ReLU()]
    if draw(st.booleans()):
        layers += [(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[spatial - 1](1), nn.Flatten(), nn.Linear(channels, 3)]
    else:
        layers += [nn.Flatten(), nn.Linear(channels * size ** spatial, 3)]
    return nn.Sequential(*layers), (2, first_channels, *[first_size] * spatial)


@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 15)), deadline=None)
@given(program=cnn_programs(), seed=st.integers(0, 100))
def test_random_cnn_programs_convert_exactly(program, seed):
    """Random CNNs (``cnn_programs``): every one converts with exact per-sample gradients and a
    group whose sampled element keeps the function and maps the graph (none is refused)."""
    import warnings

    model, shape = program
    torch.manual_seed(seed)
    for parameter in model.parameters():  # a fresh draw: hypothesis reuses the drawn modules
        torch.nn.init.normal_(parameter, std=0.5)
    model = randomise_batch_norms(model.to(DTYPE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on 'same' with even kernels
        check(model, torch.randn(*shape, dtype=DTYPE), torch.randint(0, 3, (shape[0],)), moves=False, seed=seed,
              metanet=False)
