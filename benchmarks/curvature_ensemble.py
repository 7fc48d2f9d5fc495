"""How much do the curvature runs gain as an ensemble? Every trained run's best weights,
read from its checkpoint, and the average of their predictions, on the test networks.

Not a speed benchmark: a probe of where the curvature models' error comes from. Seeds of one
model differ only in their initialisation and shuffling, so what averaging their predictions
removes is the seed-to-seed variance; what is left is the error they share.

Run ``python benchmarks/curvature_ensemble.py RUN_DIR [RUN_DIR ...]`` on the output
directories of ``gradgraph curvature`` runs of one zoo and split (each holds ``results.json``
and ``checkpoints/<model>-seed<s>.pt``, e.g. one process per ``--seed``). ``--quick`` trains
two seeds of the tiny preset into a temporary directory first (smoke run). Prints one row per
run, then one per model's ensemble and one for all runs together: mean normalised ℓ2 test
error and the change against the standard estimator.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from gradgraph_lab.data import InputFamily, SirenZooConfig, load_curvature_data
from gradgraph_lab.tasks.curvature import CurvatureConfig, ModelConfig, build_model, normalised_l2
from gradgraph_lab.tasks.curvature.run import make_splits
from gradgraph_lab.tasks.results import read_results


def config_of(run_dir: Path) -> CurvatureConfig:
    """The :class:`CurvatureConfig` a run's ``results.json`` records (zoo, splits, model sizes)."""
    recorded: dict[str, Any] = read_results(run_dir)["config"]
    zoo = dict(recorded["zoo"], hidden=tuple(recorded["zoo"]["hidden"]), family=InputFamily(**recorded["zoo"]["family"]))
    return CurvatureConfig(zoo=SirenZooConfig(**zoo), num_train=recorded["num_train"], num_val=recorded["num_val"],
                           num_test=recorded["num_test"], seeds=(0,), models=("standard",),
                           model=ModelConfig(**recorded["model"]), cache_root=recorded.get("cache_root"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="output directories of gradgraph curvature runs")
    parser.add_argument("--quick", action="store_true", help="train two tiny seeds first and ensemble them")
    parser.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default: the runs' own)")
    args = parser.parse_args()
    runs = list(args.runs)
    if args.quick:
        from gradgraph_lab.cli import main as gradgraph

        scratch_dir = tempfile.TemporaryDirectory(prefix="gg-ensemble-")  # removed when main returns or fails
        scratch = Path(scratch_dir.name)
        for seed in (0, 1):
            gradgraph(["curvature", "--preset", "tiny", "--seed", str(seed), "--epochs", "2", "--quiet",
                       "--models", "standard", "gradmetanet", "--output-dir", str(scratch / f"seed{seed}")])
        runs = [scratch / "seed0", scratch / "seed1"]
    if not runs:
        parser.error("name at least one run directory (or --quick)")
    configs = [config_of(run) for run in runs]
    for run, config in zip(runs[1:], configs[1:]):
        if (config.zoo, config.num_train, config.num_val, config.num_test) != (
                configs[0].zoo, configs[0].num_train, configs[0].num_val, configs[0].num_test):
            raise SystemExit(f"{run} is another zoo or split than {runs[0]}: ensembles need one test set")
    config = configs[0]
    data = load_curvature_data(config.zoo, cache_root=args.cache_dir or config.cache_root, progress=False)
    splits = make_splits(config, data)
    batches = list(splits["test"].batches(64, shuffle=False))
    target = torch.cat([batch.target for batch in batches])
    standard = float(normalised_l2(torch.cat([batch.standard for batch in batches]), target).mean())

    rows = []
    with torch.no_grad():
        for run, run_config in zip(runs, configs):
            for path in sorted((run / "checkpoints").glob("*-seed*.pt")):
                name, seed = path.stem.rsplit("-seed", 1)
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)["state"]  # a fit checkpoint
                model = build_model(name, splits["train"], run_config.model)
                model(batches[0])  # lazy layers take their shapes from a first batch
                model.load_state_dict(checkpoint["best_state"])
                model.eval()
                rows.append((run.name, name, seed, checkpoint["best_epoch"], checkpoint["epoch"],
                             torch.cat([model(batch) for batch in batches])))
    if not rows:
        raise SystemExit(f"no checkpoints/<model>-seed<s>.pt under {[str(run) for run in runs]}")

    def change(error: float) -> str:
        return f"{100 * (error - standard) / standard:+.1f}%"

    print(f"| run | model | seed | best epoch / epochs | test error ‖pred − F‖/‖F‖ | vs standard ({standard:.4f}) |")
    print("|---|---|---|---|---|---|")
    for run_name, name, seed, best, epochs, prediction in rows:
        error = float(normalised_l2(prediction, target).mean())
        print(f"| {run_name} | {name} | {seed} | {best} / {epochs} | {error:.4f} | {change(error)} |")
    groups: dict[str, list[torch.Tensor]] = {}
    for _, name, _, _, _, prediction in rows:
        groups.setdefault(name, []).append(prediction)
    if len(groups) > 1:
        groups["all"] = [prediction for *_, prediction in rows]
    for name, members in groups.items():
        error = float(normalised_l2(torch.stack(members).mean(0), target).mean())
        print(f"| ensemble | {name} | {len(members)} runs | — | {error:.4f} | {change(error)} |")


if __name__ == "__main__":
    main()
