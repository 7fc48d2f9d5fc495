"""The scatter backend: edge-to-node aggregation ``[E, B, C] -> [N, B, C]`` with and without torch-scatter.

GradMetaNet's message layers reduce per-edge, per-component messages onto nodes. This
times that reduction (forward, and forward + backward) for the edge lists of MLP graphs
as :func:`gradgraph.to_graph` builds them, with every implementation that is importable,
side by side in one run (interleaved rounds, medians):

* ``pyg scatter``        — :func:`torch_geometric.utils.scatter` (what gradgraph.nn calls;
  for sum/mean PyG uses torch's ``scatter_add_`` whether or not torch-scatter is installed).
* ``torch index_add_``   — ``out.index_add_(0, index, src)`` on rows ``[E, B*C]``.
* ``torch segment_reduce``— ``torch.segment_reduce`` over CSR offsets (MLP graphs list
  edges sorted by destination, so incoming messages are contiguous segments).
* ``torch_scatter.scatter`` / ``torch_scatter.segment_csr`` — only when torch-scatter is
  installed (it compiles from source here: see benchmarks/README.md).

Usage::

    python benchmarks/scatter.py            # full grid
    python benchmarks/scatter.py --quick    # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from _common import format_table, interleaved_median_times, set_threads

#: hidden widths of ``64 -> w -> w -> 10`` MLPs whose edge lists are aggregated
WIDTHS = {"tiny": [8], "full": [32, 128]}


def mlp_edges(width: int) -> tuple[Tensor, int]:
    """Destination node of every edge of a ``64 -> w -> w -> 10`` MLP graph (row-major), and N."""
    sizes = [64, width, width, 10]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    destinations = [
        (offsets[layer + 1] + torch.arange(d_out)).repeat_interleave(d_in)
        for layer, (d_in, d_out) in enumerate(zip(sizes, sizes[1:]))
    ]
    return torch.cat(destinations), offsets[-1]


def implementations(index: Tensor, num_nodes: int, reduce: str) -> dict[str, Callable[[Tensor], Tensor]]:
    """Every available ``f(src [E, B, C]) -> [N, B, C]`` computing the same reduction."""
    counts = torch.bincount(index, minlength=num_nodes).clamp(min=1)
    pointers = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(index, minlength=num_nodes).cumsum(0)])
    lengths = torch.bincount(index, minlength=num_nodes)

    def index_add(src: Tensor) -> Tensor:
        out = src.new_zeros((num_nodes, *src.shape[1:])).index_add_(0, index, src)
        return out / counts.view(-1, *([1] * (src.dim() - 1))) if reduce == "mean" else out

    methods: dict[str, Callable[[Tensor], Tensor]] = {
        "pyg scatter": lambda src: scatter(src, index, 0, num_nodes, reduce=reduce),
        "torch index_add_": index_add,
        "torch segment_reduce": lambda src: torch.segment_reduce(src, reduce, lengths=lengths, axis=0, unsafe=True),
    }
    if importlib.util.find_spec("torch_scatter") is not None:
        import torch_scatter

        methods["torch_scatter.scatter"] = lambda src: torch_scatter.scatter(src, index, 0, dim_size=num_nodes,
                                                                             reduce=reduce)
        methods["torch_scatter.segment_csr"] = lambda src: torch_scatter.segment_csr(src, pointers, reduce=reduce)
    return methods


def forward_backward(function: Callable[[Tensor], Tensor], src: Tensor, grad_out: Tensor) -> Callable[[], None]:
    """One forward and one backward pass of ``function`` (the gradient flows back to ``src``)."""

    def run() -> None:
        src.grad = None
        function(src).backward(grad_out)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", type=int, default=WIDTHS["full"])
    parser.add_argument("--components", nargs="+", type=int, default=[32, 128], help="B")
    parser.add_argument("--channels", type=int, default=16, help="C")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--min-seconds", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.components, args.channels, args.rounds, args.min_seconds = WIDTHS["tiny"], [4], 2, 3, 0.0
    threads = set_threads(args.threads)
    has_torch_scatter = importlib.util.find_spec("torch_scatter") is not None
    print(f"torch {torch.__version__}, {threads} threads, torch-scatter "
          f"{'installed' if has_torch_scatter else 'not installed: its rows are skipped'}")

    rows = []
    for width in args.widths:
        index, num_nodes = mlp_edges(width)
        for num_components in args.components:
            shape = (index.numel(), num_components, args.channels)
            src = torch.randn(shape, requires_grad=True)
            grad_out = torch.randn(num_nodes, num_components, args.channels)
            for reduce in ("sum", "mean"):
                methods = implementations(index, num_nodes, reduce)
                reference = methods["pyg scatter"](src.detach())
                for name, function in methods.items():
                    error = float((function(src.detach()) - reference).abs().max())
                    if error > 1e-4:
                        raise AssertionError(f"{name} ({reduce}) disagrees with pyg scatter by {error}")
                forward = {name: (lambda f=function: f(src.detach())) for name, function in methods.items()}
                both = {name: forward_backward(function, src, grad_out) for name, function in methods.items()}
                forward_times = interleaved_median_times(forward, rounds=args.rounds, min_seconds=args.min_seconds)
                both_times = interleaved_median_times(both, rounds=args.rounds, min_seconds=args.min_seconds)
                base_forward, base_both = forward_times["pyg scatter"], both_times["pyg scatter"]
                for name in methods:
                    rows.append([
                        f"[{shape[0]}, {num_components}, {args.channels}] -> [{num_nodes}, ...]", reduce, name,
                        f"{forward_times[name] * 1e3:.2f}", f"{forward_times[name] / base_forward:.2f}",
                        f"{both_times[name] * 1e3:.2f}", f"{both_times[name] / base_both:.2f}",
                    ])
            print(f"  done width {width} B={num_components}", file=sys.stderr, flush=True)
    print(f"\nmedian of {args.rounds} interleaved rounds; ratios are to pyg scatter in the same row group\n")
    print(format_table(["shape", "reduce", "implementation", "fwd (ms)", "x pyg", "fwd+bwd (ms)", "x pyg"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
