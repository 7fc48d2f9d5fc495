"""GradMetaNet cost: forward + backward time and peak memory as B, width and #graphs grow.

Three sweeps around a base configuration (``B`` components per graph, source MLPs
``16 -> w -> w -> 4``, ``G`` graphs in a PyG ``Batch``) vary one factor at a time. The
work of one step is ``G·B·(N+E)``: every component of every neuron and every weight is
touched by each component layer. A least-squares line through ``(log work, log time)``
over all points gives the scaling exponent (1 = linear).

Then GradMetaNet++ (attention across components and neurons, per-component product
decoder) against GradMetaNet at the same width as ``B`` grows: the attention across
components makes it quadratic in ``B``.

Then, at equal hidden width, GradMetaNet against the ``nfn`` library's ``NPLinear`` stack
(Zhou et al., NFN) fed the mean gradient of the same source networks (optional: skipped
with a message when nfn is not installed).

Usage::

    python benchmarks/metanet.py            # sweeps + nfn comparison (a few minutes)
    python benchmarks/metanet.py --quick    # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch

from _common import format_bytes, format_table, interleaved_median_times, peak_memory_bytes, set_threads

import gradgraph
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus

INPUT_DIM, OUTPUT_DIM = 16, 4


@dataclass(frozen=True)
class Config:
    """One point of a sweep."""

    components: int  #: B
    width: int  #: hidden width of the source MLPs
    graphs: int  #: G


def source_batch(config: Config, seed: int = 0) -> Batch:
    """``G`` random ``16 -> w -> w -> 4`` tanh MLPs, each converted on ``B`` random datapoints."""
    torch.manual_seed(seed)
    graphs = []
    for _ in range(config.graphs):
        model = nn.Sequential(
            nn.Linear(INPUT_DIM, config.width), nn.Tanh(), nn.Linear(config.width, config.width), nn.Tanh(),
            nn.Linear(config.width, OUTPUT_DIM),
        )
        inputs = torch.randn(config.components, INPUT_DIM)
        targets = torch.randn(config.components, OUTPUT_DIM)
        graphs.append(gradgraph.to_graph(model, inputs, targets, lambda out, y: ((out - y) ** 2).sum(-1)))
    return Batch.from_data_list(graphs)


def graph_size(batch: Batch) -> tuple[int, int]:
    """``(N, E)`` of the whole batch."""
    return int(batch.num_nodes), int(batch.edge_index.shape[1])


def gradmetanet_step(model: nn.Module, batch: Batch) -> Callable[[], None]:
    """One forward + backward of ``model`` on ``batch`` (loss: mean square of every output)."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        output = model(batch)
        loss = sum((part**2).mean() for part in output if part is not None)
        loss.backward()

    return run


def nfn_step(batch: Batch, channels: int, depth: int) -> Callable[[], None] | None:
    """An ``NPLinear`` stack of ``depth`` layers, ``channels`` wide, on the batch's mean gradients.

    Returns ``None`` when nfn is not installed.
    """
    if importlib.util.find_spec("nfn") is None:
        return None
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import NPLinear, TupleOp

    mean_grads = [graph.mean_grad() for graph in batch.to_data_list()]
    names = batch.get_example(0).param_names
    weights = [torch.stack([grads[name] for grads in mean_grads])[:, None] for name in names if "weight" in name]
    biases = [torch.stack([grads[name] for grads in mean_grads])[:, None] for name in names if "bias" in name]
    features = WeightSpaceFeatures(weights, biases)
    spec = network_spec_from_wsfeat(features)
    widths = [1] + [channels] * (depth - 1) + [1]
    layers: list[nn.Module] = []
    for index, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
        layers.append(NPLinear(spec, c_in, c_out))
        if index < depth - 1:
            layers.append(TupleOp(nn.SiLU()))
    model = nn.Sequential(*layers)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        output = model(features)
        loss = sum((w**2).mean() + (b**2).mean() for w, b in output)
        loss.backward()

    return run


def fit_exponent(work: list[float], seconds: list[float]) -> float:
    """Slope of the least-squares line through ``(log work, log seconds)``."""
    xs, ys = [math.log(w) for w in work], [math.log(s) for s in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def plusplus_comparison(model: GradMetaNet, args: argparse.Namespace) -> None:
    """GradMetaNet++ (2 blocks, 2 heads) against ``model`` at the same width, over the ``B`` sweep."""
    plusplus = GradMetaNetPlusPlus(args.hidden, num_layers=2, heads=2, product_channels=args.hidden)
    _, base_w, base_g = args.base
    rows = []
    for components in args.components:
        batch = source_batch(Config(components, base_w, base_g))
        methods = {"gradmetanet": gradmetanet_step(model, batch), "gradmetanet++": gradmetanet_step(plusplus, batch)}
        elapsed = interleaved_median_times(methods, rounds=args.rounds, min_seconds=args.min_seconds)
        for name, method in methods.items():
            rows.append([components, name, f"{elapsed[name] * 1e3:.2f}",
                         f"{elapsed[name] / elapsed['gradmetanet']:.2f}", format_bytes(peak_memory_bytes(method))])
        print(f"  done B={components}", file=sys.stderr, flush=True)
    print(f"\nGradMetaNet++ (2 blocks, 2 heads, hidden {args.hidden}) vs GradMetaNet, width={base_w}, G={base_g}")
    print(format_table(["B", "model", "time (ms)", "x GradMetaNet", "peak mem"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", nargs="+", type=int, default=[8, 16, 32, 64, 128], help="B sweep")
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64, 128], help="source MLP width sweep")
    parser.add_argument("--graphs", nargs="+", type=int, default=[1, 2, 4, 8], help="graphs per batch sweep")
    parser.add_argument("--base", nargs=3, type=int, default=[32, 32, 2], metavar=("B", "WIDTH", "G"))
    parser.add_argument("--hidden", type=int, default=16, help="GradMetaNet hidden and component width")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.components, args.widths, args.graphs, args.base = [2, 4], [4, 8], [1, 2], [2, 4, 1]
        args.hidden, args.rounds, args.min_seconds = 4, 2, 0.0
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads")

    base_b, base_w, base_g = args.base
    configs = list(dict.fromkeys(
        [Config(b, base_w, base_g) for b in args.components]
        + [Config(base_b, w, base_g) for w in args.widths]
        + [Config(base_b, base_w, g) for g in args.graphs]
    ))
    model = GradMetaNet(args.hidden, component_channels=args.hidden)
    rows, work, seconds, peaks = [], [], [], []
    for config in configs:
        batch = source_batch(config)
        num_nodes, num_edges = graph_size(batch)
        step = gradmetanet_step(model, batch)
        elapsed = interleaved_median_times({"gradmetanet": step}, rounds=args.rounds, min_seconds=args.min_seconds)
        peak = peak_memory_bytes(step)
        units = config.components * (num_nodes + num_edges)
        work.append(units)
        seconds.append(elapsed["gradmetanet"])
        peaks.append(peak)
        rows.append([config.components, config.width, config.graphs, num_nodes, num_edges, units,
                     f"{elapsed['gradmetanet'] * 1e3:.2f}", f"{elapsed['gradmetanet'] / units * 1e9:.1f}",
                     format_bytes(peak), f"{peak / units:.0f}"])
        print(f"  done {config}", file=sys.stderr, flush=True)
    print(f"\nGradMetaNet(hidden={args.hidden}, component={args.hidden}) forward+backward, "
          f"median of {args.rounds} rounds\n")
    print(format_table(["B", "width", "G", "N", "E", "B(N+E)", "time (ms)", "ns per unit", "peak mem",
                        "bytes per unit"], rows))
    print(f"\nfitted exponent, time ~ (B(N+E))^a over all {len(work)} points: a = {fit_exponent(work, seconds):.3f}")
    print(f"fitted exponent, peak memory ~ (B(N+E))^a: a = {fit_exponent(work, [float(p) for p in peaks]):.3f}")
    large = [i for i, units in enumerate(work) if units >= sorted(work)[len(work) // 2]]
    if len(large) >= 2:
        print(f"fitted exponent, time, upper half of the work range ({len(large)} points): "
              f"a = {fit_exponent([work[i] for i in large], [seconds[i] for i in large]):.3f}")

    plusplus_comparison(model, args)

    depth = model.num_component_layers + model.num_node_layers
    print(f"\nGradMetaNet vs nfn NPLinear x{depth} (fed the mean gradient), hidden width {args.hidden}, "
          f"B={base_b}, width={base_w}")
    if importlib.util.find_spec("nfn") is None:
        print("nfn: not installed, comparison skipped")
        return 0
    compare_rows = []
    for graphs in args.graphs:
        batch = source_batch(Config(base_b, base_w, graphs))
        methods = {"gradmetanet": gradmetanet_step(model, batch), "nfn NPLinear": nfn_step(batch, args.hidden, depth)}
        elapsed = interleaved_median_times(methods, rounds=args.rounds, min_seconds=args.min_seconds)
        for name, method in methods.items():
            peak = peak_memory_bytes(method)
            compare_rows.append([graphs, name, f"{elapsed[name] * 1e3:.2f}",
                                 f"{elapsed[name] / elapsed['nfn NPLinear']:.2f}", format_bytes(peak)])
    print(format_table(["G", "model", "time (ms)", "x nfn", "peak mem"], compare_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
