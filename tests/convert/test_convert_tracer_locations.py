"""Where ``convert/trace/tracer.py``'s refusals say a value was made: the user's file, line and function.

Not in ``gg``'s ``convert-tracer`` list: under mutmut every location is the trampoline's frame (mutmut's
``trampoline.py``, outside torch and gradgraph), so these tests fail on its clean run. The mutants they are
written for (named in each docstring) were checked by applying each to a copy of ``src`` by hand
(docs/mutation.md, run tracer 1).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from convert_values import squared

DTYPE = torch.float64

REFUSAL = ("test_convert_tracer_locations.py:{made} in Inner.forward (module 'inner'): torch.cumsum: gradgraph has no "
           "rule for this op, and its result reaches {what} at test_convert_tracer_locations.py:{met} in "
           "OpaqueThrough.forward{at}. Write it with supported ops, register it with "
           "gradgraph.convert.register_elementwise if it is elementwise, or register a converter for the whole module")


class Inner(nn.Module):
    def forward(self, h):
        return torch.cumsum(h, -1)  # MADE


class OpaqueThrough(nn.Module):
    """A cumulative sum (no rule) in module ``inner``, a Tanh module after it, then a Linear or a scale."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.lin, self.inner, self.act, self.out = nn.Linear(3, 2), Inner(), nn.Tanh(), nn.Linear(2, 2)
        self.scale, self.scaled = nn.Parameter(torch.randn(2, dtype=DTYPE)), scaled

    def forward(self, x):
        h = self.act(self.inner(self.lin(x)))
        return h * self.scale if self.scaled else self.out(h)  # MET


def _line(marker: str) -> int:
    lines = open(__file__).read().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.endswith(f"# {marker}"))


@pytest.mark.parametrize("scaled, what, at", [
    (False, "torch.nn.functional.linear with the parameter 'out.weight'", " (module 'out')"),
    (True, "Tensor.mul with the parameter 'scale'", ""),
], ids=["linear", "scale"])
def test_a_value_without_a_rule_is_refused_naming_the_line_and_module_that_made_it(scaled, what, at):
    """The value made by ``torch.cumsum`` in ``Inner.forward`` goes through a Tanh module (whose op runs in torch's
    file, called from ``OpaqueThrough.forward``) before it meets a parameter: the refusal names the cumsum's line and
    module, and the line where it met the parameter. Kills dispatch 52, 58 (the opaque value's location not carried
    through the Tanh: the Tanh's caller named instead)."""
    gradgraph.convert.clear_structure_cache()
    message = REFUSAL.format(made=_line("MADE"), met=_line("MET"), what=what, at=at)
    with pytest.raises(UnsupportedOperationError, match="^" + re.escape(message) + "$"):
        gradgraph.to_graph(OpaqueThrough(scaled).to(DTYPE), torch.randn(4, 3, dtype=DTYPE), None, squared)
