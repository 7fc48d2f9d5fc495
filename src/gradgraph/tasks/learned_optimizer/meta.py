"""Meta-training runs: a :class:`~gradgraph.optim.MetaTrainer` under a wall-clock budget,
with atomic, resumable checkpoints, a tqdm bar and an export of the meta-model.

``run_meta_training(MetaRunConfig(...))`` writes ``<out_dir>/checkpoint.pt`` every
``checkpoint_every`` outer steps (temp file + rename: an interrupted run never leaves a
half-written checkpoint) and resumes from it when started again with the same config; the
wall-clock budget counts the time of earlier runs. ``export_meta_model`` writes the small
file that :func:`gradgraph.optim.load_pretrained` reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradgraph.data.cache import atomic_torch_save
from gradgraph.distributed import SINGLE_PROCESS, DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer
from gradgraph.tasks.learned_optimizer.tasks import get_task

__all__ = ["MetaRunConfig", "export_meta_model", "run_meta_training"]

VARIANTS = ("gradmetanet", "deepsets")


@dataclass
class MetaRunConfig:
    """One meta-training run.

    Attributes:
        task: inner task (:data:`~gradgraph.tasks.learned_optimizer.tasks.TASK_NAMES`).
        variant: ``"gradmetanet"`` (ours) or ``"deepsets"`` (per-parameter MLP only).
        estimator: ``"tbptt"`` or ``"pes"``.
        minutes: wall-clock budget (earlier runs of a resumed checkpoint count).
        max_outer_steps: stop after this many outer steps even within budget.
        num_particles, truncation, horizon, outer_lr, scalar_lr, sigma: see
            :class:`~gradgraph.optim.MetaTrainConfig`.
        alpha, beta, residual_adam: the start of the update rule. The paper starts at
            ``α = 0.1, β = 0.001`` with ``F = MLP`` and meta-trains for 50,000 outer steps;
            a CPU budget of a few hundred outer steps cannot discover per-parameter
            adaptivity from there (measured: both variants stayed far from tuned Adam), so
            runs start from ``F = Adam's direction + MLP`` with ``αβ = 0.03`` (Adam's
            learning rate at the start) and learn the correction.
        seed: seeds the meta-model's initialisation and the trainer.
        out_dir: where the checkpoint and the log go.
        checkpoint_every: outer steps between checkpoints.
        progress: show a tqdm bar.
    """

    task: str = "digits"
    variant: str = "gradmetanet"
    estimator: str = "tbptt"
    minutes: float = 30.0
    max_outer_steps: int = 1_000_000
    num_particles: int = 4
    truncation: int = 10
    horizon: int = 300
    outer_lr: float = 1e-3
    scalar_lr: float = 1e-3
    sigma: float = 0.01
    alpha: float = 0.1
    beta: float = 0.3
    residual_adam: bool = True
    seed: int = 0
    out_dir: str = "runs/learned-optimizer/meta"
    checkpoint_every: int = 25
    progress: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise GradGraphError(f"MetaRunConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.minutes > 0:
            raise GradGraphError(f"MetaRunConfig.minutes must be > 0, got {self.minutes}")

    def trainer_config(self) -> MetaTrainConfig:
        """The :class:`MetaTrainConfig` of this run."""
        return MetaTrainConfig(estimator=self.estimator, num_particles=self.num_particles, truncation=self.truncation,
                               horizon=self.horizon, outer_lr=self.outer_lr, scalar_lr=self.scalar_lr,
                               sigma=self.sigma, seed=self.seed)


def _build(config: MetaRunConfig, context: DistributedContext) -> MetaTrainer:
    # Same meta-model initialisation on every rank; each rank its own particles, data and
    # perturbations (seed offset by rank); meta-gradients are averaged across ranks.
    torch.manual_seed(config.seed)
    if config.num_particles % context.world_size:
        raise GradGraphError(
            f"meta-training: {config.num_particles} particles cannot be split evenly over {context.world_size} ranks"
        )
    trainer_config = replace(config.trainer_config(), num_particles=config.num_particles // context.world_size,
                             seed=config.seed + 1000 * context.rank)
    meta_model = LearnedUpdate(MetaModelConfig(use_gradmetanet=config.variant == "gradmetanet", alpha=config.alpha,
                                               beta=config.beta, residual_adam=config.residual_adam))
    all_reduce = context.all_reduce_mean if context.is_distributed else None
    bench = get_task(config.task)
    task = bench.meta_task or bench.task
    return MetaTrainer(meta_model, task, trainer_config, all_reduce=all_reduce)


def export_meta_model(trainer: MetaTrainer, path: Path | str, provenance: dict[str, Any]) -> None:
    """Write the meta-model alone (``{"meta_config", "meta_model", "provenance"}``), atomically."""
    atomic_torch_save(Path(path), {
        "meta_config": trainer.meta_model.config.to_dict(),
        "meta_model": trainer.meta_model.state_dict(),
        "provenance": provenance,
    })


def run_meta_training(config: MetaRunConfig, export: Path | str | None = None,
                      context: DistributedContext | None = None) -> MetaTrainer:
    """Meta-train under ``config``'s budget, resuming from ``<out_dir>/checkpoint.pt`` if present.

    Under ``torchrun`` (``context`` from :func:`gradgraph.distributed.init_distributed`) every
    rank steps ``num_particles / world_size`` particles, the meta-gradients are averaged with
    an all-reduce, every rank keeps its own checkpoint (``checkpoint-rank<r>.pt``), rank 0
    writes the log and the export, and all ranks stop together when the budget is spent.

    Returns:
        The trainer (its ``meta_model`` is the result; ``history`` the log).
    """
    from tqdm.auto import tqdm

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = context or SINGLE_PROCESS
    checkpoint_path = out_dir / ("checkpoint.pt" if not context.is_distributed else f"checkpoint-rank{context.rank}.pt")
    trainer = _build(config, context)
    elapsed = 0.0
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint["run_config"] != _comparable(config):
            raise GradGraphError(
                f"{checkpoint_path} was written by another configuration ({checkpoint['run_config']}); "
                "use another --out-dir or delete it"
            )
        trainer.load_state_dict(checkpoint["trainer"])
        elapsed = checkpoint["elapsed"]
    budget = config.minutes * 60

    def save() -> None:
        atomic_torch_save(checkpoint_path, {"run_config": _comparable(config), "trainer": trainer.state_dict(),
                                            "elapsed": elapsed})

    start = time.perf_counter() - elapsed
    with tqdm(desc=f"meta-train {config.variant} on {config.task} ({config.estimator})", unit="outer",
              disable=not (config.progress and context.is_main_process), initial=trainer.outer_steps) as bar:
        while trainer.outer_steps < config.max_outer_steps and not context.any(elapsed >= budget, "meta-train budget"):
            line = trainer.step()
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(meta_loss=f"{line['meta_loss']:.3f}", alpha=f"{line['alpha']:.3g}",
                            beta=f"{line['beta']:.3g}", mu=f"{line['mu']:.3f}", min=f"{elapsed / 60:.1f}")
            if trainer.outer_steps % config.checkpoint_every == 0:
                save()
    save()
    if not context.is_main_process:
        return trainer
    with open(out_dir / "history.json", "w") as file:
        json.dump(trainer.history, file)
    if export is not None:
        export_meta_model(trainer, export, {
            "command": "gradgraph learned-optimizer --meta-train", "run_config": _comparable(config),
            "outer_steps": trainer.outer_steps, "minutes": elapsed / 60, "world_size": context.world_size,
        })
    return trainer


def _comparable(config: MetaRunConfig) -> dict[str, Any]:
    """The fields that define the run (budget, output and display fields may change on resume)."""
    fields = asdict(config)
    for key in ("minutes", "max_outer_steps", "out_dir", "checkpoint_every", "progress"):
        fields.pop(key)
    return fields
