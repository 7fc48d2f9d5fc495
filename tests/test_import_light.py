"""The library stays apart from the lab: ``import gradgraph`` (and each of its public
subpackages) loads none of the experiments' dependencies and not ``gradgraph_lab``.

What torch, torch-geometric and networkx load themselves (torch-geometric imports tqdm) is
the baseline; the library may add none of the lab's modules to it."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAB_ONLY = ("gradgraph_lab", "tqdm", "matplotlib", "sklearn", "mnist1d")


@pytest.mark.parametrize(
    "statement",
    [
        "import gradgraph",
        "import gradgraph.nn, gradgraph.optim, gradgraph.symmetry, gradgraph.convert, gradgraph.testing, "
        "gradgraph.datasets",
    ],
)
def test_library_imports_no_lab_dependency(statement: str) -> None:
    probe = (
        "import sys; import torch, torch_geometric, networkx; "
        "before = {m.split('.')[0] for m in sys.modules}; "
        f"{statement}; "
        f"print(sorted(({{m.split('.')[0] for m in sys.modules}} - before) & set({LAB_ONLY!r})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", f"{statement} imported {result.stdout.strip()}"


def test_cli_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from gradgraph_lab import cli

    monkeypatch.setattr(cli, "LAB_REQUIREMENTS", {"a_module_that_is_not_installed": "not-installed-package"})
    assert cli.main(["demo"]) == 2
    assert "not-installed-package" in capsys.readouterr().err
