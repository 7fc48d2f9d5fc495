"""Run one module on a batch of ``G`` graphs with a different set of parameters for every graph.

PES meta-training runs every particle with its own meta-parameters (``θ ± ξ``). For the
GradMetaNet variant the general path calls GradMetaNet once per particle, each on one graph.
Every layer of GradMetaNet is a parameter-free graph operation (sparse messages, scatter
means, pooling, products over components) around parametrised ``Linear`` and ``Embedding``
maps, and on a PyG ``Batch`` of graphs of ONE architecture every tensor those maps see is
graph-major: its first axis is ``G·n`` (nodes ``G·N``, edges ``G·E``, layer groups ``G·L``,
graphs ``G``) with graph ``g``'s rows at ``g·n … (g+1)·n − 1``. So the whole batch goes
through the model ONCE if each such map uses graph ``g``'s parameters on graph ``g``'s rows:

.. math::
    \\mathrm{Linear}_g(x) = x\\, W_g^\\top + b_g, \\qquad \\mathrm{Embedding}_g(i) = T_g[i]

for ``x``'s rows of graph ``g`` — a batched matmul (``torch.bmm``) and a gather, with
``W [G, out, in]``, ``b [G, out]``, ``T [G, rows, C]`` stacked from the ``G`` parameter sets.
:func:`per_graph_parameters` installs exactly this in a module's ``Linear`` / ``Embedding``
submodules for the duration of a ``with`` block; anything else that holds a parameter is
refused (a :class:`~gradgraph.GradGraphError` naming it), since its per-graph form is unknown.

The results equal ``G`` separate calls, graph by graph (tested to 1e-10 in float64:
``tests/optim/test_optim_per_graph.py`` directly, ``tests/optim/test_optim_protocol.py`` through
the learned optimizer's update).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch_geometric.nn import Linear as PyGLinear

from gradgraph.errors import GradGraphError
from gradgraph.nn.linear import batched_linear

__all__ = ["per_graph_parameters"]


def _check_graph_major(owner: str, value: Tensor, num_graphs: int) -> None:
    """Refuse an input of ``owner`` whose first axis cannot hold ``num_graphs`` equal row blocks."""
    if value.dim() < 1 or value.shape[0] % num_graphs:
        raise GradGraphError(f"per_graph_parameters: {owner} got an input of shape {tuple(value.shape)} whose first "
                             f"axis is not graph-major over {num_graphs} graphs")


def _linear(owner: str, weight: Tensor, bias: Tensor | None, num_graphs: int):
    def forward(x: Tensor) -> Tensor:
        _check_graph_major(owner, x, num_graphs)
        out = batched_linear(x.reshape(num_graphs, -1, x.shape[-1]), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[1])

    return forward


def _embedding(owner: str, table: Tensor, num_graphs: int):
    graphs = torch.arange(num_graphs, device=table.device)

    def forward(index: Tensor) -> Tensor:
        _check_graph_major(owner, index, num_graphs)
        looked_up = table[graphs[:, None], index.reshape(num_graphs, -1)]  # [G, n, C]
        return looked_up.reshape(*index.shape, table.shape[-1])

    return forward


@contextmanager
def per_graph_parameters(module: nn.Module, stacked: dict[str, Tensor], num_graphs: int) -> Iterator[nn.Module]:
    """Within the block, ``module`` runs graph ``g`` of a ``Batch`` with parameter set ``g``.

    Args:
        module: e.g. a :class:`~gradgraph.nn.GradMetaNet`; its parameters must all belong to
            ``nn.Linear``, PyG ``Linear`` or ``nn.Embedding`` submodules (plain lookups).
        stacked: ``{name: [G, *shape]}`` for every name of ``module.named_parameters()``.
        num_graphs: ``G``; every input of those submodules must be graph-major (module docstring).

    Yields:
        ``module``, whose ``Linear`` / ``Embedding`` submodules compute the per-graph maps of the
        module docstring until the block ends (then their own ``forward`` is back).

    Raises:
        GradGraphError: a parameter missing from ``stacked`` or of the wrong shape, a submodule
            of another kind holding parameters, an input that is not graph-major.
    """
    names = {name for name, _ in module.named_parameters()}
    if set(stacked) != names:
        raise GradGraphError(f"per_graph_parameters: stacked parameters differ from {type(module).__name__}'s: "
                             f"missing {sorted(names - set(stacked))}, unknown {sorted(set(stacked) - names)}")
    patched: list[nn.Module] = []
    try:
        for prefix, sub in module.named_modules():
            own = dict(sub.named_parameters(recurse=False))
            if not own:
                continue
            key = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
            for name, value in own.items():
                if stacked[key(name)].shape != (num_graphs, *value.shape):
                    raise GradGraphError(f"per_graph_parameters: {key(name)} has shape {tuple(stacked[key(name)].shape)},"
                                         f" expected {(num_graphs, *value.shape)}")
            owner = f"{prefix or type(module).__name__} ({type(sub).__name__})"
            if isinstance(sub, (nn.Linear, PyGLinear)):
                forward = _linear(owner, stacked[key("weight")], stacked.get(key("bias")), num_graphs)
            elif type(sub) is nn.Embedding and sub.max_norm is None:
                forward = _embedding(owner, stacked[key("weight")], num_graphs)
            else:
                raise GradGraphError(f"per_graph_parameters: {owner} holds parameters but is not a Linear or a plain "
                                     "Embedding; its per-graph form is unknown")
            sub.forward = forward  # an instance attribute shadows the class's forward
            patched.append(sub)
        yield module
    finally:
        for sub in patched:
            del sub.forward
