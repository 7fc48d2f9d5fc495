"""Which tests are slow: the ones `./gg test --fast` (`pytest -m "not slow"`) leaves out.

Here, at the repository root, so the rules apply to the notebooks too (nbmake collects them
from notebooks/, where no test file could carry a marker) and to any way pytest is started.
Slow: every notebook, every test of a module whose tests are fuzz campaigns (marked with
``pytestmark = pytest.mark.slow`` in that module), every test that builds a ``transformers``
model, and the command-line end-to-end runs (marked where they are written). `./gg test` and CI
run everything.
"""

from __future__ import annotations

import pytest


def _builds_transformers_models(item: pytest.Item) -> bool:
    """The test asks for a ``transformers`` fixture or names the module in its code.

    In its code: a global or local name (``transformers.BertConfig``, ``import transformers``,
    ``transformers = pytest.importorskip("transformers")``) or a string constant.
    """
    if "transformers" in getattr(item, "fixturenames", ()):
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    if code is None:
        return False
    strings = (value for value in code.co_consts if isinstance(value, str))
    return "transformers" in {*code.co_names, *code.co_varnames, *strings}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb" or _builds_transformers_models(item):
            item.add_marker(pytest.mark.slow)
