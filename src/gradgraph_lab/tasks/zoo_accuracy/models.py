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

The graph models (GradMetaNet, GradMetaNet++, a weights-only graph metanetwork) and the views of
a graph they read are :mod:`.graph_models`'; :data:`GRAPH_MODELS` says which predictor is which.

Every feature and every graph model's output is invariant to permuting the hidden neurons (a
CNN's hidden channels) of a zoo net (tested in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph.graph import ActivationKind, GradGraph
from gradgraph_lab.tasks.zoo_accuracy.graph_models import GraphRegressor, ModelConfig, graph_inputs

__all__ = [
    "FEATURES_OF",
    "GRAPH_MODELS",
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
    "metanet_weights": "graph metanetwork on weights (channels as neurons)",
    "gradmetanet_pp_grad": "GradMetaNet++ on gradients",
    "gradmetanet_grad_stats": "GradMetaNet on gradients + gradient statistics",
}
MODEL_NAMES = tuple(MODEL_LABELS)
#: The graph predictors: ``(architecture, view, reads the gradient statistics)`` (see :mod:`.graph_models`).
GRAPH_MODELS = {"gradmetanet_grad": ("gradmetanet", "grad", False),
                "gradmetanet_grad_weights": ("gradmetanet", "grad_weights", False),
                "metanet_weights": ("metanet", "weights", False),
                "gradmetanet_pp_grad": ("gradmetanet_pp", "grad", False),
                "gradmetanet_grad_stats": ("gradmetanet", "grad", True)}
#: Which statistics each baseline reads, and its regressor.
FEATURES_OF = {"weight_stats": ("weights", "forest"), "grad_stats": ("gradients", "forest"),
               "grad_stats_boost": ("gradients", "boosting"), "all_stats": ("both", "forest")}

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
_SPREAD_QUANTILES = (0.1, 0.5, 0.9)


def _architecture(graph: GradGraph) -> Tensor:
    """``[H + 1]``: the hidden widths (output rows of every weight but the last; channels for a
    CNN) in order, and whether the hidden activation is tanh."""
    widths = [float(shape[0]) for shape in graph.param_shapes if len(shape) >= 2][:-1]
    tanh = float((graph.activation == ActivationKind.TANH).any())
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
