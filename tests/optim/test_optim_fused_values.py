"""The closed-form fused MLP (``optim/fused.py``) against autograd and against what torch says about hooks,
in float64; its refusals with their messages in full.

Written for the survivors of the mutation run of ``optim/fused.py`` (issue 31; docs/mutation.md, run
optim 7): each test names the mutants it kills, each checked with ``MUTANT_UNDER_TEST`` in
``.mutation/optim/mutants/``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from gradgraph.errors import GradGraphError
from gradgraph.optim.fused import chain_forward_backward, has_hooks, mlp_chain

DOUBLE = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _noop(*args):
    return None


GLOBAL_HOOKS = {
    "forward": module_globals.register_module_forward_hook,
    "forward pre": module_globals.register_module_forward_pre_hook,
    "backward": module_globals.register_module_full_backward_hook,
    "backward pre": module_globals.register_module_full_backward_pre_hook,
}
MODULE_HOOKS = {
    "forward": nn.Module.register_forward_hook,
    "forward pre": nn.Module.register_forward_pre_hook,
    "backward": nn.Module.register_full_backward_hook,
    "backward pre": nn.Module.register_full_backward_pre_hook,
}


@pytest.mark.parametrize("kind", list(GLOBAL_HOOKS))
def test_each_kind_of_global_hook_alone_is_seen(kind):
    """Each of torch's four global module hooks, registered alone (and removed after), makes ``has_hooks``
    true; with none it is false.

    Kills ``has_hooks`` 1, 2, 3 (an ``or`` of the global hooks made ``and``: one alone not seen) and 4
    (``False`` returned when one is registered)."""
    model = _model()
    assert has_hooks(model) is False
    handle = GLOBAL_HOOKS[kind](_noop)
    try:
        assert has_hooks(model) is True
    finally:
        handle.remove()
    assert has_hooks(model) is False


@pytest.mark.parametrize("kind", list(MODULE_HOOKS))
def test_each_kind_of_module_hook_alone_is_seen(kind):
    """Each of the four hooks of a module, on the chain's last layer alone, makes ``has_hooks`` true.

    Kills ``has_hooks`` 6, 7 (an ``or`` of a module's hooks made ``and``)."""
    model = _model()
    MODULE_HOOKS[kind](model[2], _noop)
    assert has_hooks(model) is True
    assert has_hooks(_model()) is False


def test_targets_with_trailing_axes_are_passed_whole_to_the_loss():
    """Regression targets ``[P, b, 3]`` and a per-datapoint squared error: losses and mean gradients equal
    autograd's on each particle's network.

    Kills ``output_delta`` 18, 20 (the targets reshaped without their trailing axes)."""
    model = _model()
    chain = mlp_chain(model)
    generator = torch.Generator().manual_seed(1)
    params = {name: p.detach()[None] + 0.2 * torch.randn(2, *p.shape, generator=generator, dtype=DOUBLE)
              for name, p in model.named_parameters()}
    inputs = torch.randn(2, 6, 5, generator=generator, dtype=DOUBLE)
    targets = torch.randn(2, 6, 3, generator=generator, dtype=DOUBLE)

    def loss_fn(output, target):
        return (output - target).square().sum(dim=-1)

    losses, grads, _, _ = chain_forward_backward(chain, params, inputs, targets, loss_fn)
    for particle in range(2):
        own = {name: value[particle].clone().requires_grad_(True) for name, value in params.items()}
        output = torch.func.functional_call(model, own, (inputs[particle],))
        expected = loss_fn(output, targets[particle])
        torch.testing.assert_close(losses[particle], expected.detach(), rtol=1e-12, atol=1e-14)
        mean_grads = torch.autograd.grad(expected.mean(), list(own.values()))
        for name, value in zip(own, mean_grads):
            torch.testing.assert_close(grads[name][particle], value, rtol=1e-12, atol=1e-14)


def test_a_loss_that_is_not_per_datapoint_is_refused_in_full():
    """A loss function that returns the mean: refused naming the expected ``[P·b]``.

    Kills ``output_delta`` 23 (the message ``None``), 24 (``P / b`` for ``P · b``), 25 (``tuple(None)``)."""
    model = _model()
    params = {name: p.detach()[None].expand(2, *p.shape) for name, p in model.named_parameters()}
    inputs = torch.randn(2, 6, 5, dtype=DOUBLE)
    targets = torch.randint(0, 3, (2, 6))
    with pytest.raises(GradGraphError) as refused:
        chain_forward_backward(mlp_chain(model), params, inputs, targets, lambda out, t: F.cross_entropy(out, t))
    assert str(refused.value) == "fused MLP: loss_fn must return one loss per datapoint [12], got shape ()"


def test_the_input_delta_is_computed_only_when_asked_and_is_autograd_s():
    """``chain_backward`` leaves the input derivative out by default (``None``); asked for, it is
    ``∂ℓ_b/∂x_b`` of every datapoint's own loss, autograd's.

    Kills ``chain_backward`` 1 (``input_grad=True`` by default) and 54 (the input delta computed
    whatever ``input_grad`` says)."""
    from gradgraph.optim.fused import chain_backward, chain_forward, output_delta

    model = _model()
    chain = mlp_chain(model)
    params = {name: p.detach()[None] for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(1, 6, 5, generator=generator, dtype=DOUBLE)
    targets = torch.randint(0, 3, (1, 6), generator=generator)

    def loss_fn(output, target):
        return F.cross_entropy(output, target, reduction="none")

    output, pre, layer_inputs = chain_forward(chain, params, inputs)
    _, delta = output_delta(output, targets, loss_fn)
    _, _, none = chain_backward(chain, params, pre, layer_inputs, delta)
    assert none is None
    _, _, input_delta = chain_backward(chain, params, pre, layer_inputs, delta, input_grad=True)
    x = inputs[0].clone().requires_grad_(True)
    expected = torch.autograd.grad(loss_fn(model(x), targets[0]).sum(), x)[0]  # row b: ∂ℓ_b/∂x_b
    torch.testing.assert_close(input_delta[0], expected, rtol=1e-12, atol=1e-14)


def test_inputs_that_are_not_three_dimensional_are_refused_in_full():
    """Kills ``_check`` 3, 4 (the message ``None``, ``tuple(None)``)."""
    from gradgraph.optim.fused import chain_forward

    model = _model()
    params = {name: p.detach()[None] for name, p in model.named_parameters()}
    with pytest.raises(GradGraphError) as refused:
        chain_forward(mlp_chain(model), params, torch.randn(6, 5, dtype=DOUBLE))
    assert str(refused.value) == "fused MLP: inputs must be [P, b, features], got shape (6, 5)"


@pytest.mark.parametrize("case", ["particles", "unstacked"])
def test_parameters_that_do_not_stack_with_the_inputs_are_refused_in_full(case):
    """Parameters of one particle with inputs of two, and parameters not stacked at all (``[out, in]``, with
    as many particles as outputs): refused naming the first weight's shape and the one expected.

    Kills ``_check`` 7, 8 (an ``or`` made ``and``: another particle count refused only with other
    features too, or only with a weight that is not 3-D; the ``bmm`` then fails inside) and 17 (the
    message ``None``), 18-21 (the weight's name, its shape, ``P`` or ``in`` read from the wrong place)."""
    from gradgraph.optim.fused import chain_forward

    model = _model()
    if case == "particles":
        params = {name: p.detach()[None] for name, p in model.named_parameters()}
        inputs, shape = torch.randn(2, 6, 5, dtype=DOUBLE), "(1, 4, 5)"
    else:
        params = {name: p.detach() for name, p in model.named_parameters()}
        inputs, shape = torch.randn(4, 6, 5, dtype=DOUBLE), "(4, 5)"
    with pytest.raises(GradGraphError) as refused:
        chain_forward(mlp_chain(model), params, inputs)
    assert str(refused.value) == (f"fused MLP: weight '0.weight' has shape {shape}, "
                                  f"expected [P={inputs.shape[0]}, out, in=5]")


def test_mlp_chain_takes_a_single_linear_and_refuses_forwards_set_on_instances():
    """A ``Sequential`` of one ``Linear`` is a chain (no activation), a layer without bias has ``None`` for
    its bias; a chain whose ``Sequential`` or one of
    whose layers has a ``forward`` set on the instance is not (the closed form would skip that forward).

    Kills ``mlp_chain`` 1 (``and``: the ``Sequential``'s own instance forward refused only when empty),
    7, 8 (that check's key misspelt), 12 (``len(model) == 1`` refused for ``== 0``), 17, 18 (a layer's
    instance-forward check's key misspelt), 30 (a bias named for a ``Linear`` without one)."""
    from gradgraph.optim.fused import MLPChain

    assert mlp_chain(nn.Sequential(nn.Linear(3, 2))) == MLPChain(("0.weight",), ("0.bias",), ())
    assert mlp_chain(nn.Sequential()) is None
    no_bias = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 2))
    assert mlp_chain(no_bias) == MLPChain(("0.weight", "2.weight"), (None, "2.bias"), (nn.ReLU,))
    model = _model()
    assert mlp_chain(model) == MLPChain(("0.weight", "2.weight"), ("0.bias", "2.bias"), (nn.Tanh,))
    model.forward = lambda x: 2 * nn.Sequential.forward(model, x)
    assert mlp_chain(model) is None
    layered = _model()
    layered[2].forward = lambda x: 2 * nn.Linear.forward(layered[2], x)
    assert mlp_chain(layered) is None
