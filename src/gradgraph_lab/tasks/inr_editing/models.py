"""Models of the INR-editing task: each predicts ``Δθ`` and the edited INR is ``θ + Δθ``.

==================  =======================================================================
``no_edit``         ``Δθ = 0``: the floor every learned model must beat
``weight_space``    a graph metanetwork on the weights alone (GradMetaNet with no
                    component layers = a GMN on the neuron graph: biases on nodes, weights
                    on edges, messages along and against every weight)
``probing``         the same, plus the INR's outputs ``f_θ(x_i)`` at the 64 probe points as
                    64 ordered features of the output neuron (the points are the same for
                    every INR, so their order means the same everywhere)
``gradmetanet``     GradMetaNet on the weights *and* the 64 gradients
                    ``∇θ (f_θ(x_i) − I_edited(x_i))²`` in rank-1 factors (component layers
                    over (neuron × point), pooling, node layers, the component-wise product
                    decoder whose first moment can express the mean gradient exactly)
``gradmetanet_pp``  the same inputs through :class:`~gradgraph.nn.GradMetaNetPlusPlus`
                    (attention across each neuron's points and across neurons, the
                    per-point product decoder); not in the default run (several times
                    GradMetaNet's cost), ``--models gradmetanet_pp`` adds it
``*_sign``          the model wrapped in :class:`~gradgraph.nn.ScaleEquivariant` with the
                    ``"weight"`` rule: canonical signs of the sine neurons in, ``Δθ`` mapped
                    back like ``θ`` (the ScaleGMN analogue: exactly sign-equivariant)
==================  =======================================================================

Every learned model is an :class:`EditNet` (a graph model returning
:class:`~gradgraph.nn.GradMetaNetOutput` with ``Δw [E, 1]``, ``Δb [N, 1]``) inside an
:class:`InrEditor` that builds the graphs of a batch and adds ``Δθ``. Inputs are divided
and outputs multiplied by fixed per-layer root-mean-squares measured on the training INRs —
positive per-layer constants, so they commute with hidden-neuron permutations and sign flips.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.utils import scatter

from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn import GradMetaNetConfig, GradMetaNetOutput, GradMetaNetPlusPlus, ScaleEquivariant
from gradgraph_lab.tasks.inr_editing.data import InrBatch, InrSource
from gradgraph_lab.tasks.models import LAZY_INPUT_WIDTHS, build_gradmetanet, mean_gradient, per_graph_outputs

__all__ = ["BASE_MODELS", "DEFAULT_MODELS", "MODEL_LABELS", "MODEL_NAMES", "EditModelConfig", "EditNet", "FeatureScales", "InrEditor",
           "NoEdit", "build_model", "describe"]

BASE_MODELS = ("weight_space", "probing", "gradmetanet", "gradmetanet_pp")
MODEL_NAMES = ("no_edit", *BASE_MODELS, *(f"{name}_sign" for name in BASE_MODELS))
#: what ``gradgraph inr-edit`` runs without ``--models``
DEFAULT_MODELS = tuple(name for name in MODEL_NAMES if not name.startswith("gradmetanet_pp"))
MODEL_LABELS = {
    "no_edit": "no edit (θ unchanged)",
    "weight_space": "weight space (GMN)",
    "probing": "weight space + probing",
    "gradmetanet": "weight space + GradMetaNet",
    "gradmetanet_pp": "weight space + GradMetaNet++",
    "gradmetanet_pp_sign": "+ GradMetaNet++, sign-equivariant",
    "weight_space_sign": "weight space, sign-equivariant (ScaleGMN analogue)",
    "probing_sign": "+ probing, sign-equivariant",
    "gradmetanet_sign": "+ GradMetaNet, sign-equivariant",
}
_TINY = 1e-12


@dataclass
class EditModelConfig(GradMetaNetConfig):
    """Sizes of the learned editing models: GradMetaNet's (the fields of
    :class:`~gradgraph.nn.GradMetaNetConfig`, with this task's defaults; the components are
    the probe points; ``num_node_layers`` is used by every model) and the edit's own.

    Attributes:
        component_edge_messages: off by default here: the paper's ``L_Γb`` has only the
            set/neuron interactions (``O(N·B·C_z)``), and on a 2-core CPU the edge terms made
            an epoch about 5× slower.
        output_gain: initial per-layer gain of ``Δθ`` in units of the layer's weight RMS
            (small: training starts near the unedited INR).
        gradient_step: the gradient model also adds a learned per-layer multiple of the
            mean probe gradient (a learned gradient step, initialised at 0), so it need not
            first learn to form that mean through its decoder.
    """

    # GradMetaNetConfig's fields, with this task's defaults where they differ
    component_channels: int = 16
    num_node_layers: int = 3
    product_channels: int = 8
    component_edge_messages: bool = False
    output_gain: float = 0.01
    gradient_step: bool = True


@dataclass
class FeatureScales:
    """Per-layer root-mean-squares of the training INRs (all ``[L]``, ``L`` = number of node layers).

    ``weight[l]``: weights *into* layer ``l`` (``weight[0] = 1``); ``bias[l]``: biases of
    layer ``l`` (``bias[0] = 1``); ``act[l]``, ``grad[l]``: the factors of layer ``l``.
    """

    weight: Tensor
    bias: Tensor
    act: Tensor
    grad: Tensor

    @classmethod
    def measure(cls, source: InrSource) -> "FeatureScales":
        """Measured on ``source`` (the training split)."""
        layers, node_layer, edge_layer = source.num_layers, source.node_layer, source.edge_layer

        def rms(values: Tensor, index: Tensor) -> Tensor:
            # values [M, K(, B)] grouped by index [K] over the last-but-batch axis.
            squares = values.square().mean(dim=0)
            if squares.dim() == 2:
                squares = squares.mean(dim=1)
            mean = scatter(squares, index, dim=0, dim_size=layers, reduce="mean")
            return torch.where(mean > 0, mean.sqrt(), torch.ones_like(mean)).clamp_min(_TINY)

        return cls(
            weight=rms(source.weight, edge_layer),
            bias=rms(source.bias, node_layer),
            act=rms(source.act, node_layer),
            grad=rms(source.grad, node_layer),
        )


class EditNet(nn.Module):
    r"""A graph model predicting the weight edit of every INR: ``G -> (Δw [E, 1], Δb [N, 1])``.

    .. math::
        \Delta w_{j\to k} = \gamma_{l(k)}\, s^w_{l(k)}\, \Phi(\tilde G)^{\mathrm{edge}}_{j\to k},\qquad
        \Delta b_k = \gamma'_{l(k)}\, s^b_{l(k)}\, \Phi(\tilde G)^{\mathrm{node}}_k

    with :math:`\Phi` a :class:`~gradgraph.nn.GradMetaNet`, :math:`\tilde G` the graph with
    weights, biases, ``act`` and ``grad`` divided by the per-layer RMS :math:`s` of
    :class:`FeatureScales`, and :math:`\gamma, \gamma'` learned per-layer gains.

    Args:
        kind: ``"weight_space"``, ``"probing"``, ``"gradmetanet"`` or ``"gradmetanet_pp"`` (see the
            module docstring).
        scales: the per-layer normalisers.
        config: sizes.
        num_probe_points: ``B`` (the width of the probing features).
    """

    def __init__(self, kind: str, scales: FeatureScales, config: EditModelConfig, num_probe_points: int) -> None:
        super().__init__()
        if kind not in BASE_MODELS:
            raise GradGraphError(f"EditNet: kind must be one of {BASE_MODELS}, got {kind!r}")
        self.kind = kind
        self.num_probe_points = num_probe_points
        for name in ("weight", "bias", "act", "grad"):
            self.register_buffer(f"{name}_scale", getattr(scales, name).clone())
        num_layers = scales.weight.numel()
        self.weight_gain = nn.Parameter(torch.full((num_layers,), config.output_gain))
        self.bias_gain = nn.Parameter(torch.full((num_layers,), config.output_gain))
        uses_gradients = kind in ("gradmetanet", "gradmetanet_pp")
        self.gradient_step = uses_gradients and config.gradient_step
        if self.gradient_step:
            self.weight_step = nn.Parameter(torch.zeros(num_layers))
            self.bias_step = nn.Parameter(torch.zeros(num_layers))
        if kind == "gradmetanet_pp":
            self.net = GradMetaNetPlusPlus(
                config.hidden_channels,
                num_layers=config.num_component_layers,
                product_channels=config.product_channels,
                edge_out_channels=1,
                node_out_channels=1,
                **LAZY_INPUT_WIDTHS,
            )
            self.config = config
            return
        self.net = build_gradmetanet(config, components=uses_gradients, edge_out_channels=1, node_out_channels=1)
        self.config = config

    def reset_parameters(self) -> None:
        """Re-initialise the metanetwork and the gains."""
        self.net.reset_parameters()
        nn.init.constant_(self.weight_gain, self.config.output_gain)
        nn.init.constant_(self.bias_gain, self.config.output_gain)
        if self.gradient_step:
            nn.init.zeros_(self.weight_step)
            nn.init.zeros_(self.bias_step)

    def normalised(self, graph: GradGraph | Batch) -> GradGraph | Batch:
        """The graph with weights, biases and factors divided by their layer's RMS (a shallow copy)."""
        node_layer = graph.layer
        edge_layer = node_layer[graph.edge_index[1]]
        result = copy.copy(graph)
        x = graph.x.clone()
        x[:, 0] = x[:, 0] / self.bias_scale[node_layer]
        edge_attr = graph.edge_attr.clone()
        edge_attr[:, 0] = edge_attr[:, 0] / self.weight_scale[edge_layer]
        result.x, result.edge_attr = x, edge_attr
        result.act = graph.act / self.act_scale[node_layer][:, None]
        result.grad = graph.grad / self.grad_scale[node_layer][:, None]
        return result

    def forward(self, graph: GradGraph | Batch) -> GradMetaNetOutput:
        """``GradMetaNetOutput(edge=Δw [E, 1], node=Δb [N, 1])``."""
        output = self.net(self.normalised(graph))
        node_layer = graph.layer
        edge_layer = node_layer[graph.edge_index[1]]
        edge = output.edge * (self.weight_gain * self.weight_scale)[edge_layer][:, None]
        node = output.node * (self.bias_gain * self.bias_scale)[node_layer][:, None]
        if self.gradient_step:
            edge_step, node_step = self.mean_gradient_step(graph, node_layer, edge_layer)
            edge, node = edge + edge_step, node + node_step
        return GradMetaNetOutput(edge=edge, node=node, graph=None)

    def mean_gradient_step(self, graph: GradGraph | Batch, node_layer: Tensor, edge_layer: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(−η_{l(k)} s^w_{l(k)} ḡ_{j→k} / (s^a_{l(j)} s^g_{l(k)}) [E, 1],  −η'_{l(k)} s^b_{l(k)} ḡ_k / s^g_{l(k)} [N, 1])``
        with ``ḡ_{j→k} = mean_i act[j, i] grad[k, i]`` and ``ḡ_k = mean_i grad[k, i]`` the mean
        probe gradient, in units of the layer's weight RMS per unit of normalised gradient."""
        src = graph.edge_index[0]
        mean_edge, mean_node = mean_gradient(graph.act, graph.grad, graph.edge_index)
        edge_units = self.weight_scale[edge_layer] / (self.act_scale[node_layer[src]] * self.grad_scale[edge_layer])
        node_units = self.bias_scale[node_layer] / self.grad_scale[node_layer]
        edge = -(self.weight_step[edge_layer] * edge_units * mean_edge)[:, None]
        node = -(self.bias_step[node_layer] * node_units * mean_node)[:, None]
        return edge, node

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(kind={self.kind!r}, {self.net})"


class InrEditor(nn.Module):
    """Edits a batch of INRs: ``batch -> (weight + Δw [G, E], bias + Δb [G, N])``.

    Args:
        graph_model: an :class:`EditNet`, optionally inside :class:`ScaleEquivariant`.
        probing: append the INR's outputs at the probe points (``act`` of the output
            neuron: in loss mode it holds ``f(x_i)``) as features of the output neuron.
    """

    def __init__(self, graph_model: nn.Module, *, probing: bool) -> None:
        super().__init__()
        self.graph_model = graph_model
        self.probing = probing

    def graph_features(self, batch: InrBatch) -> Tensor | None:
        """``[G, N, B]`` the probing features (zero except on the output neuron), or ``None``."""
        if not self.probing:
            return None
        outputs = batch.source.output_nodes
        features = torch.zeros_like(batch.act)
        features[:, outputs] = batch.act[:, outputs]
        return features

    def forward(self, batch: InrBatch) -> tuple[Tensor, Tensor]:
        """The edited INRs' ``(weight [G, E], bias [G, N])`` in graph order."""
        graphs = batch.graphs(extra_x=self.graph_features(batch))
        delta_w, delta_b = per_graph_outputs(self.graph_model(graphs), batch.num_graphs)
        return batch.weight + delta_w, batch.bias + delta_b


class NoEdit(nn.Module):
    """``Δθ = 0``: returns the INRs unchanged (the floor)."""

    def forward(self, batch: InrBatch) -> tuple[Tensor, Tensor]:
        """``(weight [G, E], bias [G, N])`` of the batch."""
        return batch.weight, batch.bias


def build_model(name: str, scales: FeatureScales, config: EditModelConfig, num_probe_points: int) -> nn.Module:
    """The editing model called ``name`` (one of :data:`MODEL_NAMES`), freshly initialised.

    Args:
        name: e.g. ``"gradmetanet"`` or ``"gradmetanet_sign"``.
        scales: per-layer normalisers measured on the training INRs.
        config: sizes.
        num_probe_points: ``B``.

    Returns:
        A module mapping an :class:`InrBatch` to the edited ``(weight [G, E], bias [G, N])``.
    """
    if name == "no_edit":
        return NoEdit()
    base, sign = (name[: -len("_sign")], True) if name.endswith("_sign") else (name, False)
    if base not in BASE_MODELS:
        raise GradGraphError(f"unknown INR-editing model {name!r}; choose from {MODEL_NAMES}")
    graph_model: nn.Module = EditNet(base, scales, config, num_probe_points)
    if sign:
        # Δθ transforms like θ itself: Δw_{j→k} with t_k / t_j, Δb_k with t_k.
        graph_model = ScaleEquivariant(graph_model, edge="weight", node="weight", graph=None)
    return InrEditor(graph_model, probing=base == "probing")


def describe(model: Any) -> str:
    """A one-line description for results.json."""
    return repr(model).replace("\n", " ")
