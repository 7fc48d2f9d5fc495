"""More ``transformers`` families, tried as a new user would: each converts exactly or is refused by name.

Tiny configs built in code (no download), float64. ``test_convert_models.py`` covers the families the
converter was written against; these come from a trial of more families (OLMo, OLMo2, Gemma2, Cohere,
Granite, Mistral, Phi3, Qwen2, Persimmon, BioGPT, XGLM, ELECTRA, MobileBERT, Funnel, DeBERTa and DeBERTa-v2,
SqueezeBERT, ConvBERT, RoFormer, ESM, Mamba, Data2VecText, CamemBERT, ERNIE, MegatronBERT,
RemBERT, BART's decoder, Mixtral and Qwen2-MoE) through ``to_graph`` and a per-datapoint autograd loop, under
eager and SDPA attention: none gave a wrong per-sample gradient (the norm weights of stock Gemma2 and Cohere
differed at float32 precision, the precision their norms compute in whatever the model's dtype). Each
converting family with a construction the older tests lack is checked here for exact per-sample gradients and
a sampled element of its inferred group that keeps the function and maps the graph; each refused one for the
error naming the construction.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from convert_values import squared
from test_convert_models import PAD, padded_ids
from traced_models import assert_group_keeps_function, assert_matches_autograd_loop, token_loss

import gradgraph
from gradgraph import UnsupportedModuleError

DTYPE = torch.float64
SMALL = dict(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
             max_position_embeddings=16)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


class Called(nn.Module):
    """A ``transformers`` model called as its users call it, token ids the only input."""

    def __init__(self, model: nn.Module, output: str, causal: bool) -> None:
        super().__init__()
        self.model, self.output, self.causal = model, output, causal

    def forward(self, ids):
        extra = {"use_cache": False} if self.causal else {}
        return getattr(self.model(input_ids=ids, attention_mask=(ids != PAD).long(), **extra), self.output)


def _rms_norm(self, hidden):
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _centred_norm(self, hidden):
    centred = hidden - hidden.mean(-1, keepdim=True)
    return self.weight * (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


#: Families whose norms compute in float32 whatever the model's dtype (``hidden_states.to(torch.float32)``,
#: as Llama's): their norm's math runs without that cast here, so the checks can be exact in float64 (a
#: stock float32 norm in a float64 model is ``test_convert_models.py``'s Gemma test). name -> (module, class,
#: forward without the cast)
FLOAT32_NORMS = {
    "cohere": ("cohere", "CohereLayerNorm", _centred_norm),
    "granite": ("granite", "GraniteRMSNorm", _rms_norm),
    "olmo2": ("olmo2", "Olmo2RMSNorm", _rms_norm),
    "phi3": ("phi3", "Phi3RMSNorm", _rms_norm),
}

#: name -> (config class, model class, config options, attention implementation, nodes a group element moves at least)
CONVERTING = {
    # q/k norms over all heads at once (not per head)
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, **SMALL), "sdpa", 20),
    # parallel attention and MLP off one LayerNorm without bias, logits scaled
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, **SMALL), "eager", 20),
    # scalar multipliers on embeddings, residuals, attention and logits
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2, **SMALL), "sdpa", 20),
    # fused q/k/v and fused gate/up projections
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **SMALL), "eager", 20),
    # embeddings scaled by sqrt(d), learned positions offset by 2
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(SMALL), "sdpa", 20),
    # its default config: absolute positions, no relative attention (refused by name: below)
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", dict(pad_token_id=PAD, **SMALL), "eager", 20),
    # pre-norm BERT
    "megatron_bert": ("MegatronBertConfig", "MegatronBertModel", dict(pad_token_id=PAD, **SMALL), "eager", 20),
    # input and output embeddings of their own widths
    "rembert": ("RemBertConfig", "RemBertModel", dict(input_embedding_size=8, output_embedding_size=8,
                                                      pad_token_id=PAD, **SMALL), "eager", 20),
}


def _build(transformers, name):
    config_class, model_class, options, attention, min_moved = CONVERTING[name]
    config = getattr(transformers, config_class)(**options)
    config._attn_implementation = attention
    causal = model_class.endswith("CausalLM")
    model = Called(getattr(transformers, model_class)(config), "logits" if causal else "last_hidden_state", causal)
    return model.to(DTYPE).eval(), causal, min_moved


@pytest.mark.parametrize("name", sorted(CONVERTING))
def test_more_transformers_families_convert_exactly_with_a_true_group(transformers, name, monkeypatch):
    if name in FLOAT32_NORMS:
        module, norm, forward = FLOAT32_NORMS[name]
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        monkeypatch.setattr(getattr(modeling, norm), "forward", forward)
    torch.manual_seed(21)
    model, causal, min_moved = _build(transformers, name)
    ids = padded_ids()
    targets, loss_fn = (padded_ids(2), token_loss) if causal else (None, squared)
    assert_matches_autograd_loop(model, ids, targets, loss_fn)
    moved, _, _ = assert_group_keeps_function(model, ids, targets, loss_fn)
    assert moved >= min_moved, moved


#: name -> (config class, model class, config options, words of the refusal)
REFUSED = {
    # top-k routing of tokens to experts
    "mixtral_experts": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=3,
                                                                    num_experts_per_tok=2, **SMALL),
                        r"torch\.topk: gradgraph has no rule for this op"),
    # a LayerNorm over each head's features, its parameters shared by the heads
    "persimmon_head_norms": ("PersimmonConfig", "PersimmonForCausalLM", dict(SMALL),
                             r"layer_norm: these values do not hold one neuron per feature"),
    # disentangled attention: position-to-content and content-to-position scores from the relative embeddings
    "deberta_v2_relative_attention": ("DebertaV2Config", "DebertaV2Model", dict(
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=4, max_relative_positions=8,
        pad_token_id=PAD, **SMALL), r"the parameter '.*rel_embeddings.weight' used where gradgraph expects neuron"),
    # the state-space scan's A = -exp(A_log)
    "mamba_selective_scan": ("MambaConfig", "MambaForCausalLM", dict(vocab_size=20, hidden_size=8, state_size=4,
                                                                     num_hidden_layers=1, expand=2, conv_kernel=3),
                             r"the parameter '.*A_log' used where gradgraph expects neuron values"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_more_transformers_families_are_refused_by_name(transformers, name):
    config_class, model_class, options, words = REFUSED[name]
    torch.manual_seed(21)
    config = getattr(transformers, config_class)(**options)
    config._attn_implementation = "eager"
    # float32: the experts' grouped matmul runs in no other floating dtype
    causal = model_class.endswith("CausalLM")
    model = Called(getattr(transformers, model_class)(config), "logits" if causal else "last_hidden_state", causal)
    targets, loss_fn = (padded_ids(2), token_loss) if causal else (None, squared)
    with pytest.raises(UnsupportedModuleError, match=words):
        gradgraph.to_graph(model.eval(), padded_ids(), targets, loss_fn)


# ------------------------------------------------------------------ vision
VISION = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12, image_size=16,
              patch_size=8, num_channels=3)

#: name -> (config class, model class, config options, output read, nodes a group element moves at least)
VISION_CONVERTING = {
    # quick-GELU, pre-norm, a class token, the pooled output through a final LayerNorm
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", dict(VISION), "pooler_output", 10),
    # layer scale: each block's output multiplied by a learned vector (lambda_1, lambda_2)
    "data2vec_vision_layer_scale": ("Data2VecVisionConfig", "Data2VecVisionModel",
                                    dict(layer_scale_init_value=0.5, **VISION), "last_hidden_state", 10),
}


class Looked(nn.Module):
    """A vision model called on ``pixel_values``, one of its outputs read."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixels):
        return getattr(self.model(pixel_values=pixels), self.output)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("name", sorted(VISION_CONVERTING))
def test_more_vision_models_convert_exactly_with_a_true_group(transformers, name):
    config_class, model_class, options, output, min_moved = VISION_CONVERTING[name]
    torch.manual_seed(21)
    model = Looked(getattr(transformers, model_class)(getattr(transformers, config_class)(**options)), output)
    model = model.to(DTYPE).eval()
    assert_matches_autograd_loop(model, images(), None, squared)
    moved, _, _ = assert_group_keeps_function(model, images(), None, squared)
    assert moved >= min_moved, moved


def test_beit_relative_position_bias_is_refused_as_a_learned_score_bias(transformers):
    """BEiT's learned relative bias of the attention scores (a table, interpolated to the window): the class of
    T5's and Swin's, refused naming the table (at SDPA's mask since session 23, where the resampled table is
    followed; before at the interpolation)."""
    config = transformers.BeitConfig(use_relative_position_bias=True, **VISION)
    model = Looked(transformers.BeitModel(config), "last_hidden_state").to(DTYPE).eval()
    with pytest.raises(UnsupportedModuleError, match=r"scaled_dot_product_attention: an attn_mask computed from the "
                       r"parameter\(s\) \['.*relative_position_bias_table'\] \(a learned bias of the attention scores"):
        gradgraph.to_graph(model, images(), None, squared)


def test_siglip_attention_pooling_head_is_refused_as_a_learned_query_and_converts_without_it(transformers):
    """SigLIP's vision tower pools its tokens with ``nn.MultiheadAttention(probe, h, h)``, a learned query: refused
    in those words since session 23 (before: "cross-attention ...; for a bare module pass nothing for key/value in
    forward_kwargs", advice for another model). With ``vision_use_head=False`` (the remedy named) it converts
    exactly with a true group."""
    torch.manual_seed(23)
    for use_head in (True, False):
        config = transformers.SiglipVisionConfig(vision_use_head=use_head, **VISION)
        config._attn_implementation = "eager"
        model = Looked(transformers.SiglipVisionModel(config), "pooler_output" if use_head else "last_hidden_state")
        model = model.to(DTYPE).eval()
        if use_head:
            with pytest.raises(UnsupportedModuleError, match=r"module 'model\.head\.attention' of type "
                               r"MultiheadAttention\): nn\.MultiheadAttention: attention pooling with a learned query "
                               r"\(the parameter 'model\.head\.probe' attends over the tokens\).*"
                               r"SigLIP: vision_use_head=False"):
                gradgraph.to_graph(model, images(), None, squared)
        else:
            assert_matches_autograd_loop(model, images(), None, squared)
            moved, _, _ = assert_group_keeps_function(model, images(), None, squared)
            assert moved >= 10, moved


#: name -> (config class, model class, options of the model's constructor)
INTERPOLATED = {
    "vit": ("ViTConfig", "ViTModel", {"add_pooling_layer": False}),
    "deit": ("DeiTConfig", "DeiTModel", {"add_pooling_layer": False}),  # a distillation token beside the class token
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", {}),
}


@pytest.mark.parametrize("name", sorted(INTERPOLATED))
def test_vision_transformers_asked_to_interpolate_their_positions_convert_exactly(transformers, name):
    """``model(pixel_values=..., interpolate_pos_encoding=True)`` on 24 x 24 images of a model made for 16 x 16: its
    position table is resampled in the forward (bicubic, in the model's dtype), which converts since session 23
    (refused before: "a parameter used where gradgraph expects neuron values"). Weights drawn at 0.5: at their own
    initialisation (std 0.02) the LayerNorms amplify any two summation orders' rounding to ~1e-8."""
    config_class, model_class, options = INTERPOLATED[name]
    torch.manual_seed(23)

    class Interpolating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = getattr(transformers, model_class)(getattr(transformers, config_class)(**VISION), **options)

        def forward(self, pixels):
            return self.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state

    model = Interpolating().to(DTYPE).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    pixels = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    assert_matches_autograd_loop(model, pixels, None, squared)
    moved, _, _ = assert_group_keeps_function(model, pixels, None, squared)
    assert moved >= 10, moved
