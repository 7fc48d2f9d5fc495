"""A norm of each part of a value's features: Qwen3's RMSNorm of each head's queries and keys.

``q.view(b, T, heads, d).pow(2).mean(-1)`` is a statistic per head, which the trace refused as "a
reduction over part of the features" (stock ``transformers`` Qwen3 was refused so). It is now one
statistic per part: each part (head) is cut from the rest of its set, so no permutation moves a
neuron into another part, and the norm's weight, shared by every head (``weight [d]`` broadcast
over the heads), is one scale edge per feature with its entry used once per head — which ties the
features it meets in every head (``layout._shared_parameter_ties``, an entry used twice in one
site). Each test failed before: the first three were refusals; without the ties (the reduction
allowed, the layout unchanged) ``test_a_per_head_norm_in_an_mlp`` converted with exact per-sample
gradients and a group that changed the function (logits moved by up to 0.1).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_models import (
    Called,
    assert_exact_per_sample_grads,
    assert_group_keeps_function,
    assert_matches_autograd_loop,
    token_loss,
)

import gradgraph
from gradgraph.convert import UnsupportedOperationError

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Qwen3RMSNorm's math (without its float32 cast): over the last axis, scaled by ``weight``."""
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normalised if weight is None else weight * normalised


class PartNormMLP(nn.Module):
    """``Linear -> view(b, parts, d) -> RMSNorm over d (weight [d] shared by the parts) -> ReLU -> Linear``."""

    def __init__(self, parts: int, width: int, shared_weight: bool = True) -> None:
        super().__init__()
        self.parts = parts
        self.first, self.last = nn.Linear(5, parts * width), nn.Linear(parts * width, 3)
        self.weight = nn.Parameter(torch.rand(width) + 0.5) if shared_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(self.first(x).view(x.shape[0], self.parts, -1), self.weight)
        return self.last(torch.relu(h.reshape(x.shape[0], -1)))


@settings(max_examples=6, deadline=None)
@given(parts=st.integers(2, 4), width=st.integers(2, 4), shared_weight=st.booleans(), seed=st.integers(0, 99))
def test_a_per_head_norm_in_an_mlp(parts, width, shared_weight, seed):
    torch.manual_seed(seed)
    model = PartNormMLP(parts, width, shared_weight).to(DTYPE)
    inputs, targets = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    for element in range(3):
        _, graph, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=seed + element)
    # the hidden neurons still move (within their part; together across parts where the weight is shared)
    groups = graph.perm_group[graph.perm_group >= 0]
    assert bool((torch.bincount(groups) > 1).any())


class QKNormAttention(nn.Module):
    """Self-attention with Qwen3's per-head RMSNorm of queries and keys, no rotary embedding (so
    the heads' features are free to move, unlike Qwen3's)."""

    def __init__(self, width: int = 12, heads: int = 3, transpose_first: bool = False) -> None:
        super().__init__()
        self.heads, self.transpose_first = heads, transpose_first
        self.inp, self.out = nn.Linear(5, width), nn.Linear(width, 3)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.q_norm = nn.Parameter(torch.rand(width // heads) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(width // heads) + 0.5)

    def heads_of(self, value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[b, heads, T, d]``, normalised per head before the transpose (Qwen3) or after it (Gemma3)."""
        value = value.view(value.shape[0], value.shape[1], self.heads, -1)
        if self.transpose_first:
            return rms_norm(value.transpose(1, 2), weight)
        return rms_norm(value, weight).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.heads_of(self.q(h), self.q_norm)
        k = self.heads_of(self.k(h), self.k_norm)
        v = self.v(h).view(b, t, self.heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        return self.out(torch.relu(attended)).mean(1)


@pytest.mark.parametrize("transpose_first", [False, True])
@pytest.mark.parametrize("heads", [2, 3, 4])
def test_attention_with_per_head_query_and_key_norms(heads, transpose_first):
    torch.manual_seed(heads)
    model = QKNormAttention(width=4 * heads, heads=heads, transpose_first=transpose_first).to(DTYPE)
    inputs, targets = torch.randn(4, 5, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    for seed in range(3):
        moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=seed)
        assert moved > 0


def test_a_statistic_of_each_part_read_by_a_linear_map_is_still_refused():
    """A per-part mean read as features (a pooling of pairs, then ``Linear``): not a norm, refused by name."""

    class PairMeans(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.last = nn.Linear(5, 8), nn.Linear(4, 3)

        def forward(self, x):
            return self.last(torch.tanh(self.first(x)).view(-1, 4, 2).mean(-1))

    with pytest.raises(UnsupportedOperationError, match=r"module 'last' of type Linear\): torch\.nn\.functional\."
                                                        r"linear: its input holds values that are not neurons"):
        gradgraph.to_graph(PairMeans().to(DTYPE), torch.randn(3, 5, dtype=DTYPE), torch.randint(0, 3, (3,)),
                           class_loss)


def assert_causal_lm_exact_with_a_true_group(body: nn.Module, norm: str, seed: int) -> None:
    """A stock causal LM (``body(input_ids=ids).logits``) on 3 sequences of 6 ids: exact against a
    per-datapoint autograd loop, its ``norm`` parameters in the graph, a sampled group element that
    moves neurons and keeps the function."""
    model = Called(body, lambda body, ids: body(input_ids=ids, use_cache=False).logits)
    ids, targets = torch.randint(0, 20, (3, 6)), torch.randint(0, 20, (3, 6))
    graph = assert_matches_autograd_loop(model, ids, targets, token_loss)
    assert any(norm in name for name in graph.per_sample_grads())
    moved, _, _ = assert_group_keeps_function(model, ids, targets, token_loss, seed=seed)
    assert moved > 0


def test_stock_qwen3_converts_exactly(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    # Qwen3RMSNorm computes in float32 whatever the model's dtype: its float64 form keeps the group check
    # exact (test_convert_models.py does the same for Llama's norm)
    monkeypatch.setattr(Qwen3RMSNorm, "forward", lambda self, hidden: rms_norm(hidden, self.weight,
                                                                                 self.variance_epsilon))
    config = transformers.Qwen3Config(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=12, head_dim=4,
                                      max_position_embeddings=16)
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    body = transformers.Qwen3ForCausalLM(config).to(DTYPE).eval()
    with torch.no_grad():  # the norms' weights away from their initial ones
        for name, param in body.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)

    assert_causal_lm_exact_with_a_true_group(body, "q_norm", seed=1)


class QKLayerNormAttention(nn.Module):
    """Phi's form: ``nn.LayerNorm(head_dim)`` of the queries and keys after
    ``transpose(1, 2)`` (``[b, heads, T, d]``: the heads and the features are not adjacent axes)."""

    def __init__(self, width: int = 12, heads: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.inp, self.out = nn.Linear(5, width), nn.Linear(width, 3)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.q_norm, self.k_norm = nn.LayerNorm(width // heads, bias=bias), nn.LayerNorm(width // heads, bias=bias)
        with torch.no_grad():
            for norm in (self.q_norm, self.k_norm):
                norm.weight.uniform_(0.5, 1.5)
                if norm.bias is not None:
                    norm.bias.normal_(0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.q_norm(self.q(h).view(b, t, self.heads, -1).transpose(1, 2))
        k = self.k_norm(self.k(h).view(b, t, self.heads, -1).transpose(1, 2))
        v = self.v(h).view(b, t, self.heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.out(torch.tanh(attended)).mean(1)


@pytest.mark.parametrize(("heads", "bias"), [(2, True), (3, False), (4, True)])
def test_attention_with_per_head_layer_norms_of_queries_and_keys(heads, bias):
    """Refused before as "a norm whose last axis is not the features of its input"."""
    torch.manual_seed(10 + heads)
    model = QKLayerNormAttention(width=3 * heads, heads=heads, bias=bias).to(DTYPE)
    inputs, targets = torch.randn(4, 5, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    for seed in range(3):
        moved, _, _ = assert_group_keeps_function(model, inputs, targets, class_loss, seed=seed)
        assert moved > 0


def test_stock_phi_with_query_and_key_layer_norms_converts_exactly():
    transformers = pytest.importorskip("transformers")
    config = transformers.PhiConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=12, max_position_embeddings=16, partial_rotary_factor=0.5,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, qk_layernorm=True)
    config._attn_implementation = "eager"
    torch.manual_seed(4)
    body = transformers.PhiForCausalLM(config).to(DTYPE).eval()

    assert_causal_lm_exact_with_a_true_group(body, "q_layernorm", seed=2)


class BroadcastScale(nn.Module):
    """``h.view(b, parts, d) * weight[d]`` without a statistic: nothing cuts the parts, so the weight's
    entry j meets feature j of every part inside one piece. The group must then keep entry j's
    features together, which the layout cannot say (it pins them): the group check is the test (it
    failed without the layout's ties of an entry used twice in one site)."""

    def __init__(self, parts: int = 3, width: int = 2) -> None:
        super().__init__()
        self.parts = parts
        self.first, self.last = nn.Linear(5, parts * width), nn.Linear(parts * width, 3)
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x)).view(x.shape[0], self.parts, -1) * self.weight
        return self.last(h.reshape(x.shape[0], -1))


def test_a_weight_broadcast_over_parts_that_nothing_cuts_keeps_the_function():
    torch.manual_seed(6)
    model = BroadcastScale().to(DTYPE)
    inputs, targets = torch.randn(5, 5, dtype=DTYPE), torch.randint(0, 3, (5,))
    assert_exact_per_sample_grads(model, inputs, targets, class_loss)
    for seed in range(4):
        assert_group_keeps_function(model, inputs, targets, class_loss, seed=seed)


def test_stock_gemma3_with_per_head_norms_written_one_plus_weight_after_the_transpose(monkeypatch):
    """Gemma3's q_norm / k_norm: an RMSNorm of ``q.transpose(1, 2)`` (``[b, heads, T, d]``) scaled by
    ``1 + weight``. Refused before as "a parameter combined with values that are not one neuron per
    feature" (the scale's neurons lie on two axes that are not adjacent)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    def rms_norm_one_plus(self, hidden):  # Gemma3RMSNorm's math without its float32 cast
        return rms_norm(hidden, None, self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(Gemma3RMSNorm, "forward", rms_norm_one_plus)
    config = transformers.Gemma3TextConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=12, head_dim=4,
                                           max_position_embeddings=16, sliding_window=4)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    body = transformers.Gemma3ForCausalLM(config).to(DTYPE).eval()
    with torch.no_grad():  # Gemma initialises the norms' weights to 0
        for name, param in body.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)

    assert_causal_lm_exact_with_a_true_group(body, "q_norm", seed=3)
