"""Every Python block of README.md and docs/guides/*.md runs on its own and prints what it shows.

Each block runs alone (``code_blocks.py``: a fresh namespace in a forked process), so a block
that leans on an earlier one's variables or forgets an import fails here. Where a ```text
block follows the code, the printed output must match it (``...`` matches anything).
Checked to fail: a block that used ``graph`` from the block before it raised NameError
here, and a shown shape edited to ``[23, 31]`` failed the comparison.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]

sys.path.insert(0, str(Path(__file__).parent))
from code_blocks import extract_blocks  # noqa: E402

BLOCKS = [block for document in DOCUMENTS for block in extract_blocks(document)]


def _block_id(block: dict) -> str:
    return f"{Path(block['file']).relative_to(ROOT)}:{block['line']}"


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """Every block's run, keyed by ``file:line``: one process, one fork per block."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    environment.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "code_blocks.py"), *map(str, DOCUMENTS)],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=1800,
    )
    assert process.returncode == 0, process.stderr
    return {_block_id(result): result for result in map(json.loads, process.stdout.splitlines())}


def test_the_documents_have_examples():
    readme_blocks = [block for block in BLOCKS if block["file"].endswith("README.md")]
    assert len(readme_blocks) >= 3, "the README lost its tour"
    assert all(block["expected"] is not None for block in readme_blocks), "every README block shows its output"


# one worker runs them all (with `--dist loadgroup`, as ./gg test passes): the module's fixture
# runs every block at once, and a second worker would run them all again
@pytest.mark.xdist_group("documentation_code_blocks")
@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_block_runs_alone_and_prints_what_it_shows(block, results):
    result = results[_block_id(block)]
    assert result["error"] is None, f"{_block_id(block)} failed when run alone:\n{result['error']}"
    if block["expected"] is not None:
        checker = doctest.OutputChecker()
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        assert checker.check_output(block["expected"], result["stdout"], flags), (
            f"{_block_id(block)} printed\n{result['stdout']}\nbut the document shows\n{block['expected']}"
        )
