"""A position table resized by ``F.interpolate`` inside ``forward`` converts exactly (since session 23).

A ViT / DINOv2 run at another resolution than its config's resamples its learned position table to the patch
grid in every forward (PVT, YOLOS and DPT always do). Interpolation is linear, the same for every feature: the
embedding at position ``t`` is ``sum_s A[t, s] P[s]`` with ``A`` a constant of the sizes. The graph keeps the
table's rows as ``TOKEN`` input neurons joined by ``EMBEDDING`` edges that carry ``P``; a row's activation at a
position is its weight ``A[t, s]`` instead of the one-hot 1 of a plain position embedding, so every per-sample
gradient of ``P`` is a sum of rank-1 terms (``rules_affine.resample_parameter``, ``rules_affine.resampled_positions``).
Before, the interpolation was refused as "a parameter used where gradgraph expects neuron values"; every test
here that converts failed so on the code before. Float64, against a per-datapoint autograd loop; the inferred
group keeps the function.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from convert_values import squared
from torch import nn
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop

import gradgraph
from gradgraph import UnsupportedModuleError

DTYPE = torch.float64


class ResampledMap(nn.Module):
    """Patches of a convolution plus a learned ``[1, C, *grid]`` table interpolated to the patch grid."""

    def __init__(self, options: dict, grid: tuple[int, int] = (2, 3), use: str = "add") -> None:
        super().__init__()
        self.options, self.use = options, use
        self.patches = nn.Conv2d(3, 6, 4, stride=4)
        self.positions = nn.Parameter(torch.randn(1, 6, *grid))
        self.head = nn.Linear(6, 2)

    def forward(self, images):
        maps = self.patches(images)
        positions = F.interpolate(self.positions, size=maps.shape[-2:], **self.options)
        if self.use == "add":
            joined = maps + positions
        elif self.use == "part":  # the table added to half of the channels
            joined = torch.cat([maps[:, :3] + positions[:, :3], maps[:, 3:]], 1)
        elif self.use == "flipped":  # shape ops between the interpolation and the sum
            joined = maps + positions.flip(-1)[:, [1, 0, 2, 3, 4, 5]]
        elif self.use == "scaled":
            joined = maps + 2.0 * positions
        elif self.use == "product":
            joined = maps * positions
        elif self.use == "alpha":  # the table scaled by torch.add's alpha
            joined = maps.add(positions, alpha=2.0)
        elif self.use == "alpha first":
            joined = torch.add(positions, maps, alpha=0.5)
        elif self.use == "zeros":  # half the channels' table replaced by a constant before the sum
            joined = maps + torch.cat([positions[:, :3], torch.zeros_like(positions[:, 3:])], 1)
        else:
            joined = maps + positions.relu()
        return self.head(torch.relu(joined).flatten(2).transpose(1, 2)).mean(1)


class ResampledTokens(nn.Module):
    """A tiny ViT: a class token, a ``[1, 1 + g * g, C]`` table whose grid part is resampled (DINOv2's code)."""

    def __init__(self, options: dict, grid: int = 2) -> None:
        super().__init__()
        self.options, self.grid = options, grid
        self.patches = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.positions = nn.Parameter(torch.randn(1, 1 + grid * grid, 6))
        self.mix, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, images):
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        side = int(tokens.shape[1] ** 0.5)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)
        grid = self.positions[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), **self.options).permute(0, 2, 3, 1).reshape(1, side * side, -1)
        hidden = tokens + torch.cat([self.positions[:, :1], grid], 1)
        return self.head(torch.tanh(self.mix(hidden))[:, 0])


def _images(seed: int = 0, side: int = 12) -> torch.Tensor:
    return torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


OPTIONS = {
    "bilinear": dict(mode="bilinear"),
    "bilinear_corners": dict(mode="bilinear", align_corners=True),
    "bicubic": dict(mode="bicubic", align_corners=False),
    "nearest": dict(mode="nearest"),
    "nearest_exact": dict(mode="nearest-exact"),
    "area": dict(mode="area"),
    "antialias": dict(mode="bilinear", antialias=True),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_table_interpolated_to_a_feature_map_converts_exactly_with_a_true_group(name):
    torch.manual_seed(23)
    model = ResampledMap(OPTIONS[name]).to(DTYPE)
    assert_matches_autograd_loop(model, _images(), None, squared)
    moved, _, _ = assert_group_keeps_function(model, _images(), None, squared)
    assert moved >= 12, moved


def test_a_table_downsampled_with_antialiasing_converts_exactly():
    """A 5 x 7 table to a 3 x 3 grid: each position reads many entries (antialiased bilinear)."""
    torch.manual_seed(23)
    model = ResampledMap(dict(mode="bilinear", antialias=True), grid=(5, 7)).to(DTYPE)
    assert_matches_autograd_loop(model, _images(), None, squared)


def test_a_table_resampled_in_a_float32_model_converts_to_float32_factors():
    """The interpolation weights are read off one-hot maps in float64 (``resample_parameter``); a float32 model's
    factors are float32, so the weights are cast to them when they are written (``fill_factors``). Against the
    per-datapoint autograd loop at float32's precision; every factor float32. Kills ``assembly.fill_factors`` 171,
    173 of run assembly 5 (the weights written without the cast: "Index put requires the source and destination
    dtypes match")."""
    torch.manual_seed(23)
    model = ResampledMap(OPTIONS["bilinear"])
    graph = assert_matches_autograd_loop(model, _images().float(), None, squared, atol=1e-5)
    assert graph.act.dtype == graph.grad.dtype == torch.float32


@pytest.mark.parametrize("use", ["part", "flipped"])
def test_shape_ops_and_a_part_of_the_channels_between_interpolation_and_sum_convert_exactly(use):
    torch.manual_seed(23)
    model = ResampledMap(OPTIONS["bicubic"], use=use).to(DTYPE)
    assert_matches_autograd_loop(model, _images(), None, squared)
    moved, _, _ = assert_group_keeps_function(model, _images(), None, squared)
    assert moved >= 8, moved


@pytest.mark.parametrize("name", ["bicubic", "nearest_exact"])
def test_a_vit_whose_grid_positions_are_resampled_converts_exactly_and_its_replay_too(name):
    """DINOv2's layout: the class row kept, the grid rows resampled, the two joined by ``cat`` before the sum; a
    second call (the cached plan's replay, other inputs) is exact too."""
    torch.manual_seed(23)
    model = ResampledTokens(OPTIONS[name]).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, _images(), None, squared)
    assert_matches_autograd_loop(model, _images(1), None, squared)
    moved, _, _ = assert_group_keeps_function(model, _images(), None, squared)
    assert moved >= 12, moved


@pytest.mark.parametrize("use, words", [
    ("product", ("uses the resampled parameter 'positions' (F.interpolate of a table) otherwise than added to the "
                 "token values")),
    ("scaled", "uses the resampled parameter 'positions' (F.interpolate of a table) otherwise than added"),
    ("relu", "Tensor.relu: the parameter used where gradgraph expects neuron values"),
    # an internal IndexError before (the constant's values were read as rows of the table)
    ("zeros", "torch.cat: joins the resampled parameter 'positions' with a constant of shape [1, 3, 3, 3]"),
])
def test_a_resampled_table_used_otherwise_than_added_is_refused(use, words):
    torch.manual_seed(23)
    model = ResampledMap(OPTIONS["bilinear"], use=use).to(DTYPE)
    with pytest.raises(UnsupportedModuleError, match=re.escape(words)):
        gradgraph.to_graph(model, _images(), None, squared)


@pytest.mark.parametrize("use, name", [("alpha", "Tensor.add"), ("alpha first", "torch.add")])
def test_a_resampled_table_added_with_an_alpha_is_refused(use, name):
    """``maps.add(positions, alpha=2.0)`` scales one operand: refused as a use other than a plain sum (kills
    ``rules_elementwise.binary`` 61, 65, 66 of the hand checks of branch mut50, issue 31: the ``alpha`` keyword not
    read: the sum is read as if ``alpha`` were 1, and the summed-gradient check refuses it as "parameter use: the
    graph's gradient of 'positions' ... differs from autograd's", not in these words)."""
    torch.manual_seed(23)
    model = ResampledMap(OPTIONS["bilinear"], use=use).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            f"{name}: uses the resampled parameter 'positions' (F.interpolate of a table) otherwise than added to the "
            "token values")):
        gradgraph.to_graph(model, _images(), None, squared)


def test_dinov2_at_another_resolution_than_its_config_converts():
    """Stock DINOv2 made for 16 x 16 images, run on 24 x 24 ones (its table resampled with bicubic interpolation,
    which it computes in float32 whatever the model's dtype: the table's per-sample gradients agree to float32
    precision, everything else exactly); the inferred group keeps the function."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(image_size=16, patch_size=8, num_channels=3, hidden_size=8,
                                       num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)
    torch.manual_seed(23)

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.Dinov2Model(config)

        def forward(self, pixels):
            return self.model(pixel_values=pixels).last_hidden_state

    model = Hidden().to(DTYPE).eval()
    model.model.embeddings.mask_token = None  # read only for masked pretraining
    with torch.no_grad():
        model.model.embeddings.position_embeddings.normal_()
    pixels = _images(side=24)
    graph = gradgraph.to_graph(model, pixels, None, squared)
    per_sample = graph.per_sample_grads()
    assert set(per_sample) == {name for name, _ in model.named_parameters()}
    for i in range(pixels.shape[0]):
        model.zero_grad()
        squared(model(pixels[i:i + 1]), None).sum().backward()
        for name, param in model.named_parameters():
            table = name == "model.embeddings.position_embeddings"
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-6 if table else 0,
                                       atol=1e-12 if table else 1e-10, msg=name)
    moved, _, _ = assert_group_keeps_function(model, pixels, None, squared, atol=1e-6)
    assert moved >= 10, moved


def test_yolos_whose_table_is_resampled_in_every_forward_converts_exactly():
    """YOLOS resamples the grid part of its table in every forward and joins it between the class row and the
    detection tokens' rows (three parts of one table). Weights drawn at 0.5: at the models' own initialisation
    (std 0.02) the hidden states barely vary over features, and any two summation orders differ by ~1e-8
    relative after the LayerNorms (autograd's and the graph's; ViT, converting for long, shows the same)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.YolosConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                                      image_size=[16, 16], patch_size=8, num_detection_tokens=2)
    torch.manual_seed(23)

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.YolosModel(config, add_pooling_layer=False)

        def forward(self, pixels):
            return self.model(pixel_values=pixels).last_hidden_state

    model = Hidden().to(DTYPE).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    pixels = _images(side=24)
    assert_matches_autograd_loop(model, pixels, None, squared)
    moved, _, _ = assert_group_keeps_function(model, pixels, None, squared)
    assert moved >= 10, moved


# Written for the survivors of the mutation runs of session 23's functions (issue 31, branch mut48; docs/mutation.md,
# runs convert 38-39, conv 15, tracer 25): the mutants named are numbered as fresh ``.mutation/<group>/``
# directories number them, each checked to fail with ``MUTANT_UNDER_TEST``.


class Variant(nn.Module):
    """``ResampledMap``'s patches and head, with the table resampled or joined in one of several ways."""

    def __init__(self, use: str, channels: int = 6, table: tuple[int, ...] = (1, 6, 2, 3)) -> None:
        super().__init__()
        self.use = use
        conv = nn.Conv1d if len(table) == 3 else nn.Conv2d
        self.patches = conv(3, channels, 4, stride=4)
        self.positions = nn.Parameter(torch.randn(*table))
        if use == "other parameter":
            self.other = nn.Parameter(torch.randn(1, 3, 3, 3))
        self.head = nn.Linear(channels, 2)

    def forward(self, images):
        maps, table = self.patches(images), self.positions
        size = maps.shape[2:]
        if self.use == "squeezed":  # a [C, H, W] table broadcast over the datapoints
            joined = maps + F.interpolate(table, size=size, mode="bilinear")[0]
        elif self.use == "by keyword":
            joined = maps + F.interpolate(input=table, size=size, mode="bicubic")
        elif self.use == "size by position":
            joined = maps + F.interpolate(table, size, None, "bilinear")
        elif self.use == "two tables":  # two halves of the channels resampled each on its own
            joined = maps + torch.cat([F.interpolate(table[:, :3], size=size, mode="bilinear"),
                                       F.interpolate(table[:, 3:], size=size, mode="bilinear")], 1)
        elif self.use == "two tables swapped":
            joined = maps + torch.cat([F.interpolate(table[:, 3:], size=size, mode="bicubic"),
                                       F.interpolate(table[:, :3], size=size, mode="bicubic")], 1)
        elif self.use == "two modes":  # bilinear for half of the channels, nearest for the others
            joined = maps + torch.cat([F.interpolate(table[:, :3], size=size, mode="bilinear"),
                                       F.interpolate(table[:, 3:], size=size, mode="nearest")], 1)
        elif self.use == "columns repeated":  # half of the channels read the table's columns 0, 0, 1
            resampled = F.interpolate(table, size=size, mode="bilinear")
            joined = maps + torch.cat([resampled[:, :3], resampled[:, 3:][..., [0, 0, 1]]], 1)
        elif self.use == "other parameter":
            joined = maps + torch.cat([F.interpolate(table, size=size, mode="bilinear")[:, :3], self.other], 1)
        elif self.use == "constant by keyword":
            resampled = F.interpolate(table, size=size, mode="bilinear")
            joined = maps + torch.cat(tensors=[resampled[:, :3], torch.zeros_like(resampled[:, 3:])], dim=1)
        elif self.use == "large":
            joined = maps + F.interpolate(table, size=size, **self.options)
        else:  # a table of one channel, linear (1d) or bilinear
            joined = maps + F.interpolate(table, size=size, mode="linear" if maps.dim() == 3 else "bilinear")
        return self.head(torch.relu(joined).flatten(2).transpose(1, 2)).mean(1)


@pytest.mark.parametrize("use", ["squeezed", "by keyword", "size by position", "two tables", "two tables swapped"])
def test_a_table_resampled_called_or_joined_otherwise_converts_exactly_with_a_true_group(use):
    """A ``[C, H, W]`` table (kills ``rules_affine.resampled_positions`` 10, 13: its positions' ids not given the
    leading axes), ``F.interpolate(input=...)`` and the size passed by position (F.interpolate hands its torch
    function ``(input,)`` and the rest by keyword, so ``resample_parameter`` 36, 37, 41, 43 of run conv 15, when it
    was in ``rules_conv``, are equivalent: these pin the calls), two parts of the table each resampled on its own, then joined
    (``rules_shape.resampled_shape_op`` 27, 29, 30: one part's taps read for both)."""
    torch.manual_seed(23)
    model = Variant(use).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, _images(), None, squared)
    moved, _, _ = assert_group_keeps_function(model, _images(), None, squared)
    assert moved >= 12, moved


@pytest.mark.parametrize("table", [(1, 1, 2, 3), (1, 1, 2)])
def test_a_table_of_one_channel_and_a_table_of_one_axis_convert_exactly(table):
    """One feature (kills ``resampled_positions`` 50, 131: the second feature's weights read) and a ``[1, C, L]``
    table resampled linearly to a 1d convolution's length (``resample_parameter`` 8, 9: refused as not
    ``[N, C, *spatial]``)."""
    torch.manual_seed(23)
    model = Variant("one channel" if table[1] == 1 else "one axis", channels=table[1] if len(table) == 4 else 6,
                    table=table if len(table) == 4 else (1, 6, 2)).to(DTYPE)
    inputs = _images() if len(table) == 4 else torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(0),
                                                           dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, inputs, None, squared)
    assert_group_keeps_function(model, inputs, None, squared)


class ThreeParts(ResampledTokens):
    """A class row, two register rows, then the resampled grid rows (DINOv2 with registers, their positions in the
    table): three parts of one table joined by ``cat``, two of them the parameter itself."""

    def __init__(self, options: dict, grid: int = 2) -> None:
        super().__init__(options, grid)
        self.registers = nn.Parameter(torch.randn(1, 2, 6))
        self.positions = nn.Parameter(torch.randn(1, 3 + grid * grid, 6))

    def forward(self, images):
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        side, batch, grid = int(tokens.shape[1] ** 0.5), tokens.shape[0], self.grid
        tokens = torch.cat([self.cls.expand(batch, -1, -1), self.registers.expand(batch, -1, -1), tokens], 1)
        table = self.positions[:, 3:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(side, side), **self.options).permute(0, 2, 3, 1).reshape(1, side * side, -1)
        hidden = torch.tanh(self.mix(tokens + torch.cat([self.positions[:, :1], self.positions[:, 1:3], table], 1)))
        return self.head(hidden[:, 0] + hidden[:, 1] + hidden[:, -1])


def test_a_table_joined_from_three_parts_converts_exactly():
    """The grid's rows come after the class row's and the registers' in the joined table (kills
    ``resampled_shape_op`` 116: the grid's rows offset by the registers' count only, so read as theirs)."""
    torch.manual_seed(23)
    model = ThreeParts(OPTIONS["bicubic"]).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, _images(), None, squared)
    moved, _, _ = assert_group_keeps_function(model, _images(), None, squared)
    assert moved >= 12, moved


@pytest.mark.parametrize("use, words", [
    # kills resampled_positions 1 (the table named None), 15, 18-21
    ("one channel broadcast", "Tensor.add: adds the resampled parameter 'positions' without a value per feature"),
    # 43-48 and resampled_shape_op 27 (one part's taps read for both)
    ("two modes", "Tensor.add: adds the resampled parameter 'positions' with weights that differ between features; "
                  "gradgraph reads a table resampled alike for every feature (of a map, its channels: the raw "
                  "input's last axis is read as its features)"),
    # 70-75
    ("columns repeated", "Tensor.add: adds the resampled parameter 'positions' whose positions read its entries in "
                         "different groupings of the features"),
    # resampled_shape_op 16, 19-24
    ("other parameter", "torch.cat: joins the resampled parameter 'positions' with other values; gradgraph follows a "
                        "resampled table joined only with parts of itself"),
    # resampled_shape_op 5 (the keyword's list not read), 7, 13, 14 (the remedy)
    ("constant by keyword", "torch.cat: joins the resampled parameter 'positions' with a constant of shape [1, 3, 3, "
                            "3], whose entries belong to no datapoint and no parameter; join the results of the ops "
                            "instead (the table added first)"),
])
def test_a_resampled_table_gradgraph_does_not_follow_is_refused_in_its_words(use, words):
    torch.manual_seed(23)
    model = Variant(use, table=(1, 1, 2, 3) if use == "one channel broadcast" else (1, 6, 2, 3)).to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedModuleError, match=re.escape(words)):
        gradgraph.to_graph(model, _images(), None, squared)


def test_a_large_table_downsampled_for_one_datapoint_converts_exactly():
    """An 8 x 8 table antialiased to a 2 x 2 grid, one image: 64 table rows, 4 components (datapoint x position), so
    a row and the row 4 after it are read at neighbouring components (kills ``plan._weighted_record`` 33: the pairs
    keyed by ``row / components + component`` collide, an internal error)."""
    torch.manual_seed(1)
    model = Variant("large", channels=4, table=(1, 4, 8, 8)).to(DTYPE)
    model.options = dict(mode="bilinear", antialias=True)
    gradgraph.convert.clear_structure_cache()
    assert_matches_autograd_loop(model, _images(side=8)[:1], None, squared)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Variant("two tables")

    def forward(self, images):
        return self.block(images)


def test_a_resampled_tables_sets_are_named_by_their_module_or_op():
    """The table's rows are ``'block positions'`` and its set ``'block'`` in a module, ``'Tensor.add positions'``
    and ``'Tensor.add'`` at the root (kills ``resampled_positions`` 86 (``' positions'`` at the root) and 98
    (``''``, stripped, at the root))."""
    from test_convert_conv_set_names import origins

    torch.manual_seed(0)
    assert origins(Variant("two tables").to(DTYPE), _images()) == [
        "input", "patches", "Tensor.add positions", "Tensor.add", "Tensor.add", "head", "Tensor.mean"]
    assert origins(_Outer().to(DTYPE), _images()) == [
        "input", "block.patches", "block positions", "block", "block Tensor.add", "block.head", "block Tensor.mean"]
