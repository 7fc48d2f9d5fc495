"""Cost of capturing gradients: `gradgraph.to_graph` against the floor and per-sample methods.

For MLPs of about 10k, 100k and 1M parameters and several batch sizes ``b`` this times,
side by side in one run (interleaved rounds, medians), and measures the peak torch memory
of:

* ``floor``     — one ordinary forward + backward of the same batch and loss (parameter
  ``.grad`` of the summed loss); the least any gradient method can cost.
* ``to_graph``  — :func:`gradgraph.to_graph`: the rank-1 factors of every datapoint's
  gradient plus the graph, O(b·N + P) numbers; the architecture-only part of the graph
  comes from the converter's cache (built on the warm-up calls).
* ``to_graph, cold`` — the same with that cache emptied before every call: the cost of
  converting a model of an architecture not seen before (a trace of the forward).
* ``per-op replay`` — ``to_graph`` with the cached plan's chain capture refused, so the plan
  is replayed op by op under the trace's fingerprint check, as for every model that is not a
  plain ``nn.Sequential`` chain; same graph, tensor for tensor: what the chain capture saves.
* ``capture only`` — :func:`gradgraph.capture`, the factors without the graph: the part
  of ``to_graph`` that the floor bounds.
* ``torch.func``— per-sample gradients with ``vmap(grad(functional_call))``, O(b·P).
* ``opacus``    — ``GradSampleModule`` per-sample gradients (if opacus is installed).
* ``backpack``  — ``BatchGrad`` per-sample gradients (if backpack-for-pytorch is installed).

Usage::

    python benchmarks/capture.py                 # the full grid (a few minutes)
    python benchmarks/capture.py --quick         # tiny sizes, a few seconds (smoke test)
    python benchmarks/capture.py --sizes 100k --batches 128 --rounds 31

Threads default to 1: the benchmark machine is a shared 2-core box, and an oversubscribed
OpenMP pool makes small kernels wait on each other (``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import format_bytes, format_table, interleaved_median_times, peak_memory_bytes, set_threads

import gradgraph
from gradgraph.convert.mlp import clear_structure_cache, mlp_layers

INPUT_DIM = 64
NUM_CLASSES = 10
#: hidden width of the two hidden layers for each model size: 64 -> w -> w -> 10.
WIDTHS = {"tiny": 8, "10k": 70, "100k": 280, "1M": 960}


@dataclass
class Setup:
    """One configuration: a model and a batch."""

    size: str
    model: nn.Sequential
    inputs: Tensor
    targets: Tensor

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_setup(size: str, batch_size: int, seed: int = 0) -> Setup:
    """``64 -> w -> w -> 10`` ReLU MLP (``w`` from :data:`WIDTHS`) and a random batch."""
    generator = torch.Generator().manual_seed(seed)
    width = WIDTHS[size]
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(INPUT_DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES)
    )
    inputs = torch.randn(batch_size, INPUT_DIM, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return Setup(size, model, inputs, targets)


def per_datapoint_cross_entropy(output: Tensor, targets: Tensor) -> Tensor:
    """``[b]`` unreduced cross-entropy, the loss every method differentiates."""
    return F.cross_entropy(output, targets, reduction="none")


def floor_method(setup: Setup) -> Callable[[], Any]:
    """One forward + backward of the summed loss; returns the parameter gradients."""
    model, inputs, targets = setup.model, setup.inputs, setup.targets
    params = list(model.parameters())

    def run() -> list[Tensor]:
        loss = F.cross_entropy(model(inputs), targets, reduction="sum")
        loss.backward()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return grads

    return run


def to_graph_method(setup: Setup) -> Callable[[], Any]:
    """:func:`gradgraph.to_graph` with the per-datapoint loss."""
    model, inputs, targets = setup.model, setup.inputs, setup.targets
    return lambda: gradgraph.to_graph(model, inputs, targets, per_datapoint_cross_entropy)


def to_graph_cold_method(setup: Setup) -> Callable[[], Any]:
    """:func:`gradgraph.to_graph` with an empty architecture cache, as on the first call.

    ``to_graph`` traces the forward once per architecture and reuses the plan (the layout,
    edge_index, slot maps, labels); this row pays for the trace and the plan on every call,
    i.e. the cost of converting a model whose architecture is new.
    """
    model, inputs, targets = setup.model, setup.inputs, setup.targets

    def run() -> Any:
        clear_structure_cache()
        return gradgraph.to_graph(model, inputs, targets, per_datapoint_cross_entropy)

    return run


def replay_method(setup: Setup) -> Callable[[], Any]:
    """:func:`gradgraph.to_graph` with the chain capture of the cached plan refused: the plan is
    replayed op by op (the path of every model that is not a plain chain); same graph."""
    from gradgraph.convert.chain import ChainCapture

    model, inputs, targets = setup.model, setup.inputs, setup.targets

    def run() -> Any:
        applies = ChainCapture.applies
        ChainCapture.applies = lambda self, chain: False  # type: ignore[method-assign]
        try:
            return gradgraph.to_graph(model, inputs, targets, per_datapoint_cross_entropy)
        finally:
            ChainCapture.applies = applies  # type: ignore[method-assign]

    return run


def capture_method(setup: Setup) -> Callable[[], Any]:
    """:func:`gradgraph.capture` alone: the factors ``(act, grad)`` of every neuron, no graph.

    The part of ``to_graph`` that the floor bounds; ``to_graph`` adds the O(P) edge values
    (``edge_attr``: the weights) on top, and on an architecture it has not seen the
    O(P) structure (edge index, parameter maps) once.
    """
    model, inputs, targets = setup.model, setup.inputs, setup.targets
    names = [layer.name for layer in mlp_layers(model)]
    return lambda: gradgraph.capture(model, inputs, modules=names, targets=targets, loss_fn=per_datapoint_cross_entropy)


def torch_func_method(setup: Setup) -> Callable[[], Any]:
    """``vmap(grad(functional_call))`` per-sample gradients ``{name: [b, *shape]}``."""
    from torch.func import functional_call, grad, vmap

    model, inputs, targets = setup.model, setup.inputs, setup.targets
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_sample = vmap(grad(loss_of_one), in_dims=(None, 0, 0))
    return lambda: per_sample(params, inputs, targets)


def opacus_method(setup: Setup) -> Callable[[], Any] | None:
    """Opacus ``GradSampleModule`` (hooks mode) on a copy of the model, or ``None`` if absent."""
    if importlib.util.find_spec("opacus") is None:
        return None
    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(setup.model), batch_first=True, loss_reduction="sum")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    inputs, targets = setup.inputs, setup.targets

    def run() -> list[Tensor]:
        loss = F.cross_entropy(wrapped(inputs), targets, reduction="sum")
        loss.backward()
        grads = [p.grad_sample for p in params]
        for p in params:
            p.grad = None
            p.grad_sample = None
        return grads

    return run


def backpack_method(setup: Setup) -> Callable[[], Any] | None:
    """BackPACK ``BatchGrad`` on a copy of the model, or ``None`` if absent."""
    if importlib.util.find_spec("backpack") is None:
        return None
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(copy.deepcopy(setup.model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = list(model.parameters())
    inputs, targets = setup.inputs, setup.targets

    def run() -> list[Tensor]:
        loss = loss_fn(model(inputs), targets)
        with backpack(BatchGrad()):
            loss.backward()
        grads = [p.grad_batch for p in params]
        for p in params:
            p.grad = None
            del p.grad_batch
        return grads

    return run


def check_agreement(setup: Setup) -> float:
    """Max abs difference between to_graph's and torch.func's per-sample gradients."""
    graph = to_graph_method(setup)()
    reference = torch_func_method(setup)()
    ours = graph.per_sample_grads()
    return max(float((ours[name] - reference[name]).abs().max()) for name in reference)


def benchmark(size: str, batch_size: int, rounds: int, min_seconds: float) -> list[dict[str, Any]]:
    """Time and peak memory of every available method on one configuration."""
    setup = make_setup(size, batch_size)
    methods: dict[str, Callable[[], Any]] = {
        "floor": floor_method(setup),
        "to_graph": to_graph_method(setup),
        "to_graph, cold": to_graph_cold_method(setup),
        "per-op replay": replay_method(setup),
        "capture only": capture_method(setup),
        "torch.func": torch_func_method(setup),
    }
    for name, factory in (("opacus", opacus_method), ("backpack", backpack_method)):
        method = factory(setup)
        if method is not None:
            methods[name] = method
    times = interleaved_median_times(methods, rounds=rounds, min_seconds=min_seconds)
    peaks = {name: peak_memory_bytes(method) for name, method in methods.items()}
    rows = []
    for name in methods:
        rows.append(
            {
                "size": size,
                "params": setup.num_params,
                "b": batch_size,
                "method": name,
                "time": times[name],
                "peak": peaks[name],
                "time/floor": times[name] / times["floor"],
                "time/torch.func": times[name] / times["torch.func"],
                "peak/floor": peaks[name] / max(peaks["floor"], 1),
                "peak/torch.func": peaks[name] / max(peaks["torch.func"], 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["10k", "100k", "1M"], choices=list(WIDTHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128, 512])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the median is reported")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="minimum duration of one timed sample")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.rounds, args.min_seconds = ["tiny"], [8], 3, 0.0

    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, gradgraph {gradgraph.__version__}")
    for name, module in (("opacus", "opacus"), ("backpack", "backpack")):
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed, skipped")
    error = check_agreement(make_setup(args.sizes[0], args.batches[0]))
    print(f"to_graph per-sample gradients vs torch.func: max abs difference {error:.2e}")

    rows = []
    for size in args.sizes:
        for batch_size in args.batches:
            rows.extend(benchmark(size, batch_size, args.rounds, args.min_seconds))
            print(f"  done {size} b={batch_size}", file=sys.stderr, flush=True)
    header = ["model", "params", "b", "method", "time (ms)", "x floor", "x torch.func", "peak mem", "x floor",
              "x torch.func"]
    table = [
        [row["size"], row["params"], row["b"], row["method"], f"{row['time'] * 1e3:.3f}", f"{row['time/floor']:.2f}",
         f"{row['time/torch.func']:.3f}", format_bytes(row["peak"]), f"{row['peak/floor']:.2f}",
         f"{row['peak/torch.func']:.3f}"]
        for row in rows
    ]
    print(f"\nmedian of {args.rounds} interleaved rounds; peak = torch CPU bytes live above the start of the call\n")
    print(format_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
