"""One forward and one backward pass that record the rank-1 gradient factors.

For a linear map ``u = W a + b`` applied to datapoint ``i``, the gradient of that
datapoint's loss ``L_i`` is ``dL_i/dW = g_i a_iᵀ`` with ``g_i = dL_i/du_i``. Because the
datapoints of a batch do not interact (no batch norm, no cross-batch ops), one backward
pass of ``sum_i L_i`` yields every ``g_i`` at once: ``d(sum_j L_j)/du_i = dL_i/du_i``.
So we record ``a`` in the forward pass, ask autograd for the gradient of the summed
objective with respect to the recorded ``u`` tensors, and never form a per-sample
gradient of a weight matrix.

Two objectives, chosen by ``loss_fn``:

* **loss mode** (``loss_fn`` given): ``loss_fn(output, targets)`` must return the
  unreduced loss of every datapoint, shape ``[b]`` (e.g. ``nn.MSELoss(reduction="none")``
  followed by a sum over features, or ``nn.CrossEntropyLoss(reduction="none")``). The
  recorded signal is ``g_i = dL_i/du``, the gradient of datapoint ``i``'s own loss, not
  scaled by ``1/b``.
* **output mode** (``loss_fn=None``): the model must return one scalar per datapoint,
  shape ``[b]`` or ``[b, 1]``; the recorded signal is ``g_i = df(x_i)/du``, the gradient
  of the network output itself. This is what the Fisher information of a regression
  model is built from: ``F = E_x[∇f(x) ∇f(x)ᵀ]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError, NonFiniteFactorError
from gradgraph.value_reads import refuse_value_reads

__all__ = ["Capture", "Recorder", "capture", "per_datapoint_objective"]

LossFn = Callable[[Tensor, Any], Tensor]


@dataclass
class Capture:
    """What one forward + backward pass recorded.

    Attributes:
        values: ``{name: Tensor}`` recorded tensors (detached), shapes as recorded.
        grads: ``{name: Tensor}`` gradient of the summed objective with respect to each
            recorded tensor that asked for one; same shape as ``values[name]``.
        output: the model output, detached.
        objective: ``[b]`` per-datapoint loss (loss mode) or output (output mode).
    """

    values: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    output: Tensor | None = None
    objective: Tensor | None = None


class Recorder:
    """Collects named tensors during a forward pass; the backward pass differentiates them.

    A converter calls :meth:`record` on every tensor whose value (activation) or
    gradient (backpropagated signal) it needs, from module hooks or from a functional
    re-implementation of a block.
    """

    def __init__(self) -> None:
        self._live: dict[str, Tensor] = {}
        self._want_grad: list[str] = []

    def record(self, name: str, tensor: Tensor, *, grad: bool = False) -> Tensor:
        """Record ``tensor`` under ``name``; with ``grad=True`` also its gradient.

        Returns ``tensor`` unchanged so that it can be used inline.

        Raises:
            GradGraphError: if ``name`` was recorded already in this pass (a module
                called twice, i.e. shared weights, which a converter must reject).
        """
        if name in self._live:
            raise GradGraphError(
                f"'{name}' was recorded twice in one forward pass; modules that are called "
                "more than once (shared weights) are not supported"
            )
        if grad and not tensor.requires_grad:
            raise GradGraphError(f"'{name}' does not depend on the input; cannot take its gradient")
        self._live[name] = tensor
        if grad:
            self._want_grad.append(name)
        return tensor

    def hook_modules(self, model: nn.Module, names: Sequence[str]) -> list[Any]:
        """Forward hooks that record ``'<name>:input'`` and ``'<name>:output'`` (with grad).

        Returns the hook handles; call ``.remove()`` on each when done.
        """
        modules = dict(model.named_modules())
        handles = []
        for name in names:

            def hook(module: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
                if not isinstance(output, Tensor):
                    raise GradGraphError(f"module '{name}' returned {type(output).__name__}, expected a Tensor")
                self.record(f"{name}:input", args[0])
                self.record(f"{name}:output", output, grad=True)

            handles.append(modules[name].register_forward_hook(hook))
        return handles

    def finish(self, objective_total: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run the single backward pass; returns ``(values, grads)``, both detached."""
        grads = {}
        if self._want_grad:
            tensors = [self._live[name] for name in self._want_grad]
            results = torch.autograd.grad(objective_total, tensors, allow_unused=True)
            for name, tensor, result in zip(self._want_grad, tensors, results):
                grads[name] = torch.zeros_like(tensor) if result is None else result.detach()
        values = {name: tensor.detach() for name, tensor in self._live.items()}
        return values, grads


def per_datapoint_objective(output: Tensor, targets: Any, loss_fn: LossFn | None, num_datapoints: int) -> Tensor:
    """The ``[b]`` per-datapoint objective whose sum is differentiated (see module doc)."""
    if loss_fn is None:
        if targets is not None:
            raise GradGraphError("targets were given but no loss_fn; pass loss_fn or drop targets")
        if output.dim() == 2 and output.shape[1] == 1:
            output = output[:, 0]
        if output.shape != (num_datapoints,):
            raise GradGraphError(
                "output mode (loss_fn=None) needs one scalar output per datapoint, shape "
                f"[{num_datapoints}] or [{num_datapoints}, 1]; the model returned {list(output.shape)}. "
                "Pass a per-datapoint loss_fn instead."
            )
        return output
    with refuse_value_reads(output, "loss_fn", num_datapoints):
        losses = loss_fn(output, targets)
    if not isinstance(losses, Tensor) or losses.shape != (num_datapoints,):
        shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise GradGraphError(
            f"loss_fn must return one unreduced loss per datapoint, shape [{num_datapoints}]; got {shape}. "
            "Use reduction='none' and reduce any feature dimensions yourself."
        )
    return losses


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise :class:`NonFiniteFactorError` naming ``name`` if ``tensor`` has NaN or Inf."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteFactorError(
            f"{name} has {bad} non-finite value(s) (shape {list(tensor.shape)}); "
            "check the inputs, the loss and the model's weights"
        )


def check_materialised(model: nn.Module, caller: str) -> None:
    """Raise unless ``model``'s parameters hold values (none on the ``meta`` device)."""
    if any(p.is_meta for p in model.parameters()):
        raise GradGraphError(
            f"{caller}: {type(model).__name__} has parameters on the 'meta' device (shapes without values); "
            "materialise and load its weights first (model.to_empty(device=...) + load_state_dict)"
        )


def closure_inputs(model: nn.Module, called_before: bool, args: tuple,
                   kwargs: Mapping[str, Any]) -> tuple[Tensor, tuple, dict[str, Any]]:
    """The input tensor of a closure's call of ``model``, and the call's other arguments.

    The input is the call's first positional argument or, when there is none, the keyword
    argument named as the first parameter of the class's ``forward`` (``model(input_ids=x)``,
    the usual call of a ``transformers`` model); passing it either way is the same call.

    Args:
        model: the network the closure calls.
        called_before: whether the closure called ``model`` already (a second call is refused).
        args, kwargs: the call's positional and keyword arguments.

    Returns:
        ``(inputs, rest, kwargs)``: the ``[b, ...]`` input and the arguments after it.

    Raises:
        GradGraphError: a second call, or no input tensor in either place.
    """
    name = type(model).__name__
    if called_before:
        raise GradGraphError(f"the closure called {name} twice; gradgraph converts one forward per closure call")
    rest_kwargs = dict(kwargs)
    if args:  # the usual call: no signature to read on every optimizer step
        inputs, rest = args[0], args[1:]
    else:
        by_name = _first_parameter_name(model)
        inputs, rest = rest_kwargs.pop(by_name, None) if by_name is not None else None, ()
    if not isinstance(inputs, Tensor):
        by_name = _first_parameter_name(model)
        hint = f" (positionally or as {by_name}=...)" if by_name is not None else ""
        raise GradGraphError(
            f"the closure must call {name} with the input tensor as its first argument{hint}; got positional "
            f"{[type(arg).__name__ for arg in args]} and keywords {sorted(kwargs)}")
    return inputs, rest, rest_kwargs


def mapping_inputs(model: nn.Module, inputs: Mapping[str, Any], forward_kwargs: Mapping[str, Any],
                   caller: str) -> tuple[Tensor, dict[str, Any]]:
    """A mapping of inputs (a tokenizer's ``BatchEncoding``) as the call ``model(**inputs)``.

    Returns:
        ``(input, kwargs)``: the entry named as the first parameter of ``type(model).forward``
        (``input_ids``, ``pixel_values`` ...) and the other entries plus ``forward_kwargs``.

    Raises:
        GradGraphError: no entry has that name, or an entry is also in ``forward_kwargs``.
    """
    name = _first_parameter_name(model)
    if name is None or name not in inputs or not isinstance(inputs[name], Tensor):
        raise GradGraphError(
            f"{caller}: inputs is a mapping with keys {sorted(inputs)}, and {type(model).__name__}.forward's first "
            f"parameter is {name!r}; pass the input tensor as inputs and the rest as forward_kwargs, e.g. "
            f"{caller}(model, batch['input_ids'], ..., forward_kwargs={{'attention_mask': batch['attention_mask']}})")
    both = sorted(set(inputs) & set(forward_kwargs))
    if both:
        raise GradGraphError(f"{caller}: {both} given both in the inputs mapping and in forward_kwargs")
    rest = {key: value for key, value in inputs.items() if key != name}
    return inputs[name], {**rest, **forward_kwargs}


def _first_parameter_name(model: nn.Module) -> str | None:
    """The name of the first parameter of ``type(model).forward`` that a call may pass by name."""
    try:
        parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):  # a forward without a signature (a C extension's)
        return None
    if parameters and parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return parameters[0].name
    return None


def check_closure_losses(losses: Any, num_datapoints: int) -> None:
    """Raise unless a closure returned the per-datapoint losses ``[b]``."""
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != num_datapoints:
        got = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise GradGraphError(
            f"the closure must return the per-datapoint losses, shape [{num_datapoints}] (e.g. "
            f"cross_entropy(..., reduction='none')), without calling backward; it returned {got}")


def capture(
    model: nn.Module,
    inputs: Tensor,
    *,
    modules: Sequence[str] = (),
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward: Callable[[Tensor, Recorder], Tensor] | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Capture:
    """Record activations and backpropagated signals in one forward + backward pass.

    Args:
        model: the network. Its parameters are not modified and their ``.grad`` is
            left untouched (autograd is asked only for gradients of recorded tensors).
        inputs: ``[b, ...]`` a batch of ``b`` datapoints.
        modules: names (from ``model.named_modules()``) of modules whose input and output
            to record with forward hooks, as ``'<name>:input'`` / ``'<name>:output'``;
            the output's gradient is recorded too.
        targets: passed to ``loss_fn``.
        loss_fn: per-datapoint loss (see the module docstring); ``None`` for output mode.
        forward: optional ``forward(inputs, recorder) -> output`` that replaces
            ``model(inputs)``, for converters that re-implement a block functionally to
            reach tensors no hook can see. It must compute the same function.
        forward_kwargs: extra keyword arguments for ``model.forward`` (e.g. masks).

    Returns:
        A :class:`Capture`; ``values['input']`` is the input and ``grads['input']`` its
        gradient ``dL/dx``.
    """
    recorder = Recorder()
    x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
    if x.requires_grad:
        recorder.record("input", x, grad=True)
    handles = recorder.hook_modules(model, modules)
    try:
        with torch.enable_grad():
            if forward is not None:
                output = forward(x, recorder)
            else:
                output = model(x, **dict(forward_kwargs or {}))
            if not isinstance(output, Tensor):
                raise GradGraphError(f"the model returned {type(output).__name__}; expected a Tensor")
            objective = per_datapoint_objective(output, targets, loss_fn, inputs.shape[0])
            values, grads = recorder.finish(objective.sum())
    finally:
        for handle in handles:
            handle.remove()
    return Capture(values=values, grads=grads, output=output.detach(), objective=objective.detach())
