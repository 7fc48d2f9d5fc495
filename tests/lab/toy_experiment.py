"""A config with the fields :class:`gradgraph_lab.tasks.experiment.ExperimentRun` reads, for the
tests of the experiment loop and of merging results (no data, no training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ToyConfig:
    zoo: str = "toy zoo"
    cache_root: Path | None = None
    progress: bool = False
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = ("learned", "fixed")
    output_dir: Path = Path("out")
    extra: dict = field(default_factory=dict)
