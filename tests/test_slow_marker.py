"""`./gg test --fast` (`pytest -m "not slow"`) leaves out what conftest.py at the root calls slow.

Checked to fail: with the root conftest's hook emptied, the notebook and the three kinds of
transformers tests below are left unmarked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeItem:
    """What the hook reads of a collected item: path, fixtures, function; what it writes: markers."""

    def __init__(self, path: str, function=None, fixturenames=()) -> None:
        self.path, self.function, self.fixturenames, self.markers = Path(path), function, fixturenames, []

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


def uses_the_fixture(transformers):
    return transformers.BertConfig


def uses_a_global():
    return transformers.GPT2Config  # noqa: F821 - only read by the hook, never called


def imports_it_locally():
    transformers = pytest.importorskip("transformers")
    return transformers


def plain():
    return 1 + 1


def test_notebooks_and_transformers_tests_are_marked_slow_and_plain_tests_are_not():
    items = {
        "notebook": FakeItem("notebooks/01_graph_conversion.ipynb"),
        "fixture": FakeItem("tests/a.py", uses_the_fixture, ("transformers",)),
        "global": FakeItem("tests/a.py", uses_a_global),
        "local": FakeItem("tests/a.py", imports_it_locally),
        "plain": FakeItem("tests/a.py", plain, ("tmp_path",)),
    }
    _root_conftest().pytest_collection_modifyitems(None, list(items.values()))
    assert {name: item.markers for name, item in items.items()} == {
        "notebook": ["slow"], "fixture": ["slow"], "global": ["slow"], "local": ["slow"], "plain": []}


def test_fuzz_campaigns_and_benchmark_scripts_are_slow_modules():
    import test_benchmarks_smoke
    from convert import test_convert_fuzz

    assert test_convert_fuzz.pytestmark.name == "slow" and test_benchmarks_smoke.pytestmark.name == "slow"
