"""A softmax over *part* of a neuron set: the inferred group must keep the function.

``l2(cat([h[..., :3].softmax(-1), h[..., 3:]]))``: the softmax mixes neurons 0..2 of ``h``
and no others, so a permutation of ``h`` may move those three among themselves and the
rest among themselves, never one across. The softmax rule cuts the set there
(``separate_mixed_part``); without the cut the sampled permutation moves neurons across
and the model's output changes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from strategies import assert_same_graph
from torch import nn

import gradgraph
from gradgraph.symmetry import permute_model, permute_nodes, random_node_permutation

DTYPE = torch.float64


class PartialSoftmax(nn.Module):
    """``l2(cat([softmax(h[..., :split]), h[..., split:]]))`` with ``h = tanh(l1(x))``; a
    ``[b, d_in]`` input gives a ``[b, d_out]`` output."""

    def __init__(self, d_in: int = 4, hidden: int = 7, split: int = 3, d_out: int = 3, tokens: bool = False):
        super().__init__()
        self.l1, self.l2, self.split, self.tokens = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), split, tokens

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        mixed = torch.cat([h[..., : self.split].softmax(-1), h[..., self.split:]], dim=-1)
        out = self.l2(mixed)
        return out.mean(1) if self.tokens else out


def squared_error(output, targets):
    return (output - targets).pow(2).sum(-1)


@pytest.mark.parametrize("tokens", [False, True], ids=["datapoints", "tokens"])
@pytest.mark.parametrize("split", [2, 3, 5])
def test_partial_softmax_group_keeps_the_function(split, tokens):
    """Several sampled group elements keep the output exactly and map graph to graph.

    Checked to fail: with ``self.separate_mixed_part(meta)`` removed from the softmax rule
    (``convert/trace/rules_elementwise.py``) the sampled permutations move neurons across
    the softmax's boundary and the output changes (by 0.15 to 0.57 here; all seven cases
    fail).
    """
    torch.manual_seed(split)
    model = PartialSoftmax(split=split, tokens=tokens).to(DTYPE)
    shape = (5, 3, 4) if tokens else (5, 4)
    inputs, targets = torch.randn(*shape, dtype=DTYPE), torch.randn(5, 3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)
    moved_somewhere = False
    for seed in range(6):
        perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
        moved_somewhere |= bool((perm != torch.arange(graph.num_nodes)).any())
        permuted = permute_model(model, graph, perm)
        with torch.no_grad():
            torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-12, rtol=0)
        assert_same_graph(gradgraph.to_graph(permuted, inputs, targets, squared_error),
                          permute_nodes(graph, perm), atol=1e-10)
    # the group is not trivial: the two pieces of h (where larger than one neuron) still permute
    assert moved_somewhere


def test_partial_softmax_group_splits_the_set_at_the_boundary():
    """Where a whole piece permutes, it is exactly neurons 0..2 of ``h`` or 3..6, never a mix.

    The hidden layer's orbits under many sampled permutations are {0,1,2} and {3,4,5,6}: a
    cut at the wrong place (or none) joins them. Checked to fail with the cut removed.
    """
    torch.manual_seed(0)
    model = PartialSoftmax().to(DTYPE)
    inputs, targets = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, 3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, squared_error)
    of_l1 = torch.nonzero(graph.node_param == graph.param_names.index("l1.bias")).flatten()
    hidden = of_l1[graph.node_param_pos[of_l1].argsort()]  # h's neurons in feature order
    assert hidden.numel() == 7, hidden
    orbit_of = {int(n): {int(n)} for n in hidden}
    for seed in range(40):
        perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
        for n in hidden:
            orbit_of[int(n)].add(int(perm[n]))
    first, rest = set(hidden[:3].tolist()), set(hidden[3:].tolist())
    for n in hidden.tolist():
        assert orbit_of[n] == (first if n in first else rest), (n, orbit_of[n])


class _StridedJoin(nn.Module):
    """``cat([h1, norm(gelu(h1))])[:, ::2]`` into the head: the head reads features 0 and 2 of ``h1`` and
    feature 1 of the norm's output, two sets the norm ties together (the fuzzer's program
    ``(2, [linear 3, gelu, norm, cat(1, 3), stride], 0)``, plus a branch that reads the norm whole)."""

    def __init__(self, dead_branch: bool) -> None:
        super().__init__()
        self.first, self.norm, self.head = nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 3)
        self.branch = nn.Linear(3, 1) if dead_branch else None

    def forward(self, x):
        h1 = self.first(x)
        h3 = self.norm(F.gelu(h1))
        if self.branch is not None:
            self.branch(h3)  # read whole, then unused
        return self.head(torch.cat([h1, h3], dim=-1)[:, ::2])


@pytest.mark.parametrize("dead_branch", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_a_strided_read_across_tied_sets_keeps_the_function(dead_branch, seed):
    """The head's copy of ``[h1_0, h1_2, h3_1]`` is tied to its sources; reading part of each set there
    must cut or pin them. Failed before (the fuzzer found it): the copy was tied without the partial
    read, the group cycled ``h1`` and no permuted graph existed ("maps an edge onto no edge")."""
    from traced_models import assert_group_keeps_function

    torch.manual_seed(seed)
    model = _StridedJoin(dead_branch).double()
    inputs, targets = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_group_keeps_function(model, inputs, targets, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                seed=seed)
