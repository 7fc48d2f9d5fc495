"""The README's Python examples run, in order, in one namespace (so they cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4, "the README lost its examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    graph, output = namespace["graph"], namespace["output"]
    assert output.edge.shape == (graph.edge_index.shape[1], 1)
    assert set(namespace["update"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
