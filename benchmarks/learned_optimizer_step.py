"""Time per step of the learned optimizer on the digits task, against Adam, in one run.

Methods (interleaved rounds, medians; see ``_common.py``), each one training step of the
digits MLP 64→32→10 on a batch of 128 with the shipped ``digits-mlp`` meta-model:

* ``adam``                      — ``torch.optim.Adam``: forward, backward, step.
* ``learned, per-step structure`` — ``LearnedOptimizer`` collating the graph into a PyG
  ``Batch`` and grouping its weight blocks afresh at every step (what ``step`` did before
  :class:`gradgraph.optim.batching.ArchitectureCache`).
* ``learned``                   — ``LearnedOptimizer`` as shipped (structure cached per architecture).

Both learned variants give bit-identical parameters (tests/optim/test_optim.py); this measures
the time only.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer_step.py            # 15 rounds
    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer_step.py --rounds 3 # quick
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch_geometric.data import Batch

from _common import format_table, interleaved_median_times, set_threads


class _PerStepStructure:
    """The pre-cache behaviour: collate and group weight blocks at every step."""

    def batch(self, graphs):
        return Batch.from_data_list(graphs)

    def mean_grad(self, graph):
        return graph.mean_grad()


def _stepper(kind: str) -> Callable[[], None]:
    from gradgraph.optim import LearnedOptimizer, load_pretrained
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    task = get_task("digits", "cpu").task
    model = task.make_model(0)
    generator = torch.Generator().manual_seed(10_000)
    batches = [task.sample_batch(generator) for _ in range(64)]
    position = [0]
    if kind == "adam":
        adam = torch.optim.Adam(model.parameters(), lr=0.0464)
    else:
        learned = LearnedOptimizer(model, load_pretrained("digits-mlp"))
        if kind == "per-step":
            learned._architecture = _PerStepStructure()

    def step() -> None:
        inputs, targets = batches[position[0] % len(batches)]
        position[0] += 1
        if kind == "adam":
            adam.zero_grad(set_to_none=True)
            task.loss_fn(model(inputs), targets).mean().backward()
            adam.step()
        else:
            learned.step(lambda: task.loss_fn(model(inputs), targets))

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    set_threads(1)
    methods = {"adam": _stepper("adam"), "learned, per-step structure": _stepper("per-step"),
               "learned": _stepper("cached")}
    times = interleaved_median_times(methods, rounds=args.rounds, min_seconds=0.2)
    rows = [[name, f"{seconds * 1e3:.2f}", f"{seconds / times['adam']:.1f}x"] for name, seconds in times.items()]
    print(format_table(["method", "ms / step (median)", "vs adam"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
