"""MLP chains: reading their layers (the structure the symmetry actions act on).

An MLP chain is ``Linear -> act -> Linear -> act -> ... -> Linear [-> act]`` where every
``act`` is a known elementwise activation (or absent). The chain may be an
``nn.Sequential``, nested Sequentials, or any module whose ``forward`` computes such a
chain: :func:`mlp_layers` reads the structure with :mod:`torch.fx` (plain Sequentials by a
walk over their modules), so skip connections, shared layers and unknown operations are
detected, not guessed. The symmetry actions (:mod:`gradgraph.symmetry`) read chains with it.

Conversion needs none of this: :func:`gradgraph.to_graph` traces a chain like any model, which
gives it the MLP layout below, and records a plain ``nn.Sequential`` chain's tensors by calling
its leaves (:mod:`gradgraph.convert.chain`) once the architecture's plan is cached.

Graph layout: the neurons of layer ``l`` (``l = 0`` the inputs) are consecutive nodes in
neuron order; the edges of ``Linear`` ``l`` follow the row-major order of its weight,
so ``edge_param_pos`` of weight ``W[k, j]`` is ``k * d_in + j``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from gradgraph.convert.activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES
from gradgraph.convert.chain import plain_chain
from gradgraph.convert.plan import clear_structure_cache  # its former home, still imported from here
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind

__all__ = [
    "ACTIVATION_MODULES",
    "DenseLayer",
    "clear_structure_cache",
    "mlp_layers",
]

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


class _ChainTracer(fx.Tracer):
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


def mlp_layers(model: nn.Module) -> list[DenseLayer]:
    """Read the chain of ``Linear`` layers and activations that ``model.forward`` computes.

    Raises:
        UnsupportedModuleError: if the forward is not such a chain; the error names the
            module path (or fx node) and type of the first offending operation.
    """
    reader = _ChainReader(model)
    chain = plain_chain(model)
    if chain is not None:
        for name, module in chain:
            reader.module(name, module)
        return reader.finish()
    try:
        graph = _ChainTracer().trace(model)
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
            kind = ACTIVATION_FUNCTIONS.get(node.target)
            if kind is None and node.target in (F.dropout,):
                raise UnsupportedModuleError(node.name, "dropout", "functional dropout is unsupported")
            if kind is None:
                name = getattr(node.target, "__name__", str(node.target))
                if node.target in (operator.getitem,):
                    name = "getitem (indexing)"
                raise UnsupportedModuleError(node.name, name, "no MLP converter rule for this function")
            reader.activation(node.name, kind)
        elif node.op == "call_method":
            kind = ACTIVATION_METHODS.get(str(node.target))
            if kind is None:
                raise UnsupportedModuleError(node.name, f"Tensor.{node.target}", "no MLP converter rule for this method")
            reader.activation(node.name, kind)
        else:
            raise UnsupportedModuleError(node.name, node.op, "no MLP converter rule for this operation")
        current = node
    return reader.finish()
