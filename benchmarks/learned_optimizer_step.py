"""Time per step of the learned optimizer against Adam, in one run: the fused and the general path.

Methods (interleaved rounds, medians; see ``_common.py``), each one training step of the task's
MLP (default: MNIST-1D, 40→32→10, batch 128) on batches drawn in advance:

* ``adam``                 — ``torch.optim.Adam``: forward, backward, step.
* ``<meta-model>, general`` — ``LearnedOptimizer`` converting the model at every step
  (``convert_closure``: capture, graph; the path of every model that is not a plain chain).
* ``<meta-model>, fused``   — ``LearnedOptimizer`` as shipped on a plain chain: the closed-form
  forward/backward, no conversion (:mod:`gradgraph.optim.chain_step`).

Meta-models (default: the main task's shipped files, the three variants of the paper's
ablation): ``mnist1d-mlp-sgdm`` (SGDM: ``α``, ``μ`` only), ``mnist1d-mlp-deepsets`` (DeepSets:
per-parameter MLP ``F``) and ``mnist1d-mlp`` (GradMetaNet, its embedding from all 128 examples of
the batch); also selectable: the older ``digits-mlp-deepsets``, ``digits-mlp`` (32 examples) and
``gradmetanet-128`` (a fresh GradMetaNet rule of the default config). Both
paths give the same parameters (tests/optim/test_optim_fused_step.py, 1e-10 in float64); this
measures time only. The issue-29 target is fused <= 3x Adam on the MNIST-1D MLP.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer_step.py              # 15 rounds
    OMP_NUM_THREADS=1 python benchmarks/learned_optimizer_step.py --task digits
    python benchmarks/learned_optimizer_step.py --quick                         # smoke run (digits)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from _common import format_table, interleaved_median_times, set_threads

META_MODELS = ("mnist1d-mlp-sgdm", "mnist1d-mlp-deepsets", "mnist1d-mlp")
OTHER_META_MODELS = ("digits-mlp-deepsets", "digits-mlp", "gradmetanet-128")


def _meta_model(name: str):
    from gradgraph.optim import LearnedUpdate, MetaModelConfig, load_pretrained

    if name == "gradmetanet-128":
        torch.manual_seed(0)
        return LearnedUpdate(MetaModelConfig(residual_adam=True)).eval()
    return load_pretrained(name)


def _stepper(task_name: str, kind: str, meta_name: str | None = None) -> Callable[[], None]:
    from gradgraph.optim import LearnedOptimizer
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    task = get_task(task_name, "cpu").task
    model = task.make_model(0)
    generator = torch.Generator().manual_seed(10_000)
    batches = [task.sample_batch(generator) for _ in range(64)]
    position = [0]
    if kind == "adam":
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        learned = LearnedOptimizer(model, _meta_model(meta_name))
        assert learned.chain is not None, f"{task_name}'s model is not a plain chain: no fused path"
        if kind == "general":
            learned.chain = None

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
    parser.add_argument("--task", default="mnist1d", help="a learned-optimizer task with a plain MLP")
    parser.add_argument("--meta-models", nargs="+", default=list(META_MODELS),
                        choices=META_MODELS + OTHER_META_MODELS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits (no data to generate), 1 round (seconds; no meaningful ratio)")
    args = parser.parse_args(argv)
    if args.quick:
        args.task = "digits"
    set_threads(1)
    methods = {"adam": _stepper(args.task, "adam")}
    for name in args.meta_models:
        for kind in ("general", "fused"):
            methods[f"{name}, {kind}"] = _stepper(args.task, kind, name)
    times = interleaved_median_times(methods, rounds=1 if args.quick else args.rounds,
                                     min_seconds=0.0 if args.quick else 0.2)
    rows = [[name, f"{seconds * 1e3:.2f}", f"{seconds / times['adam']:.1f}x"] for name, seconds in times.items()]
    print(f"task {args.task}, batch {_batch_size(args.task)}, 1 thread, "
          f"{1 if args.quick else args.rounds} interleaved rounds (medians)")
    print(format_table(["method", "ms / step (median)", "vs adam"], rows))
    return 0


def _batch_size(task_name: str) -> int:
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    return get_task(task_name, "cpu").batch_size


if __name__ == "__main__":
    sys.exit(main())
