"""Closed-form batched forward and backward of plain MLPs, for many inner runs at once.

Meta-training steps ``P`` copies ("particles") of one small network. The general path
converts every particle's network on its batch with :func:`gradgraph.to_graph` — one
capture, one backward and a graph per particle per step — although the update rules without
GradMetaNet (the SGDM and DeepSets variants) only read the mean gradient. For a plain chain
``Linear → activation → … → Linear`` (:func:`mlp_chain`) the forward and backward of all
particles are a few batched matmuls over stacked parameters ``{name: [P, *shape]}``:

.. math::
    z_l = h_{l-1} W_l^\\top + b_l,\\quad h_l = σ(z_l),\\qquad
    δ_L = \\frac{1}{b}\\frac{∂ \\sum_i \\ell_i}{∂ z_L},\\quad
    δ_{l} = (δ_{l+1} W_{l+1}) ⊙ σ'(z_l),\\quad
    \\nabla W_l = δ_l^\\top h_{l-1},\\quad \\nabla b_l = \\textstyle\\sum_i δ_{l,i}

with ``h_0`` the inputs and ``ℓ_i`` the per-datapoint losses. The rows of ``h_{l-1}`` and
``δ_l`` are exactly the rank-1 factors of every example's gradient that the graph carries
(``act`` and ``grad``); :func:`chain_forward_backward` returns them too. Only the derivative
of the loss with respect to the network's output goes through autograd, so any per-datapoint
loss works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError

__all__ = ["ACTIVATIONS", "MLPChain", "chain_backward", "chain_forward", "chain_forward_backward", "has_hooks",
           "mlp_chain", "output_delta"]

#: elementwise activations of a plain chain: ``(σ, σ' as a function of (z, σ(z)))``.
ACTIVATIONS: dict[type[nn.Module], tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    nn.ReLU: (torch.relu, lambda z, h: (z > 0).to(z.dtype)),
    nn.Tanh: (torch.tanh, lambda z, h: 1 - h.square()),
    nn.Sigmoid: (torch.sigmoid, lambda z, h: h * (1 - h)),
    nn.Identity: (lambda z: z, lambda z, h: torch.ones_like(z)),
}


@dataclass(frozen=True)
class MLPChain:
    """A plain ``Linear → activation → … → Linear`` network.

    Attributes:
        weights: parameter names of the ``L`` weights ``[out, in]``, first layer first.
        biases: parameter names of their biases (``None``: a layer without bias).
        activations: the ``L − 1`` activation classes between them (keys of :data:`ACTIVATIONS`).
    """

    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    activations: tuple[type[nn.Module], ...]


def mlp_chain(model: nn.Module) -> MLPChain | None:
    """The :class:`MLPChain` of ``model`` if it is an ``nn.Sequential`` (``Sequential``'s own
    ``forward``) of ``nn.Linear`` layers with one activation of :data:`ACTIVATIONS` between
    consecutive ones (and none after the last), the types exactly these, no ``forward`` set on an
    instance; ``None`` otherwise (the caller keeps the general path). Hooks are not checked here
    (they can be added later): :func:`has_hooks` says whether a call would run any.
    """
    if (not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward
            or "forward" in vars(model) or len(model) == 0):
        return None  # a subclass with its own forward computes something else
    modules = list(model.named_children())
    weights, biases, activations = [], [], []
    for position, (name, module) in enumerate(modules):
        if "forward" in vars(module):
            return None
        if position % 2 == 0:
            if type(module) is not nn.Linear:  # exactly: a subclass may compute something else
                return None
            weights.append(f"{name}.weight")
            biases.append(f"{name}.bias" if module.bias is not None else None)
        elif type(module) in ACTIVATIONS:
            activations.append(type(module))
        else:
            return None
    if len(modules) % 2 == 0:  # ends with an activation: not the chain the closed form covers
        return None
    return MLPChain(tuple(weights), tuple(biases), tuple(activations))


def has_hooks(model: nn.Module) -> bool:
    """Whether calling ``model`` or one of its children runs a hook (its own or a global one):
    the closed form computes the chain without calling its modules, so their hooks would not run."""
    from torch.nn.modules import module as module_globals

    if (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
            or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


def _check(chain: MLPChain, params: dict[str, Tensor], inputs: Tensor) -> None:
    if inputs.dim() != 3:
        raise GradGraphError(f"fused MLP: inputs must be [P, b, features], got shape {tuple(inputs.shape)}")
    first = params[chain.weights[0]]
    if first.dim() != 3 or first.shape[0] != inputs.shape[0] or first.shape[2] != inputs.shape[2]:
        raise GradGraphError(f"fused MLP: weight {chain.weights[0]!r} has shape {tuple(first.shape)}, expected "
                             f"[P={inputs.shape[0]}, out, in={inputs.shape[2]}]")


def chain_forward(chain: MLPChain, params: dict[str, Tensor], inputs: Tensor
                  ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(output [P, b, out], pre-activations z_l [P, b, n_l], layer inputs h_{l-1} [P, b, n_{l-1}])``.

    Args:
        chain: the network's :class:`MLPChain`.
        params: ``{name: [P, *shape]}`` stacked parameters (may carry autograd history).
        inputs: ``[P, b, in]`` one batch per particle.
    """
    _check(chain, params, inputs)
    hidden, pre, layer_inputs = inputs, [], []
    for index, (weight, bias) in enumerate(zip(chain.weights, chain.biases)):
        layer_inputs.append(hidden)
        z = torch.bmm(hidden, params[weight].transpose(1, 2))
        if bias is not None:
            z = z + params[bias][:, None, :]
        pre.append(z)
        hidden = ACTIVATIONS[chain.activations[index]][0](z) if index < len(chain.activations) else z
    return hidden, pre, layer_inputs


def chain_backward(chain: MLPChain, params: dict[str, Tensor], pre: list[Tensor], layer_inputs: list[Tensor],
                   delta: Tensor, input_grad: bool = False
                   ) -> tuple[dict[str, Tensor], list[Tensor], Tensor | None]:
    """The closed-form backward of :func:`chain_forward` from ``delta = ∂ℓ_i/∂output`` (module docstring).

    Args:
        chain, params: as :func:`chain_forward` (``params`` used as data).
        pre, layer_inputs: what :func:`chain_forward` returned for these ``params``.
        delta: ``[P, b, out]`` the derivative of the per-datapoint losses (or of their mean:
            every result is linear in ``delta``) with respect to the network's output.
        input_grad: also return the derivative with respect to the inputs.

    Returns:
        ``(gradients {name: [P, *shape]}, deltas, input delta)``: ``deltas[l]`` ``[P, b, n_out]``
        the derivative with respect to linear layer ``l``'s outputs, the input delta
        ``[P, b, in]`` (``None`` unless ``input_grad``). Gradients are sums over the batch of
        the per-datapoint outer products (divide ``delta`` by ``b`` for the mean loss's).
    """
    grads: dict[str, Tensor] = {}
    deltas: list[Tensor] = [delta] * len(chain.weights)
    for index in range(len(chain.weights) - 1, -1, -1):
        deltas[index] = delta
        grads[chain.weights[index]] = torch.bmm(delta.transpose(1, 2), layer_inputs[index])
        if chain.biases[index] is not None:
            grads[chain.biases[index]] = delta.sum(dim=1)
        if index > 0:
            z = pre[index - 1]
            activation, derivative = ACTIVATIONS[chain.activations[index - 1]]
            delta = torch.bmm(delta, params[chain.weights[index]]) * derivative(z, activation(z))
    input_delta = torch.bmm(delta, params[chain.weights[0]]) if input_grad else None
    return grads, deltas, input_delta


def output_delta(output: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
                 ) -> tuple[Tensor, Tensor]:
    """``(losses [P, b], ∂ℓ_i/∂output [P, b, out])`` of ``P`` particles' outputs ``[P, b, out]``.

    Only the loss goes through autograd (``loss_fn``: ``(output [n, out], targets [n, ...]) -> [n]``).
    """
    num_particles, batch = output.shape[:2]
    with torch.enable_grad():
        output = output.detach().requires_grad_(True)
        losses = loss_fn(output.reshape(num_particles * batch, *output.shape[2:]),
                         targets.reshape(num_particles * batch, *targets.shape[2:]))
        if losses.shape != (num_particles * batch,):
            raise GradGraphError(f"fused MLP: loss_fn must return one loss per datapoint [{num_particles * batch}], "
                                 f"got shape {tuple(losses.shape)}")
        (delta,) = torch.autograd.grad(losses.sum(), output)
    return losses.detach().reshape(num_particles, batch), delta


def chain_forward_backward(chain: MLPChain, params: dict[str, Tensor], inputs: Tensor, targets: Tensor,
                           loss_fn: Callable[[Tensor, Tensor], Tensor]
                           ) -> tuple[Tensor, dict[str, Tensor], list[Tensor], list[Tensor]]:
    """Per-datapoint losses, mean gradients and rank-1 factors of ``P`` particles (module docstring).

    Args:
        chain: the network's :class:`MLPChain`.
        params: ``{name: [P, *shape]}`` (used as data: the result carries no autograd history).
        inputs: ``[P, b, in]``.
        targets: ``[P, b, ...]``.
        loss_fn: ``(output [n, out], targets [n, ...]) -> [n]`` per-datapoint losses.

    Returns:
        ``(losses [P, b], mean gradients {name: [P, *shape]}, acts, grads)`` with ``acts[l]``
        ``[P, b, n_in]`` the inputs of linear layer ``l`` and ``grads[l]`` ``[P, b, n_out]`` the
        derivative of the *mean* loss with respect to its outputs, per example.
    """
    params = {name: value.detach() for name, value in params.items()}
    with torch.no_grad():
        output, pre, layer_inputs = chain_forward(chain, params, inputs)
    losses, delta = output_delta(output, targets, loss_fn)
    grads, deltas, _ = chain_backward(chain, params, pre, layer_inputs, delta / inputs.shape[1])
    return losses, grads, layer_inputs, deltas
