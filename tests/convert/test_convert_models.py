"""Models people bring, none of them written for gradgraph: exact factors, a true group, clear refusals.

Hand-written (nanoGPT as its repository writes it, ViTs cutting patches by reshape/permute or a
strided convolution, residual MLPs with LayerNorm / BatchNorm, a SwiGLU with a fused ``w12``)
and stock ``transformers`` models built from tiny configs (no download), called the way their
users call them: an attention mask computed from the ids, position ids computed inside forward
(RoBERTa), last-token pooling (GPT-2 for classification), local attention (GPT-Neo), a conv
patch embedding (ViT), rotary embeddings (Llama). For each: per-sample gradients equal torch.func's (float64, 1e-10), a
sampled element of the inferred group keeps the function and maps graph to graph. What still
refuses names the op, the module path and the source line.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_models import (
    FusedSwiGLU,
    MixerBlock,
    NanoGPT,
    NormResidualMLP,
    PatchViT,
    assert_exact_per_sample_grads,
    assert_group_keeps_function,
    randomise_batch_norms,
    token_loss,
)

import gradgraph
from gradgraph import NodeKind, UnsupportedModuleError
from gradgraph.convert.plan import PLAN_CACHE

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64
PAD = 1


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def squared_norm(output, _targets):
    return output.pow(2).reshape(output.shape[0], -1).sum(1)


def per_datapoint_autograd(model, inputs, targets, loss_fn, forward_kwargs=None):
    """``{name: [b, *shape]}``: one autograd pass per datapoint, the model run on it alone.

    The reference where torch.func's vmap cannot run the model: ``transformers``' mask code
    branches on the mask's values (``if padding_mask.all()``), which vmap refuses.
    """
    named = dict(model.named_parameters())
    grads = {name: [] for name in named}
    for index in range(inputs.shape[0]):
        output = model(inputs[index:index + 1], **(forward_kwargs or {}))
        loss = loss_fn(output, None if targets is None else targets[index:index + 1]).sum()
        found = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        for (name, param), grad in zip(named.items(), found):
            grads[name].append(torch.zeros_like(param) if grad is None else grad)
    return {name: torch.stack(values) for name, values in grads.items()}


def check_model(model, inputs, targets, loss_fn, min_moved, torch_func=True, group_atol=1e-10):
    """Exact per-sample gradients and a true, non-trivial group; returns the graph."""
    if torch_func:
        graph = assert_exact_per_sample_grads(model, inputs, targets, loss_fn)
    else:
        graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
        ours, reference = graph.per_sample_grads(), per_datapoint_autograd(model, inputs, targets, loss_fn)
        assert set(ours) == set(reference)
        for name, value in reference.items():
            torch.testing.assert_close(ours[name], value, atol=1e-10, rtol=0, msg=name)
    moved, _, _ = assert_group_keeps_function(model, inputs, targets, loss_fn, atol=group_atol)
    assert moved >= min_moved, moved
    return graph


# ------------------------------------------------------------------ hand-written models
class WithTargets(nn.Module):
    """nanoGPT called with targets: its batch loss is computed inside forward, after the last
    parameterised op; gradgraph differentiates the per-datapoint loss of the logits."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        return self.gpt(idx, targets=idx)[0]


def nanogpt_case(flash):
    torch.manual_seed(20)
    return WithTargets(NanoGPT(flash=flash)).to(DTYPE).eval(), torch.randint(0, 13, (3, 6)), \
        torch.randint(0, 13, (3, 6)), token_loss, 150


def nanogpt_last_token_case():
    torch.manual_seed(21)
    model = NanoGPT().to(DTYPE).eval()  # inference: logits of the last position only, (logits, None)
    return model, torch.randint(0, 13, (3, 6)), torch.randint(0, 13, (3,)), \
        lambda output, targets: F.cross_entropy(output[0][:, -1], targets, reduction="none"), 150


def vit_case(conv):
    torch.manual_seed(22)
    return PatchViT(conv=conv).to(DTYPE).eval(), torch.randn(3, 2, 8, 8, dtype=DTYPE), torch.randint(0, 3, (3,)), \
        cross_entropy, 60


def residual_mlp_case(batch_norm):
    torch.manual_seed(23)
    model = NormResidualMLP(batch_norm=batch_norm).to(DTYPE)
    if batch_norm:  # running statistics that are not the identity
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 2, 3, dtype=DTYPE) * 2 + 1)
    # BatchNorm's running statistics pin the stream it normalises; the hidden layers still move
    return model.eval(), torch.randn(4, 2, 3, dtype=DTYPE), torch.randint(0, 3, (4,)), cross_entropy, \
        20 if batch_norm else 40


def fused_swiglu_case():
    torch.manual_seed(24)
    return FusedSwiGLU().to(DTYPE).eval(), torch.randn(4, 3, 6, dtype=DTYPE), torch.randint(0, 3, (4, 3)), \
        token_loss, 30


class SignalPatches(nn.Module):
    """A 1-d signal cut into patches by a strided ``nn.Conv1d``, then a per-patch MLP and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.fc, self.head = nn.Conv1d(2, 6, 3, stride=3), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, signal):
        return self.head(torch.tanh(self.fc(F.gelu(self.patch(signal).transpose(1, 2)))).mean(1))


def signal_case():
    torch.manual_seed(33)
    return SignalPatches().to(DTYPE), torch.randn(4, 2, 10, dtype=DTYPE), torch.randint(0, 3, (4,)), \
        cross_entropy, 6


HAND_WRITTEN = {
    "conv1d_signal_patches": signal_case,
    "nanogpt_manual_attention": lambda: nanogpt_case(False),
    "nanogpt_flash": lambda: nanogpt_case(True),
    "nanogpt_last_token": nanogpt_last_token_case,
    "vit_reshape_patches": lambda: vit_case(False),
    "vit_conv_patches": lambda: vit_case(True),
    "residual_mlp_layernorm": lambda: residual_mlp_case(False),
    "residual_mlp_batchnorm": lambda: residual_mlp_case(True),
    "swiglu_fused_w12": fused_swiglu_case,
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_models_convert_exactly_with_a_true_group(name):
    model, inputs, targets, loss_fn, min_moved = HAND_WRITTEN[name]()
    graph = check_model(model, inputs, targets, loss_fn, min_moved)
    assert set(graph.param_names) == {name for name, _ in model.named_parameters()}


def test_patches_cut_by_reshape_and_by_conv_are_the_same_graph():
    # the conv's weight [d, c, p, p] is the linear's [d, c*p*p]: same neurons, same components
    torch.manual_seed(25)
    by_linear = PatchViT(conv=False).to(DTYPE).eval()
    by_conv = PatchViT(conv=True).to(DTYPE).eval()
    with torch.no_grad():
        state = dict(by_linear.state_dict())
        state["proj.weight"] = state["proj.weight"].reshape(by_conv.proj.weight.shape)
        by_conv.load_state_dict(state)
    images, targets = torch.randn(3, 2, 8, 8, dtype=DTYPE), torch.randint(0, 3, (3,))
    linear_graph = gradgraph.to_graph(by_linear, images, targets, cross_entropy)
    conv_graph = gradgraph.to_graph(by_conv, images, targets, cross_entropy)
    assert conv_graph.num_components == 3 * 5  # four patches and the class token per image
    for key in ("act", "grad", "edge_index", "edge_attr", "x", "perm_group", "node_kind"):
        torch.testing.assert_close(conv_graph[key], linear_graph[key], atol=1e-12, rtol=0, msg=key)


def test_fused_gate_halves_move_by_one_permutation_and_interleaved_halves_stay():
    model, inputs, targets, loss_fn, _ = fused_swiglu_case()
    _, graph, perm = assert_group_keeps_function(model, inputs, targets, loss_fn, seed=3)
    hidden = model.w3.in_features
    rows = torch.unique(graph.edge_index[1][graph.edge_param == graph.param_names.index("w12.weight")])
    first_half, second_half = rows[:hidden], rows[hidden:]
    assert bool((perm[first_half] != first_half).any())
    # the node that takes the place of gate neuron i and of value neuron i is the same i
    torch.testing.assert_close(perm[first_half] - first_half[0], perm[second_half] - second_half[0])

    torch.manual_seed(24)
    interleaved = FusedSwiGLU(interleaved=True).to(DTYPE).eval()
    assert_exact_per_sample_grads(interleaved, inputs, targets, loss_fn)
    _, graph, perm = assert_group_keeps_function(interleaved, inputs, targets, loss_fn, seed=3)
    rows = torch.unique(graph.edge_index[1][graph.edge_param == graph.param_names.index("w12.weight")])
    assert torch.equal(perm[rows], rows)  # no claim the trace cannot prove


class HeadBiasedAttention(nn.Module):
    """Self-attention with a bias added to the scores: ALiBi's per-head slopes, or one mask for all
    heads; written out (``q @ kᵀ + bias``) or through SDPA's ``attn_mask``."""

    def __init__(self, per_head: bool, sdpa: bool, d: int = 8, heads: int = 2, length: int = 4) -> None:
        super().__init__()
        self.inp, self.qkv, self.out = nn.Linear(5, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.head = nn.Linear(d, 2)
        self.heads, self.sdpa = heads, sdpa
        distance = -(torch.arange(length)[None, :] - torch.arange(length)[:, None]).abs().float()
        slopes = torch.tensor([0.5, 0.25]) if per_head else torch.tensor([0.5, 0.5])
        self.register_buffer("bias", slopes.view(1, heads, 1, 1) * distance.view(1, 1, length, length))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.bias.to(x.dtype)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias).softmax(-1) @ v
        return self.head(h + self.out(y.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("sdpa", [False, True])
def test_a_bias_that_differs_between_heads_keeps_them_in_place(sdpa):
    torch.manual_seed(29)
    inputs = torch.randn(3, 4, 5, dtype=DTYPE)
    alibi = HeadBiasedAttention(per_head=True, sdpa=sdpa).to(DTYPE)
    graph = check_model(alibi, inputs, torch.randint(0, 2, (3, 4)), token_loss, 8)
    heads = graph.node_kind == NodeKind.QUERY
    assert bool(heads.any()) and bool((graph.perm_group[heads] < 0).all())
    # the same architecture with other buffer values, converted right after: the cached plan's
    # value guard sees that the bias no longer tells the heads apart (tests/convert/test_convert_guards.py)
    shared = HeadBiasedAttention(per_head=False, sdpa=sdpa).to(DTYPE)
    graph = check_model(shared, inputs, torch.randint(0, 2, (3, 4)), token_loss, 8)
    assert bool((graph.perm_group[graph.node_kind == NodeKind.QUERY] >= 0).all())



class BoundedScores(nn.Module):
    """Attention whose scores are bounded elementwise by a constant before the softmax, as XGLM and older
    OPT ports write it: ``torch.max(scores, torch.tensor(finfo.min))`` (refused before as "combines
    attention scores with neuron values"), or ``torch.maximum`` / ``torch.minimum`` with a constant.
    (Stock XGLM converts too, but runs in float64 only with float64 as torch's default dtype: its
    ``torch.tensor(finfo(float64).min)`` overflows a float32 default.)"""

    def __init__(self, bound: str, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp, self.qkv, self.out, self.head = nn.Linear(5, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.heads, self.bound = heads, bound

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.inp(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        floor = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        if self.bound == "max":
            scores = torch.max(scores, floor)
        elif self.bound == "maximum":
            scores = torch.maximum(scores, torch.full_like(scores, -3.0))
        else:
            scores = torch.minimum(scores, torch.tensor(2.0, dtype=scores.dtype))
        mixed = scores.softmax(-1) @ v
        return self.head(torch.tanh(self.out(mixed.transpose(1, 2).reshape(b, t, -1))).mean(1))


@pytest.mark.parametrize("bound", ["max", "maximum", "minimum"])
def test_scores_bounded_elementwise_by_a_constant_convert_exactly(bound):
    torch.manual_seed(33)
    model = BoundedScores(bound).to(DTYPE)
    inputs = torch.randn(4, 5, 5, dtype=DTYPE) * (3.0 if bound == "minimum" else 1.0)  # some scores above 2
    check_model(model, inputs, torch.randint(0, 2, (4,)), cross_entropy, 10)


class InPlaceScores(nn.Module):
    """Attention written as Falcon's and older BERT ports write it: the scores scaled and masked
    in place (``scores /= sqrt(d)``, ``scores.masked_fill_``)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp, self.qkv, self.out, self.head = nn.Linear(5, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.heads = heads

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        scores /= q.shape[-1] ** 0.5
        scores.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = scores.softmax(-1) @ v
        return self.head(h + self.out(y.transpose(1, 2).reshape(b, t, -1)))


def test_scores_scaled_and_masked_in_place_convert_exactly():
    torch.manual_seed(31)
    model = InPlaceScores().to(DTYPE)
    graph = check_model(model, torch.randn(3, 4, 5, dtype=DTYPE), torch.randint(0, 2, (3, 4)), token_loss, 8)
    assert bool((graph.perm_group[graph.node_kind == NodeKind.QUERY] >= 0).all())  # heads still exchangeable


class SoftMixtureOfExperts(nn.Module):
    """Two experts weighted by a softmax gate: one gate neuron scales all features of an expert."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.first, self.second, self.out = nn.Linear(4, 2), nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        weights = torch.softmax(self.gate(x), -1)
        return self.out(weights[:, :1] * F.relu(self.first(x)) + weights[:, 1:] * F.relu(self.second(x)))


def test_a_gate_broadcast_over_an_experts_features_keeps_every_feature_apart():
    # the product's neurons were once the gate's single neuron broadcast over the 8 features:
    # out.weight's per-sample gradients were off by ~1 (a silent wrong answer)
    torch.manual_seed(32)
    model = SoftMixtureOfExperts().to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    graph = assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    assert_group_keeps_function(model, inputs, targets, cross_entropy)
    assert graph.act.shape[0] == graph.num_nodes and graph.num_nodes >= 4 + 2 + 16 + 3


class HeadGate(nn.Module):
    """Per-head weights (a softmax over 3 heads) broadcast over each head's 4 channels, as
    attention weights scale a head's values."""

    def __init__(self) -> None:
        super().__init__()
        self.values, self.gate, self.out = nn.Linear(4, 12), nn.Linear(4, 3), nn.Linear(12, 3)

    def forward(self, x):
        values = torch.tanh(self.values(x)).view(-1, 3, 4)
        weights = torch.softmax(self.gate(x), -1)
        return self.out((values * weights.unsqueeze(-1)).reshape(-1, 12))


@pytest.mark.parametrize("model_type", [SoftMixtureOfExperts, HeadGate])
def test_a_gate_broadcast_over_blocks_keeps_the_permutations_within_each_block(model_type):
    """A gate neuron times a block of neurons (an expert's features, a head's channels) keeps
    every permutation within the block (the gate is the same for all of them), the gate fixed. A
    permutation across blocks would change the function, which the group check sees. Checked to
    fail before: the product was a fixed set and both operands pinned (the group was trivial)."""
    torch.manual_seed(33)
    model = model_type().to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    moved = max(assert_group_keeps_function(model, inputs, targets, cross_entropy, seed=seed)[0] for seed in range(4))
    assert moved > 0


class OuterProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(9, 2)

    def forward(self, x):
        return self.out((torch.relu(self.first(x))[:, :, None] * torch.relu(self.second(x))[:, None, :]).flatten(1))


def test_an_outer_product_of_neuron_values_is_refused_by_line():
    with pytest.raises(UnsupportedModuleError, match=r"test_convert_models.py:\d+ in OuterProduct.forward: .*outer product"):
        gradgraph.to_graph(OuterProduct().to(DTYPE), torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 2, (5,)),
                           cross_entropy)

# ------------------------------------------------------------------ data computed from the ids
class PositionsFromIds(nn.Module):
    """Token and position embeddings, the positions counted from the padding like RoBERTa's
    (``fill``: the padding's positions set in place afterwards, before or after the embedding)."""

    def __init__(self, mix_batch: bool = False, copies: bool = False, fill: str | None = None) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(20, 8, padding_idx=PAD), nn.Embedding(20, 8, padding_idx=PAD)
        self.out = nn.Linear(8, 2)
        self.mix_batch, self.copies, self.fill = mix_batch, copies, fill

    def forward(self, ids):
        mask = ids.ne(PAD).int()
        positions = (torch.cumsum(mask, dim=0 if self.mix_batch else 1) * mask).long() + PAD
        if self.fill == "before":
            positions.masked_fill_(mask == 0, PAD + 1)
        h = self.tokens(ids)
        if self.fill == "after":
            self.positions(positions)
            positions.masked_fill_(mask == 0, PAD + 1)
        if self.copies:  # the positions of two "views" added to one copy of the tokens
            return self.out(h[:, None] + self.positions(positions[:, None].expand(-1, 2, -1))).sum((1, 2))
        h = h + self.positions(positions)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
        return self.out(pooled)


def padded_ids(seed=0, batch=3, length=6, vocab=20):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(PAD + 1, vocab, (batch, length), generator=generator)
    ids[0, length - 2:] = PAD
    ids[-1, length - 1:] = PAD
    return ids


def test_positions_and_masks_computed_from_the_ids_are_constants_of_the_datapoint():
    torch.manual_seed(26)
    model = PositionsFromIds().to(DTYPE)
    ids = padded_ids()
    graph = check_model(model, ids, torch.randint(0, 2, (3,)), cross_entropy, 8)
    # every token position and the pooled vector are components
    assert graph.num_components == 3 * (6 + 1)
    # data changed in place before an embedding reads it is still data
    check_model(PositionsFromIds(fill="before").to(DTYPE), ids, torch.randint(0, 2, (3,)), cross_entropy, 8)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_padding_pattern_gives_exact_per_sample_grads(lengths, seed):
    # right-padded sequences of any lengths: positions and the mean over real tokens follow the mask
    torch.manual_seed(seed)
    model = PositionsFromIds().to(DTYPE)
    ids = torch.randint(PAD + 1, 20, (len(lengths), 6))
    for row, length in enumerate(lengths):
        ids[row, length:] = PAD
    targets = torch.randint(0, 2, (len(lengths),))
    ours = gradgraph.to_graph(model, ids, targets, cross_entropy).per_sample_grads()
    reference = per_datapoint_autograd(model, ids, targets, cross_entropy)
    assert set(ours) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-10, rtol=0, msg=name)


class PositionsPassedIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(20, 8), nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids, position_ids):
        return self.out(torch.tanh(self.tokens(ids) + self.positions(position_ids)))


def test_position_ids_passed_in_are_read_again_when_a_cached_plan_replays():
    # the same shapes with other values: a replay used to keep the first call's position rows
    torch.manual_seed(30)
    model = PositionsPassedIn().to(DTYPE)
    ids = torch.randint(0, 20, (3, 5))
    targets = torch.randint(0, 3, (3, 5))
    for positions in (torch.arange(5), torch.arange(5) + 3):
        hits = PLAN_CACHE.hits
        graph = gradgraph.to_graph(model, ids, targets, token_loss, forward_kwargs={"position_ids": positions})
        reference = per_datapoint_autograd(model, ids, targets, token_loss, {"position_ids": positions})
        torch.testing.assert_close(graph.per_sample_grads()["positions.weight"], reference["positions.weight"],
                                   atol=1e-10, rtol=0)
    assert PLAN_CACHE.hits == hits + 1


class BytePixels(nn.Module):
    """uint8 images cast and scaled inside forward: integer input read as features, not as data."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(12, dtype=DTYPE))
        self.net = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, images):
        return self.net(images.flatten(1).to(DTYPE) / 255 * self.gain)


def test_integer_input_cast_to_float_is_read_as_input_features():
    torch.manual_seed(31)
    model = BytePixels().to(DTYPE)
    images = torch.randint(0, 256, (4, 3, 4), dtype=torch.uint8)
    graph = check_model(model, images, torch.randint(0, 3, (4,)), cross_entropy, 6, torch_func=False)
    assert int((graph.node_kind == NodeKind.INPUT).sum()) == 12


def test_data_mixed_across_datapoints_or_copied_over_an_axis_is_refused_by_line():
    ids, targets = padded_ids(), torch.randint(0, 2, (3,))
    with pytest.raises(UnsupportedModuleError, match=r"test_convert_models\.py:\d+ in PositionsFromIds\.forward.*"
                       r"cumsum: combines data of different datapoints"):
        gradgraph.to_graph(PositionsFromIds(mix_batch=True).to(DTYPE), ids, targets, cross_entropy)
    with pytest.raises(UnsupportedModuleError, match=r"test_convert_models\.py:\d+ in PositionsFromIds\.forward.*"
                       r"copies values of one position over a new axis"):
        gradgraph.to_graph(PositionsFromIds(copies=True).to(DTYPE), ids, targets, cross_entropy)
    with pytest.raises(UnsupportedModuleError, match=r"test_convert_models\.py:\d+ in PositionsFromIds\.forward.*"
                       r"changes in place the indices an embedding already read"):
        gradgraph.to_graph(PositionsFromIds(fill="after").to(DTYPE), ids, targets, cross_entropy)


# ------------------------------------------------------------------ transformers (tiny configs, no download)
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


class Wrapped(nn.Module):
    """A ``transformers`` model called as its users call it, with ids as the only input."""

    def __init__(self, model: nn.Module, call) -> None:
        super().__init__()
        self.model, self.call = model, call

    def forward(self, ids):
        return self.call(self.model, ids)


def _encoder_config(transformers, cls, attention, **extra):
    config = cls(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16,
                 pad_token_id=PAD, **extra)
    config._attn_implementation = attention
    return config


def _mean_pooled(model, ids):
    mask = (ids != PAD).long()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return (hidden * mask[..., None].to(hidden.dtype)).sum(1) / mask.sum(1, keepdim=True).to(hidden.dtype)


def bert_case(transformers, attention):
    config = _encoder_config(transformers, transformers.BertConfig, attention)
    model = Wrapped(transformers.BertModel(config, add_pooling_layer=False), _mean_pooled)
    return nn.Sequential(model, nn.Linear(8, 2)), torch.randint(0, 2, (3,)), cross_entropy, 80


def roberta_case(transformers, attention):
    config = _encoder_config(transformers, transformers.RobertaConfig, attention)
    model = Wrapped(transformers.RobertaForSequenceClassification(config),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long()).logits)
    return model, torch.randint(0, 2, (3,)), cross_entropy, 80


def distilbert_case(transformers, attention):
    config = transformers.DistilBertConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, hidden_dim=12, dropout=0.0,
                                           attention_dropout=0.0, max_position_embeddings=16, pad_token_id=PAD)
    config._attn_implementation = attention
    model = Wrapped(transformers.DistilBertForSequenceClassification(config),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long()).logits)
    return model, torch.randint(0, 2, (3,)), cross_entropy, 40


def _gpt2_config(transformers, attention, **extra):
    config = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     pad_token_id=PAD, **extra)
    config._attn_implementation = attention
    return config


def gpt2_case(transformers, attention):
    model = Wrapped(transformers.GPT2LMHeadModel(_gpt2_config(transformers, attention)),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
    return model, padded_ids(1), token_loss, 80


def gpt2_classifier_case(transformers, attention):
    # pools the logits at each sequence's last non-padding token, found from the ids
    model = Wrapped(transformers.GPT2ForSequenceClassification(_gpt2_config(transformers, attention, num_labels=3)),
                    lambda model, ids: model(input_ids=ids, use_cache=False).logits)
    return model, torch.randint(0, 3, (3,)), cross_entropy, 80


def gpt_neo_case(transformers, attention):
    config = transformers.GPTNeoConfig(vocab_size=20, max_position_embeddings=16, hidden_size=8, num_layers=2,
                                       num_heads=2, attention_types=[[["global", "local"], 1]], window_size=3,
                                       resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)
    config._attn_implementation = attention
    model = Wrapped(transformers.GPTNeoForCausalLM(config),
                    lambda model, ids: model(input_ids=ids, use_cache=False).logits)
    return model, padded_ids(2), token_loss, 150


def gptj_case(transformers, attention):
    # rotary embeddings on the first rotary_dim features of each head, interleaved: rotate_every_two
    # is stack((-x2, x1), -1) of the odd and even features (refused before as "joins two versions")
    config = transformers.GPTJConfig(vocab_size=20, n_positions=16, n_embd=8, n_layer=2, n_head=2, rotary_dim=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = attention
    model = Wrapped(transformers.GPTJForCausalLM(config),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
    return model, padded_ids(2), token_loss, 60


def _causal_lm(make_config, model_class):
    def case(transformers, attention):
        config = make_config(transformers)
        config._attn_implementation = attention
        model = Wrapped(getattr(transformers, model_class)(config), lambda model, ids: model(
            input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
        return model, padded_ids(2), token_loss, 40

    return case


falcon_case = _causal_lm(lambda t: t.FalconConfig(  # multi-query attention, parallel attention and MLP
    vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, new_decoder_architecture=False,
    multi_query=True, hidden_dropout=0.0, attention_dropout=0.0), "FalconForCausalLM")
stablelm_case = _causal_lm(lambda t: t.StableLmConfig(  # rotary on half of each head's features
    vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, partial_rotary_factor=0.5, max_position_embeddings=16), "StableLmForCausalLM")
gpt_bigcode_case = _causal_lm(lambda t: t.GPTBigCodeConfig(  # one key/value head for all query heads
    vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16, multi_query=True, resid_pdrop=0.0,
    embd_pdrop=0.0, attn_pdrop=0.0), "GPTBigCodeForCausalLM")
gpt_neox_case = _causal_lm(lambda t: t.GPTNeoXConfig(  # Pythia: fused qkv per head, rotary on a quarter
    vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
    max_position_embeddings=16, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0), "GPTNeoXForCausalLM")
starcoder2_case = _causal_lm(lambda t: t.Starcoder2Config(  # grouped-query attention, sliding window, biases
    vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=12, max_position_embeddings=16, residual_dropout=0.0, embedding_dropout=0.0,
    attention_dropout=0.0), "Starcoder2ForCausalLM")
mpt_case = _causal_lm(lambda t: t.MptConfig(  # ALiBi, fused qkv, LayerNorms without biases
    vocab_size=20, d_model=8, n_layers=1, n_heads=2, max_seq_len=16, expansion_ratio=2), "MptForCausalLM")
codegen_case = _causal_lm(lambda t: t.CodeGenConfig(  # interleaved rotary, fused qkv split in four
    vocab_size=20, n_embd=8, n_layer=1, n_head=2, rotary_dim=2, n_positions=16, n_ctx=16, resid_pdrop=0.0,
    embd_pdrop=0.0, attn_pdrop=0.0), "CodeGenForCausalLM")


def xlm_roberta_case(transformers, attention):
    config = _encoder_config(transformers, transformers.XLMRobertaConfig, attention)
    model = Wrapped(transformers.XLMRobertaModel(config, add_pooling_layer=False), _mean_pooled)
    return nn.Sequential(model, nn.Linear(8, 2)), torch.randint(0, 2, (3,)), cross_entropy, 40


def bloom_case(transformers, attention):
    # ALiBi: a per-head bias from the mask, through baddbmm on [b * heads, T, T] scores; heads stay
    config = transformers.BloomConfig(vocab_size=20, hidden_size=8, n_layer=1, n_head=2, hidden_dropout=0.0,
                                      attention_dropout=0.0, pad_token_id=PAD)
    config._attn_implementation = attention
    model = Wrapped(transformers.BloomForCausalLM(config), lambda model, ids: model(
        input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
    return model, padded_ids(1), token_loss, 40


def opt_case(transformers, attention):
    # OPT counts its learned positions from the attention mask (cumsum), with an offset of 2
    config = transformers.OPTConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, ffn_dim=12,
                                    num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=8,
                                    dropout=0.0, attention_dropout=0.0, pad_token_id=PAD)
    config._attn_implementation = attention
    model = Wrapped(transformers.OPTForCausalLM(config), lambda model, ids: model(
        input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
    return model, padded_ids(1), token_loss, 80


def _encoder_classifier(config_class, model_class, **extra):
    def case(transformers, attention):
        config = _encoder_config(transformers, getattr(transformers, config_class), attention, **extra)
        model = Wrapped(getattr(transformers, model_class)(config),
                        lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long()).logits)
        return model, torch.randint(0, 2, (3,)), cross_entropy, 60

    return case


electra_case = _encoder_classifier("ElectraConfig", "ElectraForSequenceClassification", embedding_size=6)
_esm_classifier = _encoder_classifier("EsmConfig", "EsmForSequenceClassification", position_embedding_type="rotary")


def esm_case(transformers, attention):
    model, targets, loss_fn, _ = _esm_classifier(transformers, attention)
    model.model.esm.contact_head = None  # predicts contacts from attention maps when asked; unused here
    return model, targets, loss_fn, 40  # rotary holds the queries and keys


modernbert_case = _encoder_classifier("ModernBertConfig", "ModernBertForSequenceClassification",
                                      global_attn_every_n_layers=1, local_attention=4)
squeezebert_case = _encoder_classifier("SqueezeBertConfig", "SqueezeBertForSequenceClassification", embedding_size=8,
                                       q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                                       intermediate_groups=2, output_groups=2)


# layer norms written with NumPy's keyword, torch.mean(x, axis=-1) (ImageGPT) and x.mean(axis=2) (I-BERT)
ibert_case = _encoder_classifier("IBertConfig", "IBertForSequenceClassification")


def imagegpt_case(transformers, attention):
    config = transformers.ImageGPTConfig(vocab_size=21, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = attention
    model = Wrapped(transformers.ImageGPTForCausalImageModeling(config),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits)
    return model, padded_ids(1), token_loss, 80


def albert_case(transformers, attention):
    # one layer's parameters shared by both layers, a factorised embedding (4 -> 8)
    config = _encoder_config(transformers, transformers.AlbertConfig, attention, embedding_size=4)
    config.num_hidden_layers = 2
    model = Wrapped(transformers.AlbertModel(config),
                    lambda model, ids: model(input_ids=ids, attention_mask=(ids != PAD).long()).pooler_output)
    return model, None, squared_norm, 80


TRANSFORMERS = {
    "bloom_alibi": (bloom_case, "eager"),
    "opt_positions_from_the_mask": (opt_case, "eager"),
    "albert_shared_layers": (albert_case, "eager"),
    "bert_mean_pooled": (bert_case, "sdpa"),
    "roberta_classifier": (roberta_case, "eager"),
    "distilbert_classifier": (distilbert_case, "sdpa"),
    "gpt2_lm_with_mask": (gpt2_case, "eager"),
    "gpt2_classifier": (gpt2_classifier_case, "sdpa"),
    "gpt_neo_local_attention": (gpt_neo_case, "eager"),
    "gptj_interleaved_rotary": (gptj_case, "eager"),
    "falcon_multi_query": (falcon_case, "eager"),
    "stablelm_partial_rotary": (stablelm_case, "eager"),
    "gpt_bigcode_multi_query": (gpt_bigcode_case, "eager"),
    "codegen_interleaved_rotary": (codegen_case, "eager"),
    "gpt_neox_partial_rotary": (gpt_neox_case, "eager"),
    "starcoder2_grouped_query": (starcoder2_case, "eager"),
    "mpt_alibi": (mpt_case, "eager"),
    "electra_factorised_embedding": (electra_case, "eager"),
    "esm_rotary_encoder": (esm_case, "eager"),
    "modernbert_local_and_global": (modernbert_case, "eager"),
    "squeezebert_grouped_conv1d": (squeezebert_case, "eager"),
    "xlm_roberta_mean_pooled": (xlm_roberta_case, "sdpa"),
    "ibert_layer_norm_by_axis": (ibert_case, "eager"),
    "imagegpt_layer_norm_by_axis": (imagegpt_case, "eager"),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_models_with_masks_and_positions_from_the_ids_convert_exactly(transformers, name):
    make, attention = TRANSFORMERS[name]
    torch.manual_seed(27)
    model, targets, loss_fn, min_moved = make(transformers, attention)
    targets = torch.zeros(3) if targets is None else targets
    # GPT-Neo computes q @ kᵀ in float32 whatever the model's dtype: a permutation of its heads
    # changes that product's rounding (the per-sample gradients still match to 1e-10)
    group_atol = 1e-6 if name.startswith("gpt_neo") else 1e-10
    check_model(model.to(DTYPE).eval(), padded_ids(), targets, loss_fn, min_moved, torch_func=False,
                group_atol=group_atol)


def test_transformers_vit_with_its_conv_patch_embedding_converts_exactly(transformers):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=12, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=3)
    config._attn_implementation = "eager"
    torch.manual_seed(28)
    model = Wrapped(transformers.ViTForImageClassification(config),
                    lambda model, images: model(pixel_values=images).logits).to(DTYPE).eval()
    graph = check_model(model, torch.randn(3, 2, 8, 8, dtype=DTYPE), torch.randint(0, 3, (3,)), cross_entropy, 30)
    assert int((graph.node_kind == NodeKind.INPUT).sum()) == 2 * 4 * 4  # channel x place in the patch


def test_transformers_deit_with_its_distillation_token_converts_exactly(transformers):
    """DeiT: ViT with a second learned token (distillation) concatenated to the patches."""
    config = transformers.DeiTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=12, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(29)
    model = Wrapped(transformers.DeiTModel(config, add_pooling_layer=False),
                    lambda model, images: model(pixel_values=images).last_hidden_state[:, :2].sum(1)).to(DTYPE).eval()
    with torch.no_grad():  # DeiT starts its tokens and positions at zero: a LayerNorm of a zero vector
        for name, param in model.named_parameters():  # scales rounding by 1/sqrt(eps), 1e6 (4e-9 apart)
            if name.endswith(("_token", "position_embeddings")):
                param.normal_()
    check_model(model, torch.randn(3, 2, 8, 8, dtype=DTYPE), torch.zeros(3), squared_norm, 20)


def test_transformers_dinov2_with_registers_inserted_between_the_class_token_and_the_patches(transformers):
    """``cat((h[:, :1], registers, h[:, 1:]))``: one set's positions on both sides of the register
    tokens. Each part wrote its own MERGE edges into the joined set, so every neuron had two parallel
    edges to its copy, and the symmetry tools refused the graph ("edge_permutation: the graph has
    parallel edges of one kind"); now one edge per neuron, and the group check runs."""
    config = transformers.Dinov2WithRegistersConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=8,
                                                    num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                                    num_register_tokens=2, num_labels=3, layerscale_value=0.5)
    config._attn_implementation = "eager"
    torch.manual_seed(30)
    model = Wrapped(transformers.Dinov2WithRegistersForImageClassification(config),
                    lambda model, images: model(pixel_values=images).logits).to(DTYPE).eval()
    with torch.no_grad():  # tokens and positions start at zero (see the DeiT test)
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "register_tokens", "position_embeddings")):
                param.normal_()
    model.model.dinov2_with_registers.embeddings.mask_token = None  # read only for masked pretraining
    graph = check_model(model, torch.randn(3, 3, 16, 16, dtype=DTYPE), torch.randint(0, 3, (3,)), cross_entropy, 60,
                        torch_func=False)
    keys = graph.edge_kind * graph.num_nodes ** 2 + graph.edge_index[0] * graph.num_nodes + graph.edge_index[1]
    assert torch.unique(keys).numel() == keys.numel()  # no parallel edges


def test_transformers_cvt_attention_written_with_einsum_converts_exactly(transformers):
    """CvT: convolutional token embedding, depthwise-convolution + BatchNorm projections of q / k / v, and
    attention scores and context written with ``torch.einsum`` (refused before: "torch.einsum")."""
    config = transformers.CvtConfig(
        num_channels=3, patch_sizes=[3], patch_stride=[2], patch_padding=[1], embed_dim=[8], num_heads=[2],
        depth=[1], mlp_ratio=[2.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0],
        qkv_bias=[True], cls_token=[False], qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1],
        stride_kv=[2], padding_q=[1], stride_q=[1])
    torch.manual_seed(31)
    model = Wrapped(transformers.CvtModel(config, add_pooling_layer=False),
                    lambda model, images: model(pixel_values=images).last_hidden_state.mean((2, 3)))
    check_model(randomise_batch_norms(model.to(DTYPE).eval()), torch.randn(2, 3, 8, 8, dtype=DTYPE), torch.zeros(2),
                squared_norm, 10)


@pytest.mark.parametrize("repeated", [False, True])
def test_one_parameter_of_several_tokens_concatenated_to_the_patches(repeated):
    """Register tokens (DINOv2 with registers) and YOLOS' detection tokens are one parameter
    ``[1, k, d]`` of k tokens joined to the patches: one class-token set per distinct token (a
    token repeated over positions, ``expand``, is one set at each of them). Exact, with a group.
    Checked to fail before: refused ("a concatenated parameter that differs between positions")."""

    class Registers(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch, self.mix, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
            self.registers = nn.Parameter(torch.randn(1, 1 if repeated else 3, 6))

        def forward(self, x):
            tokens = self.patch(x)
            registers = self.registers.expand(x.shape[0], 3, 6)
            h = torch.cat([self.cls_token.expand(x.shape[0], 1, 6), registers, tokens], dim=1)
            h = h + torch.tanh(self.mix(F.layer_norm(h, (6,))))
            return self.head(h[:, :4].mean(1))

    torch.manual_seed(30)
    graph = check_model(Registers().to(DTYPE), torch.randn(3, 5, 3, dtype=DTYPE), torch.zeros(3), squared_norm, 4)
    assert int((graph.node_param == graph.param_names.index("registers")).sum()) == 6 * (1 if repeated else 3)


def test_a_cached_plan_reads_the_new_batchs_positions_and_mask(transformers):
    # RoBERTa's position ids depend on where the padding is: a replay must not reuse the old ones
    model, targets, loss_fn, _ = roberta_case(transformers, "eager")
    model = model.to(DTYPE).eval()
    check_model(model, padded_ids(4), targets, loss_fn, 0, torch_func=False)
    other = padded_ids(5)
    other[1, 2:] = PAD
    hits = PLAN_CACHE.hits
    graph = gradgraph.to_graph(model, other, targets, loss_fn)
    assert PLAN_CACHE.hits == hits + 1
    reference = per_datapoint_autograd(model, other, targets, loss_fn)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)


# ------------------------------------------------------------------ what still refuses
def _refusal(call, op, path, where):
    with pytest.raises(UnsupportedModuleError) as info:
        call()
    message = str(info.value)
    assert re.match(rf"{where}:\d+ in ", message), message
    assert f"(module '{path}'" in message and f": {op}: " in message, message
    return message


def _llama(transformers, attention, key_value_heads=2, heads=2, width=8):
    config = transformers.LlamaConfig(vocab_size=20, hidden_size=width, intermediate_size=12, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=key_value_heads,
                                      max_position_embeddings=16)
    config._attn_implementation = attention
    return Wrapped(transformers.LlamaForCausalLM(config), lambda model, ids: model(
        input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits).to(DTYPE).eval()


@pytest.fixture
def float64_llama_norm(transformers, monkeypatch):
    """LlamaRMSNorm computes in float32 whatever the model's dtype; its float64 form keeps the
    group check exact (the per-sample gradients match to 1e-10 either way)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms_norm(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm)


@pytest.mark.parametrize(("attention", "key_value_heads"), [("eager", 2), ("sdpa", 2), ("eager", 1)])
def test_llama_with_rotary_embeddings_converts_exactly_with_its_attention_held(
        transformers, float64_llama_norm, attention, key_value_heads):
    # key_value_heads=1: grouped-query attention, both heads read copies (repeat_kv) of one key/value head
    torch.manual_seed(32)
    model = _llama(transformers, attention, key_value_heads)
    graph = check_model(model, padded_ids(), padded_ids(1), token_loss, 60, torch_func=False)
    # rotary mixes dim i with dim i + d/2 at a frequency of its own: no query, key or head moves;
    # the SwiGLU hidden neurons and the residual stream do
    attention_nodes = torch.isin(graph.node_kind, torch.tensor([int(NodeKind.QUERY), int(NodeKind.KEY)]))
    assert bool(attention_nodes.any()) and bool((graph.perm_group[attention_nodes] < 0).all())
    assert bool((graph.perm_group[graph.node_kind == NodeKind.FFN_HIDDEN] >= 0).all())


def test_gemma_norm_scale_written_one_plus_weight_converts_exactly(transformers, monkeypatch):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    def rms_norm(self, hidden):  # GemmaRMSNorm's math without its float32 cast (see float64_llama_norm)
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(GemmaRMSNorm, "forward", rms_norm)
    check_model(_gemma(transformers, seed=34), padded_ids(), padded_ids(1), token_loss, 40, torch_func=False)


def _gemma(transformers, seed):
    config = transformers.GemmaConfig(vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                      max_position_embeddings=16)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Wrapped(transformers.GemmaForCausalLM(config), lambda model, ids: model(
        input_ids=ids, attention_mask=(ids != PAD).long(), use_cache=False).logits).to(DTYPE).eval()
    with torch.no_grad():  # Gemma initialises the scales' weights to 0
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1)
    return model


def test_a_float64_model_that_computes_its_norms_in_float32_converts_to_float32_precision(transformers):
    """Stock GemmaRMSNorm casts to float32 whatever the model's dtype, so a float64 Gemma rounds at
    float32 precision inside: the first conversion's check of the summed gradients allows for the
    coarsest dtype the forward computed in (it refused before: "differs from autograd's by 7e-10"),
    and the per-sample gradients match a per-datapoint loop to float32 precision."""
    model = _gemma(transformers, seed=35)
    gradgraph.convert.clear_structure_cache()
    ids, targets = padded_ids(), padded_ids(1)
    graph = gradgraph.to_graph(model, ids, targets, token_loss)
    reference = per_datapoint_autograd(model, ids, targets, token_loss)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-5 * float(reference[name].abs().max()) + 1e-12,
                                   rtol=0, msg=name)


def test_t5_relative_attention_bias_is_refused_with_its_source_line_and_module(transformers):
    config = transformers.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2,
                                   dropout_rate=0.0, relative_attention_num_buckets=4, pad_token_id=PAD)
    config._attn_implementation = "eager"
    model = Wrapped(transformers.T5EncoderModel(config), lambda model, ids: model(
        input_ids=ids, attention_mask=(ids != PAD).long()).last_hidden_state[:, 0]).to(DTYPE).eval()
    message = _refusal(lambda: gradgraph.to_graph(model, padded_ids(), None, squared_norm),
                       "Tensor.add", "model.encoder.block.0.layer.0.SelfAttention", r"modeling_t5\.py")
    assert "T5's relative position bias" in message


def test_mpnet_relative_bias_added_to_the_scores_in_place_is_refused_as_a_learned_score_bias(transformers):
    """MPNet adds its learned relative position bias to the scores in place (``scores += bias``):
    refused for what it is, a learned bias of the scores, not as an in-place op (as it was before,
    with the remedy "use the out-of-place form", which would not help)."""
    config = transformers.MPNetConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=12, max_position_embeddings=16, pad_token_id=PAD)
    model = Wrapped(transformers.MPNetModel(config, add_pooling_layer=False), _mean_pooled).to(DTYPE).eval()
    message = _refusal(lambda: gradgraph.to_graph(model, padded_ids(), None, squared_norm),
                       "Tensor.add", "model.encoder.layer.0.attention.attn", r"modeling_mpnet\.py")
    assert "a learned bias added to the scores" in message and "in-place" not in message


def test_token_mixing_is_refused_with_what_to_do_and_overlapping_convolutions_convert():
    mixer = nn.Sequential(nn.Linear(4, 8), MixerBlock()).to(DTYPE)
    message = _refusal(lambda: gradgraph.to_graph(mixer, torch.randn(3, 4, 4, dtype=DTYPE), None, squared_norm),
                       "torch.nn.functional.linear", "1.token_mlp.0", r"traced_models\.py")
    assert "MLP-Mixer" in message
    # overlapping windows were refused before convolutions had taps (tests/convert/test_convert_conv.py)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 2)).to(DTYPE)
    assert_exact_per_sample_grads(conv, torch.randn(3, 2, 8, 8, dtype=DTYPE), None, squared_norm)
