"""Helpers of the per-function value tests of ``convert/`` (``tests/convert/test_convert_*_values.py``):
a model's output as its own loss, its conversion checked exact, and a refusal matched in full."""

from __future__ import annotations

import re

import pytest
import torch

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from traced_models import assert_exact_per_sample_grads


def squared(output: torch.Tensor, _targets) -> torch.Tensor:
    """``[b]``: the squared norm of each datapoint's output (output mode without a target)."""
    return output.pow(2).flatten(1).sum(1)


def exact(model, inputs, **options):
    """Convert afresh (no cached plan) and check every per-sample gradient against torch.func; the graph."""
    gradgraph.convert.clear_structure_cache()
    return assert_exact_per_sample_grads(model, inputs, None, squared, **options)


def refused(model, inputs, message, **options):
    """``to_graph`` refuses with exactly ``message`` after the location (``file:line in function``)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + re.escape(message) + "$"):
        gradgraph.to_graph(model, inputs, None, squared, **options)
