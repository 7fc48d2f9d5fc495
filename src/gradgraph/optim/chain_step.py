"""The learned optimizer's step on a plain MLP without converting the model (the fused user path).

:class:`~gradgraph.optim.LearnedOptimizer` gets a closure that runs the model on a batch and
returns the per-datapoint losses. On a plain chain (:func:`gradgraph.optim.fused.mlp_chain`)
:func:`capture_chain_step` runs that closure once with the model's ``forward`` replaced, for
that one call, by the closed-form forward of :mod:`gradgraph.optim.fused` (the same function
of the inputs and the parameters, computed without autograd). Its output is handed to the
closure as a leaf tensor, so the one backward pass goes through the loss only and gives
``∂ℓ_b/∂output``; the closed-form backward then gives every datapoint's factors and the mean
gradient — what ``to_graph`` records, without the capture, the graph assembly or the
parameters' autograd graph. For the GradMetaNet variant the values go into a graph structure
converted once per batch size (:class:`~gradgraph.optim.chain_graphs.ChainGraphs`).

The step is the general path's (tested to 1e-10 in float64, tests/optim/test_optim_fused_step.py).
Only a call ``model(inputs)`` with ``inputs [b, in]`` is fused; any other call (other input
shapes, extra arguments) raises :class:`NotFused` before the model runs, and the optimizer
then takes the general path for good (calling the closure again on that step); so does a model
with a hook (before the closure runs: the closed form calls no module, so no hook would run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.capture import check_closure_losses, closure_inputs
from gradgraph.errors import GradGraphError, NonFiniteFactorError
from gradgraph.optim.fused import MLPChain, chain_backward, chain_forward, has_hooks

__all__ = ["ChainStep", "NotFused", "capture_chain_step"]


class NotFused(Exception):
    """The closure called the model in a way the fused path does not cover (e.g. inputs ``[b, T, in]``)."""


@dataclass
class ChainStep:
    """What one fused step captured (``P = 1`` leading axis, as the update rule takes it).

    Attributes:
        losses: ``[1, b]`` per-datapoint losses.
        grads: ``{name: [1, *shape]}`` mean gradients.
        inputs: ``[b, in]`` the batch's inputs.
        layer_inputs, output, deltas, input_delta: the factors (:class:`~gradgraph.optim.chain_graphs.ChainGraphs`),
            ``deltas`` and ``input_delta`` for every datapoint's own loss; ``None`` unless asked for.
    """

    losses: Tensor
    grads: dict[str, Tensor]
    inputs: Tensor
    layer_inputs: list[Tensor] | None = None
    output: Tensor | None = None
    deltas: list[Tensor] | None = None
    input_delta: Tensor | None = None


def capture_chain_step(model: nn.Module, chain: MLPChain, params: dict[str, Tensor],
                       closure: Callable[[], Tensor], factors: bool = False) -> ChainStep:
    """Run ``closure`` once on the closed-form forward of ``model`` and differentiate (module docstring).

    Args:
        model: the ``nn.Sequential`` chain ``closure`` calls (once, as ``model(inputs)``).
        chain: its :class:`~gradgraph.optim.fused.MLPChain`.
        params: ``{name: [1, *shape]}`` its parameters (detached).
        closure: ``() -> [b]`` per-datapoint losses, no backward.
        factors: also return the per-datapoint factors (the GradMetaNet variant reads them).

    Raises:
        NotFused: the closure called the model with something other than one ``[b, in]`` tensor.
        GradGraphError: the closure never calls the model, calls it twice, or returns something
            other than ``[b]`` losses that depend on the model's output.
        NonFiniteFactorError: a loss, gradient or factor is NaN or Inf.
    """
    if "forward" in vars(model) or has_hooks(model):
        raise NotFused("the model's forward is an instance attribute, or a hook would not run")
    recorded: dict[str, object] = {}
    in_features = params[chain.weights[0]].shape[-1]

    def forward(*args: object, **kwargs: object) -> Tensor:
        try:  # the general path's checks and messages
            inputs, rest, rest_kwargs = closure_inputs(model, "output" in recorded, args, kwargs)
        except GradGraphError as error:
            raise GradGraphError(f"LearnedOptimizer.step: {error}") from error
        if rest or rest_kwargs or inputs.dim() != 2 or inputs.shape[1] != in_features:
            raise NotFused("the closure calls the model with other arguments than inputs [b, in]")
        with torch.no_grad():
            output, pre, layer_inputs = chain_forward(chain, params, inputs.detach()[None])
        leaf = output[0].detach().requires_grad_(True)
        recorded.update(inputs=inputs.detach(), output=output, pre=pre, layer_inputs=layer_inputs, leaf=leaf)
        return leaf

    model.forward = forward  # this one call only: the instance attribute shadows the class's forward
    try:
        with torch.enable_grad():
            losses = closure()
    finally:
        del model.forward
    if "output" not in recorded:
        raise GradGraphError(f"LearnedOptimizer.step: the closure never called {type(model).__name__}")
    batch = recorded["inputs"].shape[0]
    try:
        check_closure_losses(losses, batch)
    except GradGraphError as error:
        raise GradGraphError(f"LearnedOptimizer.step: {error}") from error
    if not losses.requires_grad:
        raise GradGraphError("LearnedOptimizer.step: the closure's losses do not depend on the model's output")
    with torch.enable_grad():
        (delta,) = torch.autograd.grad(losses.sum(), recorded["leaf"])
    sums, deltas, input_delta = chain_backward(chain, params, recorded["pre"], recorded["layer_inputs"],
                                               delta[None], input_grad=factors)
    grads = {name: value / batch for name, value in sums.items()}
    losses = losses.detach()[None]
    checked = [losses, *grads.values(), *(deltas if factors else [])]
    # One read-back: the largest magnitude of every tensor (NaN propagates through amax).
    peaks = [value.abs().amax() for value in checked if value.numel()]
    if peaks and not bool(torch.isfinite(torch.stack(peaks)).all()):
        raise NonFiniteFactorError("LearnedOptimizer.step: a loss, gradient or factor of the batch has non-finite "
                                   "values (NaN or Inf); check the inputs, the loss and the model's weights")
    if not factors:
        return ChainStep(losses, grads, recorded["inputs"])
    return ChainStep(losses, grads, recorded["inputs"], recorded["layer_inputs"], recorded["output"], deltas,
                     input_delta)
