"""Attention conversion: exact per-sample gradients, graph layout, head symmetries, error paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from strategies import assert_same_graph
from traced_models import assert_exact_per_sample_grads
from torch.func import functional_call, grad, vmap

import gradgraph
from gradgraph import EdgeKind, GradGraphError, NodeKind, UnsupportedModuleError
from gradgraph.symmetry import (
    HeadPermutation,
    TransformerPermutation,
    edge_permutation,
    identity_transformer_permutation,
    move_values,
    permute_ffn_hidden,
    permute_heads,
    permute_nodes,
    permute_query_key,
    permute_transformer,
    permute_value_output,
    random_node_permutation,
    random_transformer_permutation,
    transformer_node_permutation,
)

# ---------------------------------------------------------------------- helpers
class Wrapped(nn.Module):
    """Input projection -> attention module -> per-token head; masks pass through forward."""

    def __init__(self, core: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, _width(core))
        self.core = core
        self.head = nn.Linear(_width(core), d_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        if isinstance(self.core, nn.MultiheadAttention):
            h = self.core(h, h, h, attn_mask=mask, need_weights=False)[0]
        elif isinstance(self.core, nn.TransformerEncoder):
            h = self.core(h, mask=mask)
        else:
            h = self.core(h, src_mask=mask)
        return self.head(h)


def _width(core: nn.Module) -> int:
    if isinstance(core, nn.MultiheadAttention):
        return core.embed_dim
    if isinstance(core, nn.TransformerEncoder):
        return core.layers[0].self_attn.embed_dim
    return core.self_attn.embed_dim


def encoder_layer(width=8, heads=2, ffn=6, *, batch_first=True, norm_first=False, activation="relu", bias=True):
    return nn.TransformerEncoderLayer(
        width, heads, ffn, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first,
        bias=bias,
    )


def encoder(width=8, heads=2, ffn=6, depth=2, *, final_norm=True, **options):
    return nn.TransformerEncoder(
        encoder_layer(width, heads, ffn, **options), depth, norm=nn.LayerNorm(width) if final_norm else None,
        enable_nested_tensor=False,
    )


def token_loss(batch_first: bool):
    """Per-datapoint squared error, summed over tokens and features, in the model's layout."""

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) ** 2).sum(dim=(1, 2) if batch_first else (0, 2))

    return loss_fn


def batch_for(model: nn.Module, d_in: int, d_out: int, b: int, tokens: int, batch_first: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(b, tokens, d_in, generator=generator, dtype=torch.float64)
    targets = torch.randn(b, tokens, d_out, generator=generator, dtype=torch.float64)
    if not batch_first:
        inputs, targets = inputs.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous()
    return inputs, targets


def call(model: nn.Module, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if isinstance(model, nn.MultiheadAttention):
        return model(inputs, inputs, inputs, **kwargs)[0]
    return model(inputs, **kwargs)


def reference_per_sample_grads(model, inputs, targets, batch_first, kwargs, per_datapoint_kwargs=None):
    """torch.func per-sample gradients of the real module: the ground truth.

    ``per_datapoint_kwargs`` (a key padding mask ``[b, T]``, a per-head mask ``[b, H, T, T]``) are
    split along dim 0.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    loss_fn = token_loss(batch_first)
    axis = 0 if batch_first else 1

    def one(p, x, y, extra):
        x, y = x.unsqueeze(axis), y.unsqueeze(axis)
        # a padding mask keeps a batch dim of 1; a per-head mask [H, T, T] is already per datapoint
        call_kwargs = {**kwargs, **{key: value[None] if key.endswith("padding_mask") else value
                                    for key, value in extra.items()}}
        if isinstance(model, nn.MultiheadAttention):
            output = functional_call(model, p, (x, x, x), call_kwargs)[0]
        else:
            output = functional_call(model, p, (x,), call_kwargs)
        return loss_fn(output, y)[0]

    return vmap(grad(one), in_dims=(None, axis, axis, 0))(params, inputs, targets, per_datapoint_kwargs or {})


def causal_mask(tokens: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(tokens, dtype=torch.float64)


def convert(model, inputs, targets, batch_first, kwargs=None):
    return gradgraph.to_graph(model, inputs, targets, token_loss(batch_first), forward_kwargs=kwargs or {})


# ----------------------------------------------------------- per-sample gradients
MODELS = {
    "mha": lambda bf, nf, act, bias: nn.MultiheadAttention(8, 2, batch_first=bf, bias=bias),
    "layer": lambda bf, nf, act, bias: encoder_layer(batch_first=bf, norm_first=nf, activation=act, bias=bias),
    "encoder": lambda bf, nf, act, bias: encoder(batch_first=bf, norm_first=nf, activation=act, bias=bias),
    "encoder_no_final_norm": lambda bf, nf, act, bias: encoder(
        batch_first=bf, norm_first=nf, activation=act, bias=bias, final_norm=False
    ),
    "wrapped_encoder": lambda bf, nf, act, bias: Wrapped(
        encoder(batch_first=bf, norm_first=nf, activation=act, bias=bias), 3, 2
    ),
    "wrapped_mha": lambda bf, nf, act, bias: Wrapped(nn.MultiheadAttention(8, 2, batch_first=bf, bias=bias), 3, 2),
    "sequential": lambda bf, nf, act, bias: nn.Sequential(
        nn.Linear(3, 8), encoder(batch_first=bf, norm_first=nf, activation=act, bias=bias, depth=1), nn.Linear(8, 2)
    ),
}
MASK_KEY = {"mha": "attn_mask", "layer": "src_mask", "encoder": "mask", "encoder_no_final_norm": "mask",
            "wrapped_encoder": "mask", "wrapped_mha": "mask"}


def widths(name: str) -> tuple[int, int]:
    return (3, 2) if name in ("wrapped_encoder", "wrapped_mha", "sequential") else (8, 8)


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(MODELS)),
    batch_first=st.booleans(),
    norm_first=st.booleans(),
    activation=st.sampled_from(["relu", "gelu"]),
    bias=st.booleans(),
    masked=st.booleans(),
    b=st.integers(1, 3),
    tokens=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_per_sample_grads_match_torch_func(name, batch_first, norm_first, activation, bias, masked, b, tokens, seed):
    torch.manual_seed(seed)
    model = MODELS[name](batch_first, norm_first, activation, bias).double().eval()
    d_in, d_out = widths(name)
    inputs, targets = batch_for(model, d_in, d_out, b, tokens, batch_first, seed)
    kwargs = {MASK_KEY[name]: causal_mask(tokens)} if masked and name in MASK_KEY else {}

    graph = convert(model, inputs, targets, batch_first, kwargs)
    reference = reference_per_sample_grads(model, inputs, targets, batch_first, kwargs)
    from_graph = graph.per_sample_grads()

    assert set(from_graph) == {param_name for param_name, _ in model.named_parameters()}
    for param_name, expected in reference.items():
        assert from_graph[param_name].shape == expected.shape
        torch.testing.assert_close(from_graph[param_name], expected, atol=1e-9, rtol=0,
                                   msg=lambda m, n=param_name: f"{n}: {m}")
    assert graph.num_components == b * tokens and int(graph.num_datapoints) == b
    assert torch.equal(graph.component_sample, torch.arange(b).repeat_interleave(tokens))
    # the output neurons hold the model's output, token by token
    output = call(model, inputs, kwargs)
    output = output if batch_first else output.transpose(0, 1)
    torch.testing.assert_close(graph.act[graph.node_kind == NodeKind.OUTPUT].T, output.reshape(b * tokens, -1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_stack_every_parameter_with_and_without_causal_mask(batch_first, norm_first, activation):
    torch.manual_seed(1)
    model = Wrapped(encoder(batch_first=batch_first, norm_first=norm_first, activation=activation), 3, 2)
    model = model.double().eval()
    inputs, targets = batch_for(model, 3, 2, 3, 5, batch_first)
    for kwargs in ({}, {"mask": causal_mask(5)}):
        graph = convert(model, inputs, targets, batch_first, kwargs)
        reference = reference_per_sample_grads(model, inputs, targets, batch_first, kwargs)
        from_graph = graph.per_sample_grads()
        # in_proj is one parameter whose q/k/v row blocks come from three edge kinds
        assert {"core.layers.0.self_attn.in_proj_weight", "core.layers.1.norm2.weight", "core.norm.bias",
                "head.weight", "embed.bias"} <= set(from_graph)
        assert set(from_graph) == set(reference)
        for name, expected in reference.items():
            torch.testing.assert_close(from_graph[name], expected, atol=1e-9, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # the mask matters: without it the gradients differ
    unmasked = convert(model, inputs, targets, batch_first).per_sample_grads()
    assert not torch.allclose(unmasked["embed.weight"], from_graph["embed.weight"], atol=1e-6)


def test_mean_grad_and_key_padding_and_boolean_masks():
    torch.manual_seed(2)
    model = encoder(depth=1, batch_first=True).double().eval()
    inputs, targets = batch_for(model, 8, 8, 3, 4, True)
    padding = torch.tensor([[False, False, False, True], [False, False, False, False], [False, True, True, True]])
    boolean_causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    kwargs = {"mask": boolean_causal, "src_key_padding_mask": padding}
    graph = convert(model, inputs, targets, True, kwargs)
    reference = reference_per_sample_grads(model, inputs, targets, True, {"mask": boolean_causal},
                                           {"src_key_padding_mask": padding})
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-9, rtol=0)
    model.zero_grad()
    token_loss(True)(model(inputs, **kwargs), targets).mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(graph.mean_grad()[name], param.grad, atol=1e-9, rtol=0)


def test_per_head_attention_mask_of_a_bare_mha():
    torch.manual_seed(3)
    model = nn.MultiheadAttention(8, 2, batch_first=True).double()
    inputs, targets = batch_for(model, 8, 8, 2, 3, True)
    mask = torch.randn(2 * 2, 3, 3, dtype=torch.float64)  # [b * heads, T, T], additive
    graph = convert(model, inputs, targets, True, {"attn_mask": mask})
    reference = reference_per_sample_grads(model, inputs, targets, True, {}, {"attn_mask": mask.reshape(2, 2, 3, 3)})
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-9, rtol=0)


# ------------------------------------------------------------------- graph layout
def test_layout_of_a_post_norm_layer():
    torch.manual_seed(4)
    model = encoder_layer(width=4, heads=2, ffn=3).double().eval()
    inputs, targets = batch_for(model, 4, 4, 2, 3, True)
    graph = convert(model, inputs, targets, True)
    kinds = [NodeKind.INPUT, NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTENTION, NodeKind.RESIDUAL,
             NodeKind.NORM, NodeKind.FFN_HIDDEN, NodeKind.RESIDUAL, NodeKind.OUTPUT]
    sizes = [4, 4, 4, 4, 4, 4, 4, 3, 4, 4]
    assert graph.node_kind.tolist() == [int(k) for k, s in zip(kinds, sizes) for _ in range(s)]
    count = {kind: int((graph.edge_kind == kind).sum()) for kind in EdgeKind}
    assert count[EdgeKind.QUERY] == count[EdgeKind.KEY] == count[EdgeKind.VALUE] == 16
    assert count[EdgeKind.ATTENTION_OUT] == 16 and count[EdgeKind.FFN_IN] == count[EdgeKind.FFN_OUT] == 12
    assert count[EdgeKind.QUERY_KEY] == count[EdgeKind.VALUE_ATTENTION] == 4
    assert count[EdgeKind.QUERY_ATTENTION] == 2 * 2 * 2  # heads x d_h x d_h
    assert count[EdgeKind.RESIDUAL] == 8 and count[EdgeKind.NORM_SCALE] == 8
    assert count[EdgeKind.LINEAR] == 0
    # heads only as relations: query dims of one head connect to output dims of the same head
    src, dst = graph.edge_index[:, graph.edge_kind == EdgeKind.QUERY_ATTENTION]
    assert torch.equal(graph.perm_block[src], graph.perm_block[dst])
    # values only: kinds are the integer node_kind / edge_kind, never columns of x / edge_attr
    assert graph.x.shape == (graph.num_nodes, 1) and graph.edge_attr.shape == (graph.edge_index.shape[1], 1)
    # structural edges carry weight 1 and no parameter
    structural = graph.edge_param < 0
    assert torch.equal(structural, torch.isin(graph.edge_kind, torch.tensor(
        [EdgeKind.RESIDUAL, EdgeKind.QUERY_KEY, EdgeKind.VALUE_ATTENTION, EdgeKind.QUERY_ATTENTION])))
    assert torch.all(graph.weight[structural] == 1)
    # LayerNorm gamma on NORM_SCALE edges, beta as the normed neurons' bias
    scale = graph.edge_kind == EdgeKind.NORM_SCALE
    assert torch.equal(graph.weight[scale][:4], model.norm1.weight.detach())
    assert torch.equal(graph.bias[graph.node_kind == NodeKind.NORM], model.norm1.bias.detach())
    # key biases come from the middle third of in_proj_bias
    keys = graph.node_kind == NodeKind.KEY
    assert torch.equal(graph.bias[keys], model.self_attn.in_proj_bias.detach()[4:8])
    assert graph.node_param_pos[keys].tolist() == [4, 5, 6, 7]


def test_to_parameters_round_trips_every_parameter():
    torch.manual_seed(5)
    model = Wrapped(encoder(norm_first=True, batch_first=False), 3, 2).double().eval()
    inputs, targets = batch_for(model, 3, 2, 2, 3, False)
    graph = convert(model, inputs, targets, False)
    params = graph.to_parameters(graph.weight, graph.bias)
    assert set(params) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert torch.equal(params[name], param.detach()), name


def test_act_of_a_layernorm_input_is_the_normalised_value():
    torch.manual_seed(6)
    model = encoder_layer(width=4, heads=2, ffn=3, norm_first=True).double().eval()
    inputs, targets = batch_for(model, 4, 4, 2, 3, True)
    graph = convert(model, inputs, targets, True)
    x = inputs.reshape(6, 4)
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + model.norm1.eps)
    torch.testing.assert_close(graph.act[:4].T, expected)


# ------------------------------------------------------------------- symmetries
def symmetry_model(kind: str, seed: int) -> tuple[nn.Module, bool]:
    torch.manual_seed(seed)
    batch_first = seed % 2 == 0
    models = {
        "mha": lambda: nn.MultiheadAttention(8, 2, batch_first=batch_first),
        "encoder": lambda: Wrapped(encoder(batch_first=batch_first, norm_first=seed % 3 == 0, ffn=5), 3, 2),
        "layer": lambda: encoder_layer(width=6, heads=3, ffn=4, batch_first=batch_first, activation="gelu"),
    }
    return models[kind]().double().eval(), batch_first


ACTIONS = {
    "heads": dict(heads=True, query_key=False, value_output=False, ffn=False),
    "query_key": dict(heads=False, query_key=True, value_output=False, ffn=False),
    "value_output": dict(heads=False, query_key=False, value_output=True, ffn=False),
    "ffn": dict(heads=False, query_key=False, value_output=False, ffn=True),
    "all": dict(heads=True, query_key=True, value_output=True, ffn=True),
}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["mha", "encoder", "layer"]), action=st.sampled_from(sorted(ACTIONS)),
       seed=st.integers(0, 1000), masked=st.booleans())
def test_symmetries_preserve_the_function_and_permute_the_graph(kind, action, seed, masked):
    model, batch_first = symmetry_model(kind, seed)
    d_in = 3 if kind == "encoder" else _width(model)
    d_out = 2 if kind == "encoder" else _width(model)
    inputs, targets = batch_for(model, d_in, d_out, 2, 4, batch_first, seed)
    key = {"mha": "attn_mask", "encoder": "mask", "layer": "src_mask"}[kind]
    kwargs = {key: causal_mask(4)} if masked else {}
    permutation = random_transformer_permutation(model, torch.Generator().manual_seed(seed), **ACTIONS[action])
    permuted = permute_transformer(model, permutation)

    torch.testing.assert_close(call(permuted, inputs, kwargs), call(model, inputs, kwargs), atol=1e-12, rtol=0)
    graph = convert(model, inputs, targets, batch_first, kwargs)
    assert_same_graph(convert(permuted, inputs, targets, batch_first, kwargs), permute_transformer(graph, permutation))
    # the same permutation read off the graph's own structure
    assert_same_graph(
        permute_transformer(graph, random_transformer_permutation(graph, torch.Generator().manual_seed(seed),
                                                                  **ACTIONS[action])),
        permute_transformer(graph, permutation),
    )


def test_each_named_action_moves_what_it_says():
    model, batch_first = symmetry_model("layer", 0)  # 3 heads of 2 dims, FFN 4
    inputs, targets = batch_for(model, 6, 6, 2, 3, batch_first)
    graph = convert(model, inputs, targets, batch_first)
    swap = torch.tensor([[1, 0], [0, 1], [1, 0]])
    cases = [
        (permute_heads, [torch.tensor([2, 0, 1])]),
        (permute_query_key, [swap]),
        (permute_value_output, [swap]),
        (permute_ffn_hidden, [torch.tensor([3, 1, 0, 2])]),
    ]
    for action, perms in cases:
        permuted = action(model, perms)
        torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
        assert_same_graph(convert(permuted, inputs, targets, batch_first), action(graph, perms))
        assert not torch.equal(action(graph, perms).act, graph.act)
    heads = permute_heads(model, [torch.tensor([2, 0, 1])])
    # new head 0 is old head 2: query rows 4, 5 moved to rows 0, 1
    assert torch.equal(heads.self_attn.in_proj_weight[:2], model.self_attn.in_proj_weight[4:6])


def test_random_node_permutation_samples_the_head_symmetry_group():
    model, batch_first = symmetry_model("encoder", 6)
    inputs, targets = batch_for(model, 3, 2, 2, 3, batch_first)
    graph = convert(model, inputs, targets, batch_first)
    for seed in range(5):
        node_perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
        permuted = permute_nodes(graph, node_perm)  # raises if node_perm breaks an edge relation
        src, dst = graph.edge_index
        moved = move_values(graph.act[src] * graph.grad[dst], edge_permutation(graph, node_perm))
        src, dst = permuted.edge_index
        torch.testing.assert_close(permuted.act[src] * permuted.grad[dst], moved, atol=1e-14, rtol=0)
        fixed = graph.perm_group < 0
        assert torch.equal(node_perm[fixed], torch.nonzero(fixed).flatten())
    # heads do get exchanged: some query node changes block
    moved_blocks = [
        bool((graph.perm_block[random_node_permutation(graph, torch.Generator().manual_seed(s))]
              != graph.perm_block)[graph.node_kind == NodeKind.QUERY].any())
        for s in range(10)
    ]
    assert any(moved_blocks)


def test_breaking_a_head_relation_is_not_a_symmetry():
    """Sensitivity: moving a head's query/key dims to another head without its values must be rejected,
    and a model permuted that way computes something else."""
    model, batch_first = symmetry_model("layer", 0)
    inputs, targets = batch_for(model, 6, 6, 2, 3, batch_first)
    graph = convert(model, inputs, targets, batch_first)
    identity = identity_transformer_permutation(graph)
    block = identity.attention[0]
    node_perm = transformer_node_permutation(graph, TransformerPermutation(
        [HeadPermutation(torch.tensor([1, 0, 2]), block.query_key, block.value_output)], identity.ffn))
    # undo the move of the value/output nodes: only q/k change heads now
    values = torch.isin(graph.node_kind, torch.tensor([NodeKind.VALUE, NodeKind.ATTENTION]))
    node_perm[values] = torch.nonzero(values).flatten()
    with pytest.raises(GradGraphError, match="not a symmetry"):
        permute_nodes(graph, node_perm)
    # the same on the model: permute q/k rows by head but leave v and out_proj alone
    broken = permute_transformer(model, identity)
    with torch.no_grad():
        rows = torch.cat([torch.arange(2, 4), torch.arange(0, 2), torch.arange(4, 6)])
        weight = broken.self_attn.in_proj_weight
        weight[:6] = weight[:6][rows].clone()
        weight[6:12] = weight[6:12][rows].clone()
    assert not torch.allclose(broken(inputs), model(inputs), atol=1e-6)
    # swapping query dims without key dims breaks both the function and the graph relation
    qk_only = torch.arange(graph.num_nodes)
    queries = torch.nonzero(graph.node_kind == NodeKind.QUERY).flatten()
    qk_only[queries[0]], qk_only[queries[1]] = queries[1], queries[0]
    with pytest.raises(GradGraphError, match="not a symmetry"):
        permute_nodes(graph, qk_only)


def test_bad_permutations_are_rejected():
    model, _ = symmetry_model("layer", 0)
    with pytest.raises(GradGraphError, match="permutation of range\\(3\\)"):
        permute_heads(model, [torch.tensor([0, 0, 1])])
    with pytest.raises(GradGraphError, match=r"\[3, 2\]"):
        permute_query_key(model, [torch.tensor([[0, 1]])])
    with pytest.raises(GradGraphError, match="one per attention block"):
        permute_heads(model, [torch.arange(3), torch.arange(3)])
    with pytest.raises(GradGraphError, match="FFN permutation 0"):
        permute_ffn_hidden(model, [torch.tensor([0, 1, 2, 2])])


# ------------------------------------------------------------------- error paths
class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x * 2, x)[0]


class WithPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.encoder = encoder(width=4, depth=1)

    def forward(self, x):
        return self.encoder(self.embed(x) + 1.0)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = encoder(width=4, depth=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class TwoStacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = encoder_layer(width=4)
        self.second = encoder_layer(width=4)

    def forward(self, x):
        return self.second(self.first(x))


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5, 4))

    def forward(self, x):
        return x + self.table[: x.shape[1]]


@pytest.mark.parametrize(
    ("model", "path", "type_name", "message"),
    [
        (nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True), "", "MultiheadAttention", "kdim=3"),
        (nn.Sequential(nn.Linear(3, 4), nn.MultiheadAttention(4, 2, vdim=5)), "1", "MultiheadAttention", "vdim=5"),
        (nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True), "", "MultiheadAttention", "add_bias_kv"),
        (nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True), "self_attn", "MultiheadAttention",
         "dropout"),
        (nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 6, batch_first=True), 2, enable_nested_tensor=False),
         "layers.0.self_attn", "MultiheadAttention", "model.eval()"),
        (CrossAttention(), "attn", "MultiheadAttention", "cross-attention"),
    ],
)
def test_unsupported_models_name_path_and_type(model, path, type_name, message):
    model = model.double().train()
    first = next(iter(model.children()), None)
    d_in = first.in_features if isinstance(first, nn.Linear) else 4
    inputs = torch.randn(2, 3, d_in, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        gradgraph.to_graph(model, inputs, torch.zeros(2, dtype=torch.float64), lambda out, _: out.sum((1, 2)))
    assert info.value.path == path and info.value.module_type == type_name
    assert f"'{path}'" in str(info.value) if path else True


def test_a_decoder_layer_without_its_memory_argument_is_a_gradgraph_error():
    model = nn.TransformerDecoderLayer(4, 2, 6, dropout=0.0, batch_first=True).double()
    with pytest.raises(GradGraphError, match="forward_kwargs"):
        gradgraph.to_graph(model, torch.randn(2, 3, 4, dtype=torch.float64), None, lambda out, _: out.sum((1, 2)))


@pytest.mark.parametrize(
    "model",
    [
        nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation=nn.Softplus(), batch_first=True),
        WithPositions(),
        Pooled(),
        TwoStacks(),
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), encoder(width=4, depth=1)),
        nn.Sequential(Positional(), encoder(width=4, depth=1)),
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), encoder(width=4, depth=1)),
    ],
)
def test_models_the_stock_converter_refused_convert_through_the_trace(model):
    model = model.double().eval()
    first = model.embed if isinstance(model, WithPositions) else next(iter(model.children()), None)
    d_in = first.in_features if isinstance(first, nn.Linear) else 4
    inputs = torch.randn(2, 3, d_in, dtype=torch.float64)
    graph = assert_exact_per_sample_grads(model, inputs, torch.zeros(2, dtype=torch.float64),
                                          lambda out, _: out.pow(2).sum(tuple(range(1, out.dim()))))
    assert bool((graph.node_kind == NodeKind.QUERY).any())


def test_dropout_in_eval_mode_is_accepted_and_bad_inputs_raise():
    model = nn.TransformerEncoderLayer(4, 2, 6, batch_first=True).double().eval()  # default dropout=0.1
    inputs = torch.randn(2, 3, 4, dtype=torch.float64)
    loss = lambda out, _: out.pow(2).sum((1, 2))  # noqa: E731
    assert gradgraph.to_graph(model, inputs, None, loss).num_components == 6
    # the model's own shape errors come back naming the input shape and the failing module
    with pytest.raises(GradGraphError, match=r"TransformerEncoderLayer failed on inputs of shape \[2, 4\]"):
        gradgraph.to_graph(model, torch.randn(2, 4, dtype=torch.float64), None, loss)
    with pytest.raises(GradGraphError, match=r"inputs of shape \[2, 3, 5\].*RuntimeError"):
        gradgraph.to_graph(model, torch.randn(2, 3, 5, dtype=torch.float64), None, loss)
    with pytest.raises(GradGraphError, match="dtype"):
        gradgraph.to_graph(model, inputs.float(), None, loss)
    with pytest.raises(GradGraphError, match="one scalar output per datapoint"):
        gradgraph.to_graph(model, inputs)


# ------------------------------------------------ GradMetaNet on transformer graphs
def transformer_graphs() -> list[gradgraph.GradGraph]:
    """Two architectures (3 heads + FFN; wrapped 2-layer pre-norm stack), same B = 2 x 3."""
    graphs = []
    for kind, seed in (("layer", 0), ("encoder", 3)):
        model, batch_first = symmetry_model(kind, seed)
        d_in = 3 if kind == "encoder" else _width(model)
        d_out = 2 if kind == "encoder" else _width(model)
        inputs, targets = batch_for(model, d_in, d_out, 2, 3, batch_first, seed)
        graphs.append(convert(model, inputs, targets, batch_first, {}))
    return graphs


def action_on_batch(**flags):
    """``(batch, generator) -> [N]``: one random head/dim/FFN action per graph of a batch."""

    def node_permutation(batch, generator):
        parts = []
        for graph, offset in zip(batch.to_data_list(), batch.ptr[:-1].tolist()):
            permutation = random_transformer_permutation(graph, generator, **flags)
            parts.append(transformer_node_permutation(graph, permutation) + offset)
        return torch.cat(parts)

    return node_permutation


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_gradmetanet_is_equivariant_on_transformer_graphs(action):
    from gradgraph.nn import GradMetaNet
    from gradgraph.testing import assert_equivariant

    torch.manual_seed(0)
    model = GradMetaNet(8, num_component_layers=1, num_node_layers=1, graph_out_channels=2)
    errors = assert_equivariant(model, transformer_graphs(), num_trials=2, node_permutation=action_on_batch(
        **ACTIONS[action]), check_components=action == "all", atol=1e-9, rtol=1e-9)
    assert "node permutation" in errors


def test_gradmetanet_is_equivariant_under_random_node_permutation_of_transformer_graphs():
    """The default action of assert_equivariant samples the whole head/dim/FFN group (perm_block/perm_tie)."""
    from gradgraph.nn import GradMetaNet
    from gradgraph.testing import assert_equivariant

    torch.manual_seed(1)
    assert_equivariant(GradMetaNet(8, num_component_layers=1, num_node_layers=1), transformer_graphs(), num_trials=2,
                       atol=1e-9, rtol=1e-9)


def test_equivariance_check_catches_a_model_that_reads_head_indices():
    """Sensitivity: a head id used as an absolute feature breaks equivariance under head permutations."""
    from gradgraph.nn import GradMetaNet, GradMetaNetOutput
    from gradgraph.testing import assert_equivariant

    class HeadIndexLeak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = GradMetaNet(8, num_component_layers=1, num_node_layers=1)

        def forward(self, batch):
            out = self.inner(batch)
            head = batch.perm_block.clamp(min=0).to(out.node.dtype)
            return GradMetaNetOutput(out.edge, out.node + head[:, None], out.graph)

    torch.manual_seed(2)
    with pytest.raises(AssertionError, match="node"):
        assert_equivariant(HeadIndexLeak(), transformer_graphs(), num_trials=3,
                           node_permutation=action_on_batch(**ACTIONS["heads"]), check_components=False)


def test_is_causal_hint_and_batching_with_mlp_graphs():
    from torch_geometric.data import Batch

    torch.manual_seed(7)
    model = encoder(depth=1, batch_first=False).double().eval()
    inputs, targets = batch_for(model, 8, 8, 2, 3, False)
    kwargs = {"mask": causal_mask(3), "is_causal": True}
    graph = convert(model, inputs, targets, False, kwargs)
    reference = reference_per_sample_grads(model, inputs, targets, False, kwargs)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-9, rtol=0)
    # an MLP graph with the same number of components batches with a transformer graph
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    mlp_graph = gradgraph.to_graph(mlp, torch.randn(6, 2, dtype=torch.float64))
    batch = Batch.from_data_list([mlp_graph, graph])
    permuted = permute_nodes(batch, random_node_permutation(batch, torch.Generator().manual_seed(0)))
    first, second = permuted.to_data_list()
    assert torch.equal(first.perm_block, mlp_graph.perm_block) and second.num_nodes == graph.num_nodes


def test_layernorms_without_affine_or_bias_and_training_mode_without_dropout():
    torch.manual_seed(8)
    final = nn.LayerNorm(8, elementwise_affine=False)
    model = nn.TransformerEncoder(encoder_layer(norm_first=True), 2, norm=final, enable_nested_tensor=False)
    model.layers[0].norm1 = nn.LayerNorm(8, bias=False)
    model = model.double().train()  # dropout=0, so training mode is the same function
    inputs, targets = batch_for(model, 8, 8, 2, 3, True)
    graph = convert(model, inputs, targets, True)
    reference = reference_per_sample_grads(model, inputs, targets, True, {})
    assert set(graph.per_sample_grads()) == set(reference)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-9, rtol=0)
    # the final norm has no gamma: its NORM_SCALE edges are structural
    scale = graph.edge_kind == EdgeKind.NORM_SCALE
    assert int((graph.edge_param[scale] < 0).sum()) == 8
