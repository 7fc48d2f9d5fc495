"""Random convolutional programs: the traced converter is exact or refuses, never silently wrong.

``tests/convert/test_convert_conv.py`` draws CNNs as *chains* (convolutions, pooling, norms, a
residual block). Here hypothesis writes programs over a pool of feature maps
``[b, channels, *spatial]`` (1-D, 2-D or 3-D), as ``tests/convert/test_convert_fuzz.py`` does for
``[b, width]`` values, so the pieces meet in combinations nobody wrote by hand: a strided
convolution next to a pooled branch, a concatenation of channels from two depths, one map's
channel gating another map, squeeze-and-excitation, channel shuffles, channel slices, softmax over
channels, a value centred or normalised over its positions (which couples the components of
one datapoint), nearest upsampling, pooling with padding and ``ceil_mode``, adaptive pooling to a
size above one, a learned table resampled by ``F.interpolate`` to a map's positions and added to it (to part of
its channels, flipped, or multiplied: refused). Each program either raises gradgraph's refusal (``UnsupportedModuleError`` /
``GradGraphError``) naming the program's line, an input or a parameter, or converts with
per-sample gradients equal to torch.func's (float64, 1e-10) and an inferred group whose sampled
element keeps the function and maps the graph to the permuted model's graph.

``GRADGRAPH_FUZZ_EXAMPLES=N`` runs N programs (a longer campaign; with ``--hypothesis-seed`` for
fresh ones).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function

from gradgraph.errors import GradGraphError, UnsupportedModuleError

pytestmark = pytest.mark.slow  # a fuzz campaign: left out by `./gg test --fast`

DTYPE = torch.float64
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu}
IN_PLACE_ACTIVATIONS = {"relu": lambda h: F.relu(h, inplace=True), "tanh": lambda h: h.tanh_(),
                        "sigmoid": torch.sigmoid_, "silu": lambda h: F.silu(h, inplace=True),
                        "hardswish": lambda h: F.hardswish(h, inplace=True)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
ADAPTIVE = {("avg", 1): F.adaptive_avg_pool1d, ("avg", 2): F.adaptive_avg_pool2d, ("avg", 3): F.adaptive_avg_pool3d,
            ("max", 1): F.adaptive_max_pool1d, ("max", 2): F.adaptive_max_pool2d, ("max", 3): F.adaptive_max_pool3d}


class ConvProgram(nn.Module):
    """Runs ``steps`` on a pool of feature maps ``[b, C, *S]``; each step appends one map.

    Steps (``i``, ``j``: earlier values; value 0 is the input):
    ``("conv", i, out, kernel, stride, padding, dilation, groups, mode)``, ``("act", i, name)``,
    ``("add", i, j)`` and ``("mul", i, j)`` (equal shapes), ``("gate", i, channel, j)`` (channel
    ``channel`` of ``i`` times every channel of ``j``), ``("excite", i, hidden)``
    (squeeze-and-excitation: a mean over positions, two linears, a sigmoid scaling ``i``'s channels),
    ``("cat", i, j)`` (channels, equal positions), ``("slice", i, start, stop)`` (channels),
    ``("shuffle", i, groups)`` (reshape/transpose), ``("pool", i, kind, kernel, stride, padding,
    ceil)`` (``kind`` max or avg), ``("adaptive", i, kind, size)``, ``("norm", i, kind)`` (batch in
    eval with random statistics, group, instance with or without affine), ``("softmax", i)`` (over
    channels), ``("center", i)`` (minus the mean over positions), ``("upsample", i)`` (nearest, 2x),
    ``("act_", i, name)`` (the activation in place: ``F.relu(h, inplace=True)``, ``h.tanh_()``, …) and
    ``("iadd", i, j)`` (``h = values[i]; h += values[j]``): in place, value ``i`` changes too, so a
    later step that reads it reads the changed value (gradgraph refuses that read by name),
    ``("scale", i)`` (a per-channel parameter times ``i``, a layer scale), ``("grn", i)`` (ConvNeXt V2's
    global response norm without parameters: ``i`` times its channels' norms over positions over their
    mean), ``("crop", i)`` (``F.pad`` by -1 before each spatial axis), ``("part", i, start, stop, op)`` (channels
    ``start:stop`` scaled by 3 or through tanh, the rest passed by: per-group code), ``("pixel_shuffle", i)`` and
    ``("pixel_unshuffle", i)`` (2-D maps, factor 2), ``("chanpad", i, before, after, value)`` (a constant
    ``F.pad`` of the channels: the CIFAR ResNets' option A shortcut), ``("roll", i, shift)`` (``torch.roll`` along
    the last spatial axis), ``("crelu", i)`` (``cat([relu(i), relu(-i)], 1)``: the channels twice in one cat) and
    ``("zerocat", i, k)`` (``cat([i, zeros], 1)``: ``k`` zero channels joined, the pad it equals).
    ``head``: ``"mean"`` (global average pooling), ``"max"`` (global max) or ``"flatten"``, then a
    linear map to 3 outputs.
    """

    def __init__(self, spatial: int, in_channels: int, size: int, steps: list[tuple], head: str) -> None:
        super().__init__()
        self.spatial, self.steps, self.head_kind = spatial, steps, head
        self.layers = nn.ModuleDict()
        shapes = [(in_channels, size)]
        generator = torch.Generator().manual_seed(len(steps))
        for index, step in enumerate(steps):
            kind, source = step[0], step[1]
            channels, length = shapes[source]
            if kind == "conv":
                out, kernel, stride, padding, dilation, groups, mode = step[2:]
                self.layers[str(index)] = CONV[spatial](channels, out, kernel, stride, padding, dilation, groups,
                                                       padding_mode=mode)
                channels, length = out, conv_length(length, kernel, stride, padding, dilation)
            elif kind == "scale":
                self.layers[str(index)] = nn.ParameterList([nn.Parameter(torch.rand(channels) + 0.5)])
            elif kind == "positions":  # a learned table [1, C, *grid] resampled to the map's positions
                grid = step[2]
                self.layers[str(index)] = nn.ParameterList([nn.Parameter(torch.randn(1, channels, *[grid] * spatial))])
            elif kind == "excite":
                self.layers[str(index)] = nn.Sequential(nn.Linear(channels, step[2]), nn.ReLU(),
                                                        nn.Linear(step[2], channels), nn.Sigmoid())
            elif kind == "norm":
                if step[2] == "batch":
                    norm = BATCH_NORM[spatial](channels)
                    with torch.no_grad():  # eval BatchNorm away from the identity
                        norm.running_mean.copy_(torch.randn(channels, generator=generator))
                        norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                    norm.eval()
                elif step[2] == "group":
                    norm = nn.GroupNorm(2 if channels % 2 == 0 else 1, channels)
                else:
                    norm = INSTANCE_NORM[spatial](channels, affine=step[2] == "instance-affine")
                self.layers[str(index)] = norm
            elif kind == "gate":  # one channel of i times every channel of j
                channels = shapes[step[3]][0]
            elif kind == "cat":
                channels += shapes[step[2]][0]
            elif kind == "slice":
                channels = step[3] - step[2]
            elif kind == "pool":
                _, _, _, kernel, stride, padding, ceil = step
                length = pool_length(length, kernel, stride, padding, ceil)
            elif kind == "adaptive":
                length = step[3]
            elif kind == "upsample":
                length *= 2
            elif kind == "crop":
                length -= 1
            elif kind == "chanpad":
                channels += step[2] + step[3]
            elif kind == "crelu":
                channels *= 2
            elif kind == "zerocat":
                channels += step[2]
            elif kind == "pixel_shuffle":
                channels, length = channels // 4, length * 2
            elif kind == "pixel_unshuffle":
                channels, length = channels * 4, length // 2
            shapes.append((channels, length))
        self.shapes = shapes
        channels, length = shapes[-1]
        features = channels * length ** spatial if head == "flatten" else channels
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        values = [x]
        for index, step in enumerate(self.steps):
            kind, h = step[0], values[step[1]]
            if kind in ("conv", "norm"):
                h = self.layers[str(index)](h)
            elif kind == "act":
                h = ACTIVATIONS[step[2]](h)
            elif kind == "act_":
                h = IN_PLACE_ACTIVATIONS[step[2]](h)
            elif kind == "iadd":
                h += values[step[2]]
            elif kind == "scale":
                h = h * self.layers[str(index)][0].reshape(1, -1, *[1] * self.spatial)
            elif kind == "add":
                h = h + values[step[2]]
            elif kind == "mul":
                h = h * values[step[2]]
            elif kind == "gate":
                h = h[:, step[2]:step[2] + 1] * values[step[3]]
            elif kind == "excite":
                scales = self.layers[str(index)](h.flatten(2).mean(-1))
                h = h * scales.reshape(*scales.shape, *[1] * self.spatial)
            elif kind == "cat":
                h = torch.cat([h, values[step[2]]], dim=1)
            elif kind == "slice":
                h = h[:, step[2]:step[3]]
            elif kind == "shuffle":
                b, channels, *positions = h.shape
                groups = step[2]
                h = h.reshape(b, groups, channels // groups, *positions).transpose(1, 2)
                h = h.reshape(b, channels, *positions)
            elif kind == "pool":
                _, _, pool, kernel, stride, padding, ceil = step
                if pool == "max":
                    h = MAX_POOL[self.spatial](h, kernel, stride, padding, ceil_mode=ceil)
                else:
                    h = AVG_POOL[self.spatial](h, kernel, stride, padding, ceil_mode=ceil)
            elif kind == "adaptive":
                h = ADAPTIVE[step[2], self.spatial](h, step[3])
            elif kind == "softmax":
                h = h.softmax(dim=1)
            elif kind == "center":
                h = h - h.flatten(2).mean(-1).reshape(*h.shape[:2], *[1] * self.spatial)
            elif kind == "upsample":
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            elif kind == "grn":
                norms = torch.linalg.vector_norm(h, dim=tuple(range(2, h.dim())), keepdim=True)
                h = h * (norms / (norms.mean(dim=1, keepdim=True) + 1e-6))
            elif kind == "crop":
                h = F.pad(h, [-1, 0] * self.spatial)
            elif kind == "chanpad":
                h = F.pad(h, [0, 0] * self.spatial + [step[2], step[3]], value=step[4])
            elif kind == "roll":
                h = torch.roll(h, step[2], dims=-1)
            elif kind == "crelu":
                h = torch.cat([F.relu(h), F.relu(-h)], 1)
            elif kind == "zerocat":
                h = torch.cat([h, h.new_zeros(h.shape[0], step[2], *h.shape[2:])], 1)
            elif kind == "pixel_shuffle":
                h = F.pixel_shuffle(h, 2)
            elif kind == "part":  # channels start..stop through another op than the rest (per-group code)
                start, stop, op = step[2], step[3], step[4]
                part = h[:, start:stop] * 3.0 if op == "scale" else torch.tanh(h[:, start:stop])
                h = torch.cat([h[:, :start], part, h[:, stop:]], 1)
            elif kind == "pixel_unshuffle":
                h = F.pixel_unshuffle(h, 2)
            elif kind == "positions":
                _, _, _, mode, use = step
                table = self.layers[str(index)][0]
                options = {"align_corners": False} if mode in ("linear", "bicubic") else {}
                mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.spatial] if mode == "linear" else mode
                resampled = F.interpolate(table, size=tuple(h.shape[2:]), mode=mode, **options)
                if use == "flipped":  # shape ops between the interpolation and the sum
                    resampled = resampled.flip(-1)
                elif use == "part":
                    resampled = resampled[:, : max(1, h.shape[1] // 2)]
                    h = torch.cat([h[:, : resampled.shape[1]] + resampled, h[:, resampled.shape[1]:]], 1)
                if use == "product":  # refused: not added
                    h = h * resampled
                elif use != "part":
                    h = h + resampled
            values.append(h)
        h = values[-1]
        if self.head_kind == "mean":
            h = h.flatten(2).mean(-1)
        elif self.head_kind == "max":
            h = h.flatten(2).amax(-1)
        else:
            h = h.flatten(1)
        return self.head(h)


def conv_length(length: int, kernel: int, stride: int, padding: int | str, dilation: int) -> int:
    if padding == "same":
        return length
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_length(length: int, kernel: int, stride: int, padding: int, ceil: bool) -> int:
    span = length + 2 * padding - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= length + padding:  # torch: the last window must start inside
        out -= 1
    return out


@st.composite
def conv_programs(draw):
    """``(spatial, in_channels, size, steps, head, seed)`` for :class:`ConvProgram`."""
    spatial = draw(st.sampled_from([1, 1, 2, 2, 3]))
    size = draw(st.integers(4, 8 if spatial < 3 else 4))
    in_channels = draw(st.integers(1, 3))
    # a stem convolution first, as in every CNN: on the raw input alone (no convolution yet) a
    # [b, C, L] map is ambiguous with tokens [b, T, features], and gradgraph reads it as tokens
    stem = draw(st.integers(1, 4))
    steps: list[tuple] = [("conv", 0, stem, draw(st.integers(1, 3)), 1, "same", 1, 1, "zeros")]
    shapes = ConvProgram(spatial, in_channels, size, steps, "mean").shapes
    for _ in range(draw(st.integers(0, 5))):
        source = draw(st.integers(max(1, len(shapes) - 3), len(shapes) - 1))
        channels, length = shapes[source]
        kind = draw(st.sampled_from(["conv", "conv", "conv", "act", "add", "mul", "gate", "excite", "cat", "slice",
                                     "shuffle", "pool", "adaptive", "norm", "softmax", "center", "upsample", "act_",
                                     "iadd", "scale", "grn", "crop", "pixel_shuffle", "pixel_unshuffle",
                                     "chanpad", "chanpad", "roll", "crelu", "zerocat", "part", "positions"]))
        same = [index for index, shape in enumerate(shapes)
                if shape == (channels, length) and index not in (0, source)]
        positions = [index for index, shape in enumerate(shapes) if shape[1] == length and index not in (0, source)]
        step: tuple | None = None
        if kind == "conv":
            kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            padding = draw(st.sampled_from([0, 1, "same"]))
            stride = 1 if padding == "same" else draw(st.integers(1, 2))
            mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])) if padding == 1 else "zeros"
            groups = draw(st.sampled_from([group for group in (1, 2, channels) if channels % group == 0]))
            out = groups * draw(st.integers(1, 3))
            if conv_length(length, kernel, stride, padding, dilation) >= 1 and length >= 2:
                step = ("conv", source, out, kernel, stride, padding, dilation, groups, mode)
        elif kind == "act":
            step = ("act", source, draw(st.sampled_from(sorted(ACTIVATIONS))))
        elif kind == "act_":
            step = ("act_", source, draw(st.sampled_from(sorted(IN_PLACE_ACTIVATIONS))))
        elif kind == "iadd" and same:
            step = ("iadd", source, draw(st.sampled_from(same)))
        elif kind in ("add", "mul") and same:
            step = (kind, source, draw(st.sampled_from(same)))
        elif kind == "gate" and positions:
            step = ("gate", source, draw(st.integers(0, channels - 1)), draw(st.sampled_from(positions)))
        elif kind == "excite":
            step = ("excite", source, draw(st.integers(1, 3)))
        elif kind == "cat" and positions:
            step = ("cat", source, draw(st.sampled_from(positions)))
        elif kind == "slice" and channels >= 2:
            start = draw(st.integers(0, channels - 1))
            step = ("slice", source, start, draw(st.integers(start + 1, channels)))
        elif kind == "part" and channels >= 2:
            start = draw(st.integers(0, channels - 1))
            step = ("part", source, start, draw(st.integers(start + 1, channels)),
                    draw(st.sampled_from(["scale", "tanh"])))
        elif kind == "shuffle" and channels % 2 == 0 and channels >= 4:
            step = ("shuffle", source, 2)
        elif kind == "pool" and length >= 2:
            pool_kernel = draw(st.integers(2, min(3, length)))
            stride = draw(st.integers(1, pool_kernel))
            padding = draw(st.integers(0, pool_kernel // 2))
            step = ("pool", source, draw(st.sampled_from(["max", "avg"])), pool_kernel, stride, padding,
                    draw(st.booleans()))
        elif kind == "adaptive":
            step = ("adaptive", source, draw(st.sampled_from(["avg", "max"])), draw(st.integers(1, min(3, length))))
        elif kind == "norm":
            # (an instance norm's statistic needs more than one position, a group norm's more than one value per
            # group of one datapoint: torch refuses a [1, 1, 1] group in training mode, as the reference's
            # per-datapoint pass meets it)
            per_group = channels // (2 if channels % 2 == 0 else 1) * length ** spatial
            norms = ["batch"] + (["group"] if per_group > 1 else []) + (
                ["instance", "instance-affine"] if length > 1 else [])
            step = ("norm", source, draw(st.sampled_from(norms)))
        elif kind in ("softmax", "center", "scale"):
            step = (kind, source)
        elif kind == "upsample" and length <= 4:
            step = ("upsample", source)
        elif kind == "grn" or (kind == "crop" and length >= 2):
            step = (kind, source)
        elif kind == "pixel_shuffle" and spatial == 2 and channels % 4 == 0 and length <= 4:
            step = (kind, source)
        elif kind == "pixel_unshuffle" and spatial == 2 and length % 2 == 0:
            step = (kind, source)
        elif kind == "roll" and length >= 2:
            step = (kind, source, draw(st.integers(1, length - 1)))
        elif kind == "crelu":
            step = (kind, source)
        elif kind == "zerocat":
            step = (kind, source, draw(st.integers(1, 2)))
        elif kind == "positions":
            modes = ["nearest", "nearest-exact", "linear", "area"] + (["bicubic"] if spatial == 2 else [])
            step = (kind, source, draw(st.integers(1, 3)), draw(st.sampled_from(modes)),
                    draw(st.sampled_from(["add", "add", "flipped", "part", "product"])))
        elif kind == "chanpad":
            before, after = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            if before + after:
                step = (kind, source, before, after, draw(st.sampled_from([0.0, 0.0, 1.5])))
        if step is None:
            continue
        steps.append(step)
        shapes = ConvProgram(spatial, in_channels, size, steps, "mean").shapes
    head = draw(st.sampled_from(["mean", "max", "flatten"]))
    return spatial, in_channels, size, steps, head, draw(st.integers(0, 2**16))


def loss(output, target):
    return F.cross_entropy(output, target, reduction="none")


def assert_conv_program_exact_or_refused(program: tuple) -> None:
    """Exact per-sample gradients and a true group for a :class:`ConvProgram`, or a refusal by name."""
    spatial, in_channels, size, steps, head, seed = program
    torch.manual_seed(seed)
    model = ConvProgram(spatial, in_channels, size, steps, head).to(DTYPE)
    for parameter in model.parameters():  # away from the default init's small scale
        torch.nn.init.normal_(parameter, std=0.5)
    inputs = torch.randn(3, in_channels, *[size] * spatial, dtype=DTYPE)
    targets = torch.randint(0, 3, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on 'same' with even kernels
        try:  # an in-place step may change a value a backward needs: the program is not valid PyTorch
            loss(model(inputs), targets).sum().backward()
        except RuntimeError as error:
            assume("modified by an inplace operation" not in str(error))
            raise
        model.zero_grad()
        try:
            assert_exact_per_sample_grads(model, inputs, targets, loss)
        except (UnsupportedModuleError, GradGraphError) as refusal:
            message = str(refusal)
            names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_modules() if name]
            assert "Program.forward" in message or "input" in message or any(
                f"'{name}'" in message for name in names), message
            return
        assert_group_keeps_function(model, inputs, targets, loss, seed=seed)


@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_programs())
def test_a_random_convolutional_program_converts_exactly_or_is_refused(program):
    assert_conv_program_exact_or_refused(program)


def test_the_conv_program_model_runs_each_step_kind():
    # the generator's model itself: every step kind, the shapes it tracks are the shapes it makes
    steps = [("conv", 0, 4, 3, 1, 1, 1, 1, "reflect"), ("act", 1, "tanh"), ("add", 2, 1), ("mul", 3, 2),
             ("gate", 4, 1, 3), ("excite", 5, 2), ("cat", 6, 1), ("slice", 7, 1, 7), ("shuffle", 8, 2),
             ("pool", 9, "max", 3, 2, 1, True), ("adaptive", 10, "avg", 2), ("norm", 11, "batch"),
             ("norm", 12, "group"), ("norm", 13, "instance-affine"), ("softmax", 14), ("center", 15),
             ("upsample", 16), ("conv", 17, 2, 2, 2, 0, 1, 2, "zeros"), ("act_", 18, "relu"), ("iadd", 19, 18),
             ("scale", 20), ("grn", 21), ("crop", 22), ("chanpad", 23, 1, 2, 0.0), ("roll", 24, 1), ("crelu", 25),
             ("zerocat", 26, 2), ("part", 27, 1, 3, "tanh"), ("positions", 28, 2, "linear", "add"),
             ("positions", 29, 3, "nearest", "part")]
    planar = steps + [("conv", 30, 8, 1, 1, 0, 1, 1, "zeros"), ("pixel_shuffle", 31), ("pixel_unshuffle", 32)]
    for spatial, steps in ((1, steps), (2, planar), (3, steps)):
        model = ConvProgram(spatial, 2, 5, steps, "flatten").to(DTYPE)
        inputs = torch.randn(2, 2, *[5] * spatial, dtype=DTYPE)
        assert model(inputs).shape == (2, 3)
        head, model.head = model.head, nn.Identity()
        for index, step in enumerate(steps):  # each prefix's map has the shape the generator tracks
            model.steps = steps[:index + 1]
            channels, length = model.shapes[index + 1]
            assert model(inputs).shape == (2, channels * length ** spatial), step
        assert head.in_features == channels * length ** spatial
