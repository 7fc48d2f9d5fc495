"""Where ``convert/trace/run.py``'s warning about loops that do not fold points: the user's call of ``to_graph``.

Not in ``gg``'s ``convert-run`` list: a warning's ``stacklevel`` counts the frames above it, and under mutmut each
call of a mutated function adds mutmut's trampoline frame, so this test fails on its clean run. The mutants it is
written for (``_unfolded`` 6, 13: the stack level dropped or one more) were checked by applying each to a copy of
``src`` by hand (docs/mutation.md, runs run 1-3).
"""

from __future__ import annotations

import os
import warnings

import torch

import gradgraph
from convert_values import squared
from test_convert_run_values import DTYPE, RepeatedInput, _sequences


def test_the_warning_that_a_loop_does_not_fold_points_at_the_call_of_to_graph():
    torch.manual_seed(2)
    model = RepeatedInput().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradgraph.to_graph(model, _sequences(), None, squared)  # THE CALL
    [warning] = [w for w in caught if "does not fold" in str(w.message)]
    with open(__file__) as source:
        line = next(number for number, text in enumerate(source, 1) if text.rstrip().endswith("# THE CALL"))
    assert (os.path.basename(warning.filename), warning.lineno) == ("test_convert_run_locations.py", line)
