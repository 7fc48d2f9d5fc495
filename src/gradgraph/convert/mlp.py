"""MLP chains: reading their layers (the structure the symmetry actions act on).

An MLP chain is ``Linear -> act -> Linear -> act -> ... -> Linear [-> act]`` where every
``act`` is a known elementwise activation (or absent). The chain may be an
``nn.Sequential``, nested Sequentials, or any module whose ``forward`` computes such a
chain: :func:`mlp_layers` reads the structure from a trace of the forward (the same reader
as every conversion), so skip connections, shared layers and unknown operations are
detected, not guessed. The symmetry actions (:mod:`gradgraph.symmetry`) read chains with it.

Conversion needs none of this: :func:`gradgraph.to_graph` traces a chain like any model, which
gives it the MLP layout below, and records a plain ``nn.Sequential`` chain's tensors by calling
its leaves (:mod:`gradgraph.convert.chain`) once the architecture's plan is cached.

Graph layout: the neurons of layer ``l`` (``l = 0`` the inputs) are consecutive nodes in
neuron order; the edges of ``Linear`` ``l`` follow the row-major order of its weight,
so ``edge_param_pos`` of weight ``W[k, j]`` is ``k * d_in + j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradgraph.convert.activations import ACTIVATION_MODULES
from gradgraph.convert.plan import clear_structure_cache  # its former home, still imported from here
from gradgraph.convert.trace import TraceResult, trace_model
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind, EdgeKind

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


def mlp_layers(model: nn.Module) -> list[DenseLayer]:
    """Read the chain of ``Linear`` layers and activations that ``model.forward`` computes.

    The forward is traced (:func:`gradgraph.convert.trace.trace_model`, the reader of every
    conversion) on one all-zero datapoint with the first ``nn.Linear``'s ``in_features``, and
    the :class:`~gradgraph.convert.trace.TraceResult` must be a chain: the input, then one
    neuron set per ``nn.Linear``, each reading the one before and nothing else (no residual
    sum, gate, norm, concatenation or attention) as ``nn.Linear`` reads it (``W[k, j]`` from
    neuron ``j`` to neuron ``k``, every entry once: no weight transposed, reordered or in part,
    no neurons reordered or left out between two layers), each ``Linear`` called once, at most
    one named activation after each (its label), no other elementwise op on hidden neurons.

    Returns:
        One :class:`DenseLayer` per ``nn.Linear``, in the order the forward applies them.

    Raises:
        UnsupportedModuleError: if the forward is not such a chain; the error names the
            module path (or the op) and type of the first offending part.
    """
    name = type(model).__name__
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UnsupportedModuleError("", name, "contains no nn.Linear")
    weight = linears[0].weight
    probe = torch.zeros(1, linears[0].in_features, dtype=weight.dtype, device=weight.device)
    try:
        trace = trace_model(model, probe, model)
    except UnsupportedModuleError:
        raise  # the trace's refusal names the op, the module and the line (active dropout, an unknown op)
    except GradGraphError as error:  # the forward failed on the probe: it reads no [b, in_features] input
        raise UnsupportedModuleError("", name, f"its forward cannot be read as an MLP chain ({error})") from error
    return _chain_layers(trace, model)


def _chain_layers(trace: TraceResult, model: nn.Module) -> list[DenseLayer]:
    """The :class:`DenseLayer` s of a traced MLP chain (see :func:`mlp_layers`)."""
    modules = dict(model.named_modules())
    name = type(model).__name__
    sets = trace.sets
    if trace.ties or trace.attention or any(neuron_set.created_by not in ("input", "affine") for neuron_set in sets):
        joined = next((s for s in sets if s.created_by not in ("input", "affine")), None)
        raise UnsupportedModuleError(
            joined.origin.strip() if joined is not None else "", name,
            "not an MLP chain: a skip connection, gate, norm, concatenation or attention combines neurons "
            "(skip connections, concatenation and parameter access are unsupported)")
    if not sets or sets[0].created_by != "input" or len(trace.edges) != len(sets) - 1:
        raise UnsupportedModuleError("", name, "not an MLP chain: its forward does not apply nn.Linear layers to "
                                     "its input one after the other")
    layers: list[DenseLayer] = []
    for index, (src, dst, kind, param, positions, _) in enumerate(trace.edges):
        before, after = sets[index], sets[index + 1]
        weight = trace.param_names[param] if param >= 0 else ""
        path = weight.rpartition(".")[0]
        module = modules.get(path)
        if (kind != EdgeKind.LINEAR or not isinstance(module, nn.Linear) or weight != _join(path, "weight")
                or not bool(before.holds(src).all()) or not bool(after.holds(dst).all())):
            raise UnsupportedModuleError(after.origin.strip(), name, "not an MLP chain: this op is not an nn.Linear "
                                         "applied to the previous layer's output")
        if any(layer.name == path for layer in layers):
            raise UnsupportedModuleError(path, "Linear", "called more than once (shared weights)")
        # the symmetry actions permute the weight's rows and columns as nn.Linear reads them: W[k, j] is the edge
        # from neuron j of the previous layer to neuron k, every entry once (W.t(), W.flip(0), W[:, :3] or
        # h.flip(1) between the layers is refused)
        if (positions is None or before.size != module.in_features or after.size != module.out_features
                or positions.numel() != module.weight.numel()
                or not torch.equal(positions, (dst - after.first) * module.in_features + (src - before.first))):
            raise UnsupportedModuleError(path, "Linear", "it does not read the previous layer as nn.Linear does "
                                         "(W[k, j] from neuron j to neuron k, every entry once): its weight "
                                         "transposed, reordered or in part, or the neurons reordered between layers")
        bias = trace.param_names[after.bias_param] if after.bias_param >= 0 else None
        if bias != (None if module.bias is None else _join(path, "bias")):
            raise UnsupportedModuleError(path, "Linear", "its output gets a bias other than its own")
        if getattr(after, "elementwise_ops", 0):
            raise UnsupportedModuleError(path, "Linear", "its output goes through an elementwise op other than one "
                                         "named activation (a second activation, a scale, a custom function)")
        layers.append(DenseLayer(path, module, after.activation))
    if len(sets) - 1 not in trace.output_sets:
        raise UnsupportedModuleError("", name, "forward does not return the chain's output")
    for previous, layer in zip(layers, layers[1:]):
        if layer.linear.in_features != previous.linear.out_features:  # a trace cannot get here; kept as a guard
            raise GradGraphError(f"'{layer.name}' expects {layer.linear.in_features} inputs but '{previous.name}' "
                                 f"produces {previous.linear.out_features}")
    return layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
