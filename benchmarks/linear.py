"""`F.linear` against the transposed product `(W xᵀ)ᵀ` that `gradgraph.nn.linear` takes for narrow outputs.

For each (rows, in -> out) both forms of the same product run interleaved (medians of rounds,
one thread) and the ratio is printed next to the form :func:`gradgraph.nn.linear.linear` picks,
so the thresholds (`NARROW_OUT_CHANNELS`, `MIN_ROWS`) can be checked on any machine: where it
picks "transposed", the ratio F.linear / transposed should be above 1.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/linear.py
    python benchmarks/linear.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from _common import format_table, interleaved_median_times, set_threads

from gradgraph.nn.linear import prefers_transposed

SHAPES = [(128, 8, 8), (2048, 8, 8), (10496, 2, 8), (10496, 8, 8), (10496, 16, 8), (10496, 64, 8), (10496, 8, 16),
          (10496, 16, 16), (10496, 32, 32), (65536, 8, 8), (65536, 64, 8), (65536, 16, 16)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--quick", action="store_true", help="smoke run: two shapes, one round")
    args = parser.parse_args(argv)
    set_threads(1)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for count, in_channels, out_channels in shapes:
        x = torch.randn(count, in_channels, dtype=dtype)
        weight, bias = torch.randn(out_channels, in_channels, dtype=dtype), torch.randn(out_channels, dtype=dtype)
        times = interleaved_median_times({
            "F.linear": lambda: F.linear(x, weight, bias),
            "transposed": lambda: torch.addmm(bias[:, None], weight, x.t()).t(),
        }, rounds=1 if args.quick else args.rounds, min_seconds=0.0 if args.quick else 0.05)
        picked = "transposed" if prefers_transposed(count, out_channels, x.device) else "F.linear"
        rows.append([f"{count} x {in_channels} -> {out_channels}", f"{times['F.linear'] * 1e6:.0f}",
                     f"{times['transposed'] * 1e6:.0f}", f"{times['F.linear'] / times['transposed']:.2f}", picked])
    print(f"{args.dtype}, 1 thread, {1 if args.quick else args.rounds} interleaved rounds (medians), µs per call")
    print(format_table(["rows x in -> out", "F.linear", "transposed", "F.linear / transposed", "gradgraph picks"],
                       rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
