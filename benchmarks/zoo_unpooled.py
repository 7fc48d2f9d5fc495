"""Time and peak memory of the zoo-accuracy GradMetaNet on pooled vs unpooled CNN components.

One batch of zoo CNN graphs (the ``cnn`` or ``mnist1d-cnn`` recipe, networks trained a few steps:
the cost depends on the shapes, not on the training), read as the zoo-accuracy experiment reads
them (:func:`gradgraph_lab.tasks.zoo_accuracy.graph_models.graph_inputs`):

* ``pooled``               — one component per datapoint (the presets' view);
* ``unpooled``             — one per (datapoint, position): 16 (digits) or 20 (MNIST-1D) times as many;
* ``unpooled, K per step`` — the same, training on a random ``K`` components per step
  (``ModelConfig.train_components``), as ``--unpooled --train-components K`` does.

For each: a training step (forward, backward, Adam step) and an evaluation pass (no autograd,
all components), median seconds over interleaved rounds and the peak bytes torch allocates
during one call (``_common.py``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/zoo_unpooled.py                      # digits CNNs, batch 16
    OMP_NUM_THREADS=1 python benchmarks/zoo_unpooled.py --dataset mnist1d
    python benchmarks/zoo_unpooled.py --quick                                 # smoke run
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from _common import format_bytes, format_table, interleaved_median_times, peak_memory_bytes, set_threads

import gradgraph
from gradgraph_lab.tasks.zoo_accuracy import preset
from gradgraph_lab.tasks.zoo_accuracy.data import load_images
from gradgraph_lab.tasks.zoo_accuracy.graph_models import GraphRegressor, ModelConfig, graph_inputs
from gradgraph_lab.tasks.zoo_accuracy.recipe import train_network


def _graphs(dataset: str, networks: int, probe_size: int, pool: bool) -> list:
    zoo = preset("mnist1d-cnn" if dataset == "mnist1d" else "cnn").zoo
    zoo = replace(zoo, steps_choices=(20,), probe_size=probe_size)
    data = load_images(zoo)
    probe, labels = data.pool_x[:probe_size], data.pool_y[:probe_size]
    graphs = []
    for net in range(networks):
        model = train_network(zoo, net, data)[-1]
        graph = gradgraph.to_graph(model, probe, labels, lambda out, y: F.cross_entropy(out, y, reduction="none"))
        view = graph_inputs(graph, "grad", pool=pool)
        view.y = torch.zeros(1, 1)
        graphs.append(view)
    return graphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    parser.add_argument("--batch", type=int, default=16, help="graphs per batch")
    parser.add_argument("--probe", type=int, default=32, help="probe datapoints (the presets: 32)")
    parser.add_argument("--subsets", type=int, nargs="*", default=[64, 16], help="K of the 'K per step' rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 graphs, probe 4, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.probe, args.subsets, args.rounds = 2, 4, [8], 1
    threads = set_threads(args.threads)
    networks = min(args.batch, 4)  # distinct architectures; the batch repeats them
    views = {"pooled": _graphs(args.dataset, networks, args.probe, pool=True),
             "unpooled": _graphs(args.dataset, networks, args.probe, pool=False)}
    configs = {"pooled": ("pooled", 0), "unpooled": ("unpooled", 0),
               **{f"unpooled, {k} per step": ("unpooled", k) for k in args.subsets}}
    methods, shapes = {}, {}
    for name, (view, keep) in configs.items():
        graphs = (views[view] * args.batch)[:args.batch]
        batch = Batch.from_data_list(graphs)
        torch.manual_seed(0)
        model = GraphRegressor(ModelConfig(train_components=keep, unpooled=view == "unpooled"), 0.5)
        model.fit_scaling(graphs)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)

        def step(model=model, batch=batch, optimizer=optimizer):
            model.train()
            loss = (model(batch) - batch.y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        def evaluate(model=model, batch=batch):
            model.eval()
            with torch.no_grad():
                return model(batch)

        methods[f"{name}: train step"] = step
        if keep == 0:
            methods[f"{name}: evaluation"] = evaluate
        shapes[name] = (graphs[0].act.shape[1], keep or graphs[0].act.shape[1])
    times = interleaved_median_times(methods, rounds=args.rounds)
    rows = []
    for method, function in methods.items():
        name = method.split(":")[0]
        components, read = shapes[name]
        read = components if method.endswith("evaluation") else read
        rows.append([method, f"{components}", f"{read}", f"{times[method] * 1e3:.0f}",
                     format_bytes(peak_memory_bytes(function))])
    nodes = [graph.num_nodes for graph in views["pooled"]]
    print(f"{args.dataset} CNNs, {args.batch} graphs a batch ({min(nodes)}-{max(nodes)} neurons), probe "
          f"{args.probe}, {threads} thread(s), median of {args.rounds} rounds")
    print(format_table(["method", "components a graph", "read", "ms (median)", "peak torch memory"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
