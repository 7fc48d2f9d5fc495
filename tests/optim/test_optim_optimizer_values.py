"""LearnedOptimizer's state loading and its fused path's structure cache, against an uninterrupted run
(float64); the refusal of a foreign state in full.

Written for the survivors of the mutation run of ``optim/optimizer.py`` (issue 31; docs/mutation.md, run
optim 8): each test names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in
``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedOptimizer
from strategies import learned_rule

DOUBLE = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(seed: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 5, generator=generator, dtype=DOUBLE),
            torch.randint(0, 3, (size,), generator=generator))


def _step(opt: LearnedOptimizer, model: nn.Module, seed: int) -> None:
    x, y = _batch(seed)
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))


def test_a_loaded_state_is_a_copy_the_caller_may_change_afterwards():
    """A GradMetaNet optimizer's state (step count and factor EMAs) loaded into a fresh one, then the loaded
    dict's tensors overwritten in place: the fresh optimizer still steps as the uninterrupted one.

    Kills ``LearnedOptimizer.load_state_dict`` 19, 22 (the step count not copied), 32, 35 (the factor
    EMAs not copied): the fresh optimizer then reads the overwritten tensors."""
    meta = learned_rule("gradmetanet")
    straight_model = _model()
    straight = LearnedOptimizer(straight_model, copy.deepcopy(meta))
    for seed in range(2):
        _step(straight, straight_model, seed)
    state = copy.deepcopy(straight.state_dict())
    resumed_model = copy.deepcopy(straight_model)
    resumed = LearnedOptimizer(resumed_model, copy.deepcopy(meta))
    resumed.load_state_dict(state)
    assert state["learned"]["factor_emas"] is not None
    state["learned"]["step"].fill_(1000)
    state["learned"]["factor_emas"].fill_(7.0)
    for seed in range(2, 4):
        _step(straight, straight_model, seed)
        _step(resumed, resumed_model, seed)
    for p, q in zip(resumed_model.parameters(), straight_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_state_without_the_learned_entry_is_refused_in_full():
    """A plain ``torch.optim`` state (no ``"learned"`` entry) loaded into a LearnedOptimizer.

    Kills ``LearnedOptimizer.load_state_dict`` 6 (``pop`` without its default: a ``KeyError``), 10-13 (the
    message)."""
    model = _model()
    opt = LearnedOptimizer(model, learned_rule("deepsets"))
    foreign = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(GradGraphError) as refused:
        opt.load_state_dict(foreign)
    assert str(refused.value) == ("LearnedOptimizer.load_state_dict: no 'learned' entry; "
                                  "not a LearnedOptimizer state")


def test_the_fused_path_keeps_its_graph_structure_while_the_batch_size_stays():
    """Three fused GradMetaNet steps on batches of one size convert the chain once (the same ``ChainGraphs``
    throughout); a batch of another size builds a new one.

    Kills ``LearnedOptimizer._fused_step`` 21, 22, 25 (``matches`` asked about ``None`` or two graphs:
    the structure rebuilt at every step)."""
    model = _model()
    opt = LearnedOptimizer(model, learned_rule("gradmetanet"))
    assert opt.chain is not None
    _step(opt, model, 0)
    structure = opt._chain_graphs
    assert structure is not None
    for seed in (1, 2):
        _step(opt, model, seed)
        assert opt._chain_graphs is structure
    x, y = _batch(3, size=4)
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert opt._chain_graphs is not structure and opt._chain_graphs.matches(4, 1)


@pytest.mark.parametrize("fused", [True, False])
def test_the_factor_emas_carry_from_step_to_step_as_the_rule_s_own_state(fused):
    """Three steps of a GradMetaNet LearnedOptimizer (fused and general path) against the rule called by
    hand on ``to_graph`` of the model, its ``OptimizerState`` carried from call to call: the same
    parameters and factor EMAs (1e-10).

    Kills ``LearnedOptimizer._state`` 24, 28 (the factor EMAs not handed to the rule: they restart at
    every step)."""
    from torch_geometric.data import Batch

    from gradgraph import to_graph

    meta = learned_rule("gradmetanet")
    model, reference = _model(), _model()
    opt = LearnedOptimizer(model, copy.deepcopy(meta))
    if not fused:
        opt.chain = None
    state = None
    for seed in range(3):
        x, y = _batch(seed)
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
        graph = to_graph(reference, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))
        params = {name: p.detach()[None] for name, p in reference.named_parameters()}
        grads = {name: value[None] for name, value in graph.mean_grad().items()}
        state = meta.init_state(params) if state is None else state
        new_params, state = meta(params, grads, state, Batch.from_data_list([graph]), graph)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(new_params[name][0])
    assert state.factor_emas is not None
    torch.testing.assert_close(opt._factor_emas, state.factor_emas, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_what_the_optimizer_cannot_take_is_refused_in_full():
    """Kills ``LearnedOptimizer.__init__`` 2, 3, 5, 6, 9, 10 (the messages ``None`` or naming ``NoneType``)."""
    meta = learned_rule("deepsets")
    frozen = _model().requires_grad_(False)
    for build, message in (
            (lambda: LearnedOptimizer("a model", meta), "LearnedOptimizer: model must be an nn.Module, got str"),
            (lambda: LearnedOptimizer(_model(), "a rule"),
             "LearnedOptimizer: meta_model must be a LearnedUpdate, got str"),
            (lambda: LearnedOptimizer(frozen, meta), "LearnedOptimizer: Sequential has no trainable parameter")):
        with pytest.raises(GradGraphError) as refused:
            build()
        assert str(refused.value) == message


def test_a_model_on_two_devices_is_refused_naming_them():
    """One weight on the ``meta`` device (a second device without a GPU).

    Kills ``LearnedOptimizer.__init__`` 21, 23 (the model's class or the devices read from ``None``)."""
    model = _model()
    model[0].weight = nn.Parameter(model[0].weight.detach().to("meta"))
    with pytest.raises(GradGraphError) as refused:
        LearnedOptimizer(model, learned_rule("deepsets"))
    assert str(refused.value) == ("LearnedOptimizer: the parameters of Sequential are on several devices "
                                  "['cpu', 'meta']; put the model on one")


def test_the_step_count_is_an_integer_from_the_start():
    """The step count the optimizer keeps (and checkpoints) is ``int64`` before and after a step, as
    ``OptimizerState.step`` says: a float32 count would stop at 2^24 steps.

    Kills ``LearnedOptimizer.__init__`` 28, 31 (the first count made in the default float32)."""
    model = _model()
    opt = LearnedOptimizer(model, learned_rule("deepsets"))
    assert opt.state_dict()["learned"]["step"].dtype == torch.long
    _step(opt, model, 0)
    step = opt.state_dict()["learned"]["step"]
    assert step.dtype == torch.long and step.tolist() == [1]
