"""Cost of converting a recurrent classifier, folded over time and unrolled.

Side by side in one run (interleaved rounds, medians), for the classifier of
docs/recurrent.md (``nn.LSTM``, 2 layers, bidirectional, ``H = 32``, 34,690 parameters, read
at its last step by a linear head; cross-entropy per datapoint):

* ``floor``              — one forward + backward of the summed loss (the fused LSTM);
* ``to_graph folded``    — :func:`gradgraph.to_graph` with its plan cached (``fold_time=True``, default);
* ``to_graph unrolled``  — the same with ``fold_time=False``.

The first conversion of each layout (no plan cached) is timed once. Ratios are to ``floor``.

Usage::

    python benchmarks/recurrent.py                   # LSTM, b = 8, T = 16, float32, 1 thread
    python benchmarks/recurrent.py --cell GRU --steps 64
    python benchmarks/recurrent.py --quick           # tiny, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import format_table, interleaved_median_times, set_threads

import gradgraph


class Classifier(nn.Module):
    def __init__(self, cell: str, hidden: int, layers: int) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(3, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="LSTM", choices=["RNN", "GRU", "LSTM"])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps, args.rounds = 8, 4, 2
    set_threads(args.threads)
    torch.manual_seed(0)
    model = Classifier(args.cell, args.hidden, args.layers).eval()
    x = torch.randn(args.batch, args.steps, 3)
    y = torch.randint(0, 4, (args.batch,))

    def loss_fn(out, t):
        return F.cross_entropy(out, t, reduction="none")

    def floor() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).sum().backward()

    first = {}
    graphs = {}
    for name, fold in (("folded", True), ("unrolled", False)):
        gradgraph.convert.clear_structure_cache()
        start = time.perf_counter()
        graphs[name] = gradgraph.to_graph(model, x, y, loss_fn, fold_time=fold)
        first[name] = time.perf_counter() - start
    times = interleaved_median_times({
        "floor": floor,
        "to_graph folded": lambda: gradgraph.to_graph(model, x, y, loss_fn, fold_time=True),
        "to_graph unrolled": lambda: gradgraph.to_graph(model, x, y, loss_fn, fold_time=False),
    }, rounds=args.rounds)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.cell}, {args.layers} layers, bidirectional, H = {args.hidden} ({parameters:,} parameters), "
          f"b = {args.batch}, T = {args.steps}, float32, {args.threads} thread(s)")
    rows = [["floor (forward + backward)", f"{times['floor'] * 1e3:.2f} ms", "1.0x", "", "", ""]]
    for name in ("folded", "unrolled"):
        graph = graphs[name]
        cached = times[f"to_graph {name}"]
        rows.append([f"to_graph {name}", f"{cached * 1e3:.2f} ms", f"{cached / times['floor']:.1f}x",
                     f"{first[name]:.2f} s", f"{graph.num_nodes:,} / {graph.num_edges:,}", f"{graph.num_components}"])
    print(format_table(["", "cached", "ratio", "first", "nodes / edges", "B"], rows))


if __name__ == "__main__":
    main()
