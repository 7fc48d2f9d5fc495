"""Scale/sign equivariance for any gradgraph model, by canonicalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn
from torch_geometric.nn.inits import reset

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.output import GradMetaNetOutput
from gradgraph.symmetry.scaling import canonicalize

__all__ = ["OutputRule", "ScaleEquivariant", "rule_exponent"]

#: How one output channel transforms when hidden neuron ``k`` is multiplied by ``t_k``:
#: ``"weight"`` (exponent 1), ``"gradient"`` (exponent -1), ``"invariant"`` (0), or
#: ``(rule, power)`` for a power of one of them, e.g. ``("gradient", 2)`` for a squared
#: gradient such as a Fisher or Hessian diagonal.
OutputRule = Union[str, tuple[str, int]]

_BASE_EXPONENTS = {"weight": 1, "gradient": -1, "invariant": 0}


def rule_exponent(rule: OutputRule) -> int:
    r"""The exponent :math:`e` of an output rule (see :class:`ScaleEquivariant`).

    ``"weight"`` -> 1, ``"gradient"`` -> -1, ``"invariant"`` -> 0, ``(rule, p)`` -> ``p``
    times the rule's exponent.
    """
    if isinstance(rule, str):
        base, power = rule, 1
    elif isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str) and isinstance(rule[1], int):
        base, power = rule
    else:
        raise GradGraphError(
            f"output rule must be 'weight', 'gradient', 'invariant' or (rule, int power), got {rule!r}"
        )
    if base not in _BASE_EXPONENTS:
        raise GradGraphError(f"unknown output rule {base!r}; expected one of {sorted(_BASE_EXPONENTS)}")
    return _BASE_EXPONENTS[base] * power


def _exponents(rules: OutputRule | Sequence[OutputRule] | None, what: str) -> list[int] | int | None:
    if rules is None:
        return None
    if isinstance(rules, (str, tuple)):
        return rule_exponent(rules)
    if isinstance(rules, Sequence):
        return [rule_exponent(rule) for rule in rules]
    raise GradGraphError(f"ScaleEquivariant: {what} rule must be a rule or a list of rules, got {rules!r}")


class ScaleEquivariant(nn.Module):
    r"""Makes any gradgraph model equivariant to rescaling and sign flips of hidden neurons.

    The input graph :math:`G` is first mapped to the canonical representative of its
    scale/sign orbit, :math:`(C, t) = \mathrm{canonicalize}(G)` with
    :math:`C = t \cdot G` (see :func:`gradgraph.symmetry.canonicalize`); the wrapped
    model :math:`f` runs on :math:`C`, and its outputs are mapped back to the frame of
    :math:`G` by each output's declared rule with exponent :math:`e`:

    .. math::
        \mathbf{y}^{\mathrm{edge}}_{j \to k} = f(C)^{\mathrm{edge}}_{j \to k}
            \left(\frac{t_j}{t_k}\right)^{e}, \qquad
        \mathbf{y}^{\mathrm{node}}_{k} = f(C)^{\mathrm{node}}_{k}\, t_k^{-e}, \qquad
        \mathbf{y}^{\mathrm{graph}} = f(C)^{\mathrm{graph}}.

    Because :math:`\mathrm{canonicalize}(\lambda \cdot G) = (C, t/\lambda)`, the wrapped
    model satisfies, for every admissible :math:`\lambda` (positive scales of ReLU /
    LeakyReLU / Identity neurons, sign flips of Tanh / Sine / Identity neurons),

    .. math::
        \mathbf{y}^{\mathrm{edge}}(\lambda \cdot G)_{j \to k}
            = \left(\frac{\lambda_k}{\lambda_j}\right)^{e} \mathbf{y}^{\mathrm{edge}}(G)_{j \to k},
        \qquad
        \mathbf{y}^{\mathrm{node}}(\lambda \cdot G)_k = \lambda_k^{e}\, \mathbf{y}^{\mathrm{node}}(G)_k.

    Rules: ``"weight"`` (:math:`e = 1`; edge outputs transform like :math:`W_{kj}`, node
    outputs like a bias :math:`b_k`), ``"gradient"`` (:math:`e = -1`; like
    :math:`\partial L/\partial W_{kj}` and :math:`\partial L/\partial b_k`),
    ``"invariant"`` (:math:`e = 0`), and ``(rule, p)`` for the :math:`p`-th power, e.g.
    ``("gradient", 2)`` for a Fisher diagonal. A list gives one rule per output channel.

    The wrapped model may be anything whose ``forward(graph)`` returns a
    :class:`GradMetaNetOutput`, in either message direction; equivariance comes from the
    canonicalisation, not from the model. Permutation equivariance of the wrapped model
    is kept, since canonicalisation commutes with hidden-neuron permutations.

    Args:
        model: the wrapped model, ``forward(graph_or_batch) -> GradMetaNetOutput``.
        edge: rule(s) for ``output.edge``; ``None`` requires the model to return none.
        node: rule(s) for ``output.node``; ``None`` requires the model to return none.
            Rules ``"weight"`` and ``"gradient"`` of node outputs mean bias-like values.
        graph: rule for ``output.graph``; only ``"invariant"`` (graph outputs have no
            neuron to transform with).

    Shapes:
        - **input:** a :class:`GradGraph` or ``Batch`` with ``N`` nodes and ``E`` edges
        - **output:** :class:`GradMetaNetOutput` with ``edge [E, k_e]``, ``node [N, k_n]``,
          ``graph [num_graphs, k_g]`` (each may be ``None``)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        edge: OutputRule | Sequence[OutputRule] | None = "gradient",
        node: OutputRule | Sequence[OutputRule] | None = "gradient",
        graph: OutputRule | None = "invariant",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GradGraphError(f"ScaleEquivariant wraps an nn.Module, got {type(model).__name__}")
        self.model = model
        self.edge_rule = edge
        self.node_rule = node
        self.graph_rule = graph
        self._edge_exponents = _exponents(edge, "edge")
        self._node_exponents = _exponents(node, "node")
        if graph is not None and rule_exponent(graph) != 0:
            raise GradGraphError(
                f"ScaleEquivariant: graph outputs can only be 'invariant', got {graph!r}; a per-graph value "
                "has no hidden neuron whose factor it could carry"
            )

    def reset_parameters(self) -> None:
        """Reset the wrapped model's parameters (it has none of its own)."""
        reset(self.model)

    def forward(self, graph: GradGraph) -> GradMetaNetOutput:
        """Canonicalise ``graph``, run the model, map the outputs back (see the class docstring)."""
        canonical, factors = canonicalize(graph)
        output = self.model(canonical)
        if not isinstance(output, GradMetaNetOutput):
            raise GradGraphError(
                f"ScaleEquivariant: the wrapped {type(self.model).__name__} returned {type(output).__name__}; "
                "it must return gradgraph.nn.GradMetaNetOutput(edge=, node=, graph=)"
            )
        src, dst = graph.edge_index
        edge = self._map_back(output.edge, factors[src] / factors[dst], self._edge_exponents, "edge",
                              src.numel(), "E")
        # Edge outputs go back by (t_src / t_dst)^e, node outputs by (1 / t)^e.
        node = self._map_back(output.node, 1.0 / factors, self._node_exponents, "node", graph.num_nodes, "N")
        if output.graph is not None and self.graph_rule is None:
            raise GradGraphError(
                "ScaleEquivariant: the wrapped model returned a graph output but no graph rule was declared"
            )
        return GradMetaNetOutput(edge=edge, node=node, graph=output.graph, component=output.component)

    def _map_back(
        self,
        values: Tensor | None,
        ratio: Tensor,
        exponents: list[int] | int | None,
        what: str,
        rows: int,
        rows_name: str,
    ) -> Tensor | None:
        """``values [rows, k]`` times ``ratio [rows] ** exponent`` (one exponent per channel)."""
        if values is None:
            return None
        if exponents is None:
            raise GradGraphError(
                f"ScaleEquivariant: the wrapped model returned a {what} output but no {what} rule was declared"
            )
        if values.dim() not in (1, 2) or values.shape[0] != rows:
            raise GradGraphError(
                f"ScaleEquivariant: {what} output must have shape [{rows_name}] or [{rows_name}, k] with "
                f"{rows_name}={rows}, got {list(values.shape)}"
            )
        ratio = ratio.to(values.dtype)
        if isinstance(exponents, int):
            if exponents == 0:
                return values
            scale = ratio**exponents
            return values * (scale if values.dim() == 1 else scale[:, None])
        channels = 1 if values.dim() == 1 else values.shape[1]
        if len(exponents) != channels:
            raise GradGraphError(
                f"ScaleEquivariant: {len(exponents)} {what} rules declared for a {what} output with "
                f"{channels} channels (shape {list(values.shape)})"
            )
        power = torch.tensor(exponents, dtype=values.dtype, device=values.device)
        scale = ratio[:, None] ** power[None, :]
        return values * (scale[:, 0] if values.dim() == 1 else scale)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.model}, edge={self.edge_rule!r}, node={self.node_rule!r}, "
            f"graph={self.graph_rule!r})"
        )
