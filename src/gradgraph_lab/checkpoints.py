"""Checkpoints of the lab's long runs, written and checked in one place.

Both runs that resume after a kill use this: :func:`gradgraph_lab.tasks.training.fit` (one file
per model and seed, written after every epoch) and meta-training
(:func:`gradgraph_lab.tasks.learned_optimizer.meta.run_meta_training`, written every few outer
steps). A checkpoint is ``{"format", "kind", "identity", "state"}``:

* ``identity`` — the JSON-normalised settings that define the run. Resuming with other settings is
  refused by an error that names every differing setting by its dotted path
  (:func:`gradgraph.differences.config_differences`), not a dump of both configurations.
* ``state`` — whatever the run needs to continue (weights, optimiser moments, random streams).

Files are written atomically (temp file, ``fsync``, ``os.replace``): a run killed while writing
leaves the previous checkpoint whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradgraph.datasets.atomic import atomic_torch_save
from gradgraph.differences import config_differences, describe_differences, jsonable
from gradgraph.errors import GradGraphError

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

#: The layout of the dict written by :func:`save_checkpoint`.
CHECKPOINT_FORMAT = 2


def save_checkpoint(path: Path | str, kind: str, identity: Any, state: dict[str, Any]) -> None:
    """Write ``state`` of a run of ``kind`` (e.g. ``"fit"``), defined by ``identity``, to ``path``
    atomically (the directory is created)."""
    atomic_torch_save(Path(path), {"format": CHECKPOINT_FORMAT, "kind": kind, "identity": jsonable(identity),
                                   "state": state})


def load_checkpoint(path: Path | str, kind: str, identity: Any, *, who: str,
                    remedy: str = "resume with the settings it was written with, or delete it to start afresh",
                    weights_only: bool = True) -> dict[str, Any]:
    """The ``state`` saved at ``path`` if it continues the run of ``kind`` described by ``identity``.

    Args:
        path: the checkpoint file (it must exist).
        kind: what wrote it (``"fit"``, ``"meta-training"``); a file of another kind is refused.
        identity: this run's settings; compared, after JSON normalisation, with the recorded ones.
        who: the caller, named in the errors (``"fit"``).
        remedy: the advice appended to the error for a checkpoint of other settings.
        weights_only: passed to :func:`torch.load` (states of tensors, numbers, strings and
            containers of them load with ``True``).

    Raises:
        GradGraphError: the file cannot be read, is not a checkpoint of ``kind``, or was written
            by a run with other settings (each differing setting named by its path, with both values).
    """
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # a file that is not ours, or from another torch: say which file
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise GradGraphError(f"{who}: cannot read the checkpoint {path} ({type(error).__name__}: {first_line}); "
                             "delete it to start afresh") from error
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT or saved.get("kind") != kind:
        found = (f"format {saved.get('format')!r}, kind {saved.get('kind')!r}" if isinstance(saved, dict)
                 else type(saved).__name__)
        raise GradGraphError(f"{who}: {path} is not a gradgraph {kind} checkpoint (format {CHECKPOINT_FORMAT}); "
                             f"found {found}. Delete it or use another output directory")
    differences = config_differences(saved["identity"], jsonable(identity))
    if differences:
        raise GradGraphError(f"{who}: the checkpoint {path} is of another run "
                             f"({describe_differences(differences, 'checkpoint', 'this run')}); {remedy}")
    return saved["state"]
