"""A model zoo as a PyG dataset: every model of a collection, on one probe batch, as a GradGraph.

:class:`ModelZoo` converts each model with :func:`gradgraph.to_graph` on the same probe batch
and attaches its graph-level target. The graphs are written to ``root/processed/`` in shards
and read back from there on the next construction::

    zoo = ModelZoo("zoo-cache", models, probe_inputs, targets=accuracies[:, None],
                   probe_targets=probe_labels, loss_fn=per_datapoint_cross_entropy)
    loader = torch_geometric.loader.DataLoader(zoo, batch_size=32, shuffle=True)
    for batch in loader:
        prediction = model(batch)          # [G, k]
        loss = F.mse_loss(prediction, batch.y)

The target convention
---------------------
A graph-level target is ``graph.y`` of shape ``[1, k]``: one row per graph, so that PyG's
batching concatenates the rows of ``G`` graphs into ``batch.y`` of shape ``[G, k]``, the shape
of a graph-level prediction. A 0-dim or ``[k]`` target would concatenate into a flat ``[G·k]``
vector that broadcasts silently against a ``[G, k]`` prediction in a loss; :class:`ModelZoo`
refuses it, naming the model's index.

The cache
---------
``root/processed/shard-00000.pt``, ``shard-00001.pt``, ... each hold ``shard_size``
consecutive models' graphs (a dict: the zoo's fingerprint, the index range, the graphs), written
atomically (:mod:`gradgraph.datasets.atomic`): a file under a shard's name is whole, so a
build that was killed resumes at the first missing shard, and the resumed shards are byte for
byte those of an uninterrupted build (a shard depends on its models and the probe batch
alone). ``zoo.json`` records the fingerprint: a hash of the probe batch, its targets, the
models' targets, the zoo's size, the shard size and ``name``. A cache whose fingerprint differs
(another probe batch, other targets) is refused, not read. The models themselves are not
hashed: give a zoo of other models another ``root`` or ``name``.

A shard file that does not load (truncated by a copy that was not atomic) is rebuilt by the
rank that owns it; stray ``.shard-*.tmp`` files of a killed write are removed by it. A
readable shard of another build (wrong fingerprint or range) is refused, not overwritten.

Per-model probes and extra fields
---------------------------------
``inputs`` (and ``probe_targets``) may be callables ``(index, model) -> Tensor``: a zoo whose
members are each converted on their own probe batch (the SIREN zoo of the curvature
experiment draws one input distribution per network). ``fields=`` adds per-graph tensors that
are not graph-level targets (``(index, model, graph) -> {name: Tensor}``, e.g. a target per
weight ``[E]`` and per neuron ``[N]``); ``targets=None`` stores no ``y``. ``dtype=`` casts every
floating field before it is stored (the conversion runs in the model's own precision).

Several processes (``torchrun``): with ``torch.distributed`` initialised, shard ``s`` is
built by rank ``s % world_size``; every rank then waits at a barrier and reads all shards.
The directory must be on a filesystem every rank sees.

Everything here uses ``torch.load(weights_only=True)``: importing gradgraph registers
:class:`~gradgraph.GradGraph` as a safe global.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Dataset

from gradgraph.capture import LossFn
from gradgraph.convert import to_graph
from gradgraph.datasets.atomic import atomic_torch_save, atomic_write_bytes
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import GradGraph

__all__ = ["ModelZoo", "check_graph_target"]

#: Bumped when what a shard stores changes (its fields): part of the fingerprint, so an old cache
#: is refused instead of read.
SHARD_FORMAT = 1
#: Errors of a conversion that are about the model or the probe batch (wrapped with the model's index).
_MODEL_ERRORS = (GradGraphError, UnsupportedModuleError, RuntimeError, TypeError, ValueError)


def check_graph_target(target: Any, index: int, width: int | None = None) -> Tensor:
    """``target`` as a graph-level ``y`` of shape ``[1, k]``, or an error naming model ``index``.

    Args:
        target: a tensor (or number list) of shape ``[1, k]``.
        index: the model's index in the zoo, for the message.
        width: the ``k`` every earlier model had (``None``: any).

    Returns:
        ``target`` as a floating tensor ``[1, k]`` (integers become the default float dtype).

    Raises:
        GradGraphError: not a tensor of shape ``[1, k]``, or ``k`` differs from ``width``.
    """
    if not isinstance(target, Tensor):
        raise GradGraphError(f"model {index} of the zoo: its target must be a Tensor of shape [1, k], got "
                             f"{type(target).__name__}")
    if target.dim() != 2 or target.shape[0] != 1 or target.shape[1] == 0:
        hint = " (a 0-dim target broadcasts silently against a [G, 1] prediction: use y.reshape(1, 1))" \
            if target.dim() == 0 else ""
        raise GradGraphError(f"model {index} of the zoo: its target must have shape [1, k] (graph-level y, one row "
                             f"per graph), got {list(target.shape)}{hint}")
    if width is not None and target.shape[1] != width:
        raise GradGraphError(f"model {index} of the zoo: its target has k={target.shape[1]} columns, the models "
                             f"before it {width}")
    if not target.is_floating_point():
        target = target.to(torch.get_default_dtype())
    return target.detach()


class ModelZoo(Dataset):
    """Models converted to :class:`~gradgraph.GradGraph` on one probe batch, with graph-level targets.

    Each item is the graph of ``to_graph(model, inputs, probe_targets, loss_fn)`` with
    ``y`` (``[1, k]``, see the module doc), ``zoo_id`` (``[1]``, the model's index in the zoo; not named ``*index*``, which
    PyG would shift by the node count when batching) and
    ``loss`` (``[b]``, its per-datapoint losses on the probe batch). Built once into
    ``root/processed`` (shards, atomic, resumable; see the module doc), then read from there.

    Args:
        root: the dataset's directory (PyG's ``root``: shards go to ``root/processed``).
        models: the zoo: ``nn.Module`` s, or anything ``builder`` turns into one (checkpoint
            paths, state dicts, configurations). Only read while building.
        inputs: the probe batch ``[b, ...]`` every model is converted on, or a callable
            ``(index, model) -> [b, ...]`` giving each model its own (fingerprinted by its type
            only: name the zoo's configuration in ``root`` or ``name``).
        targets: per-model targets: a ``[num_models, k]`` tensor (row ``i`` is model ``i``'s
            ``y``), a sequence of ``[1, k]`` tensors, a callable ``(index, model) -> [1, k]``,
            or ``None`` (no ``y``: a zoo whose targets live in ``fields``).
        probe_targets: the probe batch's labels, passed to ``loss_fn`` (``None`` in output
            mode), or a callable ``(index, model) -> labels``.
        fields: ``(index, model, graph) -> {name: Tensor}``: extra per-graph fields stored with
            the graph (names the graph already has are refused).
        dtype: cast every floating field of a graph (and its ``fields``) to this before storing
            (``None``: as converted).
        loss_fn: ``(output, probe_targets) -> [b]`` per-datapoint losses; ``None``: output mode.
        builder: ``builder(models[i]) -> nn.Module``; ``None`` when ``models`` are modules.
        shard_size: models per shard file.
        name: part of the fingerprint (tell zoos of other models apart in one ``root``).
        transform: a PyG transform applied to every item on access
            (e.g. :class:`~gradgraph.datasets.NormalizeFactors`).
        rank, world_size: this process's share of the build (default: ``torch.distributed``'s,
            or 0 and 1 when it is not initialised).
        barrier: ``() -> None``, waits until every rank has written its shards (default:
            ``torch.distributed.barrier()`` when ``world_size > 1`` and a process group is initialised,
            its failure raised as a :class:`GradGraphError` naming this rank; ``gradgraph``'s
            experiments pass their own, bounded by a timeout).
        log: print a line per shard built.

    Raises:
        GradGraphError: a model the converter refuses, a probe batch the model cannot read, a
            builder that fails or returns no module, a target of the wrong shape — each naming
            the model's index; a cache in ``root`` built from another zoo.
    """

    def __init__(
        self,
        root: str | Path,
        models: Sequence[Any],
        inputs: Tensor,
        *,
        targets: Tensor | Sequence[Tensor] | Callable[[int, nn.Module], Tensor] | None,
        probe_targets: Any = None,
        fields: Callable[[int, nn.Module, GradGraph], dict[str, Tensor]] | None = None,
        dtype: torch.dtype | None = None,
        loss_fn: LossFn | None = None,
        builder: Callable[[Any], nn.Module] | None = None,
        shard_size: int = 64,
        name: str = "",
        transform: Callable[[GradGraph], GradGraph] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        barrier: Callable[[], None] | None = None,
        log: bool = False,
    ) -> None:
        if len(models) == 0:
            raise GradGraphError("ModelZoo needs at least one model")
        if shard_size < 1:
            raise GradGraphError(f"ModelZoo needs shard_size >= 1, got {shard_size}")
        if not isinstance(inputs, Tensor) and not callable(inputs):
            raise GradGraphError(f"ModelZoo: the probe batch must be a Tensor or a callable (index, model) -> Tensor, "
                                 f"got {type(inputs).__name__}")
        if dtype is not None and not dtype.is_floating_point:
            raise GradGraphError(f"ModelZoo: dtype must be a floating dtype, got {dtype}")
        if isinstance(targets, Tensor) and (targets.dim() != 2 or targets.shape[0] != len(models)):
            raise GradGraphError(f"ModelZoo: a targets tensor must have shape [num_models, k] = [{len(models)}, k] "
                                 f"(use targets[:, None] for one value per model), got {list(targets.shape)}")
        if targets is not None and not isinstance(targets, Tensor) and not callable(targets) \
                and len(targets) != len(models):
            raise GradGraphError(f"ModelZoo: {len(targets)} targets for {len(models)} models")
        self.models = models
        self.inputs = inputs
        self.targets_spec = targets
        self.probe_targets = probe_targets
        self.fields = fields
        self.dtype = dtype
        self.loss_fn = loss_fn
        self.builder = builder
        self.shard_size = shard_size
        self.num_models = len(models)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.barrier = barrier or self._process_group_barrier
        self.log = log
        self.fingerprint = _fingerprint(inputs, probe_targets, targets, self.num_models, shard_size,
                                        name + ("" if dtype is None else f"|{dtype}"))
        self._loaded: dict[int, Any] = {}  # shards read while checking them, handed to _read_all
        super().__init__(str(root), transform=transform, log=log)
        self.build()
        self.graphs = self._read_all()

    # ---------------------------------------------------------------- PyG's conventions
    @property
    def raw_file_names(self) -> list[str]:
        """None: the models come from the caller, not from files."""
        return []

    @property
    def processed_file_names(self) -> list[str]:
        """``shard-00000.pt`` ... one file per ``shard_size`` models."""
        return [f"shard-{shard:05d}.pt" for shard in range(self.num_shards)]

    def len(self) -> int:
        """The number of models."""
        return self.num_models

    def get(self, idx: int) -> GradGraph:
        """Model ``idx``'s graph, a shallow copy (setting a field on it leaves the zoo's as it was;
        PyG's ``__getitem__`` applies ``transform`` to it)."""
        return copy.copy(self.graphs[idx])

    # ---------------------------------------------------------------------- layout
    @property
    def num_shards(self) -> int:
        """How many shard files the zoo is stored in."""
        return -(-self.num_models // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """The model indices of shard ``shard``."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_models))

    def shard_path(self, shard: int) -> Path:
        """Where shard ``shard`` is stored."""
        return Path(self.processed_dir) / self.processed_file_names[shard]

    @property
    def targets(self) -> Tensor:
        """``[num_models, k]``: every model's ``y``, in order."""
        if self.targets_spec is None:
            raise GradGraphError("ModelZoo.targets: this zoo was built with targets=None (no y)")
        return torch.cat([graph.y for graph in self.graphs])

    # ----------------------------------------------------------------------- build
    def convert(self, index: int) -> GradGraph:
        """Model ``index``'s graph with its target (what a shard stores), converted afresh."""
        item = self.models[index]
        try:
            model = self.builder(item) if self.builder is not None else item
        except Exception as error:  # the user's builder: say which model it failed on
            raise GradGraphError(f"model {index} of the zoo: the builder failed: {error}") from error
        if not isinstance(model, nn.Module):
            raise GradGraphError(f"model {index} of the zoo is a {type(model).__name__}, not an nn.Module; pass "
                                 "builder= to build modules from checkpoints")
        inputs = self.inputs(index, model) if callable(self.inputs) else self.inputs
        probe_targets = self.probe_targets(index, model) if callable(self.probe_targets) else self.probe_targets
        if not isinstance(inputs, Tensor):
            raise GradGraphError(f"model {index} of the zoo: its probe batch must be a Tensor, got "
                                 f"{type(inputs).__name__}")
        try:
            graph = to_graph(model, inputs, probe_targets, self.loss_fn)
        except _MODEL_ERRORS as error:
            raise GradGraphError(f"model {index} of the zoo ({type(model).__name__}) on the probe batch "
                                 f"{list(inputs.shape)}: {error}") from error
        spec = self.targets_spec
        if spec is not None:
            if isinstance(spec, Tensor):
                target = spec[index:index + 1]
            elif callable(spec):
                target = spec(index, model)
            else:
                target = spec[index]
            graph.y = check_graph_target(target, index)
        graph.zoo_id = torch.tensor([index])
        if self.fields is not None:
            extra = self.fields(index, model, graph)
            for key, value in extra.items():
                if key in graph or not isinstance(value, Tensor):
                    raise GradGraphError(f"model {index} of the zoo: field {key!r} "
                                         + ("is already a field of its graph" if key in graph else
                                            f"must be a Tensor, got {type(value).__name__}"))
                graph[key] = value.detach()
        if self.dtype is not None:
            graph = graph.apply(lambda value: value.to(self.dtype) if value.is_floating_point() else value)
        return graph

    def build(self) -> None:
        """Write this rank's missing shards (and ``zoo.json``), then wait for the other ranks."""
        directory = Path(self.processed_dir)
        meta_path = directory / "zoo.json"
        if meta_path.exists():
            recorded = json.loads(meta_path.read_text()).get("fingerprint")
            if recorded != self.fingerprint:
                raise GradGraphError(f"ModelZoo: {directory} holds another zoo (fingerprint {recorded}, this one "
                                     f"{self.fingerprint}: another probe batch, other targets, size or name); use "
                                     "another root or delete it")
        elif self.rank == 0:
            meta = {"fingerprint": self.fingerprint, "num_models": self.num_models, "shard_size": self.shard_size}
            atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        for shard in range(self.rank, self.num_shards, self.world_size):
            for stray in directory.glob(f".{self.shard_path(shard).name}.*.tmp"):  # a killed write of this rank's
                stray.unlink(missing_ok=True)
            if self.shard_path(shard).exists() and self._readable(shard):  # written atomically: whole
                continue
            indices = self.shard_range(shard)
            graphs = [self.convert(index) for index in indices]
            atomic_torch_save(self.shard_path(shard), {"fingerprint": self.fingerprint, "start": indices.start,
                                                       "stop": indices.stop, "graphs": graphs})
            if self.log:
                print(f"ModelZoo: shard {shard} (models {indices.start}-{indices.stop - 1}) written", flush=True)
        if self.world_size > 1:
            self.barrier()

    def _process_group_barrier(self) -> None:
        """``torch.distributed.barrier()`` if a process group is initialised (else nothing: ranks that share no
        process group find the others' shards missing and say so, :meth:`_read_all`)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        try:
            torch.distributed.barrier()
        except Exception as error:  # noqa: BLE001 - the backends raise RuntimeError, DistBackendError, timeouts
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GradGraphError(
                f"ModelZoo: rank {self.rank} of {self.world_size} waited for the other ranks' shards in "
                f"{self.processed_dir} and the barrier failed (another rank died or did not answer). Rerun: finished "
                f"shards are reused. Cause: {first_line}") from error

    def _readable(self, shard: int) -> bool:
        """Whether shard ``shard``'s file loads (a truncated copy does not: it is rebuilt)."""
        try:
            self._loaded[shard] = torch.load(self.shard_path(shard), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
            return False
        return True

    def _read_all(self) -> list[GradGraph]:
        graphs: list[GradGraph] = []
        width = None
        for shard in range(self.num_shards):
            path = self.shard_path(shard)
            if not path.exists():
                raise GradGraphError(f"ModelZoo: shard {shard} ({path}) is missing; rank {shard % self.world_size} of "
                                     f"{self.world_size} builds it — is {self.processed_dir} shared by every rank?")
            payload = self._loaded.pop(shard, None)
            if payload is None:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            expected = self.shard_range(shard)
            if (payload.get("fingerprint") != self.fingerprint or payload.get("start") != expected.start
                    or payload.get("stop") != expected.stop or len(payload["graphs"]) != len(expected)):
                raise GradGraphError(f"ModelZoo: {path} is not shard {shard} of this zoo (another build's); delete it")
            for index, graph in zip(expected, payload["graphs"]):
                if self.targets_spec is not None:
                    check_graph_target(graph.y, index, width)
                    width = graph.y.shape[1]
                graphs.append(graph)
        return graphs


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if not 0 <= rank < world_size:
        raise GradGraphError(f"ModelZoo: rank {rank} outside world_size {world_size}")
    return rank, world_size


def _fingerprint(inputs: Tensor, probe_targets: Any, targets: Any, num_models: int, shard_size: int,
                 name: str) -> str:
    """A hash of what decides the zoo's graphs besides the models themselves."""
    digest = hashlib.sha256()
    digest.update(json.dumps([SHARD_FORMAT, num_models, shard_size, name]).encode())
    for value in (inputs, probe_targets, targets):
        if isinstance(value, Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, (list, tuple)) and all(isinstance(item, Tensor) for item in value):
            for item in value:
                digest.update(item.detach().cpu().contiguous().numpy().tobytes())
        else:  # a callable or None: its name (the values it gives are checked when read)
            digest.update(repr(type(value)).encode())
    return digest.hexdigest()[:16]
