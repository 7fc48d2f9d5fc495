"""MLP chains -> GradGraph.

An MLP chain is ``Linear -> act -> Linear -> act -> ... -> Linear [-> act]`` where every
``act`` is a known elementwise activation (or absent). The chain may be an
``nn.Sequential``, nested Sequentials, or any module whose ``forward`` computes such a
chain: the structure is read with :mod:`torch.fx`, so skip connections, shared layers
and unknown operations are detected, not guessed.

Graph layout: the neurons of layer ``l`` (``l = 0`` the inputs) are consecutive nodes in
neuron order; the edges of ``Linear`` ``l`` follow the row-major order of its weight,
so ``edge_param_pos`` of weight ``W[k, j]`` is ``k * d_in + j``.

Cost: the architecture-only part of the graph is built once per architecture and shared
(:mod:`gradgraph.convert.mlp_structure`); each conversion writes only the values
``edge_attr``, ``x`` and the factors ``act``, ``grad``, fresh tensors of every graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from gradgraph.capture import LossFn, Recorder, capture, check_closure_call, check_closure_losses, check_finite
from gradgraph.convert.mlp_structure import (  # re-exported: the cache is part of this converter's API
    SHARED_FIELDS,
    STRUCTURE_CACHE,
    MlpStructure,
    StructureCache,
    build_mlp_graph,
    clear_structure_cache,
    mlp_signature,
)
from gradgraph.convert.registry import _register_builtin
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, GradGraph
from gradgraph.modules import Sine

__all__ = [
    "SHARED_FIELDS",
    "STRUCTURE_CACHE",
    "DenseLayer",
    "MlpStructure",
    "StructureCache",
    "build_mlp_graph",
    "clear_structure_cache",
    "convert_mlp",
    "mlp_layers",
    "mlp_signature",
]

ACTIVATION_MODULES: dict[type[nn.Module], ActivationKind] = {
    nn.Identity: ActivationKind.IDENTITY,
    nn.ReLU: ActivationKind.RELU,
    nn.LeakyReLU: ActivationKind.LEAKY_RELU,
    nn.GELU: ActivationKind.GELU,
    nn.SiLU: ActivationKind.SILU,
    nn.Tanh: ActivationKind.TANH,
    nn.Sigmoid: ActivationKind.SIGMOID,
    Sine: ActivationKind.SINE,
}
_ACTIVATION_FUNCTIONS: dict[Any, ActivationKind] = {
    torch.relu: ActivationKind.RELU,
    F.relu: ActivationKind.RELU,
    F.leaky_relu: ActivationKind.LEAKY_RELU,
    F.gelu: ActivationKind.GELU,
    F.silu: ActivationKind.SILU,
    torch.tanh: ActivationKind.TANH,
    F.tanh: ActivationKind.TANH,
    torch.sigmoid: ActivationKind.SIGMOID,
    F.sigmoid: ActivationKind.SIGMOID,
    torch.sin: ActivationKind.SINE,
}
_ACTIVATION_METHODS: dict[str, ActivationKind] = {
    "relu": ActivationKind.RELU,
    "tanh": ActivationKind.TANH,
    "sigmoid": ActivationKind.SIGMOID,
    "sin": ActivationKind.SINE,
}


@dataclass(frozen=True)
class DenseLayer:
    """One ``Linear`` of an MLP chain and the activation that follows it.

    Attributes:
        name: module path of the ``nn.Linear`` inside the model.
        linear: the module itself.
        activation: the activation applied to its output (``IDENTITY`` if none).
    """

    name: str
    linear: nn.Linear
    activation: ActivationKind


class _Tracer(fx.Tracer):
    # Our activation modules (e.g. Sine) are leaves, so they show up as one call_module.
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, tuple(ACTIVATION_MODULES)) or super().is_leaf_module(module, qualified_name)


def _node_where(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


class _ChainReader:
    """Walks the operations of an MLP chain in order and collects its :class:`DenseLayer` s."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[DenseLayer] = []
        self.pending: dict[str, Any] | None = None  # layer whose activation is still open
        self.seen_linears: set[str] = set()

    def module(self, name: str, module: nn.Module) -> None:
        """The next operation is ``module`` (at path ``name``) applied to the chain's tensor."""
        if isinstance(module, nn.Linear):
            if name in self.seen_linears:
                raise UnsupportedModuleError(name, "Linear", "called more than once (shared weights)")
            self.seen_linears.add(name)
            if self.pending is not None:
                self.layers.append(DenseLayer(**self.pending))
            self.pending = {"name": name, "linear": module, "activation": ActivationKind.IDENTITY}
            return
        if isinstance(module, nn.Dropout):
            if module.training and module.p > 0:
                raise UnsupportedModuleError(
                    name, type(module).__name__, "active dropout changes the function; call model.eval()"
                )
            return
        kind = next((k for cls, k in ACTIVATION_MODULES.items() if type(module) is cls), None)
        if kind is None:
            raise UnsupportedModuleError(name, type(module).__name__, "no MLP converter rule for it")
        self.activation(name, kind)

    def activation(self, where: str, kind: ActivationKind) -> None:
        """The next operation is the elementwise activation ``kind``."""
        if self.pending is None:
            raise UnsupportedModuleError(where, kind.name, "an activation before the first Linear")
        if kind is not ActivationKind.IDENTITY:
            if self.pending["activation"] is not ActivationKind.IDENTITY:
                raise UnsupportedModuleError(where, kind.name, f"a second activation after '{self.pending['name']}'")
            self.pending["activation"] = kind

    def finish(self) -> list[DenseLayer]:
        """The layers read so far; checks that consecutive widths match."""
        layers = self.layers + ([DenseLayer(**self.pending)] if self.pending is not None else [])
        if not layers:
            raise UnsupportedModuleError("", type(self.model).__name__, "contains no nn.Linear")
        for previous, layer in zip(layers, layers[1:]):
            if layer.linear.in_features != previous.linear.out_features:
                raise GradGraphError(
                    f"'{layer.name}' expects {layer.linear.in_features} inputs but '{previous.name}' "
                    f"produces {previous.linear.out_features}"
                )
        return layers


def _sequential_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(path, module)`` of every leaf a plain (nested) ``nn.Sequential`` applies, in order.

    ``None`` unless every container is an ``nn.Sequential`` with its own forward, every leaf
    is a ``Linear``, ``Dropout`` or known activation module, and no module appears twice:
    such a model computes exactly this chain, so tracing it with torch.fx (milliseconds per
    call, most of a small model's conversion) would find the same operations. Anything
    else returns ``None`` and is traced, which also produces the precise error messages.
    """
    leaves = (nn.Linear, nn.Dropout, *ACTIVATION_MODULES)
    chain: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> bool:
        if type(module).forward is not nn.Sequential.forward:
            return False
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                return False
            seen.add(id(child))
            if isinstance(child, nn.Sequential):
                if not walk(child, f"{prefix}{name}."):
                    return False
            elif type(child) in leaves:
                chain.append((f"{prefix}{name}", child))
            else:
                return False
        return True

    return chain if walk(model, "") else None


def mlp_layers(model: nn.Module) -> list[DenseLayer]:
    """Read the chain of ``Linear`` layers and activations that ``model.forward`` computes.

    Raises:
        UnsupportedModuleError: if the forward is not such a chain; the error names the
            module path (or fx node) and type of the first offending operation.
    """
    reader = _ChainReader(model)
    chain = _sequential_chain(model)
    if chain is not None:
        for name, module in chain:
            reader.module(name, module)
        return reader.finish()
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types for untraceable code
        raise UnsupportedModuleError(
            "", type(model).__name__, f"its forward cannot be traced as an MLP chain ({error})"
        ) from error
    modules = dict(model.named_modules())
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModuleError("", type(model).__name__, "forward takes no input")
    current = placeholders[0]
    for node in graph.nodes:
        if node.op in ("placeholder",):
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedModuleError("", type(model).__name__, "forward does not return the chain's output")
            break
        tensor_args = [arg for arg in node.all_input_nodes]
        if tensor_args != [current]:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            raise UnsupportedModuleError(
                _node_where(node),
                str(target),
                "not an MLP chain: this operation combines several tensors or does not follow the "
                "previous layer (skip connections, concatenation and parameter access are unsupported)",
            )
        if node.op == "call_module":
            reader.module(str(node.target), modules[node.target])
        elif node.op == "call_function":
            kind = _ACTIVATION_FUNCTIONS.get(node.target)
            if kind is None and node.target in (F.dropout,):
                raise UnsupportedModuleError(node.name, "dropout", "functional dropout is unsupported")
            if kind is None:
                name = getattr(node.target, "__name__", str(node.target))
                if node.target in (operator.getitem,):
                    name = "getitem (indexing)"
                raise UnsupportedModuleError(node.name, name, "no MLP converter rule for this function")
            reader.activation(node.name, kind)
        elif node.op == "call_method":
            kind = _ACTIVATION_METHODS.get(str(node.target))
            if kind is None:
                raise UnsupportedModuleError(node.name, f"Tensor.{node.target}", "no MLP converter rule for this method")
            reader.activation(node.name, kind)
        else:
            raise UnsupportedModuleError(node.name, node.op, "no MLP converter rule for this operation")
        current = node
    return reader.finish()


def convert_mlp(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> GradGraph:
    """Convert an MLP chain and a batch ``inputs [b, d_in]`` into a GradGraph with ``B = b``.

    See :func:`gradgraph.to_graph` for the arguments.
    """
    layers = mlp_layers(model)
    _check_chain_inputs(layers, inputs)
    recorded = capture(
        model,
        inputs,
        modules=[layer.name for layer in layers],
        targets=targets,
        loss_fn=loss_fn,
        forward_kwargs=forward_kwargs,
    )
    return _chain_graph(model, layers, recorded.values, recorded.grads, recorded.output)


def convert_mlp_closure(model: nn.Module, closure: Callable[[], Tensor]) -> tuple[GradGraph, Tensor]:
    """:func:`gradgraph.convert_closure` for an MLP chain: hooks record the one forward the
    closure runs; the closure's losses ``[b]`` are differentiated once. Returns ``(graph, losses)``."""
    layers = mlp_layers(model)
    recorder = Recorder()
    seen: dict[str, Tensor] = {}

    def take_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        check_closure_call(model, bool(seen), args)
        _check_chain_inputs(layers, args[0])
        seen["input"] = recorder.record("input", args[0].detach().clone().requires_grad_(True), grad=True)
        return (seen["input"], *args[1:]), kwargs

    def take_output(module: nn.Module, args: tuple, output: Any) -> None:
        seen["output"] = output

    handles = recorder.hook_modules(model, [layer.name for layer in layers])
    handles.append(model.register_forward_pre_hook(take_input, with_kwargs=True))
    handles.append(model.register_forward_hook(take_output))
    try:
        with torch.enable_grad():
            losses = closure()
            if not seen:
                raise GradGraphError(f"the closure never called {type(model).__name__}")
            num_datapoints = seen["input"].shape[0]
            check_closure_losses(losses, num_datapoints)
            values, grads = recorder.finish(losses.sum())
    finally:
        for handle in handles:
            handle.remove()
    return _chain_graph(model, layers, values, grads, seen["output"].detach()), losses.detach()


def _check_chain_inputs(layers: list[DenseLayer], inputs: Tensor) -> None:
    first = layers[0]
    if inputs.dim() != 2 or inputs.shape[1] != first.linear.in_features:
        raise GradGraphError(
            f"inputs must have shape [b, {first.linear.in_features}] for '{first.name}' "
            f"({first.linear}), got {list(inputs.shape)}"
        )
    dtype = first.linear.weight.dtype
    if inputs.dtype != dtype:
        raise GradGraphError(f"inputs have dtype {inputs.dtype} but '{first.name}'.weight has {dtype}")
    if inputs.shape[0] == 0:
        raise GradGraphError("inputs hold no datapoint (shape [0, ...])")


def _chain_graph(model: nn.Module, layers: list[DenseLayer], values: dict[str, Tensor], recorded_grads: dict[str, Tensor],
                 output: Tensor) -> GradGraph:
    """The chain's graph from the recorded module inputs/outputs and their gradients."""
    num_datapoints = values["input"].shape[0]
    # Node factors, layer by layer: act is what the neuron emits, grad is dL/du at its
    # pre-activation (for inputs: dL/dx).
    acts = [values["input"]]
    grads = [recorded_grads["input"]]
    for index, layer in enumerate(layers):
        grads.append(recorded_grads[f"{layer.name}:output"])
        if index + 1 < len(layers):
            acts.append(values[f"{layers[index + 1].name}:input"])
        else:
            acts.append(output.reshape(num_datapoints, -1))
    # [b, n_l] pieces -> [N, b]: one cat of the transposed views writes the result
    # contiguous in a single pass (no [b, N] intermediate, no separate transpose copy).
    act, grad = torch.cat([piece.T for piece in acts]), torch.cat([piece.T for piece in grads])
    # One check over all factors: a NaN or Inf anywhere makes the sum non-finite, and a sum
    # costs a fraction of isfinite(). Only then look layer by layer to name the culprit (a
    # sum that merely overflowed passes that exact check).
    if not bool(torch.isfinite(act.sum() + grad.sum())):
        for index, (layer_act, layer_grad) in enumerate(zip(acts, grads)):
            where = "input" if index == 0 else f"'{layers[index - 1].name}' output"
            check_finite(f"activation of the {where} neurons", layer_act)
            check_finite(f"backpropagated signal of the {where} neurons", layer_grad)
    # The recorded pieces are no longer needed; dropping them before the O(P) edge values
    # are allocated lowers the peak memory of the conversion (the dicts are the only holders).
    values.clear()
    recorded_grads.clear()
    del acts, grads
    return build_mlp_graph(model, layers, act, grad)


def _is_plain_chain(model: nn.Module) -> bool:
    # Only plain (nested) nn.Sequential chains take this fast path: recognising them is a walk
    # over the modules. Any other forward, chain or not, is read by the traced converter,
    # which gives a chain the same layout (tested) without torch.fx's cost on non-chains.
    return _sequential_chain(model) is not None


_register_builtin(_is_plain_chain, convert_mlp, name="mlp_chain", closure_converter=convert_mlp_closure)
