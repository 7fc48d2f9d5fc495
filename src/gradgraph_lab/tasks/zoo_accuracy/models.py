"""The predictors of a zoo member's test accuracy: statistics into a random forest or gradient
boosting, and GradMetaNet on the graph.

Statistics (one feature vector per member, from its GradGraph; the architecture, i.e. the two
hidden widths and whether the activation is tanh, is in every vector):

* **weights** (Unterthiner et al. 2020): per parameter, the mean, variance and the 0, 25, 50,
  75, 100% quantiles of its entries;
* **gradients**: per parameter, the norms of the probe batch's per-sample gradients
  (:meth:`~gradgraph.GradGraph.per_sample_grad_norms`, from the factors) — their mean, std and
  10/50/90% quantiles — the norm of the mean gradient and its ratio to the mean per-sample norm
  (how much the datapoints agree); the same for the whole gradient; the per-datapoint losses'
  mean, std and 10/50/90% quantiles.

GradMetaNet reads the graph after :class:`~gradgraph.datasets.NormalizeFactors` (per-layer
RMS, the log-scales appended as features) and predicts ``[G, 1]`` through its invariant readout;
``gradmetanet_grad`` sees the factors with the weight and bias values (and their scales) zeroed,
``gradmetanet_grad_weights`` sees both.

Every feature and GradMetaNet's output is invariant to permuting the hidden neurons of a zoo
net (tested in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradgraph.datasets import NormalizeFactors
from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, GradGraph, NodeKind
from gradgraph.nn import GradMetaNet

__all__ = [
    "DEFAULT_MODELS",
    "FEATURES_OF",
    "MODEL_LABELS",
    "MODEL_NAMES",
    "GraphRegressor",
    "ModelConfig",
    "StatsRegressor",
    "gradient_features",
    "graph_inputs",
    "statistics",
    "weight_features",
]

MODEL_LABELS = {
    "weight_stats": "random forest on weight statistics",
    "grad_stats": "random forest on gradient statistics",
    "grad_stats_boost": "gradient boosting on gradient statistics",
    "all_stats": "random forest on weight + gradient statistics",
    "gradmetanet_grad": "GradMetaNet on gradients",
    "gradmetanet_grad_weights": "GradMetaNet on gradients + weights",
}
MODEL_NAMES = tuple(MODEL_LABELS)
DEFAULT_MODELS = MODEL_NAMES
#: Which statistics each baseline reads, and its regressor.
FEATURES_OF = {"weight_stats": ("weights", "forest"), "grad_stats": ("gradients", "forest"),
               "grad_stats_boost": ("gradients", "boosting"), "all_stats": ("both", "forest")}

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
_SPREAD_QUANTILES = (0.1, 0.5, 0.9)


def _architecture(graph: GradGraph) -> Tensor:
    """``[3]``: the hidden widths in order and whether the hidden activation is tanh."""
    hidden = graph.node_kind == NodeKind.HIDDEN
    layers = torch.unique(graph.layer[hidden])
    widths = [float((graph.layer[hidden] == layer).sum()) for layer in layers]
    tanh = float((graph.activation[hidden] == ActivationKind.TANH).any())
    return torch.tensor([*widths, tanh], dtype=torch.float64)


def _spread(values: Tensor) -> list[Tensor]:
    values = values.double()
    return [values.mean(), values.std(unbiased=False), *torch.quantile(values, torch.tensor(
        _SPREAD_QUANTILES, dtype=torch.float64))]


def weight_features(graph: GradGraph) -> Tensor:
    """``[F_w]``: the architecture, then per parameter its mean, variance and quantiles (0..100%)."""
    parameters = graph.to_parameters(graph.weight, graph.bias)
    parts = [_architecture(graph)]
    for name in graph.param_names:
        values = parameters[name].double().reshape(-1)
        parts.append(torch.stack([values.mean(), values.var(unbiased=False),
                                  *torch.quantile(values, torch.tensor(_QUANTILES, dtype=torch.float64))]))
    return torch.cat(parts)


def gradient_features(graph: GradGraph) -> Tensor:
    """``[F_g]``: the architecture; per parameter and for the whole gradient the spread of the
    per-sample gradient norms, the mean gradient's norm and its ratio to their mean; the losses' spread."""
    per_sample = graph.per_sample_grad_norms(by_parameter=True)
    mean_grad = graph.mean_grad()
    parts = [_architecture(graph)]
    total_mean_sq = torch.zeros((), dtype=torch.float64)
    for name in graph.param_names:
        norms = per_sample[name].double()
        mean_norm = mean_grad[name].double().norm()
        total_mean_sq = total_mean_sq + mean_norm.square()
        parts.append(torch.stack([*_spread(norms), mean_norm, mean_norm / norms.mean().clamp_min(1e-30)]))
    totals = graph.per_sample_grad_norms().double()
    total_mean = total_mean_sq.sqrt()
    parts.append(torch.stack([*_spread(totals), total_mean, total_mean / totals.mean().clamp_min(1e-30)]))
    parts.append(torch.stack(_spread(graph.loss)))
    return torch.cat(parts)


def statistics(graphs: list[GradGraph], kind: str) -> Tensor:
    """``[M, F]`` float64: :func:`weight_features`, :func:`gradient_features` or both (``kind``
    ``"weights"``, ``"gradients"``, ``"both"``) of every graph."""
    if kind not in ("weights", "gradients", "both"):
        raise GradGraphError(f"statistics: kind must be weights, gradients or both, got {kind!r}")
    rows = []
    for graph in graphs:
        parts = []
        if kind in ("weights", "both"):
            parts.append(weight_features(graph))
        if kind in ("gradients", "both"):
            parts.append(gradient_features(graph))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


class StatsRegressor(nn.Module):
    """A fitted scikit-learn regressor on a table of statistics, as a parameter-free module.

    Args:
        features: ``[M, F]`` statistics of every zoo member (row ``i``: member ``i``).
        train_index: ``[n]`` members to fit on; ``targets``: ``[M]`` accuracies.
        regressor: ``"forest"`` (``RandomForestRegressor``, 200 trees) or ``"boosting"``
            (``GradientBoostingRegressor``, 300 stages of depth 3, subsample 0.8).
        seed: the regressor's ``random_state``.

    Shapes: ``forward(batch)`` reads ``batch.zoo_id [G]`` and returns ``[G, 1]`` (float32).
    """

    def __init__(self, features: Tensor, train_index: Tensor, targets: Tensor, regressor: str, seed: int) -> None:
        super().__init__()
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

        if regressor == "forest":
            self.estimator = RandomForestRegressor(n_estimators=200, min_samples_leaf=2, n_jobs=1, random_state=seed)
        elif regressor == "boosting":
            self.estimator = GradientBoostingRegressor(n_estimators=300, max_depth=3, learning_rate=0.05,
                                                       subsample=0.8, random_state=seed)
        else:
            raise GradGraphError(f"StatsRegressor: regressor must be forest or boosting, got {regressor!r}")
        self.features = features.double().numpy()
        self.estimator.fit(self.features[train_index.numpy()], targets[train_index].double().numpy())

    def forward(self, batch) -> Tensor:  # noqa: ANN001 - a PyG Batch
        index = batch.zoo_id.reshape(-1).cpu().numpy()
        return torch.tensor(self.estimator.predict(self.features[index]), dtype=torch.float32)[:, None]

    def extra_repr(self) -> str:
        return repr(self.estimator)


@dataclass
class ModelConfig:
    """GradMetaNet's sizes for the zoo (small: the default run trains it 10 times on 2 cores)."""

    hidden_channels: int = 16
    component_channels: int = 8
    num_component_layers: int = 1
    num_node_layers: int = 1


def graph_inputs(graph: GradGraph, with_weights: bool, dtype: torch.dtype = torch.float32) -> GradGraph:
    """The graph GradMetaNet reads: :class:`NormalizeFactors` with log-scales, in ``dtype``, and without
    ``with_weights`` the weight and bias values and their scales zeroed (``x [N, 4]``, ``edge_attr [E, 2]``);
    ``component_x [N, B, 1]`` holds the log of each component's datapoint loss."""
    normalised = NormalizeFactors(log_scales=True)(graph)
    if not with_weights:
        normalised.x = normalised.x.clone()
        normalised.x[:, [0, 3]] = 0.0
        normalised.edge_attr = torch.zeros_like(normalised.edge_attr)
    # every datapoint's loss, as a feature of each of its components (the statistics baselines read them too)
    log_loss = normalised.loss.clamp_min(1e-12).log()
    normalised.component_x = log_loss[normalised.component_sample][None, :, None].expand(
        normalised.num_nodes, -1, 1).contiguous()
    for key in ("x", "edge_attr", "act", "grad", "y", "loss", "component_x"):
        if key in normalised:
            normalised[key] = normalised[key].to(dtype)
    return normalised


class GraphRegressor(nn.Module):
    r"""GradMetaNet with one invariant graph output, squashed into ``(0, 1)``:

    .. math::
        \hat y = \sigma\big(\mathrm{GMN}(\tilde G)_{\text{graph}} + \operatorname{logit} \bar y\big),

    where :math:`\tilde G` has its ``x`` and ``edge_attr`` columns standardised with the training
    graphs' mean and std (:meth:`fit_scaling`; the log-scales of :class:`NormalizeFactors` span
    tens of units) and :math:`\bar y` is the mean training accuracy. An accuracy lies in
    ``[0, 1]``: the sigmoid keeps a prediction for an unusual network from leaving it.

    Args:
        config: sizes.
        offset: :math:`\bar y`.

    Shapes: ``forward(batch)`` returns ``[G, 1]``.
    """

    def __init__(self, config: ModelConfig, offset: float) -> None:
        super().__init__()
        self.network = GradMetaNet(config.hidden_channels, component_channels=config.component_channels,
                                   num_component_layers=config.num_component_layers,
                                   num_node_layers=config.num_node_layers, edge_out_channels=0,
                                   node_out_channels=0, graph_out_channels=1)
        offset = min(max(float(offset), 1e-3), 1 - 1e-3)
        self.register_buffer("offset", torch.tensor(offset).logit())
        for name in ("x_mean", "x_std", "edge_mean", "edge_std"):
            self.register_buffer(name, torch.zeros(0))

    def fit_scaling(self, graphs: list[GradGraph]) -> None:
        """Set the standardisation of ``x`` and ``edge_attr`` columns from ``graphs`` (the training set)."""
        x = torch.cat([graph.x for graph in graphs])
        edges = torch.cat([graph.edge_attr for graph in graphs])
        self.x_mean, self.x_std = x.mean(0), x.std(0).clamp_min(1e-6)
        self.edge_mean, self.edge_std = edges.mean(0), edges.std(0).clamp_min(1e-6)

    def forward(self, batch) -> Tensor:  # noqa: ANN001 - a PyG Batch
        if self.x_mean.numel():
            batch = batch.clone()
            batch.x = (batch.x - self.x_mean) / self.x_std
            batch.edge_attr = (batch.edge_attr - self.edge_mean) / self.edge_std
        return torch.sigmoid(self.network(batch).graph + self.offset)
