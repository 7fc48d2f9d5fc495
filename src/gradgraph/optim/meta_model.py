"""The meta-model of the learned optimizer: the paper's update rule with meta-learned parts.

.. math::
    m_t = \\mu\\, m_{t-1} + (1 - \\mu)\\, \\nabla_t, \\qquad
    \\theta_{t+1} = \\theta_t - \\alpha \\bigl(\\beta\\, F(\\phi_t \\Vert e_t) + m_t\\bigr)

with ``φ_t`` the 19 per-parameter features of :mod:`gradgraph.optim.features`, ``e_t`` the
per-parameter embedding GradMetaNet computes from the batch's rank-1 factors and their
EMAs (absent in the "DeepSets" variant), ``F`` a per-parameter MLP and ``α, β, μ``
meta-learned scalars (initialised at 0.1, 0.001, 0.9 as the paper). With ``β = 0`` the rule
is SGD with momentum. ``m`` is an EMA of the gradient, so ``α`` is the learning rate of
that SGD-with-momentum part. The paper's three variants (:attr:`MetaModelConfig.learned_term`,
:attr:`MetaModelConfig.use_gradmetanet`):

* **SGDM** — ``β = 0`` fixed, no ``F``: ``θ_{t+1} = θ_t − α m_t``, only ``α`` and ``μ`` learned;
* **DeepSets** — ``F = MLP(φ_t)``, a per-parameter MLP;
* **GradMetaNet** — ``F = MLP(φ_t ‖ e_t)``, DeepSets plus GradMetaNet's embedding ``e_t``,
  which is divided by its root mean square over each parameter tensor (per particle, per
  channel) like every other feature (:attr:`MetaModelConfig.normalize_embedding`), and
  computed from the factors of every example of the batch by default.

With ``residual_adam=True`` (the default of meta-training runs, off in the paper's rule),
``F = d_t + MLP(φ_t ‖ e_t)`` with ``d_t = m̂_t / (√v̂_t + 10⁻⁸)`` Adam's direction
(bias-corrected EMAs of ∇ and ∇², decays 0.9 and 0.999): the rule then starts as Adam with
learning rate ``αβ`` plus a little SGD momentum, and meta-training learns a correction to it.
A budget of a few hundred outer steps on CPU cannot discover per-parameter adaptivity from
scratch (measured: without it the learned rule did not reach tuned Adam's loss); the paper's
50,000 steps can.

With ``schedule=True`` the whole step is multiplied by a learned function of time,
``s(t) = exp(w · τ_t)`` with ``τ_t`` the eleven time features and ``w`` eleven meta-learned
numbers that start at zero (``s = 1``): the rule can learn a learning-rate schedule (warm-up,
decay) directly, which a per-parameter ``F`` added to the step can only imitate. Tuned decay
alone is worth 1.4x over constant Adam on MNIST-1D (docs/learned_optimizer.md), so a learned
rule needs a schedule to be compared with one.

All state and all inputs carry a leading particle axis ``P``, so the inner runs of
meta-training are stepped together and their graphs go through ONE batched GradMetaNet
forward; :class:`~gradgraph.optim.LearnedOptimizer` uses ``P = 1``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.convert import to_graph
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn import GradMetaNet, GradMetaNetConfig
from gradgraph.optim.features import (
    FACTOR_DECAYS,
    MOMENTUM_DECAYS,
    NUM_PARAMETER_FEATURES,
    SECOND_MOMENT_DECAY,
    TIME_SCALES,
    flat_parameter_features,
    normalize_factors,
    segment_rms_normalize,
    time_features,
    update_emas,
)
from gradgraph.optim.parameter_layout import ParameterLayout
from gradgraph.optim.per_graph import per_graph_parameters

__all__ = ["LearnedUpdate", "MetaModelConfig", "OptimizerState", "ParameterLayout"]


@dataclass
class MetaModelConfig:
    """Architecture and initial scalars of :class:`LearnedUpdate`.

    Attributes:
        use_gradmetanet: ``False`` gives the per-parameter-MLP-only ("DeepSets") variant.
        embedding_dim: width of GradMetaNet's per-parameter embedding (paper: 14).
        mlp_hidden: width of ``F``'s hidden layers; ``mlp_layers`` of them (paper: 3 × 32).
        gradmetanet: GradMetaNet's sizes (small by default, for CPU speed); a dict is
            read as one (as a checkpoint stores it).
        max_components: GradMetaNet reads the factors of at most this many components of
            the batch, the first ones in the graph's order, which runs datapoint by datapoint:
            for an MLP (one component per datapoint) the first datapoints, a random subset as
            batches are drawn at random; for a transformer or a CNN (one component per token or
            position) every component of the first datapoints. Its cost grows linearly with
            them; ``None`` (the default) reads all, as the paper (128 datapoints of an MLP). The
            files shipped before issue 29 store 32.
        residual_adam: ``F = Adam's direction + MLP`` (module docstring); ``False``: ``F = MLP``.
        alpha, beta, mu: initial values of the meta-learned scalars.
        learned_term: ``False`` gives the SGDM variant: no ``F``, ``β = 0`` fixed (a buffer,
            not a parameter), only ``α`` and ``μ`` are learned.
        schedule: multiply the step by a learned schedule ``s(t) = exp(w · τ_t)`` (module
            docstring); ``w`` starts at zero and is one of :attr:`LearnedUpdate.scalar_parameters`.
            Files written before this option existed load with ``False``.
        normalize_embedding: divide GradMetaNet's embedding by its RMS over each parameter
            tensor (per particle, per channel), so it enters ``F`` at the scale of every other
            feature (un-normalised its RMS was 0.04-0.4, issue 29). Files written before this
            option existed load with ``False`` (:func:`gradgraph.optim.meta_model_from_checkpoint`).
    """

    use_gradmetanet: bool = True
    embedding_dim: int = 14
    mlp_hidden: int = 32
    mlp_layers: int = 3
    gradmetanet: GradMetaNetConfig = field(default_factory=lambda: GradMetaNetConfig(
        hidden_channels=16, component_channels=8, num_component_layers=1, num_node_layers=1, product_channels=8))
    max_components: int | None = None
    residual_adam: bool = False
    alpha: float = 0.1
    beta: float = 0.001
    mu: float = 0.9
    learned_term: bool = True
    normalize_embedding: bool = True
    schedule: bool = False

    #: Names the sizes had before they became :attr:`gradmetanet` (files written then use them).
    LEGACY_SIZE_NAMES = {
        "gmn_hidden": "hidden_channels",
        "gmn_component": "component_channels",
        "gmn_component_layers": "num_component_layers",
        "gmn_node_layers": "num_node_layers",
        "gmn_product_channels": "product_channels",
    }

    def __post_init__(self) -> None:
        if isinstance(self.gradmetanet, dict):
            self.gradmetanet = GradMetaNetConfig(**self.gradmetanet)
        if not self.learned_term and (self.use_gradmetanet or self.residual_adam):
            raise GradGraphError("MetaModelConfig: the SGDM variant (learned_term=False) has no F, so it needs "
                                 "use_gradmetanet=False and residual_adam=False")
        if self.max_components is not None and self.max_components < 1:
            raise GradGraphError(f"MetaModelConfig.max_components must be >= 1 or None, got {self.max_components}")

    def to_dict(self) -> dict:
        """JSON-serialisable form (stored in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MetaModelConfig":
        """Inverse of :meth:`to_dict`; also reads the flat ``gmn_*`` sizes of files written before
        :attr:`gradmetanet` existed (the shipped pretrained meta-models)."""
        values = dict(values)
        legacy = {new: values.pop(old) for old, new in cls.LEGACY_SIZE_NAMES.items() if old in values}
        if legacy:
            values["gradmetanet"] = {**asdict(cls().gradmetanet), **legacy}
        return cls(**values)


@dataclass
class OptimizerState:
    """What the update rule carries between steps, for ``P`` particles.

    Attributes:
        step: ``[P]`` steps taken (int64).
        momentum: ``{name: [P, *shape]}`` the ``μ``-momentum ``m``.
        momenta: ``{name: [P, *shape, 7]}`` the six fixed-decay gradient momenta (features)
            and, last, the EMA of the squared gradient (decay 0.999).
        factor_emas: ``[P·N, B, 2·6]`` EMAs of the normalised ``(act, grad)`` of every
            node and batch slot; ``None`` before the first step or without GradMetaNet.
    """

    step: Tensor
    momentum: dict[str, Tensor]
    momenta: dict[str, Tensor]
    factor_emas: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{key: tensor}`` view (for ``state_dict``)."""
        flat = {"step": self.step}
        flat.update({f"momentum.{k}": v for k, v in self.momentum.items()})
        flat.update({f"momenta.{k}": v for k, v in self.momenta.items()})
        if self.factor_emas is not None:
            flat["factor_emas"] = self.factor_emas
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, Tensor]) -> "OptimizerState":
        """Inverse of :meth:`tensors`."""
        momentum = {k[len("momentum."):]: v for k, v in flat.items() if k.startswith("momentum.")}
        momenta = {k[len("momenta."):]: v for k, v in flat.items() if k.startswith("momenta.")}
        return cls(step=flat["step"], momentum=momentum, momenta=momenta, factor_emas=flat.get("factor_emas"))

    def detach(self) -> "OptimizerState":
        """The same state cut from the autograd graph (truncation boundary)."""
        return OptimizerState(
            step=self.step,
            momentum={k: v.detach() for k, v in self.momentum.items()},
            momenta={k: v.detach() for k, v in self.momenta.items()},
            factor_emas=None if self.factor_emas is None else self.factor_emas.detach(),
        )

    def select(self, keep: Tensor, fresh: "OptimizerState") -> "OptimizerState":
        """Per particle, this state where ``keep [P]`` is true and ``fresh`` elsewhere."""

        def pick(old: Tensor, new: Tensor) -> Tensor:
            return torch.where(keep.reshape(-1, *([1] * (old.dim() - 1))), old, new)

        emas = None
        if self.factor_emas is not None:
            # A restarted run's EMAs restart at zero (the fresh state has none yet).
            per_particle = self.factor_emas.reshape(keep.shape[0], -1, *self.factor_emas.shape[1:])
            fresh_emas = (torch.zeros_like(per_particle) if fresh.factor_emas is None
                          else fresh.factor_emas.reshape(per_particle.shape))
            emas = pick(per_particle, fresh_emas).reshape(self.factor_emas.shape)
        return OptimizerState(
            step=torch.where(keep, self.step, fresh.step),
            momentum={k: pick(v, fresh.momentum[k]) for k, v in self.momentum.items()},
            momenta={k: pick(v, fresh.momenta[k]) for k, v in self.momenta.items()},
            factor_emas=emas,
        )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class LearnedUpdate(nn.Module):
    """The learned update rule (see the module docstring for the equation).

    Args:
        config: a :class:`MetaModelConfig`.

    Shapes (``P`` particles):
        - ``params``, ``grads``: ``{name: [P, *shape]}``
        - ``graphs``: a ``Batch`` of ``P`` GradGraphs of one architecture (ignored without GradMetaNet)
        - output: new ``params`` ``{name: [P, *shape]}`` and the new :class:`OptimizerState`
    """

    def __init__(self, config: MetaModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MetaModelConfig()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(config.alpha)))
        if config.learned_term:
            self.log_beta = nn.Parameter(torch.tensor(math.log(config.beta)))
        else:  # SGDM: β = e^{-∞} = 0 exactly, and nothing meta-training can move
            self.register_buffer("log_beta", torch.tensor(-math.inf))
        self.logit_mu = nn.Parameter(torch.tensor(_logit(config.mu)))
        self.schedule: nn.Parameter | None = None
        if config.schedule:
            self.schedule = nn.Parameter(torch.zeros(len(TIME_SCALES)))
        self.gradmetanet: GradMetaNet | None = None
        self.mlp: nn.Sequential | None = None
        embedding = 0
        if config.use_gradmetanet:
            embedding = config.embedding_dim
            # Input widths inferred by _materialize (as before they were explicit), so a seed
            # still gives the initial weights it gave.
            self.gradmetanet = GradMetaNet.from_config(
                config.gradmetanet,
                edge_out_channels=embedding,
                node_out_channels=embedding,
                node_in_channels=-1,
                edge_in_channels=-1,
                component_in_channels=-1,
            )
        if config.learned_term:
            layers: list[nn.Module] = []
            width = NUM_PARAMETER_FEATURES + embedding
            for _ in range(config.mlp_layers):
                layers += [nn.Linear(width, config.mlp_hidden), nn.ReLU()]
                width = config.mlp_hidden
            layers.append(nn.Linear(width, 1))
            self.mlp = nn.Sequential(*layers)
        self._zero_residual()
        # float64, so each step's cast to the parameters' dtype rounds the decimal decays once
        # (a float32 buffer gave a float64 rule 0.1000000015 for 0.1)
        self.register_buffer("momentum_decays", torch.tensor(MOMENTUM_DECAYS, dtype=torch.float64), persistent=False)
        self.register_buffer("factor_decays", torch.tensor(FACTOR_DECAYS, dtype=torch.float64), persistent=False)
        self._layouts: dict[tuple, ParameterLayout] = {}
        self._segment_cache: tuple[tuple, Tensor] | None = None  # the flat layout's segments (forward)
        if self.gradmetanet is not None:
            self._materialize()

    def _materialize(self) -> None:
        """Run GradMetaNet once on a tiny graph so its lazily sized layers get parameters.

        Then ``parameters()``, ``state_dict()`` loading and flat parameter vectors (PES)
        work before the first real step. The dummy data uses a private generator, so the
        global random stream is consumed only by the layers' own initialisation.
        """
        generator = torch.Generator().manual_seed(0)
        tiny = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        with torch.no_grad():
            for p in tiny.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        inputs = torch.randn(3, 2, generator=generator)
        targets = torch.zeros(3, dtype=torch.long)
        graph = to_graph(tiny, inputs, targets, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
        graph.component_x = graph.act.new_zeros(*graph.act.shape, 2 * len(FACTOR_DECAYS))
        with torch.no_grad():
            self.gradmetanet(Batch.from_data_list([graph]))

    # ------------------------------------------------------------------ scalars
    @property
    def alpha(self) -> Tensor:
        """``α``, the step size (scalar tensor)."""
        return self.log_alpha.exp()

    @property
    def beta(self) -> Tensor:
        """``β``, the weight of the learned term (0 in the SGDM variant)."""
        return self.log_beta.exp()

    @property
    def scalar_parameters(self) -> list[nn.Parameter]:
        """The meta-learned scalars ``log α``, ``log β`` (not in the SGDM variant), ``logit μ`` and,
        with ``schedule``, the schedule's eleven weights ``w``: the few numbers that set the step
        size, trained at their own outer rate (and alone in a scalars-first stage)."""
        return [p for p in (self.log_alpha, self.log_beta, self.logit_mu, self.schedule) if isinstance(p, nn.Parameter)]

    def step_scale(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        """``[P] -> [P]``: ``α s(t)`` at steps ``step`` (``s = 1`` without a schedule)."""
        alpha = self.alpha.to(dtype)
        if self.schedule is None:
            return alpha.expand(step.shape[0])
        return alpha * torch.exp(time_features(step, dtype) @ self.schedule.to(dtype))

    @property
    def mu(self) -> Tensor:
        """``μ``, the decay of the momentum term."""
        return torch.sigmoid(self.logit_mu)

    def _zero_residual(self) -> None:
        """With ``residual_adam`` the correction starts at zero, so the rule starts as Adam (+ momentum)."""
        if self.config.residual_adam and self.mlp is not None:
            with torch.no_grad():
                self.mlp[-1].weight.zero_()
                self.mlp[-1].bias.zero_()

    def reset_parameters(self) -> None:
        """Re-initialise ``F``, GradMetaNet and the scalars."""
        for module in self.mlp or ():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        self._zero_residual()
        if self.gradmetanet is not None:
            self.gradmetanet.reset_parameters()
        with torch.no_grad():
            self.log_alpha.fill_(math.log(self.config.alpha))
            if self.config.learned_term:
                self.log_beta.fill_(math.log(self.config.beta))
            self.logit_mu.fill_(_logit(self.config.mu))
            if self.schedule is not None:
                self.schedule.zero_()

    @property
    def needs_graph(self) -> bool:
        """Whether :meth:`forward` reads the factors (the GradMetaNet variant)."""
        return self.gradmetanet is not None

    # ------------------------------------------------------------------ state
    def init_state(self, params: dict[str, Tensor]) -> OptimizerState:
        """Zero state for ``params {name: [P, *shape]}``."""
        first = next(iter(params.values()))
        decays = len(MOMENTUM_DECAYS)
        return OptimizerState(
            step=torch.zeros(first.shape[0], dtype=torch.long, device=first.device),
            momentum={k: torch.zeros_like(v) for k, v in params.items()},
            momenta={k: v.new_zeros(*v.shape, decays + 1) for k, v in params.items()},
            factor_emas=None,
        )

    def layout(self, graph: GradGraph) -> ParameterLayout:
        """The :class:`ParameterLayout` of ``graph``'s architecture (cached)."""
        key = (tuple(graph.param_names), tuple(tuple(s) for s in graph.param_shapes), int(graph.num_nodes),
               int(graph.edge_index.shape[1]), str(graph.edge_index.device))
        if key not in self._layouts:
            self._layouts[key] = ParameterLayout.from_graph(graph)
        return self._layouts[key]

    def embed(self, graphs: Batch, first: GradGraph, state: OptimizerState, num_particles: int,
              per_particle: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """GradMetaNet's per-parameter embedding ``{name: [P, *shape, k]}`` and the new factor EMAs.

        Args:
            graphs: a ``Batch`` of the ``P`` runs' GradGraphs (one architecture).
            first: one of them (its architecture is read).
            state: the runs' :class:`OptimizerState` (its factor EMAs are read).
            num_particles: ``P``.
            per_particle: ``{name: [P, *shape]}`` GradMetaNet's parameters for every run (names
                as in ``self.gradmetanet``): graph ``p`` is embedded with set ``p``, all in ONE
                forward (:func:`gradgraph.optim.per_graph.per_graph_parameters`; PES runs every
                particle with its own meta-parameters). ``None``: this module's parameters for all.
        """
        assert self.gradmetanet is not None
        act, grad = graphs.act, graphs.grad
        if self.config.max_components is not None:
            # Slice before stacking: only the components GradMetaNet reads are copied.
            act, grad = act[:, : self.config.max_components], grad[:, : self.config.max_components]
        factors = torch.stack([act, grad], dim=-1)  # [P·N, B, 2]
        factors = factors.to(self.log_alpha.dtype)
        factors = normalize_factors(factors, first.layer, num_particles)
        emas = state.factor_emas
        if emas is None or emas.shape[:2] != factors.shape[:2]:
            # First step, or a batch of another size: EMAs indexed by batch slot restart.
            emas = factors.new_zeros(*factors.shape, len(FACTOR_DECAYS))
        else:
            emas = emas.reshape(*factors.shape, len(FACTOR_DECAYS))
        emas = update_emas(emas, factors, self.factor_decays.to(factors.dtype))
        flat_emas = emas.flatten(-2)
        graphs.act, graphs.grad = factors[..., 0], factors[..., 1]
        graphs.component_x = flat_emas
        graphs.x = graphs.x.to(factors.dtype)
        graphs.edge_attr = graphs.edge_attr.to(factors.dtype)
        if per_particle is None:
            output = self.gradmetanet(graphs)
        else:
            with per_graph_parameters(self.gradmetanet, per_particle, num_particles) as gradmetanet:
                output = gradmetanet(graphs)
        layout = self.layout(first)
        return layout.scatter(output.edge, output.node, num_particles), flat_emas

    # ------------------------------------------------------------------ the update
    def forward(
        self,
        params: dict[str, Tensor],
        grads: dict[str, Tensor],
        state: OptimizerState,
        graphs: Batch | None = None,
        first_graph: GradGraph | None = None,
        embeddings: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], OptimizerState]:
        """One step of the update rule for ``P`` particles.

        Args:
            params: ``{name: [P, *shape]}`` current parameters (may carry autograd history).
            grads: ``{name: [P, *shape]}`` mean gradients of the batch's loss.
            state: the :class:`OptimizerState` of the ``P`` runs.
            graphs: a ``Batch`` of the ``P`` runs' GradGraphs on this batch (GradMetaNet variant).
            first_graph: one of those graphs (its architecture is read; ``graphs[0]`` if omitted).
            embeddings: GradMetaNet's embedding ``{name: [P, *shape, k]}`` computed by the caller
                (:meth:`embed`); then ``graphs`` is not read and the new state carries
                ``state.factor_emas`` as they are (the caller has :meth:`embed`'s).

        Returns:
            ``(new_params, new_state)``.
        """
        if set(params) != set(grads):
            raise GradGraphError(f"LearnedUpdate: params and grads name different tensors: {sorted(set(params) ^ set(grads))}")
        num_particles = next(iter(params.values())).shape[0]
        dtype = next(iter(params.values())).dtype
        # Every tensor of the step is laid end to end ([P, D], D the parameters of all tensors):
        # the rule is elementwise but for the per-tensor RMS of its features, taken by segment,
        # so a step is a few dozen ops whatever the number of tensors (the same numbers as the
        # rule tensor by tensor, up to the order of the RMS sums).
        names = list(params)
        numels = [params[name][0].numel() for name in names]

        def flat(values: dict[str, Tensor], *trailing: int) -> Tensor:
            parts = [values[name].reshape(num_particles, -1, *trailing) for name in names]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        def unflat(values: Tensor, *trailing: int) -> dict[str, Tensor]:
            parts = values.split(numels, dim=1) if len(names) > 1 else (values,)
            return {name: part.reshape(*params[name].shape, *trailing) for name, part in zip(names, parts)}

        mu = self.mu.to(dtype)
        momentum_decays = self.momentum_decays.to(dtype)
        step = state.step + 1
        grad = flat(grads)
        momentum = mu * flat(state.momentum) + (1 - mu) * grad
        # update_emas written out with (1 − d) computed once per step: the same numbers.
        old_momenta = flat(state.momenta, len(MOMENTUM_DECAYS) + 1)
        momenta = torch.cat([momentum_decays * old_momenta[..., :-1] + (1 - momentum_decays) * grad.unsqueeze(-1),
                             (SECOND_MOMENT_DECAY * old_momenta[..., -1]
                              + (1 - SECOND_MOMENT_DECAY) * grad.square()).unsqueeze(-1)], dim=-1)
        new_momentum, new_momenta = unflat(momentum), unflat(momenta, len(MOMENTUM_DECAYS) + 1)
        scale = self.step_scale(step, dtype)[:, None]  # [P, 1]: α, times the schedule if there is one
        values = flat(params)
        if self.mlp is None:  # SGDM: no learned term at all
            new_params = unflat(values - scale * momentum)
            return new_params, OptimizerState(step=step, momentum=new_momentum, momenta=new_momenta)
        times = time_features(step, dtype)  # [P, 11]
        emas = None
        if self.gradmetanet is None:
            embeddings = {}
        elif embeddings is not None:
            emas = state.factor_emas
        else:
            if graphs is None:
                raise GradGraphError("LearnedUpdate: the GradMetaNet variant needs the batch's graphs")
            first = first_graph if first_graph is not None else graphs.get_example(0)
            embeddings, emas = self.embed(graphs, first, state, num_particles)
        segments = self._segments(numels, values)
        features = flat_parameter_features(values, grad, momenta[..., :-1], segments)
        parts = [features, times[:, None, :].expand(-1, features.shape[1], -1)]
        if embeddings:
            embedding = flat(embeddings, next(iter(embeddings.values())).shape[-1]).to(dtype)
            if self.config.normalize_embedding:
                # Per particle and channel over each tensor, as the features: a positive scale
                # shared by the tensor, so equivariance is kept.
                embedding = segment_rms_normalize(embedding, segments)
            parts.append(embedding)
        learned = self.mlp(torch.cat(parts, dim=-1).to(self.mlp[0].weight.dtype)).squeeze(-1).to(dtype)
        if self.config.residual_adam:
            learned = learned + self.adam_direction(momenta, step)
        new_params = unflat(values - scale * (self.beta.to(dtype) * learned + momentum))
        new_state = OptimizerState(step=step, momentum=new_momentum, momenta=new_momenta, factor_emas=emas)
        return new_params, new_state

    def _segments(self, numels: list[int], like: Tensor) -> Tensor:
        """``[D, S]`` one-hot: which of the ``S`` tensors each entry of the flat layout belongs to
        (in ``like``'s dtype and device; kept for the last layout)."""
        key = (tuple(numels), like.dtype, str(like.device))
        if self._segment_cache is None or self._segment_cache[0] != key:
            which = torch.repeat_interleave(torch.tensor(numels, device=like.device))  # 0 … S−1, each numel times
            self._segment_cache = (key, F.one_hot(which, len(numels)).to(like.dtype))
        return self._segment_cache[1]

    @staticmethod
    def adam_direction(momenta: Tensor, step: Tensor) -> Tensor:
        """``m̂ / (√v̂ + 1e-8)`` from ``momenta [P, *shape, 7]`` (channel 2: decay 0.9; last: ∇² EMA) at ``step [P]``."""
        shape = (-1,) + (1,) * (momenta.dim() - 2)
        t = step.to(momenta.dtype).reshape(shape)
        first = momenta[..., 2] / (1 - MOMENTUM_DECAYS[2] ** t)
        second = momenta[..., -1] / (1 - SECOND_MOMENT_DECAY ** t)
        return first / (second.sqrt() + 1e-8)

    def extra_repr(self) -> str:
        return f"gradmetanet={self.gradmetanet is not None}, embedding={self.config.embedding_dim if self.gradmetanet is not None else 0}"
