"""MLP chains -> GradGraph.

An MLP chain is ``Linear -> act -> Linear -> act -> ... -> Linear [-> act]`` where every
``act`` is a known elementwise activation (or absent). The chain may be an
``nn.Sequential``, nested Sequentials, or any module whose ``forward`` computes such a
chain: the structure is read with :mod:`torch.fx`, so skip connections, shared layers
and unknown operations are detected, not guessed.

Graph layout: the neurons of layer ``l`` (``l = 0`` the inputs) are consecutive nodes in
neuron order; the edges of ``Linear`` ``l`` follow the row-major order of its weight,
so ``edge_param_pos`` of weight ``W[k, j]`` is ``k * d_in + j``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from gradgraph.capture import LossFn, capture, check_finite
from gradgraph.convert.registry import register_converter
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import NUM_NODE_KINDS, ActivationKind, EdgeKind, GradGraph, NodeKind
from gradgraph.modules import Sine
from gradgraph.graph import NUM_EDGE_KINDS

__all__ = ["DenseLayer", "mlp_layers", "convert_mlp"]

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


def _one_hot(kind: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(kind, num_classes).to(dtype)


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

    recorded = capture(
        model,
        inputs,
        modules=[layer.name for layer in layers],
        targets=targets,
        loss_fn=loss_fn,
        forward_kwargs=forward_kwargs,
    )
    num_datapoints = inputs.shape[0]
    # Node factors, layer by layer: act is what the neuron emits, grad is dL/du at its
    # pre-activation (for inputs: dL/dx).
    acts = [recorded.values["input"]]
    grads = [recorded.grads["input"]]
    for index, layer in enumerate(layers):
        grads.append(recorded.grads[f"{layer.name}:output"])
        if index + 1 < len(layers):
            acts.append(recorded.values[f"{layers[index + 1].name}:input"])
        else:
            acts.append(recorded.output.reshape(num_datapoints, -1))
    act, grad = torch.cat(acts, 1).T.contiguous(), torch.cat(grads, 1).T.contiguous()
    # One check over all factors; only on failure look layer by layer to name the culprit.
    if not (torch.isfinite(act).all() and torch.isfinite(grad).all()):
        for index, (layer_act, layer_grad) in enumerate(zip(acts, grads)):
            where = "input" if index == 0 else f"'{layers[index - 1].name}' output"
            check_finite(f"activation of the {where} neurons", layer_act)
            check_finite(f"backpropagated signal of the {where} neurons", layer_grad)
    return build_mlp_graph(model, layers, act, grad)


def build_mlp_graph(model: nn.Module, layers: list[DenseLayer], act: Tensor, grad: Tensor) -> GradGraph:
    """Assemble the graph of an MLP chain from its node factors ``act``, ``grad [N, B]``."""
    sizes = [layers[0].linear.in_features] + [layer.linear.out_features for layer in layers]
    depth = len(layers)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    num_nodes = offsets[-1]
    dtype = act.dtype
    param_of = {id(p): name for name, p in model.named_parameters()}
    param_names: list[str] = []
    param_shapes: list[list[int]] = []

    def add_param(param: nn.Parameter) -> int:
        param_names.append(param_of[id(param)])
        param_shapes.append(list(param.shape))
        return len(param_names) - 1

    layer_index = torch.cat([torch.full((size,), index, dtype=torch.long) for index, size in enumerate(sizes)])
    node_kind = torch.full((num_nodes,), int(NodeKind.HIDDEN), dtype=torch.long)
    node_kind[: sizes[0]] = int(NodeKind.INPUT)
    node_kind[offsets[depth] :] = int(NodeKind.OUTPUT)
    activation = torch.full((num_nodes,), int(ActivationKind.IDENTITY), dtype=torch.long)
    perm_group = torch.full((num_nodes,), -1, dtype=torch.long)
    position = torch.cat([torch.arange(size) for size in sizes])
    bias = torch.zeros(num_nodes, dtype=dtype)
    node_param = torch.full((num_nodes,), -1, dtype=torch.long)

    # The edge tensors are O(P) and dominate the conversion of large models, so they are
    # preallocated and written layer by layer, without temporaries of their own size.
    num_edges = sum(d_in * d_out for d_in, d_out in zip(sizes, sizes[1:]))
    edge_index = torch.empty((2, num_edges), dtype=torch.long)
    edge_attr = torch.zeros((num_edges, 1 + NUM_EDGE_KINDS), dtype=dtype)
    edge_attr[:, 1 + int(EdgeKind.LINEAR)] = 1
    edge_param = torch.empty(num_edges, dtype=torch.long)
    edge_param_pos = torch.empty(num_edges, dtype=torch.long)
    start = 0
    for index, layer in enumerate(layers, start=1):
        d_in, d_out = sizes[index - 1], sizes[index]
        nodes = slice(offsets[index], offsets[index + 1])
        activation[nodes] = int(layer.activation)
        if index < depth:
            perm_group[nodes] = index - 1
        edges = slice(start, start + d_in * d_out)
        start += d_in * d_out
        # edge j -> k holds W[k, j]; edges follow the weight's row-major order k * d_in + j
        edge_index[0, edges].view(d_out, d_in).copy_(offsets[index - 1] + torch.arange(d_in))
        edge_index[1, edges].view(d_out, d_in).copy_((offsets[index] + torch.arange(d_out))[:, None])
        edge_attr[edges, 0] = layer.linear.weight.detach().reshape(-1).to(dtype)
        edge_param[edges] = add_param(layer.linear.weight)
        edge_param_pos[edges] = torch.arange(d_in * d_out)
        if layer.linear.bias is not None:
            bias[nodes] = layer.linear.bias.detach().to(dtype)
            node_param[nodes] = add_param(layer.linear.bias)

    edge_kind = torch.full((num_edges,), int(EdgeKind.LINEAR), dtype=torch.long)
    return GradGraph(
        x=torch.cat([bias[:, None], _one_hot(node_kind, NUM_NODE_KINDS, dtype)], dim=1),
        edge_index=edge_index,
        edge_attr=edge_attr,
        act=act,
        grad=grad,
        layer=layer_index,
        node_kind=node_kind,
        edge_kind=edge_kind,
        activation=activation,
        perm_group=perm_group,
        # every hidden layer is one block with one tie (see gradgraph.symmetry.permutation)
        perm_block=torch.where(perm_group >= 0, 0, -1),
        perm_tie=torch.where(perm_group >= 0, 0, -1),
        position=position,
        node_param=node_param,
        node_param_pos=torch.where(node_param >= 0, position, torch.full_like(position, -1)),
        edge_param=edge_param,
        edge_param_pos=edge_param_pos,
        component_sample=torch.arange(act.shape[1]),
        num_datapoints=act.shape[1],
        param_names=param_names,
        param_shapes=param_shapes,
    )


def _is_anything(model: nn.Module) -> bool:
    return True


register_converter(_is_anything, convert_mlp, name="mlp_chain")
