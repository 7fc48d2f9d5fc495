"""The `gradgraph demo` command runs and checks gradients against torch.func."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradgraph_lab.cli import main, run_demo


def test_run_demo_reports_an_exact_match():
    summary = run_demo(hidden=(8,), num_datapoints=16)
    assert summary["nodes"] == 64 + 8 + 10
    assert summary["edges"] == 64 * 8 + 8 * 10
    assert summary["components"] == 16
    assert summary["parameters"] == 64 * 8 + 8 + 8 * 10 + 10
    assert summary["max_abs_error"] <= 1e-10


def test_main_prints_a_summary(capsys):
    assert main(["demo", "--hidden", "4", "--datapoints", "8"]) == 0
    out = capsys.readouterr().out
    assert "per-sample gradients match torch.func" in out and "components" in out


@pytest.mark.slow  # a command-line end-to-end run in a new interpreter
def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "gradgraph_lab.cli", "demo", "--datapoints", "4"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "max_abs_error" in result.stdout
