"""Atomic file writes: a file under its final name is always whole.

The bytes go to a temporary file in the target's directory, are flushed and ``fsync``'d, and
the file is ``os.replace``'d into place (atomic on POSIX and Windows). A write killed midway
leaves only a ``.<name>.*.tmp`` file, which readers ignore. The zoo dataset
(:mod:`gradgraph.datasets.zoo`) writes its shards this way, and so do the lab's caches,
checkpoints and ``results.json``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes"]


def atomic_write(path: Path | str, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then ``os.replace`` it onto ``path``.

    The parent directory is created if needed; the file is readable by all (``0o644``, not
    ``mkstemp``'s ``0o600``). On any error the temp file is removed and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temp_name, 0o644)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    atomic_write(path, lambda file: file.write(data))


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file + ``os.replace``)."""
    atomic_write(path, lambda file: torch.save(obj, file))
