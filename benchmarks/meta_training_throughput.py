"""Meta-training throughput: the batched path against the per-particle loop, in one run.

Each method is one outer step (one truncation of every particle, then the outer Adam step)
of a :class:`gradgraph.optim.MetaTrainer` on the MNIST-1D meta-task (MLP 40→32→10, batch 128,
inner runs on 80% of the training split, meta-loss on the rest), antithetic PES with
``--particles`` inner runs and truncation ``--truncation``:

* ``<variant>, per-particle loop`` — ``MetaTrainConfig(batched=False)``: a ``to_graph`` per
  particle per inner step and one meta-model call per particle (the path before issue 29);
* ``<variant>, batched`` — ``batched=True``: closed-form batched gradients of all particles
  (:mod:`gradgraph.optim.fused`) and one meta-model call for all of them
  (:func:`gradgraph.optim.batched.vmapped_update`; for GradMetaNet the graphs filled from the
  closed-form factors and one GradMetaNet forward with per-particle weights).

Variants: ``gradmetanet`` (DeepSets + GradMetaNet's embedding, all 128 examples of the batch),
``deepsets`` (per-parameter MLP), ``sgdm`` (``α``, ``μ`` only).

Both compute the same updates (tests/optim/test_optim_protocol.py, 1e-10 in float64); this
measures time only, as inner steps per second (particles × truncation / seconds per outer
step), interleaved rounds, medians (``_common.py``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/meta_training_throughput.py             # 5 rounds
    OMP_NUM_THREADS=1 python benchmarks/meta_training_throughput.py --rounds 2 --task digits
    python benchmarks/meta_training_throughput.py --quick                        # smoke run
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import format_table, interleaved_median_times, set_threads


def _trainer(task_name: str, variant: str, batched: bool, particles: int, truncation: int,
             components: int | None = None):
    from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    bench = get_task(task_name, "cpu")
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=variant == "gradmetanet", residual_adam=variant != "sgdm",
                                         learned_term=variant != "sgdm", max_components=components))
    config = MetaTrainConfig(estimator="pes", num_particles=particles, truncation=truncation, horizon=500,
                             outer_lr=1e-4, batched=batched)
    return MetaTrainer(meta, bench.meta_task, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d", help="a learned-optimizer task with a plain MLP (default mnist1d)")
    parser.add_argument("--variants", nargs="+", default=["gradmetanet", "deepsets", "sgdm"],
                        choices=["gradmetanet", "deepsets", "sgdm"])
    parser.add_argument("--particles", type=int, default=32, help="PES inner runs (the paper protocol: 32)")
    parser.add_argument("--truncation", type=int, default=10, help="inner steps per outer step")
    parser.add_argument("--components", type=int, default=None,
                        help="GradMetaNet reads the factors of this many examples of the batch (default: all 128)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits, 4 particles, truncation 2, 1 round (seconds; no meaningful ratio)")
    args = parser.parse_args(argv)
    if args.quick:
        args.task, args.particles, args.truncation, args.rounds = "digits", 4, 2, 1
    set_threads(args.threads)
    methods, inner_steps = {}, args.particles * args.truncation
    for variant in args.variants:
        for batched in (False, True):
            trainer = _trainer(args.task, variant, batched, args.particles, args.truncation, args.components)
            assert (trainer.chain is not None) == batched, "the batched path does not apply to this task"
            methods[f"{variant}, {'batched' if batched else 'per-particle loop'}"] = trainer.step
    times = interleaved_median_times(methods, rounds=args.rounds, min_seconds=0.0, warmup=1)
    rows = []
    for name, seconds in times.items():
        variant = name.split(",")[0]
        loop = times[f"{variant}, per-particle loop"]
        rows.append([name, f"{seconds * 1e3:.0f}", f"{inner_steps / seconds:.0f}", f"{loop / seconds:.1f}x"])
    print(f"task {args.task}, PES, {args.particles} particles x truncation {args.truncation} = {inner_steps} "
          f"inner steps per outer step, {args.threads} thread(s), {args.rounds} interleaved rounds (medians)")
    print(format_table(["method", "ms / outer step", "inner steps / s", "vs loop"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
