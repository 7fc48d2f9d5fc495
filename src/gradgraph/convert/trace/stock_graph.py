"""What the trace runs for PyG's ``GATConv`` and ``GATv2Conv``: their attention over neighbours, op by op.

``GATConv`` computes per head ``h`` (``W`` its linear map, ``a_s``, ``a_d`` its attention vectors)::

    e_ij = LeakyReLU(a_s · W x_j + a_d · W x_i),   α_ij = softmax_j(e_ij) over i's in-edges,
    out_i = ‖_h Σ_j α_ij W x_j  (+ bias)

``GATv2Conv`` applies the attention vector ``a`` after the nonlinearity (``W_l``, ``W_r`` its two maps,
one if ``share_weights``)::

    e_ij = a · LeakyReLU(W_l x_j + W_r x_i),   α_ij = softmax_j(e_ij),   out_i = ‖_h Σ_j α_ij W_l x_j

PyG writes the scores as ``(x * att).sum(-1)`` (a parameter scale then a reduction, which the trace
reads as a statistic) and its softmax subtracts a *detached* maximum, so the trace cannot follow its
own forward. :func:`gat_attention` computes the same function with ops the trace has rules for:
each head's score is ``F.linear`` of the head's features with the row ``a_s[h]`` (a neuron per
head, the attention vector on its edges; for ``GATv2Conv`` of the gathered per-edge features
``LeakyReLU(W_l x_j + W_r x_i)``, as ``EdgeConv``'s message MLP reads them), the softmax is
``exp``, a scatter of the sums into zeros, a gather of them back to the edges and a division (no
shift: the same value, the same gradient), and the messages are a gather, a product with the
weights and a scatter. Every parameter is then
on an ``F.linear`` or a bias, so per-sample gradients are ``act · grad`` sums and exact.

Each call also runs the module's own forward (no trace, no gradient) and refuses where the two
differ, so a ``GATConv`` (or ``GATv2Conv``) whose forward does something this form does not (a future PyG option) is
refused rather than converted as another function. Options this form does not cover are refused
by :func:`gat_refusal`: edge features (``edge_dim``), bipartite ``(x_src, x_dst)`` inputs, a given
``size``, ``return_attention_weights``, sparse adjacencies, active attention dropout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.errors import UnsupportedModuleError

__all__ = ["GRAPH_ATTENTION_LAYERS", "OP_BY_OP_LAYERS", "gat_attention", "gat_refusal", "is_gat",
           "refuse_graph_attention", "softmax_over_neighbours_unshifted"]

#: PyG layers whose messages are weighted by attention over neighbours (a softmax of scores computed
#: from parameters over each node's in-edges); all but a supported GATConv / GATv2Conv are refused by name
#: before a trace
GRAPH_ATTENTION_LAYERS = {"GATConv", "GATv2Conv", "TransformerConv", "SuperGATConv", "AGNNConv", "GPSConv",
                          "HANConv", "HGTConv", "HEATConv", "FAConv", "RGATConv", "DNAConv"}
#: the layers :func:`gat_attention` runs op by op
OP_BY_OP_LAYERS = ("GATConv", "GATv2Conv")
_ATTENTION_HINT = (
    "attention over a data graph's neighbours (TransformerConv and the like) weighs messages by "
    "coefficients gradgraph cannot write as rank-1 terms (PyG computes their scores as a reduction and their "
    "softmax with a detached maximum); GATConv, GATv2Conv, GCNConv, GINConv, SAGEConv (sum / mean), GraphConv, "
    "ChebConv, ResGatedGraphConv and the other layers of docs/gnn.md convert")


def refuse_graph_attention(model: nn.Module) -> None:
    """Raise :class:`~gradgraph.errors.UnsupportedModuleError` naming the first PyG attention layer of
    ``model`` (:data:`GRAPH_ATTENTION_LAYERS`) that gradgraph does not run op by op, with the reason."""
    for path, module in model.named_modules():
        kind = type(module)
        if kind.__name__ not in GRAPH_ATTENTION_LAYERS or not kind.__module__.startswith("torch_geometric"):
            continue
        reason = gat_refusal(module) if is_gat(module) else _ATTENTION_HINT
        if reason is not None:
            raise UnsupportedModuleError(path, kind.__name__, reason + " (docs/gnn.md)")


def is_gat(module: nn.Module) -> bool:
    """Whether ``module`` is PyG's ``GATConv`` or ``GATv2Conv`` (by type, without importing PyG)."""
    kind = type(module)
    return kind.__name__ in OP_BY_OP_LAYERS and kind.__module__.startswith("torch_geometric")


#: the attributes each op-by-op form reads (a PyG version without them is refused)
_ATTRIBUTES = {
    "GATConv": ("heads", "out_channels", "att_src", "att_dst", "concat", "negative_slope", "add_self_loops", "bias"),
    "GATv2Conv": ("heads", "out_channels", "att", "lin_l", "lin_r", "concat", "negative_slope", "add_self_loops",
                  "bias"),
}


def gat_refusal(module: nn.Module) -> str | None:
    """Why gradgraph cannot run this ``GATConv`` / ``GATv2Conv`` as :func:`gat_attention` (``None``: it can)."""
    if getattr(module, "lin_edge", None) is not None or getattr(module, "edge_dim", None) is not None:
        return "edge features (edge_dim) are a second input; gradgraph reads one input tensor"
    if getattr(module, "dropout", 0.0) and module.training:
        return "attention dropout is active (training mode); call model.eval()"
    name = type(module).__name__
    if not all(hasattr(module, attribute) for attribute in _ATTRIBUTES[name]):
        return f"a {name} of a PyG version gradgraph does not know"
    return None


def gat_attention(module: nn.Module, path: str, original: Any, x: Any, edge_index: Any, edge_attr: Any = None,
                  size: Any = None, return_attention_weights: Any = None) -> Tensor:
    """``module(x, edge_index)`` for a ``GATConv`` or ``GATv2Conv`` (the module docstring), ``x [n, F]``,
    ``edge_index [2, E]`` → ``[n, heads * out_channels]`` (``concat``) or ``[n, out_channels]``.
    (``GATv2Conv.forward`` has no ``size``: its fourth positional argument, ``return_attention_weights``,
    lands there and is refused the same way.)"""
    from torch_geometric.utils import add_self_loops, remove_self_loops

    name = type(module).__name__

    def refuse(reason: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(path, name, reason)

    if not isinstance(x, Tensor) or x.dim() != 2:
        raise refuse("bipartite (x_src, x_dst) inputs or x of another rank than [num_nodes, features]")
    if not isinstance(edge_index, Tensor) or edge_index.is_sparse or edge_index.dim() != 2:
        raise refuse("an adjacency that is not an edge_index [2, E] tensor (a sparse matrix)")
    if edge_attr is not None or size is not None or return_attention_weights is not None:
        raise refuse("edge_attr, size or return_attention_weights passed to forward")
    given = edge_index
    heads, channels, nodes = module.heads, module.out_channels, x.shape[0]
    residual = module.res(x) if getattr(module, "res", None) is not None else None
    if module.add_self_loops:
        edge_index, _ = remove_self_loops(edge_index)
        edge_index, _ = add_self_loops(edge_index, num_nodes=nodes)
    src, dst = edge_index[0], edge_index[1]

    def head_scores(features: Tensor, attention: Tensor) -> Tensor:
        """``[rows, heads]``: each head's features times its attention vector, a Linear to one neuron."""
        return torch.cat([F.linear(features[:, h * channels:(h + 1) * channels], attention[0, h:h + 1])
                          for h in range(heads)], dim=-1)

    if name == "GATv2Conv":
        x_src = module.lin_l(x)
        x_dst = x_src if module.share_weights else module.lin_r(x)
        pairs = F.leaky_relu(x_src.index_select(0, src) + x_dst.index_select(0, dst), module.negative_slope)
        scores = head_scores(pairs, module.att)
    else:
        if module.lin is not None:
            x_src = x_dst = module.lin(x)
        else:
            x_src, x_dst = module.lin_src(x), module.lin_dst(x)
        scores = F.leaky_relu(head_scores(x_src, module.att_src).index_select(0, src)
                              + head_scores(x_dst, module.att_dst).index_select(0, dst), module.negative_slope)
    weights = scores.exp()
    totals = torch.zeros(nodes, heads, dtype=weights.dtype, device=weights.device).index_add(0, dst, weights)
    weights = weights / (totals.index_select(0, dst) + 1e-16)
    messages = x_src.view(nodes, heads, channels).index_select(0, src) * weights.unsqueeze(-1)
    out = torch.zeros(nodes, heads, channels, dtype=messages.dtype, device=messages.device).index_add(0, dst, messages)
    if module.concat:
        out = out.reshape(nodes, heads * channels)
    else:  # the mean over heads as a sum of head slices (a mean over part of a set's features has no rule)
        out = sum(out[:, h] for h in range(1, heads)) + out[:, 0] if heads > 1 else out[:, 0]
        out = out / heads
    if residual is not None:
        out = out + residual
    if module.bias is not None:
        out = out + module.bias
    tolerance = 1e-6 if out.dtype == torch.float64 else 1e-3
    # the module's own function, for the check; unseen by the trace (a detach of the output is an op
    # without a rule, which would fix every neuron the output holds)
    with torch.no_grad(), torch._C.DisableTorchFunction():
        expected = original(x.detach(), given)
        same = expected.shape == out.shape and torch.allclose(out.detach(), expected, rtol=tolerance, atol=tolerance)
    if not same:
        raise refuse(f"gradgraph's op-by-op form of {name} differs from this module's forward (a PyG version or "
                     "option it does not know); register a converter for the module")
    return out


#: the modules that call ``torch_geometric.utils.softmax`` by the name they imported it under: the softmax and
#: attentional aggregations (``SoftmaxAggregation``, GENConv's default, ``AttentionalAggregation``) and AttentiveFP
_SOFTMAX_CALLERS = ("torch_geometric.nn.aggr.basic", "torch_geometric.nn.aggr.attention",
                    "torch_geometric.nn.models.attentive_fp")


def _unshifted_softmax(original: Any) -> Any:
    """PyG's ``softmax(src, index, ptr, num_nodes, dim)`` over each group of ``index`` as ``exp(src)``, a scatter of
    the sums and a division by them gathered back: the same value and gradient as PyG's, which subtracts each
    group's *detached* maximum first (a shift that cancels; ``exp`` of values large enough to overflow makes the
    factors non-finite, which the conversion refuses). A ``ptr`` without an ``index`` keeps PyG's form."""
    def softmax(src: Tensor, index: Tensor | None = None, ptr: Tensor | None = None, num_nodes: int | None = None,
                dim: int = 0) -> Tensor:
        if index is None:
            return original(src, index, ptr, num_nodes, dim)
        from torch_geometric.utils import scatter
        from torch_geometric.utils.num_nodes import maybe_num_nodes

        out = src.exp()
        total = scatter(out, index, dim, dim_size=maybe_num_nodes(index, num_nodes), reduce="sum")
        return out / total.index_select(dim, index)

    return softmax


@contextlib.contextmanager
def softmax_over_neighbours_unshifted() -> Iterator[None]:
    """While the trace or a replay runs: PyG's softmax aggregations call :func:`_unshifted_softmax`, whose ops the
    trace has rules for (a detached value has none). Only modules already imported are patched, and each is
    restored on exit."""
    patched = []
    for name in _SOFTMAX_CALLERS:
        module = sys.modules.get(name)
        original = getattr(module, "softmax", None) if module is not None else None
        if original is not None:
            patched.append((module, original))
            module.softmax = _unshifted_softmax(original)
    try:
        yield
    finally:
        for module, original in patched:
            module.softmax = original

