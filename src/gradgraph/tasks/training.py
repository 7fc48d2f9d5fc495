"""The one training loop every learned gradgraph model uses: Adam, mini-batches, progress
bars, and the best-on-validation weights at the end.

A task supplies *what* to train on through two small pieces:

* a :class:`BatchSource` — anything with ``len()`` (number of items) and
  ``batches(batch_size, shuffle=..., generator=...)``. :class:`LoaderSource` wraps a list
  of PyG graphs in a :class:`torch_geometric.loader.DataLoader`; tasks whose items share
  one architecture provide precollated sources instead (much faster, no per-graph loop);
* ``loss_fn(model, batch) -> scalar`` for training and ``error_fn(model, batch) -> [G]``,
  the per-item evaluation error (the validation error selects the epoch kept).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError

__all__ = ["BatchSource", "FitResult", "LoaderSource", "TrainConfig", "evaluate", "fit"]


class BatchSource(Protocol):
    """Items that can be served in mini-batches."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[Any]:
        """Mini-batches covering every item once (the last one may be smaller)."""
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
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    progress: bool = True
    description: str = "train"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise GradGraphError(
                f"TrainConfig needs epochs >= 0, batch_size >= 1, lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        history: one dict per epoch (epoch 0 = before training): ``epoch``,
            ``train_loss`` (mean over the epoch's steps; NaN at epoch 0), ``val_error``
            (mean per-item error), ``seconds`` (since the start).
        best_epoch: the epoch (>= 1) whose weights the model holds now; 0 if ``epochs == 0``.
        best_val_error: its validation error.
        seconds: wall time of the whole fit.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_error: float = math.inf
    seconds: float = 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: BatchSource,
    error_fn: Callable[[nn.Module, Any], Tensor],
    *,
    batch_size: int = 64,
) -> Tensor:
    """Per-item errors of ``model`` on every item of ``source``, in order: ``[len(source)]``."""
    was_training = model.training
    model.eval()
    try:
        errors = [error_fn(model, batch).detach().reshape(-1) for batch in source.batches(batch_size, shuffle=False)]
    finally:
        model.train(was_training)
    if not errors:
        raise GradGraphError("evaluate: the source produced no batch")
    return torch.cat(errors)


def fit(
    model: nn.Module,
    train: BatchSource,
    val: BatchSource,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    error_fn: Callable[[nn.Module, Any], Tensor],
    config: TrainConfig,
) -> FitResult:
    """Train ``model`` with Adam; keep the weights of the epoch with the lowest validation error.

    Args:
        model: the network; it is modified in place and ends with the best weights.
        train, val: the training and validation items.
        loss_fn: ``loss_fn(model, batch) -> scalar`` minimised on ``train``.
        error_fn: ``error_fn(model, batch) -> [G]`` per-item errors, averaged on ``val``
            after every epoch.
        config: epochs, batch size, learning rate, clipping, seed, progress bar.

    Returns:
        A :class:`FitResult` with the learning curve.
    """
    from tqdm.auto import tqdm

    if len(train) == 0 or len(val) == 0:
        raise GradGraphError(f"fit needs non-empty train and val sets, got {len(train)} and {len(val)} items")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise GradGraphError(f"fit: {type(model).__name__} has no trainable parameter")
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    result = FitResult()
    initial = float(evaluate(model, val, error_fn, batch_size=max(config.batch_size, 64)).mean())
    result.history.append({"epoch": 0, "train_loss": math.nan, "val_error": initial, "seconds": 0.0})
    best_state = copy.deepcopy(model.state_dict())
    with tqdm(range(1, config.epochs + 1), desc=config.description, unit="ep", disable=not config.progress,
              leave=False) as bar:
        for epoch in bar:
            model.train()
            total, steps = 0.0, 0
            for batch in train.batches(config.batch_size, shuffle=True, generator=shuffle_generator):
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise GradGraphError(
                        f"fit: non-finite training loss at epoch {epoch} step {steps} ({config.description}); "
                        "lower the learning rate or check the inputs"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                optimizer.step()
                total += float(loss.detach())
                steps += 1
            val_error = float(evaluate(model, val, error_fn, batch_size=max(config.batch_size, 64)).mean())
            result.history.append(
                {
                    "epoch": epoch,
                    "train_loss": total / max(steps, 1),
                    "val_error": val_error,
                    "seconds": time.perf_counter() - start,
                }
            )
            if val_error < result.best_val_error:
                result.best_val_error, result.best_epoch = val_error, epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(loss=f"{total / max(steps, 1):.4f}", val=f"{val_error:.4f}",
                            best=f"{result.best_val_error:.4f}")
    model.load_state_dict(best_state)
    if config.epochs == 0:
        result.best_val_error = initial
    result.seconds = time.perf_counter() - start
    return result
