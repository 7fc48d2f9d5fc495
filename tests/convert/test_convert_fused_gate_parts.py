"""A product of two parts of one affine output beside a third part (issue 31, branch mut47, group
``convert-elementwise``).

``ElementwiseRules.split_fused_gate`` cuts a fused affine output at the borders of the two parts a product reads
(``a * b`` of ``w(x).chunk(2)``), so the layout moves each ``a_i`` with its ``b_i`` and their product. It made no cut
where the two parts do not make up the whole set (``a, b, c = w(x).chunk(3)``): the set stayed one piece, which
``layout._flat_ranks`` then fixed (a slot holding ``a_i`` and ``b_i`` holds two of its neurons). Since the lift the
cut is made for any two disjoint contiguous parts, the rest of the set a piece of its own, as any contiguous partial
read makes one (``separate_part_read``); mutmut's ``split_fused_gate`` 24 (``and`` for the ``or`` before the size
check) claimed the same groups, runs elementwise 20-23. Each test is float64: per-sample gradients against
torch.func, sampled group elements checked against the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import exact, squared
from traced_models import assert_group_keeps_function

DTYPE = torch.float64

# ``a, b, c`` the three parts of ``w(x)`` (two features each); every form reads ``a * b``
FORMS = {
    "c unused": lambda self, a, b, c, h: self.out(a * b),
    "c added": lambda self, a, b, c, h: self.out(a * b + c),
    "c multiplied": lambda self, a, b, c, h: self.out(a * b * c),
    "b times c too": lambda self, a, b, c, h: self.out(a * b) + self.side(b * c),
    "a norm of all": lambda self, a, b, c, h: self.out(a * b) + self.side(F.layer_norm(h, (6,))[:, 4:]),
    "a sum of all": lambda self, a, b, c, h: self.out(a * b) * h.sum(-1, keepdim=True),
    "a read reordered": lambda self, a, b, c, h: self.out(b * a) + self.side(h[:, [1, 0]]),
    # the controls: as before the lift
    "c read by its own Linear": lambda self, a, b, c, h: self.out(a * b) + self.side(torch.tanh(c)),
    "all rolled": lambda self, a, b, c, h: self.out(a * b) + self.side(torch.roll(h, 1, -1)[:, :2]),
}
# a, b and the product free (8 nodes: a's, b's, the product's, and out's inputs tied to them) since the lift;
# "c added" and "c multiplied" free c with them (10); the controls: as before the lift
FREED = {"c unused": 8, "c added": 10, "c multiplied": 10, "b times c too": 10, "a norm of all": 14,
         "a sum of all": 8, "a read reordered": 8, "c read by its own Linear": 8, "all rolled": 0}


class ThreeParts(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form = FORMS[form]
        self.w, self.out = nn.Linear(3, 6), nn.Linear(2, 2)
        if form not in ("c unused", "c added", "c multiplied", "a sum of all"):
            self.side = nn.Linear(2, 2)

    def forward(self, x):
        h = self.w(x)
        a, b, c = h.chunk(3, -1)
        return self.form(self, a, b, c, h)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_product_of_two_of_three_parts_moves_each_pair_with_its_product(form):
    """Exact against torch.func; the number of free neurons (``perm_group >= 0``) written out, and six sampled group
    elements keep the function and map the graph to the permuted model's. Fails before the lift for the first seven
    forms (nothing of ``w`` moved: 0 free, or 4 for the norm of all)."""
    model = ThreeParts(form).to(DTYPE)
    inputs = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    graph = exact(model, inputs)
    assert int((graph.perm_group >= 0).sum()) == FREED[form]
    for seed in range(6):
        assert_group_keeps_function(model, inputs, None, squared, seed=seed)
