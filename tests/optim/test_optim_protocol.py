"""The paper's meta-training protocol (issue 29): staggered restarts after a divergence, the SGDM
variant, GradMetaNet's normalised embedding over every example, the relative clip, PES.undo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.optim import (
    PAPER_PROTOCOL,
    PES,
    LearnedOptimizer,
    LearnedUpdate,
    MetaModelConfig,
    MetaTrainConfig,
    MetaTrainer,
    Task,
    load_pretrained,
    relative_clip_scale,
)
from gradgraph.errors import GradGraphError
from strategies import learned_rule


def _task() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def sample(generator: torch.Generator):
        x = torch.randn(8, 5, generator=generator)
        return x, (x[:, 0] > 0).long()

    return Task("tiny", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"))


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_a_diverged_run_restarts_alone_so_the_runs_stay_staggered(estimator):
    """Before issue 29 every run restarted after any divergence (all phases 0 at once, for good):
    this test failed there (every inner_step was 0 after the restart)."""
    torch.manual_seed(0)
    config = MetaTrainConfig(estimator=estimator, num_particles=8, truncation=2, horizon=16)
    trainer = MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False, residual_adam=True)), _task(), config)
    for _ in range(3):
        trainer.step()
    problems = trainer.num_problems
    trainer._restart_finished()  # the runs due to restart now do (the next step would do it first)
    phases = trainer.inner_step.clone()
    assert len(set(phases.tolist())) > 1  # staggered
    poisoned = 1  # problem 1: particle 1 (and its PES partner 1 + P/2)
    trainer.params = {name: value.clone() for name, value in trainer.params.items()}
    first = next(iter(trainer.params))
    trainer.params[first][poisoned] = math.nan
    line = trainer.step()
    assert math.isnan(line["meta_loss"]) and trainer.diverged_truncations == 1
    assert torch.equal(trainer.inner_step, phases)  # every run went back to the truncation's start
    partners = {p for p in range(config.num_particles) if p % problems == poisoned}
    trainer.step()
    for particle in range(config.num_particles):
        if particle in partners:
            assert trainer.inner_step[particle] == config.truncation  # restarted: fresh run, one truncation in
        else:
            assert trainer.inner_step[particle] in (phases[particle] + config.truncation, config.truncation)
    kept = [p for p in range(config.num_particles) if p not in partners]
    assert any(trainer.inner_step[p] != config.truncation for p in kept)  # the others kept their phases
    assert all(torch.isfinite(v).all() for v in trainer.params.values())


def test_pes_undo_takes_back_the_last_perturbation():
    pes = PES(3, 4, sigma=0.1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    pes.perturb(theta)
    kept = pes.accumulated.clone()
    pes.perturb(theta)
    pes.undo()
    torch.testing.assert_close(pes.accumulated, kept, rtol=0, atol=1e-15)
    with pytest.raises(GradGraphError, match="undo"):
        pes.undo()


# ---------------------------------------------------------------------- SGDM variant


def test_the_sgdm_variant_has_no_learned_term():
    """Only α and μ are meta-parameters, β is 0, and the update is exactly θ − α m."""
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, learned_term=False, alpha=0.05, mu=0.8)).double()
    assert {name for name, _ in meta.named_parameters()} == {"log_alpha", "logit_mu"}
    assert meta.beta.item() == 0.0 and meta.mlp is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    loss = F.cross_entropy(torch.func.functional_call(model, reference, (x,)), y)
    grads = dict(zip(reference, torch.autograd.grad(loss, list(reference.values()))))
    LearnedOptimizer(model, meta).step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    alpha, mu = meta.alpha.item(), meta.mu.item()  # 0.05 and 0.8 up to their float32 start
    for name, p in model.named_parameters():
        momentum = (1 - mu) * grads[name]  # m_1 = μ·0 + (1 − μ)∇
        torch.testing.assert_close(p.detach(), before[name] - alpha * momentum, rtol=1e-12, atol=1e-14)
    trainer = MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False, learned_term=False)), _task(),
                          MetaTrainConfig(num_particles=2, truncation=2, horizon=4))
    assert trainer.flat_meta_parameters().numel() == 2  # PES perturbs α and μ only
    trainer.step()
    with pytest.raises(GradGraphError, match="SGDM"):
        MetaModelConfig(learned_term=False)  # GradMetaNet on by default: a learned term


# ---------------------------------------------------------------------- GradMetaNet's embedding


def test_the_gradmetanet_embedding_reads_every_example_and_enters_f_normalised():
    """The embedding columns of F's input have RMS 1 over each parameter tensor (they had
    0.04–0.4 before issue 29: this fails with normalize_embedding=False), and GradMetaNet
    sees the factors of all 16 examples, not 32 of 128 (max_components defaulted to 32)."""
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=True, residual_adam=True))
    assert meta.config.max_components is None
    seen = {}
    meta.mlp[0].register_forward_pre_hook(lambda module, args: seen.__setitem__("inputs", args[0].detach()))
    meta.gradmetanet.register_forward_pre_hook(lambda module, args: seen.__setitem__("components",
                                                                                       args[0].act.shape[1]))
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    LearnedOptimizer(model, meta).step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert seen["components"] == 16
    embedding = seen["inputs"][0, :, -meta.config.embedding_dim:]  # [parameters, k] of the one particle
    offset = 0
    for p in model.parameters():
        block = embedding[offset:offset + p.numel()]
        offset += p.numel()
        torch.testing.assert_close(block.square().mean(dim=0).sqrt(), torch.ones(block.shape[1]), rtol=1e-4,
                                   atol=1e-4)


def test_files_written_before_the_options_load_with_their_old_behaviour():
    config = load_pretrained("digits-mlp").config
    assert config.normalize_embedding is False and config.max_components == 32 and config.learned_term


# ---------------------------------------------------------------------- clip and protocol


def test_the_relative_clip_cuts_outliers_and_leaves_typical_steps_alone():
    """A clip at norm 1 made every PES step (norm ~150) a unit vector; the relative clip only
    scales a step far above the running mean."""
    assert relative_clip_scale(150.0, None, 3.0) == 1.0  # first step: nothing to compare with
    assert relative_clip_scale(160.0, 150.0, 3.0) == 1.0
    assert relative_clip_scale(900.0, 150.0, 3.0) * 900.0 == pytest.approx(450.0)
    torch.manual_seed(0)
    config = MetaTrainConfig.paper(num_particles=2, truncation=2, horizon=4)
    assert config.grad_clip is None and config.grad_clip_relative == PAPER_PROTOCOL["grad_clip_relative"]
    trainer = MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False)), _task(), config)
    trainer.step()
    first = trainer.history[-1]["grad_norm"]
    assert trainer.mean_grad_norm == pytest.approx(first)


def test_the_paper_protocol_defaults():
    config = MetaTrainConfig.paper()
    assert (config.estimator, config.num_particles, config.truncation, config.outer_lr) == ("pes", 32, 50, 1e-4)
    assert config.horizon >= config.truncation


# ---------------------------------------------------------------------- batched meta-training


def _double_task() -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    def sample(generator: torch.Generator):
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    return Task("tiny64", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                sample_validation=sample)


@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
@pytest.mark.parametrize("variant", ["gradmetanet", "deepsets", "sgdm", "gradmetanet+schedule"])
def test_batched_and_general_meta_training_compute_the_same_updates(estimator, variant):
    """Closed-form batched gradients (and, for PES, the vmapped per-particle meta-models; for
    GradMetaNet the graphs filled from the closed-form factors and one GradMetaNet forward with
    per-particle weights) give the general path's inner parameters, optimizer state (factor
    EMAs included), meta-loss and meta-parameters to 1e-10 in float64, across a restart; also
    with a learned schedule and a scalars-first stage (one outer step of it)."""
    schedule = variant.endswith("+schedule")
    variant = variant.removesuffix("+schedule")

    def trainer(batched: bool) -> MetaTrainer:
        meta = learned_rule(variant, schedule=schedule)
        return MetaTrainer(meta, _double_task(), MetaTrainConfig(estimator=estimator, num_particles=4, truncation=3,
                                                                 horizon=6, outer_lr=1e-2, batched=batched,
                                                                 scalars_first=int(schedule)))

    fast, general = trainer(True), trainer(False)
    assert fast.chain is not None and general.chain is None
    for _ in range(3):
        fast_line, general_line = fast.step(), general.step()
        assert fast_line["meta_loss"] == pytest.approx(general_line["meta_loss"], rel=1e-10, abs=1e-12)
    for name in fast.params:
        torch.testing.assert_close(fast.params[name], general.params[name], rtol=1e-10, atol=1e-12)
    for key, value in fast.state.tensors().items():
        torch.testing.assert_close(value, general.state.tensors()[key], rtol=1e-10, atol=1e-12)
    # PES estimates are difference quotients (L+ - L-) ξ / σ and outer Adam divides by their RMS: a
    # meta-parameter the inner runs never read (an unused row of GradMetaNet's position table) moves
    # by pure noise of that quotient, where 1e-16 in the losses becomes ~1e-10 after three steps.
    rtol = 1e-8 if variant == "gradmetanet" and estimator == "pes" else 1e-10
    torch.testing.assert_close(fast.flat_meta_parameters(), general.flat_meta_parameters(), rtol=rtol, atol=1e-12)


def test_closed_form_factors_are_the_graph_s():
    """The batched backward's per-example factors are the GradGraph's act / grad of each layer."""
    from gradgraph import to_graph
    from gradgraph.optim.fused import chain_forward_backward, mlp_chain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    chain = mlp_chain(model)
    params = {name: p.detach()[None] for name, p in model.named_parameters()}
    losses, grads, acts, deltas = chain_forward_backward(chain, params, x[None], y[None], loss)
    graph = to_graph(model, x, y, loss)
    for name, value in graph.mean_grad().items():
        torch.testing.assert_close(grads[name][0], value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses[0], loss(model(x), y).detach(), rtol=1e-12, atol=1e-14)
    # Layer l's outer products act_i ⊗ delta_i summed over the batch are its weight gradient.
    torch.testing.assert_close(torch.einsum("bi,bo->oi", acts[0][0], deltas[0][0]), grads["0.weight"][0],
                               rtol=1e-12, atol=1e-14)
    assert mlp_chain(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))) is None  # general path


def test_a_paper_protocol_run_resumes_exactly_with_its_survival_and_clip_reference():
    """The first-passage survival and the relative clip's running norm are checkpointed: a
    trainer rebuilt from a checkpoint continues as the uninterrupted one (fails if either is
    left out of state_dict)."""
    import copy

    def build() -> MetaTrainer:
        return MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False, residual_adam=True)), _task(),
                           MetaTrainConfig.paper(num_particles=4, truncation=2, horizon=6, meta_loss="first-passage",
                                                 target_loss=0.6, outer_lr=1e-2))

    torch.manual_seed(0)
    trainer = build()
    trainer.step()
    trainer.step()
    checkpoint = copy.deepcopy(trainer.state_dict())
    assert (checkpoint["survival"] < 1).any() and checkpoint["mean_grad_norm"] is not None
    for _ in range(3):
        trainer.step()
    torch.manual_seed(123)
    resumed = build()
    resumed.load_state_dict(checkpoint)
    for _ in range(3):
        resumed.step()
    assert torch.equal(trainer.flat_meta_parameters(), resumed.flat_meta_parameters())
    assert torch.equal(trainer.survival, resumed.survival) and trainer.mean_grad_norm == resumed.mean_grad_norm
