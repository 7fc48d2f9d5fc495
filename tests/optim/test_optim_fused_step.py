"""LearnedOptimizer's fused step on plain MLPs equals the general (to_graph) step; other models keep the general path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph.optim.optimizer as optimizer_module
from gradgraph import GradGraphError
from gradgraph.errors import NonFiniteFactorError
from gradgraph.optim import LearnedOptimizer, LearnedUpdate, MetaModelConfig

VARIANTS = {
    "gradmetanet": dict(use_gradmetanet=True, residual_adam=True),
    "gradmetanet-max-components": dict(use_gradmetanet=True, residual_adam=True, max_components=3,
                                      normalize_embedding=False),
    "deepsets": dict(use_gradmetanet=False, residual_adam=True),
    "sgdm": dict(use_gradmetanet=False, learned_term=False),
}


def _meta(variant: str) -> LearnedUpdate:
    torch.manual_seed(1)
    meta = LearnedUpdate(MetaModelConfig(**VARIANTS[variant])).double()
    if meta.mlp is not None:
        with torch.no_grad():  # a learned term that is not zero
            meta.mlp[-1].weight.normal_(0, 0.1)
    return meta


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches(count: int, size: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 5, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=generator)) for _ in range(count)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_fused_step_equals_the_general_step(variant, monkeypatch):
    """Same parameters, momenta, factor EMAs and losses to 1e-10 in float64 over 4 steps, and the
    fused optimizer never converts the model (fails if the fused path falls back or differs)."""
    fast_model, general_model = _model(), _model()
    fast = LearnedOptimizer(fast_model, _meta(variant))
    general = LearnedOptimizer(general_model, _meta(variant))
    general.chain = None  # the general path: convert_closure at every step
    assert fast.chain is not None
    converted = []
    real = optimizer_module.graph_from_closure
    monkeypatch.setattr(optimizer_module, "graph_from_closure",
                        lambda model, closure: converted.append(model) or real(model, closure))
    for x, y in _batches(4):
        fast_loss = fast.step(lambda: _loss(fast_model, x, y))
        general_loss = general.step(lambda: _loss(general_model, x, y))
        torch.testing.assert_close(fast_loss, general_loss, rtol=1e-12, atol=1e-14)
    assert converted == [general_model] * 4 and fast.chain is not None
    for (name, p), q in zip(fast_model.named_parameters(), general_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    fast_state, general_state = fast.state_dict(), general.state_dict()
    for key, slot in fast_state["state"].items():
        for field, value in slot.items():
            torch.testing.assert_close(value, general_state["state"][key][field], rtol=1e-10, atol=1e-12)
    if fast.meta_model.needs_graph:
        torch.testing.assert_close(fast_state["learned"]["factor_emas"], general_state["learned"]["factor_emas"],
                                   rtol=1e-10, atol=1e-12)


def test_a_batch_of_another_size_rebuilds_the_structure():
    fast_model, general_model = _model(), _model()
    fast, general = LearnedOptimizer(fast_model, _meta("gradmetanet")), LearnedOptimizer(general_model, _meta("gradmetanet"))
    general.chain = None
    for x, y in _batches(2, size=7) + _batches(2, size=4):
        fast.step(lambda: _loss(fast_model, x, y))
        general.step(lambda: _loss(general_model, x, y))
    for p, q in zip(fast_model.parameters(), general_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_other_models_keep_the_general_path():
    meta = _meta("deepsets")
    assert LearnedOptimizer(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 2)), meta).chain is None
    assert LearnedOptimizer(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), meta).chain is None
    frozen = _model()
    frozen[0].bias.requires_grad_(False)
    assert LearnedOptimizer(frozen, meta).chain is None


def test_a_sequential_with_its_own_forward_or_a_hook_takes_the_general_path():
    """The closed form would silently skip a subclass's forward or a hook: neither is fused."""

    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    meta = _meta("deepsets")
    assert LearnedOptimizer(Doubled(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), meta).chain is None

    class MyLinear(nn.Linear):
        pass

    assert LearnedOptimizer(nn.Sequential(MyLinear(3, 3), nn.ReLU(), nn.Linear(3, 2)), meta).chain is None
    model = _model()
    opt = LearnedOptimizer(model, meta)
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x, y = _batches(1)[0]
    opt.step(lambda: _loss(model, x, y))
    assert opt.chain is None and seen == [(7, 6)]  # the general path: the hook ran once


def test_a_chain_called_on_token_inputs_falls_back_to_the_general_path():
    """Inputs [b, T, in] are not fused: the optimizer switches to the general path and the step
    is the general one (the closure runs again on that step)."""
    fast_model, general_model = _model(), _model()
    fast, general = LearnedOptimizer(fast_model, _meta("deepsets")), LearnedOptimizer(general_model, _meta("deepsets"))
    general.chain = None
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    calls = []

    def closure(model):
        calls.append(model)
        return F.cross_entropy(model(x).mean(dim=1), y, reduction="none")

    fast.step(lambda: closure(fast_model))
    general.step(lambda: closure(general_model))
    assert fast.chain is None and calls == [fast_model, fast_model, general_model]
    for p, q in zip(fast_model.parameters(), general_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_the_fused_step_refuses_bad_closures_as_the_general_one():
    model = _model()
    opt = LearnedOptimizer(model, _meta("deepsets"))
    x, y = _batches(1)[0]
    with pytest.raises(GradGraphError, match="twice"):
        opt.step(lambda: _loss(model, x, y) + _loss(model, x, y))
    with pytest.raises(GradGraphError, match="per-datapoint losses"):
        opt.step(lambda: _loss(model, x, y).mean())
    with pytest.raises(GradGraphError, match="never called Sequential"):
        opt.step(lambda: torch.zeros(7, dtype=torch.float64))
    assert "forward" not in vars(model)  # the closed-form forward is gone after every step
    torch.testing.assert_close(model(x), _model()(x))  # and no failed step moved the parameters


@pytest.mark.parametrize("variant", ["gradmetanet", "deepsets"])
def test_non_finite_factors_are_refused_as_on_the_general_path(variant):
    """A NaN in the batch: both paths refuse it naming non-finite values (the fused one as
    NonFiniteFactorError; the general one re-raises the converter's as a GradGraphError) and
    leave the parameters alone."""
    x, y = _batches(1)[0]
    x = x.clone()
    x[2, 1] = float("nan")
    for fused in (True, False):
        model = _model()
        opt = LearnedOptimizer(model, _meta(variant))
        if not fused:
            opt.chain = None
        with pytest.raises(NonFiniteFactorError if fused else GradGraphError, match="non-finite"):
            opt.step(lambda: _loss(model, x, y))
        assert all(torch.isfinite(p).all() for p in model.parameters())
