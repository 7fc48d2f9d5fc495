"""Devices and several processes: a thin layer over ``torch.distributed``.

gradgraph writes no collective of its own. Several processes are started by ``torchrun``
(one machine: ``torchrun --nproc_per_node 2 $(which gradgraph) curvature``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and opens the default process group (gloo for CPU
tensors, NCCL for CUDA tensors) with a bounded ``timeout``, so a rank that dies or hangs
ends the job with a :class:`DistributedError` instead of a silent hang. Without those
variables everything here is the one-process case: collectives are no-ops.

Every piece of gradgraph that needs to know about processes takes a
:class:`DistributedContext` (``None`` or :data:`SINGLE_PROCESS` meaning one process), so
library code never reads the environment itself.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradgraph.errors import GradGraphError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SINGLE_PROCESS",
    "DistributedContext",
    "DistributedError",
    "all_reduce_mean",
    "init_distributed",
    "resolve_device",
    "shard_indices",
]

#: Seconds a collective (or the rendezvous) may wait for the other ranks before the job
#: fails; ``$GRADGRAPH_DIST_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "GRADGRAPH_DIST_TIMEOUT"

class DistributedError(GradGraphError):
    """Another rank died, hung past the timeout, or the process group could not be formed."""


def resolve_device(name: str | torch.device = "cpu", *, local_rank: int = 0) -> torch.device:
    """The ``torch.device`` meant by a ``--device`` value.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:K"``, ``"auto"`` (CUDA when available, else
            CPU) or a ``torch.device``.
        local_rank: with ``"cuda"`` / ``"auto"``, the GPU of this process on its machine
            (``cuda:local_rank``), so ``torchrun`` puts one rank on each GPU.

    Raises:
        GradGraphError: CUDA asked for but not available, or an unknown name.
    """
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GradGraphError(
                f"device {text!r} asked for, but torch {torch.__version__} sees no CUDA device; "
                "use --device cpu (or auto)"
            )
        device = torch.device(text)
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise GradGraphError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise GradGraphError(f"unknown device {text!r}; use cpu, cuda, cuda:K or auto")


def shard_indices(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(num_items)`` that rank ``rank`` of ``world_size`` owns.

    Blocks differ in length by at most one; concatenated in rank order they are
    ``range(num_items)`` (so gathering per-rank results in rank order restores the order).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise GradGraphError(f"shard_indices: rank {rank} is not in a world of size {world_size}")
    if num_items < 0:
        raise GradGraphError(f"shard_indices: num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass
class DistributedContext:
    """Who this process is among the processes of one job, and the device it computes on.

    Attributes:
        rank: this process's rank, ``0 .. world_size - 1``.
        world_size: number of processes.
        local_rank: rank among the processes of this machine (picks the GPU).
        device: where this process's model and batches live.
        timeout_s: how long a collective waits for the other ranks.
        owns_group: whether :func:`init_distributed` opened the process group (and
            :meth:`teardown` closes it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    # ------------------------------------------------------------------ identity
    @property
    def is_distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that prints progress and writes results."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """``"gloo"`` / ``"nccl"`` while the process group is open, else ``None``."""
        return dist.get_backend() if self.is_distributed and dist.is_initialized() else None

    def shard(self, num_items: int) -> range:
        """This rank's block of ``range(num_items)`` (:func:`shard_indices`)."""
        return shard_indices(num_items, self.rank, self.world_size)

    def describe(self) -> dict[str, object]:
        """JSON-able summary for ``results.json``."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }

    # -------------------------------------------------------------- collectives
    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turns a failed collective inside the block into a :class:`DistributedError`
        that says which rank saw it, what it was doing, and the likely cause.

        Only errors of the communication layer are translated (``torch.distributed``'s
        own error types, and gloo's connection / timeout ``RuntimeError`` s); any other
        exception passes through unchanged, so a bug is not reported as a lost rank.
        """
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as error:
            if not (self.is_distributed and _is_communication_error(error)):
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed: another rank died or did not answer within "
                f"{self.timeout_s:.0f}s (set ${TIMEOUT_ENV} to change the limit). Rerun the job: finished cache "
                f"shards are reused. Cause: {first_line}"
            ) from error

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank got here (bounded by :attr:`timeout_s`); a no-op alone.

        On gloo it is ``monitored_barrier``, whose error names the rank that did not arrive.
        """
        if not self.is_distributed:
            return
        with self.collective(what):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce_sum(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        """The sum of ``tensor`` over ranks (a new tensor; the input is left alone)."""
        if not self.is_distributed:
            return tensor.detach().clone()
        out = tensor.detach().to(self.device, copy=True)  # NCCL reduces only CUDA tensors
        with self.collective(what):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_reduce_mean(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        """The mean of ``tensor`` over ranks (:func:`all_reduce_mean`)."""
        return self.all_reduce_sum(tensor, what) / self.world_size

    def any(self, flag: bool, what: str = "agree") -> bool:
        """True on every rank iff ``flag`` is true on some rank (keeps ranks on one code path)."""
        if not self.is_distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([int(flag)], device=self.device), what).item() > 0)

    def all_gather_cat(self, tensor: Tensor, what: str = "all_gather") -> Tensor:
        """``[sum_r n_r, ...]``: every rank's ``[n_r, ...]`` tensor, concatenated in rank order.

        Ranks may hold different ``n_r`` (they are padded for the collective and trimmed).
        """
        if not self.is_distributed:
            return tensor
        with self.collective(what):
            lengths = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
            dist.all_gather(lengths, torch.tensor([tensor.shape[0]], device=self.device))
            longest = int(max(int(n) for n in lengths))
            padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype, device=self.device)
            padded[: tensor.shape[0]] = tensor
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)])

    # ------------------------------------------------------------------ models
    def wrap(self, model: nn.Module, *, static_graph: bool = True) -> nn.Module:
        """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` across the
        ranks (it must already be on :attr:`device`); the model itself when alone.

        DDP averages gradients over ranks in ``backward`` and broadcasts rank 0's initial
        parameters, so every rank holds the same weights after every step.
        ``static_graph=True`` (every step uses the same parameters, as gradgraph's models
        do) lets DDP find parameters a model never uses on its first step, without a
        search of the autograd graph at every step; pass ``False`` for models whose used
        parameters change from step to step (DDP then searches every step).
        """
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        with self.collective("wrapping the model in DistributedDataParallel"):
            return DistributedDataParallel(
                model,
                device_ids=None,  # batches are moved by the task; DDP must not try to move them
                static_graph=static_graph,
                find_unused_parameters=not static_graph,
            )

    # ----------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Close the process group if :func:`init_distributed` opened it."""
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass  # a peer already gone: nothing left to close cleanly, and the job is ending
        self.owns_group = False


#: The context of a lone CPU process.
SINGLE_PROCESS = DistributedContext()


_COMMUNICATION_MARKERS = (
    "gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe", "monitoredbarrier",
    "tcpstore", "rendezvous", "process group", "processgroup",
)


def _is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` came from ``torch.distributed``'s transport, not from user code."""
    if isinstance(error, (dist.DistError, dist.DistBackendError)):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _COMMUNICATION_MARKERS)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise GradGraphError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float | None = None) -> DistributedContext:
    """The context of this process, opening the process group when ``torchrun`` started it.

    Args:
        device: ``--device`` value (:func:`resolve_device`); with CUDA, rank ``r`` of a
            machine gets ``cuda:LOCAL_RANK``.
        timeout_s: collective / rendezvous timeout; default ``$GRADGRAPH_DIST_TIMEOUT`` or
            :data:`DEFAULT_TIMEOUT_S`.

    Returns:
        A :class:`DistributedContext`; ``world_size == 1`` without ``WORLD_SIZE`` in the
        environment. Call :meth:`DistributedContext.teardown` at the end.

    Raises:
        DistributedError: the other ranks did not join within ``timeout_s``.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    if not timeout_s > 0:
        raise GradGraphError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    resolved = resolve_device(device, local_rank=local_rank)
    context = DistributedContext(rank, world_size, local_rank, resolved, timeout_s)
    if world_size == 1:
        return context
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise DistributedError(
                f"a process group is already open as rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"but the environment says rank {rank}/{world_size}"
            )
        return context
    with context.collective(f"joining the process group ({backend}, {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')})"):
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world_size,
            device_id=resolved if resolved.type == "cuda" else None,
        )
    context.owns_group = True
    return context


def all_reduce_mean(tensor: Tensor, context: DistributedContext | None = None) -> Tensor:
    """``tensor`` averaged over the ranks of ``context`` (itself, copied, when alone).

    Shapes: ``[...] -> [...]``; every rank must pass the same shape.
    """
    return (context or SINGLE_PROCESS).all_reduce_mean(tensor)
