"""The names of the sets a product with a parameter (LayerScale, ``h * gamma``) and a position table make.

A set's origin is what a refusal names to the user ("the activation of the 'block Tensor.mul' output neurons
is not finite"); the plan keeps them as ``set_names``. Written for the survivors of the mutation runs of
``convert/trace/rules_elementwise.py``'s ``with_parameter`` and ``rules_affine.py``'s ``position_parameter``
that changed only those names (docs/mutation.md); the mutants named are numbered as a fresh
``.mutation/convert-elementwise/`` or ``.mutation/convert-affine/`` numbers them, each checked with
``MUTANT_UNDER_TEST``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from convert_values import exact
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


class Embed(nn.Module):
    """Token embedding plus a learned position table, ``tok(ids) + pos``."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, 4), nn.Parameter(torch.randn(5, 4))

    def forward(self, ids):
        return self.tok(ids) + self.pos


class TwoPositionTables(nn.Module):
    """The embedding block, then a second position table added at the model's root."""

    def __init__(self):
        super().__init__()
        self.embed, self.head, self.pos2 = Embed(), nn.Linear(4, 1), nn.Parameter(torch.randn(5, 4))

    def forward(self, ids):
        h = torch.tanh(self.embed(ids))
        return self.head(torch.tanh(h + self.pos2)).mean(1)


def test_position_tables_are_named_by_their_module_or_op():
    """Exact; the position table's set is ``'embed positions'`` in its module and ``'Tensor.add positions'`` at
    the root. Kills ``position_parameter`` 48 (named ``None``) and 54 (named by the op inside a module, by
    nothing at the root)."""
    torch.manual_seed(0)
    model = TwoPositionTables().to(DTYPE)
    ids = torch.randint(0, 7, (3, 5))
    exact(model, ids)
    assert origins(model, ids) == ["embed.tok table rows", "embed.tok", "embed positions", "embed", "embed Tensor.add",
                                   "Tensor.add positions", "Tensor.add", "Tensor.add", "head", "Tensor.mean"]


class CReLU(nn.Module):
    def forward(self, h):
        return torch.cat([torch.relu(h), torch.relu(-h)], -1)


class RepeatedParts(nn.Module):
    """CReLU in a module, then ``cat([h, h ** 2])`` at the model's root: each repeated part a tied copy."""

    def __init__(self):
        super().__init__()
        self.a, self.crelu, self.b, self.c = nn.Linear(3, 4), CReLU(), nn.Linear(8, 3), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.b(self.crelu(self.a(x))))
        return self.c(torch.cat([h, h ** 2], -1))


def test_the_copies_of_repeated_parts_are_named_by_their_module_or_op():
    """Exact; the copy of CReLU's second part is ``'crelu part 1'``, the copy at the root ``'torch.cat part 1'``.
    Kills ``rules_shape.copy_repeated_parts`` 39 (named ``None``), 44 (named by the op in a module, ``'part 1'`` at
    the root) and ``shape_op`` 182 (no name handed on: ``'None part 1'`` at the root)."""
    torch.manual_seed(0)
    model = RepeatedParts().to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == ["input", "a", "crelu part 1", "b", "torch.cat part 1", "c"]


class NormBlock(nn.Module):
    """``side(h)`` (which makes ``h`` the act of ``lin``'s neurons), then a batch norm of ``relu(h)``, and the
    product of the normalised values with another layer's (a set that combines two)."""

    def __init__(self):
        super().__init__()
        self.lin, self.side, self.bn, self.other = nn.Linear(3, 4), nn.Linear(4, 1), nn.BatchNorm1d(4), nn.Linear(3, 4)

    def forward(self, x):
        h = self.lin(x)
        side = self.side(h)  # first: h is the act of lin's neurons when the norm reads relu(h)
        return side, torch.tanh(self.bn(torch.relu(h))) * torch.tanh(self.other(x))


class Norms(nn.Module):
    """The block, then ``F.batch_norm`` with running statistics at the model's root."""

    def __init__(self):
        super().__init__()
        self.block, self.head = NormBlock(), nn.Linear(4, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        side, product = self.block(x)
        return side + self.head(torch.tanh(F.batch_norm(product, self.mean, self.var, self.weight, self.bias)))


def test_batch_norms_and_a_product_of_two_sets_are_named_by_module_or_op():
    """Exact (eval mode); the norm's sets are ``'block.bn'`` in its module and ``'torch.nn.functional.batch_norm'``
    at the root, the set ``relu(h)`` takes before the norm ``'block.bn torch.nn.functional.batch_norm'``, the
    product's ``'block Tensor.mul'``. Kills ``rules_norm.batch_norm`` 157 (the copy named ``'block.bn None'``),
    177 (the norm's sets named ``None``) and 183 (by the op inside a module)."""
    torch.manual_seed(0)
    model = Norms().to(DTYPE).eval()
    inputs = torch.randn(5, 3, dtype=DTYPE)
    assert_exact_by_loop(model, inputs)
    assert origins(model, inputs) == ["input", "block.lin", "block.side", "block.bn torch.nn.functional.batch_norm",
                                      "block.bn", "block.other", "block Tensor.mul", "torch.nn.functional.batch_norm",
                                      "head"]


class JumpingMax(nn.Module):
    """JumpingKnowledge's max of two layers' values stacked along a new axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x):
        first = torch.tanh(self.a(x))
        return torch.stack([first, torch.tanh(self.b(first))], -1).amax(-1)


class JumpingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.jump, self.head = JumpingMax(), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.jump(x))


class MeanPooled(nn.Module):
    """A 1-D convolution, then the mean over its positions at the model's root (global average pooling)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(2, 3, 3, padding=1), nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2,)))


def test_a_stacked_max_and_a_global_mean_pooling_are_named_by_module_or_op():
    """Exact; the merged set of the stacked max is ``'jump Tensor.amax'``, the pooled channels at the root
    ``'Tensor.mean'``. Kills ``rules_elementwise.merge_stacked`` 93 (the merged set named ``'jump None'``)."""
    torch.manual_seed(0)
    stacked, inputs = JumpingHead().to(DTYPE), torch.randn(4, 3, dtype=DTYPE)
    assert_exact_by_loop(stacked, inputs)
    assert origins(stacked, inputs) == ["input", "jump.a", "jump.b", "jump Tensor.amax", "head"]
    pooled, signals = MeanPooled().to(DTYPE), torch.randn(4, 2, 6, dtype=DTYPE)
    assert_exact_by_loop(pooled, signals)
    assert origins(pooled, signals) == ["input", "conv", "Tensor.mean", "head"]
