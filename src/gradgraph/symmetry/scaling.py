r"""Scale and sign symmetries of hidden neurons, on networks and on their GradGraphs.

A hidden neuron ``k`` with pre-activation :math:`u_k = \sum_j W_{kj} a_j + b_k` and
activation :math:`\sigma` can be multiplied by a factor :math:`t_k \neq 0` without
changing the network function when :math:`\sigma(t u) = t\,\sigma(u)`:

* :math:`t > 0` when :math:`\sigma` is positively homogeneous (ReLU, LeakyReLU, Identity);
* :math:`t = -1` when :math:`\sigma` is odd (Tanh, Sine, Identity);
* any :math:`t \neq 0` for Identity (both).

The action multiplies the neuron's incoming weights and bias by :math:`t_k` and its
outgoing weights by :math:`1/t_k`; on one edge :math:`j \to k` that is

.. math::
    W_{kj} \mapsto \frac{t_k}{t_j} W_{kj}, \qquad b_k \mapsto t_k b_k, \qquad
    \mathrm{act}_k \mapsto t_k\,\mathrm{act}_k, \qquad
    \mathrm{grad}_k \mapsto \mathrm{grad}_k / t_k,

with :math:`t = 1` on every input and output neuron. Per-sample gradients therefore
transform as :math:`\partial L/\partial W_{kj} \mapsto (t_j/t_k)\,\partial L/\partial W_{kj}`
and :math:`\partial L/\partial b_k \mapsto \partial L/\partial b_k / t_k`.

A *node factor* tensor ``node_factors [N]`` holds one :math:`t` per node of a graph (or
of a ``Batch``); :func:`transform_nodes` applies it, and
``to_graph(rescale_hidden(model, scales))`` equals ``rescale_hidden(to_graph(model), scales)``.

:func:`canonicalize` picks one representative of every orbit, which is how
:class:`gradgraph.nn.ScaleEquivariant` makes any model scale/sign-equivariant.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from gradgraph.convert.mlp import DenseLayer, mlp_layers
from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, GradGraph, NodeKind

__all__ = [
    "Canonicalization",
    "admissible_transformations",
    "canonicalize",
    "flip_hidden",
    "flip_nodes",
    "hidden_factors_to_node_factors",
    "random_node_factors",
    "rescale_hidden",
    "rescale_nodes",
    "transform_nodes",
]

#: Node kinds whose neuron sits between two parameterised linear maps, so that scaling
#: it can be undone by the next layer. Inputs, outputs, residual-stream, LayerNorm and
#: attention neurons are never transformed.
SCALABLE_NODE_KINDS = (NodeKind.HIDDEN, NodeKind.FFN_HIDDEN)

_HOMOGENEOUS_NAMES = ", ".join(k.name for k in ActivationKind if k.positively_homogeneous)
_ODD_NAMES = ", ".join(k.name for k in ActivationKind if k.odd)


# ---------------------------------------------------------------- admissibility
def _activation_table(graph: GradGraph, prop: str) -> Tensor:
    """``[N]`` bool: does the node's activation have property ``prop``?"""
    table = torch.tensor(
        [getattr(kind, prop) for kind in sorted(ActivationKind, key=int)], device=graph.activation.device
    )
    return table[graph.activation]


def _require_fields(graph: GradGraph, what: str) -> None:
    missing = [key for key in ("x", "edge_index", "edge_attr", "act", "grad", "layer", "node_kind", "activation")
               if getattr(graph, key, None) is None]
    if missing:
        raise GradGraphError(f"{what}: the graph has no field(s) {missing}; build it with gradgraph.to_graph")


def _hidden_kind(graph: GradGraph) -> Tensor:
    """``[N]`` bool: the node is of a kind that may be transformed at all."""
    hidden = torch.zeros(graph.num_nodes, dtype=torch.bool, device=graph.node_kind.device)
    for kind in SCALABLE_NODE_KINDS:
        hidden |= graph.node_kind == int(kind)
    return hidden


def admissible_transformations(graph: GradGraph) -> tuple[Tensor, Tensor]:
    """Which nodes may be rescaled and which may be sign-flipped.

    A node is transformable when it is a hidden neuron (``NodeKind.HIDDEN`` or
    ``FFN_HIDDEN``) whose every incoming and outgoing edge is a parameter (no structural
    edge whose fixed value could not absorb the factor).

    Args:
        graph: a :class:`GradGraph` or a ``Batch`` of them.

    Returns:
        ``(can_scale [N], can_flip [N])`` bool tensors: positive rescaling is a symmetry of
        node ``n`` iff ``can_scale[n]`` (positively homogeneous activation), a sign flip iff
        ``can_flip[n]`` (odd activation).
    """
    _require_fields(graph, "admissible_transformations")
    hidden = _hidden_kind(graph)
    edge_param = getattr(graph, "edge_param", None)
    if edge_param is not None:
        structural = edge_param < 0
        touched = torch.zeros_like(hidden)
        touched[graph.edge_index[0, structural]] = True
        touched[graph.edge_index[1, structural]] = True
        hidden &= ~touched
    return hidden & _activation_table(graph, "positively_homogeneous"), hidden & _activation_table(graph, "odd")


def _describe_node(graph: GradGraph, node: int) -> str:
    """``"node 7 (graph 0, module '2', position 3, activation TANH, kind HIDDEN)"``."""
    parts = []
    graph_index = 0
    batch = getattr(graph, "batch", None)
    if isinstance(batch, Tensor):
        graph_index = int(batch[node])
        parts.append(f"graph {graph_index}")
    module = _module_of_node(graph, node, graph_index)
    if module is not None:
        parts.append(f"module '{module}'")
    position = getattr(graph, "position", None)
    if isinstance(position, Tensor):
        parts.append(f"position {int(position[node])}")
    parts.append(f"kind {NodeKind(int(graph.node_kind[node])).name}")
    parts.append(f"activation {ActivationKind(int(graph.activation[node])).name}")
    return f"node {node} ({', '.join(parts)})"


def _module_of_node(graph: GradGraph, node: int, graph_index: int) -> str | None:
    # A node's module is the one owning its incoming weights (or its bias).
    names = getattr(graph, "param_names", None)
    if names is None:
        return None
    if isinstance(graph, Batch) and names and isinstance(names[0], list):
        names = names[graph_index]
    incoming = torch.nonzero(graph.edge_index[1] == node).flatten()
    param = -1
    edge_param = getattr(graph, "edge_param", None)
    if edge_param is not None and incoming.numel():
        param = int(edge_param[incoming[0]])
    node_param = getattr(graph, "node_param", None)
    if param < 0 and node_param is not None:
        param = int(node_param[node])
    if param < 0 or param >= len(names):
        return None
    return names[param].rsplit(".", 1)[0]


def _check_node_factors(graph: GradGraph, node_factors: Tensor, what: str) -> Tensor:
    """Validate ``node_factors [N]`` against the activations; return them in graph dtype."""
    _require_fields(graph, what)
    dtype = graph.act.dtype
    node_factors = torch.as_tensor(node_factors, device=graph.act.device).to(dtype)
    if node_factors.shape != (graph.num_nodes,):
        raise GradGraphError(
            f"{what}: node factors must have shape [N] with N={graph.num_nodes}, got {list(node_factors.shape)}"
        )
    bad = ~torch.isfinite(node_factors) | (node_factors == 0)
    if bool(bad.any()):
        node = int(torch.nonzero(bad)[0])
        raise GradGraphError(
            f"{what}: node factors must be finite and nonzero, got {float(node_factors[node])} at "
            f"{_describe_node(graph, node)}"
        )
    can_scale, can_flip = admissible_transformations(graph)
    moved = node_factors != 1
    hidden = _hidden_kind(graph)
    checks = [
        (moved & ~(can_scale | can_flip) & ~hidden,
         "only hidden neurons are transformed; inputs, outputs and other node kinds keep factor 1"),
        (moved & ~(can_scale | can_flip) & hidden,
         "the neuron touches a structural edge (no parameter) that cannot absorb the factor, "
         "or its activation admits neither scaling nor sign flips"),
        ((node_factors > 0) & moved & ~can_scale,
         f"a positive factor != 1 needs a positively homogeneous activation ({_HOMOGENEOUS_NAMES})"),
        ((node_factors < 0) & ~can_flip,
         f"a negative factor needs an odd activation ({_ODD_NAMES})"),
        ((node_factors < 0) & (node_factors != -1) & ~can_scale,
         f"a negative factor other than -1 needs an activation that is both odd and positively "
         f"homogeneous (IDENTITY)"),
    ]
    for mask, reason in checks:
        if bool(mask.any()):
            node = int(torch.nonzero(mask)[0])
            raise GradGraphError(
                f"{what}: cannot apply factor {float(node_factors[node]):g} to {_describe_node(graph, node)}: {reason}"
            )
    return node_factors


# ------------------------------------------------------------------ graph actions
def transform_nodes(graph: GradGraph, node_factors: Tensor) -> GradGraph:
    r"""Multiply every node ``n`` by the factor ``t_n`` (rescaling and/or sign flip).

    .. math::
        w_{j\to k} \mapsto w_{j\to k}\,t_k / t_j,\quad b_k \mapsto t_k b_k,\quad
        \mathrm{act}_k \mapsto t_k\,\mathrm{act}_k,\quad \mathrm{grad}_k \mapsto \mathrm{grad}_k / t_k.

    The result is the graph of the transformed network (same slots, new values). Works on a
    single graph and on a ``Batch``.

    Args:
        graph: a :class:`GradGraph` or a ``Batch`` of them, ``N`` nodes in all.
        node_factors: ``[N]`` nonzero factors; 1 on every node that does not move.

    Returns:
        A new graph; ``x[:, 0]``, ``edge_attr[:, 0]``, ``act`` and ``grad`` changed.

    Raises:
        GradGraphError: if a factor is zero or non-finite, or a factor != 1 sits on a node
            that does not admit it (an input/output, a non-homogeneous activation for a
            positive scale, a non-odd activation for a negative one); the message names
            the node, its module and activation.
    """
    node_factors = _check_node_factors(graph, node_factors, "transform_nodes")
    return _apply_factors(graph, node_factors)


def _apply_factors(graph: GradGraph, node_factors: Tensor) -> GradGraph:
    if getattr(graph, "component_x", None) is not None:
        # Arbitrary extra features have no known scale action; moving them wrongly would be silent.
        raise GradGraphError(
            "cannot rescale or flip a graph with component_x: its features have no defined scale/sign "
            "action; drop component_x (or transform it yourself) first"
        )
    src, dst = graph.edge_index
    result = graph.clone()
    x = graph.x.clone()
    x[:, 0] = graph.x[:, 0] * node_factors
    edge_attr = graph.edge_attr.clone()
    # Same operation order as rescale_hidden on a model (w * t_dst / t_src), so both
    # routes round identically.
    edge_attr[:, 0] = graph.edge_attr[:, 0] * node_factors[dst] / node_factors[src]
    result.x = x
    result.edge_attr = edge_attr
    result.act = graph.act * node_factors[:, None]
    result.grad = graph.grad / node_factors[:, None]
    return result


def rescale_nodes(graph: GradGraph, node_scales: Tensor) -> GradGraph:
    """Positive rescaling of nodes: :func:`transform_nodes` with ``node_scales [N] > 0``.

    Raises:
        GradGraphError: if a scale is not positive, or is != 1 on a node whose activation
            is not positively homogeneous (ReLU, LeakyReLU, Identity).
    """
    node_scales = torch.as_tensor(node_scales)
    if bool((node_scales <= 0).any()):
        raise GradGraphError("rescale_nodes: scales must be > 0; use flip_nodes or transform_nodes for signs")
    return transform_nodes(graph, node_scales)


def flip_nodes(graph: GradGraph, node_signs: Tensor) -> GradGraph:
    """Sign flips of nodes: :func:`transform_nodes` with ``node_signs [N]`` in ``{-1, +1}``.

    Raises:
        GradGraphError: if a sign is not +-1, or is -1 on a node whose activation is not
            odd (Tanh, Sine, Identity).
    """
    node_signs = torch.as_tensor(node_signs)
    if not bool(((node_signs == 1) | (node_signs == -1)).all()):
        raise GradGraphError("flip_nodes: signs must be +1 or -1")
    return transform_nodes(graph, node_signs)


def random_node_factors(
    graph: GradGraph,
    *,
    scale_range: tuple[float, float] = (1e-3, 1e3),
    scale: bool = True,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random admissible node factors ``[N]`` (for tests and data augmentation).

    Every node that admits rescaling gets a log-uniform scale in ``scale_range``; every
    node that admits a sign flip gets a random sign; all others get 1.

    Args:
        graph: a :class:`GradGraph` or a ``Batch``.
        scale_range: ``(low, high)`` with ``0 < low <= high``.
        scale, flip: draw scales / signs at all.
        generator: random source.
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise GradGraphError(f"random_node_factors: need 0 < low <= high, got scale_range={scale_range}")
    can_scale, can_flip = admissible_transformations(graph)
    num_nodes = graph.num_nodes
    dtype = graph.act.dtype
    log_scale = torch.rand(num_nodes, generator=generator, dtype=dtype) * (math.log(high) - math.log(low))
    scales = torch.exp(log_scale + math.log(low))
    signs = torch.where(torch.rand(num_nodes, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    factors = torch.ones(num_nodes, dtype=dtype)
    if scale:
        factors = torch.where(can_scale.cpu(), scales, factors)
    if flip:
        factors = torch.where(can_flip.cpu(), factors * signs, factors)
    return factors.to(graph.act.device)


# -------------------------------------------------------- per-layer (model) actions
def _check_layer_factors(
    layers: Sequence[DenseLayer], factors: Sequence[Tensor | None], what: str, dtype: torch.dtype
) -> list[Tensor]:
    hidden = layers[:-1]
    if len(factors) != len(hidden):
        raise GradGraphError(
            f"{what}: expected {len(hidden)} factor tensors (one per hidden layer), got {len(factors)}"
        )
    checked = []
    for layer, factor in zip(hidden, factors):
        size = layer.linear.out_features
        if factor is None:
            checked.append(torch.ones(size, dtype=dtype))
            continue
        factor = torch.as_tensor(factor).to(dtype)
        if factor.shape != (size,):
            raise GradGraphError(
                f"{what}: factors for '{layer.name}' must have shape [{size}], got {list(factor.shape)}"
            )
        checked.append(factor)
    return checked


def _admits(layer: DenseLayer, factor: Tensor, what: str) -> None:
    # The callers (rescale_hidden, flip_hidden) have already refused every scale <= 0 and
    # every sign other than +-1, so a factor reaching here is positive or -1: a zero, or a
    # negative factor other than -1, needs no check of its own.
    kind = layer.activation
    if not bool(torch.isfinite(factor).all()):
        raise GradGraphError(f"{what}: factors for '{layer.name}' must be finite")
    moved = factor != 1
    if bool((moved & (factor > 0)).any()) and not kind.positively_homogeneous:
        raise GradGraphError(
            f"{what}: cannot rescale the neurons of '{layer.name}' ({layer.linear}): its activation "
            f"{kind.name} is not positively homogeneous (only {_HOMOGENEOUS_NAMES} are)"
        )
    if bool((factor < 0).any()) and not kind.odd:
        raise GradGraphError(
            f"{what}: cannot flip the signs of the neurons of '{layer.name}' ({layer.linear}): its activation "
            f"{kind.name} is not odd (only {_ODD_NAMES} are)"
        )


def _transform_model(model: nn.Module, factors: Sequence[Tensor | None], what: str) -> nn.Module:
    model = copy.deepcopy(model)
    layers = mlp_layers(model)
    dtype = layers[0].linear.weight.dtype
    factors = _check_layer_factors(layers, factors, what, dtype)
    for layer, factor in zip(layers, factors):
        _admits(layer, factor, what)
    # Input neurons (before the first layer) and output neurons keep factor 1.
    node_factors = [torch.ones(layers[0].linear.in_features, dtype=dtype), *factors,
                    torch.ones(layers[-1].linear.out_features, dtype=dtype)]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            into, out_of = node_factors[index + 1], node_factors[index]
            weight = layer.linear.weight
            weight.copy_(weight * into[:, None] / out_of[None, :])
            if layer.linear.bias is not None:
                layer.linear.bias.copy_(layer.linear.bias * into)
    return model


def hidden_factors_to_node_factors(graph: GradGraph, factors: Sequence[Tensor | None]) -> Tensor:
    """Per-layer factors ``[d_l]`` (one per hidden layer, ``None`` = ones) -> node factors ``[N]``.

    Hidden layers are the permutation groups of the graph in increasing order; neuron
    ``i`` of a layer is the node at ``position`` ``i``. Needs a single graph.
    """
    if isinstance(graph, Batch):
        raise GradGraphError("hidden_factors_to_node_factors needs one graph, got a Batch; use node factors [N]")
    groups = sorted(int(g) for g in torch.unique(graph.perm_group[graph.perm_group >= 0]))
    if len(factors) != len(groups):
        raise GradGraphError(
            f"expected {len(groups)} factor tensors (one per hidden layer), got {len(factors)}"
        )
    node_factors = torch.ones(graph.num_nodes, dtype=graph.act.dtype)
    for group, factor in zip(groups, factors):
        nodes = torch.nonzero(graph.perm_group == group).flatten()
        nodes = nodes[torch.argsort(graph.position[nodes])]
        if factor is None:
            continue
        factor = torch.as_tensor(factor).to(graph.act.dtype)
        if factor.shape != (len(nodes),):
            raise GradGraphError(
                f"factors for hidden layer {group} must have shape [{len(nodes)}], got {list(factor.shape)}"
            )
        node_factors[nodes] = factor
    return node_factors


def rescale_hidden(target: nn.Module | GradGraph, scales: Sequence[Tensor | None]) -> nn.Module | GradGraph:
    """Rescale the hidden neurons of an MLP chain by positive factors, or the same on its graph.

    For a model, returns a deep copy computing the same function: for hidden layer ``l``
    the rows of ``W_l`` and ``b_l`` are multiplied by ``scales[l]`` and the columns of
    ``W_{l+1}`` divided by it. For a GradGraph, returns the graph of that model (see
    :func:`transform_nodes`).

    Args:
        target: an MLP chain, or the GradGraph of one.
        scales: one tensor ``[d_l] > 0`` per hidden layer (``None`` leaves the layer alone).

    Raises:
        GradGraphError: if a scale is not positive, or a layer with a non-homogeneous
            activation (e.g. Tanh, GELU) gets a scale != 1; the message names the layer.
    """
    for factor in scales:
        if factor is not None and bool((torch.as_tensor(factor) <= 0).any()):
            raise GradGraphError("rescale_hidden: scales must be > 0; use flip_hidden for signs")
    if isinstance(target, GradGraph):
        return transform_nodes(target, hidden_factors_to_node_factors(target, scales))
    return _transform_model(target, scales, "rescale_hidden")


def flip_hidden(target: nn.Module | GradGraph, signs: Sequence[Tensor | None]) -> nn.Module | GradGraph:
    """Flip the signs of hidden neurons of an MLP chain (odd activations), or the same on its graph.

    For hidden layer ``l`` the rows of ``W_l`` and ``b_l`` and the columns of ``W_{l+1}``
    are multiplied by ``signs[l]``; the function is unchanged when the activation is odd.

    Args:
        target: an MLP chain, or the GradGraph of one.
        signs: one tensor ``[d_l]`` of +-1 per hidden layer (``None`` leaves the layer alone).

    Raises:
        GradGraphError: if a sign is not +-1, or a layer whose activation is not odd
            (e.g. ReLU, GELU) gets a -1; the message names the layer.
    """
    for factor in signs:
        if factor is not None:
            factor = torch.as_tensor(factor)
            if not bool(((factor == 1) | (factor == -1)).all()):
                raise GradGraphError("flip_hidden: signs must be +1 or -1")
    if isinstance(target, GradGraph):
        return transform_nodes(target, hidden_factors_to_node_factors(target, signs))
    return _transform_model(target, signs, "flip_hidden")


# ------------------------------------------------------------------ canonicalisation
class Canonicalization(NamedTuple):
    """Result of :func:`canonicalize`.

    Attributes:
        graph: the canonical representative, ``transform_nodes(original, node_factors)``.
        node_factors: ``[N]`` the factor that maps the original onto it.
    """

    graph: GradGraph
    node_factors: Tensor


def canonicalize(graph: GradGraph) -> Canonicalization:
    r"""Map a graph to a canonical representative of its scale/sign orbit.

    Hidden neurons are processed layer by layer in forward order (by ``graph.layer``), so
    the incoming weights of a neuron already carry the factors chosen for its sources.
    Let :math:`v_k = (W_{k\cdot}/t_{\cdot},\ b_k)` be that incoming weight + bias vector.

    * **Positively homogeneous** activations (ReLU, LeakyReLU, Identity): scale by
      :math:`1/\lVert v_k\rVert_2`, so the canonical incoming vector has unit norm.
    * **Odd** activations (Tanh, Sine, Identity): flip the sign so that the entry of
      :math:`v_k` of largest magnitude is positive. Tie-break: among entries of exactly
      equal largest magnitude, the first in the graph's edge order wins, the bias counts
      as coming after all edges. Identity neurons get both (scale, then sign).
    * Anything else (GELU, SiLU, Sigmoid; inputs, outputs) keeps factor 1.

    Invariance: ``canonicalize(transform_nodes(g, t)).graph == canonicalize(g).graph`` and
    the factors satisfy ``t' = t_canon / t``. It is exact up to rounding (relative
    ~1e-15 in float64) except on a measure-zero set where the rule is ambiguous: a neuron
    whose incoming vector is zero (left unscaled/unflipped), and, for odd activations, two
    entries whose magnitudes are equal or within rounding of each other. Pure sign flips
    are exact in floating point, so networks of only odd activations canonicalise
    bit-for-bit; with rescaled sources the near-tie set has width ~1e-16 relative.
    The rules are also equivariant to hidden-neuron permutations (except at exact ties
    of the sign rule), so canonicalising keeps a permutation-equivariant model so.

    Args:
        graph: a :class:`GradGraph` or a ``Batch`` of them.

    Returns:
        :class:`Canonicalization` ``(graph, node_factors [N])``.

    Raises:
        GradGraphError: if a transformable neuron has an incoming edge from a node of the
            same or a later layer (no forward order to process).
    """
    _require_fields(graph, "canonicalize")
    can_scale, can_flip = admissible_transformations(graph)
    movable = can_scale | can_flip
    src, dst = graph.edge_index
    layer = graph.layer
    backward = movable[dst] & (layer[src] >= layer[dst])
    if bool(backward.any()):
        edge = int(torch.nonzero(backward)[0])
        raise GradGraphError(
            f"canonicalize: edge {edge} enters {_describe_node(graph, int(dst[edge]))} from node {int(src[edge])} "
            f"of layer {int(layer[src[edge]])}, not an earlier layer; cannot canonicalise in forward order"
        )
    num_nodes = graph.num_nodes
    num_edges = src.numel()
    weight, bias = graph.edge_attr[:, 0], graph.x[:, 0]
    factors = torch.ones(num_nodes, dtype=weight.dtype, device=weight.device)
    # Entry ids for the sign tie-break: edges first (graph order), then the bias.
    entry_id = torch.arange(num_edges + num_nodes, device=weight.device)
    entry_owner = torch.cat([dst, torch.arange(num_nodes, device=dst.device)])
    for depth in torch.unique(layer[movable]).tolist():
        nodes = movable & (layer == depth)
        # Incoming weights with the factors already chosen for earlier layers.
        incoming = weight / factors[src]
        entries = torch.cat([incoming, bias])
        use = nodes[entry_owner]
        owner = entry_owner[use]
        values = entries[use]
        scale_here = nodes & can_scale
        if bool(scale_here.any()):
            squared = scatter(values * values, owner, dim_size=num_nodes, reduce="sum")
            norm = squared.sqrt()
            # A zero incoming vector has no unit-norm representative: leave it (measure zero).
            scale = torch.where(scale_here & (norm > 0), 1.0 / norm, torch.ones_like(norm))
            factors = factors * scale
        flip_here = nodes & can_flip
        if bool(flip_here.any()):
            magnitude = values.abs()
            largest = scatter(magnitude, owner, dim_size=num_nodes, reduce="max")
            is_largest = (magnitude == largest[owner]) & (magnitude > 0)
            sentinel = num_edges + num_nodes
            candidate = torch.where(is_largest, entry_id[use], torch.full_like(owner, sentinel))
            first = scatter(candidate, owner, dim_size=num_nodes, reduce="min")
            has_entry = flip_here & (first < sentinel)
            lookup = torch.zeros(sentinel + 1, dtype=entries.dtype, device=entries.device)
            lookup[entry_id[use]] = values
            sign = torch.where(has_entry & (lookup[first.clamp(max=sentinel)] < 0), -1.0, 1.0).to(factors.dtype)
            factors = factors * sign
    return Canonicalization(_apply_factors(graph, factors), factors)
