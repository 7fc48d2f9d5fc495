"""The learned optimizer: update rule, capture inside step, state, PES, symmetry, meta-training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph import GradGraphError, UnsupportedModuleError, to_graph
from gradgraph.optim import (
    PES,
    LearnedOptimizer,
    LearnedUpdate,
    MetaModelConfig,
    MetaTrainConfig,
    MetaTrainer,
    Task,
    graph_from_closure,
    load_pretrained,
    pretrained_names,
)
from gradgraph.symmetry import permute_hidden, random_hidden_perms
from strategies import assert_same_graph

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: the device tests run on CPU always and on CUDA where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _mlp(widths=(5, 4, 3), seed=0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(widths):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _batch(b=6, d=5, classes=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def _losses(model, x, y):
    return lambda: F.cross_entropy(model(x), y, reduction="none")


def _constant_f(meta: LearnedUpdate, value: float) -> LearnedUpdate:
    """Make F output ``value`` everywhere (last layer: zero weights, bias = value)."""
    with torch.no_grad():
        meta.mlp[-1].weight.zero_()
        meta.mlp[-1].bias.fill_(value)
    return meta


@pytest.mark.parametrize("residual_adam", [False, True])
@pytest.mark.parametrize("use_gradmetanet", [False, True])
def test_step_equals_documented_update(use_gradmetanet, residual_adam):
    """θ ← θ − α(β·F + m), m ← μm + (1−μ)∇; with residual_adam F = m̂/(√v̂ + 1e-8) + MLP (Adam's formulas)."""
    torch.manual_seed(0)
    config = MetaModelConfig(use_gradmetanet=use_gradmetanet, alpha=0.2, beta=0.05, mu=0.7, residual_adam=residual_adam)
    meta = _constant_f(LearnedUpdate(config), 1.5)
    model = _mlp()
    opt = LearnedOptimizer(model, meta)
    momentum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    first = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    second = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(1, 4):
        x, y = _batch(seed=step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        loss = opt.step(_losses(model, x, y))
        assert loss.dim() == 0
        for (name, p), g in zip(model.named_parameters(), grads):
            momentum[name] = 0.7 * momentum[name] + 0.3 * g
            first[name] = 0.9 * first[name] + 0.1 * g
            second[name] = 0.999 * second[name] + 0.001 * g * g
            learned = torch.full_like(g, 1.5)
            if residual_adam:
                learned = learned + (first[name] / (1 - 0.9**step)) / ((second[name] / (1 - 0.999**step)).sqrt() + 1e-8)
            expected = before[name] - 0.2 * (0.05 * learned + momentum[name])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_step_returns_mean_loss_before_update():
    model = _mlp()
    x, y = _batch()
    expected = F.cross_entropy(model(x), y).detach()
    loss = LearnedOptimizer(model, LearnedUpdate(MetaModelConfig(use_gradmetanet=False))).step(_losses(model, x, y))
    torch.testing.assert_close(loss, expected)


def test_factors_captured_in_step_equal_to_graph():
    model = _mlp(dtype=torch.float64)
    x, y = _batch(dtype=torch.float64)
    graph, losses = graph_from_closure(model, _losses(model, x, y))
    reference = to_graph(model, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))
    assert torch.equal(graph.act, reference.act) and torch.equal(graph.grad, reference.grad)
    assert torch.equal(graph.edge_index, reference.edge_index)
    torch.testing.assert_close(losses, F.cross_entropy(model(x), y, reduction="none").detach())
    assert "forward" not in vars(model)  # the probe is removed again


def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    meta = LearnedUpdate()
    model = _mlp()
    opt = LearnedOptimizer(model, meta)
    batches = [_batch(seed=s) for s in range(5)]
    for x, y in batches[:3]:
        opt.step(_losses(model, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches[3:]:
        opt.step(_losses(model, x, y))
    resumed = _mlp(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(resumed, meta)
    opt2.load_state_dict(saved_opt)
    for x, y in batches[3:]:
        opt2.step(_losses(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["learned"]["factor_emas"], opt2.state_dict()["learned"]["factor_emas"])


def test_permuting_hidden_neurons_permutes_the_update():
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(beta=1.0)).double()  # large β: the learned term dominates
    model = _mlp((5, 6, 4, 3), dtype=torch.float64)
    perms = random_hidden_perms(model, torch.Generator().manual_seed(3))
    permuted = permute_hidden(model, perms)
    x, y = _batch(dtype=torch.float64)

    def update(net):
        before = copy.deepcopy(net)
        LearnedOptimizer(net, meta).step(_losses(net, x, y))
        delta = copy.deepcopy(net)
        with torch.no_grad():
            for d, b in zip(delta.parameters(), before.parameters()):
                d.sub_(b)
        return delta

    expected = permute_hidden(update(copy.deepcopy(model)), perms)
    got = update(permuted)
    for (name, a), b in zip(expected.named_parameters(), got.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    # Sensitivity: without the permutation the updates differ.
    plain = update(copy.deepcopy(model))
    assert any(not torch.allclose(a, b) for a, b in zip(plain.parameters(), got.parameters()))


def _quadratic_unroll(thetas, x, target, steps):
    """x_{t+1} = 0.9 x_t + θ; loss Σ_t ||x_{t+1} − target||². Batched over rows of thetas/x."""
    total = torch.zeros(thetas.shape[0], dtype=thetas.dtype)
    for _ in range(steps):
        x = 0.9 * x + thetas
        total = total + (x - target).square().sum(-1)
    return total, x


@pytest.mark.parametrize("persistent", [True, False])
def test_pes_is_unbiased_on_a_quadratic_toy(persistent):
    dtype = torch.float64
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=dtype)
    target = torch.tensor([1.0, 0.5, -1.0], dtype=dtype)
    truncations, steps = 4, 3
    # True gradient of the whole unroll's loss.
    t = theta.clone().requires_grad_(True)
    loss, _ = _quadratic_unroll(t[None], torch.zeros(1, 3, dtype=dtype), target, truncations * steps)
    (true_grad,) = torch.autograd.grad(loss.sum(), t)
    pairs = 20000
    pes = PES(pairs, 3, sigma=0.05, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.zeros(2 * pairs, 3, dtype=dtype)
    estimate = torch.zeros(3, dtype=dtype)
    for _ in range(truncations):
        if not persistent:
            pes.reset(torch.ones(pairs, dtype=torch.bool))  # plain truncated ES: forgets earlier perturbations
        thetas = pes.perturb(theta)
        losses, x = _quadratic_unroll(thetas, x, target, steps)
        estimate = estimate + pes.estimate(losses)
    error = (estimate - true_grad).norm() / true_grad.norm()
    if persistent:
        assert error < 0.05, (estimate, true_grad)
    else:
        assert error > 0.2, (estimate, true_grad)  # truncation bias: the test can tell


def _tiny_task(validation: bool = False, device: str = "cpu") -> Task:
    def make(seed):
        return _mlp((5, 4, 3), seed=seed).to(device)

    def sample(generator):
        x = torch.randn(8, 5, generator=generator).to(device)
        return x, (x[:, 0] > 0).long()

    return Task("tiny", make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"),
                sample_validation=sample if validation else None)


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
@pytest.mark.parametrize("use_gradmetanet", [False, True])
def test_meta_training_moves_meta_parameters(estimator, use_gradmetanet):
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=use_gradmetanet))
    before = [p.detach().clone() for p in meta.parameters()]
    trainer = MetaTrainer(meta, _tiny_task(validation=use_gradmetanet), MetaTrainConfig(estimator=estimator, num_particles=2, truncation=2,
                                                              horizon=3, outer_lr=1e-2))
    for _ in range(3):  # crosses a restart (horizon 3) of both particles
        line = trainer.step()
    assert torch.isfinite(torch.tensor(line["meta_loss"]))
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, meta.parameters())]
    assert all(moved[:3]) and sum(moved) == len(moved)  # α, β, μ and every layer


def test_meta_trainer_checkpoint_resumes_exactly():
    torch.manual_seed(0)
    config = MetaTrainConfig(num_particles=2, truncation=2, horizon=4)
    meta = LearnedUpdate()
    trainer = MetaTrainer(meta, _tiny_task(), config)
    trainer.step()
    checkpoint = copy.deepcopy(trainer.state_dict())
    trainer.step()
    trainer.step()
    torch.manual_seed(123)
    other = MetaTrainer(LearnedUpdate(), _tiny_task(), config)
    other.load_state_dict(checkpoint)
    other.step()
    other.step()
    for a, b in zip(meta.parameters(), other.meta_model.parameters()):
        assert torch.equal(a, b)


def test_bad_input_gets_a_clear_error():
    model = _mlp()
    x, y = _batch()
    opt = LearnedOptimizer(model, LearnedUpdate(MetaModelConfig(use_gradmetanet=False)))
    with pytest.raises(GradGraphError, match="per-datapoint losses"):
        opt.step(lambda: F.cross_entropy(model(x), y))  # a scalar
    with pytest.raises(GradGraphError, match="needs a closure"):
        opt.step()
    with pytest.raises(GradGraphError, match="LearnedOptimizer.step: the closure never called Sequential"):
        opt.step(lambda: torch.zeros(6, requires_grad=True))
    with pytest.raises(GradGraphError, match="called Sequential twice"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none") + model(x).sum(1))
    # a model the converter refuses (convolutions convert; transposed ones do not)
    conv = nn.Sequential(nn.ConvTranspose1d(1, 2, 3), nn.Flatten(), nn.Linear(14, 3))
    opt = LearnedOptimizer(conv, LearnedUpdate(MetaModelConfig(use_gradmetanet=False)))
    with pytest.raises(UnsupportedModuleError):
        opt.step(lambda: F.cross_entropy(conv(torch.randn(4, 1, 5)), torch.zeros(4, dtype=torch.long), reduction="none"))
    assert all(torch.isfinite(p).all() for p in conv.parameters())


@pytest.mark.parametrize("name", pretrained_names())
def test_every_shipped_file_loads_as_tensors_only(name):
    """``load_pretrained`` reads with ``torch.load(weights_only=True)``: a shipped file that pickled an
    object (a config dataclass, a function) would fail here, not run code on a user's machine."""
    rule = load_pretrained(name)
    assert isinstance(rule, LearnedUpdate) and not rule.training


def test_pretrained_checkpoint_lowers_a_small_mlp_loss():
    assert "digits-mlp" in pretrained_names()
    load_pretrained("digits-mlp")  # loads on its own
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4))  # not a meta-training architecture
    opt = LearnedOptimizer.from_pretrained("digits-mlp", model)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 4, generator=g)
    x = torch.randn(256, 10, generator=g)
    y = (x @ w).argmax(1)
    first = float(F.cross_entropy(model(x), y))
    for _ in range(60):
        opt.step(_losses(model, x, y))
    assert float(F.cross_entropy(model(x), y)) < 0.7 * first
    with pytest.raises(GradGraphError, match="available"):
        load_pretrained("no-such-optimizer")


def _step_against_documented_update(model: nn.Module, opt: LearnedOptimizer, losses) -> list[tuple]:
    """Step once; ``(name, parameter after, documented update)`` per parameter, for α = 0.5,
    β = 0.1, μ = 0.8 and ``F ≡ −0.7``: ``θ ← θ − α(β·F + (1 − μ)∇)`` from zero momentum."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = torch.autograd.grad(losses().mean(), list(model.parameters()))
    opt.step(losses)
    return [(name, p.detach(), before[name] - 0.5 * (0.1 * -0.7 + 0.2 * grad))
            for (name, p), grad in zip(model.named_parameters(), grads)]


def test_transformer_step_equals_documented_update():
    """The stock attention path: a one-hot-input Linear, an encoder with a causal mask, a head."""
    from gradgraph_lab.tasks.learned_optimizer.tasks import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab=7, d_model=8, heads=2, blocks=1)
    meta = _constant_f(LearnedUpdate(MetaModelConfig(alpha=0.5, beta=0.1, mu=0.8)), -0.7)
    opt = LearnedOptimizer(model, meta)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    x, y = F.one_hot(tokens[:, :-1], 7).float(), tokens[:, 1:]
    mask = nn.Transformer.generate_square_subsequent_mask(4)

    def losses():
        return F.cross_entropy(model(x, mask=mask).transpose(1, 2), y, reduction="none").mean(1)

    stepped = _step_against_documented_update(model, opt, losses)
    assert len(stepped) == len(list(model.parameters()))
    for name, after, expected in stepped:
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_meta_gradient_passes_through_all_reduce():
    """The hook for splitting particles over ranks: the flat meta-gradient goes through all_reduce."""
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False))
    before = [p.detach().clone() for p in meta.parameters()]
    seen = []

    def all_reduce(flat):
        seen.append(flat.shape)
        return torch.zeros_like(flat)  # as if the other ranks cancelled this one's gradient

    trainer = MetaTrainer(meta, _tiny_task(), MetaTrainConfig(num_particles=2, truncation=2, horizon=4),
                          all_reduce=all_reduce)
    trainer.step()
    assert seen == [torch.Size([sum(p.numel() for p in meta.parameters())])]
    assert all(torch.equal(a, b) for a, b in zip(before, meta.parameters()))


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_diverged_inner_runs_restart_instead_of_crashing(estimator):
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=1e20, beta=1e20))  # every run explodes
    trainer = MetaTrainer(meta, _tiny_task(), MetaTrainConfig(estimator=estimator, num_particles=2, truncation=3,
                                                              horizon=6))
    before = [p.detach().clone() for p in meta.parameters()]
    line = trainer.step()
    assert line["meta_loss"] != line["meta_loss"]  # NaN: the truncation was skipped
    assert trainer.diverged_truncations == 1
    assert all(torch.equal(a, b) for a, b in zip(before, meta.parameters()))
    trainer.step()  # particles restarted from fresh initialisations
    assert all(torch.isfinite(v).all() for v in trainer.params.values()) or trainer.diverged_truncations == 2


# ---------------------------------------------------------------------- devices


def _tensors(value):
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_gradmetanet", [False, True])
def test_learned_optimizer_follows_the_model_device_and_dtype(device, use_gradmetanet):
    """A CPU-built meta-model trains a model where the model is; on CUDA the steps equal the CPU ones."""
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=use_gradmetanet, residual_adam=True)).double()
    with torch.no_grad():
        meta.mlp[-1].weight.normal_()  # a non-zero learned term, so F is exercised
    runs = {}
    for where in dict.fromkeys(["cpu", device]):
        model = _mlp(dtype=torch.float64).to(where)
        opt = LearnedOptimizer(model, copy.deepcopy(meta))
        for step in range(3):
            x, y = _batch(seed=step, dtype=torch.float64)
            opt.step(_losses(model, x.to(where), y.to(where)))
        state = opt.state_dict()
        placed = list(_tensors(state)) + list(opt.meta_model.parameters()) + list(model.parameters())
        assert {t.device.type for t in placed} == {where}
        assert {t.dtype for t in _tensors(state["state"]) if t.is_floating_point()} == {torch.float64}
        runs[where] = (model, state)
    for (_, a), (_, b) in zip(runs["cpu"][0].named_parameters(), runs[device][0].named_parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)
    # a state saved on one device resumes on the model's device
    model = _mlp(dtype=torch.float64).to(device)
    opt = LearnedOptimizer(model, copy.deepcopy(meta))
    opt.load_state_dict(_to_cpu(runs[device][1]))
    assert {t.device.type for t in _tensors(opt.state_dict())} == {device}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def test_learned_optimizer_rejects_a_model_on_several_devices():
    model = _mlp()
    model[0].weight = nn.Parameter(model[0].weight.detach().to("meta"))  # a second device, no GPU needed
    with pytest.raises(GradGraphError, match="several devices"):
        LearnedOptimizer(model, LearnedUpdate(MetaModelConfig(use_gradmetanet=False)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_meta_training_runs_on_the_task_device(device, estimator):
    """Every tensor of the trainer's state is on the device of the task's models; resuming moves them there."""
    torch.manual_seed(0)
    config = MetaTrainConfig(estimator=estimator, num_particles=2, truncation=2, horizon=3)
    trainer = MetaTrainer(LearnedUpdate(MetaModelConfig(residual_adam=True)), _tiny_task(True, device), config)
    assert trainer.device.type == device
    for _ in range(2):  # crosses a restart
        assert trainer.step()["meta_loss"] == trainer.history[-1]["meta_loss"]
    state = trainer.state_dict()
    # random streams stay CPU generators; torch.optim.Adam keeps its step counts on the CPU
    placed = list(_tensors({k: v for k, v in state.items() if k not in ("data_generator", "pes", "outer")}))
    placed += [] if state["pes"] is None else [state["pes"]["accumulated"]]
    placed += list(trainer.meta_model.parameters()) + list(trainer.meta_model.buffers())
    placed += [v for slot in trainer.outer.state.values() for k, v in slot.items() if k != "step"]
    assert len(placed) > 20 and {t.device.type for t in placed} == {device}
    if device == "cpu":
        return
    resumed = MetaTrainer(LearnedUpdate(MetaModelConfig(residual_adam=True)), _tiny_task(True, device), config)
    resumed.load_state_dict(_to_cpu(copy.deepcopy(state)))
    resumed.step()
    trainer.step()
    for a, b in zip(trainer.meta_model.parameters(), resumed.meta_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["digits", "charlm"])
def test_benchmark_tasks_live_on_the_requested_device(device, name):
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    bench = get_task(name, device)
    model = bench.task.make_model(0)
    inputs, targets = bench.task.sample_batch(torch.Generator().manual_seed(0))
    assert {p.device.type for p in model.parameters()} == {inputs.device.type, targets.device.type} == {device}
    assert all(v.device.type == device for v in bench.task.forward_kwargs.values())
    assert torch.isfinite(torch.tensor(bench.test_loss(model)))
    if device == "cuda":  # same initialisation and batches as on the CPU
        cpu = get_task(name, "cpu")
        for a, b in zip(cpu.task.make_model(0).parameters(), model.parameters()):
            assert torch.equal(a, b.cpu())
        assert torch.equal(cpu.task.sample_batch(torch.Generator().manual_seed(0))[0], inputs.cpu())


@pytest.mark.slow  # a command-line end-to-end run
def test_benchmark_command_records_its_device(tmp_path):
    import json

    from gradgraph_lab.cli import main

    main(["learned-optimizer", "--tasks", "digits", "--device", "cpu", "--steps", "3", "--seeds", "1",
          "--grid-size", "2", "--optimizers", "adam", "deepsets", "--output-dir", str(tmp_path), "--quiet"])
    results = json.loads((tmp_path / "benchmark" / "results.json").read_text())
    assert results["device"] == "cpu" and results["config"]["device"] == "cpu"
    assert set(results["tasks"][0]["summary"]) == {"adam", "deepsets"}


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, tmp_path):
    from gradgraph_lab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra in ([], ["--meta-train"]):
        with pytest.raises(GradGraphError, match="no CUDA device"):
            main(["learned-optimizer", "--device", "cuda", "--out-dir", str(tmp_path), "--quiet", *extra])


# ---------------------------------------------------------------------- start and selection


def test_meta_training_starts_at_tuned_adam_and_exports_the_best_validated_candidate(tmp_path, monkeypatch):
    from gradgraph_lab.tasks.learned_optimizer import meta as meta_run
    from gradgraph_lab.tasks.learned_optimizer.benchmark import log_grid
    from gradgraph_lab.tasks.learned_optimizer.selection import model_copy
    from gradgraph_lab.tasks.learned_optimizer.tasks import make_mlp

    scores = iter([0.5, 2.0, 1.0])  # outer steps 0, 2, 4: the one at step 2 must be exported
    snapshots = []

    def scripted_score(protocol, meta_model):
        digits, probe = meta_run.get_task("digits"), make_mlp((64, 32, 10), 0)
        assert protocol.bench.test_loss(probe) == digits.validation.test_loss(probe) != digits.test_loss(probe)
        snapshots.append(model_copy(meta_model))
        score = next(scores)
        return {"score": score, "step_reduction": score, "reached": 0, "best_loss": 1.0, "diverged": 0}

    monkeypatch.setattr(meta_run, "score_meta_model", scripted_score)
    start_lr = log_grid(-4, -1, 10)[6]
    monkeypatch.setattr(meta_run, "_choose_start", lambda config, protocol: (start_lr, {f"{start_lr:.6g}": 1.0}))
    config = meta_run.MetaRunConfig(variant="deepsets", minutes=10, max_outer_steps=4, num_particles=2, truncation=2,
                                    horizon=4, select_every=2, select_seeds=1, out_dir=str(tmp_path), progress=False)
    trainer = meta_run.run_meta_training(config, export=tmp_path / "export.pt")
    assert [c["outer_step"] for c in trainer.selection["candidates"]] == [0, 2, 4]
    exported = torch.load(tmp_path / "export.pt", weights_only=False)
    assert exported["provenance"]["selected_outer_step"] == 2
    assert not all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # meta-training moved it
    for key, value in exported["meta_model"].items():
        assert torch.equal(value, snapshots[1][key]), key
    assert min(abs(trainer.selection["adam_lr"] - g) for g in log_grid(-4, -1, 10)) < 1e-12  # tuned on the grid
    assert exported["meta_config"]["alpha"] * exported["meta_config"]["beta"] == pytest.approx(start_lr, rel=1e-12)
    start = meta_run.LearnedUpdate(meta_run.MetaModelConfig(**exported["meta_config"]))
    assert float(start.alpha * start.beta) == pytest.approx(start_lr, rel=1e-5)  # the rule starts as Adam at lr


@pytest.mark.parametrize("tuned_index", [0, 5, 9])
def test_the_start_is_the_best_scoring_of_tuned_adam_and_its_grid_neighbours(monkeypatch, tuned_index):
    from gradgraph_lab.tasks.learned_optimizer import meta as meta_run
    from gradgraph_lab.tasks.learned_optimizer.benchmark import log_grid
    from gradgraph_lab.tasks.learned_optimizer.selection import ValidationProtocol

    grid = log_grid(-4, -1, 10)
    scored = []

    def score(protocol, rule):  # the validation score of a start, scripted: best at the tuned rate's left neighbour
        lr = float(rule.alpha * rule.beta)
        scored.append(lr)
        assert not rule.needs_graph and torch.all(rule.mlp[-1].weight == 0)  # the start is Adam + momentum
        return {"score": -abs(lr - grid[max(tuned_index - 1, 0)])}

    monkeypatch.setattr(meta_run, "score_meta_model", score)
    protocol = ValidationProtocol(None, [], 0, grid[tuned_index], {}, [])
    lr, scores = meta_run._choose_start(meta_run.MetaRunConfig(variant="gradmetanet"), protocol)
    neighbours = grid[max(tuned_index - 1, 0): tuned_index + 2]
    assert scored == pytest.approx(neighbours, rel=1e-5) and len(scores) == len(neighbours)
    assert lr == pytest.approx(grid[max(tuned_index - 1, 0)], rel=1e-5)


def test_step_calls_the_closure_once_so_it_may_draw_its_own_batch():
    model = _mlp()
    batches = iter([_batch() for _ in range(3)])
    calls = []

    def closure():
        calls.append(1)
        x, y = next(batches)  # the usual PyTorch loop: a fresh batch per call
        return F.cross_entropy(model(x), y, reduction="none")

    opt = LearnedOptimizer(model, LearnedUpdate(MetaModelConfig(use_gradmetanet=False)))
    for step in range(3):
        opt.step(closure)
        assert len(calls) == step + 1


def _graphs_of(models, seeds, dtype=torch.float64):
    """One GradGraph per (model, batch seed), converted as LearnedOptimizer.step does."""
    graphs = []
    for model, seed in zip(models, seeds):
        x, y = _batch(b=4, d=model[0].in_features, seed=seed, dtype=dtype)
        graphs.append(graph_from_closure(model, _losses(model, x, y))[0])
    return graphs


def _assert_same_batch(batch, reference):
    assert_same_graph(batch, reference, exact=True)  # every field, dtype and value
    assert batch.num_graphs == reference.num_graphs


@pytest.mark.parametrize("num_graphs", [1, 3])
def test_architecture_cache_gives_what_collating_and_mean_grad_give(num_graphs):
    """The cached structure is exact: every field of the batch and every mean gradient equal
    ``Batch.from_data_list`` / ``GradGraph.mean_grad`` bit for bit, across architecture changes."""
    from torch_geometric.data import Batch

    from gradgraph.optim.batching import ArchitectureCache

    cache = ArchitectureCache()
    architectures = [(5, 4, 3), (5, 4, 3), (5, 6, 2, 3), (5, 4, 3)]  # same, same, another, back
    for round_index, widths in enumerate(architectures):
        models = [_mlp(widths, seed=10 * round_index + p, dtype=torch.float64) for p in range(num_graphs)]
        seeds = [100 * round_index + p for p in range(num_graphs)]
        graphs = _graphs_of(models, seeds)
        references = _graphs_of(models, seeds)  # converted afresh: nothing cached on them
        for graph, reference in zip(graphs, references):
            got, expected = cache.mean_grad(graph), reference.mean_grad()
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[name], expected[name]) for name in expected)
        first = cache.batch(graphs)
        first.component_x = first.act[..., None]  # what a caller sets on its batch stays in it
        second = cache.batch(graphs)
        del first.component_x
        _assert_same_batch(first, Batch.from_data_list(references))
        _assert_same_batch(second, Batch.from_data_list(references))
        assert second.edge_index is first.edge_index  # the structure was collated once


def test_learned_optimizer_with_the_architecture_cache_steps_as_without_it():
    """Bit-identical trajectories: the cache against collating and grouping blocks afresh every step."""
    from torch_geometric.data import Batch

    class NoCache:
        def batch(self, graphs):
            return Batch.from_data_list(graphs)

        def mean_grad(self, graph):
            return graph.mean_grad()

    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(mlp_hidden=8)).double()  # F = MLP with random weights: the embedding counts
    cached_model, plain_model = _mlp((5, 4, 3), dtype=torch.float64), _mlp((5, 4, 3), dtype=torch.float64)
    cached, plain = LearnedOptimizer(cached_model, meta), LearnedOptimizer(plain_model, meta)
    plain._architecture = NoCache()
    cached.chain = plain.chain = None  # the general path (a plain MLP takes the fused one by default)
    for seed in range(4):
        x, y = _batch(seed=seed, dtype=torch.float64)
        cached.step(_losses(cached_model, x, y))
        plain.step(_losses(plain_model, x, y))
    for a, b in zip(cached_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(cached_model[0].weight, _mlp((5, 4, 3), dtype=torch.float64)[0].weight)  # it moved
    from gradgraph.nn.context import STRUCTURE_MEMO

    # GradMetaNet's context structure was built once and reused by the later steps' batches
    assert "context" in cached._architecture._templates[1].__dict__[STRUCTURE_MEMO]


def test_pes_pairs_run_the_same_inner_problem():
    """Common random numbers: the two particles of an antithetic pair start from the same
    initialisation, see the same batches and restart together, so they differ only by the
    effect of ``±ξ`` (tiny here) while different pairs run different problems."""
    torch.manual_seed(0)
    meta = LearnedUpdate(MetaModelConfig(use_gradmetanet=False))
    trainer = MetaTrainer(meta, _tiny_task(validation=True),
                          MetaTrainConfig(estimator="pes", num_particles=6, truncation=2, horizon=4, sigma=1e-7))
    half = 3
    assert trainer.restart_at[:half].tolist() == trainer.restart_at[half:].tolist()
    assert len(set(trainer.restart_at[:half].tolist())) == half  # the pairs are spread over phases
    for _ in range(5):  # past restarts (horizon 4, truncation 2)
        line = trainer.step()
        assert math.isfinite(line["meta_loss"])
        for name, values in trainer.params.items():
            torch.testing.assert_close(values[:half], values[half:], rtol=0, atol=1e-4, msg=name)
        for first, second in zip(trainer.batches[:half], trainer.batches[half:]):
            assert torch.equal(first[0], second[0])
    assert trainer.next_model_seed > 1_000_000 + half  # restarts happened, with new seeds
    weight = trainer.params[trainer.names[0]]
    assert (weight[0] - weight[1]).abs().max() > 1e-2  # different pairs: different problems


def test_tbptt_particles_each_run_their_own_problem():
    torch.manual_seed(0)
    trainer = MetaTrainer(LearnedUpdate(MetaModelConfig(use_gradmetanet=False)), _tiny_task(),
                          MetaTrainConfig(estimator="tbptt", num_particles=4, truncation=2, horizon=4))
    first = [trainer.params[name] for name in trainer.names][0]
    assert len({tuple(first[p].reshape(-1).tolist()) for p in range(4)}) == 4
    assert len(set(trainer.restart_at.tolist())) == 4


def test_charlm_meta_task_trains_and_validates_on_disjoint_text_and_keeps_the_benchmark_data():
    from gradgraph_lab.tasks.learned_optimizer.tasks import char_corpus, get_task

    bench = get_task("charlm")
    train_ids, test_ids, vocab = char_corpus()
    num_inner = len(train_ids) * 4 // 5
    generator = torch.Generator().manual_seed(3)
    inner_targets = torch.cat([bench.meta_task.sample_batch(generator)[1] for _ in range(200)])
    validation_targets = torch.cat([bench.meta_task.sample_validation(generator)[1] for _ in range(200)])
    # windows are found back in the text; inner ones only in the first 80%, validation ones only after
    text = train_ids.tolist()
    inner_text, validation_text = "".join(map(chr, text[:num_inner])), "".join(map(chr, text[num_inner:]))
    for row in inner_targets[:20]:
        assert "".join(map(chr, row.tolist())) in inner_text
    for row in validation_targets[:20]:
        assert "".join(map(chr, row.tolist())) in validation_text
    assert bench.eval_every == bench.validation.eval_every == 10
    # the benchmark's own data is the whole training text and the test windows
    model = bench.task.make_model(0)
    mask = bench.forward_kwargs["mask"]
    starts = torch.linspace(0, len(test_ids) - 16 - 2, 512).long()
    chunk = test_ids[starts[:, None] + torch.arange(17)]
    expected = F.cross_entropy(model(F.one_hot(chunk[:, :-1], vocab).float(), mask=mask).transpose(1, 2), chunk[:, 1:])
    assert bench.test_loss(model) == pytest.approx(float(expected), rel=1e-6)
    assert bench.validation.test_loss(model) != pytest.approx(bench.test_loss(model), rel=1e-3)


def test_train_curve_evaluates_at_the_task_period():
    from gradgraph_lab.tasks.learned_optimizer.benchmark import train_curve
    from gradgraph_lab.tasks.learned_optimizer.tasks import get_task

    bench = get_task("charlm")
    adam = lambda model: torch.optim.Adam(model.parameters(), lr=1e-3)  # noqa: E731
    assert train_curve(bench, adam, 0, 25).steps == [0, 10, 20, 25]
    assert train_curve(bench, adam, 0, 3, eval_every=1).steps == [0, 1, 2, 3]


def test_meta_train_command_overrides_the_preset_horizon_truncation_and_selection_seeds(tmp_path, monkeypatch):
    from gradgraph_lab.cli import main
    from gradgraph_lab.tasks.learned_optimizer import meta as meta_run

    seen = {}

    def record(config, export=None, context=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(meta_run, "run_meta_training", record)
    with pytest.raises(SystemExit):
        main(["learned-optimizer", "--meta-train", "--tasks", "charlm", "--horizon", "120", "--truncation", "5",
              "--particles", "6", "--select-seeds", "9", "--out-dir", str(tmp_path), "--quiet"])
    config = seen["config"]
    assert (config.task, config.horizon, config.truncation, config.num_particles, config.select_seeds) == (
        "charlm", 120, 5, 6, 9)


def test_each_task_is_benchmarked_with_its_own_shipped_file_unless_one_is_named(tmp_path, monkeypatch):
    from gradgraph_lab.tasks.learned_optimizer import run

    requested = []

    def fake_load(spec):
        requested.append(spec)
        return LearnedUpdate(MetaModelConfig(use_gradmetanet=False, residual_adam=True))

    monkeypatch.setattr(run, "load_meta_model", fake_load)
    common = dict(optimizers=("adam", "deepsets", "gradmetanet"), steps=2, seeds=1, grid_size=2, progress=False)
    payload = run.run_benchmark(run.BenchmarkConfig(tasks=("digits", "digits-wide", "charlm"),
                                                    out_dir=str(tmp_path / "a"), **common))
    assert payload["meta_models"] == {
        "digits": {"deepsets": "mnist1d-mlp-deepsets", "gradmetanet": "mnist1d-mlp"},
        "digits-wide": {"deepsets": "mnist1d-mlp-deepsets", "gradmetanet": "mnist1d-mlp"},
        "charlm": {"deepsets": "charlm-transformer-deepsets", "gradmetanet": "charlm-transformer"},
    }
    assert sorted(requested) == sorted(["mnist1d-mlp-deepsets", "mnist1d-mlp", "charlm-transformer-deepsets",
                                        "charlm-transformer"])  # each file loaded once
    requested.clear()
    payload = run.run_benchmark(run.BenchmarkConfig(tasks=("digits", "charlm"), gradmetanet="mine.pt",
                                                    out_dir=str(tmp_path / "b"), **common))
    assert {task: names["gradmetanet"] for task, names in payload["meta_models"].items()} == {"digits": "mine.pt",
                                                                                              "charlm": "mine.pt"}
    requested.clear()  # the learned SGDM row: its own file, its own label in the table
    common["optimizers"] = ("adam", "learned-sgdm")
    payload = run.run_benchmark(run.BenchmarkConfig(tasks=("digits",), learned_sgdm="sgdm.pt",
                                                    out_dir=str(tmp_path / "c"), **common))
    assert payload["meta_models"] == {"digits": {"learned-sgdm": "sgdm.pt"}} and requested == ["sgdm.pt"]
    assert "learned-sgdm" in (tmp_path / "c" / "results.md").read_text()
    assert run.pretrained_for("mnist1d", "learned-sgdm") == run.PRETRAINED_FOR_TASK["mnist1d"] + "-sgdm"


class _TinyGPT(nn.Module):
    """nanoGPT-style: token embedding + learned positions, a pre-norm block (fused q/k/v, causal SDPA, GELU MLP)."""

    def __init__(self, vocab: int = 7, dim: int = 8, context: int = 5, heads: int = 2) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Parameter(0.1 * torch.randn(context, dim))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc, self.out = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head, self.heads = nn.Linear(dim, vocab), heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        x = self.tokens(ids) + self.positions[:length]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        split = lambda t: t.view(batch, length, self.heads, -1).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, -1))
        x = x + self.out(F.gelu(self.fc(self.norm2(x))))
        return self.head(x)


@pytest.mark.parametrize("use_gradmetanet", [False, True])
def test_traced_transformer_step_equals_documented_update(use_gradmetanet):
    """A model only the traced converter reads (residual stream, LayerNorm, embedding, SDPA)."""
    torch.manual_seed(0)
    model = _TinyGPT()
    meta = _constant_f(LearnedUpdate(MetaModelConfig(use_gradmetanet=use_gradmetanet, alpha=0.5, beta=0.1, mu=0.8)),
                       -0.7)
    opt = LearnedOptimizer(model, meta)
    tokens = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(0))

    def losses():
        return F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)

    stepped = _step_against_documented_update(model, opt, losses)
    assert len(stepped) == len(list(model.parameters()))
    for name, after, expected in stepped:
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_every_task_has_its_shipped_meta_models():
    from gradgraph_lab.tasks.learned_optimizer.run import PRETRAINED_FOR_TASK, pretrained_for
    from gradgraph_lab.tasks.learned_optimizer.tasks import TASK_NAMES

    assert set(PRETRAINED_FOR_TASK) == set(TASK_NAMES)
    for task in TASK_NAMES:
        for variant in ("gradmetanet", "deepsets"):
            meta = load_pretrained(pretrained_for(task, variant))
            assert meta.needs_graph == (variant == "gradmetanet"), (task, variant)


def test_pretrained_language_model_optimizer_lowers_a_char_transformer_loss():
    from gradgraph_lab.tasks.learned_optimizer.tasks import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab=9, d_model=16, heads=2, blocks=1)  # smaller than the meta-training task's
    opt = LearnedOptimizer.from_pretrained("charlm-transformer", model)
    tokens = torch.arange(40).remainder(9).view(4, 10)  # a periodic text: each character predicts the next
    x, y = F.one_hot(tokens[:, :-1], 9).float(), tokens[:, 1:]
    mask = nn.Transformer.generate_square_subsequent_mask(9)

    def losses():
        return F.cross_entropy(model(x, mask=mask).transpose(1, 2), y, reduction="none").mean(1)

    first = float(losses().mean())
    for _ in range(40):
        opt.step(losses)
    assert float(losses().mean()) < 0.5 * first


def test_pretrained_language_model_optimizer_trains_a_transformers_bert_called_by_keyword():
    # a model none of the tests or meta-tasks were built around: transformers' BERT, called as
    # model(input_ids=...), with embeddings, token types, LayerNorm, GELU, a pooler and a classifier
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()  # eval: no dropout
    tokens = torch.randint(0, 50, (16, 12))
    labels = tokens[:, 0] % 3  # the class is read off the first token

    def losses():
        return F.cross_entropy(model(input_ids=tokens).logits, labels, reduction="none")

    opt = LearnedOptimizer.from_pretrained("charlm-transformer", model)
    first = float(losses().mean())
    for _ in range(30):
        opt.step(losses)
    assert float(losses().mean()) < 0.25 * first
