"""A convolution of a model input that has no channel axis, given one of size 1 inside ``forward``.

A raw waveform ``[b, T]`` read as ``x[:, None]`` by a ``Conv1d`` (Wav2Vec2-style feature encoders), or
a spectrogram ``[b, T, F]`` read as ``x.unsqueeze(1).transpose(2, 3)`` by a ``Conv2d`` (the Audio
Spectrogram Transformer's patch embedding), was refused: "a convolution whose input's first axis is
not the datapoints" (the input was read as ``[b, C, *S]`` in its own layout, which has no ``C``). It is
now one input neuron with a component per element of each datapoint. Also here: the input map read by a
convolution and again elementwise (``x + conv(x)``). Each test failed before.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from traced_models import (
    Called,
    assert_exact_per_sample_grads,
    assert_group_keeps_function,
    assert_matches_autograd_loop,
    assert_per_sample_grads_match_loop,
)

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


class WaveCNN(nn.Module):
    """``[b, T]`` -> ``[b, 1, T]`` -> strided ``Conv1d`` stack -> mean over time -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(1, 4, 5, stride=2), nn.Conv1d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(wave[:, None]))
        return self.head(torch.relu(self.conv2(h)).mean(-1))


class SpectrogramCNN(nn.Module):
    """``[b, T, F]`` -> ``[b, 1, F, T]`` -> ``Conv2d`` patches (overlapping) -> flatten -> head."""

    def __init__(self, time: int = 8, frequencies: int = 6) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, 4, 3, stride=(1, 2))
        out = (frequencies - 2) * ((time - 3) // 2 + 1)
        self.head = nn.Linear(4 * out, 3)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.patches(spectrogram.unsqueeze(1).transpose(2, 3)))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("make, shape", [(WaveCNN, (4, 20)), (SpectrogramCNN, (4, 8, 6))],
                         ids=["wave", "spectrogram"])
def test_a_convolution_of_an_input_given_one_channel_is_exact_traced_and_replayed(make, shape):
    torch.manual_seed(7)
    model = make().to(DTYPE)
    targets = torch.randint(0, 3, (shape[0],))
    gradgraph.convert.clear_structure_cache()
    for _ in range(2):
        misses = PLAN_CACHE.misses
        inputs = torch.randn(*shape, dtype=DTYPE)
        graph = assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    assert PLAN_CACHE.misses == misses
    assert int((graph.node_kind == gradgraph.NodeKind.INPUT).sum()) == 1  # one channel
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=1)
    assert moved > 0


def test_stock_audio_spectrogram_transformer_converts_exactly():
    transformers = pytest.importorskip("transformers")
    config = transformers.ASTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                                    patch_size=4, frequency_stride=4, time_stride=4, max_length=16, num_mel_bins=8,
                                    num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(8)
    body = transformers.ASTForAudioClassification(config).to(DTYPE).eval()

    model = Called(body, lambda body, spectrogram: body(input_values=spectrogram).logits)
    with torch.no_grad():  # tokens and positions start at zero (see test_convert_models' DeiT test)
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "distillation_token", "position_embeddings")):
                param.normal_()
    inputs, targets = torch.randn(3, 16, 8, dtype=DTYPE), torch.randint(0, 3, (3,))
    assert_matches_autograd_loop(model, inputs, targets, class_loss)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=2)
    assert moved > 0


def test_an_input_unflattened_to_one_channel_converts_in_output_mode():
    """``nn.Unflatten(1, (1, T))`` then a ``Conv1d``: the case ``test_convert_mlp.py`` held as refused
    ("overlapping windows") before; in output mode, its per-datapoint output summed."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1))
    model = model.to(DTYPE)
    inputs = torch.randn(3, 6, dtype=DTYPE)
    assert_per_sample_grads_match_loop(model, inputs)


class InputResidual(nn.Module):
    """``x + conv(x)`` on the model input itself (a MobileNetV3-style block with no stem): the input map
    is read by the convolution and again elementwise. Three of these four were refused before ("the input
    is read with 6 features here but 4 elsewhere": the second read took the map's last axis for features)."""

    def __init__(self, kernel: int, gate: bool) -> None:
        super().__init__()
        self.conv, self.head, self.gate = nn.Conv2d(4, 4, kernel, padding=kernel // 2), nn.Linear(4, 3), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) * torch.sigmoid(x) if self.gate else x + self.conv(x)
        return self.head(torch.relu(h).mean((2, 3)))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("gate", [False, True])
def test_the_model_input_read_by_a_convolution_and_again_elementwise(kernel, gate):
    torch.manual_seed(10)
    model = InputResidual(kernel, gate).to(DTYPE)
    inputs, targets = torch.randn(3, 4, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    assert_group_keeps_function(model, inputs, targets, class_loss, seed=3)


def test_a_patch_embedding_of_the_input_read_again_elementwise_is_still_refused():
    class Patches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(4, 4, 2, stride=2), nn.Linear(4, 3)

        def forward(self, x):
            return self.head((self.conv(x) + x[:, :, ::2, ::2]).mean((2, 3)))

    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"Tensor\.add: the input is read with \d+ features here "
                                                               r"but 16 elsewhere"):
        gradgraph.to_graph(Patches().to(DTYPE), torch.randn(3, 4, 6, 6, dtype=DTYPE), torch.randint(0, 3, (3,)),
                           class_loss)


class VideoConv3d(nn.Module):
    """``[b, T, C, H, W]`` permuted to ``[b, C, T, H, W]`` for a ``Conv3d`` (VideoMAE's tubelet embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv3d(3, 4, (2, 3, 3), stride=(2, 1, 1)), nn.Linear(4, 3)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(video.permute(0, 2, 1, 3, 4))).mean((2, 3, 4)))


def test_a_3d_convolution_of_the_input_with_its_axes_permuted():
    """Refused before: "its input does not hold channels on axis 1" (the channels were read in the input's
    own layout, where they are on axis 2)."""
    torch.manual_seed(13)
    model = VideoConv3d().to(DTYPE)
    videos, targets = torch.randn(3, 4, 3, 5, 5, dtype=DTYPE), torch.randint(0, 3, (3,))
    assert_exact_per_sample_grads(model, videos, targets, class_loss)
    moved, _, _ = assert_group_keeps_function(model, videos, targets, class_loss, seed=4)
    assert moved > 0


def test_stock_videomae_converts_exactly():
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(image_size=8, patch_size=4, num_channels=3, num_frames=2, tubelet_size=2,
                                         hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=12, num_labels=3, use_mean_pooling=True,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(14)
    body = transformers.VideoMAEForVideoClassification(config).to(DTYPE).eval()

    model = Called(body, lambda body, video: body(pixel_values=video).logits)
    videos, targets = torch.randn(3, 2, 3, 8, 8, dtype=DTYPE), torch.randint(0, 3, (3,))
    assert_matches_autograd_loop(model, videos, targets, class_loss)
    moved, _, _ = assert_group_keeps_function(model, videos, targets, class_loss, seed=5)
    assert moved > 0
