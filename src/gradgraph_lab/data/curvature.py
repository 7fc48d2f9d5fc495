"""The curvature dataset: SIREN gradients at 128 points -> exact Fisher diagonal at 1024 others.

One item is one network of the zoo (:mod:`gradgraph_lab.data.siren_zoo`):

* **input** — ``to_graph(siren, x_128, loss_fn=None)``: the output-mode factors
  ``act``, ``grad`` ``[N, 128]`` (their products are ``∇θ f(x_i)``) plus the network's
  weights (edges) and biases (nodes);
* **target** — the Fisher diagonal ``E_x[(∂f/∂θ)²]`` from 1024 *independent* points of
  the same ``X_p``, per weight (edge) and per bias (node), computed exactly from factors.

The zoo is a :class:`gradgraph.datasets.ModelZoo` (one dataset API for every zoo: atomic,
resumable, rank-sharded shards of graphs; each network converted on its own input points, the
targets stored as extra per-graph fields). All networks share one architecture, so
:func:`load_curvature_data` then stacks the graphs' tensors next to a single
template :class:`~gradgraph.GradGraph`; :meth:`CurvatureData.graph` rebuilds item ``i`` and
:class:`GraphBatcher` builds a PyG batch of many items without a Python loop over graphs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph_lab.data.cache import config_hash, default_cache_root
from gradgraph_lab.data.siren_zoo import InputFamily, fisher_diagonal, make_siren, sample_inputs, siren_graph
from gradgraph_lab.distributed import DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.context import STRUCTURE_MEMO

__all__ = ["SirenDraw", "SirenZooConfig", "CurvatureData", "GraphBatcher", "draw_network", "load_curvature_data",
           "net_generator"]


@dataclass(frozen=True)
class SirenZooConfig:
    """What the curvature zoo holds. Every field is part of the cache key.

    Attributes:
        num_nets: networks in the zoo (train + val + test).
        hidden: hidden widths of every SIREN (``1 -> hidden -> 1``).
        num_inputs: ``B``, gradients the model sees per network (128 in the paper).
        num_target_points: independent points the target Fisher averages over (1024).
        family: the input-distribution family ``X_p``.
        w0: sine frequency of the SIRENs.
        seed: zoo seed; network ``i`` depends only on ``(seed, i)``.
        shard_size: networks per cache shard (the unit of resumption).
    """

    num_nets: int = 3000
    hidden: tuple[int, ...] = (32, 32)
    num_inputs: int = 128
    num_target_points: int = 1024
    family: InputFamily = field(default_factory=InputFamily)
    w0: float = 1.0
    seed: int = 0
    shard_size: int = 250

    def __post_init__(self) -> None:
        for name in ("num_nets", "num_inputs", "num_target_points", "shard_size"):
            if getattr(self, name) < 1:
                raise GradGraphError(f"SirenZooConfig.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "hidden", tuple(int(width) for width in self.hidden))

    def cache_key_fields(self) -> dict[str, Any]:
        """The JSON-able configuration hashed into the cache key (includes a format version)."""
        fields = dataclasses.asdict(self)
        fields["hidden"] = list(self.hidden)
        fields["format"] = 2  # 2: a ModelZoo of graphs (1: ShardedCache of stacked tensors)
        return fields


def net_generator(seed: int, index: int) -> torch.Generator:
    """The random source of network ``index``: independent of every other network and of
    the order networks are generated in, so a resumed cache equals a fresh one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@dataclass
class SirenDraw:
    """Network ``index`` of the zoo, drawn: the SIREN (float64), its ``p``, the ``B`` points the
    model sees and the independent points its target Fisher averages over (``[n, 1]`` each)."""

    siren: nn.Module
    p: float
    inputs: Tensor
    target_points: Tensor


def draw_network(config: SirenZooConfig, index: int) -> SirenDraw:
    """Draw network ``index`` from ``net_generator(config.seed, index)`` in a fixed order:
    the weights, ``p``, the ``num_inputs`` seen points, the ``num_target_points`` target points."""
    generator = net_generator(config.seed, index)
    siren = make_siren(config.hidden, generator=generator, w0=config.w0)
    p = float(torch.rand((), generator=generator, dtype=torch.float64))
    inputs = sample_inputs(config.family, p, config.num_inputs, generator=generator)
    target_points = sample_inputs(config.family, p, config.num_target_points, generator=generator)
    return SirenDraw(siren, p, inputs, target_points)


class _Draws:
    """The zoo's networks for :class:`~gradgraph.datasets.ModelZoo`: ``builder``, per-model
    ``inputs`` and ``fields`` all read one :func:`draw_network` per index (the last one kept)."""

    def __init__(self, config: SirenZooConfig) -> None:
        self.config, self.index, self.draw = config, -1, None

    def get(self, index: int) -> SirenDraw:
        if index != self.index:
            self.index, self.draw = index, draw_network(self.config, index)
        return self.draw

    def builder(self, index: int) -> nn.Module:
        return self.get(index).siren

    def inputs(self, index: int, model: nn.Module) -> Tensor:
        return self.get(index).inputs

    def fields(self, index: int, model: nn.Module, graph: GradGraph) -> dict[str, Tensor]:
        """The exact Fisher diagonal at the target points (:func:`fisher_diagonal`) and ``p``."""
        draw = self.get(index)
        target_edge, target_node = fisher_diagonal(siren_graph(draw.siren, draw.target_points))
        return {"target_edge": target_edge, "target_node": target_node,
                "p": torch.tensor([draw.p], dtype=torch.float64)}


def template_graph(config: SirenZooConfig) -> GradGraph:
    """A float32 graph of the zoo's architecture (network 0's values); the slots every item shares."""
    siren = make_siren(config.hidden, generator=net_generator(config.seed, 0), w0=config.w0, dtype=torch.float32)
    inputs = torch.zeros(config.num_inputs, 1)
    return siren_graph(siren, inputs)


@dataclass
class CurvatureData:
    """The zoo as stacked tensors (``M`` networks, ``N`` nodes, ``E`` edges, ``B`` inputs).

    Attributes:
        template: one graph of the shared architecture; its slots (edge_index, param maps,
            kinds) are valid for every item.
        act, grad: ``[M, N, B]`` output-mode factors at the ``B`` input points.
        weight: ``[M, E]`` weight on every edge.
        bias: ``[M, N]`` bias of every node (0 for input nodes).
        target_edge: ``[M, E]`` exact Fisher diagonal of every weight.
        target_node: ``[M, N]`` exact Fisher diagonal of every bias (0 where none).
        p: ``[M]`` the input-distribution parameter (for analysis only; no model sees it).
    """

    template: GradGraph
    act: Tensor
    grad: Tensor
    weight: Tensor
    bias: Tensor
    target_edge: Tensor
    target_node: Tensor
    p: Tensor

    def __len__(self) -> int:
        return int(self.act.shape[0])

    @property
    def bias_nodes(self) -> Tensor:
        """``[K]`` indices of the nodes that carry a bias (hidden and output neurons)."""
        return torch.nonzero(self.template.node_param >= 0).reshape(-1)

    @property
    def num_parameters(self) -> int:
        """``P = E + K``, the length of a flattened target."""
        return int(self.weight.shape[1] + self.bias_nodes.numel())

    def targets(self, index: Tensor | slice | None = None) -> Tensor:
        """``[m, P]`` flattened Fisher diagonals: every edge, then every bias node."""
        index = slice(None) if index is None else index
        return torch.cat([self.target_edge[index], self.target_node[index][:, self.bias_nodes]], dim=1)

    def subset(self, index: Tensor) -> "CurvatureData":
        """The items at ``index`` (a ``[m]`` long tensor), sharing the template."""
        return CurvatureData(
            template=self.template,
            **{name: getattr(self, name)[index] for name in _STACKED_FIELDS},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CurvatureData":
        """The same networks with every tensor (and the template) on ``device``; floating
        tensors also cast to ``dtype`` if given (integer slots keep theirs)."""

        def move(tensor: Tensor) -> Tensor:
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            return tensor.to(device=device, dtype=cast)

        return CurvatureData(
            template=copy.copy(self.template).apply(move),
            **{name: move(getattr(self, name)) for name in _STACKED_FIELDS},
        )

    def graph(self, index: int) -> GradGraph:
        """Item ``index`` as a :class:`~gradgraph.GradGraph` (targets as ``target_edge`` /
        ``target_node`` attributes)."""
        if not 0 <= index < len(self):
            raise GradGraphError(f"CurvatureData.graph: index {index} out of range for {len(self)} networks")
        graph = copy.copy(self.template)
        graph.act = self.act[index]
        graph.grad = self.grad[index]
        graph.x = _with_column0(self.template.x, self.bias[index])
        graph.edge_attr = _with_column0(self.template.edge_attr, self.weight[index])
        graph.target_edge = self.target_edge[index]
        graph.target_node = self.target_node[index]
        return graph


_STACKED_FIELDS = ("act", "grad", "weight", "bias", "target_edge", "target_node", "p")


def _with_column0(template: Tensor, values: Tensor) -> Tensor:
    """``template`` (``[..., F]``) with its first column replaced by ``values`` (``[...]``)."""
    out = template.expand(*values.shape, template.shape[-1]).clone()
    out[..., 0] = values
    return out


class GraphBatcher:
    """Builds PyG batches of same-architecture graphs from stacked tensors, loop-free.

    ``Batch.from_data_list([template] * G)`` is computed once per batch size ``G``; every
    call then only swaps in the value tensors. That is what lets the training loop feed
    thousands of graphs per second.

    Args:
        template: the shared-architecture graph.
    """

    def __init__(self, template: GradGraph) -> None:
        self.template = template
        self._batches: dict[int, Batch] = {}

    def _structure(self, num_graphs: int) -> Batch:
        if num_graphs not in self._batches:
            structure = Batch.from_data_list([self.template] * num_graphs)
            # Every batch copied from it has this one architecture: models build the structure
            # part of their GraphContext (layer groups, sparse patterns) once per batch size.
            structure.__dict__[STRUCTURE_MEMO] = {}
            self._batches[num_graphs] = structure
        return self._batches[num_graphs]

    def __call__(
        self,
        act: Tensor,
        grad: Tensor,
        weight: Tensor,
        bias: Tensor,
        *,
        extra_x: Tensor | None = None,
        extra_edge_attr: Tensor | None = None,
        component_x: Tensor | None = None,
    ) -> Batch:
        """A batch of ``G`` graphs.

        Args:
            act, grad: ``[G, N, B']`` factors (``B'`` may differ from the template's ``B``).
            weight: ``[G, E]``; bias: ``[G, N]``.
            extra_x: optional ``[G, N, F]`` features appended to ``x``.
            extra_edge_attr: optional ``[G, E, F]`` features appended to ``edge_attr``.
            component_x: optional ``[G, N, B', F]`` per-component features (``component_x``).

        Returns:
            A PyG ``Batch`` with ``act``/``grad`` ``[G·N, B']``, ``x`` ``[G·N, F_n (+F)]``,
            ``edge_attr`` ``[G·E, F_e (+F)]``; all slot fields as the template's.
        """
        num_graphs, num_nodes = act.shape[:2]
        if num_nodes != self.template.num_nodes or weight.shape[1] != self.template.edge_index.shape[1]:
            raise GradGraphError(
                f"GraphBatcher: got {num_nodes} nodes / {weight.shape[1]} edges per graph, the template has "
                f"{self.template.num_nodes} / {self.template.edge_index.shape[1]}"
            )
        batch = copy.copy(self._structure(num_graphs))
        x = _with_column0(self.template.x, bias)
        edge_attr = _with_column0(self.template.edge_attr, weight)
        if extra_x is not None:
            x = torch.cat([x, extra_x.to(x.dtype)], dim=-1)
        if extra_edge_attr is not None:
            edge_attr = torch.cat([edge_attr, extra_edge_attr.to(edge_attr.dtype)], dim=-1)
        batch.x = x.reshape(num_graphs * num_nodes, -1)
        batch.edge_attr = edge_attr.reshape(-1, edge_attr.shape[-1])
        batch.act = act.reshape(num_graphs * num_nodes, -1)
        batch.grad = grad.reshape(num_graphs * num_nodes, -1)
        if component_x is not None:
            batch.component_x = component_x.reshape(num_graphs * num_nodes, *component_x.shape[2:])
        return batch


def load_curvature_data(
    config: SirenZooConfig,
    *,
    cache_root: Path | str | None = None,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> CurvatureData:
    """The zoo of ``config``, from the cache if it is complete, else generated (resuming).

    The zoo is a :class:`~gradgraph.datasets.ModelZoo` in output mode (``loss_fn=None``): network
    ``i`` (:func:`draw_network`) converted on its own ``B`` input points, with the fields
    ``target_edge [E]``, ``target_node [N]`` (the exact Fisher diagonal at the independent target
    points) and ``p [1]``, computed in float64 and stored in float32 under
    ``cache_root/curvature-siren-<config hash>/processed/`` (atomic, resumable shards). The
    graphs are then stacked (one architecture) into a :class:`CurvatureData`.

    Args:
        config: the zoo configuration (its hash keys the cache directory).
        cache_root: where caches live; default ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``.
        progress: a line per shard built.
        context: with several ranks, missing shards are split across them (shard ``s`` by rank
            ``s % world_size``) and every rank returns the whole zoo.

    Returns:
        A :class:`CurvatureData` with ``config.num_nets`` items, float32, on the CPU.
    """
    from gradgraph.datasets import ModelZoo

    root = Path(default_cache_root() if cache_root is None else cache_root)
    draws = _Draws(config)
    threads = torch.get_num_threads()
    # Each network is a few tiny ops: one thread is fastest, and avoids OpenMP spin-waits
    # that slow generation down by an order of magnitude on a busy machine.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False):
            zoo = ModelZoo(root / f"curvature-siren-{config_hash(config.cache_key_fields())}", range(config.num_nets),
                           draws.inputs, targets=None, loss_fn=None, builder=draws.builder, fields=draws.fields,
                           dtype=torch.float32, shard_size=config.shard_size, name="curvature-siren",
                           rank=None if context is None else context.rank,
                           world_size=None if context is None else context.world_size, log=progress,
                           barrier=None if context is None else lambda: context.barrier("waiting for every rank's "
                                                                                        "curvature zoo shards"))
    finally:
        torch.set_num_threads(threads)
    graphs = zoo.graphs
    stacked = {
        "act": torch.stack([graph.act for graph in graphs]),
        "grad": torch.stack([graph.grad for graph in graphs]),
        "weight": torch.stack([graph.weight for graph in graphs]),
        "bias": torch.stack([graph.bias for graph in graphs]),
        "target_edge": torch.stack([graph.target_edge for graph in graphs]),
        "target_node": torch.stack([graph.target_node for graph in graphs]),
        "p": torch.cat([graph.p for graph in graphs]),
    }
    return CurvatureData(template=template_graph(config), **stacked)
