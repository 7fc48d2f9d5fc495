"""``PlanCache``'s bookkeeping on stand-in plans (only ``nbytes`` and ``intact()`` are read): counts start at
zero, storing a key again makes it the most recently used, and a plan or a total exactly at the byte budget
is kept; and a padded embedding's plan, traced and replayed. Each test names the mutants of
``gradgraph.convert.plan`` it was checked to kill
(``MUTANT_UNDER_TEST`` in ``.mutation/convert-plan/mutants/``, run convert 3)."""

from __future__ import annotations

import torch

from gradgraph.convert.plan import PlanCache


class _Plan:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def intact(self) -> bool:
        return True


def test_the_counts_start_at_zero_and_count_each_lookup_once():
    """Kills ``PlanCache.__init__`` 7, 9 (a count starting at 1)."""
    cache = PlanCache()
    assert (cache.hits, cache.misses) == (0, 0)
    assert cache.get("a") is None
    cache.put("a", _Plan(10))
    assert cache.get("a") is not None
    assert (cache.hits, cache.misses) == (1, 1)


def test_storing_a_key_again_makes_it_the_most_recently_used():
    """``a`` stored again after ``b``: the next eviction takes ``b``. Kills ``PlanCache.put`` 1 (the old
    entry not removed first, so ``a`` kept its place and was evicted)."""
    cache = PlanCache(max_entries=2, max_bytes=10**6)
    first, second, again, third = _Plan(1), _Plan(1), _Plan(1), _Plan(1)
    cache.put("a", first)
    cache.put("b", second)
    cache.put("a", again)
    cache.put("c", third)
    assert cache.get("b") is None and cache.get("a") is again and cache.get("c") is third


def test_a_plan_or_a_total_exactly_at_the_byte_budget_is_kept():
    """Kills ``PlanCache.put`` 4 (a plan of exactly the budget refused) and 8 (a total of exactly the budget
    evicted)."""
    cache = PlanCache(max_entries=8, max_bytes=100)
    whole = _Plan(100)
    cache.put("whole", whole)
    assert cache.get("whole") is whole and cache.nbytes == 100
    halves = PlanCache(max_entries=8, max_bytes=100)
    halves.put("x", _Plan(50))
    halves.put("y", _Plan(50))
    assert len(halves) == 2 and halves.nbytes == 100
    halves.put("z", _Plan(1))  # over the budget: the least recently used goes
    assert halves.get("x") is None and len(halves) == 2 and halves.nbytes == 51


class _PaddedBag(torch.nn.Module):
    """Token ids ``[b, T]`` → ``Embedding(padding_idx=0)`` → tanh → mean over tokens → a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4, padding_idx=0)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(dim=1))


def test_a_padding_row_gets_no_gradient_on_a_fresh_trace_and_on_a_replay():
    """Inputs holding the padding id 0: torch gives its row no gradient, so must the graph (the plan's
    record leaves the padded tokens out). Checked on the trace and on the cached plan's replay. It does
    not kill ``plan_records`` 50-53 (checked: this embedding's records take another path than the
    ``op is None`` one those mutants change; they stay listed as not triaged)."""
    import torch.nn.functional as F
    from traced_models import assert_exact_per_sample_grads

    torch.manual_seed(0)
    model = _PaddedBag().double()
    ids = torch.tensor([[0, 3, 5, 0], [2, 0, 0, 6], [1, 4, 0, 3]])
    targets = torch.tensor([0, 2, 1])

    def loss(output, target):
        return F.cross_entropy(output, target, reduction="none")

    for _ in range(2):  # a fresh trace, then a replay of its plan
        graph = assert_exact_per_sample_grads(model, ids, targets, loss)
        assert float(graph.per_sample_grads()["embed.weight"][:, 0].abs().max()) == 0.0
