"""The traced converter on models people write: exact factors, the inferred group, clear errors.

Every model here is converted by reading its forward op by op. For each: per-sample
gradients equal torch.func's (float64, 1e-10); a random element of the inferred symmetry
group, applied to the model through its parameter slots, leaves the function unchanged,
and converting the transformed model gives the transformed graph tensor for tensor;
GradMetaNet's outputs move with it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_same_graph
from torch import nn
from torch_geometric.data import Batch
from traced_models import (
    GPT,
    BertStyleLayer,
    GatedMLP,
    PooledEncoder,
    ViT,
    assert_exact_per_sample_grads,
    assert_per_sample_grads_match_loop,
    token_loss,
)

import gradgraph
from gradgraph import EdgeKind, GradGraphError, NodeKind, UnsupportedModuleError
from gradgraph.convert import UnsupportedOperationError, convert_mlp, convert_traced, register_elementwise
from gradgraph.nn import GradMetaNet
from gradgraph.symmetry import permute_model, permute_nodes, random_node_permutation
from gradgraph.testing import assert_equivariant

warnings.filterwarnings("ignore", message=".*batching rule.*")
DTYPE = torch.float64


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def squared_error(output, targets):
    return (output - targets).pow(2).reshape(output.shape[0], -1).sum(1)


def check_group(model, inputs, targets, loss_fn, seed=0, forward_kwargs=None):
    """A sampled group element keeps the function and maps graph to graph; returns nodes moved."""
    kwargs = {"forward_kwargs": forward_kwargs} if forward_kwargs else {}
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn, **kwargs)
    perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
    permuted_model = permute_model(model, graph, perm)
    with torch.no_grad():
        before = model(inputs, **(forward_kwargs or {}))
        after = permuted_model(inputs, **(forward_kwargs or {}))
    before = getattr(before, "logits", before)
    after = getattr(after, "logits", after)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)
    converted = gradgraph.to_graph(permuted_model, inputs, targets, loss_fn, **kwargs)
    assert_same_graph(converted, permute_nodes(graph, perm), atol=1e-10)
    return int((perm != torch.arange(graph.num_nodes)).sum()), graph


# ------------------------------------------------------------------ hand-written models
def gpt_case():
    torch.manual_seed(0)
    return GPT().to(DTYPE).eval(), torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6)), token_loss


def bert_case():
    torch.manual_seed(1)
    mask = torch.zeros(1, 1, 1, 5, dtype=DTYPE)
    mask[..., 3:] = -1e4  # the last two positions are padding
    return BertStyleLayer().to(DTYPE).eval(), torch.randn(4, 5, 8, dtype=DTYPE), torch.randint(0, 3, (4,)), \
        cross_entropy, {"mask": mask}


def vit_case():
    torch.manual_seed(2)
    return ViT().to(DTYPE).eval(), torch.randn(4, 4, 4, dtype=DTYPE), torch.randint(0, 3, (4,)), cross_entropy


def pooled_case():
    torch.manual_seed(3)
    return PooledEncoder().to(DTYPE).eval(), torch.randn(3, 4, 5, dtype=DTYPE), torch.randn(3, dtype=DTYPE), \
        squared_error


def gated_case():
    torch.manual_seed(4)
    return GatedMLP().to(DTYPE).eval(), torch.randn(5, 6, dtype=DTYPE), torch.randint(0, 2, (5,)), cross_entropy


CASES = {"nanogpt": gpt_case, "bert_style": bert_case, "vit_style": vit_case, "stock_encoder_pooled": pooled_case,
         "swiglu_rmsnorm": gated_case}


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_grads_equal_torch_func(name):
    model, inputs, targets, loss_fn, *rest = CASES[name]()
    forward_kwargs = rest[0] if rest else None
    graph = assert_exact_per_sample_grads(model, inputs, targets, loss_fn,
                                          **({"forward_kwargs": forward_kwargs} if forward_kwargs else {}))
    assert graph.component_sample.shape == (graph.num_components,)
    assert int(graph.component_sample.max()) == inputs.shape[0] - 1
    # every parameter of the model appears in the graph
    assert set(graph.param_names) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inferred_group_keeps_the_function_and_maps_graph_to_graph(name):
    model, inputs, targets, loss_fn, *rest = CASES[name]()
    moved, graph = check_group(model, inputs, targets, loss_fn, forward_kwargs=rest[0] if rest else None)
    assert moved > graph.num_nodes // 4  # not a trivial group


def test_nanogpt_group_structure_and_weight_tying():
    model, inputs, targets, loss_fn = gpt_case()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    kinds = graph.node_kind
    # heads: 2 blocks per attention op, q/k tied (tie 0) and v/o tied (tie 1)
    query = kinds == NodeKind.QUERY
    assert set(graph.perm_block[query].tolist()) == {0, 1} and set(graph.perm_tie[query].tolist()) == {0}
    assert set(graph.perm_tie[kinds == NodeKind.VALUE].tolist()) == {1}
    # the residual stream is one permutation group with its norms; the vocabulary is fixed
    residual_groups = set(graph.perm_group[kinds == NodeKind.RESIDUAL].tolist())
    assert len(residual_groups) == 1 and residual_groups != {-1}
    assert set(graph.perm_group[kinds == NodeKind.NORM].tolist()) == residual_groups
    assert bool((graph.perm_group[(kinds == NodeKind.TOKEN) | (kinds == NodeKind.OUTPUT)] == -1).all())
    # wte is used twice (embedding and tied head): both uses appear as edges
    wte = graph.param_names.index("wte.weight")
    uses = graph.edge_kind[graph.edge_param == wte]
    assert int((uses == EdgeKind.EMBEDDING).sum()) == int((uses == EdgeKind.LINEAR).sum()) == 11 * 8
    # tokens are components: 6 positions per datapoint
    assert graph.num_components == 3 * 6


def test_gradmetanet_outputs_move_with_the_inferred_group():
    torch.manual_seed(5)
    metanet = GradMetaNet(8, num_component_layers=1, num_node_layers=1, edge_out_channels=2, node_out_channels=1,
                          graph_out_channels=1).to(DTYPE)
    graphs = []
    for case in (gpt_case, vit_case, gated_case):
        model, inputs, targets, loss_fn = case()[:4]
        graphs.append(gradgraph.to_graph(model, inputs[:2], targets[:2], loss_fn))
    for graph in graphs:  # one architecture at a time: B differs between them
        assert_equivariant(metanet, [graph])


# ------------------------------------------------------------------ transformers (tiny configs, no download)
transformers = pytest.importorskip("transformers")


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformers_gpt2_converts_exactly_with_its_group(attention):
    config = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attention
    torch.manual_seed(6)
    model = LanguageModel(transformers.GPT2LMHeadModel(config)).to(DTYPE).eval()
    ids, targets = torch.randint(0, 13, (3, 5)), torch.randint(0, 13, (3, 5))
    graph = assert_exact_per_sample_grads(model, ids, targets, token_loss)
    # Conv1D is a transposed linear: c_attn's 3d outputs become query, key and value sets
    assert int((graph.node_kind == NodeKind.QUERY).sum()) == 2 * 8
    moved, _ = check_group(model, ids, targets, token_loss)
    assert moved > graph.num_nodes // 2


def test_transformers_bert_layer_converts_exactly_with_its_group():
    from transformers.models.bert.modeling_bert import BertLayer

    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=12,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(7)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = BertLayer(config)

        def forward(self, x):
            out = self.layer(x)
            return out[0] if isinstance(out, tuple) else out

    model = Layer().to(DTYPE).eval()
    inputs, targets = torch.randn(3, 4, 8, dtype=DTYPE), torch.randn(3, 4, 8, dtype=DTYPE)
    graph = assert_exact_per_sample_grads(model, inputs, targets, squared_error)
    moved, _ = check_group(model, inputs, targets, squared_error)
    assert moved >= 32  # heads, q/k and v/o dims, intermediate neurons
    assert set(graph.perm_block[graph.node_kind == NodeKind.KEY].tolist()) == {0, 1}


# ------------------------------------------------------------------ random residual MLPs
class ResidualMLP(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        width, blocks, norm, activation, gated = spec
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList()
        for hidden in blocks:
            block = nn.ModuleDict({"up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)})
            if gated:
                block["gate"] = nn.Linear(width, hidden, bias=False)
            if norm == "layer":
                block["norm"] = nn.LayerNorm(width)
            elif norm == "rms":
                block["norm"] = nn.RMSNorm(width)
            self.blocks.append(block)
        self.activation = activation
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            z = block["norm"](h) if "norm" in block else h
            u = self.activation(block["up"](z))
            if "gate" in block:
                u = u * block["gate"](z)
            h = h + block["down"](u)
        return self.out(h)


residual_specs = st.tuples(
    st.integers(2, 5),
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.sampled_from(["none", "layer", "rms"]),
    st.sampled_from([F.relu, torch.tanh, F.gelu, F.silu]),
    st.booleans(),
)


@settings(max_examples=12, deadline=None)
@given(spec=residual_specs, seed=st.integers(0, 2**16))
def test_random_residual_mlps_with_norms_convert_exactly_and_keep_their_group(spec, seed):
    torch.manual_seed(seed)
    model = ResidualMLP(spec).to(DTYPE)
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,))
    assert_exact_per_sample_grads(model, inputs, targets, cross_entropy)
    check_group(model, inputs, targets, cross_entropy, seed=seed)


def test_plain_chains_get_the_mlp_layout_from_the_trace():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).to(DTYPE)
    inputs = torch.randn(6, 4, dtype=DTYPE)
    loss_fn = lambda out, y: out.pow(2).sum(1)  # noqa: E731
    traced = convert_traced(model, inputs, targets=None, loss_fn=loss_fn)
    chain = convert_mlp(model, inputs, targets=None, loss_fn=loss_fn)
    assert_same_graph(traced, chain, atol=0)


# ------------------------------------------------------------------ errors
class SpectralBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.fft.rfft(x, dim=-1).real.repeat(1, 2)[:, :4])  # the line the error must name


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.block = SpectralBlock()

    def forward(self, x):
        return self.block(self.inp(x)).sum(1)


def test_an_unsupported_stock_module_in_a_sequential_names_its_own_forward():
    # no user code runs between nn.Sequential and the convolution: the line that called
    # to_graph is not where the op is, the module's forward is
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 1)).to(DTYPE)
    with pytest.raises(UnsupportedOperationError) as info:
        gradgraph.to_graph(model, torch.randn(3, 4, dtype=DTYPE))
    assert info.value.location.startswith("conv.py:") and info.value.location.endswith(" in Conv1d.forward")
    assert str(info.value).startswith(info.value.location + " (module '2' of type Conv1d)")
    assert info.value.path == "2"


def test_an_unsupported_op_is_named_with_its_source_line_and_module():
    with pytest.raises(UnsupportedOperationError) as info:
        gradgraph.to_graph(Net().to(DTYPE), torch.randn(3, 4, dtype=DTYPE))
    message = str(info.value)
    line = SpectralBlock.forward.__code__.co_firstlineno + 1
    assert f"test_convert_traced.py:{line} in SpectralBlock.forward" in message
    assert "torch.fft.rfft" in message and "'block'" in message
    assert "register" in message  # what to do
    for internal in ("getattr_1", "call_function", "placeholder", "_VariableFunctionsClass"):
        assert internal not in message


def test_convolutions_and_cross_attention_are_refused_by_path():
    conv = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match="convolution") as info:
        gradgraph.to_graph(conv.to(DTYPE), torch.randn(3, 4, dtype=DTYPE))
    assert info.value.path == "2" and info.value.module_type == "Conv1d"

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.memory = nn.Linear(4, 4)

        def forward(self, x):
            return self.attn(x, self.memory(x), self.memory(x))[0]

    with pytest.raises(UnsupportedModuleError, match="cross-attention") as info:
        gradgraph.to_graph(Cross().to(DTYPE).eval(), torch.randn(2, 3, 4, dtype=DTYPE), None,
                           lambda out, _: out.sum((1, 2)))
    assert info.value.path == "attn"


def test_meta_device_models_and_self_attention_key_value_kwargs_are_gradgraph_errors():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(GradGraphError, match="meta"):
        gradgraph.to_graph(model, torch.randn(2, 3))
    attention = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE)
    inputs = torch.randn(2, 3, 4, dtype=DTYPE)
    with pytest.raises(GradGraphError, match="self-attention"):
        gradgraph.to_graph(attention, inputs, None, lambda out, _: out.sum((1, 2)),
                           forward_kwargs={"key": inputs, "value": inputs})


def test_batching_graphs_with_different_component_counts_is_a_gradgraph_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to(DTYPE)
    small = gradgraph.to_graph(model, torch.randn(4, 3, dtype=DTYPE))
    large = gradgraph.to_graph(model, torch.randn(5, 3, dtype=DTYPE))
    assert Batch.from_data_list([small, small]).act.shape == (16, 4)
    with pytest.raises(GradGraphError, match="different numbers of components.*4.*5"):
        Batch.from_data_list([small, large])


def test_active_dropout_and_training_batch_norm_are_refused():
    with pytest.raises(UnsupportedModuleError, match="model.eval"):
        gradgraph.to_graph(_with_dropout().train(), torch.randn(2, 4))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    with pytest.raises(UnsupportedModuleError, match="mixes the datapoints"):
        gradgraph.to_graph(bn, torch.randn(3, 4))


def _with_dropout():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(F.dropout(self.a(x), 0.5, self.training) + x[:, :1])

    return Net()


# ------------------------------------------------------------------ a user's own op
class ExpLinear(nn.Module):
    """x + expm1(x) through an autograd Function and an op the tracer has no rule for."""

    class _Function(torch.autograd.Function):
        generate_vmap_rule = True  # so that torch.func can compute the reference

        @staticmethod
        def forward(x):
            return x + torch.special.expm1(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (1 + torch.exp(x))

    def forward(self, x):
        return self._Function.apply(x)


def test_register_elementwise_makes_a_custom_module_one_op():
    from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 5), ExpLinear(), nn.Linear(5, 2)).to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    loss_fn = lambda out, _: out.pow(2).sum(1)  # noqa: E731
    with pytest.raises(UnsupportedOperationError, match="torch.special.expm1"):
        gradgraph.to_graph(model, inputs, None, loss_fn)
    register_elementwise(ExpLinear)
    try:
        graph = assert_exact_per_sample_grads(model, inputs, None, loss_fn)
    finally:
        ELEMENTWISE_MODULES.pop(ExpLinear)
    assert int((graph.perm_group >= 0).sum()) == 5  # the 5 hidden neurons may still be permuted


# ------------------------------------------------------------------ the plan cache
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cached_plan_replays_to_the_graph_a_fresh_trace_gives(name):
    from gradgraph.convert.traced import PLAN_CACHE

    model, inputs, targets, loss_fn, *rest = CASES[name]()
    kwargs = {"forward_kwargs": rest[0]} if rest else {}
    PLAN_CACHE.clear()
    gradgraph.to_graph(model, inputs, targets, loss_fn, **kwargs)  # traces, stores the plan
    other_inputs = torch.randint(0, 11, inputs.shape) if not inputs.is_floating_point() else torch.randn_like(inputs)
    hits = PLAN_CACHE.hits
    replayed = gradgraph.to_graph(model, other_inputs, targets, loss_fn, **kwargs)
    assert PLAN_CACHE.hits == hits + 1
    PLAN_CACHE.clear()
    traced = gradgraph.to_graph(model, other_inputs, targets, loss_fn, **kwargs)
    assert_same_graph(replayed, traced, atol=0)


class Branchy(nn.Module):
    """Takes another path when a flag is set (same parameters, same input shapes): a replay of
    the first plan must notice and trace again."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.deep = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.deep:
            h = h + self.b(h)
        return self.out(h)


def test_a_forward_that_takes_another_path_is_traced_again():
    from gradgraph.convert.traced import PLAN_CACHE

    PLAN_CACHE.clear()
    model = Branchy().to(DTYPE)

    def check(inputs):  # a per-datapoint autograd loop, independent of the converter
        return assert_per_sample_grads_match_loop(model, inputs)

    assert "b.weight" not in check(torch.randn(4, 3, dtype=DTYPE)).param_names
    model.deep = True
    graph = check(torch.randn(4, 3, dtype=DTYPE))  # a replay of the first plan would miss b
    assert "b.weight" in graph.param_names


@pytest.mark.parametrize("norm_first", [False, True])
def test_the_trace_reproduces_the_stock_encoder_layout(norm_first):
    from gradgraph.convert import convert_attention

    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, norm_first=norm_first).to(DTYPE)
    inputs = torch.randn(2, 3, 4, dtype=DTYPE)
    loss_fn = lambda out, _: out.pow(2).sum((1, 2))  # noqa: E731
    stock = convert_attention(layer.eval(), inputs, targets=None, loss_fn=loss_fn, forward_kwargs={})
    traced = convert_traced(layer, inputs, targets=None, loss_fn=loss_fn, forward_kwargs={})

    def edges(graph):
        names = [graph.param_names[p] if p >= 0 else None for p in graph.edge_param.tolist()]
        return sorted(zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), graph.edge_kind.tolist(), names,
                          graph.edge_param_pos.tolist()))

    assert edges(traced) == edges(stock)
    for key in ("layer", "node_kind", "perm_group", "perm_block", "perm_tie", "position", "x", "act", "grad"):
        torch.testing.assert_close(traced[key], stock[key], atol=1e-12, rtol=0, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_traced_conversion_on_cuda_equals_cpu():
    model, inputs, targets, loss_fn = gpt_case()
    on_cpu = gradgraph.to_graph(model, inputs, targets, loss_fn)
    on_cuda = gradgraph.to_graph(model.cuda(), inputs.cuda(), targets.cuda(), loss_fn)
    for key in on_cpu.keys():
        value = on_cuda[key]
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cuda", key
            torch.testing.assert_close(value.cpu(), on_cpu[key], atol=1e-10, rtol=0, msg=key)


def test_transformers_bert_model_with_a_padding_row_converts_exactly():
    # word, position and token-type tables (the padding row gets no gradient), a pooler on [CLS]
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     max_position_embeddings=16)
    config._attn_implementation = "eager"
    torch.manual_seed(11)

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel(config)

        def forward(self, ids):
            return self.bert(input_ids=ids).pooler_output

    model = Pooled().to(DTYPE).eval()
    ids = torch.randint(1, 20, (3, 5))
    ids[0, 3:] = config.pad_token_id
    loss_fn = lambda out, _: out.pow(2).sum(1)  # noqa: E731
    graph = assert_exact_per_sample_grads(model, ids, None, loss_fn)
    assert int((graph.node_kind == NodeKind.TOKEN).sum()) == 20 + 16 + 2
    check_group(model, ids, None, loss_fn)


# ------------------------------------------------------------------ one closure call
@pytest.mark.parametrize("case", ["gpt", "bert", "chain"])
def test_convert_closure_equals_to_graph_and_calls_the_closure_once(case):
    if case == "gpt":
        model, inputs, targets, loss_fn = gpt_case()
        kwargs = {}
    elif case == "chain":  # the MLP chain fast path's hooks
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
        inputs, targets, loss_fn, kwargs = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)), cross_entropy, {}
    else:
        model, inputs, targets, loss_fn, kwargs = bert_case()
    batches = iter([(inputs, targets)])  # the batch is drawn inside the closure, as in a training loop
    calls = []

    def closure():
        calls.append(1)
        x, y = next(batches)
        return loss_fn(model(x, **kwargs), y)

    for _ in range(2):  # a fresh trace, then a replay of the cached plan
        graph, losses = gradgraph.convert_closure(model, closure)
        assert len(calls) == 1 and not losses.requires_grad
        reference = gradgraph.to_graph(model, inputs, targets, loss_fn, forward_kwargs=kwargs)
        assert_same_graph(graph, reference, atol=1e-12)
        torch.testing.assert_close(losses, loss_fn(model(inputs, **kwargs), targets), atol=1e-12, rtol=0)
        assert "forward" not in vars(model)
        batches, calls = iter([(inputs, targets)]), []


class TwoLayer(nn.Module):  # not a plain chain: the traced converter's closure form
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), TwoLayer])
def test_convert_closure_errors_name_what_the_closure_did_wrong(make):
    model = make().to(DTYPE)
    name = type(model).__name__
    inputs = torch.randn(5, 3, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=f"never called {name}"):
        gradgraph.convert_closure(model, lambda: torch.zeros(5, requires_grad=True))
    with pytest.raises(GradGraphError, match=f"called {name} twice"):
        gradgraph.convert_closure(model, lambda: model(inputs).sum(1) + model(inputs).sum(1))
    with pytest.raises(GradGraphError, match=r"shape \[5\].*returned \[\]"):
        gradgraph.convert_closure(model, lambda: model(inputs).sum())
    with pytest.raises(GradGraphError, match=r"input tensor as its first argument \(positionally or as "
                       r"(input|x)=\.\.\.\); got positional \[\] and keywords \['inputs'\]"):
        gradgraph.convert_closure(model, lambda: model(inputs=inputs).sum(1))
    with pytest.raises(GradGraphError, match=r"got positional \['list'\]"):
        gradgraph.convert_closure(model, lambda: model([inputs]).sum(1))
    assert "forward" not in vars(model) and not model._forward_hooks and not model._forward_pre_hooks  # restored
    graph, _ = gradgraph.convert_closure(model, lambda: model(inputs).pow(2).sum(1))
    assert graph.num_components == 5


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), TwoLayer])
def test_convert_closure_takes_the_input_by_the_name_of_forwards_first_parameter(make):
    # model(input_ids=x) is how transformers models are called; it is the same call as model(x)
    model = make().to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    name = "input" if isinstance(model, nn.Sequential) else "x"
    for _ in range(2):  # a fresh trace, then a replay of the cached plan
        graph, losses = gradgraph.convert_closure(model, lambda: model(**{name: inputs}).pow(2).sum(1))
        assert_same_graph(graph, gradgraph.to_graph(model, inputs, loss_fn=lambda out, _: out.pow(2).sum(1)),
                          atol=1e-12)
        torch.testing.assert_close(losses, model(inputs).pow(2).sum(1), atol=1e-12, rtol=0)


# ------------------------------------------------------------------ found by trying unseen models
class SharedLayer(nn.Module):  # one Linear applied twice: its three neuron sets move as one
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.f, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.f(h))
        return self.out(torch.tanh(self.f(h)))


class TiedAutoencoder(nn.Module):  # the decoder is the encoder's weight transposed
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid = nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(torch.sigmoid(self.mid(torch.tanh(self.enc(x)))), self.enc.weight.T)


class ScaledHead(nn.Module):  # a 0-dim parameter (a learned temperature)
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) * self.temperature


@pytest.mark.parametrize("make", [SharedLayer, TiedAutoencoder, ScaledHead])
def test_shared_transposed_and_scalar_parameters_convert_exactly_with_a_true_group(make):
    torch.manual_seed(12)
    model = make().to(DTYPE)
    inputs = torch.randn(5, 4 if make is not TiedAutoencoder else 5, dtype=DTYPE)
    loss_fn = lambda out, _: out.pow(2).sum(-1)  # noqa: E731
    graph = assert_exact_per_sample_grads(model, inputs, None, loss_fn)
    values = graph.to_parameters(graph.weight, graph.bias)
    for name, param in model.named_parameters():
        torch.testing.assert_close(values[name], param.detach(), atol=0, rtol=0)
    moved = max(check_group(model, inputs, None, loss_fn, seed=seed)[0] for seed in range(3))
    if make is SharedLayer:
        assert moved > 0 and len(torch.unique(graph.perm_group[graph.perm_group >= 0])) == 1


class ParameterArithmetic(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.inp, self.out, self.op = nn.Linear(3, 4), nn.Linear(4, 2), op
        self.v = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.out(self.op(torch.sigmoid(self.inp(x)), self.v))


@pytest.mark.parametrize("op", [lambda h, v: h - v, torch.sub, lambda h, v: h / v, lambda h, v: h ** v, torch.pow,
                                lambda h, v: h.clamp(min=v), lambda h, v: h.add(v, alpha=-2)])
def test_a_parameter_subtracted_divided_or_an_exponent_is_refused_not_misread(op):
    model = ParameterArithmetic(op).to(DTYPE)
    with pytest.raises(UnsupportedOperationError, match="the parameter 'v' is subtracted, divided by, an exponent"):
        gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, lambda out, _: out.sum(-1))


class InPlaceResidual(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.f, self.out, self.how = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2), how

    def forward(self, x):
        h = self.a(x)
        if self.how == "+=":  # (run out of place; reading the old value after it is refused)
            old = h
            h += self.f(torch.relu(h))
            h = old + h
        else:
            h[:, 0] = 0.0
        return self.out(h)


class LeftParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mix = nn.Linear(3, 4), nn.Parameter(torch.randn(5, 5))

    def forward(self, x):  # [b, 5, 3] -> mixes tokens with a parameter on the left
        return self.mix @ self.inp(x)


@pytest.mark.parametrize("model, inputs, match", [
    (InPlaceResidual("+="), torch.randn(3, 3), r"Tensor.add: reads a value that the in-place Tensor.add_"),
    (InPlaceResidual("setitem"), torch.randn(3, 3), r"Tensor.__setitem__: in-place ops"),
    (LeftParameter(), torch.randn(2, 5, 3), r"a parameter on the left of a matmul"),
])
def test_errors_inside_python_operators_are_ours_not_typeerror_fallbacks(model, inputs, match):
    # torch's operators turn a TypeError into NotImplemented; our refusal must get through as
    # itself (before: += ran twice and gave wrong numbers, M @ h said "unsupported operand")
    model = model.to(DTYPE)
    with pytest.raises(UnsupportedOperationError, match=match):
        gradgraph.to_graph(model, inputs.to(DTYPE), None, lambda out, _: out.flatten(1).sum(-1))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.policy, self.value = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"policy": self.policy(h), "value": self.value(h)}


def test_a_head_the_loss_does_not_read_has_zero_signals_not_stale_memory(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):  # fresh buffers hold NaN, as reused memory may: every unwritten row shows
        def call(*args, **kwargs):
            tensor = make(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
        return call

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    torch.manual_seed(13)
    model = TwoHeads().to(DTYPE)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    loss_fn = lambda out, _: out["policy"].pow(2).sum(-1)  # noqa: E731
    for _ in range(3):  # a trace, then replays that reuse the factor buffers' layout
        graph = assert_exact_per_sample_grads(model, inputs, None, loss_fn)
        value_rows = graph.node_kind == NodeKind.OUTPUT
        value_rows &= graph.node_param == graph.param_names.index("value.bias")
        assert int(value_rows.sum()) == 1
        assert bool((graph.grad[value_rows] == 0).all())
        assert bool(torch.isfinite(graph.act).all())
