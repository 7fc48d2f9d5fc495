r"""The graph predictors of a zoo member's test accuracy: GradMetaNet, GradMetaNet++ and a
weights-only graph metanetwork, on views of the member's GradGraph (:func:`graph_inputs`).

**Views.** Every view starts from :class:`~gradgraph.datasets.NormalizeFactors` with log-scales
(``x [N, 4]``: bias, log-RMS of act, of grad, of the biases; ``edge_attr [E, 2]``: weight, its
log-RMS) and then keeps:

* ``"weights"`` — the weight and bias values and their scales; the gradient scales zeroed and no
  factors (``act``/``grad`` one zero component): what a weight-space model sees;
* ``"grad"`` — the factors, the weight and bias values and their scales zeroed;
* ``"grad_weights"`` — both.

**Components of the gradient views: one per datapoint.** An MLP's graph has one component per
datapoint; a CNN's has one per (datapoint, position) — 16 or 20 positions for the zoo's CNNs — which
multiplies GradMetaNet's cost and puts GradMetaNet++'s attention over components (quadratic in
their number) out of a CPU's reach. The gradient views therefore sum every neuron's factors over
the components of each datapoint (:func:`pool_components`):

.. math::
    a'_{n,d} = \sum_{p} \mathrm{act}_{n,(d,p)},\quad g'_{n,d} = \sum_{p} \mathrm{grad}_{n,(d,p)},\quad
    c_{n,d} = \Big[\sqrt{\textstyle\sum_p \mathrm{act}_{n,(d,p)}^2},\
              \sqrt{\textstyle\sum_p \mathrm{grad}_{n,(d,p)}^2}\Big]

:math:`g'_{n,d}` is exactly datapoint ``d``'s gradient of neuron ``n``'s bias; the weight gradients
:math:`\sum_p \mathrm{act}_{j,(d,p)} \mathrm{grad}_{k,(d,p)}` are *not* recoverable from the sums
(they are a summary, not the gradient). Every quantity is a per-(neuron, datapoint) reduction, so
the view is exactly equivariant to channel permutations and datapoint permutations (tested in
float64). For an MLP the sums are over one component: :math:`a' = \mathrm{act}`, :math:`c = |\cdot|`.

**Unpooled** (``ModelConfig.unpooled``, ``graph_inputs(..., pool=False)``): the gradient views
keep every (datapoint, position) component, so GradMetaNet reads the exact per-position
factors whose products are the weight gradients, at ``P`` times the cost and memory; a random
subset of ``ModelConfig.train_components`` components per training step keeps both in hand
(the set means GradMetaNet takes over components stay the same quantities in expectation).
Channel and datapoint permutations act on it as on the graph: exactly equivariant (tested).

Every component also carries its datapoint's log-loss and the log of the norm of its whole
per-sample gradient (:meth:`~gradgraph.GradGraph.per_sample_grad_norms`, exact, from the unpooled
factors): ``component_x [N, b, 4]``.

**Models** (:class:`GraphRegressor`): the network's invariant graph output, optionally
concatenated with a table of invariant statistics, squashed into ``(0, 1)`` around the mean
training accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from gradgraph.datasets import NormalizeFactors
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus

__all__ = ["ARCHITECTURES", "VIEWS", "GraphRegressor", "ModelConfig", "graph_inputs", "pool_components"]

VIEWS = ("weights", "grad", "grad_weights")
ARCHITECTURES = ("gradmetanet", "gradmetanet_pp", "metanet")
#: ``component_x`` columns of the gradient views: log-loss, log per-sample gradient norm, root-sum-squares
#: of act and of grad.
COMPONENT_FEATURES = 4


@dataclass
class ModelConfig:
    """The graph models' sizes (small: the default run trains each 5 times on 2 cores).

    Attributes:
        hidden_channels, component_channels, num_component_layers, num_node_layers: GradMetaNet's.
        pp_channels, pp_layers, pp_heads: GradMetaNet++'s width, blocks and attention heads.
        pp_datapoints: GradMetaNet++ reads the components of the first ``pp_datapoints`` probe
            datapoints only (its attention over components is quadratic in their number; 0: all).
        metanet_layers: node layers of the weights-only graph metanetwork.
        stats_channels: width of the graph embedding that is concatenated with the statistics
            (models that read them).
        train_components: GradMetaNet (not GradMetaNet++) reads a random subset of this many
            components of every graph in each training step, all of them in evaluation (0: all,
            always). Its cost (time and memory) is linear in the components it reads and its
            layers and readout average over them, so a subset is a cheaper view of the same set
            — a speed-up and an augmentation (:meth:`GraphRegressor.subsample_components`).
            With the pooled views a component is a datapoint; with ``unpooled`` a (datapoint,
            position).
        unpooled: the gradient views keep a CNN's components, one per (datapoint, position)
            (:func:`graph_inputs` with ``pool=False``), instead of summing them per datapoint:
            GradMetaNet then reads the exact per-position factors, at ``P`` times the cost and
            memory (``P`` = 16 positions for the digits CNNs, 20 for MNIST-1D); keep it in hand
            with ``train_components`` and a smaller batch (docs/zoo.md). No effect on an MLP.
    """

    hidden_channels: int = 16
    component_channels: int = 8
    num_component_layers: int = 1
    num_node_layers: int = 1
    pp_channels: int = 8
    pp_layers: int = 1
    pp_heads: int = 1
    pp_datapoints: int = 8
    metanet_layers: int = 2
    stats_channels: int = 16
    train_components: int = 0
    unpooled: bool = False

    def __post_init__(self) -> None:
        if self.train_components < 0 or self.pp_datapoints < 0:
            raise GradGraphError(f"ModelConfig: train_components and pp_datapoints must be >= 0, got "
                                 f"{self.train_components}, {self.pp_datapoints}")


def pool_components(graph: GradGraph) -> GradGraph:
    """One component per datapoint (the equation of the module docstring): ``act``/``grad``
    ``[N, B] -> [N, b]`` (sums over each datapoint's components) and ``component_x [N, b, 2]``
    (their root-sum-squares). ``component_sample`` becomes ``arange(b)``. Returns a new graph."""
    sample = graph.component_sample.reshape(-1).long()
    b = int(graph.num_datapoints)
    if sample.numel() != graph.act.shape[1] or (sample.numel() and int(sample.max()) >= b):
        raise GradGraphError(f"pool_components: component_sample {list(sample.shape)} does not index "
                             f"{b} datapoints of act {list(graph.act.shape)}")
    pooled = graph.clone()
    pooled.act = scatter(graph.act, sample, dim=1, dim_size=b, reduce="sum")
    pooled.grad = scatter(graph.grad, sample, dim=1, dim_size=b, reduce="sum")
    pooled.component_x = torch.stack([scatter(graph.act.square(), sample, dim=1, dim_size=b, reduce="sum").sqrt(),
                                      scatter(graph.grad.square(), sample, dim=1, dim_size=b, reduce="sum").sqrt()], -1)
    pooled.component_sample = torch.arange(b, device=sample.device)
    return pooled


def graph_inputs(graph: GradGraph, view: str | bool, dtype: torch.dtype = torch.float32,
                 pool: bool = True) -> GradGraph:
    """The graph a model reads (see the module docstring for the views).

    Args:
        graph: a zoo member's graph (``act``/``grad`` ``[N, B]``, ``loss [b]``).
        view: ``"weights"``, ``"grad"`` or ``"grad_weights"`` (``False``/``True``: the last two, as before).
        dtype: of the floating fields.
        pool: the gradient views sum each datapoint's components (:func:`pool_components`);
            ``False`` keeps all ``B`` components (a CNN: one per datapoint and position), with
            ``component_x [N, B, 4]``: the component's datapoint's log-loss and log per-sample
            gradient norm, ``|act|`` and ``|grad|`` (the root-sum-squares of one component).

    Returns:
        ``x [N, 4]``, ``edge_attr [E, 2]``; gradient views ``act``/``grad`` ``[N, b]`` (``[N, B]``
        unpooled) and ``component_x [N, b, 4]`` (``[N, B, 4]``); the weights view ``act``/``grad``
        ``[N, 1]`` zeros.
    """
    if isinstance(view, bool):
        view = "grad_weights" if view else "grad"
    if view not in VIEWS:
        raise GradGraphError(f"graph_inputs: view must be one of {VIEWS}, got {view!r}")
    normalised = NormalizeFactors(log_scales=True)(graph)
    normalised.x = normalised.x.clone()
    if view == "weights":
        normalised.x[:, [1, 2]] = 0.0
        zeros = normalised.act.new_zeros(normalised.num_nodes, 1)
        normalised.act, normalised.grad = zeros, zeros.clone()
        normalised.component_sample = torch.zeros(1, dtype=torch.long)
    else:
        if view == "grad":
            normalised.x[:, [0, 3]] = 0.0
            normalised.edge_attr = torch.zeros_like(normalised.edge_attr)
        # exact per-datapoint quantities, from the unpooled (unnormalised) graph
        per_datapoint = torch.stack([graph.loss.double().clamp_min(1e-12).log(),
                                     graph.per_sample_grad_norms().double().clamp_min(1e-30).log()], -1)
        if pool:
            normalised = pool_components(normalised)
        else:  # every component keeps its own factors; it reads its datapoint's exact quantities
            normalised.component_x = torch.stack([normalised.act.abs(), normalised.grad.abs()], -1)
            per_datapoint = per_datapoint[normalised.component_sample.reshape(-1).long()]
        normalised.component_x = torch.cat([per_datapoint.to(normalised.act.dtype)[None].expand(
            normalised.num_nodes, -1, -1), normalised.component_x], -1).contiguous()
    for key in ("x", "edge_attr", "act", "grad", "y", "loss", "component_x", "stats"):
        if key in normalised:
            normalised[key] = normalised[key].to(dtype)
    return normalised


class GraphRegressor(nn.Module):
    r"""A graph model with one invariant output, squashed into ``(0, 1)``:

    .. math::
        \hat y = \sigma\big(f(\tilde G) + \operatorname{logit} \bar y\big),\qquad
        f(\tilde G) = \mathrm{GMN}(\tilde G)_{\text{graph}}
        \quad\text{or}\quad \mathrm{MLP}\big([\mathrm{GMN}(\tilde G)_{\text{graph}} \Vert \tilde s]\big),

    where :math:`\tilde G` has its ``x`` and ``edge_attr`` columns standardised with the training
    graphs' mean and std (:meth:`fit_scaling`; the log-scales of :class:`NormalizeFactors` span
    tens of units), :math:`\tilde s` is the graph's ``stats [1, F]`` (invariant statistics, e.g.
    of its per-sample gradient norms) standardised the same way, and :math:`\bar y` is the mean
    training accuracy. An accuracy lies in ``[0, 1]``: the sigmoid keeps a prediction for an
    unusual network from leaving it. In training mode GradMetaNet reads
    ``config.train_components`` random components of :math:`\tilde G` (the same for every graph
    of the batch; :meth:`subsample_components`), in evaluation mode all of them.

    Args:
        config: sizes.
        offset: :math:`\bar y`.
        architecture: ``"gradmetanet"``, ``"gradmetanet_pp"`` (both read the factors) or
            ``"metanet"`` (GradMetaNet without component layers: a graph metanetwork on the
            weights, channels as neurons).
        stats_features: ``F`` (0: no statistics).

    Shapes: ``forward(batch)`` returns ``[G, 1]``.
    """

    def __init__(self, config: ModelConfig, offset: float, architecture: str = "gradmetanet",
                 stats_features: int = 0) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise GradGraphError(f"GraphRegressor: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.architecture = architecture
        self.datapoints = config.pp_datapoints if architecture == "gradmetanet_pp" else 0
        self.train_components = config.train_components if architecture == "gradmetanet" else 0
        out = config.stats_channels if stats_features else 1
        widths = dict(node_in_channels=4, edge_in_channels=2)  # graph_inputs: x [N, 4], edge_attr [E, 2]
        if architecture == "gradmetanet":
            self.network = GradMetaNet.for_graph_prediction(
                out, config.hidden_channels, component_channels=config.component_channels,
                num_component_layers=config.num_component_layers, num_node_layers=config.num_node_layers,
                component_in_channels=COMPONENT_FEATURES, **widths)
        elif architecture == "gradmetanet_pp":
            self.network = GradMetaNetPlusPlus.for_graph_prediction(
                out, config.pp_channels, num_layers=config.pp_layers, heads=config.pp_heads,
                component_in_channels=COMPONENT_FEATURES, **widths)
        else:
            self.network = GradMetaNet.for_graph_prediction(out, config.hidden_channels, num_component_layers=0,
                                                            num_node_layers=config.metanet_layers, **widths)
        self.head = None
        if stats_features:
            self.head = nn.Sequential(nn.Linear(out + stats_features, config.stats_channels), nn.SiLU(),
                                      nn.Linear(config.stats_channels, 1))
        offset = min(max(float(offset), 1e-3), 1 - 1e-3)
        self.register_buffer("offset", torch.tensor(offset).logit())
        for name in ("x_mean", "x_std", "edge_mean", "edge_std", "stats_mean", "stats_std"):
            self.register_buffer(name, torch.zeros(0))

    def fit_scaling(self, graphs: list[GradGraph]) -> None:
        """Set the standardisation of ``x``, ``edge_attr`` (and ``stats``) columns from ``graphs`` (training set)."""
        x = torch.cat([graph.x for graph in graphs])
        edges = torch.cat([graph.edge_attr for graph in graphs])
        self.x_mean, self.x_std = x.mean(0), x.std(0).clamp_min(1e-6)
        self.edge_mean, self.edge_std = edges.mean(0), edges.std(0).clamp_min(1e-6)
        if self.head is not None:
            stats = torch.cat([graph.stats for graph in graphs])
            self.stats_mean, self.stats_std = stats.mean(0), stats.std(0).clamp_min(1e-6)

    @staticmethod
    def subsample_components(batch, keep: int):  # noqa: ANN001, ANN205 - a PyG Batch in and out
        """The batch with ``keep`` of its components drawn at random (torch's global stream), the
        same for every graph: ``act``/``grad`` ``[N, B] -> [N, keep]``, ``component_x``
        ``[N, B, F] -> [N, keep, F]``, ``component_sample`` ``[G, B] -> [G, keep]``."""
        chosen = torch.randperm(batch.act.shape[1], device=batch.act.device)[:keep]
        batch = batch.clone()
        batch.act, batch.grad = batch.act[:, chosen], batch.grad[:, chosen]
        if "component_x" in batch:
            batch.component_x = batch.component_x[:, chosen]
        batch.component_sample = batch.component_sample[..., chosen]
        return batch

    def forward(self, batch) -> Tensor:  # noqa: ANN001 - a PyG Batch
        if self.x_mean.numel():
            batch = batch.clone()
            batch.x = (batch.x - self.x_mean) / self.x_std
            batch.edge_attr = (batch.edge_attr - self.edge_mean) / self.edge_std
        if self.datapoints and batch.act.shape[1] > self.datapoints:  # the components of datapoints < k
            batch = batch.clone()
            keep = batch.component_sample.reshape(-1, batch.act.shape[1])[0] < self.datapoints
            batch.act, batch.grad = batch.act[:, keep], batch.grad[:, keep]
            batch.component_x = batch.component_x[:, keep]
            batch.component_sample = batch.component_sample[..., keep]
        if self.training and self.train_components and batch.act.shape[1] > self.train_components:
            batch = self.subsample_components(batch, self.train_components)
        out = self.network(batch).graph
        if self.head is not None:
            stats = batch.stats if not self.stats_mean.numel() else (batch.stats - self.stats_mean) / self.stats_std
            out = self.head(torch.cat([out, stats.to(out.dtype)], -1))
        return torch.sigmoid(out + self.offset)
