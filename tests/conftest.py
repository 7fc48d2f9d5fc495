"""Suite-wide settings."""

from __future__ import annotations

import os

import pytest
import torch

# `pytest -n 2` runs two workers on a 2-core machine; letting each also start one torch
# thread per core oversubscribes the CPU and makes every test slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def empty_plan_cache():
    """The converter's plan cache emptied before and after the test (first conversions trace)."""
    from gradgraph.convert.plan import PLAN_CACHE

    PLAN_CACHE.clear()
    yield
    PLAN_CACHE.clear()


def pytest_sessionstart(session):
    """Under mutation testing (``./gg mutate``), forget the converter's cached plans first.

    mutmut runs each mutant's tests in a process forked from one that already ran the clean
    tests; a plan cached there would let a mutant of the planning code go unseen.
    """
    if os.environ.get("MUTANT_UNDER_TEST"):
        from gradgraph.convert.plan import clear_structure_cache

        clear_structure_cache()
