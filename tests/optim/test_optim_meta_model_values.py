"""``OptimizerState.detach`` / ``select`` keep and restart the factor EMAs entry by entry;
``LearnedUpdate.adam_direction``, ``step_scale`` and ``embed``'s factor EMAs against their formulas;
``reset_parameters`` / ``extra_repr`` do what they say; the SGDM refusal in full; ``forward`` against the
module docstring's rule written out entry by entry; ``__init__``'s parts and ``_materialize``'s random stream
(float64).

Written for the survivors of the mutation runs of ``optim/meta_model.py`` (issue 31; docs/mutation.md, runs
optim 9-12): each test names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in
``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import math

import torch

from gradgraph.optim import LearnedUpdate, MetaModelConfig, OptimizerState

DOUBLE = torch.float64


def _state(num_particles: int = 2, nodes: int = 3, batch: int = 4, seed: int = 0) -> OptimizerState:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=DOUBLE)

    return OptimizerState(step=torch.tensor([3, 5][:num_particles]), momentum={"w": draw(num_particles, 2)},
                          momenta={"w": draw(num_particles, 2, 7)},
                          factor_emas=draw(num_particles * nodes, batch, 12).requires_grad_(True))


def test_detach_keeps_the_factor_emas_cut_from_the_graph():
    """Kills ``OptimizerState.detach`` 4, 8, 10 (the factor EMAs dropped at the truncation boundary:
    GradMetaNet's EMAs would restart at every truncation of meta-training)."""
    state = _state()
    emas = state.factor_emas * 2  # carries autograd history
    detached = OptimizerState(state.step, state.momentum, state.momenta, emas).detach()
    assert detached.factor_emas is not None and not detached.factor_emas.requires_grad
    assert torch.equal(detached.factor_emas, emas.detach())


def test_select_keeps_the_kept_particles_emas_and_restarts_the_others():
    """Two particles' EMAs ``[P·N, B, 12]``, the second restarted: with a fresh state without EMAs its rows
    become zeros, with a fresh state that has EMAs its rows become those; the first particle's rows are
    kept exactly.

    Kills ``OptimizerState.select`` 30 (the fresh state's EMAs never read), 33 (``reshape(None)``), 34,
    43, 47 (the selected EMAs dropped)."""
    state, fresh = _state(seed=0), _state(seed=1)
    keep = torch.tensor([True, False])
    nodes = 3
    for fresh_emas in (None, fresh.factor_emas):
        other = OptimizerState(fresh.step, fresh.momentum, fresh.momenta, fresh_emas)
        selected = state.select(keep, other)
        assert selected.factor_emas is not None and selected.factor_emas.shape == state.factor_emas.shape
        assert torch.equal(selected.factor_emas[:nodes], state.factor_emas[:nodes])
        expected = torch.zeros_like(state.factor_emas[nodes:]) if fresh_emas is None else fresh_emas[nodes:]
        assert torch.equal(selected.factor_emas[nodes:], expected)
        assert selected.step.tolist() == [3, 5]  # particle 0 kept, particle 1 from the fresh state (5 there)


def test_reset_parameters_restores_the_initial_scalars_and_redraws_every_network():
    """Every parameter moved away, then ``reset_parameters``: ``log α``, ``log β``, ``logit μ`` are the
    config's again, the schedule is zero, ``F``'s last layer zero (``residual_adam``), and every other
    layer of ``F`` and of GradMetaNet is redrawn (no longer the moved values).

    Kills ``LearnedUpdate.reset_parameters`` 1 (``F``'s layers not redrawn), 2 (GradMetaNet not redrawn),
    3-8 (a scalar filled with ``None``), 9 (the schedule not zeroed) — reached by no test before."""
    config = MetaModelConfig(use_gradmetanet=True, residual_adam=True, schedule=True, alpha=0.05, beta=0.002,
                             mu=0.8)
    torch.manual_seed(0)
    rule = LearnedUpdate(config).double()
    with torch.no_grad():
        for parameter in rule.parameters():
            parameter.fill_(0.123)
    rule.reset_parameters()
    assert math.isclose(float(rule.log_alpha.detach()), math.log(0.05), rel_tol=1e-12)
    assert math.isclose(float(rule.log_beta.detach()), math.log(0.002), rel_tol=1e-12)
    assert math.isclose(float(rule.logit_mu.detach()), math.log(0.8 / 0.2), rel_tol=1e-12)
    assert torch.equal(rule.schedule, torch.zeros_like(rule.schedule))
    assert torch.equal(rule.mlp[-1].weight, torch.zeros_like(rule.mlp[-1].weight))
    assert not (rule.mlp[0].weight == 0.123).any()
    gradmetanet_weights = [p for name, p in rule.gradmetanet.named_parameters() if name.endswith("weight")]
    assert gradmetanet_weights and all(not (p == 0.123).all() for p in gradmetanet_weights)

    plain = LearnedUpdate(MetaModelConfig(use_gradmetanet=False)).double()
    plain.reset_parameters()  # no GradMetaNet, no schedule: nothing to redraw there
    assert plain.schedule is None


def test_extra_repr_says_which_variant_and_its_embedding_width():
    """Kills ``LearnedUpdate.extra_repr`` 1-5 (reached by no test before)."""
    assert LearnedUpdate(MetaModelConfig(use_gradmetanet=True, embedding_dim=14)).extra_repr() == \
        "gradmetanet=True, embedding=14"
    assert LearnedUpdate(MetaModelConfig(use_gradmetanet=False)).extra_repr() == "gradmetanet=False, embedding=0"


def test_adam_direction_is_the_bias_corrected_ratio_written_out():
    """``m̂ / (√v̂ + 1e-8)`` with ``m̂ = m / (1 − 0.9^t)``, ``v̂ = v / (1 − 0.999^t)``, per particle at its own
    step, in Python floats, to 1e-14 (some ``v`` tiny, so the ``1e-8`` counts); and the state a rule starts
    from counts its steps in ``int64``.

    Kills ``LearnedUpdate.adam_direction`` 11 (the step not cast: ``0.9 ** t`` of an ``int64`` tensor is
    float32), 27 (``√v̂ − 1e-8``) and ``init_state`` 13, 16 (the step count made float32)."""
    generator = torch.Generator().manual_seed(3)
    momenta = torch.randn(2, 3, 7, generator=generator, dtype=DOUBLE)
    momenta[..., -1] = momenta[..., -1].square() * torch.tensor([1.0, 1e-14, 1e-4], dtype=DOUBLE)
    step = torch.tensor([1, 37])
    got = LearnedUpdate.adam_direction(momenta, step)
    for particle, t in enumerate(step.tolist()):
        for entry in range(3):
            m = float(momenta[particle, entry, 2]) / (1 - 0.9 ** t)
            v = float(momenta[particle, entry, -1]) / (1 - 0.999 ** t)
            expected = m / (math.sqrt(v) + 1e-8)
            value = float(got[particle, entry])
            assert math.isclose(value, expected, rel_tol=1e-13, abs_tol=1e-15), (particle, entry)
    state = LearnedUpdate(MetaModelConfig(use_gradmetanet=False)).init_state({"w": momenta[..., 0]})
    assert state.step.dtype == torch.long and state.step.tolist() == [0, 0]


def test_a_float32_rule_gives_a_float64_step_scale_of_its_formula():
    """A float32 rule (as the shipped files are) asked for float64 steps: ``α s(t) = α exp(w · τ(t))`` in
    float64, with and without a schedule.

    Kills ``LearnedUpdate.step_scale`` 2 (``α`` not cast: a float32 scale) and 12 (the schedule not cast:
    a float64 × float32 product refused)."""
    from gradgraph.optim.features import time_features

    step = torch.tensor([0, 9, 400])
    plain = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=0.03))
    scale = plain.step_scale(step, DOUBLE)
    assert scale.dtype == DOUBLE
    torch.testing.assert_close(scale, torch.full((3,), float(plain.alpha.detach()), dtype=DOUBLE), rtol=0, atol=0)
    scheduled = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=0.03, schedule=True))
    with torch.no_grad():
        scheduled.schedule.copy_(torch.linspace(-0.5, 0.5, 11))
    weights = scheduled.schedule.detach().double()
    expected = float(scheduled.alpha.detach()) * torch.exp(time_features(step, DOUBLE) @ weights)
    scale = scheduled.step_scale(step, DOUBLE)
    assert scale.dtype == DOUBLE
    torch.testing.assert_close(scale, expected, rtol=1e-15, atol=0)


def test_an_sgdm_config_with_f_inputs_is_refused_in_full():
    """Kills ``MetaModelConfig.__post_init__`` 6, 8-11 (the message changed)."""
    import pytest

    from gradgraph.errors import GradGraphError

    with pytest.raises(GradGraphError) as refused:
        MetaModelConfig(learned_term=False)
    assert str(refused.value) == ("MetaModelConfig: the SGDM variant (learned_term=False) has no F, so it needs "
                                  "use_gradmetanet=False and residual_adam=False")


def test_max_components_of_one_is_taken_and_zero_is_refused_in_full():
    """Kills ``MetaModelConfig.__post_init__`` 14, 15 (one component refused: ``<= 1``, ``< 2``) and 16
    (the message ``None``)."""
    import pytest

    from gradgraph.errors import GradGraphError

    assert MetaModelConfig(max_components=1).max_components == 1
    with pytest.raises(GradGraphError) as refused:
        MetaModelConfig(max_components=0)
    assert str(refused.value) == "MetaModelConfig.max_components must be >= 1 or None, got 0"


def _graphs(seed: int, size: int = 4):
    import torch.nn.functional as F
    from torch import nn
    from torch_geometric.data import Batch

    from gradgraph import to_graph

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 5, generator=generator, dtype=DOUBLE)
    y = torch.randint(0, 3, (size,), generator=generator)
    graph = to_graph(model, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))
    return Batch.from_data_list([graph]), graph


def test_embed_carries_the_factor_emas_of_the_normalised_factors_written_out():
    """Two embeddings of a float64 rule, the state carried: the EMAs are ``d ema + (1 − d) f`` of the
    normalised ``(act, grad)`` (``normalize_factors``, tested on its own), from zero, step by step; the
    batch GradMetaNet reads holds the normalised ``act`` and ``grad`` in their places.

    Kills ``LearnedUpdate.embed`` 21 (the carried EMAs ignored), 24, 26 (the shape test always unequal: the
    EMAs restart at every step), 48 (``act`` replaced by ``grad``)."""
    from gradgraph.optim.features import FACTOR_DECAYS, MOMENTUM_DECAYS, normalize_factors

    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=True)).double()
    params = {"w": torch.zeros(1, 2, dtype=DOUBLE)}
    state = rule.init_state(params)
    decays = rule.factor_decays  # FACTOR_DECAYS as the rule holds them: made in float64, exact for a float64 rule
    # (a float32 buffer cast up gave 0.1000000015 for 0.1)
    assert torch.equal(decays, torch.tensor(FACTOR_DECAYS, dtype=DOUBLE))
    assert torch.equal(rule.momentum_decays, torch.tensor(MOMENTUM_DECAYS, dtype=DOUBLE))
    expected = None
    for seed in (1, 2):
        batch, graph = _graphs(seed)
        factors = normalize_factors(torch.stack([batch.act, batch.grad], dim=-1), graph.layer, 1)  # [N, B, 2]
        _, emas = rule.embed(batch, graph, state, 1)
        step = (1 - decays) * factors[..., None]
        expected = step if expected is None else decays * expected + step
        torch.testing.assert_close(emas, expected.flatten(-2), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(batch.act, factors[..., 0], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(batch.grad, factors[..., 1], rtol=1e-13, atol=1e-15)
        state = OptimizerState(state.step, state.momentum, state.momenta, emas)


def test_a_float32_rule_embeds_a_float64_graph_in_its_own_dtype_and_reads_max_components():
    """A float32 rule (as the shipped ones) on a float64 graph of 4 datapoints with ``max_components=2``: the
    factors, biases and weights GradMetaNet reads are cast to float32, and the EMAs cover the first two
    components only.

    Kills ``LearnedUpdate.embed`` 3 (``max_components`` ignored when set), 13 (the factors not cast),
    52, 54 (``x`` / ``edge_attr`` not cast)."""
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=True, max_components=2))
    batch, graph = _graphs(3)
    embeddings, emas = rule.embed(batch, graph, rule.init_state({"w": torch.zeros(1, 2)}), 1)
    assert emas.shape == (graph.num_nodes, 2, 12) and emas.dtype == torch.float32
    assert batch.x.dtype == torch.float32 and batch.edge_attr.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in embeddings.values())


# ---------------------------------------------------------------------------------------------------------
# LearnedUpdate.forward against the module docstring's rule, entry by entry (run optim 11)

_SHAPES = {"a": (3, 2), "b": (4,)}


def _step_inputs(num_particles: int = 2, seed: int = 5, steps: tuple[int, ...] = (0, 6), embedding_dim: int = 3):
    """Params, grads, a non-zero state (the particles at different steps) and embeddings ``{name: [P, *shape, k]}``
    whose channels have different scales (one of ``b``'s all zero), float64; the parameters and gradients
    straddle the clip at ±1."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator, dtype=DOUBLE)

    params = {name: draw(num_particles, *shape, scale=1.5) for name, shape in _SHAPES.items()}
    grads = {name: draw(num_particles, *shape, scale=1.5) for name, shape in _SHAPES.items()}
    momenta = {}
    for name, shape in _SHAPES.items():
        values = draw(num_particles, *shape, 7)
        values[..., -1] = values[..., -1].square()  # the ∇² EMA is non-negative
        momenta[name] = values
    state = OptimizerState(step=torch.tensor(steps[:num_particles]),
                           momentum={name: draw(num_particles, *shape) for name, shape in _SHAPES.items()},
                           momenta=momenta, factor_emas=draw(num_particles * 5, 4, 12))
    channel_scales = torch.tensor([0.01, 1.0, 30.0][:embedding_dim], dtype=DOUBLE)
    embeddings = {name: draw(num_particles, *shape, embedding_dim) * channel_scales for name, shape in _SHAPES.items()}
    embeddings["b"][..., 0] = 0.0  # a dead channel (a ReLU'd output can be): it stays 0 after the RMS, not NaN
    return params, grads, state, embeddings


def _rule(seed: int = 0, **options) -> LearnedUpdate:
    """A float64 rule with every learned part away from its initial value: ``F``'s last layer redrawn (not
    zero, as ``residual_adam`` leaves it), α, β, μ set, the schedule's weights (if any) non-zero."""
    config = dict(use_gradmetanet=True, embedding_dim=3, alpha=0.3, beta=0.7, mu=0.6)
    config.update(options)
    torch.manual_seed(seed)
    rule = LearnedUpdate(MetaModelConfig(**config)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if rule.mlp is not None:
            last = rule.mlp[-1]
            last.weight.copy_(0.5 * torch.randn(last.weight.shape, generator=generator, dtype=DOUBLE))
            last.bias.fill_(0.2)
        if rule.schedule is not None:
            rule.schedule.copy_(torch.linspace(-0.3, 0.4, rule.schedule.numel(), dtype=DOUBLE))
    return rule


def _rms(rows: list[list[float]], channel: int) -> float:
    return math.sqrt(sum(row[channel] ** 2 for row in rows) / len(rows) + 1e-12)


def _documented_step(rule: LearnedUpdate, params, grads, state, embeddings):
    """The module docstring's rule for every particle and entry, in Python floats (``F``'s MLP, a learned
    part, is the rule's own, called on one entry's 19 + k inputs at a time):

    ``m ← μ m + (1 − μ)∇``; momenta ``M_k ← d_k M_k + (1 − d_k)∇``, ``v ← 0.999 v + 0.001 ∇²``; ``t ← t + 1``;
    ``φ`` = ``(θ, ∇, M_1..6)`` clipped to ±1, each channel divided by its RMS over the tensor;
    ``τ_j = tanh(t / 10^{j/2} − 1)``; ``e`` divided by its RMS over the tensor per channel (if the config
    says so); ``F = MLP(φ ‖ τ ‖ e)`` (+ ``m̂ / (√v̂ + 1e-8)`` with ``residual_adam``);
    ``θ ← θ − α s(t) (β F + m)``, ``s(t) = exp(w · τ)`` with a schedule, else 1.

    Returns ``(params, momentum, momenta, step)`` as nested Python lists per name and particle (flat entries).
    The momentum decays are the rule's own buffer (float64: the decimal decays rounded once to the step's dtype)."""
    config = rule.config
    alpha, beta = float(rule.alpha.detach()), float(rule.beta.detach())
    mu = float(rule.mu.detach())  # sigmoid(logit μ) in the rule's dtype
    decays = [float(d) for d in rule.momentum_decays]
    weights = None if rule.schedule is None else [float(w) for w in rule.schedule.detach()]
    out = {name: [] for name in params}
    momentum_out = {name: [] for name in params}
    momenta_out = {name: [] for name in params}
    steps = []
    for p in range(state.step.shape[0]):
        t = int(state.step[p]) + 1
        steps.append(t)
        tau = [math.tanh(t / float(10 ** (j / 2)) - 1) for j in range(11)]
        scale = alpha if weights is None else alpha * math.exp(sum(w * x for w, x in zip(weights, tau)))
        for name in params:
            theta = params[name][p].reshape(-1).tolist()
            g = grads[name][p].reshape(-1).tolist()
            m_old = state.momentum[name][p].reshape(-1).tolist()
            moments_old = state.momenta[name][p].reshape(-1, 7).tolist()
            m = [mu * a + (1 - mu) * b for a, b in zip(m_old, g)]
            moments = [[decays[k] * row[k] + (1 - decays[k]) * gi for k in range(6)]
                       + [0.999 * row[6] + (1 - 0.999) * gi * gi] for row, gi in zip(moments_old, g)]
            raw = [[min(max(x, -1.0), 1.0) for x in [th, gi] + row[:6]] for th, gi, row in zip(theta, g, moments)]
            rms = [_rms(raw, c) for c in range(8)]
            phi = [[x / rms[c] for c, x in enumerate(row)] for row in raw]
            inputs = [row + tau for row in phi]
            if embeddings is not None and rule.gradmetanet is not None:
                e = embeddings[name][p].reshape(len(theta), -1).tolist()
                if config.normalize_embedding:
                    e_rms = [_rms(e, c) for c in range(len(e[0]))]
                    e = [[x / e_rms[c] for c, x in enumerate(row)] for row in e]
                inputs = [row + erow for row, erow in zip(inputs, e)]
            if rule.mlp is None:  # SGDM: no F, β = 0
                learned = [0.0] * len(inputs)
            else:
                with torch.no_grad():
                    dtype = rule.mlp[0].weight.dtype
                    learned = [float(rule.mlp(torch.tensor(row, dtype=dtype))) for row in inputs]
            if config.residual_adam:
                learned = [f + (row[2] / (1 - 0.9 ** t)) / (math.sqrt(row[6] / (1 - 0.999 ** t)) + 1e-8)
                           for f, row in zip(learned, moments)]
            out[name].append([th - scale * (beta * f + mi) for th, f, mi in zip(theta, learned, m)])
            momentum_out[name].append(m)
            momenta_out[name].append(moments)
    return out, momentum_out, momenta_out, steps


def _assert_step_is_documented(rule, params, grads, state, embeddings, new_params, new_state, rtol=1e-12):
    expected, momentum, momenta, steps = _documented_step(rule, params, grads, state, embeddings)
    assert new_state.step.tolist() == steps and new_state.step.dtype == torch.long
    for name, value in new_params.items():
        assert value.shape == params[name].shape and value.dtype == params[name].dtype, name
        torch.testing.assert_close(value.reshape(value.shape[0], -1),
                                   torch.tensor(expected[name], dtype=value.dtype), rtol=rtol, atol=1e-13)
        torch.testing.assert_close(new_state.momentum[name].reshape(value.shape[0], -1),
                                   torch.tensor(momentum[name], dtype=DOUBLE), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(new_state.momenta[name].reshape(value.shape[0], -1, 7),
                                   torch.tensor(momenta[name], dtype=DOUBLE), rtol=1e-13, atol=1e-15)
        assert new_state.momentum[name].shape == params[name].shape
        assert new_state.momenta[name].shape == (*params[name].shape, 7)


def test_a_step_with_given_embeddings_is_the_documented_rule_entry_by_entry():
    """GradMetaNet variant, ``residual_adam``, a schedule, the embedding normalised; two tensors, two particles
    at steps 0 and 6, a non-zero state: every new parameter, momentum and momentum feature is the module
    docstring's rule written out in Python floats (``_documented_step``), to 1e-12; the caller's EMAs are
    carried as they are; float32 embeddings are normalised in float64.

    With the other step tests, in the list of run optim 11: ``forward``'s arithmetic, slicing and state mutants;
    alone (checked with ``MUTANT_UNDER_TEST``): ``forward`` 143 (the embedding normalised in its own float32),
    156 (``− 1e-12``: a dead channel becomes NaN), 163."""
    rule = _rule(residual_adam=True, schedule=True)
    params, grads, state, embeddings = _step_inputs()
    new_params, new_state = rule(params, grads, state, embeddings=embeddings)
    _assert_step_is_documented(rule, params, grads, state, embeddings, new_params, new_state)
    assert new_state.factor_emas is state.factor_emas
    # Embeddings handed in as float32 (a float32 GradMetaNet's): normalised in the step's float64.
    embeddings32 = {name: value.float() for name, value in embeddings.items()}
    new_params, new_state = rule(params, grads, state, embeddings=embeddings32)
    _assert_step_is_documented(rule, params, grads, state, embeddings32, new_params, new_state)


def test_a_step_without_the_options_is_the_documented_rule_entry_by_entry():
    """The same without ``residual_adam``, without a schedule and with the embedding as GradMetaNet gave it
    (``normalize_embedding=False``), three particles at steps 0, 1 and 40."""
    rule = _rule(seed=3, normalize_embedding=False, alpha=0.05, beta=2.0, mu=0.3)
    params, grads, state, embeddings = _step_inputs(num_particles=3, seed=8, steps=(0, 1, 40))
    new_params, new_state = rule(params, grads, state, embeddings=embeddings)
    _assert_step_is_documented(rule, params, grads, state, embeddings, new_params, new_state)


def test_a_deepsets_step_is_the_documented_rule_and_reads_no_embedding():
    """``use_gradmetanet=False``: ``F = MLP(φ ‖ τ)`` (with ``residual_adam``), embeddings handed in are not read,
    and the new state has no factor EMAs."""
    rule = _rule(seed=4, use_gradmetanet=False, residual_adam=True)
    params, grads, state, embeddings = _step_inputs(seed=9, steps=(2, 11))
    state = OptimizerState(state.step, state.momentum, state.momenta)
    new_params, new_state = rule(params, grads, state)
    _assert_step_is_documented(rule, params, grads, state, None, new_params, new_state)
    assert new_state.factor_emas is None
    again, _ = rule(params, grads, state, embeddings=embeddings)
    for name in params:
        assert torch.equal(again[name], new_params[name])


def test_an_sgdm_step_is_theta_minus_alpha_s_m():
    """``learned_term=False``: ``θ ← θ − α s(t) m``, with and without a schedule, the momenta still carried (they
    are the features of no ``F`` here, but the state keeps them), no factor EMAs."""
    params, grads, state, _ = _step_inputs(seed=10, steps=(4, 0))
    for schedule in (False, True):
        rule = _rule(seed=5, use_gradmetanet=False, learned_term=False, schedule=schedule, alpha=0.2, mu=0.75)
        new_params, new_state = rule(params, grads, state)
        _assert_step_is_documented(rule, params, grads, state, None, new_params, new_state)
        assert float(rule.beta) == 0.0
        assert new_state.factor_emas is None


def _graph_step_inputs(seeds: tuple[int, ...]):
    """``P = len(seeds)`` GradGraphs of one 5-4-3 MLP on different batches (``_graphs``), and params, grads and a
    zero state named as the graph names its parameters."""
    from torch_geometric.data import Batch

    graphs = [_graphs(seed)[1] for seed in seeds]
    generator = torch.Generator().manual_seed(sum(seeds))
    shapes = dict(zip(graphs[0].param_names, (tuple(s) for s in graphs[0].param_shapes)))
    params = {name: torch.randn(len(seeds), *shape, generator=generator, dtype=DOUBLE) for name, shape in shapes.items()}
    grads = {name: torch.randn(len(seeds), *shape, generator=generator, dtype=DOUBLE) for name, shape in shapes.items()}
    return (lambda: Batch.from_data_list([graph.clone() for graph in graphs])), graphs[0], params, grads


def test_a_step_from_the_graphs_embeds_them_and_carries_the_new_factor_emas():
    """Handed the batch's graphs (not embeddings), the step is the one with ``embed``'s embedding of them, and the
    new state carries ``embed``'s EMAs; with ``first_graph`` named or left out (then ``graphs[0]``); two steps,
    so the second reads the first's EMAs; two particles, and one (``graphs[1]`` does not exist there).

    Kills ``forward`` 99 (``graphs.get_example(1)``: one particle has no graph 1) and the ``embed``-call mutants."""
    rule = _rule(seed=6, residual_adam=True)
    for seeds, first_graphs in (((1, 2), (True, False)), ((4,), (False,))):  # P = 2, and P = 1 (LearnedOptimizer's)
        _two_graph_steps(rule, seeds, first_graphs)


def _two_graph_steps(rule: LearnedUpdate, seeds: tuple[int, ...], first_graphs: tuple[bool, ...]) -> None:
    batch, first, params, grads = _graph_step_inputs(seeds)
    num_particles = len(seeds)
    for named in first_graphs:
        first_graph = first if named else None
        state = rule.init_state(params)
        for _ in range(2):
            embeddings, emas = rule.embed(batch(), first, state, num_particles)
            new_params, new_state = rule(params, grads, state, graphs=batch(), first_graph=first_graph)
            _assert_step_is_documented(rule, params, grads, state, embeddings, new_params, new_state)
            assert new_state.factor_emas is not None
            torch.testing.assert_close(new_state.factor_emas, emas, rtol=0, atol=0)
            state = new_state


def test_a_step_of_mismatched_names_or_without_graphs_is_refused_in_full():
    """The two refusals of ``forward``, their messages matched in full.

    Kills ``forward`` 4-8 (the mismatch message changed; 4-7 survived every other test)."""
    import pytest

    from gradgraph.errors import GradGraphError

    rule = _rule()
    params, grads, state, _ = _step_inputs()
    extra = {**grads, "c": grads["b"]}
    with pytest.raises(GradGraphError) as refused:
        rule(params, extra, state)
    assert str(refused.value) == "LearnedUpdate: params and grads name different tensors: ['c']"
    with pytest.raises(GradGraphError) as refused:
        rule(params, grads, state)
    assert str(refused.value) == "LearnedUpdate: the GradMetaNet variant needs the batch's graphs"


def test_a_float32_rule_steps_float64_parameters_in_float64():
    """A float32 rule (as the shipped files are) on float64 parameters: the new parameters and state are float64,
    the rule's documented update with its float32 ``F`` (to float32 precision: the MLP runs in float32); with ``F``
    constant, exactly to float64 (``β F`` not rounded to float32).

    Kills ``forward`` 17 (``μ`` left float32: ``1 − μ`` rounded there), 19 (the decays likewise), 173 (``F`` left
    float32: ``β F`` rounded there)."""
    torch.manual_seed(0)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=True, embedding_dim=3, alpha=0.3, beta=0.7, mu=0.6,
                                         residual_adam=True, schedule=True))
    with torch.no_grad():
        rule.mlp[-1].weight.normal_()
        rule.schedule.fill_(0.1)
    params, grads, state, embeddings = _step_inputs()
    new_params, new_state = rule(params, grads, state, embeddings=embeddings)
    _assert_step_is_documented(rule, params, grads, state, embeddings, new_params, new_state, rtol=1e-5)
    assert all(value.dtype == DOUBLE for value in new_state.momentum.values())
    assert all(value.dtype == DOUBLE for value in new_state.momenta.values())
    # F ≡ 0.375 (exact in float32), no Adam term: β F is a float64 product, the step exact to float64; μ = 0.2,
    # where 1 − μ rounds in float32 (so it must be taken in float64; at 0.6 or 0.3 it happens to be exact).
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, alpha=0.3, beta=0.7, mu=0.2))
    with torch.no_grad():
        rule.mlp[-1].weight.zero_()
        rule.mlp[-1].bias.fill_(0.375)
    new_params, new_state = rule(params, grads, state)
    _assert_step_is_documented(rule, params, grads, state, None, new_params, new_state, rtol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# LearnedUpdate.__init__ and _materialize (run optim 12)


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def test_a_rule_built_without_a_config_has_the_documented_parts_and_state_dict():
    """``LearnedUpdate()``: the default config; ``log α``, ``log β``, ``logit μ`` at the paper's 0.1, 0.001, 0.9;
    ``F`` three hidden layers of 32 with ReLU on ``19 + 14`` inputs and one output; GradMetaNet's parameters all
    sized (by ``_materialize``) before any step; the decay buffers not in the ``state_dict`` (checkpoints written
    before them load strictly), equal to the documented decays.

    Kills ``LearnedUpdate.__init__`` 2 (``config and MetaModelConfig()``), 55 (``layers =``: one hidden layer),
    74, 78, 84, 88 (a decay buffer made persistent: every checkpoint gets keys older files lack)."""
    from torch import nn

    from gradgraph.optim.features import FACTOR_DECAYS, MOMENTUM_DECAYS

    rule = LearnedUpdate()
    assert rule.config == MetaModelConfig()
    assert float(rule.log_alpha) == _float32(math.log(0.1)) and float(rule.log_beta) == _float32(math.log(0.001))
    assert float(rule.logit_mu) == _float32(math.log(0.9 / (1 - 0.9)))
    assert rule.schedule is None
    linears = [(m.in_features, m.out_features) for m in rule.mlp if isinstance(m, nn.Linear)]
    assert linears == [(19 + 14, 32), (32, 32), (32, 32), (32, 1)]
    assert [type(m) for m in rule.mlp] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in rule.parameters())
    keys = set(rule.state_dict())
    assert {"log_alpha", "log_beta", "logit_mu"} <= keys
    assert not any("decays" in key for key in keys)
    assert rule.momentum_decays.tolist() == list(MOMENTUM_DECAYS)  # float64: the decimals as Python has them
    assert rule.factor_decays.tolist() == list(FACTOR_DECAYS)
    assert all(key.startswith(("log_alpha", "log_beta", "logit_mu", "mlp.", "gradmetanet.")) for key in keys)


def test_the_sgdm_and_scheduled_rules_hold_the_documented_scalars():
    """SGDM: ``log β = −∞`` a buffer (in the ``state_dict``, not a parameter: ``β = 0`` exactly), only ``log α`` and
    ``logit μ`` learned, no ``F``, no GradMetaNet; a schedule: eleven zero weights, a parameter; DeepSets with
    ``mlp_layers=1``: ``F`` is ``Linear(19, h), ReLU, Linear(h, 1)``."""
    from torch import nn

    sgdm = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, learned_term=False, alpha=0.2, mu=0.5))
    assert sgdm.mlp is None and sgdm.gradmetanet is None and not sgdm.needs_graph
    assert "log_beta" in dict(sgdm.named_buffers()) and "log_beta" in sgdm.state_dict()
    assert float(sgdm.log_beta) == -math.inf and float(sgdm.beta) == 0.0
    assert sgdm.scalar_parameters == [sgdm.log_alpha, sgdm.logit_mu]
    assert float(sgdm.log_alpha) == _float32(math.log(0.2)) and float(sgdm.logit_mu) == 0.0
    scheduled = LearnedUpdate(MetaModelConfig(use_gradmetanet=False, schedule=True, mlp_layers=1, mlp_hidden=5))
    assert isinstance(scheduled.schedule, nn.Parameter) and torch.equal(scheduled.schedule, torch.zeros(11))
    assert scheduled.gradmetanet is None
    assert [type(m) for m in scheduled.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in scheduled.mlp[::2]] == [(19, 5), (5, 1)]


def test_materializing_draws_only_its_tiny_networks_initialisation_from_the_global_stream():
    """``_materialize``'s dummy data come from a private generator: a second call (GradMetaNet already sized, so
    no lazy layer draws) takes from the global random stream exactly what building its ``2 → 2 → 2`` network
    takes, nothing for the dummy parameters or inputs.

    Kills ``LearnedUpdate._materialize`` 1, 25, 27, 31, 34 (a dummy drawn from the global stream) and 15, 16,
    21, 22 (another dummy network: another share of the stream, so a seed no longer gives the weights it gave)."""
    from torch import nn

    rule = LearnedUpdate()
    torch.manual_seed(11)
    rule._materialize()
    after = torch.rand(4)
    torch.manual_seed(11)
    nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert torch.equal(after, torch.rand(4))


def test_a_seed_gives_the_initial_weights_it_gave():
    """``torch.manual_seed(0); LearnedUpdate()``: its 15184 initial meta-parameters, pinned by two sums (``Σ|w|`` and
    ``Σ i·w_i`` over the flat vector in ``parameters()`` order, which any change of a draw or of the order of the
    draws moves). GradMetaNet's input layers are sized lazily by ``_materialize``, after ``F`` is drawn, as they
    were when their widths were explicit; a layer sized at construction would draw its weights earlier and change
    every weight drawn after it, so a seeded meta-training run would no longer start where it did. A deliberate
    change of the default architecture or initialisation changes these numbers: re-pin them and say so.

    Kills ``LearnedUpdate.__init__`` 42, 43 (GradMetaNet's node / edge input width given, 1, instead of inferred)."""
    torch.manual_seed(0)
    flat = torch.cat([p.detach().double().reshape(-1) for p in LearnedUpdate().parameters()])
    assert flat.numel() == 15184
    index = torch.arange(1, flat.numel() + 1, dtype=DOUBLE)
    assert math.isclose(float(flat.abs().sum()), 1507.7670326129537, rel_tol=1e-12)
    assert math.isclose(float((flat * index).sum()), 163497.49892706034, rel_tol=1e-12)
