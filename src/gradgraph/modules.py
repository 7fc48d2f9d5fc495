"""Small modules the package provides for the networks it converts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Sine"]


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
