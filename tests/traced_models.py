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


def convert_twice(model, shape=(4, 3), seed=0):
    """Convert ``model`` on two batches of ``shape`` (class targets of 3, ``cross_entropy`` per
    datapoint): the first a trace (the structure cache cleared), the second the cached plan's replay
    on other inputs (asserted: no new trace), each checked exact. Returns ``([first, second],
    inputs, targets)`` with the second batch's inputs and targets."""
    from gradgraph.convert import clear_structure_cache
    from gradgraph.convert.plan import PLAN_CACHE

    clear_structure_cache()
    torch.manual_seed(seed)
    graphs = []
    for _ in range(2):
        misses = PLAN_CACHE.misses
        inputs, targets = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
        graphs.append(assert_exact_per_sample_grads(model, inputs, targets,
                                                    lambda out, y: F.cross_entropy(out, y, reduction="none")))
    assert PLAN_CACHE.misses == misses, "the second conversion traced again instead of replaying the plan"
    return graphs, inputs, targets


def assert_matches_autograd_loop(model: nn.Module, inputs, targets, loss_fn, atol: float = 1e-10):
    """``to_graph(model, inputs, targets, loss_fn)`` against one autograd pass per datapoint, the model
    run on it alone (the reference where torch.func cannot run the model: a vmap rule missing, as
    RReLU's, or ``transformers``' mask code branching on values); every parameter must be in the
    graph; a sparse gradient (``nn.Embedding(sparse=True)``) is compared dense. Returns the graph."""
    import gradgraph

    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    per_sample = graph.per_sample_grads()
    params = dict(model.named_parameters())
    assert set(per_sample) == set(params), set(per_sample) ^ set(params)
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i:i + 1]), None if targets is None else targets[i:i + 1]).sum()
        for (name, param), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()),
                                                                          allow_unused=True)):
            grad = torch.zeros_like(param) if grad is None else grad.to_dense() if grad.is_sparse else grad
            torch.testing.assert_close(per_sample[name][i], grad, atol=atol, rtol=0, msg=f"{name}, datapoint {i}")
    return graph


class Called(nn.Module):
    """``call(body, inputs)`` as a module: a ``transformers`` model called as its users call it
    (``body(input_ids=ids).logits``), with the input tensor as the only argument."""

    def __init__(self, body: nn.Module, call) -> None:
        super().__init__()
        self.body, self.call = body, call

    def forward(self, inputs):
        return self.call(self.body, inputs)


def assert_per_sample_grads_match_loop(model: nn.Module, inputs: torch.Tensor, atol: float = 1e-10):
    """``to_graph(model, inputs)`` (output mode) against a per-datapoint autograd loop of the output's
    sum. Unlike :func:`assert_exact_per_sample_grads`, a parameter the graph leaves out (a branch
    this input does not take) passes when its gradient is zero. Returns the graph."""
    import gradgraph

    graph = gradgraph.to_graph(model, inputs)
    per_sample = graph.per_sample_grads()
    for i in range(inputs.shape[0]):
        model.zero_grad()
        model(inputs[i:i + 1]).sum().backward()
        for name, param in model.named_parameters():
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            got = per_sample[name][i] if name in per_sample else torch.zeros_like(param)
            torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=name)
    return graph

def assert_per_sample_grad_norms(graph, model, inputs, targets, loss_fn, atol=1e-12):
    """``graph.per_sample_grad_norms()`` (total and ``by_parameter``) against the norms of torch.func's
    per-sample gradients of ``model`` on the same batch."""
    reference = reference_per_sample_grads(model, inputs, targets, loss_fn)
    total = torch.stack([value.flatten(1).square().sum(1) for value in reference.values()]).sum(0).sqrt()
    torch.testing.assert_close(graph.per_sample_grad_norms(), total, atol=atol, rtol=0)
    ours = graph.per_sample_grad_norms(by_parameter=True)
    assert set(ours) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value.flatten(1).norm(dim=1), atol=atol, rtol=0, msg=name)


# ----------------------------------------------------------------------- models people bring
class NanoCausalSelfAttention(nn.Module):
    """nanoGPT's attention as its repository writes it: the slow path masks with a tril buffer."""

    def __init__(self, d: int, heads: int, block_size: int, flash: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.n_head, self.n_embd, self.flash = heads, d, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()  # noqa: N806
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias, through F.layer_norm."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int, block_size: int, flash: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = NanoLayerNorm(d, True), NanoLayerNorm(d, False)
        self.attn = NanoCausalSelfAttention(d, heads, block_size, flash)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's ``GPT``: ModuleDict transformer, tied head, loss inside forward when given targets.

    Returns ``(logits, loss)`` like the original; with targets the logits cover every position,
    without them only the last (``x[:, [-1], :]``).
    """

    def __init__(self, vocab: int = 13, block_size: int = 8, d: int = 8, heads: int = 2, layers: int = 2,
                 flash: bool = False) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d), drop=nn.Dropout(0.1),
            h=nn.ModuleList(NanoBlock(d, heads, block_size, flash) for _ in range(layers)),
            ln_f=NanoLayerNorm(d, True)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class PatchViT(nn.Module):
    """A ViT on images ``[b, c, h, w]``: patches cut by ``reshape``/``permute`` or a strided
    ``nn.Conv2d``, a class token, a learned position embedding, the stock pre-norm encoder."""

    def __init__(self, image: int = 8, patch: int = 4, channels: int = 2, d: int = 8, heads: int = 2,
                 classes: int = 3, conv: bool = False) -> None:
        super().__init__()
        self.patch, self.conv = patch, conv
        if conv:
            self.proj = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        else:
            self.proj = nn.Linear(channels * patch * patch, d)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2 + 1, d))
        layer = nn.TransformerEncoderLayer(d, heads, 12, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, images):
        b, c, h, w = images.shape
        p = self.patch
        if self.conv:
            x = self.proj(images).flatten(2).transpose(1, 2)
        else:
            x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
            x = self.proj(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class NormResidualMLP(nn.Module):
    """``Flatten``, then residual blocks behind a LayerNorm or an (eval-mode) BatchNorm1d."""

    def __init__(self, d_in: int = 6, d: int = 8, hidden: int = 12, classes: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d if batch_norm else nn.LayerNorm
        self.flatten, self.inp = nn.Flatten(), nn.Linear(d_in, d)
        self.norm1, self.fc1, self.fc2 = norm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.norm2, self.fc3, self.fc4 = norm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(self.flatten(x))
        h = h + self.fc2(F.relu(self.fc1(self.norm1(h))))
        h = h + self.fc4(F.gelu(self.fc3(self.norm2(h))))
        return self.head(h)


class FusedSwiGLU(nn.Module):
    """A SwiGLU feed-forward whose gate and value come from one fused ``w12``, split by ``chunk``
    (or interleaved, ``h[..., ::2]`` / ``h[..., 1::2]``), behind ``nn.RMSNorm``."""

    def __init__(self, d: int = 6, hidden: int = 10, classes: int = 3, interleaved: bool = False) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(d, d), nn.RMSNorm(d)
        self.w12 = nn.Linear(d, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, classes)
        self.interleaved = interleaved

    def forward(self, x):
        h = self.inp(x)
        fused = self.w12(self.norm(h))
        a, b = (fused[..., ::2], fused[..., 1::2]) if self.interleaved else fused.chunk(2, dim=-1)
        return self.head(h + self.w3(F.silu(a) * b))


class MixerBlock(nn.Module):
    """MLP-Mixer: a token-mixing MLP over the patch axis, then a channel MLP."""

    def __init__(self, tokens: int = 4, d: int = 8) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 6), nn.GELU(), nn.Linear(6, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(d, 10), nn.GELU(), nn.Linear(10, d))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


def logits_of(output):
    """The logits of a model output: a tensor, the first of a tuple, or ``.logits``."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "logits", output)


def assert_group_keeps_function(model, inputs, targets, loss_fn, seed=0, forward_kwargs=None, atol=1e-10):
    """A sampled element of the inferred group keeps the function and maps the graph to the
    permuted model's graph, tensor for tensor (to ``atol``); returns ``(nodes moved, graph, perm)``."""
    import gradgraph
    from gradgraph.symmetry import permute_model, permute_nodes, random_node_permutation
    from strategies import assert_same_graph

    kwargs = {"forward_kwargs": forward_kwargs} if forward_kwargs else {}
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn, **kwargs)
    perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
    permuted_model = permute_model(model, graph, perm)
    with torch.no_grad():
        before = logits_of(model(inputs, **(forward_kwargs or {})))
        after = logits_of(permuted_model(inputs, **(forward_kwargs or {})))
    torch.testing.assert_close(after, before, atol=atol, rtol=0)
    converted = gradgraph.to_graph(permuted_model, inputs, targets, loss_fn, **kwargs)
    assert_same_graph(converted, permute_nodes(graph, perm), atol=atol)
    return int((perm != torch.arange(graph.num_nodes)).sum()), graph, perm


def randomise_batch_norms(model):
    """Running statistics and affine parameters away from their defaults (so eval BN is not identity)."""
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()
