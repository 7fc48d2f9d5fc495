"""Run the Python blocks of the README and the guides, each alone, and report what they print.

``python tests/docs/code_blocks.py FILE.md ...`` prints one JSON line per block:
``{"file", "line", "code", "expected", "stdout", "error"}``. Each block runs in a child
process forked from this one after it imported torch, torch-geometric and gradgraph once
(about 5 CPU seconds an interpreter here), so every block starts from an empty namespace
and untouched gradgraph state — a block that forgets an import or leans on a variable of
the block before it fails — without paying the import again.

What a block must print is the ```text block that follows it (blank lines between them
allowed); ``...`` in it matches anything (doctest's ELLIPSIS), so values that vary (random
losses, timings) can be elided. A block with no ```text block after it must run without
error and may print anything.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# ```python ... ``` optionally followed by ```text ... ```; the fences start a line.
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```\n(?:\s*^```text\n(?P<text>.*?)^```\n)?", re.DOTALL | re.MULTILINE)

SECONDS_PER_BLOCK = 240


def extract_blocks(path: Path) -> list[dict]:
    """The Python blocks of a Markdown file: ``[{"file", "line", "code", "expected"}]``.

    ``expected`` is the text of the ```text block right after the code, or ``None``.
    """
    text = path.read_text()
    return [
        {
            "file": str(path),
            "line": text.count("\n", 0, match.start()) + 1,
            "code": match["code"],
            "expected": match["text"],
        }
        for match in BLOCK.finditer(text)
    ]


def _run_in_child(block: dict) -> dict:
    """Fork, run ``block["code"]`` in a fresh ``__main__`` namespace, return stdout and error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the block, send back a JSON line, exit without cleanup
        os.close(read_end)
        out, error = io.StringIO(), None
        signal.alarm(SECONDS_PER_BLOCK)
        try:
            with redirect_stdout(out), redirect_stderr(io.StringIO()):
                code = compile(block["code"], f"{block['file']}:{block['line']}", "exec")
                exec(code, {"__name__": "__main__"})  # noqa: S102 - our own documentation
        except BaseException:  # noqa: BLE001 - every failure is reported to the parent
            error = traceback.format_exc()
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(json.dumps({"stdout": out.getvalue(), "error": error}))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        reply = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not reply:
        return {"stdout": "", "error": f"the block's process died (wait status {status})"}
    return json.loads(reply)


def main(paths: list[str]) -> None:
    # Heavy imports once, in the parent; nothing is computed here, so the forked children
    # inherit no OpenMP thread pool.
    import torch  # noqa: F401
    import torch_geometric  # noqa: F401

    import gradgraph  # noqa: F401
    import gradgraph.nn  # noqa: F401
    import gradgraph.optim  # noqa: F401

    for path in paths:
        for block in extract_blocks(Path(path)):
            print(json.dumps({**block, **_run_in_child(block)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
