"""Equivariance checks for any model on GradGraphs: the proof our layers get, for yours too.

>>> from gradgraph.testing import assert_equivariant
>>> assert_equivariant(model, graphs)   # raises AssertionError naming the output that moved wrongly
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.symmetry import edge_permutation, move_values, permute_components, permute_nodes, random_node_permutation

__all__ = ["assert_equivariant", "as_float64_batch"]

FLOAT_KEYS = ("x", "edge_attr", "act", "grad")

#: ``node_permutation(batch, generator) -> Tensor [N]``: a symmetry of the batch's architectures.
NodePermutation = Callable[[Batch, torch.Generator], Tensor]


#: Draws of a node permutation before :func:`assert_equivariant` concludes none can move a node.
_IDENTITY_REDRAWS = 32


def as_float64_batch(graphs: GradGraph | Batch | Sequence[GradGraph], dtype: torch.dtype = torch.float64) -> Batch:
    """Batch ``graphs`` (one graph, a ``Batch`` or a list) and cast their float fields to ``dtype``."""
    if isinstance(graphs, Batch):
        batch = graphs.clone()
    elif isinstance(graphs, GradGraph):
        batch = Batch.from_data_list([graphs])
    else:
        graphs = list(graphs)
        if not graphs:
            raise GradGraphError("assert_equivariant: no graphs given")
        batch = Batch.from_data_list(graphs)
    for key in FLOAT_KEYS + ("component_x",):
        if getattr(batch, key, None) is not None:
            setattr(batch, key, getattr(batch, key).to(dtype))
    return batch


def _compare(name: str, got: Tensor | None, expected: Tensor | None, atol: float, rtol: float, what: str) -> float:
    if (got is None) != (expected is None):
        raise AssertionError(f"{what}: output '{name}' is present in one run and None in the other")
    if got is None:
        return 0.0
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: output '{name}' changed shape {list(expected.shape)} -> {list(got.shape)}")
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if error > atol + rtol * scale:
        raise AssertionError(
            f"{what}: output '{name}' {list(got.shape)} differs from the expected transformed output by "
            f"{error:.3e} (allowed {atol:.1e} + {rtol:.1e} * {scale:.3e}); the model is not equivariant"
        )
    return error


def assert_equivariant(
    model: nn.Module,
    graphs: GradGraph | Batch | Sequence[GradGraph],
    *,
    num_trials: int = 3,
    node_permutation: NodePermutation = random_node_permutation,
    check_components: bool = True,
    dtype: torch.dtype = torch.float64,
    atol: float = 1e-8,
    rtol: float = 1e-8,
    seed: int = 0,
) -> dict[str, float]:
    r"""Check that ``model`` is equivariant to neuron permutations and invariant to component order.

    For a node permutation :math:`\pi` that is a symmetry of the architectures (by default
    a random shuffle of every permutation group, i.e. of hidden neurons) and a random
    permutation :math:`\tau` of the components, it checks

    .. math::
        f(\pi \cdot G)_{\text{edge}} = \pi \cdot f(G)_{\text{edge}},\quad
        f(\pi \cdot G)_{\text{node}} = \pi \cdot f(G)_{\text{node}},\quad
        f(\pi \cdot G)_{\text{graph}} = f(G)_{\text{graph}},\quad
        f(\pi \cdot G)_{\text{component}} = f(G)_{\text{component}},

    and :math:`f(\tau \cdot G) = f(G)` for edge, node and graph outputs while component
    outputs move with the components, :math:`f(\tau \cdot G)_{\text{component}} = \tau \cdot f(G)_{\text{component}}`.

    The model and the graphs are copied and cast to ``dtype`` (float64 by default) so
    that the tolerances can be tight; the model is put in eval mode.

    Args:
        model: any module whose ``forward(batch)`` returns a :class:`GradMetaNetOutput`.
        graphs: a GradGraph, a Batch, or a list of GradGraphs (batched together; they
            must share ``B``).
        num_trials: random permutations tried for each check.
        node_permutation: ``(batch, generator) -> [N]`` node permutation to test, e.g. a
            head permutation of transformer graphs; default shuffles every ``perm_group``.
        check_components: also check invariance to the order of components.
        dtype, atol, rtol: precision of the check: ``|got - expected| <= atol + rtol * max|expected|``.
        seed: seed of the permutations.

    Returns:
        ``{check: largest error seen}`` for the checks that ran.

    Raises:
        AssertionError: naming the output and the error, if some check fails.
        GradGraphError: if the graphs have no permutable neurons (the check would prove nothing).
    """
    batch = as_float64_batch(graphs, dtype)
    model = copy.deepcopy(model).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference = model(batch)
        if not isinstance(reference, GradMetaNetOutput):
            raise GradGraphError(
                f"assert_equivariant: the model returned {type(reference).__name__}; expected GradMetaNetOutput"
            )
        errors = {"node permutation": 0.0, "component permutation": 0.0}
        for trial in range(num_trials):
            # a group of two neurons draws the identity half the time: redraw (from the same
            # seeded generator) before concluding that nothing can move
            for _ in range(_IDENTITY_REDRAWS):
                node_perm = node_permutation(batch, generator)
                if not torch.equal(node_perm, torch.arange(batch.num_nodes)):
                    break
            else:
                raise GradGraphError(
                    f"assert_equivariant: the node permutation moved no node in {_IDENTITY_REDRAWS} draws "
                    "(no permutable neurons?); the check would prove nothing"
                )
            moved = model(permute_nodes(batch, node_perm))
            what = f"node permutation, trial {trial}"
            expected_edge = None if reference.edge is None else move_values(reference.edge, edge_permutation(batch, node_perm))
            expected_node = None if reference.node is None else move_values(reference.node, node_perm)
            for name, got, expected in (
                ("edge", moved.edge, expected_edge),
                ("node", moved.node, expected_node),
                ("graph", moved.graph, reference.graph),
                ("component", moved.component, reference.component),
            ):
                errors["node permutation"] = max(errors["node permutation"], _compare(name, got, expected, atol, rtol, what))
            if check_components:
                num_components = batch.act.shape[1]
                if num_components < 2:
                    raise GradGraphError("assert_equivariant: graphs need B >= 2 components to check component order")
                perm = torch.randperm(num_components, generator=generator)
                while torch.equal(perm, torch.arange(num_components)):
                    perm = torch.randperm(num_components, generator=generator)
                shuffled = model(permute_components(batch, perm))
                what = f"component permutation, trial {trial}"
                expected_component = None if reference.component is None else reference.component[:, perm]
                for name, got, expected in (
                    ("edge", shuffled.edge, reference.edge),
                    ("node", shuffled.node, reference.node),
                    ("graph", shuffled.graph, reference.graph),
                    ("component", shuffled.component, expected_component),
                ):
                    error = _compare(name, got, expected, atol, rtol, what)
                    errors["component permutation"] = max(errors["component permutation"], error)
    if not check_components:
        del errors["component permutation"]
    return errors
