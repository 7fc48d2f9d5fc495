"""Small models people write, for the traced converter's tests (float64-friendly, no downloads)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: fused c_attn, split, head view/transpose, SDPA."""

    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads, self.d, self.causal = heads, d, causal

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=self.causal)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, causal)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT: token + position embeddings, blocks, final norm, head tied to the token table."""

    def __init__(self, vocab: int = 11, context: int = 8, d: int = 8, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def token_loss(logits, targets):
    """Per-sequence next-token loss ``[b]``."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)


class BertStyleLayer(nn.Module):
    """Separate q/k/v Linears, manual scores with an additive padding mask, post-norm, CLS pooling head."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, 2 * d)
        self.output = nn.Linear(2 * d, d)
        self.norm2 = nn.LayerNorm(d)
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)
        self.heads = heads

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x, mask=None):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        probs = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        context = context.view(*context.shape[:2], -1)
        h = self.norm1(self.dense(context) + x)
        h = self.norm2(self.output(F.gelu(self.intermediate(h))) + h)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(pooled)


class ViT(nn.Module):
    """Linear patch embedding, class token and position embedding as bare Parameters, pre-norm blocks."""

    def __init__(self, patch_dim: int = 4, d: int = 8, heads: int = 2, patches: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Linear(patch_dim, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, patches + 1, d))
        self.blocks = nn.ModuleList(Block(d, heads, causal=False) for _ in range(1))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, patches):
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class PooledEncoder(nn.Module):
    """The stock encoder wrapped with a head whose output is mean-pooled over tokens and classes."""

    def __init__(self, d_in: int = 5, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(self.enc(self.inp(x))).mean(dim=(1, 2))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with RMSNorm written by hand, in a residual block."""

    def __init__(self, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.out = nn.Linear(d, 2)

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def forward(self, x):
        h = self.inp(x)
        h = h + self.w2(F.silu(self.w1(self.rms(h))) * self.w3(self.rms(h)))
        return self.out(h)


def reference_per_sample_grads(model, inputs, targets, loss_fn, forward_kwargs=None):
    """Per-datapoint gradients from torch.func (vmap over datapoints), the reference for our factors."""
    from torch.func import functional_call, grad, vmap

    params = {name: value.detach() for name, value in model.named_parameters()}
    kwargs = forward_kwargs or {}

    def one(parameters, x, y):
        output = functional_call(model, parameters, (x[None],), kwargs)
        if loss_fn is None:
            return output.reshape(())
        return loss_fn(output, None if y is None else y[None]).sum()

    return vmap(grad(one), in_dims=(None, 0, None if targets is None else 0))(params, inputs, targets)


def assert_exact_per_sample_grads(model, inputs, targets, loss_fn, tolerance=1e-10, **kwargs):
    """Convert and check every parameter's per-sample gradient against torch.func; returns the graph."""
    import gradgraph

    graph = gradgraph.to_graph(model, inputs, targets, loss_fn, **kwargs)
    ours = graph.per_sample_grads()
    reference = reference_per_sample_grads(model, inputs, targets, loss_fn, kwargs.get("forward_kwargs"))
    assert set(ours) == set(reference), (set(ours) ^ set(reference))
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=tolerance, rtol=0, msg=name)
    return graph
