"""``first_passage`` (the running minimum) keeps the losses' dtype whatever the carried survival's.

Written for the one survivor of ``first_passage``'s re-run after it became a running minimum (issue 31;
docs/mutation.md, run optim 5), checked with ``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import math

import torch

from gradgraph.optim.meta_loss import first_passage


def test_a_float64_survival_carried_into_float32_losses_gives_float32_values_of_the_formula():
    """``S_t = min(S_0, min_{s<=t} σ((log L_s − log L*) / τ))`` written out in float64 from the
    float32 losses and the survival rounded to float32 (what the losses' dtype holds): the meta-loss and
    the new survival are float32 and equal to it to float32's precision.

    Kills ``first_passage`` 28 (``survival.to(None)``: the survival not cast, so ``torch.minimum``
    promotes the whole curve to float64)."""
    generator = torch.Generator().manual_seed(0)
    losses = torch.exp(torch.randn(5, 3, generator=generator, dtype=torch.float64)).float()
    survival = torch.tensor([1.0, 0.4, 0.123456789012345], dtype=torch.float64)
    target, temperature = 1.0, 0.25
    value, last = first_passage(losses, target, temperature, survival)
    assert value.dtype == torch.float32 and last.dtype == torch.float32

    above = torch.sigmoid((torch.log(losses.double()) - math.log(target)) / temperature)  # [T, P]
    curve = torch.empty_like(above)
    previous = survival.float().double()
    for step in range(above.shape[0]):
        previous = torch.minimum(previous, above[step])
        curve[step] = previous
    torch.testing.assert_close(value, curve.mean(dim=0).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(last, curve[-1].float(), rtol=1e-6, atol=1e-7)
