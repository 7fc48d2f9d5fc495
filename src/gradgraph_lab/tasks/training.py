"""The one training loop every learned gradgraph model uses: Adam, mini-batches, progress
bars, and the best-on-validation weights at the end.

A task supplies *what* to train on through two small pieces:

* a :class:`BatchSource` — anything with ``len()`` (number of items) and
  ``batches(batch_size, shuffle=..., generator=...)``. :class:`LoaderSource` wraps a list
  of PyG graphs in a :class:`torch_geometric.loader.DataLoader`; tasks whose items share
  one architecture provide precollated sources instead (much faster, no per-graph loop);
* ``loss_fn(model, batch) -> scalar`` for training and ``error_fn(model, batch) -> [G]``,
  the per-item evaluation error (the validation error selects the epoch kept).

Several processes (``torchrun``; see :mod:`gradgraph_lab.distributed`): pass ``context=``.
The model is wrapped in DistributedDataParallel; every rank draws the same permutation of
the training items, cuts it into the same global batches of ``batch_size`` items and
trains on its own slice of each (``batch[rank::world_size]``), with its loss scaled so the
gradient DDP averages is exactly the gradient of the global batch's mean loss — two
ranks take the steps one rank takes. Evaluation is split into one block of items per
rank and gathered; only rank 0 shows progress. This needs an *indexable* source: one with
``batch(index)`` (:class:`IndexableSource`), as :class:`LoaderSource` and the curvature
source have.

Interrupted or time-capped runs (``fit(..., checkpoint=path)``): after every epoch the whole
state of the run — weights, Adam's moments, the shuffling generator, the random streams, the
best weights so far and the learning curve — is written to ``path`` atomically (temp file +
rename, by rank 0), and ``fit(..., checkpoint=path, resume=True)`` continues from the last
epoch written: on one process, the epochs it then trains are exactly those an uninterrupted run
would have trained (tested). A checkpoint records the settings that define the run; resuming
with others is refused, except ``epochs`` (a finished run can be extended) and the time budget.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from gradgraph_lab.checkpoints import load_checkpoint, save_checkpoint
from gradgraph.differences import jsonable
from gradgraph_lab.distributed import SINGLE_PROCESS, DistributedContext
from gradgraph.errors import GradGraphError

__all__ = ["BatchSource", "FitResult", "IndexableSource", "LoaderSource", "TrainConfig", "evaluate", "fit"]


class BatchSource(Protocol):
    """Items that can be served in mini-batches."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[Any]:
        """Mini-batches covering every item once (the last one may be smaller)."""
        ...


class IndexableSource(BatchSource, Protocol):
    """A source that also serves any subset of its items, which splitting across ranks needs."""

    def batch(self, index: Tensor) -> Any:
        """The items at ``index`` (``[G]`` long, on the CPU) as one batch."""
        ...


class LoaderSource:
    """A list of PyG ``Data`` objects served by :class:`torch_geometric.loader.DataLoader`.

    Args:
        items: the graphs; each batch is a PyG ``Batch`` of up to ``batch_size`` of them.
    """

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[Any]:
        from torch_geometric.loader import DataLoader

        return iter(DataLoader(self.items, batch_size=batch_size, shuffle=shuffle, generator=generator))

    def batch(self, index: Tensor) -> Any:
        """The graphs at ``index`` (``[G]`` long) as one PyG ``Batch``."""
        from torch_geometric.data import Batch

        return Batch.from_data_list([self.items[int(i)] for i in index])


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training items.
        batch_size: items per Adam step.
        lr: Adam learning rate.
        weight_decay: Adam's L2 penalty.
        grad_clip: clip the global gradient norm to this (``None``: no clipping).
        seed: seeds parameter init (by the caller) and the shuffling here.
        progress: show a tqdm bar over epochs.
        description: the bar's label.
        max_seconds: a wall-clock budget for the training (``None``: none): no epoch starts
            after this many seconds since this call of :func:`fit` began, so a run ends with
            fewer than ``epochs`` epochs when the budget runs out (its history says how many
            ran). A resumed run gets the budget afresh: a run capped in one session continues
            in the next. With several ranks they stop together (any rank past the budget stops all).
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    progress: bool = True
    description: str = "train"
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise GradGraphError(
                f"TrainConfig needs epochs >= 0, batch_size >= 1, lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise GradGraphError(f"TrainConfig.max_seconds must be > 0 or None, got {self.max_seconds}")


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        history: one dict per epoch (epoch 0 = before training): ``epoch``,
            ``train_loss`` (mean over the epoch's steps; NaN at epoch 0), ``val_error``
            (mean per-item error), ``seconds`` (since the start).
        best_epoch: the epoch (>= 1) whose weights the model holds now; 0 if ``epochs == 0``.
        best_val_error: its validation error.
        seconds: training wall time (a resumed run's includes the time of the calls before).
        resumed_from: the last epoch of the checkpoint this call continued from (``None``: it
            started afresh).
        stopped_by_budget: ``TrainConfig.max_seconds`` ended the training before ``epochs``.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_error: float = math.inf
    seconds: float = 0.0
    resumed_from: int | None = None
    stopped_by_budget: bool = False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: BatchSource,
    error_fn: Callable[[nn.Module, Any], Tensor],
    *,
    batch_size: int = 64,
    context: DistributedContext | None = None,
) -> Tensor:
    """Per-item errors of ``model`` on every item of ``source``, in order: ``[len(source)]``.

    With several ranks, each evaluates its block of items (:meth:`DistributedContext.shard`)
    and every rank returns all ``len(source)`` errors; a source without ``batch(index)``
    is evaluated whole on every rank instead.
    """
    context = context or SINGLE_PROCESS
    model = _unwrap(model)  # no DDP hooks: ranks evaluate different numbers of batches
    was_training = model.training
    model.eval()
    try:
        if context.is_distributed and hasattr(source, "batch"):
            block = context.shard(len(source))
            local = [
                error_fn(model, _to_device(source.batch(torch.arange(start, min(start + batch_size, block.stop))),
                                           context.device)).detach().reshape(-1)
                for start in range(block.start, block.stop, batch_size)
            ]
            # float64 on every rank: a rank with no items has no dtype to offer, and the gather needs one
            mine = torch.cat(local).double() if local else torch.zeros(0, dtype=torch.float64)
            errors = context.all_gather_cat(mine.to(context.device), "gathering evaluation errors")
            if errors.numel() != len(source):
                raise GradGraphError(f"evaluate: gathered {errors.numel()} errors for {len(source)} items")
            return errors
        errors = [error_fn(model, _to_device(batch, context.device)).detach().reshape(-1)
                  for batch in source.batches(batch_size, shuffle=False)]
    finally:
        model.train(was_training)
    if not errors:
        raise GradGraphError("evaluate: the source produced no batch")
    return torch.cat(errors)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _to_device(batch: Any, device: torch.device) -> Any:
    """PyG batches (anything with ``.to``) go to ``device``; other batches are the source's job."""
    if device.type != "cpu" and callable(getattr(batch, "to", None)):
        return batch.to(device)
    return batch


def _rank_batches(
    source: BatchSource, batch_size: int, generator: torch.Generator, context: DistributedContext
) -> Iterator[tuple[Any, float]]:
    """``(batch, loss_scale)`` per training step, this rank's slice of each global batch.

    The scale ``n_rank · world_size / n_global`` makes DDP's average of the ranks'
    gradients of ``scale · mean-loss-over-own-slice`` equal the gradient of the global
    batch's mean loss, even when the last batch does not split evenly. A rank whose slice
    is empty still steps (DDP needs every rank in every backward) on one item with scale 0.
    """
    if not context.is_distributed:
        for batch in source.batches(batch_size, shuffle=True, generator=generator):
            yield batch, 1.0
        return
    if not hasattr(source, "batch"):
        raise GradGraphError(
            f"fit on {context.world_size} processes needs a source with batch(index) to split batches across "
            f"ranks; {type(source).__name__} has none (see gradgraph_lab.tasks.training.IndexableSource)"
        )
    order = torch.randperm(len(source), generator=generator)  # the same on every rank: same seed
    for start in range(0, len(source), batch_size):
        chunk = order[start : start + batch_size]
        mine = chunk[context.rank :: context.world_size]
        if len(mine) == 0:
            yield source.batch(chunk[:1]), 0.0
        else:
            yield source.batch(mine), len(mine) * context.world_size / len(chunk)


def _out_of_time(start: float, config: TrainConfig, context: DistributedContext) -> bool:
    """Whether the time budget is spent on any rank (the ranks must agree, or one would wait forever)."""
    return context.any(time.perf_counter() - start > config.max_seconds, "agreeing on the time budget")


def _checkpoint_identity(model: nn.Module, train: BatchSource, val: BatchSource, config: TrainConfig,
                         identity: Mapping[str, Any] | None) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (JSON-normalised, so a reloaded one compares equal)."""
    return jsonable({
        "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
        "grad_clip": config.grad_clip, "seed": config.seed,
        "num_train": len(train), "num_val": len(val),
        # A lazy layer's shape is known only after its first forward pass: recorded as None until then.
        "parameters": [[name, None if is_lazy(value) else list(value.shape)]
                       for name, value in model.state_dict().items()],
        "run": dict(identity or {}),
    })


def _load_fit_checkpoint(path: Path, expected: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The state at ``path`` if it continues the run described by ``expected``; else a clear error."""
    state = load_checkpoint(path, "fit", expected, who="fit", remedy="resume with the settings it was written "
                            "with, or run without resuming to start afresh")
    if state["epoch"] > epochs:
        raise GradGraphError(f"fit: the checkpoint {path} has {state['epoch']} epochs, more than the "
                             f"{epochs} asked for; ask for at least {state['epoch']}")
    return state


def fit(
    model: nn.Module,
    train: BatchSource,
    val: BatchSource,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    error_fn: Callable[[nn.Module, Any], Tensor],
    config: TrainConfig,
    *,
    context: DistributedContext | None = None,
    checkpoint: Path | str | None = None,
    resume: bool = False,
    identity: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` with Adam; keep the weights of the epoch with the lowest validation error.

    Args:
        model: the network; it is modified in place and ends with the best weights.
        train, val: the training and validation items.
        loss_fn: ``loss_fn(model, batch) -> scalar`` minimised on ``train``.
        error_fn: ``error_fn(model, batch) -> [G]`` per-item errors, averaged on ``val``
            after every epoch.
        config: epochs, batch size, learning rate, clipping, seed, progress bar.
        context: the processes and the device (default: one CPU process). The model
            must already be on ``context.device``; PyG batches are moved there. With
            several ranks ``loss_fn`` receives the DDP-wrapped model: call it, do not
            reach into its attributes; ``train`` must be an :class:`IndexableSource`.
        checkpoint: a file the run's state is written to after every epoch (atomically,
            rank 0; the directory is created). ``None``: no checkpoint.
        resume: continue from ``checkpoint`` when it exists (from its last epoch; a
            checkpoint of a finished run just restores its best weights). Without it an
            existing checkpoint is replaced. With several ranks every rank reads the file, so
            it must be on storage they share.
        identity: JSON-serialisable facts that must also match for a checkpoint to be
            resumed (the task's data and model settings, say), beside the optimiser settings,
            the split sizes and the parameter shapes that are always checked.

    Returns:
        A :class:`FitResult` with the learning curve (identical on every rank).

    Raises:
        DistributedError: another rank died or hung past the context's timeout.
        GradGraphError: ``resume`` with a checkpoint of other settings (naming them), or of
            more epochs than ``config.epochs``.
    """
    from tqdm.auto import tqdm

    context = context or SINGLE_PROCESS
    if len(train) == 0 or len(val) == 0:
        raise GradGraphError(f"fit needs non-empty train and val sets, got {len(train)} and {len(val)} items")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise GradGraphError(f"fit: {type(model).__name__} has no trainable parameter")
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    eval_batch = max(config.batch_size, 64)
    start = time.perf_counter()
    result = FitResult()
    if resume and checkpoint is None:
        raise GradGraphError("fit: resume=True needs the checkpoint file to resume from (checkpoint=...)")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    expected = _checkpoint_identity(model, train, val, config, identity) if checkpoint is not None else {}
    saved = _load_fit_checkpoint(checkpoint, expected, config.epochs) if resume and checkpoint.exists() else None
    if checkpoint is not None and not resume and context.is_main_process:
        checkpoint.unlink(missing_ok=True)  # a fresh run interrupted before its first epoch leaves no stale state
    earlier_seconds = 0.0
    if saved is None:
        initial = float(evaluate(model, val, error_fn, batch_size=eval_batch, context=context).mean())
        result.history.append({"epoch": 0, "train_loss": math.nan, "val_error": initial, "seconds": 0.0})
        best_state = copy.deepcopy(model.state_dict())
        first_epoch = 1
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle_generator.set_state(saved["shuffle_generator"])
        torch.set_rng_state(saved["cpu_rng"])
        if context.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], context.device)
        best_state = {key: value.to(context.device) for key, value in saved["best_state"].items()}
        result.history = list(saved["history"])
        result.best_epoch, result.best_val_error = saved["best_epoch"], saved["best_val_error"]
        result.resumed_from = saved["epoch"]
        first_epoch = saved["epoch"] + 1
        earlier_seconds = saved["seconds"]
        initial = result.history[0]["val_error"]
    # Wrapped only now: the first forward pass (above) materialises lazy layers, which DDP refuses.
    wrapped = context.wrap(model)
    show = config.progress and context.is_main_process
    epochs = range(first_epoch, config.epochs + 1)
    with tqdm(epochs, desc=config.description, unit="ep", disable=not show, leave=False,
              initial=first_epoch - 1, total=config.epochs) as bar:
        for epoch in bar:
            model.train()
            total, steps = torch.zeros((), dtype=torch.float64), 0
            with context.collective(f"training epoch {epoch} ({config.description})"):
                for batch, scale in _rank_batches(train, config.batch_size, shuffle_generator, context):
                    loss = loss_fn(wrapped, _to_device(batch, context.device))
                    if not torch.isfinite(loss):
                        raise GradGraphError(
                            f"fit: non-finite training loss at epoch {epoch} step {steps} ({config.description}); "
                            "lower the learning rate or check the inputs"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    (loss * scale if scale != 1.0 else loss).backward()
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                    optimizer.step()
                    # scale / world_size is this rank's share of the global batch's mean loss
                    total += float(loss.detach()) * scale / context.world_size
                    steps += 1
            train_loss = float(context.all_reduce_sum(total, f"reducing the training loss of epoch {epoch}")) / max(
                steps, 1
            )
            val_error = float(evaluate(model, val, error_fn, batch_size=eval_batch, context=context).mean())
            seconds = earlier_seconds + time.perf_counter() - start
            result.history.append({"epoch": epoch, "train_loss": train_loss, "val_error": val_error, "seconds": seconds})
            if val_error < result.best_val_error:
                result.best_val_error, result.best_epoch = val_error, epoch
                best_state = copy.deepcopy(model.state_dict())
            if checkpoint is not None and context.is_main_process:
                save_checkpoint(checkpoint, "fit", expected, {
                    "epoch": epoch, "seconds": seconds,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_state": best_state,
                    "history": result.history, "best_epoch": result.best_epoch,
                    "best_val_error": result.best_val_error,
                    "shuffle_generator": shuffle_generator.get_state(), "cpu_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(context.device) if context.device.type == "cuda" else None,
                })
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_error:.4f}", best=f"{result.best_val_error:.4f}")
            if config.max_seconds is not None and epoch < config.epochs and _out_of_time(start, config, context):
                result.stopped_by_budget = True
                break
    model.load_state_dict(best_state)
    if config.epochs == 0:
        result.best_val_error = initial
    result.seconds = earlier_seconds + time.perf_counter() - start
    return result
