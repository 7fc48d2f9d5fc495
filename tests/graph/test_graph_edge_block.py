"""``_edge_block``, the block finder's last step, against the edges it is given: whichever way it
reads a call site's edges (a dense table from whole node ranges, a dense table from a sort, or an
edge list), the ``(row, column, position)`` triples it returns are the input's, one for one — for
node numbers with gaps, ranges that do not start at 0 and parallel edges, which converted graphs
rarely have and a renumbered or hand-made ``GradGraph`` may. And ``per_sample_grads`` of a graph
whose node numbers are permuted are those of the graph as converted.

Written for the survivors of graph run 11 (docs/mutation.md: ``_edge_block`` after its row-major
fast path); each test's docstring names the mutants it was checked against (run on each with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/graph/mutants/``: the test failed).
"""

from __future__ import annotations

import itertools

import torch
from strategies import renumbered
from torch import nn

import gradgraph
from gradgraph.graph import _edge_block

DTYPE = torch.float64


def _triples(src: torch.Tensor, dst: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int, int]]:
    return sorted(zip(dst.tolist(), src.tolist(), positions.tolist()))


def _returned_triples(block) -> list[tuple[int, int, int]]:
    """The ``(row node, column node, position)`` triples a block stands for, whichever way it was read."""
    how, rows, cols, table, _ = block
    if how == "dense":
        assert table.shape == (len(rows), len(cols))
        return sorted((int(rows[i]), int(cols[j]), int(table[i, j]))
                      for i in range(len(rows)) for j in range(len(cols)))
    assert how == "edges"
    return _triples(cols, rows, table)


# (sources, destinations, edges as (source, destination) pairs): node ranges with gaps, ranges away
# from 0 and parallel edges, each chosen so that one wrong count of the whole-range test (mutants 5-11)
# sends it down the row-major path with a table shape that the edges do not fill
_CASES = {
    "two edges over a 4 x 2 range": [(0, 10), (3, 11)],  # 5: 4 / 2 == 2 edges
    "all pairs of sources 0, 3 and destinations 10, 11": [(s, d) for d in (10, 11) for s in (0, 3)],  # 6: (4 - 2) * 2
    "all pairs of sources 0, 1 and destinations 10, 13": [(s, d) for d in (10, 13) for s in (0, 1)],  # 9: 2 * (4 - 2)
    "all pairs of sources 1, 2 and destinations 10, 11, twice": [(s, d) for d in (10, 11) for s in (1, 2)] * 2,  # 7
    "all pairs of sources 0, 1 and destinations 1, 2, twice": [(s, d) for d in (1, 2) for s in (0, 1)] * 2,  # 10
    "all pairs of sources 0, 1 and destinations 10, 11, two of them twice":  # 8, 11: (2 + 1) * 2 == 6 edges
        [(s, d) for d in (10, 11) for s in (0, 1)] + [(0, 10), (1, 11)],
}


def test_an_edge_block_stands_for_exactly_the_edges_it_was_given():
    """Each case's triples come back one for one (and, without parallel edges, a whole bipartite set
    of at least two rows and columns is a dense table). Checked against ``x__edge_block__mutmut_5``
    to ``11`` (the whole-range test ``(max - min + 1)`` products miscounted: the row-major path then
    reshaped the edges to a table shape they do not fill, a ``RuntimeError`` on a valid graph)."""
    for label, pairs in _CASES.items():
        src = torch.tensor([s for s, _ in pairs])
        dst = torch.tensor([d for _, d in pairs])
        for order in (torch.arange(len(pairs)), torch.arange(len(pairs)).flip(0)):
            positions = 7 + torch.arange(len(pairs))[order]
            block = _edge_block(src[order], dst[order], positions)
            assert _returned_triples(block) == _triples(src[order], dst[order], positions), label
            complete = len(set(pairs)) == len(pairs) == len(set(src.tolist())) * len(set(dst.tolist()))
            assert (block[0] == "dense") == complete, label


def test_random_edge_blocks_stand_for_exactly_their_edges():
    """Random call sites: up to four sources and destinations drawn with gaps from ranges that start
    anywhere, all pairs or some, some twice, in random order, some positions ``-1`` (not a parameter
    entry): the triples come back one for one. Checked against ``x__edge_block__mutmut_6``, ``9`` and
    ``11`` (as above; the other miscounts need the exact gaps or parallel edges of the cases above)."""
    generator = torch.Generator().manual_seed(0)

    def draw(low: int, count: int) -> list[int]:
        return sorted((low + torch.randperm(7, generator=generator)[:count]).tolist())

    for _ in range(400):
        width, height = (int(torch.randint(1, 5, (1,), generator=generator)) for _ in range(2))
        sources = draw(int(torch.randint(0, 4, (1,), generator=generator)), width)
        destinations = draw(int(torch.randint(0, 4, (1,), generator=generator)), height)
        pairs = [(s, d) for d in destinations for s in sources]
        kind = int(torch.randint(0, 3, (1,), generator=generator))
        if kind == 1:  # some of the pairs
            keep = torch.rand(len(pairs), generator=generator) < 0.6
            pairs = [pair for pair, kept in zip(pairs, keep.tolist()) if kept] or pairs[:1]
        elif kind == 2:  # some pairs twice
            twice = torch.randint(0, len(pairs), (int(torch.randint(1, 4, (1,), generator=generator)),),
                                  generator=generator)
            pairs = pairs + [pairs[i] for i in twice.tolist()]
        order = torch.randperm(len(pairs), generator=generator)
        src = torch.tensor([s for s, _ in pairs])[order]
        dst = torch.tensor([d for _, d in pairs])[order]
        positions = torch.randperm(len(pairs), generator=generator)
        positions[torch.rand(len(pairs), generator=generator) < 0.1] = -1
        assert _returned_triples(_edge_block(src, dst, positions)) == _triples(src, dst, positions), pairs


def test_per_sample_grads_of_an_mlp_under_every_node_numbering_are_those_of_the_converted_graph():
    """``Linear(2, 2) -> ReLU -> Linear(2, 2)`` converted with a squared error (6 nodes), then renumbered by every
    permutation of its nodes: each layer's sources and destinations become ranges with gaps, or
    whole ranges in another order, and ``per_sample_grads`` are the converted graph's (itself tested
    against torch.func) to 1e-12. Checked against ``x__edge_block__mutmut_6`` and ``9`` (a
    ``RuntimeError`` for the numberings whose gaps fit the miscounted product)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).to(DTYPE)
    with torch.no_grad():
        model[0].bias.fill_(1.0)  # the ReLU active for every datapoint
    inputs, targets = torch.randn(3, 2, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    graph = gradgraph.to_graph(model, inputs, targets, lambda out, y: ((out - y) ** 2).sum(1))
    assert graph.num_nodes == 6
    expected = graph.per_sample_grads()
    for node_order in itertools.permutations(range(6)):
        ours = renumbered(graph, node_order=torch.tensor(node_order)).per_sample_grads()
        assert set(ours) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=f"{name}, {node_order}")
