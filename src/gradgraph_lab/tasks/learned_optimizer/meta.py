"""Meta-training runs: a :class:`~gradgraph.optim.MetaTrainer` under a wall-clock budget,
with atomic, resumable checkpoints, a tqdm bar and an export of the meta-model.

``run_meta_training(MetaRunConfig(...))`` writes ``<out_dir>/checkpoint.pt`` every
``checkpoint_every`` outer steps (temp file + rename: an interrupted run never leaves a
half-written checkpoint) and resumes from it when started again with the same config; the
wall-clock budget counts the time of earlier runs. ``export_meta_model`` writes the small
file that :func:`gradgraph.optim.load_pretrained` reads.

Start and selection (:mod:`~gradgraph_lab.tasks.learned_optimizer.selection`): with
``start="tuned-adam"`` the rule starts as Adam plus a little momentum at a learning rate
``αβ`` chosen on the task's validation split: Adam's tuned rate (lowest best validation
loss) and its two grid neighbours are scored with the benchmark's protocol, the best
start wins; with ``select_every > 0`` the benchmark's protocol
is run on the validation split at outer step 0 and every ``select_every`` outer steps,
and the export is the best-scoring meta-model — outer step 0 included, so the exported
optimizer is never worse than its start on validation.

Meta-loss (``meta_loss``): ``"log-loss"`` (mean log held-out loss over a truncation) or
``"time-above-target"`` (:func:`gradgraph.optim.meta_loss.time_above_target`), whose target
``L*`` is the validation protocol's tuned Adam: its best validation loss averaged over the
selection seeds (:func:`adam_target_loss`; computed with the protocol at the start of the
run, recorded in ``history.json`` and the export's provenance).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradgraph_lab.checkpoints import load_checkpoint, save_checkpoint
from gradgraph.datasets.atomic import atomic_torch_save, atomic_write_bytes
from gradgraph_lab.distributed import SINGLE_PROCESS, DistributedContext, resolve_device
from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, TaskFamilyTrainer
from gradgraph.optim.meta_loss import META_LOSSES, TARGET_META_LOSSES
from gradgraph_lab.tasks.learned_optimizer.benchmark import log_grid
from gradgraph_lab.tasks.learned_optimizer.run import load_meta_model
from gradgraph_lab.tasks.learned_optimizer.selection import (
    SELECTION_SEEDS_FROM,
    ValidationProtocol,
    model_copy,
    score_meta_model,
    validation_protocol,
)
from gradgraph_lab.tasks.learned_optimizer.tasks import TASK_FAMILIES, BenchmarkTask, get_family, get_task

__all__ = ["MetaRunConfig", "adam_target_loss", "copy_meta_parameters", "export_from_checkpoint", "export_meta_model",
           "run_meta_training"]

VARIANTS = ("gradmetanet", "deepsets", "sgdm")
STARTS = ("tuned-adam", "fixed")


@dataclass
class MetaRunConfig:
    """One meta-training run.

    Attributes:
        task: inner task (:data:`~gradgraph_lab.tasks.learned_optimizer.tasks.TASK_NAMES`) or task family
            (:data:`~gradgraph_lab.tasks.learned_optimizer.tasks.TASK_FAMILIES`: a
            :class:`~gradgraph.optim.TaskFamilyTrainer` splits the particles over its members; each member
            its own ``L*`` and validation protocol, a candidate's score their mean; needs ``start="fixed"``).
        variant: ``"gradmetanet"`` (ours), ``"deepsets"`` (per-parameter MLP only) or ``"sgdm"``
            (only ``α`` and ``μ``, ``β = 0``; it starts at ``α``, ``μ`` = 0.9 whatever ``start`` says:
            it has no Adam part to tune).
        estimator: ``"tbptt"`` or ``"pes"``.
        minutes: wall-clock budget (earlier runs of a resumed checkpoint count).
        max_outer_steps: stop after this many outer steps even within budget.
        num_particles, truncation, horizon, outer_lr, scalar_lr, sigma: see
            :class:`~gradgraph.optim.MetaTrainConfig`.
        start: ``"tuned-adam"``: ``β = lr / α`` with ``lr`` chosen on the validation split
            (module docstring; the rule starts as Adam at ``lr`` plus a little momentum);
            ``"fixed"``: ``α``, ``β`` as given.
        alpha, beta, residual_adam: the start of the update rule. The paper starts at
            ``α = 0.1, β = 0.001`` with ``F = MLP`` and meta-trains for 50,000 outer steps;
            a CPU budget of a few hundred outer steps cannot discover per-parameter
            adaptivity from there (measured: both variants stayed far from tuned Adam), so
            runs start from ``F = Adam's direction + MLP`` and learn the correction.
        select_every: outer steps between scorings on the validation protocol (0: no
            selection; the export is then the last meta-model).
        select_seeds, select_steps: seeds and step budget of that protocol (``select_steps``
            ``None``: the horizon).
        device: ``--device`` value (:func:`gradgraph_lab.distributed.resolve_device`); under
            ``torchrun`` the context's device is used.
        seed: seeds the meta-model's initialisation and the trainer.
        out_dir: where the checkpoint and the log go.
        checkpoint_every: outer steps between checkpoints.
        progress: show a tqdm bar.
        meta_loss: ``"time-above-target"`` (the default: measured better, docs/learned_optimizer.md),
            ``"first-passage"`` or ``"log-loss"`` (module docstring; the target meta-losses
            compare with tuned Adam's best validation loss, so they need the validation protocol).
        temperature: ``τ`` of the target meta-losses.
        grad_clip, grad_clip_relative: the meta-gradient clips of :class:`~gradgraph.optim.MetaTrainConfig`.
        schedule: the rule learns a step-size schedule (:attr:`~gradgraph.optim.MetaModelConfig.schedule`).
        scalars_first: outer steps that train only the scalars (and the schedule) before every
            meta-parameter trains (:attr:`~gradgraph.optim.MetaTrainConfig.scalars_first`).
        init_from: a meta-model file (export or shipped name) whose meta-parameters of the same
            name and shape replace the start's (:func:`copy_meta_parameters`) — a staged run, e.g.
            the scalars and schedule of a learned SGDM rule as the start of a GradMetaNet rule,
            whose ``β`` (the weight of the Adam direction and ``F``) then starts at ``beta``.
            Needs ``start="fixed"``: the tuned start would overwrite ``β``.
    """

    task: str = "digits"
    variant: str = "gradmetanet"
    estimator: str = "pes"
    minutes: float = 30.0
    max_outer_steps: int = 1_000_000
    num_particles: int = 4
    truncation: int = 10
    horizon: int = 300
    outer_lr: float = 1e-3
    scalar_lr: float = 1e-3
    sigma: float = 0.01
    start: str = "tuned-adam"
    alpha: float = 0.1
    beta: float = 0.3
    residual_adam: bool = True
    select_every: int = 25
    select_seeds: int = 5
    select_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/learned-optimizer/meta"
    checkpoint_every: int = 25
    progress: bool = True
    meta_loss: str = "time-above-target"
    temperature: float = 0.25
    grad_clip: float | None = 1.0
    grad_clip_relative: float | None = None
    schedule: bool = False
    scalars_first: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.task in TASK_FAMILIES and self.start != "fixed":
            raise GradGraphError(f"MetaRunConfig: the task family {self.task!r} needs start='fixed' (got "
                                 f"{self.start!r}): a tuned start is one learning rate, the members' differ")
        if self.init_from is not None and self.start != "fixed":
            raise GradGraphError(f"MetaRunConfig.init_from needs start='fixed' (got {self.start!r}): a tuned start "
                                 "would replace the beta the staged run starts from")
        if self.meta_loss not in META_LOSSES:
            raise GradGraphError(f"MetaRunConfig.meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        if self.variant not in VARIANTS:
            raise GradGraphError(f"MetaRunConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.minutes > 0:
            raise GradGraphError(f"MetaRunConfig.minutes must be > 0, got {self.minutes}")
        if self.start not in STARTS:
            raise GradGraphError(f"MetaRunConfig.start must be one of {STARTS}, got {self.start!r}")
        if self.select_every < 0 or self.select_seeds < 1:
            raise GradGraphError(
                f"MetaRunConfig needs select_every >= 0 and select_seeds >= 1, got {self.select_every}, {self.select_seeds}"
            )

    def trainer_config(self, target_loss: float | None = None) -> MetaTrainConfig:
        """The :class:`MetaTrainConfig` of this run (``target_loss``: ``L*`` of ``"time-above-target"``)."""
        return MetaTrainConfig(estimator=self.estimator, num_particles=self.num_particles, truncation=self.truncation,
                               horizon=self.horizon, outer_lr=self.outer_lr, scalar_lr=self.scalar_lr,
                               sigma=self.sigma, seed=self.seed, meta_loss=self.meta_loss, target_loss=target_loss,
                               temperature=self.temperature, grad_clip=self.grad_clip,
                               grad_clip_relative=self.grad_clip_relative, scalars_first=self.scalars_first)


def _build(config: MetaRunConfig, context: DistributedContext, benches: list[BenchmarkTask], beta: float,
           targets: list[float | None]) -> MetaTrainer | TaskFamilyTrainer:
    # Same meta-model initialisation on every rank; each rank its own particles, data and
    # perturbations (seed offset by rank); meta-gradients are averaged across ranks.
    torch.manual_seed(config.seed)
    if config.num_particles % context.world_size:
        raise GradGraphError(
            f"meta-training: {config.num_particles} particles cannot be split evenly over {context.world_size} ranks"
        )
    trainer_config = replace(config.trainer_config(targets[0]),
                             num_particles=config.num_particles // context.world_size,
                             seed=config.seed + 1000 * context.rank)
    sgdm = config.variant == "sgdm"
    meta_model = LearnedUpdate(MetaModelConfig(use_gradmetanet=config.variant == "gradmetanet", alpha=config.alpha,
                                               beta=beta, residual_adam=config.residual_adam and not sgdm,
                                               learned_term=not sgdm, schedule=config.schedule))
    if config.init_from is not None:
        copy_meta_parameters(load_meta_model(config.init_from), meta_model)
    all_reduce = context.all_reduce_mean if context.is_distributed else None
    tasks = [bench.meta_task or bench.task for bench in benches]
    if config.task in TASK_FAMILIES:
        return TaskFamilyTrainer(meta_model, tasks, trainer_config, targets, all_reduce=all_reduce)
    return MetaTrainer(meta_model, tasks[0], trainer_config, all_reduce=all_reduce)


def copy_meta_parameters(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy every parameter of ``source`` that ``target`` has under the same name and shape; return their names.

    Raises:
        GradGraphError: none matches (the files are of unrelated rules).
    """
    own = dict(target.named_parameters())
    copied = []
    with torch.no_grad():
        for name, value in source.named_parameters():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                copied.append(name)
    if not copied:
        raise GradGraphError(f"init_from: no meta-parameter of the file matches the rule's (file: "
                             f"{[n for n, _ in source.named_parameters()]}; rule: {sorted(own)})")
    return copied


def export_meta_model(trainer: MetaTrainer | TaskFamilyTrainer, path: Path | str, provenance: dict[str, Any],
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a meta-model alone (``{"meta_config", "meta_model", "provenance"}``), atomically.

    Args:
        trainer: its ``meta_model``'s config is written, and its weights unless ``state`` is given.
        path: the file.
        provenance: how it was made (JSON-able).
        state: the weights to write (e.g. the selected candidate); default the current ones.
    """
    weights = state if state is not None else trainer.meta_model.state_dict()
    _write_export(path, trainer.meta_model.config.to_dict(), weights, provenance)


def _write_export(path: Path | str, meta_config: dict[str, Any], weights: dict[str, torch.Tensor],
                  provenance: dict[str, Any]) -> None:
    """The export file's one format, written atomically (:func:`gradgraph.optim.load_pretrained` reads it)."""
    atomic_torch_save(Path(path), {
        "meta_config": meta_config,
        "meta_model": {key: value.detach().cpu() for key, value in weights.items()},
        "provenance": provenance,
    })


def export_from_checkpoint(checkpoint: Path | str, path: Path | str) -> dict[str, Any]:
    """Write the export file of a run's checkpoint — its selected candidate, else its last meta-model.

    For a run stopped before its budget (killed when later validation candidates fell): the file
    is the one ``run_meta_training(..., export=path)`` would have written at that checkpoint.

    Returns:
        The file's provenance.

    Raises:
        GradGraphError: ``checkpoint`` is not a meta-training checkpoint.
    """
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or saved.get("kind") != "meta-training":
        raise GradGraphError(f"{checkpoint} is not a gradgraph meta-training checkpoint (run_meta_training writes them)")
    state = saved["state"]
    trainer, selection = state["trainer"], state.get("selection") or {}
    best = selection.get("best")
    weights = best["meta_model"] if best is not None else trainer["meta_model"]
    provenance = {
        "command": f"gradgraph learned-optimizer --export-from {checkpoint}", "run_config": saved["identity"],
        "outer_steps": trainer["outer_steps"], "minutes": state["elapsed"] / 60,
        "validation_adam_lr": selection.get("adam_lr"), "start_lr": selection.get("start_lr"),
        "start_scores": selection.get("start_scores"), "meta_loss_target": selection.get("target_loss"),
        "selected_outer_step": None if best is None else best["outer_step"],
        "candidates": selection.get("candidates", []),
    }
    _write_export(path, trainer["meta_config"], weights, provenance)
    return provenance


def adam_target_loss(protocol: ValidationProtocol) -> float:
    """``L*``: tuned Adam's best validation loss, averaged over the protocol's seeds."""
    bests = [curve.best[0] for curve in protocol.reference]
    return sum(bests) / len(bests)


def _start_protocol(config: MetaRunConfig, bench: BenchmarkTask) -> ValidationProtocol | None:
    """The validation protocol, if the start is tuned on it, checkpoints are selected with it
    or the meta-loss's target comes from it."""
    if config.start != "tuned-adam" and config.select_every == 0 and config.meta_loss == "log-loss":
        return None
    return validation_protocol(
        bench,
        seeds=range(SELECTION_SEEDS_FROM, SELECTION_SEEDS_FROM + config.select_seeds),
        steps=config.select_steps or config.horizon,
        grid=log_grid(-4, -1, 10),
    )


def _score(protocols: list[ValidationProtocol], meta_model: LearnedUpdate) -> dict[str, float]:
    """:func:`score_meta_model` on every member's protocol: the mean of the scores, step reductions and
    best losses, the runs reaching in all (one protocol: its own numbers)."""
    scores = [score_meta_model(protocol, meta_model) for protocol in protocols]
    if len(scores) == 1:
        return scores[0]
    mean = {key: sum(score[key] for score in scores) / len(scores) for key in ("score", "step_reduction", "best_loss")}
    return {**mean, "reached": sum(score["reached"] for score in scores),
            "diverged": sum(score["diverged"] for score in scores),
            "members": [score["step_reduction"] for score in scores]}


def _choose_start(config: MetaRunConfig, protocol: ValidationProtocol) -> tuple[float, dict[str, float]]:
    """``(lr, {lr: validation score})``: the best of Adam's tuned rate and its grid neighbours as ``αβ``.

    With ``residual_adam`` the learned term starts at zero, so the starting rule does not
    depend on the variant and is scored with the cheap per-parameter-only one. Why not the
    tuned rate alone: "lowest best loss" ignores speed, the benchmark's metric does not.
    """
    grid = log_grid(-4, -1, 10)
    if not config.residual_adam:
        return protocol.adam_lr, {}
    index = min(range(len(grid)), key=lambda i: abs(grid[i] - protocol.adam_lr))
    scores = {}
    for lr in grid[max(index - 1, 0): index + 2]:
        rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=config.alpha, beta=lr / config.alpha,
                                             residual_adam=True))
        scores[f"{lr:.6g}"] = score_meta_model(protocol, rule)["score"]
    best = max(scores, key=scores.get)
    return float(best), scores


def run_meta_training(config: MetaRunConfig, export: Path | str | None = None,
                      context: DistributedContext | None = None) -> MetaTrainer | TaskFamilyTrainer:
    """Meta-train under ``config``'s budget, resuming from ``<out_dir>/checkpoint.pt`` if present.

    Under ``torchrun`` (``context`` from :func:`gradgraph_lab.distributed.init_distributed`) every
    rank steps ``num_particles / world_size`` particles, the meta-gradients are averaged with
    an all-reduce, every rank keeps its own checkpoint (``checkpoint-rank<r>.pt``), rank 0
    writes the log and the export (and runs the selection), and all ranks stop together
    when the budget is spent. Everything runs on ``context.device`` (one process:
    ``config.device``).

    Returns:
        The trainer (its ``meta_model`` is the last meta-model; ``history`` the log and
        ``selection`` the scores of the candidates and the best one).
    """
    from tqdm.auto import tqdm

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = context or replace(SINGLE_PROCESS, device=resolve_device(config.device))
    checkpoint_path = out_dir / ("checkpoint.pt" if not context.is_distributed else f"checkpoint-rank{context.rank}.pt")
    family = config.task in TASK_FAMILIES
    benches = get_family(config.task, context.device) if family else [get_task(config.task, context.device)]
    start = time.perf_counter()
    # Deterministic, so every rank (and a resumed run) computes the same start.
    protocols = [_start_protocol(config, bench) for bench in benches]
    protocol = protocols[0]
    # SGDM has no Adam part: it starts at (alpha, mu) as configured.
    start_lr, start_scores = ((None, {}) if config.start == "fixed" or config.variant == "sgdm"
                              else _choose_start(config, protocol))
    beta = config.beta if start_lr is None else start_lr / config.alpha
    targets = [adam_target_loss(p) if config.meta_loss in TARGET_META_LOSSES else None for p in protocols]
    target_loss: float | list[float | None] | None = targets if family else targets[0]
    trainer = _build(config, context, benches, beta, targets)
    adam_lr = None if protocol is None else [p.adam_lr for p in protocols] if family else protocol.adam_lr
    selection: dict[str, Any] = {"adam_lr": adam_lr, "start_lr": start_lr,
                                 "start_scores": start_scores, "target_loss": target_loss, "candidates": [],
                                 "best": None}
    elapsed = time.perf_counter() - start
    if checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, "meta-training", _comparable(config), who="meta-training",
                                     remedy="use another --out-dir or delete it")
        trainer.load_state_dict(checkpoint["trainer"])
        selection = checkpoint.get("selection", selection)
        elapsed = checkpoint["elapsed"]
    budget = config.minutes * 60
    selecting = config.select_every > 0 and context.is_main_process

    def save() -> None:
        save_checkpoint(checkpoint_path, "meta-training", _comparable(config),
                        {"trainer": trainer.state_dict(), "selection": selection, "elapsed": elapsed})

    def select(bar: Any) -> None:
        assert protocol is not None
        score = _score(protocols, trainer.meta_model)
        candidate = {"outer_step": trainer.outer_steps, **score}
        selection["candidates"].append(candidate)
        best = selection["best"]
        if best is None or score["score"] > best["score"]:
            selection["best"] = {**candidate, "meta_model": model_copy(trainer.meta_model)}
        bar.write(f"validation protocol at outer step {trainer.outer_steps}: step reduction "
                  f"{score['step_reduction']:.3f} ({score['reached']}/{len(protocols) * len(protocol.seeds)} reached), "
                  f"best loss {score['best_loss']:.4f}; selected: outer step {selection['best']['outer_step']}")

    start = time.perf_counter() - elapsed
    with tqdm(desc=f"meta-train {config.variant} on {config.task}"
              f"{f' ({len(benches)} tasks)' if family else ''} ({config.estimator})", unit="outer",
              disable=not (config.progress and context.is_main_process), initial=trainer.outer_steps) as bar:
        if selecting and not selection["candidates"]:
            select(bar)  # outer step 0, the start, is always a candidate
        while trainer.outer_steps < config.max_outer_steps and not context.any(elapsed >= budget, "meta-train budget"):
            line = trainer.step()
            bar.update(1)
            bar.set_postfix(meta_loss=f"{line['meta_loss']:.3f}", alpha=f"{line['alpha']:.3g}",
                            beta=f"{line['beta']:.3g}", mu=f"{line['mu']:.3f}", min=f"{elapsed / 60:.1f}")
            if selecting and trainer.outer_steps % config.select_every == 0:
                select(bar)
            elapsed = time.perf_counter() - start
            if trainer.outer_steps % config.checkpoint_every == 0:
                save()
        if selecting and selection["candidates"][-1]["outer_step"] != trainer.outer_steps:
            select(bar)  # the last meta-model is a candidate too
    elapsed = time.perf_counter() - start
    save()
    trainer.selection = selection
    if not context.is_main_process:
        return trainer
    history = {"history": trainer.history, "adam_lr": selection["adam_lr"], "start_lr": selection["start_lr"],
               "start_scores": selection["start_scores"], "target_loss": target_loss,
               "candidates": selection["candidates"]}
    atomic_write_bytes(out_dir / "history.json", json.dumps(history).encode())
    if export is not None:
        best = selection["best"]
        export_meta_model(trainer, export, {
            "command": "gradgraph learned-optimizer --meta-train", "run_config": _comparable(config),
            "outer_steps": trainer.outer_steps, "minutes": elapsed / 60, "world_size": context.world_size,
            "device": str(context.device), "validation_adam_lr": selection["adam_lr"],
            "start_lr": selection["start_lr"], "start_scores": selection["start_scores"],
            "meta_loss_target": target_loss, "selected_outer_step": None if best is None else best["outer_step"],
            "candidates": selection["candidates"],
        }, state=None if best is None else best["meta_model"])
    return trainer


def _comparable(config: MetaRunConfig) -> dict[str, Any]:
    """The fields that define the run (budget, output, device and display fields may change on resume)."""
    fields = asdict(config)
    for key in ("minutes", "max_outer_steps", "out_dir", "checkpoint_every", "progress", "device"):
        fields.pop(key)
    return fields
