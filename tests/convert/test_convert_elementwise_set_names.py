"""The names of the sets an elementwise product with a parameter makes (LayerScale, ``h * gamma``).

A set's origin is what a refusal names to the user ("the activation of the 'block Tensor.mul' output neurons
is not finite"); the plan keeps them as ``set_names``. Written for the survivors of the mutation runs of
``convert/trace/rules_elementwise.py``'s ``with_parameter`` that changed only those names (docs/mutation.md);
the mutants named are numbered as a fresh ``.mutation/convert-elementwise/`` numbers them, each checked with
``MUTANT_UNDER_TEST``.
"""

from __future__ import annotations

import torch
from test_convert_conv_set_names import DTYPE, assert_exact_by_loop, origins
from torch import nn


class Scaled(nn.Module):
    """``side(h)`` (which makes ``h`` the act of ``lin``'s neurons) and ``relu(h) * gamma``: the product reads
    another version of the neurons, so it first gives it a set of its own, then makes the scaled set."""

    def __init__(self):
        super().__init__()
        self.lin, self.side, self.gamma = nn.Linear(3, 4), nn.Linear(4, 2), nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, h):
        h = self.lin(h)
        return self.side(h), torch.relu(h) * self.gamma


class TwoScales(nn.Module):
    """The block, then ``tanh(b) * beta`` at the model's root, where the path is empty."""

    def __init__(self):
        super().__init__()
        self.block, self.head, self.beta = Scaled(), nn.Linear(4, 2), nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        side, scaled = self.block(x)
        return side + self.head(torch.tanh(scaled) * self.beta)


def test_a_product_with_a_parameter_names_its_sets_by_module_and_op():
    """Exact; the set of the other version is ``'block Tensor.mul'``, as is the scaled set; at the root the scaled
    set is ``'Tensor.mul'`` (it was ``' Tensor.mul'``, with the empty path's space, before
    ``Tracer.new_set`` stripped it). Kills ``with_parameter`` 193 (the other version's set named
    ``'block None'``) and 218 (the scaled sets named ``None``)."""
    torch.manual_seed(0)
    model = TwoScales().to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == ["input", "block.lin", "block.side", "block Tensor.mul", "block Tensor.mul",
                                      "Tensor.mul", "head"]
