"""Small modules the package provides for the networks it converts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError

__all__ = ["OneGraph", "Sine"]


class Sine(nn.Module):
    r"""The SIREN activation :math:`\sigma(u) = \sin(\omega_0 u)`.

    Args:
        w0: frequency :math:`\omega_0` (30 in the SIREN paper's first layer; 1 gives a
            plain sine).

    Shapes:
        input ``[*]``, output ``[*]``.
    """

    def __init__(self, w0: float = 1.0) -> None:
        super().__init__()
        self.w0 = float(w0)

    def forward(self, u: Tensor) -> Tensor:
        return torch.sin(self.w0 * u)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class OneGraph(nn.Module):
    r"""One data graph as a batch of one datapoint, for graph neural networks written for
    ``x [num_nodes, features]`` (PyG's layers, ``GATConv`` included).

    gradgraph reads a data graph's nodes as positions of one datapoint (``docs/gnn.md``): a batch of
    graph signals is ``[b, num_nodes, features]`` with one ``edge_index`` for all. Layers that take
    ``[num_nodes, features]`` only run on one graph; wrap the model and pass ``x.unsqueeze(0)``:

    .. math::
        \mathrm{OneGraph}(f)(x, \ldots) = f(x_0, \ldots)\text{ with a new leading axis of size 1}

    Args:
        module: the model, called as ``module(x[0], *args, **kwargs)``.

    Shapes:
        input ``[1, N, F]``; output ``[1, *out]`` for the module's output ``[*out]`` (node outputs
        ``[1, N, C]``, a pooled graph output ``[1, 1, C]``). Parameter names get the prefix ``module.``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if x.dim() < 2 or x.shape[0] != 1:
            raise GradGraphError(f"OneGraph: x must be one graph as a batch of one, [1, num_nodes, features]; got "
                                 f"shape {list(x.shape)}")
        return self.module(x[0], *args, **kwargs).unsqueeze(0)
