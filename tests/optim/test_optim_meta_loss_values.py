"""The meta-losses' values against their formulas written out, their default temperature, the
``"first-passage"`` route of ``meta_loss``, and their messages in full.

Written for the 27 survivors of optim run 1 (``meta_loss.py``, docs/mutation.md); each test's
docstring names the mutants it was checked against (run on each with ``MUTANT_UNDER_TEST=NAME``
in ``.mutation/optim/mutants/``: the test failed).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.optim.meta_loss import first_passage, mean_log_loss, meta_loss, time_above_target

DTYPE = torch.float64


def losses_of(steps: int, particles: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(steps * 10 + particles)
    return torch.exp(torch.randn(steps, particles, dtype=DTYPE, generator=generator))


def smooth_above(losses: torch.Tensor, target: float, temperature: float) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-(torch.log(losses) - math.log(target)) / temperature))


def test_the_default_temperature_is_a_quarter():
    """``τ = 0.25`` when not given, in all three functions. Checked against
    ``x_time_above_target__mutmut_1``, ``x_first_passage__mutmut_1``, ``x_meta_loss__mutmut_1``
    (the default ``1.25``)."""
    losses, target = losses_of(5, 3), 1.1
    above = smooth_above(losses, target, 0.25)
    torch.testing.assert_close(time_above_target(losses, target), above.mean(dim=0), atol=1e-14, rtol=0)
    torch.testing.assert_close(meta_loss("time-above-target", losses, target), above.mean(dim=0), atol=1e-14, rtol=0)
    curve = torch.cummin(above, dim=0).values
    value, last = first_passage(losses, target)
    torch.testing.assert_close(value, curve.mean(dim=0), atol=1e-14, rtol=0)
    torch.testing.assert_close(last, curve[-1], atol=1e-14, rtol=0)


def test_meta_loss_first_passage_is_first_passage_with_its_arguments():
    """``meta_loss("first-passage", ...)`` passes the losses, target, temperature and carried
    survival on and returns the mean, not the carried state; one step (``T = 1``) with no
    survival starts from ones. Checked against ``x_meta_loss__mutmut_20``-``30`` (the name
    misspelt, an argument dropped or ``None``, ``[1]`` returned) and ``x_first_passage__mutmut_16``
    (the ones made like ``above[1]``: an ``IndexError`` for one step)."""
    losses, target, temperature = losses_of(4, 3), 0.9, 0.4
    survival = torch.tensor([1.0, 0.5, 0.25], dtype=DTYPE)
    curve = torch.minimum(survival[None], torch.cummin(smooth_above(losses, target, temperature), dim=0).values)
    got = meta_loss("first-passage", losses, target, temperature, survival)
    torch.testing.assert_close(got, curve.mean(dim=0), atol=1e-14, rtol=0)
    one_step = losses_of(1, 3)
    value, last = first_passage(one_step, target, temperature)
    torch.testing.assert_close(value, smooth_above(one_step, target, temperature)[0], atol=1e-14, rtol=0)
    torch.testing.assert_close(last, value, atol=0, rtol=0)


def test_the_meta_losses_name_themselves_in_their_messages():
    """Checked against ``x_mean_log_loss__mutmut_2``, ``5``, ``6``, ``x_time_above_target__mutmut_6``,
    ``11``, ``12``, ``x__above__mutmut_2``, ``x_first_passage__mutmut_6``, ``11``, ``12`` (the
    name passed down dropped or changed) and ``x_first_passage__mutmut_21`` (the expected shape
    read from ``shape[2:]``)."""
    flat = torch.ones(3, dtype=DTYPE)
    for name, call in (("mean_log_loss", lambda: mean_log_loss(flat)),
                       ("time_above_target", lambda: time_above_target(flat, 1.0)),
                       ("first_passage", lambda: first_passage(flat, 1.0))):
        message = f"{name}: losses must be [steps, particles], got shape (3,)"
        with pytest.raises(GradGraphError, match="^" + re.escape(message) + "$"):
            call()
    message = "first_passage: survival must have shape [3], got [2]"
    with pytest.raises(GradGraphError, match="^" + re.escape(message) + "$"):
        first_passage(losses_of(4, 3), 1.0, survival=torch.ones(2, dtype=DTYPE))
