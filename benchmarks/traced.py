"""Cost of the traced converter on a GPT-style model, and of reading gradients back.

Side by side in one run (interleaved rounds, medians), for a nanoGPT-style model (token and
position embeddings, pre-norm blocks with fused qkv and SDPA, tied head):

* ``floor``            — one forward + backward of the summed per-sequence loss;
* ``to_graph``         — :func:`gradgraph.to_graph` through the traced converter;
* ``torch.func``       — per-sample gradients with ``vmap(grad(functional_call))``;
* ``per_sample_grads`` / ``mean_grad`` / ``edge_components`` — reading a graph back.

Ratios are to ``floor`` (conversion) and to ``torch.func`` (reading back); peak memory as in
``capture.py``. ``--model mlp`` runs the same rows on the MLP of ``capture.py`` (64 -> w -> w
-> 10, b = 128), where a component is a datapoint, so ``edge_components`` (``[E, b, 2]``)
holds twice the numbers of the per-sample gradients instead of 2T times. ``--model gpt2`` runs
``transformers``' ``GPT2LMHeadModel`` (default SDPA attention) at the sizes given, for the small-model
fixed cost of issue 27 item 6 (``--blocks 2 --width 32 --heads 4 --context 16 --batch 8 --vocab 50``).
``--model gcn`` runs two ``torch_geometric`` ``GCNConv`` layers (width ``--width``), mean pooling and a
linear head on a PyG batch of ``--batch`` random graphs of ``--context`` nodes and ``2 * --context``
edges each, one datapoint per graph (``datapoints=batch.batch``, docs/gnn.md); no torch.func row
(graphs of a batch differ, vmap needs one shape).
``--model resnet8`` runs a ResNet-8 (3x3 conv stem, three stages of one basic block of width ``--width``,
2x, 4x (16: 16/32/64), each with BatchNorm in eval and a strided 1x1 shortcut where the shape changes,
global average pooling, a linear head to 10 classes) on ``--batch`` random 32x32x3 images
(``--width 16 --batch 32``: the issue 27 item 6 case; no torchvision).
The row ``to_graph (first)`` empties the plan cache first: a first conversion (trace, layout,
the check of the summed gradient against autograd).

Usage::

    python benchmarks/traced.py                  # 4 blocks, d=128, 4 heads, T=64, b=32
    python benchmarks/traced.py --model mlp      # 64 -> 280 -> 280 -> 10 (100k parameters), b=128
    python benchmarks/traced.py --quick          # tiny, a few seconds (smoke test)
    python benchmarks/traced.py --model gpt2 --blocks 2 --width 32 --heads 4 --context 16 --batch 8 --vocab 50
    python benchmarks/traced.py --device cuda    # on a GPU (peak memory: the CUDA allocator's)
    python benchmarks/traced.py --model gpt2 ... --fastest --rounds 60   # fastest rounds, not medians
    python benchmarks/traced.py --model resnet8 --width 16 --batch 32 --fastest --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from _common import format_bytes, format_table, interleaved_median_times, peak_memory_bytes, set_threads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from traced_models import GPT  # noqa: E402  (the same nanoGPT the tests check)

import gradgraph  # noqa: E402


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)


class BasicBlock(torch.nn.Module):
    """Two 3x3 convolutions with BatchNorm, a residual add; a strided 1x1 shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(torch.nn.Module):
    """ResNet-8: conv stem, three stages of one basic block (w, 2w, 4w), global average pool, linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.blocks = torch.nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                          BasicBlock(2 * width, 4 * width, 2))
        self.fc = torch.nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-edge-components", type=float, default=2e8)
    parser.add_argument("--model", choices=("gpt", "mlp", "gpt2", "gcn", "resnet8"), default="gpt")
    parser.add_argument("--mlp-width", type=int, default=280, help="hidden width of --model mlp (280: 100k parameters)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    parser.add_argument("--fastest", action="store_true",
                        help="report each method's fastest round, not the median (steadier on a loaded machine)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.heads, args.context, args.batch, args.rounds = 1, 16, 2, 8, 4, 2
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    loss_fn = sequence_loss
    if args.model == "mlp":
        width, batch = (8, 4) if args.quick else (args.mlp_width, 128)
        model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                    torch.nn.ReLU(), torch.nn.Linear(width, 10))
        ids, targets = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
        loss_fn = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    elif args.model == "resnet8":
        width, batch, side = (4, 2, 8) if args.quick else (args.width, args.batch, 32)
        model = ResNet8(width).eval()  # BatchNorm in eval, its statistics away from the defaults
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        ids, targets = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
        loss_fn = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    elif args.model == "gcn":
        from torch_geometric.data import Batch, Data
        from torch_geometric.nn import GCNConv, global_mean_pool

        class GCN(torch.nn.Module):
            def __init__(self, features: int, width: int, classes: int) -> None:
                super().__init__()
                self.conv1, self.conv2 = GCNConv(features, width), GCNConv(width, width)
                self.head = torch.nn.Linear(width, classes)

            def forward(self, x, edge_index, batch):
                h = torch.relu(self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index))
                return self.head(global_mean_pool(h, batch))

        nodes = args.context
        graphs = [Data(x=torch.randn(nodes, 16), edge_index=torch.randint(0, nodes, (2, 2 * nodes)))
                  for _ in range(args.batch)]
        joined = Batch.from_data_list(graphs)
        model = GCN(16, args.width, 10)
        ids, targets = joined.x, torch.randint(0, 10, (args.batch,))
        graph_kwargs = {"edge_index": joined.edge_index, "batch": joined.batch}
        loss_fn = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    else:
        if args.model == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(vocab_size=args.vocab, n_positions=args.context, n_embd=args.width,
                                n_layer=args.blocks, n_head=args.heads)
            model = GPT2LMHeadModel(config).eval()
            loss_fn = lambda output, y: sequence_loss(output.logits, y)  # noqa: E731
        else:
            model = GPT(vocab=args.vocab, context=args.context, d=args.width, heads=args.heads,
                        layers=args.blocks).eval()
        ids = torch.randint(0, args.vocab, (args.batch, args.context))
        targets = torch.randint(0, args.vocab, (args.batch, args.context))
    if args.model != "gcn":
        graph_kwargs = {}
    model, ids, targets = model.to(args.device), ids.to(args.device), targets.to(args.device)
    graph_kwargs = {name: value.to(args.device) for name, value in graph_kwargs.items()}
    extra = {"datapoints": graph_kwargs["batch"], "forward_kwargs": graph_kwargs} if graph_kwargs else {}
    params = {name: p.detach() for name, p in model.named_parameters()}

    def floor() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(ids, **graph_kwargs), targets).sum().backward()

    def convert() -> gradgraph.GradGraph:
        return gradgraph.to_graph(model, ids, targets, loss_fn, **extra)

    def one(p, x, y):
        return loss_fn(functional_call(model, p, (x[None],)), y[None]).sum()

    def func() -> dict:
        return vmap(grad(one), in_dims=(None, 0, 0))(params, ids, targets)

    def first() -> gradgraph.GradGraph:
        gradgraph.convert.clear_structure_cache()  # a first conversion: trace and lay out afresh
        return convert()

    graph = convert()
    methods = {"floor": floor, "to_graph": convert, "to_graph (first)": first, "torch.func": func,
               "per_sample_grads": graph.per_sample_grads, "mean_grad": graph.mean_grad,
               "edge_components": graph.edge_components}
    if args.model == "gcn":  # ragged graphs: no vmap; the read-back rows are to torch.func, so they go too
        methods = {name: methods[name] for name in ("floor", "to_graph", "to_graph (first)")}
    # edge_components is [E, B, 2] per token: at the default size 13 GB, more than this
    # machine should be asked for; measured only below --max-edge-components values
    components = graph.edge_index.shape[1] * graph.num_components * 2
    if components > args.max_edge_components:
        methods.pop("edge_components", None)
        print(f"edge_components skipped: its output would hold {components:.2e} values "
              f"(> --max-edge-components {args.max_edge_components:.0e})")
    if torch.device(args.device).type == "cuda":
        # a GPU runs the call's kernels after it returns: time until they are done
        def synchronised(method):
            return lambda: (method(), torch.cuda.synchronize())[0]

        methods = {name: synchronised(method) for name, method in methods.items()}
    times = interleaved_median_times(methods, rounds=args.rounds, min_seconds=0.0, warmup=1,
                                     statistic=min if args.fastest else statistics.median)
    memory = {name: peak_memory_bytes(method, args.device) for name, method in methods.items()}
    reference = {"floor": "floor", "to_graph": "floor", "to_graph (first)": "floor", "torch.func": "floor", "per_sample_grads": "torch.func",
                 "mean_grad": "torch.func", "edge_components": "torch.func"}
    rows = []
    for name in methods:
        if reference[name] not in methods:
            continue
        base = reference[name]
        rows.append([name, f"{times[name] * 1e3:.1f} ms", f"{times[name] / times[base]:.2f}x {base}",
                     format_bytes(memory[name]), f"{memory[name] / max(memory[base], 1):.2f}x {base}"])
    parameters = sum(p.numel() for p in model.parameters())
    print(f"device: {args.device}" + (f" ({torch.cuda.get_device_name(args.device)})"
                                       if torch.device(args.device).type == "cuda" else ""))
    if args.model == "gcn":
        print(f"PyG GCN: 2 GCNConv layers, width {args.width}, {args.batch} graphs of {args.context} nodes and "
              f"{2 * args.context} edges, {parameters} parameters; graph {graph}; {threads} thread(s)")
    elif args.model == "gpt2":
        print(f"transformers GPT2LMHeadModel: {args.blocks} blocks, d={args.width}, {args.heads} heads, T={args.context}, "
              f"b={args.batch}, vocab {args.vocab}, {parameters} parameters; graph {graph}; {threads} thread(s)")
    elif args.model == "resnet8":
        print(f"ResNet-8: width {width}/{2 * width}/{4 * width}, BatchNorm (eval), {side}x{side}x3 inputs, b={batch}, "
              f"{parameters} parameters; graph {graph}; {threads} thread(s)")
    elif args.model == "mlp":
        print(f"MLP: 64 -> {width} -> {width} -> 10, b={batch}, {parameters} parameters; graph {graph}; {threads} thread(s)")
    else:
        print(f"GPT: {args.blocks} blocks, d={args.width}, {args.heads} heads, T={args.context}, b={args.batch}, "
              f"{parameters} parameters; graph {graph}; {threads} thread(s)")
    print(format_table(["method", "fastest time" if args.fastest else "median time", "time ratio", "peak memory", "memory ratio"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
