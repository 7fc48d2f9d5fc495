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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temp_name, 0o644)  # mkstemp makes files 0600; a cache is meant to be readable
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    _atomic_write(Path(path), lambda file: file.write(data))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file + ``os.replace``)."""
    _atomic_write(Path(path), lambda file: torch.save(obj, file))


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
    ) -> dict[str, torch.Tensor]:
        """Every item, concatenated along dim 0; builds whatever is missing first.

        Args:
            make_shard: ``make_shard(indices, advance) -> {field: Tensor[len(indices), ...]}``;
                must depend only on the indices (so a resumed run equals an uninterrupted
                one); calls ``advance(k)`` after finishing ``k`` items, for the progress bar.
            progress: show a tqdm bar over items while generating.
            description: the bar's label.

        Returns:
            ``{field: Tensor[num_items, ...]}``.
        """
        from tqdm.auto import tqdm

        self.directory.mkdir(parents=True, exist_ok=True)
        complete = self.is_complete()
        shards: list[dict[str, torch.Tensor] | None] = [self._load_shard(s) for s in range(self.num_shards)]
        if complete and all(shard is not None for shard in shards):
            return _concat(shards)  # type: ignore[arg-type]
        # Not complete (or a shard went bad since): resume.
        if self.marker_path.exists():
            self.marker_path.unlink()
        self._clean_temp_files()
        if not (self.directory / "config.json").exists():
            atomic_write_bytes(self.directory / "config.json", json.dumps(self.config, indent=2, sort_keys=True).encode())
        missing = [s for s, shard in enumerate(shards) if shard is None]
        done_items = self.num_items - sum(len(self.shard_range(s)) for s in missing)
        with tqdm(total=self.num_items, initial=done_items, desc=description, unit="net", disable=not progress) as bar:
            for shard in missing:
                indices = self.shard_range(shard)
                tensors = make_shard(indices, bar.update)
                _check_shard(tensors, len(indices))
                payload = dict(tensors, __key__=self.key, __start__=indices.start, __stop__=indices.stop)
                atomic_torch_save(self.shard_path(shard), payload)
                shards[shard] = tensors
        marker = {"key": self.key, "num_shards": self.num_shards, "num_items": self.num_items}
        atomic_write_bytes(self.marker_path, json.dumps(marker).encode())
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
