"""Where two configurations differ, by dotted path: the one helper every "this checkpoint / cache
was written by another run" error uses, so each names exactly the settings that differ.

>>> config_differences({"train": {"lr": 0.1, "epochs": 3}}, {"train": {"lr": 0.2, "epochs": 3}})
[('train.lr', 0.1, 0.2)]
>>> describe_differences([("train.lr", 0.1, 0.2)])
'train.lr: found 0.1, expected 0.2'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["config_differences", "describe_differences", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: dicts and lists (tuples become lists), strings, booleans, numbers
    and ``None``; NaN and infinities become ``None`` (JSON has none), anything else (a path, a
    device, a dtype) its ``str``. A configuration written to a checkpoint or a ``results.json``
    then compares equal to the same configuration rebuilt."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy's integers
        return int(value)
    if isinstance(value, numbers.Real):
        return jsonable(float(value))
    return str(value)


def config_differences(found: Any, expected: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, found, expected)`` for every leaf where two JSON-like values differ.

    Dicts are compared key by key (a key missing on one side is ``None`` there), lists of the
    same length item by item (``path[i]``); anything else, lists of other lengths included, is
    one leaf. Equal values give ``[]``.

    Args:
        found: the recorded value (a checkpoint's or cache's configuration).
        expected: the value of this run.
        where: the path of ``found`` itself (``""`` at the top).
    """
    if isinstance(found, dict) and isinstance(expected, dict):
        return [difference for key in sorted(set(found) | set(expected), key=str)
                for difference in config_differences(found.get(key), expected.get(key),
                                                     f"{where}.{key}" if where else str(key))]
    if isinstance(found, (list, tuple)) and isinstance(expected, (list, tuple)) and len(found) == len(expected):
        return [difference for index, (mine, theirs) in enumerate(zip(found, expected))
                for difference in config_differences(mine, theirs, f"{where}[{index}]")]
    return [] if found == expected else [(where or "<value>", found, expected)]


def describe_differences(differences: Sequence[tuple[str, Any, Any]], found: str = "found",
                         expected: str = "expected", limit: int = 8) -> str:
    """The differences as ``"path: <found> A, <expected> B; ..."``, the first ``limit`` of them
    (and how many more there are)."""
    shown = "; ".join(f"{where}: {found} {mine!r}, {expected} {theirs!r}"
                      for where, mine, theirs in differences[:limit])
    more = len(differences) - limit
    return shown + (f"; and {more} more" if more > 0 else "")
