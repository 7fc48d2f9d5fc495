"""``OptimizerState.detach`` / ``select`` keep and restart the factor EMAs entry by entry;
``LearnedUpdate.adam_direction``, ``step_scale`` and ``embed``'s factor EMAs against their formulas;
``reset_parameters`` / ``extra_repr`` do what they say; the SGDM refusal in full (float64).

Written for the survivors of the partial mutation run of ``optim/meta_model.py`` (issue 31;
docs/mutation.md, runs optim 9-10): each test names the mutants it kills, each checked with
``MUTANT_UNDER_TEST`` in ``.mutation/optim/mutants/``.
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
    from gradgraph.optim.features import FACTOR_DECAYS, normalize_factors

    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=True)).double()
    params = {"w": torch.zeros(1, 2, dtype=DOUBLE)}
    state = rule.init_state(params)
    decays = rule.factor_decays  # FACTOR_DECAYS as the rule holds them: made in float32, so 0.1 is 0.1000000015
    torch.testing.assert_close(decays, torch.tensor(FACTOR_DECAYS, dtype=DOUBLE), rtol=1e-7, atol=0)
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
