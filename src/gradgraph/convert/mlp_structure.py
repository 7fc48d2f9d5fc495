"""The architecture-only part of an MLP chain's graph, built once per architecture and shared.

Everything in the graph that depends only on the architecture (edge_index, the edge and node
slot maps, node labels; 40 bytes per weight) is built once per :func:`mlp_signature` and cached
(:data:`STRUCTURE_CACHE`); graphs of one architecture share those tensors, read-only.
:func:`build_mlp_graph` writes the values ``edge_attr``, ``x`` and the factors ``act``, ``grad``,
fresh tensors of every graph, around them.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gradgraph.graph import ActivationKind, EdgeKind, GradGraph, NodeKind

if TYPE_CHECKING:
    from gradgraph.convert.mlp import DenseLayer


#: What the architecture-only tensors of an MLP chain depend on: per Linear
#: ``(in_features, out_features, has_bias, activation)``. The values' dtype is not part of
#: it: the cached tensors are all integer labels and slots.
MlpSignature = tuple[tuple[int, int, bool, int], ...]

#: Fields that depend only on the architecture; every graph of one signature gets the same
#: tensor objects (read-only, see :class:`MlpStructure`).
SHARED_FIELDS = (
    "edge_index",
    "edge_kind",
    "edge_param",
    "edge_param_pos",
    "layer",
    "node_kind",
    "activation",
    "perm_group",
    "perm_block",
    "perm_tie",
    "position",
    "node_param",
    "node_param_pos",
)


def mlp_signature(layers: list[DenseLayer]) -> MlpSignature:
    """The hashable key of everything in a chain's graph that does not depend on values."""
    return tuple(
        (layer.linear.in_features, layer.linear.out_features, layer.linear.bias is not None, int(layer.activation))
        for layer in layers
    )


class MlpStructure:
    """The architecture-only part of the GradGraph of one :data:`MlpSignature`.

    Built once per signature and reused: converting another model (or another batch) of
    the same architecture only writes the values (``edge_attr``, ``x``) and the factors.
    The tensors in :attr:`shared` are handed to every graph as they are, so they must be
    treated as read-only; :meth:`intact` notices an in-place write (through the tensors'
    version counters) so that the cache can drop a corrupted entry.

    Attributes:
        node_offsets: first node of every layer (inputs first), then ``N``.
        edge_offsets: first edge of every Linear, then ``E``.
        shared: ``{field: Tensor}`` for the :data:`SHARED_FIELDS`, all on the CPU:
            ``[2, E]`` ``edge_index``, ``[E]`` edge slots, ``[N]`` node labels and slots.
        template: a :class:`GradGraph` with only the shared fields, never returned itself.
        nbytes: bytes held by the tensors above (the cache's size budget counts these).
    """

    def __init__(self, layer_specs: MlpSignature) -> None:
        sizes = [layer_specs[0][0]] + [d_out for _, d_out, _, _ in layer_specs]
        depth = len(layer_specs)
        self.node_offsets = _running_offsets(sizes)
        self.edge_offsets = _running_offsets([d_in * d_out for d_in, d_out, _, _ in layer_specs])
        num_nodes, num_edges = self.node_offsets[-1], self.edge_offsets[-1]

        # Node labels: one full() per layer, joined by a single cat.
        layer_index = torch.cat([torch.full((size,), index, dtype=torch.long) for index, size in enumerate(sizes)])
        position = torch.cat([torch.arange(size) for size in sizes])
        node_kind = torch.full((num_nodes,), int(NodeKind.HIDDEN), dtype=torch.long)
        node_kind[: sizes[0]] = int(NodeKind.INPUT)
        node_kind[self.node_offsets[depth] :] = int(NodeKind.OUTPUT)
        activation = torch.full((num_nodes,), int(ActivationKind.IDENTITY), dtype=torch.long)
        perm_group = torch.full((num_nodes,), -1, dtype=torch.long)
        node_param = torch.full((num_nodes,), -1, dtype=torch.long)

        # Edge slots are O(P): preallocated and written layer by layer, no temporaries of
        # their own size.
        edge_index = torch.empty((2, num_edges), dtype=torch.long)
        edge_param = torch.empty(num_edges, dtype=torch.long)
        edge_param_pos = torch.empty(num_edges, dtype=torch.long)
        # Parameters are numbered in the order the converter lists them: weight, then bias,
        # layer after layer (the order of param_names).
        param_index = 0
        for index, (d_in, d_out, has_bias, activation_kind) in enumerate(layer_specs, start=1):
            nodes = slice(self.node_offsets[index], self.node_offsets[index + 1])
            edges = slice(self.edge_offsets[index - 1], self.edge_offsets[index])
            activation[nodes] = activation_kind
            if index < depth:
                perm_group[nodes] = index - 1
            # edge j -> k holds W[k, j]; edges follow the weight's row-major order k * d_in + j
            edge_index[0, edges].view(d_out, d_in).copy_(self.node_offsets[index - 1] + torch.arange(d_in))
            edge_index[1, edges].view(d_out, d_in).copy_((self.node_offsets[index] + torch.arange(d_out))[:, None])
            edge_param[edges] = param_index
            torch.arange(d_in * d_out, out=edge_param_pos[edges])
            param_index += 1
            if has_bias:
                node_param[nodes] = param_index
                param_index += 1

        self.shared: dict[str, Tensor] = {
            "edge_index": edge_index,
            "edge_kind": torch.full((num_edges,), int(EdgeKind.LINEAR), dtype=torch.long),
            "edge_param": edge_param,
            "edge_param_pos": edge_param_pos,
            "layer": layer_index,
            "node_kind": node_kind,
            "activation": activation,
            "perm_group": perm_group,
            # every hidden layer is one block with one tie (see gradgraph.symmetry.permutation)
            "perm_block": torch.where(perm_group >= 0, 0, -1),
            "perm_tie": torch.where(perm_group >= 0, 0, -1),
            "position": position,
            "node_param": node_param,
            "node_param_pos": torch.where(node_param >= 0, position, -1),
        }
        # A graph holding only the shared fields; each conversion shallow-copies it (as PyG's
        # transforms do) and sets its own values, which costs a third of building a GradGraph
        # from 20 keyword arguments.
        self.template = GradGraph(**self.shared)
        self._tensors = tuple(self.shared.values())
        self._versions = tuple(tensor._version for tensor in self._tensors)
        self.nbytes = sum(tensor.numel() * tensor.element_size() for tensor in self._tensors)

    @property
    def num_nodes(self) -> int:
        return self.node_offsets[-1]

    @property
    def num_edges(self) -> int:
        return self.edge_offsets[-1]

    def template_on(self, device: torch.device) -> GradGraph:
        """The template with its shared tensors on ``device`` (copied once per device, then reused)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.template
        copies = self.__dict__.setdefault("_device_templates", {})
        if device not in copies:
            copies[device] = GradGraph(**{key: value.to(device) for key, value in self.shared.items()})
        return copies[device]

    def intact(self) -> bool:
        """``False`` if any tensor of this structure was written in place since it was built."""
        return all(tensor._version == version for tensor, version in zip(self._tensors, self._versions))


def _running_offsets(sizes: list[int]) -> tuple[int, ...]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return tuple(offsets)


class StructureCache:
    """A small LRU cache of :class:`MlpStructure` s, bounded in entries and in bytes.

    Repeated conversions of one architecture (a training loop, a model zoo) reuse one
    structure; a handful of architectures alternating also hit. A structure larger than
    the byte budget is built per call and not kept.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 256 * 2**20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[MlpSignature, MlpStructure] = OrderedDict()
        # conversions may run in several threads; the LRU bookkeeping must not interleave
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, signature: MlpSignature) -> MlpStructure:
        """The structure of ``signature``, built on a miss (or if a caller wrote into it)."""
        with self._lock:
            structure = self._entries.get(signature)
            if structure is not None and structure.intact():
                self._entries.move_to_end(signature)
                self.hits += 1
                return structure
            self.misses += 1
            structure = MlpStructure(signature)
            self._entries.pop(signature, None)
            if structure.nbytes <= self.max_bytes:
                self._entries[signature] = structure
                while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                    self._entries.popitem(last=False)
            return structure

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached structures."""
        return sum(structure.nbytes for structure in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every cached structure (graphs already returned keep theirs)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


#: The cache behind :func:`convert_mlp`.
STRUCTURE_CACHE = StructureCache()


def clear_structure_cache() -> None:
    """Forget the cached architecture tensors of MLP chains (e.g. to free their memory)."""
    STRUCTURE_CACHE.clear()


def build_mlp_graph(
    model: nn.Module,
    layers: list[DenseLayer],
    act: Tensor,
    grad: Tensor,
    *,
    structure: MlpStructure | None = None,
) -> GradGraph:
    """Assemble the graph of an MLP chain from its node factors ``act``, ``grad [N, B]``.

    ``structure`` defaults to the cached one of the chain's :func:`mlp_signature`. The
    graph gets fresh ``x [N, 1]`` and ``edge_attr [E, 1]`` in ``act``'s dtype (the values,
    which the symmetry actions and users write) and shares the structure's
    architecture-only tensors.
    """
    dtype = act.dtype
    if structure is None:
        structure = STRUCTURE_CACHE.get(mlp_signature(layers))
    num_nodes, num_edges = structure.num_nodes, structure.num_edges

    # Every entry is written below, so no zero fill; each layer's weights land in one
    # contiguous slice.
    device = act.device
    edge_attr = torch.empty((num_edges, 1), dtype=dtype, device=device)
    weight = edge_attr[:, 0]
    x = torch.empty((num_nodes, 1), dtype=dtype, device=device)
    bias = x[:, 0]
    bias[: structure.node_offsets[1]] = 0  # input nodes have no bias
    param_of = {id(p): name for name, p in model.named_parameters()}
    param_names: list[str] = []
    param_shapes: list[list[int]] = []
    for index, layer in enumerate(layers):
        edges = slice(structure.edge_offsets[index], structure.edge_offsets[index + 1])
        nodes = slice(structure.node_offsets[index + 1], structure.node_offsets[index + 2])
        # copy_ converts dtypes itself; no temporary copy of the weight
        weight[edges].copy_(layer.linear.weight.detach().reshape(-1))
        param_names.append(param_of[id(layer.linear.weight)])
        param_shapes.append(list(layer.linear.weight.shape))
        if layer.linear.bias is not None:
            bias[nodes].copy_(layer.linear.bias.detach())
            param_names.append(param_of[id(layer.linear.bias)])
            param_shapes.append(list(layer.linear.bias.shape))
        else:
            bias[nodes] = 0

    # copy.copy of a PyG Data copies its key -> value mapping, not the tensors: the new
    # graph shares the read-only structure and setting its own fields leaves the template.
    graph = copy.copy(structure.template_on(device))
    graph.x = x
    graph.edge_attr = edge_attr
    graph.act = act
    graph.grad = grad
    graph.component_sample = torch.arange(act.shape[1], device=device)
    graph.num_datapoints = act.shape[1]
    graph.param_names = param_names
    graph.param_shapes = param_shapes
    return graph
