"""Each benchmark script runs end to end on tiny sizes and prints its table (no timing checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# each script end to end in its own interpreter: left out by `./gg test --fast`
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["capture.py", "metanet.py", "scatter.py", "curvature_headroom.py", "traced.py",
                                    "traced.py --model mlp", "traced.py --model gpt2", "traced.py --model gcn",
                                    "traced.py --model resnet8",
                                    "curvature_epoch.py", "curvature_ensemble.py", "linear.py",
                                    "meta_training_throughput.py", "learned_optimizer_step.py", "recurrent.py",
                                    "zoo_unpooled.py"])
def test_benchmark_script_runs_quick(script: str, tmp_path: Path) -> None:
    name, *flags = script.split()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--quick", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
        # generated zoos stay out of the checkout; the benchmarks import this checkout's gradgraph (the
        # venv's editable install may point at another worktree)
        env={**os.environ, "GRADGRAPH_CACHE": str(tmp_path),
             "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table_lines) >= 3, result.stdout  # header, separator, at least one row
