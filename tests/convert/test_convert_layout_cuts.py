"""`convert.layout._tied_cuts`: the cuts of the trace carried across ties, as a walk.

The walk replaced a loop of rounds over every tie (``torch.isin`` per tie and round: 24 s of a
tiny MobileNetV2's 53 s first conversion); it must give the same closure. Compared here with
that definition on random ties, including chains that need many hops (the rounds' worst case).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradgraph.convert.layout import _tied_cuts


def closure_by_rounds(cuts: list[int], ties: list[tuple[torch.Tensor, torch.Tensor]]) -> set[int]:
    """The definition: repeat until nothing changes, every tie both ways."""
    result = set(cuts)
    changed = bool(result)
    while changed:
        changed = False
        known = torch.tensor(sorted(result))
        for a, b in ties:
            for src, dst in ((a, b), (b, a)):
                found = set(dst[torch.isin(src, known)].tolist()) - result
                if found:
                    result |= found
                    changed = True
    return result


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40).flatmap(lambda nodes: st.tuples(
    st.just(nodes),
    st.lists(st.integers(0, nodes - 1), max_size=4),
    st.lists(st.lists(st.tuples(st.integers(0, nodes - 1), st.integers(0, nodes - 1)), min_size=1, max_size=6),
             max_size=6))))
def test_the_walk_gives_the_closure_of_the_rounds(case):
    _, cuts, tie_lists = case
    ties = [(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])) for pairs in tie_lists]
    assert _tied_cuts(SimpleNamespace(cuts=cuts, ties=ties)) == closure_by_rounds(cuts, ties)


def test_a_chain_of_ties_is_followed_to_its_end():
    ties = [(torch.tensor([node]), torch.tensor([node + 1])) for node in range(30)]
    assert _tied_cuts(SimpleNamespace(cuts=[0], ties=ties)) == set(range(31))
    assert _tied_cuts(SimpleNamespace(cuts=[], ties=ties)) == set()
