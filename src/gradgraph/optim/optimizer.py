"""`LearnedOptimizer`: the GradMetaNet learned optimizer as a ``torch.optim.Optimizer``.

Usage::

    opt = LearnedOptimizer.from_pretrained("mnist1d-mlp", model)
    for x, y in loader:
        loss = opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

The closure runs the model on a batch and returns the per-datapoint losses ``[b]``
**without** calling ``backward``. ``step`` converts the model and that batch with
:func:`gradgraph.convert_closure` (one forward, one backward, the rank-1 factors of every
datapoint's gradient, no per-sample gradient), reads the mean gradient from the graph
(:meth:`GradGraph.mean_grad`), runs the :class:`LearnedUpdate` and writes the new
parameters into the model. It returns the mean loss.

The closure is called once per step, as in any PyTorch training loop: it may draw its batch
itself. Its forward is captured while it runs (:func:`gradgraph.convert_closure`: the traced
converter's cached plan, captured by calling the layers of a plain chain or by the per-op
replay otherwise), and its losses' one backward pass gives the factors.

**Fused path.** On a plain MLP (``nn.Sequential`` of ``Linear`` layers with ReLU / Tanh /
Sigmoid / Identity between them, :func:`gradgraph.optim.fused.mlp_chain`, every parameter
trainable) ``step`` converts nothing: the closure runs on the closed-form forward, one
backward through the loss gives the output's derivative, and the closed-form backward gives
the mean gradient and, for GradMetaNet, the factors written into a graph structure built once
per batch size (:mod:`gradgraph.optim.chain_step`). The update is the general path's
(tested to 1e-10 in float64). A closure that calls such a model with anything but one
``[b, in]`` tensor switches the optimizer to the general path for good (the closure then runs
twice on that one step). Every other model takes the general path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.convert import convert_closure
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.optim.batching import ArchitectureCache
from gradgraph.optim.chain_graphs import ChainGraphs
from gradgraph.optim.chain_step import NotFused, capture_chain_step
from gradgraph.optim.fused import MLPChain, mlp_chain
from gradgraph.optim.meta_model import LearnedUpdate, OptimizerState

__all__ = ["LearnedOptimizer", "graph_from_closure"]

Closure = Callable[[], Tensor]


def graph_from_closure(model: nn.Module, closure: Closure) -> tuple[GradGraph, Tensor]:
    """Convert ``model`` on the batch that ``closure`` runs it on, calling the closure once.

    :func:`gradgraph.convert_closure` with the optimizer's name in its errors.

    Args:
        model: the network ``closure`` calls (once, as ``model(inputs, **kwargs)``).
        closure: ``() -> [b]`` per-datapoint losses, no backward.

    Returns:
        ``(graph, losses)``: the :class:`GradGraph` of that forward + backward and the
        ``[b]`` losses (detached).

    Raises:
        GradGraphError: the closure never calls the model, calls it twice, returns a scalar or
            a tensor of the wrong shape; ``UnsupportedModuleError`` if the model cannot be converted.
    """
    try:
        return convert_closure(model, closure)
    except GradGraphError as error:
        raise GradGraphError(f"LearnedOptimizer.step: {error}") from error


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer whose update is computed by a :class:`LearnedUpdate`.

    Args:
        model: the network to train; every trainable parameter must be one that
            :func:`gradgraph.to_graph` maps (any forward the traced converter follows: MLPs,
            residual and normalised blocks, attention, ``transformers`` models).
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
        # The model's graph has the same structure at every step: collate it once
        # (ArchitectureCache; the graphs share their weight blocks in GradGraph), not at every step.
        self._architecture = ArchitectureCache()
        #: the fused path's chain (module docstring); ``None``: the general path.
        self.chain: MLPChain | None = mlp_chain(model)
        if self.chain is not None and [name for name, _ in self.named] != [n for n, _ in model.named_parameters()]:
            self.chain = None  # a frozen parameter: the update covers only the trainable ones
        self._chain_graphs: ChainGraphs | None = None

    @classmethod
    def from_pretrained(cls, name: str, model: nn.Module) -> "LearnedOptimizer":
        """A learned optimizer with a meta-model shipped inside the package.

        Args:
            name: one of :func:`gradgraph.optim.pretrained_names`. For MLPs use
                ``"mnist1d-mlp"`` (GradMetaNet with a learned step-size schedule, meta-trained on
                an MNIST-1D MLP for 500-step runs: 1.57x fewer steps than tuned Adam there), or
                ``"mnist1d-mlp-sgdm"`` (only a learned SGD-with-momentum schedule: the same step
                count, a step ~1.6x Adam's cost instead of ~18x); for attention models
                ``"charlm-transformer"``. ``-deepsets`` files are the ablation; ``"digits-mlp"``
                (before the schedule) stays loadable.
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
                ``backward``; called once.

        Returns:
            The mean loss over the batch (a scalar tensor, before the update).
        """
        if closure is None:
            raise GradGraphError("LearnedOptimizer.step needs a closure returning the per-datapoint losses [b]")
        if self.chain is not None:
            try:
                return self._fused_step(closure)
            except NotFused:
                self.chain = None  # for good: this model is not called as a plain [b, in] chain
        with torch.enable_grad():
            graph, losses = graph_from_closure(self.model, closure)
        covered = set(graph.param_names)
        missing = [name for name, _ in self.named if name not in covered]
        if missing:
            raise GradGraphError(f"LearnedOptimizer: the graph of {type(self.model).__name__} does not carry {missing}")
        mean_grad = self._architecture.mean_grad(graph)
        params = {name: p.detach()[None] for name, p in self.named}
        grads = {name: mean_grad[name][None].to(p.dtype) for name, p in self.named}
        graphs = self._architecture.batch([graph]) if self.meta_model.needs_graph else None
        new_params, new_state = self.meta_model(params, grads, self._state(), graphs, graph)
        self._write(new_params, new_state)
        return losses.mean()

    def _fused_step(self, closure: Closure) -> Tensor:
        """:meth:`step` on a plain chain, without converting the model (module docstring)."""
        assert self.chain is not None
        params = {name: p.detach()[None] for name, p in self.named}
        needs_graph = self.meta_model.needs_graph
        captured = capture_chain_step(self.model, self.chain, params, closure, factors=needs_graph)
        graphs = first = None
        if needs_graph:
            batch = captured.inputs.shape[0]
            if self._chain_graphs is None or not self._chain_graphs.matches(batch, 1):
                # The structure only (its values are not read): any per-datapoint loss will do.
                self._chain_graphs = ChainGraphs.from_model(self.chain, self.model, captured.inputs,
                                                            torch.zeros(batch, device=captured.inputs.device),
                                                            _structure_loss, 1)
            graphs = self._chain_graphs.batch(params, captured.layer_inputs, captured.output, captured.deltas,
                                              captured.input_delta, captured.losses)
            first = self._chain_graphs.template
        new_params, new_state = self.meta_model(params, captured.grads, self._state(), graphs, first)
        self._write(new_params, new_state)
        return captured.losses.mean()

    def _write(self, new_params: dict[str, Tensor], new_state: OptimizerState) -> None:
        """Write the new parameters into the model and keep the new state."""
        for name, p in self.named:
            p.copy_(new_params[name][0])
            slot = self.state[p]
            slot["momentum"] = new_state.momentum[name][0]
            slot["momenta"] = new_state.momenta[name][0]
        self._step = new_state.step
        self._factor_emas = new_state.factor_emas


def _structure_loss(output: Tensor, targets: Tensor) -> Tensor:
    """``[b]``: a per-datapoint loss for converting a chain once for its graph's structure."""
    return output.sum(dim=-1) + 0 * targets
