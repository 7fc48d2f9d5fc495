"""Meta-models shipped inside the package (``gradgraph/optim/pretrained/<name>.pt``).

Each file is ``{"meta_config": MetaModelConfig as a dict, "meta_model": state_dict,
"provenance": how it was made}``, written by
``gradgraph learned-optimizer --meta-train --export <file>`` (see the README).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch

from gradgraph.errors import GradGraphError
from gradgraph.optim.meta_model import LearnedUpdate, MetaModelConfig

__all__ = ["load_pretrained", "meta_model_from_checkpoint", "pretrained_names"]

_PACKAGE = "gradgraph.optim.pretrained"


def pretrained_names() -> list[str]:
    """Names of the shipped meta-models."""
    folder = resources.files(_PACKAGE)
    return sorted(entry.name[:-3] for entry in folder.iterdir() if entry.name.endswith(".pt"))


#: the value a :class:`MetaModelConfig` field takes when a file predates it (its behaviour then):
#: the embedding entered ``F`` un-normalised before issue 29, and no rule had a learned schedule.
LEGACY_CONFIG = {"normalize_embedding": False, "learned_term": True, "schedule": False}


def meta_model_from_checkpoint(checkpoint: dict[str, Any]) -> LearnedUpdate:
    """Build a :class:`LearnedUpdate` from ``{"meta_config", "meta_model"}`` (an export or a trainer checkpoint).

    Fields the file lacks take their :data:`LEGACY_CONFIG` value, so a file computes the
    update it computed when it was written (and :meth:`MetaModelConfig.from_dict` reads the
    older flat ``gmn_*`` sizes).
    """
    model = LearnedUpdate(MetaModelConfig.from_dict({**LEGACY_CONFIG, **checkpoint["meta_config"]}))
    model.load_state_dict(checkpoint["meta_model"])
    return model.eval()


def load_pretrained(name: str) -> LearnedUpdate:
    """The shipped meta-model ``name``.

    Raises:
        GradGraphError: no such name (the message lists the available ones).
    """
    names = pretrained_names()
    if name not in names:
        raise GradGraphError(f"no pretrained learned optimizer named {name!r}; available: {names}")
    with resources.as_file(resources.files(_PACKAGE) / f"{name}.pt") as path:
        # the shipped files hold tensors, numbers and strings only: nothing of them is unpickled as code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return meta_model_from_checkpoint(checkpoint)
