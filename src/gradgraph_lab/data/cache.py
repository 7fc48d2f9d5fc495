"""A sharded on-disk cache that survives interrupts.

Layout of one cached dataset (``root/<name>-<config hash>/``)::

    config.json          the configuration the hash was taken of (for humans and checks)
    shard-00000.pt       items [0, shard_size)           each written to a temp file, then
    shard-00001.pt       items [shard_size, 2·shard_size)  os.replace'd into place
    ...
    COMPLETE             written last: only its presence means "every shard is there"

Why this shape: ``os.replace`` is atomic on POSIX and Windows, so a shard file under its
final name is always a whole shard; a run killed mid-write leaves only a ``*.tmp`` file,
which is ignored and removed. A shard that still fails to load or carries the wrong
metadata (a different config, a truncated copy from elsewhere) is regenerated, never
trusted. The completion marker is written after every shard, so a directory without it
is resumed shard by shard instead of being read as complete.

Several processes (``torchrun``) share one cache directory: shard ``s`` belongs to rank
``s % world_size``, so every missing shard is built by exactly one rank; rank 0 waits for
all of them (a barrier bounded by the process group's timeout), checks them, writes the
completion marker, and then every rank reads the whole dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradgraph_lab.distributed import SINGLE_PROCESS, DistributedContext
from gradgraph.datasets.atomic import atomic_torch_save, atomic_write_bytes
from gradgraph.errors import GradGraphError

__all__ = ["ShardedCache", "config_hash", "default_cache_root", "atomic_write_bytes", "atomic_torch_save"]

COMPLETE_MARKER = "COMPLETE"
CACHE_ENV = "GRADGRAPH_CACHE"


def default_cache_root() -> Path:
    """``$GRADGRAPH_CACHE`` if set, else ``./.gradgraph-cache``."""
    return Path(os.environ.get(CACHE_ENV, ".gradgraph-cache"))


def config_hash(config: dict[str, Any], length: int = 16) -> str:
    """A stable hex digest of a JSON-serialisable configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class ShardedCache:
    """Items ``0 .. num_items-1`` produced shard by shard and kept on disk.

    Args:
        root: the cache root (``.gradgraph-cache`` by default).
        name: a readable prefix of the directory name.
        config: JSON-serialisable configuration; its hash names the directory, so a
            different configuration never reads another's shards.
        num_items: total number of items.
        shard_size: items per shard.

    A shard is a ``dict[str, Tensor]`` whose tensors all have ``shard length`` rows; the
    cache adds the metadata it checks on reload.
    """

    def __init__(self, root: Path | str, name: str, config: dict[str, Any], num_items: int, shard_size: int) -> None:
        if num_items < 1:
            raise GradGraphError(f"ShardedCache needs num_items >= 1, got {num_items}")
        if shard_size < 1:
            raise GradGraphError(f"ShardedCache needs shard_size >= 1, got {shard_size}")
        self.config = config
        self.key = config_hash(config)
        self.directory = Path(root) / f"{name}-{self.key}"
        self.num_items = num_items
        self.shard_size = shard_size

    # ----------------------------------------------------------------- layout
    @property
    def num_shards(self) -> int:
        """How many shards make up the cache."""
        return -(-self.num_items // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """The item indices stored in shard ``shard``."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_items))

    def shard_path(self, shard: int) -> Path:
        """Where shard ``shard`` lives."""
        return self.directory / f"shard-{shard:05d}.pt"

    @property
    def marker_path(self) -> Path:
        """The completion marker."""
        return self.directory / COMPLETE_MARKER

    def is_complete(self) -> bool:
        """True iff the completion marker exists and describes this configuration."""
        try:
            marker = json.loads(self.marker_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return marker.get("key") == self.key and marker.get("num_shards") == self.num_shards

    # ------------------------------------------------------------------ reading
    def _load_shard(self, shard: int) -> dict[str, torch.Tensor] | None:
        """The shard's tensors, or ``None`` if it is missing, unreadable, or not ours."""
        path = self.shard_path(shard)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated / corrupted file: regenerate it
            return None
        expected = self.shard_range(shard)
        if (
            not isinstance(payload, dict)
            or payload.get("__key__") != self.key
            or payload.get("__start__") != expected.start
            or payload.get("__stop__") != expected.stop
        ):
            return None
        tensors = {k: v for k, v in payload.items() if not k.startswith("__")}
        if any(not isinstance(v, torch.Tensor) or v.shape[0] != len(expected) for v in tensors.values()):
            return None
        return tensors

    def _clean_temp_files(self) -> None:
        for stray in self.directory.glob(".*.tmp"):
            try:
                stray.unlink()
            except FileNotFoundError:
                pass

    def load_or_build(
        self,
        make_shard: Callable[[range, Callable[[int], Any]], dict[str, torch.Tensor]],
        *,
        progress: bool = True,
        description: str = "generating",
        context: DistributedContext | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every item, concatenated along dim 0; builds whatever is missing first.

        Args:
            make_shard: ``make_shard(indices, advance) -> {field: Tensor[len(indices), ...]}``;
                must depend only on the indices (so a resumed run equals an uninterrupted
                one); calls ``advance(k)`` after finishing ``k`` items, for the progress bar.
            progress: show a tqdm bar over items while generating.
            description: the bar's label.
            context: the processes sharing this cache (default: one). Every rank must call
                this; missing shard ``s`` is built by rank ``s % world_size``; all ranks
                return the same items.

        Returns:
            ``{field: Tensor[num_items, ...]}``.

        Raises:
            DistributedError: another rank died or hung while the shards were being built.
        """
        from tqdm.auto import tqdm

        context = context or SINGLE_PROCESS
        if context.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
        shards: list[dict[str, torch.Tensor] | None] = [self._load_shard(s) for s in range(self.num_shards)]
        intact = self.is_complete() and all(shard is not None for shard in shards)
        # One decision for all ranks, so that all of them take the same barriers below.
        if not context.any(not intact, "checking the cache"):
            return _concat(shards)  # type: ignore[arg-type]
        # Not complete (or a shard went bad since): resume. Only rank 0 touches shared files
        # before the barrier, so no rank's half-written temp file is swept away.
        if context.is_main_process:
            if self.marker_path.exists():
                self.marker_path.unlink()
            self._clean_temp_files()
            if not (self.directory / "config.json").exists():
                atomic_write_bytes(
                    self.directory / "config.json", json.dumps(self.config, indent=2, sort_keys=True).encode()
                )
        context.barrier("preparing the cache directory")
        mine = [s for s in range(self.num_shards) if s % context.world_size == context.rank]
        missing = [s for s in mine if shards[s] is None]
        to_build = sum(len(self.shard_range(s)) for s in missing)
        with tqdm(total=to_build, desc=description, unit="net", disable=not progress or not to_build) as bar:
            for shard in missing:
                indices = self.shard_range(shard)
                tensors = make_shard(indices, bar.update)
                _check_shard(tensors, len(indices))
                payload = dict(tensors, __key__=self.key, __start__=indices.start, __stop__=indices.stop)
                atomic_torch_save(self.shard_path(shard), payload)
                shards[shard] = tensors
        if context.is_distributed:
            context.barrier(f"waiting for every rank's cache shards in {self.directory}")
            shards = [shard if shard is not None else self._load_shard(s) for s, shard in enumerate(shards)]
        broken = [s for s, shard in enumerate(shards) if shard is None]
        if context.is_main_process and not broken:
            marker = {"key": self.key, "num_shards": self.num_shards, "num_items": self.num_items}
            atomic_write_bytes(self.marker_path, json.dumps(marker).encode())
        if context.any(bool(broken), "checking the built shards"):
            raise GradGraphError(
                f"ShardedCache {self.directory}: shard(s) {broken} were not readable after every rank finished "
                "building; is the directory shared by all ranks (same filesystem)? Rerun to rebuild them."
            )
        return _concat(shards)  # type: ignore[arg-type]


def _check_shard(tensors: dict[str, torch.Tensor], length: int) -> None:
    for key, value in tensors.items():
        if key.startswith("__") or not isinstance(value, torch.Tensor) or value.shape[0] != length:
            raise GradGraphError(
                f"make_shard returned field {key!r} with shape "
                f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}; "
                f"expected a Tensor with {length} rows"
            )


def _concat(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = shards[0].keys()
    return {key: torch.cat([shard[key] for shard in shards]) for key in keys}
