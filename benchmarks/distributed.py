"""Training throughput of ``gradgraph curvature`` in 1 process vs 2 processes (torchrun, gloo).

Every configuration runs the same command — GradMetaNet, one seed, the default zoo and
batch size — as a fresh job; the zoo is generated once beforehand into a shared cache.
Throughput is training networks per second in the steady state: ``num_train`` networks
per epoch divided by the mean wall time of epochs 2..E (epoch 1 holds warm-up; an epoch's
time includes its validation pass), read from each job's ``results.json``. Configurations
run interleaved, round after round, and each reports its median over rounds, because
the machine may be shared.

    python benchmarks/distributed.py            # 3 rounds, 1000 networks, 4 epochs
    python benchmarks/distributed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _command(processes: int, args: argparse.Namespace, output: Path, cache: Path) -> list[str]:
    gradgraph = [str(BIN / "gradgraph"), "curvature", "--models", "gradmetanet", "--seeds", "1",
                 "--nets", str(args.nets), "--epochs", str(args.epochs), "--output-dir", str(output),
                 "--cache-dir", str(cache), "--quiet"]
    if processes == 1:
        return gradgraph
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes), *gradgraph]


def _run(processes: int, threads: int, args: argparse.Namespace, output: Path, cache: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(_command(processes, args, output, cache), env=env, capture_output=True, text=True,
                            timeout=3600)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    results = json.loads((output / "results.json").read_text())
    history = results["models"]["gradmetanet"]["histories"][0]
    num_train = results["config"]["num_train"]
    steady = history[2:] if len(history) > 2 else history[1:]
    first = history[1]["seconds"] if len(history) > 2 else 0.0
    epoch_seconds = (steady[-1]["seconds"] - first) / len(steady)
    return {"nets_per_s": num_train / epoch_seconds, "epoch_s": epoch_seconds, "job_s": wall,
            "world_size": results["world_size"], "threads": results["machine"]["torch_threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    args = parser.parse_args()
    if args.quick:
        args.nets, args.epochs, args.rounds = 60, 2, 1
    configurations = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes, 1 thread each": (2, 1)}
    work = Path(tempfile.mkdtemp(prefix="gg-dist-bench-"))
    try:
        cache = work / "cache"
        subprocess.run([str(BIN / "gradgraph"), "curvature", "--models", "standard", "--seeds", "1", "--nets",
                        str(args.nets), "--epochs", "1", "--output-dir", str(work / "warm"), "--cache-dir",
                        str(cache), "--quiet"], check=True, capture_output=True)
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in configurations}
        names = list(configurations)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names):] + names[: round_index % len(names)]:
                processes, threads = configurations[name]
                measured[name].append(_run(processes, threads, args, work / "out", cache))
                print(f"round {round_index + 1}: {name}: {measured[name][-1]['nets_per_s']:.0f} networks/s",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(run["nets_per_s"] for run in measured[names[0]])
    print(f"\nGradMetaNet training on the curvature zoo: {args.nets} networks, {args.epochs} epochs, "
          f"median of {args.rounds} round(s)\n")
    print("| configuration | training networks/s | epoch s | whole job s | vs 1 process, 1 thread |")
    print("|---|---|---|---|---|")
    for name in names:
        runs = measured[name]
        speed = statistics.median(run["nets_per_s"] for run in runs)
        print(f"| {name} | {speed:.0f} | {statistics.median(r['epoch_s'] for r in runs):.2f} | "
              f"{statistics.median(r['job_s'] for r in runs):.1f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
