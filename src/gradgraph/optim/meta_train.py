"""Meta-training of a :class:`LearnedUpdate` over a family of inner training tasks.

A :class:`Task` describes the family: a model factory (seed -> fresh network), a stream of
training batches and a per-datapoint loss. :class:`MetaTrainer` keeps ``P`` inner runs
("particles") of the task in flight, their parameters stacked as ``{name: [P, *shape]}``;
every inner step converts each particle's network on its own batch (:func:`to_graph`),
stacks the graphs into ONE PyG ``Batch`` and runs the meta-model once on all of them.
Particles restart from a fresh initialisation after ``horizon`` steps, staggered so that
the particles are spread over the phases of training; a run that diverges goes back to the
start of its truncation and restarts alone (with its PES partner), so the others keep their
phases.

Two estimators of the meta-gradient, chosen by :attr:`MetaTrainConfig.estimator`:

* ``"tbptt"`` — truncated backpropagation through the unroll. The meta-loss of a
  truncation of ``K`` steps is the mean over particles of a function of the losses
  ``L(θ_{t+1})`` of its steps on a held-out batch (:attr:`Task.sample_validation`) or else
  the next training batch (:attr:`MetaTrainConfig.meta_loss`: ``mean_t log L`` or the
  smoothed steps above a target, :mod:`gradgraph.optim.meta_loss`), differentiated
  through the updates ``θ_{t+1} = θ_t − Δ(θ_t, …)``
  with respect to every meta-parameter. The batch's gradients and factors enter as data
  (no second-order terms: autograd does not see how ``∇L(θ_t)`` depends on ``θ_t``), the
  usual first-order truncated estimator. One meta-model for all particles, so one batched
  GradMetaNet forward per inner step.
* ``"pes"`` — antithetic persistent evolution strategies (:class:`~gradgraph.optim.PES`),
  as the paper: particles come in pairs with meta-parameters ``θ ± ξ``; the estimate is
  unbiased for the smoothed loss of the whole unroll, but each particle has its own
  meta-parameters, so the meta-model runs once per particle. The two particles of a pair
  run the same inner problem — the same initialisation, training and held-out batches and
  restart phase (common random numbers) — so ``L⁺ − L⁻`` measures the perturbation ``±ξ``
  and not the difference between two inner runs (which, half a horizon apart in training,
  is several times larger; measured in the README).

Devices: the trainer runs where the task's models are (the device of the first
``make_model``'s parameters): the meta-model is moved there and every tensor the trainer
creates (inner states, step counters, PES perturbations) lives there; only random streams
stay on the CPU, so a run draws the same data and perturbations on every device.

Outer optimiser: Adam. The meta-gradient passes through ``all_reduce`` (identity by default)
before Adam, so running a share of the particles on each process and averaging the
meta-gradients across processes needs only that callable (and a different ``seed`` per
rank).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradgraph.convert import to_graph
from gradgraph.differences import config_differences, describe_differences, jsonable
from gradgraph.errors import GradGraphError, NonFiniteFactorError
from gradgraph.graph import GradGraph
from gradgraph.optim.batching import ArchitectureCache
from gradgraph.optim.batched import chain_gradients, vmapped_update
from gradgraph.optim.chain_graphs import ChainGraphs
from gradgraph.optim.fused import MLPChain, chain_forward, mlp_chain
from gradgraph.optim.meta_config import ESTIMATORS, PAPER_PROTOCOL, MetaTrainConfig, Task, relative_clip_scale
from gradgraph.optim.meta_loss import first_passage
from gradgraph.optim.meta_loss import meta_loss as compute_meta_loss
from gradgraph.optim.meta_model import LearnedUpdate, OptimizerState
from gradgraph.optim.pes import PES

__all__ = ["ESTIMATORS", "PAPER_PROTOCOL", "MetaTrainConfig", "MetaTrainer", "Task", "relative_clip_scale"]


class _NonFiniteMetaLoss(GradGraphError):
    """A truncation's meta-loss is not finite (an inner run diverged).

    Attributes:
        particles: ``[P]`` bool, the particles that diverged (``None``: not known, all of them).
    """

    def __init__(self, message: str, particles: Tensor | None = None) -> None:
        super().__init__(message)
        self.particles = particles


NonFiniteError = (NonFiniteFactorError, _NonFiniteMetaLoss)


class MetaTrainer:
    """Meta-trains ``meta_model`` on ``task`` (see the module docstring).

    Args:
        meta_model: the :class:`LearnedUpdate` to train (in place).
        task: the inner task family.
        config: a :class:`MetaTrainConfig`.
        all_reduce: ``flat meta-gradient [D] -> averaged [D]`` across processes; identity if ``None``.
    """

    def __init__(self, meta_model: LearnedUpdate, task: Task, config: MetaTrainConfig | None = None,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.task = task
        self.config = config = config or MetaTrainConfig()
        self.all_reduce = all_reduce
        self.next_model_seed = 1_000_000 + 10_000 * config.seed
        #: inner problems (initialisation, batches, restart phase): one per PES pair, else one per particle.
        self.num_problems = config.num_particles // 2 if config.estimator == "pes" else config.num_particles
        self.models = self._for_particles([self.next_seed() for _ in range(self.num_problems)], self._seeded_model)
        self.device = next(self.models[0].parameters()).device
        self.meta_model = meta_model.to(self.device)
        scalars = meta_model.scalar_parameters
        scalar_ids = {id(p) for p in scalars}
        others = [p for p in meta_model.parameters() if id(p) not in scalar_ids]
        self.outer = torch.optim.Adam([{"params": others, "lr": config.outer_lr},
                                       {"params": scalars, "lr": config.scalar_lr}])
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.names = [name for name, p in self.models[0].named_parameters() if p.requires_grad]
        self.params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in self.models])
                       for name in self.names}
        self.state = meta_model.init_state(self.params)
        # Problem k first restarts after (k + 1) * horizon / K steps: spread over training phases.
        self.restart_at = torch.tensor(self._for_particles(
            [(k + 1) * config.horizon // self.num_problems for k in range(self.num_problems)]), device=self.device)
        self.inner_step = torch.zeros(config.num_particles, dtype=torch.long, device=self.device)
        self.batches = self._sample(task.sample_batch)
        self.outer_steps = 0
        self.pes: PES | None = None
        if config.estimator == "pes":
            flat = self.flat_meta_parameters()
            self.pes = PES(config.num_particles // 2, flat.numel(), config.sigma,
                           torch.Generator().manual_seed(config.seed + 7), dtype=flat.dtype, device=self.device)
        self.history: list[dict[str, float]] = []
        #: ``[D]`` where the flat meta-parameter vector holds a scalar (the scalars-first stage trains only these).
        self.scalar_mask = torch.cat([
            torch.full((p.numel(),), id(p) in scalar_ids, dtype=torch.bool) for p in meta_model.parameters()
        ]).to(self.device)
        # Every particle's network has the task's architecture: its graph structure is
        # collated once (and its weight blocks shared by GradGraph), not at every inner step.
        self._architecture = ArchitectureCache()
        #: truncations skipped because an inner run diverged (non-finite loss or factors).
        self.diverged_truncations = 0
        #: ``[P]`` first-passage survival ``S`` of every inner run (:func:`gradgraph.optim.meta_loss.first_passage`).
        self.survival = torch.ones(config.num_particles, device=self.device)
        #: running mean of the meta-gradient norms (the relative clip's reference; ``None``: no step yet).
        self.mean_grad_norm: float | None = None
        #: the closed-form batched path's network, if it applies (``MetaTrainConfig.batched``).
        self.chain: MLPChain | None = None
        if config.batched and not task.forward_kwargs:
            self.chain = mlp_chain(self.models[0])
        #: the structure of the particles' graphs on the batched GradMetaNet path (built at the first step).
        self._chain_graphs: ChainGraphs | None = None

    # ---------------------------------------------------------------- inner runs
    def next_seed(self) -> int:
        """A model seed no inner run has used."""
        self.next_model_seed += 1
        return self.next_model_seed - 1

    def _seeded_model(self, seed: int) -> nn.Module:
        return self.task.make_model(seed)

    def _for_particles(self, per_problem: list[Any], make: Callable[[Any], Any] | None = None) -> list[Any]:
        """``[K] -> [P]``: particle ``p`` runs problem ``p mod K`` (PES: ``p`` and ``p + P/2`` are a pair).

        With ``make``, every particle gets its own ``make(value)`` (e.g. its own module, from
        its problem's seed), so particles never share mutable objects.
        """
        return [per_problem[p % self.num_problems] if make is None else make(per_problem[p % self.num_problems])
                for p in range(self.config.num_particles)]

    def _sample(self, sample: Callable[[torch.Generator], tuple[Tensor, Any]]) -> list[tuple[Tensor, Any]]:
        """One batch per inner problem from the data stream, handed to every particle of that problem."""
        return self._for_particles([sample(self.data_generator) for _ in range(self.num_problems)])

    def _stacked(self, batches: list[tuple[Tensor, Any]]) -> tuple[Tensor, Tensor]:
        """``[P]`` batches -> ``(inputs [P, b, ...], targets [P, b, ...])``."""
        return torch.stack([inputs for inputs, _ in batches]), torch.stack([targets for _, targets in batches])

    def _batched_gradients(self, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
        """The batched path (:attr:`chain`): mean gradients ``{name: [P, *shape]}`` of every particle on
        its batch and, for GradMetaNet, the ``Batch`` of their graphs (else ``None``), from
        :func:`~gradgraph.optim.batched.chain_gradients`."""
        inputs, targets = self._stacked(self.batches)
        graphs = None
        if self.meta_model.needs_graph:
            if self._chain_graphs is None or not self._chain_graphs.matches(inputs.shape[1], inputs.shape[0]):
                first_inputs, first_targets = self.batches[0]
                self._chain_graphs = ChainGraphs.from_model(self.chain, self.models[0], first_inputs, first_targets,
                                                            self.task.loss_fn, self.config.num_particles)
            graphs = self._chain_graphs
        _, grads, batch = chain_gradients(self.chain, params, inputs, targets, self.task.loss_fn, graphs)
        finite = torch.stack([torch.isfinite(g.flatten(1)).all(dim=1) for g in grads.values()]).all(dim=0)
        if batch is not None:  # to_graph refuses non-finite factors: the batched path too, naming the runs
            per_run = torch.stack([batch.act, batch.grad]).isfinite().reshape(2, len(finite), -1).all(dim=2).all(dim=0)
            finite = finite & per_run
        if not finite.all():  # as to_graph's NonFiniteFactorError, naming the runs
            raise _NonFiniteMetaLoss(f"meta-training ({self.task.name}): inner runs "
                                     f"{(~finite).nonzero().reshape(-1).tolist()} diverged", ~finite)
        return {name: grads[name] for name in self.names}, batch

    def _graphs(self, params: dict[str, Tensor]) -> tuple[list[GradGraph], dict[str, Tensor]]:
        """Convert every particle's network on its current batch; mean gradients ``{name: [P, *shape]}``."""
        graphs = []
        for index, (model, (inputs, targets)) in enumerate(zip(self.models, self.batches)):
            with torch.no_grad():
                own = dict(model.named_parameters())
                for name in self.names:
                    own[name].copy_(params[name][index])
            try:
                graphs.append(to_graph(model, inputs, targets, self.task.loss_fn,
                                       forward_kwargs=self.task.forward_kwargs))
            except NonFiniteFactorError as error:  # name the run, so only it restarts
                diverged = torch.zeros(self.config.num_particles, dtype=torch.bool, device=self.device)
                diverged[index] = True
                raise _NonFiniteMetaLoss(f"meta-training ({self.task.name}): inner run {index} diverged: {error}",
                                         diverged) from error
        means = [self._architecture.mean_grad(graph) for graph in graphs]
        return graphs, {name: torch.stack([mean[name] for mean in means]) for name in self.names}

    def _losses(self, params: dict[str, Tensor]) -> Tensor:
        """``[P]`` meta-loss of every particle's ``params`` (differentiable): on a fresh held-out
        batch if the task has ``sample_validation``, else on the particle's next training batch."""
        batches = self.batches
        if self.task.sample_validation is not None:
            batches = self._sample(self.task.sample_validation)
        if self.chain is not None:
            inputs, targets = self._stacked(batches)
            output, _, _ = chain_forward(self.chain, params, inputs)
            num_particles, batch = inputs.shape[:2]
            per_datapoint = self.task.loss_fn(output.reshape(num_particles * batch, *output.shape[2:]),
                                              targets.reshape(num_particles * batch, *targets.shape[2:]))
            return per_datapoint.reshape(num_particles, batch).mean(dim=1)
        losses = []
        for index, (model, (inputs, targets)) in enumerate(zip(self.models, batches)):
            own = {name: params[name][index] for name in self.names}
            output = functional_call(model, own, (inputs,), self.task.forward_kwargs)
            losses.append(self.task.loss_fn(output, targets).mean())
        return torch.stack(losses)

    def _restart_finished(self) -> Tensor:
        """Restart particles that reached their horizon; returns the ``[P]`` restart mask."""
        done = self.inner_step >= self.restart_at
        if done.any():
            fresh_params = dict(self.params)
            # Particles of one problem restart together (same restart phase), from one new seed.
            seeds = self._for_particles([self.next_seed() if bool(done[k]) else None for k in range(self.num_problems)])
            for index in done.nonzero().reshape(-1).tolist():
                self.models[index] = self._seeded_model(seeds[index])
                own = dict(self.models[index].named_parameters())
                for name in self.names:
                    fresh_params[name] = fresh_params[name].clone()
                    fresh_params[name][index] = own[name].detach()
            self.params = fresh_params
            self.state = self.state.select(~done, self.meta_model.init_state(self.params))
            self.survival = torch.where(done, torch.ones_like(self.survival), self.survival)
            self.inner_step = torch.where(done, torch.zeros_like(self.inner_step), self.inner_step)
            self.restart_at = torch.where(done, torch.full_like(self.restart_at, self.config.horizon), self.restart_at)
        return done

    # ---------------------------------------------------------------- meta-parameters
    def flat_meta_parameters(self) -> Tensor:
        """``[D]`` all meta-parameters in one vector (detached)."""
        return torch.cat([p.detach().reshape(-1) for p in self.meta_model.parameters()])

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        result, offset = {}, 0
        for name, p in self.meta_model.named_parameters():
            result[name] = flat[offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return result

    def _unflatten_rows(self, rows: Tensor) -> dict[str, Tensor]:
        """``[P, D]`` -> ``{name: [P, *shape]}`` (one meta-parameter set per particle)."""
        result, offset = {}, 0
        for name, p in self.meta_model.named_parameters():
            result[name] = rows[:, offset:offset + p.numel()].reshape(rows.shape[0], *p.shape)
            offset += p.numel()
        return result

    @property
    def scalars_only(self) -> bool:
        """Whether this outer step trains only the scalars (:attr:`MetaTrainConfig.scalars_first`)."""
        return self.outer_steps < self.config.scalars_first

    def apply_meta_gradient(self, flat_grad: Tensor) -> float:
        """One outer Adam step along ``flat_grad`` ``[D]`` (after ``all_reduce``, the scalars-first mask and
        the clips of :class:`MetaTrainConfig`); returns the estimate's norm before clipping."""
        if self.all_reduce is not None:
            flat_grad = self.all_reduce(flat_grad)
        if self.scalars_only:
            flat_grad = flat_grad * self.scalar_mask
        elif self.outer_steps == self.config.scalars_first > 0:
            # The first step on every meta-parameter: its norm is of another size than the
            # scalars-only ones, so the relative clip's reference starts again.
            self.mean_grad_norm = None
        norm = clipped = float(flat_grad.norm())
        if self.config.grad_clip is not None and norm > self.config.grad_clip:
            flat_grad = flat_grad * (self.config.grad_clip / norm)
            clipped = self.config.grad_clip
        if self.config.grad_clip_relative is not None:
            # Applied after grad_clip, to the norm it left: the step's norm is min(norm, grad_clip,
            # multiple x mean), not both cuts compounded.
            flat_grad = flat_grad * relative_clip_scale(clipped, self.mean_grad_norm, self.config.grad_clip_relative)
            # The reference follows the raw norms (decay 0.9), so a drift of the typical size is followed.
            self.mean_grad_norm = norm if self.mean_grad_norm is None else 0.9 * self.mean_grad_norm + 0.1 * norm
        for p, g in zip(self.meta_model.parameters(), self._unflatten(flat_grad).values()):
            p.grad = g.clone()
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        return norm

    def _meta_loss(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``[T, P]`` held-out losses of a truncation -> ``([P] meta-losses, [P] survival after it)``
        (the config's meta-loss; the survival changes only with ``"first-passage"``)."""
        finite = torch.isfinite(losses).all(dim=0)
        if not finite.all():
            # Checked on the losses, not the meta-loss: a sigmoid turns an infinite loss into 1.
            raise _NonFiniteMetaLoss(
                f"meta-training ({self.task.name}): an inner run diverged at outer step {self.outer_steps}", ~finite
            )
        if self.config.meta_loss == "first-passage":
            return first_passage(losses, self.config.target_loss, self.config.temperature, self.survival)
        return (compute_meta_loss(self.config.meta_loss, losses, self.config.target_loss, self.config.temperature),
                self.survival)

    # ---------------------------------------------------------------- one meta-step
    def step(self) -> dict[str, float]:
        """One truncation of every particle and one outer Adam step; returns its log line."""
        start = time.perf_counter()
        meta_loss, flat_grad = self.estimate()
        norm = math.nan if flat_grad is None else self.apply_meta_gradient(flat_grad)
        return self.end_step(meta_loss, norm, time.perf_counter() - start)

    def estimate(self) -> tuple[float, Tensor | None]:
        """One truncation of every particle, the meta-parameters unchanged: ``(meta-loss, [D] estimate
        of its gradient)`` — ``(nan, None)`` when an inner run diverged inside it.

        Restarts the particles that reached their horizon first. :meth:`step` is
        ``estimate`` → :meth:`apply_meta_gradient` → :meth:`end_step`; a
        :class:`~gradgraph.optim.meta_family.TaskFamilyTrainer` averages the estimates of several trainers
        before one outer step.
        """
        restarted = self._restart_finished()
        saved = (self.params, self.state, self.inner_step)
        try:
            if self.config.estimator == "tbptt":
                return self._tbptt_truncation()
            if self.pes is not None:
                half = self.config.num_particles // 2
                self.pes.reset(restarted[:half] | restarted[half:])
            return self._pes_truncation()
        except NonFiniteError as error:
            # An inner run diverged inside this truncation: no meta-update from it. Every run
            # goes back to where the truncation started; the diverged problems (both particles
            # of a PES pair) restart from a fresh initialisation at the next step and the others
            # go on, so the runs stay spread over the phases of training.
            self.outer.zero_grad(set_to_none=True)
            self.params, self.state, self.inner_step = saved
            diverged = getattr(error, "particles", None)
            if diverged is None:
                diverged = torch.ones(self.config.num_particles, dtype=torch.bool, device=self.device)
            problems = diverged.reshape(-1, self.num_problems).any(dim=0)  # [K]: PES pairs share a problem
            restart = torch.tensor(self._for_particles(problems.tolist()), device=self.device)
            self.restart_at = torch.where(restart, self.inner_step, self.restart_at)
            if self.pes is not None:
                self.pes.undo()  # the skipped truncation's perturbation never acted on the kept runs
                self.pes.reset(problems)
            self.diverged_truncations += 1
            return math.nan, None

    def end_step(self, meta_loss: float, norm: float, seconds: float) -> dict[str, float]:
        """Count the outer step and append its log line (returned) to :attr:`history`."""
        self.outer_steps += 1
        line = {"outer_step": self.outer_steps, "meta_loss": meta_loss, "grad_norm": norm,
                "alpha": float(self.meta_model.alpha.detach()), "beta": float(self.meta_model.beta.detach()),
                "mu": float(self.meta_model.mu.detach()), "seconds": seconds}
        if self.meta_model.schedule is not None:
            line["schedule"] = self.meta_model.schedule.detach().tolist()
        self.history.append(line)
        return line

    def _advance(self, new_params: dict[str, Tensor]) -> None:
        self.params = new_params
        self.inner_step = self.inner_step + 1
        self.batches = self._sample(self.task.sample_batch)

    def _tbptt_truncation(self) -> tuple[float, Tensor]:
        params, state = self.params, self.state
        terms = []
        for _ in range(self.config.truncation):
            detached = {k: v.detach() for k, v in params.items()}
            if self.chain is not None:
                grads, batch = self._batched_gradients(detached)
                first = None if batch is None else self._chain_graphs.template
            else:
                graphs, grads = self._graphs(detached)
                batch = self._architecture.batch(graphs) if self.meta_model.needs_graph else None
                first = graphs[0]
            params, state = self.meta_model(params, grads, state, batch, first)
            self._advance(params)
            terms.append(self._losses(params))
        per_particle, survival = self._meta_loss(torch.stack(terms))
        meta_loss = per_particle.mean()
        if not torch.isfinite(meta_loss):
            raise _NonFiniteMetaLoss(f"meta-training ({self.task.name}): non-finite meta-loss at outer step {self.outer_steps}")
        self.outer.zero_grad(set_to_none=True)
        meta_loss.backward()
        flat_grad = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.meta_model.parameters()
        ])
        self.outer.zero_grad(set_to_none=True)
        self.params = {k: v.detach() for k, v in params.items()}
        self.state = state.detach()
        self.survival = survival.detach()
        return float(meta_loss.detach()), flat_grad

    @torch.no_grad()
    def _pes_truncation(self) -> tuple[float, Tensor]:
        assert self.pes is not None
        thetas = self.pes.perturb(self.flat_meta_parameters(), self.scalar_mask if self.scalars_only else None)
        stacked_meta = self._unflatten_rows(thetas) if self.chain is not None else None
        per_particle = [self._unflatten(theta) for theta in thetas] if self.chain is None else []
        params, state = self.params, self.state
        terms = []
        for _ in range(self.config.truncation):
            if self.chain is not None:  # the batched path: one meta-model call for all particles
                grads, batch = self._batched_gradients(params)
                first = None if batch is None else self._chain_graphs.template
                params, state = vmapped_update(self.meta_model, stacked_meta, params, grads, state, batch, first)
                self._advance(params)
                terms.append(self._losses(params))
                continue
            graphs, grads = self._graphs(params)
            new_params: dict[str, list[Tensor]] = {name: [] for name in self.names}
            new_states = []
            for index, graph in enumerate(graphs):
                one = {name: params[name][index:index + 1] for name in self.names}
                one_grads = {name: grads[name][index:index + 1] for name in self.names}
                one_state = _slice_state(state, index, self.config.num_particles)
                batch = self._architecture.batch([graph]) if self.meta_model.needs_graph else None
                out_params, out_state = functional_call(self.meta_model, per_particle[index],
                                                        (one, one_grads, one_state, batch, graph))
                for name in self.names:
                    new_params[name].append(out_params[name])
                new_states.append(out_state)
            params = {name: torch.cat(values) for name, values in new_params.items()}
            state = _cat_states(new_states)
            self._advance(params)
            terms.append(self._losses(params))
        means, survival = self._meta_loss(torch.stack(terms))
        if not torch.isfinite(means).all():
            raise _NonFiniteMetaLoss(f"meta-training ({self.task.name}): an inner run diverged (PES)",
                                     ~torch.isfinite(means))
        self.params, self.state, self.survival = params, state, survival
        return float(means.mean()), self.pes.estimate(means).to(self.flat_meta_parameters().dtype)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: meta-model, outer Adam, inner runs, random streams."""
        return {
            "config": asdict(self.config),
            "meta_config": self.meta_model.config.to_dict(),
            "meta_model": self.meta_model.state_dict(),
            "outer": self.outer.state_dict(),
            "params": self.params,
            "state": self.state.tensors(),
            "inner_step": self.inner_step,
            "restart_at": self.restart_at,
            "batches": self.batches,
            "models": [m.state_dict() for m in self.models],
            "next_model_seed": self.next_model_seed,
            "data_generator": self.data_generator.get_state(),
            "pes": None if self.pes is None else {**self.pes.state_dict(),
                                                   "generator": self.pes.generator.get_state()},
            "outer_steps": self.outer_steps,
            "diverged_truncations": self.diverged_truncations,
            "survival": self.survival,
            "mean_grad_norm": self.mean_grad_norm,
            "history": self.history,
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the trainer must be built with the same task and config)."""
        differences = config_differences(jsonable(checkpoint["config"]), jsonable(asdict(self.config)), "config")
        if differences:
            raise GradGraphError("MetaTrainer.load_state_dict: the checkpoint is of another configuration ("
                                 + describe_differences(differences, "checkpoint", "this trainer") + ")")
        # A checkpoint written on one device resumes on another: tensors go to this trainer's
        # (random-stream states stay CPU byte tensors; torch.optim places its own state).
        checkpoint = {key: value if key in ("data_generator", "pes", "outer") else _to_device(value, self.device)
                      for key, value in checkpoint.items()}
        self.meta_model.load_state_dict(checkpoint["meta_model"])
        # A copy: torch.optim keeps the tensors it is given and updates them in place, which would move the
        # checkpoint on with this trainer's steps (a second trainer loading it would resume from elsewhere).
        self.outer.load_state_dict(copy.deepcopy(checkpoint["outer"]))
        self.params = {k: v.clone() for k, v in checkpoint["params"].items()}
        self.state = OptimizerState.from_tensors(checkpoint["state"])
        self.inner_step = checkpoint["inner_step"].clone()
        self.restart_at = checkpoint["restart_at"].clone()
        self.batches = checkpoint["batches"]
        for model, state in zip(self.models, checkpoint["models"]):
            model.load_state_dict(state)
        self.next_model_seed = checkpoint["next_model_seed"]
        self.data_generator.set_state(checkpoint["data_generator"])
        if self.pes is not None and checkpoint["pes"] is not None:
            self.pes.load_state_dict(checkpoint["pes"])
            self.pes.generator.set_state(checkpoint["pes"]["generator"])
        self.outer_steps = checkpoint["outer_steps"]
        self.diverged_truncations = checkpoint.get("diverged_truncations", 0)
        if "survival" in checkpoint:  # checkpoints written before the first-passage meta-loss have none
            self.survival = checkpoint["survival"].clone()
        self.mean_grad_norm = checkpoint.get("mean_grad_norm")
        self.history = list(checkpoint["history"])


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (dicts, lists, tuples) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _slice_state(state: OptimizerState, index: int, num_particles: int) -> OptimizerState:
    emas = None
    if state.factor_emas is not None:
        per = state.factor_emas.reshape(num_particles, -1, *state.factor_emas.shape[1:])
        emas = per[index]
    return OptimizerState(
        step=state.step[index:index + 1],
        momentum={k: v[index:index + 1] for k, v in state.momentum.items()},
        momenta={k: v[index:index + 1] for k, v in state.momenta.items()},
        factor_emas=emas,
    )


def _cat_states(states: list[OptimizerState]) -> OptimizerState:
    emas = None
    if states[0].factor_emas is not None:
        emas = torch.cat([s.factor_emas for s in states])
    return OptimizerState(
        step=torch.cat([s.step for s in states]),
        momentum={k: torch.cat([s.momentum[k] for s in states]) for k in states[0].momentum},
        momenta={k: torch.cat([s.momenta[k] for s in states]) for k in states[0].momenta},
        factor_emas=emas,
    )
