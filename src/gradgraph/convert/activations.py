"""The one table of named activations: which modules, functions and ``Tensor`` methods compute
each :class:`~gradgraph.ActivationKind`.

Every reader of a model takes its labels from here: the trace labels a neuron set by the first
named activation applied to it (:data:`gradgraph.convert.trace.ops.ACTIVATION_OPS`, by op
name), a plain chain's leaves are its modules (:mod:`gradgraph.convert.chain`), and the
structure readers the symmetry actions use (:mod:`gradgraph.convert.mlp`,
:mod:`gradgraph.convert.attention`) map modules, functions and methods. The label decides
which scale symmetries may act on the neurons, so a function is listed only under the kind it
really is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.graph import ActivationKind
from gradgraph.modules import Sine

__all__ = ["ACTIVATIONS", "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS", "ACTIVATION_MODULES", "Activation",
           "ONE_OP_MODULES"]


@dataclass(frozen=True)
class Activation:
    """One named activation and the ways torch code writes it.

    Attributes:
        kind: the label of the neurons it acts on.
        modules: module types whose forward is exactly this activation.
        functions: torch functions that compute it (``F.relu``, ``torch.relu``).
        methods: ``Tensor`` method names that compute it (``"relu"`` for ``x.relu()``).
    """

    kind: ActivationKind
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()


#: Every named activation gradgraph labels, with the modules, functions and methods writing it.
ACTIVATIONS: tuple[Activation, ...] = (
    Activation(ActivationKind.IDENTITY, (nn.Identity,)),
    Activation(ActivationKind.RELU, (nn.ReLU,), (torch.relu, F.relu), ("relu",)),
    Activation(ActivationKind.LEAKY_RELU, (nn.LeakyReLU,), (F.leaky_relu,)),
    Activation(ActivationKind.GELU, (nn.GELU,), (F.gelu,)),
    Activation(ActivationKind.SILU, (nn.SiLU,), (F.silu,)),
    Activation(ActivationKind.TANH, (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",)),
    Activation(ActivationKind.SIGMOID, (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    Activation(ActivationKind.SINE, (Sine,), (torch.sin,), ("sin",)),
)

#: Activation modules (exact types) and the label of the neurons they act on.
ACTIVATION_MODULES: dict[type[nn.Module], ActivationKind] = {
    module: activation.kind for activation in ACTIVATIONS for module in activation.modules}
#: Activation functions and their labels.
ACTIVATION_FUNCTIONS: dict[Callable[..., Any], ActivationKind] = {
    function: activation.kind for activation in ACTIVATIONS for function in activation.functions}
#: ``Tensor`` method names of activations and their labels.
ACTIVATION_METHODS: dict[str, ActivationKind] = {
    method: activation.kind for activation in ACTIVATIONS for method in activation.methods}

#: Modules the trace treats as one elementwise op from the start (as
#: :func:`gradgraph.convert.register_elementwise` would): gradgraph's own ``Sine`` computes
#: ``sin(w0 * u)``, two ops that would otherwise label its neurons OTHER, not SINE.
ONE_OP_MODULES: dict[type[nn.Module], ActivationKind] = {Sine: ActivationKind.SINE}
