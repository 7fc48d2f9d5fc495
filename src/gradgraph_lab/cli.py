"""The ``gradgraph`` command.

Each experiment is a subcommand: a thin layer of flags over a library function. Add one by
writing ``add_<name>_parser(subparsers)`` that sets ``func`` with ``set_defaults`` and
listing it in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run_demo"]


def run_demo(
    hidden: Sequence[int] = (32, 16), num_datapoints: int = 64, seed: int = 0, device: str = "cpu"
) -> dict[str, float]:
    """Convert a small MLP on scikit-learn's bundled digits and check its gradients.

    The MLP (64 -> hidden -> 10, ReLU) is evaluated in float64 with a cross-entropy loss
    on ``num_datapoints`` digits. Per-sample gradients rebuilt from the graph are compared
    with ``torch.func.vmap(grad(...))``. Everything runs on ``device`` (cpu, cuda, auto).

    Returns:
        ``{"nodes", "edges", "components", "parameters", "max_abs_error", "seconds"}``.
    """
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.func import functional_call, grad, vmap

    import gradgraph
    from gradgraph_lab.distributed import resolve_device

    target_device = resolve_device(device)
    torch.manual_seed(seed)
    digits = load_digits()
    inputs = torch.tensor(digits.data[:num_datapoints] / 16.0, dtype=torch.float64)
    targets = torch.tensor(digits.target[:num_datapoints], dtype=torch.long)
    widths = [inputs.shape[1], *hidden, 10]
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).double().to(target_device)
    inputs, targets = inputs.to(target_device), targets.to(target_device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    start = time.perf_counter()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn=loss_fn)
    seconds = time.perf_counter() - start
    from_graph = graph.per_sample_grads()

    params = {name: p.detach() for name, p in model.named_parameters()}

    def one_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x[None],)), y[None])[0]

    reference = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    error = max(float((from_graph[name] - reference[name]).abs().max()) for name in reference)
    return {
        "nodes": graph.num_nodes,
        "edges": int(graph.edge_index.shape[1]),
        "components": graph.num_components,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_abs_error": error,
        "seconds": seconds,
    }


def _demo_command(args: argparse.Namespace) -> int:
    summary = run_demo(hidden=args.hidden, num_datapoints=args.datapoints, seed=args.seed, device=args.device)
    print("gradgraph demo: MLP on scikit-learn digits -> GradGraph")
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        shown = f"{value:.3e}" if key == "max_abs_error" else (f"{value:.4f}" if isinstance(value, float) else value)
        print(f"  {key:<{width}}  {shown}")
    ok = summary["max_abs_error"] <= 1e-10
    print("per-sample gradients match torch.func" if ok else "MISMATCH against torch.func")
    return 0 if ok else 1


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="convert a small MLP on the digits data and check its gradients")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 16], help="hidden widths")
    parser.add_argument("--datapoints", type=int, default=64, help="number of datapoints (components)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default cpu)")
    parser.set_defaults(func=_demo_command)


def _merge_command(command: str, args: argparse.Namespace, results_table: Callable[[dict[str, Any]], str], *,
                   reference: Callable[[dict[str, Any]], str] | None,
                   plot: Callable[[dict[str, Any], Path], Path] | None) -> int:
    """``--merge DIR...``: join the ``results.json`` of runs that differ only in seeds or models,
    write it (and the plot) to ``--output-dir``, print the table; nothing is trained."""
    from gradgraph.errors import GradGraphError
    from gradgraph_lab.tasks.results import merge_results, read_results, write_results

    try:
        parts = [read_results(path) for path in args.merge]
        if reference is None:
            raise GradGraphError(f"gradgraph {command} cannot merge results")
        results = merge_results(parts, reference=reference(parts[0]), sources=[str(path) for path in args.merge])
    except GradGraphError as error:
        print(f"gradgraph {command} --merge: {error}", file=sys.stderr, flush=True)
        return 1
    written = [write_results(results, args.output_dir)]
    if plot is not None:
        written.append(plot(results, args.output_dir))
    print(f"gradgraph {command}: merged {len(parts)} runs (seeds {results['config']['seeds']})\n")
    print(results_table(results))
    print(f"\nmetric: {results['metric']}")
    for part in results["merged_from"]:
        wall = part["wall_seconds"]
        print(f"  {part['source']}: wall time " + (f"{wall:.0f}s" if wall is not None else "unknown")
              + f", device {part['machine'].get('device', '?') if part['machine'] else '?'}")
    print(f"wrote {_listed(written)}")
    return 0


def _listed(paths: Sequence[Path]) -> str:
    """``a, b and c``."""
    names = [str(path) for path in paths]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _curvature_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gradgraph_lab.tasks.curvature import plot_learning_curves, preset, results_table, run_curvature

    config = preset(args.preset)
    if args.nets is not None:
        # Keep the preset's split proportions for the new zoo size.
        total = config.num_train + config.num_val + config.num_test
        num_val = max(1, round(args.nets * config.num_val / total))
        num_test = max(1, round(args.nets * config.num_test / total))
        config = replace(config, zoo=replace(config.zoo, num_nets=args.nets), num_train=args.nets - num_val - num_test,
                         num_val=num_val, num_test=num_test)
    config = _apply_experiment_flags(config, args)

    def plot(results: dict[str, Any], output_dir: Path) -> Path:
        plot_learning_curves(results, output_dir / "curvature.png")
        return output_dir / "curvature.png"

    return _run_experiment("curvature", args, config, run_curvature, results_table,
                           items=f"{config.zoo.num_nets} SIRENs",
                           outputs=[config.output_dir / "results.json", config.output_dir / "curvature.png"],
                           reference=lambda results: "standard", plot=plot)


def add_experiment_flags(parser: argparse.ArgumentParser, *, item: str, models: Sequence[str], output_dir: Path,
                         outputs: str, cache: str) -> None:
    """The flags every training experiment takes: schedule, models, device, where outputs and cache go.

    Args:
        item: what one training item is (``"networks"``), for the batch-size help.
        models: the experiment's model names (``--models`` choices).
        output_dir: default of ``--output-dir``; ``outputs``: what is written there.
        cache: what ``--cache-dir`` holds.
    """
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model and seed")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, help="number of training seeds (0..n-1)")
    seeds.add_argument("--seed", type=int, nargs="+", default=None, metavar="N",
                       help="train exactly these seeds (e.g. --seed 3 4: one process per seed, then --merge)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget per training run: no epoch starts after it (the history says "
                             "how many ran)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted or --max-minutes-capped training runs from the checkpoints in "
                             "<output-dir>/checkpoints (written after every epoch); the settings must match, "
                             "--epochs and --max-minutes may change")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="train nothing: merge the results.json of earlier runs of this experiment that "
                             "differ only in their seeds or models (e.g. one process per --seed) into --output-dir")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help=f"{item} per step")
    parser.add_argument("--models", nargs="+", choices=list(models), default=None, help="models to run")
    parser.add_argument("--output-dir", type=Path, default=output_dir, help=f"{outputs} go here")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"{cache} (default $GRADGRAPH_CACHE or .gradgraph-cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="cpu (default), cuda, or auto (cuda when available); under torchrun rank r of a machine "
                             "uses cuda:LOCAL_RANK")
    parser.add_argument("--dist-timeout", type=float, default=None,
                        help="seconds a rank waits for the others under torchrun before the job fails "
                             "(default $GRADGRAPH_DIST_TIMEOUT or 300)")


def _apply_experiment_flags(config: Any, args: argparse.Namespace) -> Any:
    """``config`` (a task's config dataclass, e.g. from its preset) with the flags of
    :func:`add_experiment_flags` applied: the schedule where given, seeds ``0..n-1``, models,
    output and cache directories, progress, device, resuming."""
    from dataclasses import replace

    schedule = {name: getattr(args, name) for name in ("epochs", "lr", "batch_size") if getattr(args, name) is not None}
    if args.max_minutes is not None:
        schedule["max_seconds"] = 60.0 * args.max_minutes
    if args.seed is not None:
        seeds = tuple(dict.fromkeys(args.seed))  # order kept, repeats dropped
    else:
        seeds = tuple(range(args.seeds)) if args.seeds is not None else config.seeds
    return replace(
        config,
        train=replace(config.train, **schedule),
        seeds=seeds,
        models=tuple(args.models) if args.models else config.models,
        output_dir=args.output_dir,
        cache_root=args.cache_dir,
        progress=not args.quiet,
        device=args.device,
        resume=args.resume,
    )


def _run_experiment(command: str, args: argparse.Namespace, config: Any, run: Callable[[Any, Any], dict[str, Any]],
                    results_table: Callable[[dict[str, Any]], str], *, items: str, outputs: Sequence[Path],
                    notes: Callable[[dict[str, Any]], Sequence[str]] = lambda results: (),
                    reference: Callable[[dict[str, Any]], str] | None = None,
                    plot: Callable[[dict[str, Any], Path], Path] | None = None) -> int:
    """Run one experiment from its flags and print its report; returns the exit code.

    Opens the processes (``torchrun``'s environment, ``--device``, ``--dist-timeout``), prints
    a header on rank 0, calls ``run(config, context)``, and on rank 0 prints the results
    table, the metric, ``notes(results)`` and the wall time and files written. A lost or
    hung rank ends the command with one line on stderr and exit code 1.

    Args:
        command: the subcommand, for messages.
        config: the task's config with the flags applied (:func:`_apply_experiment_flags`).
        run, results_table: the task's run function and table.
        items: what the experiment learns on, for the header (``"2000 SIRENs"``).
        outputs: the files the run writes, for the last line.
        notes: extra lines of the report.
        reference, plot: for ``--merge``: the model improvements are measured against (from
            the merged parts) and a function that draws the merged learning curves into the
            output directory and returns the file.
    """
    if args.merge is not None:
        return _merge_command(command, args, results_table, reference=reference, plot=plot)
    from gradgraph_lab.distributed import DistributedError, init_distributed

    try:
        context = init_distributed(args.device, timeout_s=args.dist_timeout)
    except DistributedError as error:
        print(f"gradgraph {command}: {error}", file=sys.stderr, flush=True)
        return 1
    if context.is_main_process:
        print(
            f"gradgraph {command} ({args.preset}): {items} "
            f"(train {config.num_train} / val {config.num_val} / test {config.num_test}), "
            f"{config.train.epochs} epochs, seeds {list(config.seeds)}, device {context.device}"
            + (f", {context.world_size} processes ({context.backend})" if context.is_distributed else ""),
            flush=True,
        )
    try:
        results = run(config, context)
    except DistributedError as error:
        # One clear line instead of a traceback per rank; torchrun then stops the other ranks.
        print(f"gradgraph {command}: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        context.teardown()
    if not context.is_main_process:
        return 0  # rank 0 prints and writes for the whole job
    print()
    print(results_table(results))
    print(f"\nmetric: {results['metric']}")
    for line in notes(results):
        print(line)
    print(f"wall time {results['wall_seconds']:.0f}s; wrote {_listed(outputs)}")
    return 0


def add_curvature_parser(subparsers: argparse._SubParsersAction) -> None:
    from gradgraph_lab.tasks.curvature import MODEL_NAMES

    parser = subparsers.add_parser(
        "curvature",
        help="the main job: learn to estimate SIREN Fisher diagonals from 128 gradients (GradMetaNet §7.1)",
    )
    parser.add_argument("--preset", choices=["default", "paper", "tiny"], default="default",
                        help="default: 2000 nets, 15 epochs, 1 seed, 3 models, about 5 min on 2 CPU cores from a fresh cache; "
                        "paper: 3000 nets, 100 epochs, 5 seeds")
    parser.add_argument("--nets", type=int, default=None, help="zoo size (splits keep the preset's proportions)")
    add_experiment_flags(parser, item="networks", models=MODEL_NAMES, output_dir=Path("runs/curvature"),
                         outputs="results.json and plot", cache="dataset cache root")
    parser.set_defaults(func=_curvature_command)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo_parser, add_curvature_parser]

# learned optimizer (issue 15): its parser lives with the experiment; heavy imports stay lazy.
from gradgraph_lab.tasks.learned_optimizer.command import add_learned_optimizer_parser  # noqa: E402

SUBCOMMANDS.append(add_learned_optimizer_parser)


def _inr_edit_command(args: argparse.Namespace) -> int:
    from gradgraph_lab.tasks.inr_editing.run import preset, reference_model, results_table, run_inr_editing

    config = _apply_experiment_flags(preset(args.preset), args)
    resolution = config.zoo.resolution
    return _run_experiment(
        "inr-edit", args, config, run_inr_editing, results_table,
        items=f"{config.zoo.num_images} SIRENs on {resolution}x{resolution} digits",
        outputs=[config.output_dir / name for name in ("results.json", "inr_edits.png", "inr_learning_curves.png")],
        notes=lambda results: [
            f"zoo fit: PSNR mean {results['zoo']['psnr_mean']:.1f} dB, min {results['zoo']['psnr_min']:.1f} dB",
            f"targets: {results['targets']}",
        ],
        reference=reference_model,
    )


def add_inr_edit_parser(subparsers: argparse._SubParsersAction) -> None:
    from gradgraph_lab.tasks.inr_editing.models import MODEL_NAMES

    parser = subparsers.add_parser(
        "inr-edit",
        help="edit SIRENs of the digits so they draw the dilated digit, with and without gradients (GradMetaNet §7.3)",
    )
    parser.add_argument("--preset", choices=["default", "paper", "tiny"], default="default",
                        help="default: 1797 INRs, small models, 4 epochs, 3 seeds, about 7.5 min on 2 CPU cores from a "
                        "fresh cache; paper: full-size models, 100 epochs, 5 seeds")
    add_experiment_flags(parser, item="INRs", models=MODEL_NAMES, output_dir=Path("runs/inr-edit"),
                         outputs="results.json, inr_edits.png and inr_learning_curves.png", cache="INR zoo cache root")
    parser.set_defaults(func=_inr_edit_command)


SUBCOMMANDS.append(add_inr_edit_parser)


def _zoo_accuracy_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gradgraph_lab.tasks.zoo_accuracy import preset, results_table, run_zoo_accuracy

    config = preset(args.preset)
    if args.nets is not None:
        # Keep the preset's split proportions (in networks) for the new zoo size.
        total = config.num_train + config.num_val + config.num_test
        num_val = max(1, round(args.nets * config.num_val / total))
        num_test = max(1, round(args.nets * config.num_test / total))
        config = replace(config, zoo=replace(config.zoo, num_nets=args.nets), num_train=args.nets - num_val - num_test,
                         num_val=num_val, num_test=num_test)
    if args.unpooled or args.train_components is not None:
        model = replace(config.model, unpooled=args.unpooled or config.model.unpooled)
        if args.train_components is not None:
            model = replace(model, train_components=args.train_components)
        config = replace(config, model=model)
    config = _apply_experiment_flags(config, args)
    zoo = config.zoo
    return _run_experiment(
        "zoo-accuracy", args, config, run_zoo_accuracy, results_table,
        items=f"{zoo.num_nets} {zoo.dataset} {zoo.architecture.upper()}s x {zoo.num_checkpoints} checkpoints "
              "(splits in networks)",
        outputs=[config.output_dir / "results.json", config.output_dir / "zoo_accuracy_scatter.png"],
        notes=lambda results: [f"zoo: {results['zoo']['members']} members, test accuracy "
                               f"{results['zoo']['accuracy_min']:.3f} .. {results['zoo']['accuracy_max']:.3f} "
                               f"(median {results['zoo']['accuracy_median']:.3f})"],
    )


def add_zoo_accuracy_parser(subparsers: argparse._SubParsersAction) -> None:
    from gradgraph_lab.tasks.zoo_accuracy import MODEL_NAMES, PRESETS

    parser = subparsers.add_parser(
        "zoo-accuracy",
        help="predict zoo networks' test accuracy from gradients vs weights: statistics baselines, GradMetaNet, "
             "GradMetaNet++ and a weights-only graph metanetwork (issue 30)",
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="default: 100 digits MLPs x 4 checkpoints, 6 predictors, GradMetaNet on 16 random "
                        "datapoints per step (under 10 min on 2 CPU cores); full: the same zoo, all 9 predictors; "
                        "cnn: 100 digits CNNs (Small CNN Zoo recipe); "
                        "mnist1d-cnn: 100 MNIST-1D CNNs; graph models 15 epochs, 5 seeds (docs/zoo.md has the wall "
                        "times on 2 cores); paper, cnn-paper: 1000 nets, 100 epochs; tiny*: smoke runs")
    parser.add_argument("--nets", type=int, default=None, help="networks in the zoo (splits keep the preset's "
                        "proportions)")
    parser.add_argument("--unpooled", action="store_true", help="GradMetaNet reads a CNN's components unpooled, one "
                        "per datapoint x position (16-20x the cost and memory; pair with --train-components and a "
                        "smaller --batch-size)")
    parser.add_argument("--train-components", type=int, default=None, metavar="K", help="GradMetaNet reads a random "
                        "K components of every graph per training step, all of them when evaluated (0: all)")
    add_experiment_flags(parser, item="zoo members", models=MODEL_NAMES, output_dir=Path("runs/zoo-accuracy"),
                         outputs="results.json and zoo_accuracy_scatter.png", cache="zoo graph cache root")
    parser.set_defaults(func=_zoo_accuracy_command)


SUBCOMMANDS.append(add_zoo_accuracy_parser)


LAB_REQUIREMENTS = {"tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def missing_lab_requirements() -> list[str]:
    """The ``lab`` extra's packages that are not installed (their names on the package index)."""
    from importlib.util import find_spec

    return [package for module, package in LAB_REQUIREMENTS.items() if find_spec(module) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradgraph`` command; returns the exit code."""
    missing = missing_lab_requirements()
    if missing:
        print(
            f"gradgraph: the experiments need the 'lab' extra; missing {', '.join(missing)}. "
            'Install it with: pip install -e ".[lab]" (from the clone) or ./gg, which installs everything.',
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog="gradgraph", description="Learning on neural-network gradients.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
