"""Flags of ``gradgraph learned-optimizer`` (imported by :mod:`gradgraph_lab.cli`; heavy imports are lazy).

* default: evaluate the shipped pretrained optimizer against tuned Adam (the control), Adam
  with a tuned cosine decay, on the MNIST-1D MLP, 20 test seeds, 500 steps (under 10 minutes
  on one CPU core): progress bars, a results table, ``loss_vs_step.png``, ``results.json``;
* ``--meta-train``: meta-train from scratch (``--preset default``: 30 min on 2 cores;
  ``long``: 4 h; ``tiny``: 1 min), resumable from ``<output-dir>/checkpoint.pt``;
  ``--export FILE`` writes the meta-model file that ``--gradmetanet FILE`` (or, copied into
  ``gradgraph/optim/pretrained/``, ``from_pretrained``) reads.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["FAMILIES", "META_PRESETS", "TASKS", "add_learned_optimizer_parser"]

#: the task names (``tasks.TASK_NAMES``, repeated here so that building the parser imports no torch).
TASKS = ["mnist1d", "mnist1d-wide", "mnist1d-tanh", "digits", "digits-wide", "charlm"]
#: the task families (``tasks.TASK_FAMILIES``), for ``--meta-train --family``.
FAMILIES = ["mnist1d-family"]

#: meta-training presets: budget (minutes), particles, truncation, horizon, and for ``paper`` the
#: paper's protocol (``gradgraph.optim.PAPER_PROTOCOL``: 16 antithetic pairs, truncation 50, outer Adam
#: 1e-4, a clip at 3x the running mean norm instead of 1) with the first-passage meta-loss; its
#: horizon, 500, is the MNIST-1D benchmark's budget. Flags given on the command line win.
META_PRESETS = {
    "tiny": {"minutes": 1.0, "num_particles": 2, "truncation": 5, "horizon": 50},
    "default": {"minutes": 30.0, "num_particles": 8, "truncation": 10, "horizon": 300},
    "long": {"minutes": 240.0, "num_particles": 16, "truncation": 20, "horizon": 1000},
    "paper": {"minutes": 150.0, "num_particles": 32, "truncation": 50, "horizon": 500, "outer_lr": 1e-4,
              "scalar_lr": 1e-3, "grad_clip": None, "grad_clip_relative": 3.0, "meta_loss": "first-passage"},
}


def _command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.export_from is not None:
        from gradgraph_lab.tasks.learned_optimizer.meta import export_from_checkpoint

        if args.export is None:
            raise SystemExit("gradgraph learned-optimizer: --export-from needs --export FILE")
        provenance = export_from_checkpoint(args.export_from, args.export)
        selected = provenance["selected_outer_step"]
        print(f"exported outer step {provenance['outer_steps'] if selected is None else selected} of "
              f"{args.export_from} to {args.export}")
        return 0
    if args.meta_train:
        from gradgraph_lab.tasks.learned_optimizer.meta import MetaRunConfig, run_meta_training

        preset = dict(META_PRESETS[args.preset])
        if args.minutes is not None:
            preset["minutes"] = args.minutes
        for flag, key in (("particles", "num_particles"), ("truncation", "truncation"), ("horizon", "horizon")):
            if getattr(args, flag) is not None:
                preset[key] = getattr(args, flag)
        for key in ("outer_lr", "scalar_lr", "meta_loss", "schedule", "scalars_first", "init_from", "alpha", "beta"):
            if getattr(args, key) is not None:
                preset[key] = getattr(args, key)
        config = MetaRunConfig(task=args.family or args.tasks[0], variant=args.variant, estimator=args.estimator,
                               seed=args.seed,
                               out_dir=str(args.out_dir / f"meta-{args.variant}"), progress=not args.quiet,
                               max_outer_steps=args.max_outer_steps, start=args.start, select_every=args.select_every,
                               select_seeds=args.select_seeds,
                               device=args.device, temperature=args.temperature, **preset)
        from gradgraph_lab.distributed import init_distributed

        context = init_distributed(args.device)  # one process unless started by torchrun
        try:
            trainer = run_meta_training(config, export=args.export, context=context)
        finally:
            context.teardown()
        if not context.is_main_process:
            return 0
        last = trainer.history[-1] if trainer.history else {}
        print(f"meta-trained {config.variant} on {config.task} ({config.estimator}): {trainer.outer_steps} outer steps, "
              f"alpha={last.get('alpha', float('nan')):.4g} beta={last.get('beta', float('nan')):.4g} "
              f"mu={last.get('mu', float('nan')):.4g}; checkpoint in {config.out_dir}"
              + (f"; exported {args.export}" if args.export else ""))
        print(f"wall time {time.perf_counter() - start:.0f}s")
        return 0
    from gradgraph_lab.tasks.learned_optimizer.run import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(tasks=tuple(args.tasks), optimizers=tuple(args.optimizers), gradmetanet=args.gradmetanet,
                             deepsets=args.deepsets, learned_sgdm=args.learned_sgdm, steps=args.steps, seeds=args.seeds,
                             tuning_seeds=args.tuning_seeds, grid_size=args.grid_size, window=args.window,
                             target_fraction=args.target_fraction,
                             out_dir=str(args.out_dir / "benchmark"), progress=not args.quiet, device=args.device)
    run_benchmark(config)
    print((args.out_dir / "benchmark" / "results.md").read_text())
    print("metric: L* = minimum of the smoothed mean test curve of tuned Adam's reference runs, first reached at step "
          "N; for each run the first step n whose smoothed test loss is <= L*; step reduction N/n over test seeds "
          "0..%d (unreached runs count N/steps, an upper bound), 95%% bootstrap intervals" % (config.seeds - 1))
    print(f"wall time {time.perf_counter() - start:.0f}s; wrote {args.out_dir / 'benchmark'}/results.json, "
          "results.md, loss_vs_step.png")
    return 0


def add_learned_optimizer_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gradgraph learned-optimizer``."""
    from pathlib import Path

    parser = subparsers.add_parser(
        "learned-optimizer",
        help="the GradMetaNet learned optimizer (§7.2): benchmark the pretrained one vs tuned Adam, or --meta-train",
    )
    parser.add_argument("--meta-train", action="store_true", help="meta-train a learned optimizer instead of benchmarking")
    parser.add_argument("--tasks", nargs="+", default=["mnist1d"], choices=TASKS,
                        help="benchmark tasks (meta-training uses the first); mnist1d is the main task, generated "
                             "locally by the mnist1d package (~45 s once, then cached)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="with --meta-train: meta-train on this task family (several MLPs at once: widths, "
                             "depths, activations, batch sizes; docs/experiments/learned-optimizer.md) instead of "
                             "the first of --tasks; needs --start fixed")
    parser.add_argument("--optimizers", nargs="+", default=["adam", "adam-cosine", "gradmetanet"],
                        choices=["adam", "adam-cosine", "sgdm", "learned-sgdm", "deepsets", "gradmetanet"],
                        help="rows of the table: adam is the control (Adam at the target's own rate on the test "
                             "seeds), adam-cosine Adam with a tuned cosine decay")
    parser.add_argument("--gradmetanet", default=None,
                        help="shipped name or export file of ours, used on every task (default: each task's shipped "
                             "file: mnist1d-mlp on the MLP tasks, charlm-transformer on charlm)")
    parser.add_argument("--deepsets", default=None,
                        help="shipped name or export file of the DeepSets variant (default: each task's, "
                             "mnist1d-mlp-deepsets / charlm-transformer-deepsets)")
    parser.add_argument("--learned-sgdm", default=None,
                        help="shipped name or export file of the learned SGDM variant (alpha, mu and the schedule "
                             "meta-learned; default: each task's '<file>-sgdm')")
    parser.add_argument("--steps", type=int, default=500,
                        help="step budget of every benchmark run (= the paper protocol's meta-training horizon)")
    parser.add_argument("--seeds", type=int, default=20,
                        help="test seeds 0..n-1; the target comes from as many reference seeds 300..")
    parser.add_argument("--tuning-seeds", type=int, default=3,
                        help="seeds of the learning-rate grid searches (on the validation split)")
    parser.add_argument("--grid-size", type=int, default=20, help="learning rates per grid (the paper: 20)")
    parser.add_argument("--window", type=int, default=5,
                        help="trailing moving average of every test curve, in evaluations, before the target and "
                             "the first passage are read off")
    parser.add_argument("--target-fraction", type=float, default=0.8,
                        help="Adam's tuning and reference runs get this fraction of --steps, so that a run slower "
                             "than Adam's mean can score below 1 within the budget")
    parser.add_argument("--variant", choices=["gradmetanet", "deepsets", "sgdm"], default="gradmetanet",
                        help="meta-train this variant (sgdm: only alpha and mu, beta fixed at 0)")
    parser.add_argument("--estimator", choices=["tbptt", "pes"], default="pes", help="meta-gradient estimator")
    parser.add_argument("--start", choices=["tuned-adam", "fixed"], default="tuned-adam",
                        help="meta-training's start: Adam at the lr tuned on the validation split, or fixed alpha/beta")
    parser.add_argument("--select-every", type=int, default=25,
                        help="score the meta-model on the validation protocol every N outer steps (0: never) and "
                             "export the best, outer step 0 included")
    parser.add_argument("--select-seeds", type=int, default=5,
                        help="validation runs per candidate of --select-every (more: a steadier score, a slower run)")
    parser.add_argument("--meta-loss", choices=["log-loss", "time-above-target", "first-passage"], default=None,
                        help="meta-training's loss per truncation: mean log held-out loss, the smoothed number of "
                             "steps above tuned Adam's best validation loss, or the smoothed probability of not yet "
                             "having been below it (default: the preset's, else time-above-target)")
    parser.add_argument("--temperature", type=float, default=0.25,
                        help="tau of the target meta-losses (a relative gap to Adam's best, log space)")
    parser.add_argument("--preset", choices=sorted(META_PRESETS), default="default", help="meta-training budget preset")
    parser.add_argument("--minutes", type=float, default=None, help="override the preset's wall-clock budget")
    parser.add_argument("--particles", type=int, default=None,
                        help="override the preset's number of inner runs per outer step (PES: even, antithetic pairs)")
    parser.add_argument("--truncation", type=int, default=None, help="override the preset's inner steps per outer step")
    parser.add_argument("--horizon", type=int, default=None,
                        help="override the preset's inner-run length (also the validation protocol's step budget)")
    parser.add_argument("--outer-lr", type=float, default=None,
                        help="outer Adam learning rate of the MLP and GradMetaNet (default 1e-3)")
    parser.add_argument("--scalar-lr", type=float, default=None,
                        help="outer Adam learning rate of log alpha, log beta, logit mu (default 1e-3)")
    parser.add_argument("--schedule", action=argparse.BooleanOptionalAction, default=None,
                        help="the rule learns a step-size schedule exp(w . time features), w starting at 0 "
                             "(default: the preset's, else off)")
    parser.add_argument("--scalars-first", type=int, default=None,
                        help="train only alpha, beta, mu and the schedule for this many outer steps, then everything "
                             "(default: the preset's, else 0)")
    parser.add_argument("--init-from", default=None,
                        help="start from this meta-model file's meta-parameters of the same name and shape (a staged "
                             "run: e.g. a learned SGDM rule's alpha, mu and schedule); needs --start fixed")
    parser.add_argument("--alpha", type=float, default=None, help="start value of alpha with --start fixed (default 0.1)")
    parser.add_argument("--beta", type=float, default=None, help="start value of beta with --start fixed (default 0.3)")
    parser.add_argument("--max-outer-steps", type=int, default=1_000_000, help="stop meta-training after this many outer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, default=None, help="write the meta-model file here after meta-training")
    parser.add_argument("--export-from", type=Path, default=None,
                        help="write --export from this meta-training checkpoint (its selected candidate, else its last "
                             "meta-model) and stop: for a run stopped before its budget")
    parser.add_argument("--output-dir", "--out-dir", dest="out_dir", type=Path, default=Path("runs/learned-optimizer"),
                        help="outputs go here (the same flag as curvature and inr-edit; --out-dir is kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the inner models, the meta-model and the data live (default cpu; cuda needs a GPU)")
    parser.set_defaults(func=_command)
