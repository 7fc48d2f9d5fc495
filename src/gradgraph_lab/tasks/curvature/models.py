"""Models of the curvature task: every model maps a :class:`~.data.CurvatureBatch` to
``[G, P]``, one predicted Fisher-diagonal entry per weight, then per bias.

The models, their parameterisation and the metric are described in the package docstring
(:mod:`gradgraph_lab.tasks.curvature`); :func:`build_model` is the one registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph.nn import GradMetaNetConfig, GradMetaNetOutput, GradMetaNetPlusPlus
from gradgraph.nn.sparse import channel_sddmm
from gradgraph_lab.tasks.curvature.data import _TINY, CurvatureBatch, CurvatureSource, normalised_l2
from gradgraph_lab.tasks.models import LAZY_INPUT_WIDTHS, build_gradmetanet, mean_gradient, per_graph_outputs

__all__ = [
    "DEFAULT_MODELS",
    "DETERMINISTIC_MODELS",
    "MODEL_LABELS",
    "MODEL_NAMES",
    "AverageGradientGMN",
    "CollapsedGMN",
    "ConcatenatedGradientMLP",
    "GradMetaNetEstimator",
    "GradMetaNetPlusPlusEstimator",
    "KernelImportanceEstimator",
    "ModelConfig",
    "StandardEstimator",
    "build_model",
    "log_standard_ratio",
    "normalised_factors",
    "reweighted_estimate",
]

MODEL_NAMES = (
    "standard", "kernel_importance", "gradmetanet", "gmn_average", "mlp_concat", "gmn_collapsed", "gradmetanet_pp"
)
MODEL_LABELS = {
    "standard": "standard estimator (mean of squares)",
    "kernel_importance": "hand-built: Gaussian fit / kernel density weights",
    "gradmetanet": "GradMetaNet",
    "gmn_average": "GMN + average gradient",
    "mlp_concat": "MLP on concatenated gradients",
    "gmn_collapsed": "GMN, components as ordered channels",
    "gradmetanet_pp": "GradMetaNet++",
}
#: What ``gradgraph curvature`` runs without ``--models``.
DEFAULT_MODELS = ("standard", "kernel_importance", "gradmetanet")
#: Models without training randomness: run once, not once per seed.
DETERMINISTIC_MODELS = ("standard", "kernel_importance")


# ----------------------------------------------------------------------------- features
def _row_rms(values: Tensor) -> Tensor:
    """``[..., N]`` root-mean-square over the last (component) axis of ``[..., N, B]``."""
    return values.square().mean(dim=-1).sqrt().clamp_min(1e-12)


def normalised_factors(batch: CurvatureBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Per-neuron normalised factors and their scales.

    Every neuron's ``act`` and ``grad`` rows are divided by their root mean square over the
    components — a per-neuron map, so it commutes with permuting neurons and components.
    The log-scales go to the node features so nothing is lost.

    Returns:
        ``(act [G, N, B], grad [G, N, B], log_scales [G, N, 2])``.
    """
    act_rms, grad_rms = _row_rms(batch.act), _row_rms(batch.grad)
    log_scales = torch.stack([act_rms.log(), grad_rms.log()], dim=-1)
    return batch.act / act_rms[..., None], batch.grad / grad_rms[..., None], log_scales


def log_standard_ratio(batch: CurvatureBatch) -> Tensor:
    """``[G, P]`` ``log(standard / (ms(act_src) · ms(grad_dst)))`` (biases: ``log 1 = 0``).

    The standard estimate of a weight divided by the product of its endpoints' mean squares:
    a dimensionless number that is 1 when ``act_j²`` and ``grad_k²`` are uncorrelated over
    the inputs. Available to every model that sees per-sample gradients.
    """
    source = batch.source
    src, dst = source.edge_index
    act_ms, grad_ms = batch.act.square().mean(-1), batch.grad.square().mean(-1)
    edge = batch.standard[:, : source.num_edges] / (act_ms[:, src] * grad_ms[:, dst]).clamp_min(_TINY)
    node = torch.ones_like(batch.standard[:, source.num_edges :])
    return torch.cat([edge.clamp_min(_TINY).log(), node.log()], dim=1)


def _symlog(values: Tensor) -> Tensor:
    return values.sign() * values.abs().log1p()


def _split(values: Tensor, num_edges: int) -> tuple[Tensor, Tensor]:
    return values[:, :num_edges], values[:, num_edges:]


# ----------------------------------------------------------------------------- models
@dataclass
class ModelConfig(GradMetaNetConfig):
    """Sizes of the learned models: GradMetaNet's (the fields of
    :class:`~gradgraph.nn.GradMetaNetConfig`; ``num_node_layers`` is used by every GradMetaNet
    variant) with this task's defaults, and the other models'.

    Attributes:
        mlp_hidden: width of the per-parameter MLP on concatenated gradients.
        mlp_layers: hidden layers of that MLP.
        reweight_datapoints: GradMetaNet also outputs one weight per datapoint (a softmax
            over its component outputs, one column per parameter tensor) and the prediction
            starts from the reweighted estimator ``sum_i w_i g_i²`` instead of ``mean_i g_i²``.
        density_heads: heads of the :class:`~gradgraph.nn.ComponentDensity` in GradMetaNet's
            datapoint-weight readout (0: none). Lets a datapoint's weight depend on how
            crowded its neighbourhood in the sample is, not only on set means.
        component_edge_messages: off by default here: the paper's ``L_Γb`` has only the
            set/neuron interactions (cost ``O(N·B·C)``), and on a 2-core CPU the edge terms
            make a step several times slower.
        max_log_correction: ``|γ·r|`` is clipped to this (keeps ``exp`` finite early on).
        pp_channels: per-component width ``C`` of GradMetaNet++.
        pp_layers: GradMetaNet++ blocks (component attention + neuron attention).
        pp_heads: attention heads of GradMetaNet++.
        pp_product_channels: width of GradMetaNet++'s per-component product decoder.
    """

    # GradMetaNetConfig's fields, with this task's defaults where they differ
    component_channels: int = 8
    num_component_layers: int = 1
    product_channels: int = 4
    component_edge_messages: bool = False
    mlp_hidden: int = 32
    mlp_layers: int = 2
    reweight_datapoints: bool = True
    density_heads: int = 4
    max_log_correction: float = 5.0
    pp_channels: int = 8
    pp_layers: int = 1
    pp_heads: int = 1
    pp_product_channels: int = 4


class StandardEstimator(nn.Module):
    """``mean_i (∂f(x_i)/∂θ)²``: the empirical Fisher diagonal of the 128 seen gradients."""

    def forward(self, batch: CurvatureBatch) -> Tensor:
        """``[G, P]``."""
        return batch.standard


class _Correction(nn.Module):
    """``standard · exp(clip(γ · r))`` with a learned scalar ``γ`` starting at 0."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(()))
        self.limit = limit

    def forward(self, standard: Tensor, residual: Tensor) -> Tensor:
        return standard * (self.gain * residual).clamp(-self.limit, self.limit).exp()


class GradMetaNetEstimator(nn.Module):
    """GradMetaNet on the normalised factors, as a correction of the standard estimator.

    Graph input: ``act``/``grad`` rows normalised per neuron (:func:`normalised_factors`);
    extra node features: the two log-scales; extra edge features: :func:`log_standard_ratio`.
    Output: the per-edge and per-node channel 0 is ``r``.

    Shapes: ``batch -> [G, P]``.
    """

    def __init__(self, config: ModelConfig, num_param_kinds: int) -> None:
        super().__init__()
        self.net = self.build_net(config, num_param_kinds)
        if config.reweight_datapoints:
            # Zero scores give uniform weights: training starts at the standard estimator.
            last = self.net.component_readout.mlp.lins[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        self.correction = _Correction(config.max_log_correction)

    @staticmethod
    def build_net(config: ModelConfig, num_param_kinds: int) -> nn.Module:
        """The metanetwork: per-edge and per-node outputs ``r``, component outputs (datapoint scores)."""
        return build_gradmetanet(
            config,
            component_out_channels=num_param_kinds if config.reweight_datapoints else 0,
            component_density_heads=config.density_heads if config.reweight_datapoints else 0,
        )

    def forward(self, batch: CurvatureBatch) -> Tensor:
        act, grad, log_scales = normalised_factors(batch)
        edge_ratio, _ = _split(log_standard_ratio(batch), batch.source.num_edges)
        graphs = batch.graphs(act, grad, extra_x=log_scales, extra_edge_attr=edge_ratio[..., None])
        output = self.net(graphs)
        base = batch.standard
        if output.component is not None:
            base = reweighted_estimate(batch, output.component.softmax(dim=1))
        return self.correction(base, _per_parameter(output, batch))


class GradMetaNetPlusPlusEstimator(GradMetaNetEstimator):
    """:class:`GradMetaNetEstimator` with :class:`~gradgraph.nn.GradMetaNetPlusPlus` as the metanetwork.

    Same inputs, datapoint reweighting and multiplicative correction; the network keeps
    per-datapoint states throughout (attention across datapoints and across neurons) and
    decodes every weight from them per datapoint (see the class).

    Shapes: ``batch -> [G, P]``.
    """

    @staticmethod
    def build_net(config: ModelConfig, num_param_kinds: int) -> nn.Module:
        return GradMetaNetPlusPlus(
            config.pp_channels,
            num_layers=config.pp_layers,
            heads=config.pp_heads,
            edge_messages=config.component_edge_messages,
            product_channels=config.pp_product_channels,
            component_out_channels=num_param_kinds if config.reweight_datapoints else 0,
            component_density_heads=config.density_heads if config.reweight_datapoints else 0,
            **LAZY_INPUT_WIDTHS,
        )


def reweighted_estimate(batch: CurvatureBatch, weights: Tensor) -> Tensor:
    """``[G, P]`` ``sum_i w[g, i, kind(θ)] (∂f(x_i)/∂θ)²``: the standard estimator with learned datapoint weights.

    A weight's kind is set by its target neuron's layer, so the datapoint weight multiplies
    ``grad[dst]²`` row-wise and the per-edge sum over datapoints is a sampled product of two
    ``[N, B]`` node tensors (:func:`~gradgraph.nn.sparse.channel_sddmm`, the ``G`` networks as
    channels): no ``[G, P, B]`` per-sample tensor is formed, forward or backward.

    Args:
        batch: the networks.
        weights: ``[G, B, K]`` datapoint weights for each of the ``K`` parameter tensors
            (weights and biases of each layer); each column sums to 1 over ``B``.
    """
    source = batch.source
    node_weights = weights[:, :, source.node_edge_kind].transpose(1, 2)  # [G, N, B]
    weighted_grad_sq = batch.grad.square() * node_weights
    pattern = source.sddmm_pattern(batch.num_graphs)
    edge = channel_sddmm(pattern, batch.act.square().permute(1, 2, 0), weighted_grad_sq.permute(1, 2, 0)).t()
    bias_nodes = source.bias_nodes
    bias_weights = weights[:, :, source.param_kind[source.num_edges :]].transpose(1, 2)  # [G, K_b, B]
    bias = (batch.grad[:, bias_nodes].square() * bias_weights).sum(dim=-1)
    return torch.cat([edge, bias], dim=1)


class KernelImportanceEstimator(nn.Module):
    """Hand-built reference: the seen gradients reweighted from the sample's clumping to a Gaussian fit.

    With ``x`` the inputs (the input neurons' ``act`` rows) standardised over the ``B``
    points of each network, ``w_i ∝ exp(−‖z_i‖²/2) / q̂(z_i)`` with
    ``q̂(z_i) = mean_j exp(−‖z_i − z_j‖² / 2h²)`` and the prediction
    ``sum_i w_i (∂f(x_i)/∂θ)²`` — an importance-sampling correction that treats the sample as
    drawn from its kernel density and the truth as the fitted Gaussian. It knows the inputs
    are roughly Gaussian, nothing else about ``X_p``. It shows what reweighting by
    *pairwise* structure of the sample is worth, which is what
    :class:`~gradgraph.nn.ComponentDensity` lets GradMetaNet learn.

    Shapes: ``batch -> [G, P]``.

    Args:
        bandwidth: ``h`` in standard deviations of the sample.
    """

    #: Bandwidths :meth:`fitted` chooses from.
    BANDWIDTHS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)

    def __init__(self, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth = bandwidth

    def weights(self, batch: CurvatureBatch) -> Tensor:
        """``[G, B]`` datapoint weights (each row sums to 1)."""
        inputs = batch.act[:, batch.source.input_nodes].double()  # [G, D, B]
        mean = inputs.mean(dim=-1, keepdim=True)
        std = inputs.std(dim=-1, unbiased=False, keepdim=True).clamp_min(1e-12)
        z = ((inputs - mean) / std).transpose(1, 2)  # [G, B, D]
        log_target = -0.5 * z.square().sum(dim=-1)
        log_kernel = -torch.cdist(z, z).square() / (2.0 * self.bandwidth**2)
        log_sample = torch.logsumexp(log_kernel, dim=-1)
        return (log_target - log_sample).softmax(dim=-1).to(batch.act.dtype)

    def forward(self, batch: CurvatureBatch) -> Tensor:
        weights = self.weights(batch)[..., None].expand(-1, -1, batch.source.num_param_kinds)
        return reweighted_estimate(batch, weights)

    @classmethod
    def fitted(cls, source: CurvatureSource, max_networks: int = 500) -> "KernelImportanceEstimator":
        """The bandwidth of :attr:`BANDWIDTHS` with the lowest mean error on (up to
        ``max_networks`` of) the training networks ``source``."""
        batch = source.batch(torch.arange(min(len(source), max_networks)))
        errors = {h: float(normalised_l2(cls(h)(batch), batch.target).mean()) for h in cls.BANDWIDTHS}
        return cls(min(errors, key=errors.__getitem__))

    def extra_repr(self) -> str:
        return f"bandwidth={self.bandwidth}"


class AverageGradientGMN(nn.Module):
    """A graph metanetwork that sees the weights and only the *mean* gradient.

    GradMetaNet with ``num_component_layers=0`` (it never reads ``act``/``grad``); extra edge
    features ``symlog(mean_i ∂f(x_i)/∂W)``, extra node features ``symlog(mean_i ∂f(x_i)/∂b)``
    (0 for input nodes). It cannot compute the standard estimator, so it predicts
    ``exp(r)`` directly.

    Shapes: ``batch -> [G, P]``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.net = build_gradmetanet(config, components=False)
        self.limit = 30.0

    def forward(self, batch: CurvatureBatch) -> Tensor:
        mean_edge, mean_node = mean_gradient(batch.act, batch.grad, batch.source.edge_index)
        graphs = batch.graphs(extra_x=_symlog(mean_node)[..., None], extra_edge_attr=_symlog(mean_edge)[..., None])
        return _per_parameter(self.net(graphs), batch).clamp(-self.limit, self.limit).exp()


class CollapsedGMN(nn.Module):
    """GradMetaNet with the component set collapsed into ordered channels (ablation).

    ``num_component_layers=0``; every node gets its normalised ``act`` and ``grad`` rows
    (``2B`` values, in datapoint order) and the two log-scales as features; edges get
    :func:`log_standard_ratio`. Not invariant to the order of the datapoints.

    Shapes: ``batch -> [G, P]``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.net = build_gradmetanet(config, components=False)
        self.correction = _Correction(config.max_log_correction)

    def forward(self, batch: CurvatureBatch) -> Tensor:
        act, grad, log_scales = normalised_factors(batch)
        edge_ratio, _ = _split(log_standard_ratio(batch), batch.source.num_edges)
        extra_x = torch.cat([act, grad, log_scales], dim=-1)
        graphs = batch.graphs(extra_x=extra_x, extra_edge_attr=edge_ratio[..., None])
        return self.correction(batch.standard, _per_parameter(self.net(graphs), batch))


class ConcatenatedGradientMLP(nn.Module):
    """One MLP shared by every parameter, on that parameter's ``B`` per-sample gradients.

    Input per parameter: its gradient vector ``[B]`` in datapoint order divided by its root
    mean square (so the standard estimate is 1), the log of that root mean square, the
    :func:`log_standard_ratio`, and a learned embedding of the parameter's tensor (which
    layer, weight or bias). Output ``r``; ``pred = standard · exp(γ r)``.

    Shapes: ``batch -> [G, P]``.
    """

    def __init__(self, num_components: int, num_param_kinds: int, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        self.input = nn.Linear(num_components + 2, hidden)
        self.kind = nn.Embedding(num_param_kinds, hidden)
        layers: list[nn.Module] = []
        for _ in range(config.mlp_layers - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, 1))
        self.correction = _Correction(config.max_log_correction)

    def forward(self, batch: CurvatureBatch) -> Tensor:
        per_sample = batch.per_sample_grads()
        rms = batch.standard.sqrt().clamp_min(1e-15)
        features = torch.cat(
            [per_sample / rms[..., None], rms.log()[..., None] / 5.0, log_standard_ratio(batch)[..., None]], dim=-1
        )
        hidden = self.input(features) + self.kind(batch.source.param_kind)
        return self.correction(batch.standard, self.body(hidden)[..., 0])


def _per_parameter(output: GradMetaNetOutput, batch: CurvatureBatch) -> Tensor:
    """``[G, P]`` channel 0 of a GradMetaNetOutput's edge outputs, then its bias-node outputs."""
    edge, node = per_graph_outputs(output, batch.num_graphs)
    return torch.cat([edge, node[:, batch.source.bias_nodes]], dim=1)


def build_model(name: str, source: CurvatureSource, config: ModelConfig) -> nn.Module:
    """The model called ``name`` (one of :data:`MODEL_NAMES`), freshly initialised."""
    if name == "standard":
        return StandardEstimator()
    if name == "kernel_importance":
        return KernelImportanceEstimator.fitted(source)
    if name == "gradmetanet":
        return GradMetaNetEstimator(config, source.num_param_kinds)
    if name == "gradmetanet_pp":
        return GradMetaNetPlusPlusEstimator(config, source.num_param_kinds)
    if name == "gmn_average":
        return AverageGradientGMN(config)
    if name == "gmn_collapsed":
        return CollapsedGMN(config)
    if name == "mlp_concat":
        return ConcatenatedGradientMLP(int(source.data.act.shape[-1]), source.num_param_kinds, config)
    raise GradGraphError(f"unknown curvature model {name!r}; choose from {MODEL_NAMES}")
