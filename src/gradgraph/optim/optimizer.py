"""`LearnedOptimizer`: the GradMetaNet learned optimizer as a ``torch.optim.Optimizer``.

Usage::

    opt = LearnedOptimizer.from_pretrained("digits-mlp", model)
    for x, y in loader:
        loss = opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

The closure runs the model on a batch and returns the per-datapoint losses ``[b]``
**without** calling ``backward``. ``step`` converts the model and that batch with
:func:`gradgraph.to_graph` (one forward, one backward, the rank-1 factors of every
datapoint's gradient, no per-sample gradient), reads the mean gradient from the graph
(:meth:`GradGraph.mean_grad`), runs the :class:`LearnedUpdate` and writes the new
parameters into the model. It returns the mean loss.

How the closure's forward becomes the captured one: ``to_graph`` needs the model's input
tensor and a per-datapoint loss function. ``step`` calls the closure once with the model's
``forward`` replaced by a probe that records the input and stops (no computation), then
calls ``to_graph(model, input, loss_fn=replay)``, where ``replay(output)`` calls the closure
again with ``forward`` replaced by "return ``output``", so the closure's own loss code
turns the converter's output into the losses. The closure is therefore called twice
(LBFGS-style) and must be deterministic: draw the batch outside it, not inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.convert import to_graph
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.optim.meta_model import LearnedUpdate, OptimizerState

__all__ = ["LearnedOptimizer", "graph_from_closure"]

Closure = Callable[[], Tensor]


class _Probe(Exception):
    """Raised by the probe forward to stop the closure once the model's input is known."""


def _call_with_forward(model: nn.Module, forward: Callable[..., Any], closure: Closure) -> Any:
    """Call ``closure`` while ``model.forward`` is ``forward``; restores the model's own."""
    had_own = "forward" in vars(model)
    own = vars(model).get("forward")
    model.forward = forward  # type: ignore[method-assign]
    try:
        return closure()
    finally:
        if had_own:
            model.forward = own  # type: ignore[method-assign]
        else:
            del model.forward


def graph_from_closure(model: nn.Module, closure: Closure) -> tuple[GradGraph, Tensor]:
    """Convert ``model`` on the batch that ``closure`` runs it on.

    Args:
        model: the network ``closure`` calls (once, as ``model(inputs, **kwargs)``).
        closure: ``() -> [b]`` per-datapoint losses, no backward.

    Returns:
        ``(graph, losses)``: the :class:`GradGraph` of that forward + backward and the
        ``[b]`` losses (detached).

    Raises:
        GradGraphError: the closure never calls the model, returns a scalar or a tensor of
            the wrong shape, or the model cannot be converted (``UnsupportedModuleError``).
    """
    seen: dict[str, Any] = {}

    def probe(*args: Any, **kwargs: Any) -> Tensor:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Probe

    try:
        _call_with_forward(model, probe, closure)
    except _Probe:
        pass
    if "args" not in seen:
        raise GradGraphError("LearnedOptimizer.step: the closure never called the model passed to the optimizer")
    if len(seen["args"]) != 1 or not isinstance(seen["args"][0], Tensor):
        raise GradGraphError(
            "LearnedOptimizer.step: the closure must call the model with one input tensor "
            f"(keyword arguments are allowed); got {len(seen['args'])} positional argument(s)"
        )
    inputs = seen["args"][0]
    num_datapoints = inputs.shape[0]
    recorded: dict[str, Tensor] = {}

    def replay(output: Tensor, _targets: Any) -> Tensor:
        losses = _call_with_forward(model, lambda *a, **k: output, closure)
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != num_datapoints:
            got = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise GradGraphError(
                f"LearnedOptimizer.step: the closure must return the per-datapoint losses, shape [{num_datapoints}] "
                f"(e.g. cross_entropy(..., reduction='none')), without calling backward; it returned {got}"
            )
        recorded["losses"] = losses
        return losses

    graph = to_graph(model, inputs, None, replay, forward_kwargs=seen["kwargs"])
    return graph, recorded["losses"].detach()


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer whose update is computed by a :class:`LearnedUpdate`.

    Args:
        model: the network to train; every trainable parameter must be one that
            :func:`gradgraph.to_graph` maps (MLP chains, stock attention wrappers).
        meta_model: the trained update rule (its weights are not changed by ``step``);
            it is moved to the device of ``model``'s parameters (``nn.Module.to``, in place).

    Everything the optimizer creates (state, step count, factor EMAs) lives on the device
    of ``model``'s parameters, so a model on a GPU is trained on that GPU.
    ``state_dict()`` holds the momenta, the factor EMAs and the step count; loading it
    into a fresh optimizer on the same model resumes bit-identically (on any device).
    """

    def __init__(self, model: nn.Module, meta_model: LearnedUpdate) -> None:
        if not isinstance(model, nn.Module):
            raise GradGraphError(f"LearnedOptimizer: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(meta_model, LearnedUpdate):
            raise GradGraphError(f"LearnedOptimizer: meta_model must be a LearnedUpdate, got {type(meta_model).__name__}")
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise GradGraphError(f"LearnedOptimizer: {type(model).__name__} has no trainable parameter")
        super().__init__([p for _, p in self.named], {})
        self.model = model
        self.device = self.named[0][1].device
        if {p.device for _, p in self.named} != {self.device}:
            raise GradGraphError(
                f"LearnedOptimizer: the parameters of {type(model).__name__} are on several devices "
                f"{sorted(str(d) for d in {p.device for _, p in self.named})}; put the model on one"
            )
        self.meta_model = meta_model.to(self.device)
        self._step = torch.zeros(1, dtype=torch.long, device=self.device)
        self._factor_emas: Tensor | None = None

    @classmethod
    def from_pretrained(cls, name: str, model: nn.Module) -> "LearnedOptimizer":
        """A learned optimizer with a meta-model shipped inside the package.

        Args:
            name: one of :func:`gradgraph.optim.pretrained_names` (e.g. ``"digits-mlp"``).
            model: the network to train.
        """
        from gradgraph.optim.hub import load_pretrained

        return cls(model, load_pretrained(name))

    # ---------------------------------------------------------------- state
    def _state(self) -> OptimizerState:
        momentum, momenta = {}, {}
        for name, p in self.named:
            slot = self.state[p]
            if not slot:
                slot["momentum"] = torch.zeros_like(p)
                slot["momenta"] = p.new_zeros(*p.shape, len(self.meta_model.momentum_decays) + 1)
            momentum[name], momenta[name] = slot["momentum"][None], slot["momenta"][None]
        return OptimizerState(step=self._step, momentum=momentum, momenta=momenta, factor_emas=self._factor_emas)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (per-parameter momenta) plus the step count and factor EMAs."""
        state = super().state_dict()
        state["learned"] = {"step": self._step.clone(),
                            "factor_emas": None if self._factor_emas is None else self._factor_emas.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        state_dict = dict(state_dict)
        learned = state_dict.pop("learned", None)
        if learned is None:
            raise GradGraphError("LearnedOptimizer.load_state_dict: no 'learned' entry; not a LearnedOptimizer state")
        super().load_state_dict(state_dict)
        self._step = learned["step"].to(self.device, copy=True)
        self._factor_emas = None if learned["factor_emas"] is None else learned["factor_emas"].to(self.device, copy=True)

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Capture the batch's factors, compute the learned update, apply it.

        Args:
            closure: ``() -> [b]`` per-datapoint losses of the model on one batch, without
                ``backward`` (see the module docstring; called twice, so deterministic).

        Returns:
            The mean loss over the batch (a scalar tensor, before the update).
        """
        if closure is None:
            raise GradGraphError("LearnedOptimizer.step needs a closure returning the per-datapoint losses [b]")
        with torch.enable_grad():
            graph, losses = graph_from_closure(self.model, closure)
        covered = set(graph.param_names)
        missing = [name for name, _ in self.named if name not in covered]
        if missing:
            raise GradGraphError(f"LearnedOptimizer: the graph of {type(self.model).__name__} does not carry {missing}")
        mean_grad = graph.mean_grad()
        params = {name: p.detach()[None] for name, p in self.named}
        grads = {name: mean_grad[name][None].to(p.dtype) for name, p in self.named}
        graphs = Batch.from_data_list([graph]) if self.meta_model.needs_graph else None
        new_params, new_state = self.meta_model(params, grads, self._state(), graphs, graph)
        for name, p in self.named:
            p.copy_(new_params[name][0])
            slot = self.state[p]
            slot["momentum"] = new_state.momentum[name][0]
            slot["momenta"] = new_state.momenta[name][0]
        self._step = new_state.step
        self._factor_emas = new_state.factor_emas
        return losses.mean()
