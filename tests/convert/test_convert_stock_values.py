"""Per-function checks of ``trace/stock_graph.py`` and ``trace/stock_attention.py`` (issue 31, runs stock 1-2):
their refusals matched in full, and their functional forms against the stock module's own output (PyG's
``GATConv`` / ``GATv2Conv``, ``nn.MultiheadAttention``) in float64, where the trace's own check or the
conversion tests would not see a difference."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gradgraph.convert.trace import stock_attention, stock_graph
from gradgraph.errors import GradGraphError, UnsupportedModuleError

pyg = pytest.importorskip("torch_geometric.nn")

DTYPE = torch.float64


def _graph(nodes: int = 5, seed: int = 0):
    """``x [nodes, 3]`` and an ``edge_index`` with a self-loop, a repeated edge and a node with no in-edge."""
    torch.manual_seed(seed)
    edge_index = torch.tensor([[0, 1, 2, 3, 3, 1, 2, 4], [1, 2, 0, 0, 0, 1, 3, 2]])
    return torch.randn(nodes, 3, dtype=DTYPE), edge_index


def _gat(module: nn.Module, x=None, edge_index=None, **kwargs):
    module = module.to(DTYPE).eval()
    if x is None:
        x, edge_index = _graph()
    return module, stock_graph.gat_attention(module, "conv", module.forward, x, edge_index, **kwargs)


def _refused(message: str):
    return pytest.raises(UnsupportedModuleError, match="^" + re.escape(message) + "$")


def _grads(output: torch.Tensor, module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """The gradients of a fixed random projection of ``output`` by every parameter of ``module``."""
    torch.manual_seed(seed)
    weights = torch.randn(output.shape, dtype=output.dtype)
    named = dict(module.named_parameters())
    return dict(zip(named, torch.autograd.grad((output * weights).sum(), list(named.values()))))


GATS = {
    "one-head": lambda: pyg.GATConv(3, 4),
    "one-head-mean": lambda: pyg.GATConv(3, 4, concat=False),
    "three-heads-concat": lambda: pyg.GATConv(3, 2, heads=3),
    "three-heads-mean": lambda: pyg.GATConv(3, 2, heads=3, concat=False),
    "two-heads-mean-no-bias": lambda: pyg.GATConv(3, 2, heads=2, concat=False, bias=False),
    "residual-no-self-loops": lambda: pyg.GATConv(3, 2, heads=2, residual=True, add_self_loops=False),
    "source-and-target-maps": lambda: pyg.GATConv((3, 3), 2, heads=2, negative_slope=0.3),
    "v2-one-head": lambda: pyg.GATv2Conv(3, 4),
    "v2-one-head-mean": lambda: pyg.GATv2Conv(3, 4, concat=False),
    "v2-three-heads-mean": lambda: pyg.GATv2Conv(3, 2, heads=3, concat=False, negative_slope=0.35),
    "v2-shared-residual": lambda: pyg.GATv2Conv(3, 2, heads=2, share_weights=True, residual=True),
    "v2-no-self-loops-no-bias": lambda: pyg.GATv2Conv(3, 2, heads=2, add_self_loops=False, bias=False),
}


@pytest.mark.parametrize("kind", list(GATS))
def test_the_op_by_op_form_of_a_gat_is_its_own_output_with_its_own_gradients(kind):
    """``gat_attention`` against the module's forward: the same output and the same gradients of every
    parameter (the trace differentiates the op-by-op form; PyG's forward is the ground truth). Kills
    ``gat_attention`` 216 (one head averaged: ``out[:, 1]`` of one head)."""
    torch.manual_seed(3)
    module, out = _gat(GATS[kind]())
    x, edge_index = _graph()
    expected = module(x, edge_index)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    ours, theirs = _grads(out, module), _grads(expected, module)
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-12, rtol=0, msg=name)


def test_a_gat_without_self_loops_leaves_a_node_with_no_in_edge_at_its_bias():
    """Node 4 has no in-edge: its softmax has no term (a zero total, the ``1e-16`` keeps it finite)."""
    torch.manual_seed(4)
    module, out = _gat(pyg.GATConv(3, 2, heads=2, add_self_loops=False))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[4], module.bias.detach(), atol=0, rtol=0)


BIPARTITE = "bipartite (x_src, x_dst) inputs or x of another rank than [num_nodes, features]"


@pytest.mark.parametrize("call, message", [
    (lambda m, x, e: (m, x[None], e), BIPARTITE),
    (lambda m, x, e: (m, (x, x), e), BIPARTITE),
    (lambda m, x, e: (m, x, e.to_sparse()), "an adjacency that is not an edge_index [2, E] tensor (a sparse matrix)"),
    (lambda m, x, e: (m, x, e[0]), "an adjacency that is not an edge_index [2, E] tensor (a sparse matrix)"),
    (lambda m, x, e: (m, x, e.tolist()), "an adjacency that is not an edge_index [2, E] tensor (a sparse matrix)"),
], ids=["three-axes", "pair", "sparse", "one-axis", "a-list"])
def test_what_the_op_by_op_form_does_not_cover_is_refused_by_name(call, message):
    x, edge_index = _graph()
    module = pyg.GATConv(3, 2).to(DTYPE).eval()
    args = call(module, x, edge_index)
    with _refused(f"unsupported module at 'conv' of type GATConv: {message}"):
        stock_graph.gat_attention(args[0], "conv", module.forward, *args[1:])


@pytest.mark.parametrize("keyword", ["edge_attr", "size", "return_attention_weights"])
def test_the_extra_arguments_of_forward_are_refused_by_name(keyword):
    x, edge_index = _graph()
    module = pyg.GATv2Conv(3, 2).to(DTYPE).eval()
    with _refused("unsupported module at 'conv' of type GATv2Conv: edge_attr, size or return_attention_weights "
                  "passed to forward"):
        stock_graph.gat_attention(module, "conv", module.forward, x, edge_index, **{keyword: True})


@pytest.mark.parametrize("dtype, close, far", [(torch.float64, 1e-8, 1e-4), (torch.float32, 1e-5, 1e-2)])
def test_a_module_whose_forward_differs_from_the_op_by_op_form_is_refused(dtype, close, far):
    """The check against the module's own forward: within ``1e-6`` (float64) / ``1e-3`` (float32) it converts,
    beyond it, or with another shape, it is refused naming the module."""
    torch.manual_seed(5)
    x, edge_index = _graph()
    x = x.to(dtype)
    module = pyg.GATConv(3, 2, heads=2).to(dtype).eval()
    expected = module(x, edge_index)
    shifted = stock_graph.gat_attention(module, "conv", lambda *a: module.forward(*a) + close, x, edge_index)
    torch.testing.assert_close(shifted, expected, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
    message = ("unsupported module at 'conv' of type GATConv: gradgraph's op-by-op form of GATConv differs from this "
               "module's forward (a PyG version or option it does not know); register a converter for the module")
    for original in (lambda *a: module.forward(*a) + far, lambda *a: module.forward(*a)[:, :-1],
                     lambda *a: module.forward(*a) * (1 + far)):
        with _refused(message):
            stock_graph.gat_attention(module, "conv", original, x, edge_index)


def test_the_check_runs_the_original_forward_on_the_given_edges_without_gradient():
    """The original gets ``x`` detached and the ``edge_index`` as given (before the self-loops are added)."""
    x, edge_index = _graph()
    module = pyg.GATConv(3, 2, add_self_loops=True).to(DTYPE).eval()
    seen = []

    def original(x_in, edges):
        seen.append((x_in.requires_grad, torch.is_grad_enabled(), edges))
        return module.forward(x_in, edges)

    stock_graph.gat_attention(module, "conv", original, x.requires_grad_(), edge_index)
    ((requires_grad, enabled, edges),) = seen
    assert not requires_grad and not enabled and edges is edge_index


class GATConv(nn.Module):
    """Not PyG's: a module of the same name elsewhere."""

    def forward(self, x):
        return x


class TransformerConv(GATConv):
    """Not PyG's either."""


def test_gat_is_pygs_gat_and_gatv2_by_type_and_module():
    assert stock_graph.is_gat(pyg.GATConv(3, 2)) and stock_graph.is_gat(pyg.GATv2Conv(3, 2))
    assert not stock_graph.is_gat(GATConv()) and not stock_graph.is_gat(pyg.GCNConv(3, 2))
    assert not stock_graph.is_gat(pyg.TransformerConv(3, 2))


def test_the_reasons_a_gat_is_refused():
    assert stock_graph.gat_refusal(pyg.GATConv(3, 2).train()) is None  # no dropout: converts in training mode
    assert stock_graph.gat_refusal(pyg.GATConv(3, 2, dropout=0.5).eval()) is None
    assert stock_graph.gat_refusal(pyg.GATConv(3, 2, dropout=0.5).train()) == (
        "attention dropout is active (training mode); call model.eval()")
    edge = "edge features (edge_dim) are a second input; gradgraph reads one input tensor"
    assert stock_graph.gat_refusal(pyg.GATConv(3, 2, edge_dim=2).eval()) == edge
    assert stock_graph.gat_refusal(pyg.GATv2Conv(3, 2, edge_dim=2).eval()) == edge
    module = pyg.GATConv(3, 2).eval()
    module.edge_dim, module.lin_edge = None, nn.Linear(2, 2)
    assert stock_graph.gat_refusal(module) == edge
    for name, make in (("GATConv", lambda: pyg.GATConv(3, 2)), ("GATv2Conv", lambda: pyg.GATv2Conv(3, 2))):
        for attribute in stock_graph._ATTRIBUTES[name]:
            module = make().eval()
            object.__delattr__(module, attribute) if attribute in module.__dict__ else delattr(module, attribute)
            assert stock_graph.gat_refusal(module) == f"a {name} of a PyG version gradgraph does not know", attribute


class Net(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


def test_graph_attention_layers_are_refused_by_name_and_path():
    stock_graph.refuse_graph_attention(Net(pyg.GATConv(3, 2), pyg.GATv2Conv(2, 2), TransformerConv(), GATConv()))
    hint = stock_graph._ATTENTION_HINT + " (docs/gnn.md)"
    # past a convertible GAT and a TransformerConv of another library, to the first PyG layer it cannot read
    for model, path, kind, reason in (
            (Net(pyg.GATConv(3, 2), TransformerConv(), pyg.TransformerConv(3, 2), pyg.AGNNConv()), "layers.2",
             "TransformerConv", hint),
            (Net(pyg.GCNConv(3, 2), pyg.GATv2Conv(3, 2, edge_dim=2)), "layers.1", "GATv2Conv",
             "edge features (edge_dim) are a second input; gradgraph reads one input tensor (docs/gnn.md)")):
        with pytest.raises(UnsupportedModuleError) as info:
            stock_graph.refuse_graph_attention(model)
        assert (info.value.path, info.value.module_type) == (path, kind)
        assert str(info.value) == f"unsupported module at '{path}' of type {kind}: {reason}"
    assert set(stock_graph.GRAPH_ATTENTION_LAYERS) >= set(stock_graph.OP_BY_OP_LAYERS)
    for name in stock_graph.GRAPH_ATTENTION_LAYERS - {"GATConv", "GATv2Conv"}:
        assert hasattr(pyg, name), name


# ----------------------------------------------------------------------------- stock_attention.py
def _attention(batch_first: bool = True, bias: bool = True, seed: int = 6) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(4, 2, bias=bias, batch_first=batch_first).to(DTYPE).eval()


def _masks(kind: str, batch: int = 2, length: int = 3, heads: int = 2) -> dict:
    """A mask of each form ``self_attention`` takes (no row masked whole)."""
    torch.manual_seed(7)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False, False, True], [False, False, False]])
    return {
        "none": {},
        "causal-bool": {"attn_mask": causal},
        "additive": {"attn_mask": torch.randn(length, length, dtype=DTYPE)},
        "per-head-bool": {"attn_mask": torch.rand(batch * heads, length, length).argsort(-1) == 0},
        "per-head-additive": {"attn_mask": torch.randn(batch * heads, length, length, dtype=DTYPE)},
        "padding-bool": {"key_padding_mask": padding},
        "padding-additive": {"key_padding_mask": torch.randn(batch, length, dtype=DTYPE)},
        "both": {"attn_mask": torch.randn(length, length, dtype=DTYPE), "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("mask", ["none", "causal-bool", "additive", "per-head-bool", "per-head-additive",
                                  "padding-bool", "padding-additive", "both"])
def test_self_attention_is_the_modules_output_with_its_weights_and_gradients(batch_first, bias, mask):
    attention = _attention(batch_first, bias)
    torch.manual_seed(8)
    tokens = torch.randn(2, 3, 4, dtype=DTYPE)
    tokens = tokens if batch_first else tokens.transpose(0, 1).contiguous()
    masks = _masks(mask)
    probabilities: list[torch.Tensor] = []
    out = stock_attention.self_attention(attention, tokens, path="attn", probabilities=probabilities, **masks)
    expected, weights = attention(tokens, tokens, tokens, need_weights=True, average_attn_weights=False, **masks)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    (ours,) = probabilities
    torch.testing.assert_close(ours, weights, atol=1e-12, rtol=0)
    mine, theirs = _grads(out, attention), _grads(expected, attention)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-12, rtol=0, msg=name)
    assert stock_attention.self_attention(attention, tokens, **masks).shape == out.shape  # no list: nothing kept


def test_a_mask_of_another_shape_is_refused_naming_the_shapes():
    attention, tokens = _attention(), torch.randn(2, 3, 4, dtype=DTYPE)
    with pytest.raises(GradGraphError, match="^" + re.escape(
            "'attn': attn_mask must have shape [3, 3] or [4, 3, 3], got [2, 3, 3]") + "$"):
        stock_attention.self_attention(attention, tokens, attn_mask=torch.zeros(2, 3, 3, dtype=DTYPE), path="attn")
    with pytest.raises(GradGraphError, match="^" + re.escape(
            "'attn': key_padding_mask must have shape [2, 3], got [3, 2]") + "$"):
        stock_attention.self_attention(attention, tokens, key_padding_mask=torch.zeros(3, 2, dtype=torch.bool),
                                       path="attn")


class OwnForward(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class Stock(nn.MultiheadAttention):
    """A subclass that overrides nothing."""


def test_a_subclass_that_overrides_a_method_is_refused_naming_it():
    stock_attention.check_stock("attn", Stock(4, 2), nn.MultiheadAttention, ("forward", "_reset_parameters"))
    with _refused("unsupported module at 'attn' of type OwnForward: overrides MultiheadAttention.forward; only the "
                  "stock computation is modelled"):
        stock_attention.check_stock("attn", OwnForward(4, 2), nn.MultiheadAttention, ("_reset_parameters", "forward"))
    with _refused("unsupported module at 'attn' of type OwnForward: overrides MultiheadAttention.forward; only the "
                  "stock computation is modelled"):
        stock_attention.check_attention("attn", OwnForward(4, 2).eval())


def test_dropout_is_refused_only_when_active():
    module = nn.Linear(2, 2)
    stock_attention.check_dropout("drop", module.eval(), 0.5)
    stock_attention.check_dropout("drop", module.train(), 0.0)
    with _refused("unsupported module at 'drop' of type Linear: active dropout (p=0.25) makes the function random; "
                  "call model.eval() or build it with dropout=0"):
        stock_attention.check_dropout("drop", module.train(), 0.25)


@pytest.mark.parametrize("make, reason", [
    (lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=3),
     "kdim=3 / vdim=3 differ from embed_dim=4; separate query/key/value projections (cross-attention) are not "
     "supported"),
    (lambda: nn.MultiheadAttention(4, 2, vdim=5),
     "kdim=4 / vdim=5 differ from embed_dim=4; separate query/key/value projections (cross-attention) are not "
     "supported"),
    (lambda: nn.MultiheadAttention(4, 2, add_bias_kv=True),
     "add_bias_kv=True (learned extra key/value tokens) is not supported"),
    (lambda: nn.MultiheadAttention(4, 2, add_zero_attn=True), "add_zero_attn=True is not supported"),
    (lambda: nn.MultiheadAttention(4, 2, dropout=0.1).train(),
     "active dropout (p=0.1) makes the function random; call model.eval() or build it with dropout=0"),
], ids=["kdim", "vdim", "bias-kv", "zero-attn", "dropout"])
def test_what_self_attention_does_not_compute_is_refused_by_name(make, reason):
    stock_attention.check_attention("attn", nn.MultiheadAttention(4, 2, dropout=0.1).eval())
    module = make()
    module = module if module.training and module.dropout else module.eval()
    with _refused(f"unsupported module at 'layers.0.attn' of type MultiheadAttention: {reason}"):
        stock_attention.check_attention("layers.0.attn", module)


# ----------------------------------------------------------------------------- the survivors of run stock 1
@pytest.mark.parametrize("make", [lambda: pyg.GATConv(3, 2, heads=2), lambda: pyg.GATv2Conv(3, 2, heads=2)],
                         ids=["GATConv", "GATv2Conv"])
def test_a_last_node_on_no_edge_gets_its_self_loop(make):
    """Node 5 is on no edge of the given ``edge_index``: its self-loop is added all the same (``num_nodes`` given,
    not inferred from the edges). Kills ``gat_attention`` 52, 54."""
    torch.manual_seed(13)
    x, edge_index = _graph(nodes=6)
    module, out = _gat(make(), x, edge_index)
    torch.testing.assert_close(out, module(x, edge_index), atol=1e-12, rtol=0)


def test_the_check_against_the_forward_is_relative_and_absolute():
    """float64: ``|ours - theirs| <= 1e-6 + 1e-6 |theirs|``. A relative change of ``5e-6`` is refused (an ``rtol`` of
    torch's default ``1e-5`` would pass it), a shift of ``5e-7`` passes (an ``atol`` of the default ``1e-8`` would
    refuse it at the outputs near zero). Kills ``gat_attention`` 245, 246."""
    torch.manual_seed(5)
    x, edge_index = _graph()
    module = pyg.GATConv(3, 2, heads=2).to(DTYPE).eval()
    expected = module(x, edge_index)
    assert float(expected.abs().max()) > 0.5 and float(expected.abs().min()) < 0.4  # both ends reached
    stock_graph.gat_attention(module, "conv", lambda *a: module.forward(*a) + 5e-7, x, edge_index)
    with _refused("unsupported module at 'conv' of type GATConv: gradgraph's op-by-op form of GATConv differs from "
                  "this module's forward (a PyG version or option it does not know); register a converter for the "
                  "module"):
        stock_graph.gat_attention(module, "conv", lambda *a: module.forward(*a) * (1 + 5e-6), x, edge_index)


def test_a_gat_without_the_optional_attributes_is_read_as_without_them():
    """A PyG version whose GATConv has no ``res`` (residual), ``lin_edge``, ``edge_dim`` or ``dropout`` attribute:
    none of them is used, none refused; and ``edge_dim`` alone set is refused. Kills ``gat_refusal`` 6, 10, 14-16,
    26, 29 and ``gat_attention`` 44."""
    import copy

    torch.manual_seed(14)
    x, edge_index = _graph()
    module = pyg.GATConv(3, 2, heads=2).to(DTYPE)
    reference = copy.deepcopy(module).eval()
    for attribute in ("res", "lin_edge", "edge_dim", "dropout"):
        delattr(module, attribute)
    assert stock_graph.gat_refusal(module.train()) is None
    out = stock_graph.gat_attention(module.eval(), "conv", reference.forward, x, edge_index)
    torch.testing.assert_close(out, reference(x, edge_index), atol=1e-12, rtol=0)
    module = pyg.GATConv(3, 2).eval()
    module.edge_dim = 2  # lin_edge None
    assert stock_graph.gat_refusal(module) == (
        "edge features (edge_dim) are a second input; gradgraph reads one input tensor")


def test_masks_are_added_in_the_scores_dtype():
    """bfloat16 scores with a boolean ``attn_mask`` and ``key_padding_mask`` and a float32 additive mask: each mask is
    made in the scores' dtype (else the sum is promoted to float32 and ``weights @ v`` mixes dtypes). Against the
    module's own bfloat16 output. Kills ``_additive_mask`` 7, 10, 15, ``_score_mask`` 6, 30, ``self_attention`` 72."""
    attention = _attention().to(torch.bfloat16)
    torch.manual_seed(15)
    tokens = torch.randn(2, 3, 4).to(torch.bfloat16)
    causal = torch.ones(3, 3, dtype=torch.bool).triu(1)
    for masks in ({"attn_mask": causal}, {"key_padding_mask": torch.tensor([[False, False, True], [False] * 3])},
                  {"attn_mask": torch.randn(3, 3)}, {"key_padding_mask": torch.randn(2, 3)}):
        out = stock_attention.self_attention(attention, tokens, **masks)
        expected, _ = attention(tokens, tokens, tokens, **{name: value.to(torch.bfloat16) if value.is_floating_point()
                                                            else value for name, value in masks.items()})
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=0)


def test_a_bad_mask_without_a_path_is_named_at_the_empty_path():
    """Kills ``self_attention`` 1 (the default ``path``)."""
    with pytest.raises(GradGraphError, match="^" + re.escape("'': attn_mask must have shape [3, 3] or [4, 3, 3], got "
                                                              "[3]") + "$"):
        stock_attention.self_attention(_attention(), torch.randn(2, 3, 4, dtype=DTYPE),
                                       attn_mask=torch.zeros(3, dtype=DTYPE))
