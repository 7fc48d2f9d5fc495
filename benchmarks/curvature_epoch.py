"""Cost of the curvature task's training step at the paper's batch shape, this checkout against a base commit.

One training step (forward, loss, backward, Adam) of ``gradmetanet`` and ``gradmetanet_pp``
on 32 SIRENs ``1 -> 32 -> 32 -> 1`` with ``B = 128`` datapoints each — the batch of the
``paper`` preset — and one evaluation forward pass of 64 networks (the validation batch), with
the models' default sizes (``ModelConfig()``). An epoch of the paper preset is 63 such steps
and 8 such evaluation passes.

The same code cannot hold both versions, so each is timed in its own worker process: the
base commit's ``src/`` is extracted with ``git archive`` into a temporary directory and put
first on ``PYTHONPATH``; this checkout's ``src/`` likewise. Workers of the two versions
alternate, round after round in a rotating order (the machine is shared), and the table
reports the median per version and their ratio. Both versions take the same steps from the
same seed on the same batches, so their losses afterwards must agree to float tolerance: the
script prints the largest relative difference, a check that the faster code computes the
same thing.

The zoo is generated (``--nets`` networks at the paper's architecture, about a third of a
second each) into ``$GRADGRAPH_CACHE`` (or ``.gradgraph-cache``) on first use.

Usage::

    python benchmarks/curvature_epoch.py                       # against 75e0db2, 3 rounds
    python benchmarks/curvature_epoch.py --baseline HEAD~3 --rounds 5
    python benchmarks/curvature_epoch.py --quick               # tiny SIRENs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradgraph_lab.data import SirenZooConfig

REPO = Path(__file__).resolve().parent.parent
MODELS = ("gradmetanet", "gradmetanet_pp")
#: The commit before the speed-ups of issue 18.
DEFAULT_BASELINE = "75e0db2"


def zoo_config(quick: bool, nets: int, lab: str = "gradgraph_lab") -> SirenZooConfig:
    """The paper's zoo architecture with ``nets`` networks (``--quick``: tiny SIRENs); ``lab`` is
    the package that holds the zoo (``gradgraph`` at a base revision from before the lab split)."""
    import importlib

    SirenZooConfig = importlib.import_module(f"{lab}.data").SirenZooConfig

    if quick:
        return SirenZooConfig(num_nets=nets, hidden=(4, 4), num_inputs=8, num_target_points=16, shard_size=8)
    return SirenZooConfig(num_nets=nets)


#: Profiler events that only make views or allocate: not a kernel launch on an accelerator.
_NOT_KERNELS = {
    "aten::" + name for name in (
        "view", "as_strided", "slice", "select", "transpose", "reshape", "unsqueeze", "squeeze", "expand", "expand_as",
        "t", "permute", "empty", "empty_strided", "empty_like", "alias", "detach", "_reshape_alias", "unflatten",
        "split", "split_with_sizes", "chunk", "narrow", "unbind", "resize_", "lift_fresh", "_unsafe_view", "flatten",
        "view_as", "set_", "result_type", "contiguous",
    )
}
#: Profiler events that read a device value back to the host (a synchronisation on a GPU).
_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal"}


def count_ops(forward_backward: Callable[[], object]) -> dict[str, int]:
    """Kernel-like operations and host read-backs in one call, from ``torch.profiler`` on the CPU.

    A proxy for a GPU step, which is launch-bound at this size: leaf ``aten`` operations that
    are not views or allocations, and the operations that make the host wait for the device
    (``.item()``/``int()``/``bool()`` of a tensor, boolean-mask indexing, ``torch.equal``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        forward_backward()
    events = [event for event in profiler.events() if event.name.startswith("aten::")]
    kernels = [event for event in events if event.name not in _NOT_KERNELS
               and not any(child.name.startswith("aten::") for child in event.cpu_children)]
    return {"ops": len(kernels), "host_reads": sum(event.name in _HOST_READS for event in events)}


def worker(quick: bool, nets: int, steps: int, models: list[str]) -> None:
    """Time the step and the evaluation pass of every model with the gradgraph on ``sys.path``; print JSON."""
    import torch

    import importlib

    import gradgraph

    # the lab moved out of the library into gradgraph_lab; a base revision from before the move
    # has it as gradgraph.data / gradgraph.tasks. Take the lab of the same tree as the library.
    lab = "gradgraph_lab" if (Path(gradgraph.__file__).parent.parent / "gradgraph_lab").is_dir() else "gradgraph"
    load_curvature_data = importlib.import_module(f"{lab}.data").load_curvature_data
    curvature = importlib.import_module(f"{lab}.tasks.curvature")
    CurvatureSource, ModelConfig = curvature.CurvatureSource, curvature.ModelConfig
    build_model, curvature_loss = curvature.build_model, curvature.curvature_loss

    torch.set_num_threads(1)
    data = load_curvature_data(zoo_config(quick, nets, lab), progress=False)
    source = CurvatureSource(data)
    train_size = 4 if quick else 32
    batches = [source.batch(torch.arange(start, start + train_size)) for start in (0, train_size)]
    eval_batch = source.batch(torch.arange(min(len(source), 2 * train_size)))
    config = ModelConfig(hidden_channels=8, component_channels=4, product_channels=4, mlp_hidden=8) if quick \
        else ModelConfig()
    results: dict[str, dict[str, float]] = {}
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, source, config)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(index: int) -> None:
            loss = curvature_loss(model, batches[index % 2])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step(0)  # warm-up: lazy layers, cached structure
        times: dict[str, list[float]] = {key: [] for key in ("step", "step_cpu", "eval", "eval_cpu")}

        def timed(key: str, call: Callable[..., object], *arguments: object) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            call(*arguments)
            times[key].append(time.perf_counter() - wall)
            times[f"{key}_cpu"].append(time.process_time() - cpu)

        for index in range(steps):
            timed("step", step, index)
        with torch.no_grad():
            for _ in range(max(1, steps // 2)):
                timed("eval", model, eval_batch)
        # Operation counts of forward + backward with the decoder chunked as on an accelerator.
        from gradgraph.nn import ComponentProductDecoder

        cpu_chunk = getattr(ComponentProductDecoder, "CHUNK_ELEMENTS_CPU", None)
        if cpu_chunk is not None:
            ComponentProductDecoder.CHUNK_ELEMENTS_CPU = ComponentProductDecoder.CHUNK_ELEMENTS
        counts = count_ops(lambda: curvature_loss(model, batches[1]).backward())  # noqa: B023
        if cpu_chunk is not None:
            ComponentProductDecoder.CHUNK_ELEMENTS_CPU = cpu_chunk
        with torch.no_grad():
            # The models start exactly at the standard estimator (zero gain): only after some
            # Adam steps does the loss depend on what the network computes.
            trained_loss = float(curvature_loss(model, batches[0]))
        results[name] = {"trained_loss": trained_loss, **counts, **{key: statistics.median(values) for key, values in times.items()}}
    print(json.dumps({"gradgraph": str(Path(gradgraph.__file__).parent), "results": results}))


def extract_source(revision: str, destination: Path) -> Path:
    """``src/`` of ``revision`` extracted under ``destination`` (via ``git archive``)."""
    archive = destination / "src.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "-C", str(REPO), "archive", revision, "src"], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")
    return destination / "src"


def run_worker(src: Path, args: argparse.Namespace) -> dict:
    """One worker process with ``src`` first on ``PYTHONPATH``; its parsed JSON."""
    environment = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{REPO / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--nets", str(args.nets),
               "--steps", str(args.steps), "--models", *args.models] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker on {src} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(report["gradgraph"]).resolve() != (src / "gradgraph").resolve():
        raise RuntimeError(f"worker imported gradgraph from {report['gradgraph']}, expected {src}")
    return report["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with ('none': skip)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model and worker")
    parser.add_argument("--nets", type=int, default=64, help="networks in the generated zoo (>= 64)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="tiny SIRENs, one round (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.nets = 1, 1, 8
    if args.worker:
        worker(args.quick, args.nets, args.steps, args.models)
        return

    sys.path.insert(0, str(REPO / "src"))
    from gradgraph_lab.data import load_curvature_data

    load_curvature_data(zoo_config(args.quick, args.nets), progress=False)  # generate once, before timing
    with tempfile.TemporaryDirectory() as temporary:
        versions = {"this": REPO / "src"}
        if args.baseline != "none":
            try:
                versions = {"base": extract_source(args.baseline, Path(temporary)), **versions}
            except (subprocess.CalledProcessError, OSError) as error:
                print(f"baseline {args.baseline}: not available ({error}); timing this checkout only")
        samples: dict[str, list[dict]] = {version: [] for version in versions}
        names = list(versions)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for version in names[shift:] + names[:shift]:
                samples[version].append(run_worker(versions[version], args))

    models = args.models

    def median(version: str, model: str, key: str) -> float:
        return statistics.median(sample[model][key] for sample in samples[version])

    print(f"\nbaseline {args.baseline}, {args.rounds} rounds x {args.steps} steps, one thread; median seconds of "
          "wall time, and of this process's CPU time (user + system: less sensitive to other jobs on the machine)\n")
    header = "| model | measure | base | this | this / base |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for model in models:
        for key, label in (("step", "train step, wall"), ("step_cpu", "train step, CPU"),
                           ("eval", "eval forward of 64, wall"), ("eval_cpu", "eval forward of 64, CPU")):
            this = median("this", model, key)
            if "base" in samples:
                base = median("base", model, key)
                print(f"| {model} | {label} | {base:.3f} | {this:.3f} | {this / base:.2f} |")
            else:
                print(f"| {model} | {label} | - | {this:.3f} | - |")
    print("\nPer forward + backward of one training batch (torch.profiler on the CPU; the decoder chunked as on "
          "an accelerator): kernel-like operations (leaf aten ops that are not views or allocations) and host "
          "read-backs (item/int/bool of a tensor, mask indexing, torch.equal: each a synchronisation on a GPU)\n")
    print("| model | ops: base | ops: this | host reads: base | host reads: this |")
    print("|---|---|---|---|---|")
    for model in models:
        row = [str(samples[version][0][model][key]) if version in samples else "-"
               for key in ("ops", "host_reads") for version in ("base", "this")]
        print(f"| {model} | " + " | ".join(row) + " |")
    if "base" in samples:
        for model in models:
            ratios = " ".join(f"{this[model]['step'] / base[model]['step']:.2f}"
                              for base, this in zip(samples["base"], samples["this"]))
            print(f"\n{model}: train step (wall) this / base in each round: {ratios}")
        for model in models:
            losses = [sample[model]["trained_loss"] for version in samples for sample in samples[version]]
            difference = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-30)
            print(f"\n{model}: loss on the first batch after the {args.steps + 1} steps from the same seed, every "
                  f"worker: {min(losses):.8g} to {max(losses):.8g}, relative difference {difference:.1e}")


if __name__ == "__main__":
    main()
