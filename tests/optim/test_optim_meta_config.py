"""``MetaTrainConfig``'s checks at their boundaries with their messages in full, and
``relative_clip_scale`` against its formula.

Written for the survivors of optim run 3 (``meta_config.py``, docs/mutation.md); each test's
docstring names the mutants it was checked against (run on each with ``MUTANT_UNDER_TEST=NAME``
in ``.mutation/optim/mutants/``: the test failed).
"""

from __future__ import annotations

import math
import re

import pytest

from gradgraph import GradGraphError
from gradgraph.optim.meta_config import ESTIMATORS, PAPER_PROTOCOL, MetaTrainConfig, relative_clip_scale
from gradgraph.optim.meta_loss import META_LOSSES


def whole(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


def test_an_unknown_meta_loss_or_estimator_is_refused_in_full():
    """Messages in full, naming the choices.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 21.
    """
    with pytest.raises(GradGraphError,
                       match=whole(f"MetaTrainConfig.meta_loss must be one of {META_LOSSES}, got 'nope'")):
        MetaTrainConfig(meta_loss="nope")
    with pytest.raises(GradGraphError, match=whole(f"MetaTrainConfig.estimator must be one of {ESTIMATORS}, got 'es'")):
        MetaTrainConfig(estimator="es")


@pytest.mark.parametrize("meta_loss", ["time-above-target", "first-passage"])
@pytest.mark.parametrize("target_loss", [None, 0.0, -1.0])
def test_a_target_meta_loss_needs_a_positive_target(meta_loss, target_loss):
    """A target meta-loss without ``target_loss > 0`` is refused (``0`` included); any positive
    target is accepted, and the paper's ``log-loss`` needs none.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 8.
    """
    message = f"MetaTrainConfig.meta_loss {meta_loss!r} needs target_loss > 0, got {target_loss}"
    with pytest.raises(GradGraphError, match=whole(message)):
        MetaTrainConfig(meta_loss=meta_loss, target_loss=target_loss)
    assert MetaTrainConfig(meta_loss=meta_loss, target_loss=1e-9).target_loss == 1e-9
    assert MetaTrainConfig(meta_loss="log-loss", target_loss=target_loss).target_loss == target_loss


@pytest.mark.parametrize("multiple", [0.0, -2.0, math.nan])
def test_a_relative_clip_must_be_positive(multiple):
    """``grad_clip_relative`` ``<= 0`` or NaN is refused (message in full); ``None`` and any
    positive multiple are accepted.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 14, 15, 16.
    """
    with pytest.raises(GradGraphError, match=whole(f"MetaTrainConfig.grad_clip_relative must be > 0, got {multiple}")):
        MetaTrainConfig(grad_clip_relative=multiple)
    assert MetaTrainConfig(grad_clip_relative=None).grad_clip_relative is None
    assert MetaTrainConfig(grad_clip_relative=1e-9).grad_clip_relative == 1e-9


def test_scalars_first_must_not_be_negative():
    """``scalars_first = -1`` is refused in full; ``0`` (off) and ``1`` are accepted.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 19.
    """
    with pytest.raises(GradGraphError, match=whole("MetaTrainConfig.scalars_first must be >= 0, got -1")):
        MetaTrainConfig(scalars_first=-1)
    assert MetaTrainConfig(scalars_first=0).scalars_first == 0
    assert MetaTrainConfig(scalars_first=1).scalars_first == 1


@pytest.mark.parametrize("particles, truncation, horizon", [(0, 2, 4), (2, 0, 4), (2, 5, 4), (-2, 2, 4), (2, -1, 4)])
def test_particles_truncation_and_horizon_are_checked_in_full(particles, truncation, horizon):
    """``num_particles >= 1``, ``truncation >= 1``, ``horizon >= truncation`` (with the TBPTT
    estimator, so the even-particles check is not what refuses), message in full.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 22, 23, 29,
    30, 31, 32.
    """
    message = ("MetaTrainConfig needs num_particles >= 1, truncation >= 1, horizon >= truncation; got "
               f"{particles}, {truncation}, {horizon}")
    with pytest.raises(GradGraphError, match=whole(message)):
        MetaTrainConfig(estimator="tbptt", num_particles=particles, truncation=truncation, horizon=horizon)


def test_the_smallest_run_is_accepted():
    """One particle (TBPTT), one step per truncation, a horizon of one truncation; two particles
    with PES.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 24, 25, 26,
    27, 28, 34.
    """
    config = MetaTrainConfig(estimator="tbptt", num_particles=1, truncation=1, horizon=1)
    assert (config.num_particles, config.truncation, config.horizon) == (1, 1, 1)
    config = MetaTrainConfig(estimator="pes", num_particles=2, truncation=3, horizon=3)
    assert (config.num_particles, config.truncation, config.horizon) == (2, 3, 3)


@pytest.mark.parametrize("particles", [1, 3, 7])
def test_pes_needs_an_even_number_of_particles_tbptt_does_not(particles):
    """An odd ``num_particles`` is refused for PES (message in full) and accepted for TBPTT.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``MetaTrainConfig.__post_init__`` 24, 25, 34,
    35, 36, 39.
    """
    message = f"PES needs an even number of particles (antithetic pairs), got {particles}"
    with pytest.raises(GradGraphError, match=whole(message)):
        MetaTrainConfig(estimator="pes", num_particles=particles, truncation=2, horizon=4)
    config = MetaTrainConfig(estimator="tbptt", num_particles=particles, truncation=2, horizon=4)
    assert config.num_particles == particles


def test_the_paper_protocol_with_overrides():
    """``paper()`` is :data:`PAPER_PROTOCOL` (checked by value) and an override wins."""
    config = MetaTrainConfig.paper(seed=3)
    for key, value in PAPER_PROTOCOL.items():
        assert getattr(config, key) == value, key
    assert config.seed == 3 and config.num_particles == 32
    assert MetaTrainConfig.paper(num_particles=4).num_particles == 4


@pytest.mark.parametrize("norm, mean_norm, multiple, expected", [
    (5.0, None, 2.0, 1.0),            # no running mean yet: no clip
    (math.inf, 1.0, 2.0, 1.0),        # a non-finite norm is left to the caller's check
    (math.nan, 1.0, 2.0, 1.0),
    (2.0, 1.0, 2.0, 1.0),             # exactly at the limit: untouched
    (1.0, 1.0, 2.0, 1.0),
    (8.0, 1.0, 2.0, 0.25),            # 2 · 1 / 8
    (9.0, 1.5, 3.0, 0.5),             # 3 · 1.5 / 9
    (0.0, 0.0, 3.0, 1.0),             # every step so far zero (equal PES losses): no 0 / 0
])
def test_relative_clip_scale_is_the_formula(norm, mean_norm, multiple, expected):
    """``min(1, multiple · mean_norm / norm)``, 1 before the first step, for a non-finite norm, and
    for a zero norm after zero steps (``relative_clip_scale`` 6, ``norm < multiple · mean_norm``, gave
    the same 1 at the limit, but raised ``ZeroDivisionError`` on ``0 / 0``).
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``relative_clip_scale`` 6.
    """
    assert relative_clip_scale(norm, mean_norm, multiple) == expected
