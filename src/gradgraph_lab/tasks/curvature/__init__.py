"""Curvature estimation (GradMetaNet, Gelberg et al. 2025, §7.1): from 128 gradients of a
SIREN, predict its Fisher-information diagonal better than averaging their squares.

Setup (see :mod:`gradgraph_lab.data.curvature`): every network ``f_θ`` is a SIREN
``1 -> 32 -> 32 -> 1`` with ``N(0, 1)`` weights; the model sees
``to_graph(f_θ, x_1..x_128, loss_fn=None)`` (``∇θ f(x_i)`` in rank-1 factors) for
``x_i ~ X_p``; the target is ``E_x[(∂f/∂θ)²]`` over 1024 independent points of ``X_p``, one
value per weight (edge) and per bias (node): ``P = 1153`` values per network.

Models, all trained and tested on the same splits:

==================  =====================================================================
``standard``        ``mean_i (∂f(x_i)/∂θ)²`` — the standard estimator; no learning
``kernel_importance`` hand-built reference, no learning: ``sum_i w_i (∂f(x_i)/∂θ)²`` with
                    ``w_i ∝ N(x_i; x̄, s²) / q̂(x_i)``, ``q̂`` a Gaussian kernel density
                    of the 128 inputs (bandwidth picked on the training networks)
``gradmetanet``     GradMetaNet on the factors (component layers, pooling, node layers,
                    component-wise product decoder; datapoint weights from its
                    per-datapoint states and a :class:`~gradgraph.nn.ComponentDensity`)
``gmn_average``     GradMetaNet without component layers, fed only the *mean* gradient
                    (per weight and per bias) appended to ``edge_attr`` / ``x``
``mlp_concat``      one MLP shared by all parameters, applied to that parameter's 128
                    per-sample gradients concatenated in datapoint order
``gmn_collapsed``   GradMetaNet without component layers whose nodes get their 128
                    ``act`` and 128 ``grad`` values as *ordered* channels (the component
                    set collapsed: not invariant to datapoint order)
``gradmetanet_pp``  GradMetaNet++ (:class:`~gradgraph.nn.GradMetaNetPlusPlus`: attention
                    across datapoints and neurons, no pooling, per-datapoint product
                    decoder) in the same estimator as ``gradmetanet``
==================  =====================================================================

Parameterisation (allowed by the task and stated in the results): models that see the
per-sample gradients predict a multiplicative correction of the standard estimator,
``pred = standard · exp(γ · r)``, with ``r`` the model's per-parameter output and ``γ`` a
learned scalar initialised at 0, so training starts exactly at the standard estimator.
``gmn_average`` cannot form the standard estimator from a mean gradient, so it predicts
``pred = exp(r)`` directly. Every model is trained on the per-network relative squared error
``‖pred − F‖² / ‖F‖²`` and evaluated on the **raw** target with

    error(net) = ‖pred − F‖₂ / ‖F‖₂     (normalised ℓ2 over the P = 1153 entries),

averaged over the test networks, then mean ± std over training seeds.

Split by job: :mod:`.data` (stacked networks served as batches, the metric), :mod:`.models`
(the estimators, their features and the registry :func:`build_model`), :mod:`.run`
(configuration, presets, training runs, results table and plot).
"""

from gradgraph_lab.tasks.curvature.data import CurvatureBatch, CurvatureSource, normalised_l2, relative_squared_error
from gradgraph_lab.tasks.curvature.models import (
    DEFAULT_MODELS,
    DETERMINISTIC_MODELS,
    MODEL_LABELS,
    MODEL_NAMES,
    KernelImportanceEstimator,
    ModelConfig,
    build_model,
    log_standard_ratio,
    normalised_factors,
    reweighted_estimate,
)
from gradgraph_lab.tasks.curvature.run import (
    METRIC,
    CurvatureConfig,
    curvature_error,
    curvature_loss,
    plot_learning_curves,
    preset,
    results_table,
    run_curvature,
)

__all__ = [
    "DEFAULT_MODELS",
    "DETERMINISTIC_MODELS",
    "METRIC",
    "MODEL_LABELS",
    "MODEL_NAMES",
    "CurvatureBatch",
    "CurvatureConfig",
    "CurvatureSource",
    "KernelImportanceEstimator",
    "ModelConfig",
    "build_model",
    "curvature_error",
    "curvature_loss",
    "log_standard_ratio",
    "normalised_factors",
    "normalised_l2",
    "plot_learning_curves",
    "preset",
    "relative_squared_error",
    "results_table",
    "reweighted_estimate",
    "run_curvature",
]
