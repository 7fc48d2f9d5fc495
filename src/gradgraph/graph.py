"""`GradGraph`: a network plus the rank-1 factors of its gradients, as a PyG graph.

Neurons are nodes, weights are edges (source neuron -> destination neuron). For every
component ``i`` (a datapoint, or a datapoint x token pair) each node ``n`` holds the
activation ``act[n, i]`` it emits and the backpropagated signal ``grad[n, i] = dL_i/du_n``
at its pre-activation. The gradient of the weight on edge ``j -> k`` for component ``i``
is exactly ``act[j, i] * grad[k, i]``, and the gradient of neuron ``k``'s bias is
``grad[k, i]``.

Fields of one graph (``N`` nodes, ``E`` edges, ``B`` components, ``b`` datapoints):

====================  =============  ==========================================================
field                 shape          meaning
====================  =============  ==========================================================
``edge_index``        ``[2, E]``     forward edges, row 0 = source, row 1 = destination
``edge_attr``         ``[E, 1]``     weight value (1 on structural edges); tasks may append
                                     columns after it
``x``                 ``[N, 1]``     bias value (0 where none); tasks may append columns
``act``, ``grad``     ``[N, B]``     rank-1 factors of every component
``component_x``       ``[N, B, F]``  optional extra features per neuron and component (e.g.
                                     normalised or averaged factors); moved like ``act``
``layer``             ``[N]``        depth of the neuron in the computation (inputs are 0)
``node_kind``         ``[N]``        :class:`NodeKind`
``edge_kind``         ``[E]``        :class:`EdgeKind`
``activation``        ``[N]``        :class:`ActivationKind` applied after the neuron
``perm_group``        ``[N]``        nodes sharing a value >= 0 may be permuted among
                                     themselves (a node only ever moves to a node of the
                                     same kind); -1 = fixed (inputs, outputs)
``perm_block``        ``[N]``        block of the node inside its group (attention head);
                                     a symmetry may permute the blocks of a group as
                                     wholes. 0 for groups without blocks, -1 if fixed
``perm_tie``          ``[N]``        inside a block, the node of each kind at rank ``i``
                                     (by ``position``) of tie ``t`` moves together with
                                     the other kinds' rank-``i`` nodes of tie ``t``
                                     (query dim i with key dim i). 0 if untied, -1 if fixed
``position``          ``[N]``        index of the neuron inside its layer/tensor
``node_param``        ``[N]``        index into ``param_names`` of the node's bias, -1 if none
``node_param_pos``    ``[N]``        flat index of the bias entry inside that parameter
``edge_param``        ``[E]``        index into ``param_names`` of the edge's weight, -1 if the
                                     edge is structural (e.g. a residual connection)
``edge_param_pos``    ``[E]``        flat index of the weight entry inside that parameter
``component_sample``  ``[B]``        datapoint each component belongs to
``num_datapoints``    int            ``b``
``loss``              ``[b]``        the per-datapoint losses whose gradients the factors hold (in
                                     output mode, ``loss_fn=None``: the outputs), detached
``y``                 ``[1, k]``     optional graph-level target (a dataset's; see
                                     :mod:`gradgraph.datasets`): one row per graph, so a batch
                                     of ``G`` graphs has ``y`` of shape ``[G, k]``
``param_names``       list[str]      names from ``model.named_parameters()``
``param_shapes``      list[list]     their shapes (lists, as PyG keeps them)
====================  =============  ==========================================================

The ``*_param*`` and ``position`` fields describe *slots* of the architecture; the
symmetry actions move values (``x``, ``act``, ``grad``, ``edge_attr``) between slots and
leave the slot description alone, so a permuted graph equals the graph of the permuted
model tensor for tensor.

Sharing: a converter may hand the *same* architecture-only tensors (``edge_index``,
``edge_kind``, the ``*_param*`` fields, ``position``, ``layer``, ``node_kind``,
``activation``, ``perm_*``) to every graph of one architecture; the MLP converter does,
from a cache. Treat them as read-only (``clone()`` before writing into one in place). The
values ``x``, ``edge_attr``, ``act``, ``grad`` (and ``component_x``) are never shared: every
conversion returns fresh ones.

Saving: ``torch.save`` a graph or a list of graphs, ``torch.load(path, weights_only=True)`` reads
them back (importing gradgraph registers :class:`GradGraph` and the PyG classes it holds as safe
globals). A :class:`torch_geometric.data.Batch` is a class PyG makes at run time and does not
load that way: save ``batch.to_data_list()``.

Kinds are integer labels (``node_kind``, ``edge_kind``), not one-hot columns of ``x`` /
``edge_attr``: a model embeds them (:class:`~gradgraph.nn.PositionalEncoding` and
GradMetaNet's edge encoder do), as PyG models embed categorical atom and bond features.
This keeps the per-weight cost of a graph at one value: ``edge_attr`` is the only field
besides ``edge_index`` that grows with the number of weights, and a one-hot there made it
13 times larger than the weights it carries.
"""

from __future__ import annotations

import enum
import threading
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from torch_geometric.data import Batch, Data

from gradgraph.errors import GradGraphError

#: The fields :meth:`GradGraph._parameter_blocks` reads, and its blocks per shared ``edge_param``
#: tensor (weakly held: the entry goes with the architecture's tensors).
_BLOCK_STRUCTURE = ("edge_index", "edge_kind", "edge_param", "edge_param_pos", "node_param", "node_param_pos")
_BLOCKS_BY_STRUCTURE: WeakIdKeyDictionary = WeakIdKeyDictionary()

__all__ = [
    "ActivationKind",
    "EdgeKind",
    "GradGraph",
    "NodeKind",
    "NUM_EDGE_KINDS",
    "NUM_NODE_KINDS",
]


class NodeKind(enum.IntEnum):
    """What a node stands for; ``GradGraph.node_kind`` holds it for every node."""

    INPUT = 0  #: a network input feature
    HIDDEN = 1  #: a hidden neuron of an MLP
    OUTPUT = 2  #: a network output
    RESIDUAL = 3  #: a residual-stream neuron of a transformer block
    NORM = 4  #: a LayerNorm output neuron
    QUERY = 5  #: one query dimension of one attention head
    KEY = 6  #: one key dimension of one attention head
    VALUE = 7  #: one value dimension of one attention head
    ATTENTION = 8  #: one dimension of the merged-head attention output (input of out_proj)
    FFN_HIDDEN = 9  #: a hidden neuron of a transformer feed-forward block
    #: one row of an embedding table (a vocabulary entry, a position): an input neuron whose
    #: activation is one-hot, so the table's gradient is rank-1 like any weight's
    TOKEN = 10


class EdgeKind(enum.IntEnum):
    """What an edge stands for; ``GradGraph.edge_kind`` holds it for every edge."""

    LINEAR = 0  #: a weight of an MLP layer
    QUERY = 1  #: residual -> query weight (in_proj, q part)
    KEY = 2  #: residual -> key weight (in_proj, k part)
    VALUE = 3  #: residual -> value weight (in_proj, v part)
    ATTENTION_OUT = 4  #: merged-head output -> residual weight (out_proj)
    FFN_IN = 5  #: residual -> FFN hidden weight
    FFN_OUT = 6  #: FFN hidden -> residual weight
    RESIDUAL = 7  #: identity skip connection (no parameter)
    NORM_SCALE = 8  #: LayerNorm scale gamma_j on the edge x_hat_j -> y_j
    QUERY_KEY = 9  #: query dim i <-> key dim i of the same head (no parameter)
    VALUE_ATTENTION = 10  #: value dim i -> attention output dim i of the same head (no parameter)
    #: query dim i -> attention output dim j of the same head, every i, j (no parameter): the
    #: attention pattern softmax(q k^T) mixing the values; ties a head's query/key dims to
    #: its value/output dims, so heads are encoded by relations alone
    QUERY_ATTENTION = 11
    EMBEDDING = 12  #: table row -> embedding dim weight (``nn.Embedding``, position tables)
    GATE = 13  #: the two factors of an elementwise product (gated units: ``silu(a) * b``), no parameter
    #: a neuron whose value is copied or pooled from another's (concatenation with a class
    #: token, pooling over positions, a second version of a neuron's value), no parameter
    MERGE = 14


class ActivationKind(enum.IntEnum):
    """The elementwise nonlinearity applied after a neuron."""

    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2
    GELU = 3
    SILU = 4
    TANH = 5
    SIGMOID = 6
    SINE = 7
    #: an elementwise function gradgraph has no name for (a composite written with torch ops)
    OTHER = 8

    @property
    def positively_homogeneous(self) -> bool:
        """``act(l * u) == l * act(u)`` for every ``l > 0``."""
        return self in (ActivationKind.IDENTITY, ActivationKind.RELU, ActivationKind.LEAKY_RELU)

    @property
    def odd(self) -> bool:
        """``act(-u) == -act(u)``."""
        return self in (ActivationKind.IDENTITY, ActivationKind.TANH, ActivationKind.SINE)


NUM_NODE_KINDS = len(NodeKind)
NUM_EDGE_KINDS = len(EdgeKind)

# Keys whose values are integer labels or slot descriptions that PyG must not shift when
# batching (PyG would add num_nodes to any key containing "index").
_NO_INCREMENT = frozenset(
    {"node_param", "node_param_pos", "edge_param", "edge_param_pos", "position", "perm_group", "perm_block",
     "perm_tie"}
)
_STACKED = frozenset({"component_sample"})
#: Fields with a component axis (dim 1, or dim 0 for component_sample): graphs batch only if
#: they agree on it.
_COMPONENT_AXIS = frozenset({"act", "grad", "component_x", "component_sample"})
_BATCHING = threading.local()


def _component_count(key: str, value: Tensor) -> int:
    return int(value.shape[-1] if key == "component_sample" else value.shape[1])


def _check_component_count(key: str, value: Any) -> None:
    expected = getattr(_BATCHING, "expected", None)
    if expected is None or expected[0] != key or not isinstance(value, Tensor):
        return
    count = _component_count(key, value)
    if count != expected[1]:
        raise GradGraphError(
            f"cannot batch GradGraphs with different numbers of components: '{key}' has {expected[1]} components "
            f"in the first graph and {count} in another ({list(value.shape)}); convert every graph with the same "
            "number of datapoints (and tokens), or pad/subsample the components first"
        )


class GradGraph(Data):
    r"""A network and the rank-1 factors of its per-component gradients, as a graph.

    Built by :func:`gradgraph.to_graph`; see the module docstring for every field and
    its shape. For an edge :math:`j \to k` and a component :math:`i`,

    .. math::
        \frac{\partial L_i}{\partial W_{kj}} = \mathrm{act}_{j,i}\,\mathrm{grad}_{k,i},
        \qquad \frac{\partial L_i}{\partial b_k} = \mathrm{grad}_{k,i}.

    Graphs with the same number of components ``B`` batch with
    :class:`torch_geometric.data.Batch` and :class:`torch_geometric.loader.DataLoader`,
    whatever their architectures.
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in _COMPONENT_AXIS:
            _check_component_count(key, value)
        if key in _NO_INCREMENT:
            return 0
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in _COMPONENT_AXIS and isinstance(value, Tensor):
            # PyG asks the first graph for the cat dim, then every graph for its increment
            # (before concatenating): the first graph's B is what every other must match
            _BATCHING.expected = (key, _component_count(key, value))
        if key in _STACKED:
            return None
        return super().__cat_dim__(key, value, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # the per-graph cache of parameter blocks (tensors and slices) is rebuilt on demand: a
        # pickled graph leaves it out, so saved graphs load with weights_only=True and a graph
        # saves to the same bytes whether or not mean_grad() ran on it before
        state = dict(super().__getstate__())
        state.pop("_blocks_cache", None)
        return state

    # ------------------------------------------------------------------ basic views
    @property
    def num_components(self) -> int:
        """``B``, the number of rank-1 components (datapoints, or datapoint x token)."""
        return int(self.act.shape[1])

    @property
    def weight(self) -> Tensor:
        """``[E]`` the weight value on every edge (1 on structural edges)."""
        return self.edge_attr[:, 0]

    @property
    def bias(self) -> Tensor:
        """``[N]`` the bias value of every node (0 where the node has none)."""
        return self.x[:, 0]

    def edge_components(self) -> Tensor:
        """``[E, B, 2]``: ``(act[src], grad[dst])`` for every edge and component.

        Gathered on demand; the graph itself stores only the ``[N, B]`` factors. Both halves
        are gathered straight into the two contiguous planes of one ``[2, E, B]`` buffer (no
        intermediate), returned as its ``[E, B, 2]`` view. Its cost is that of writing its
        ``2·E·B`` numbers: twice the per-sample gradients' for an MLP, ``2T`` times for a
        model with ``T`` tokens per datapoint (``per_sample_grads`` sums those up instead).
        """
        src, dst = self.edge_index
        out = self.act.new_empty((2, src.shape[0], self.act.shape[1]))
        torch.index_select(self.act, 0, src, out=out[0])
        torch.index_select(self.grad, 0, dst, out=out[1])
        return out.permute(1, 2, 0)

    # ------------------------------------------------------------ weight-space maps
    def _require_single(self, what: str) -> None:
        if isinstance(self, Batch):
            raise GradGraphError(
                f"GradGraph.{what}() needs one graph, got a Batch of {self.num_graphs}; "
                "call batch.to_data_list() first"
            )

    def _scatter_to_parameters(self, edge_values: Tensor, node_values: Tensor | None) -> dict[str, Tensor]:
        """Write ``[E, *k]`` / ``[N, *k]`` values into flat parameter slots."""
        trailing = tuple(edge_values.shape[1:])
        flats = {
            index: edge_values.new_zeros((_numel(shape), *trailing))
            for index, shape in enumerate(self.param_shapes)
        }
        filled = torch.zeros(len(self.param_names), dtype=torch.bool)
        tables = [(self.edge_param, self.edge_param_pos, edge_values)]
        if node_values is not None:
            tables.append((self.node_param, self.node_param_pos, node_values))
        for param, pos, values in tables:
            for index in torch.unique(param[param >= 0]).tolist():
                mask = param == index
                flats[index][pos[mask]] = values[mask].to(flats[index].dtype)
                filled[index] = True
        result = {}
        for index, (name, shape) in enumerate(zip(self.param_names, self.param_shapes)):
            if filled[index]:
                result[name] = flats[index].reshape((*shape, *trailing))  # a 0-dim parameter: shape ()
        return result

    def to_parameters(self, edge_values: Tensor, node_values: Tensor | None = None) -> dict[str, Tensor]:
        """Write per-edge and per-node values back into the model's weight space.

        The exact inverse of the conversion: ``to_parameters(graph.weight, graph.bias)``
        returns the model's own parameters.

        Args:
            edge_values: ``[E]`` or ``[E, k]``, one value (or ``k``) per edge. Structural
                edges (no parameter) are ignored.
            node_values: ``[N]`` or ``[N, k]``, one value (or ``k``) per node; written
                into bias-like parameters. If ``None``, those parameters are left out.

        Returns:
            ``{name: Tensor[*param.shape]}`` (or ``[*param.shape, k]``) for every
            parameter that the given values cover, keyed as in ``named_parameters()``.
        """
        self._require_single("to_parameters")
        num_edges = self.edge_index.shape[1]
        if edge_values.dim() not in (1, 2) or edge_values.shape[0] != num_edges:
            raise GradGraphError(
                f"to_parameters: edge_values must have shape [E] or [E, k] with E={num_edges}, "
                f"got {list(edge_values.shape)}"
            )
        if node_values is not None:
            if node_values.dim() != edge_values.dim() or node_values.shape[0] != self.num_nodes:
                raise GradGraphError(
                    f"to_parameters: node_values must have shape [N]{'' if edge_values.dim() == 1 else ', k'} "
                    f"with N={self.num_nodes}, got {list(node_values.shape)}"
                )
            if node_values.shape[1:] != edge_values.shape[1:]:
                raise GradGraphError(
                    "to_parameters: edge_values and node_values must share the trailing dim, "
                    f"got {list(edge_values.shape)} and {list(node_values.shape)}"
                )
        return self._scatter_to_parameters(edge_values, node_values)

    def _component_param_grads(self) -> tuple[Tensor, Tensor]:
        """Per-datapoint gradients of every edge and node slot: ``[E, b]``, ``[N, b]``."""
        src, dst = self.edge_index
        edge_grads = self.act[src] * self.grad[dst]
        node_grads = self.grad
        num_datapoints = int(self.num_datapoints)
        sample = self.component_sample.reshape(-1)
        if sample.numel() == num_datapoints and torch.equal(
            sample, torch.arange(num_datapoints, device=sample.device)
        ):
            return edge_grads, node_grads
        # Tokens of one datapoint are separate components: sum them back up.
        edge_sum = edge_grads.new_zeros(edge_grads.shape[0], num_datapoints)
        node_sum = node_grads.new_zeros(node_grads.shape[0], num_datapoints)
        edge_sum.index_add_(1, sample, edge_grads)
        node_sum.index_add_(1, sample, node_grads)
        return edge_sum, node_sum

    def _parameter_blocks(self) -> list[tuple[int, str, Tensor, Tensor, Tensor, slice | None]]:
        """Edges and bias nodes grouped by parameter: ``(param, how, rows, cols, positions, span)``.

        ``how`` is ``"dense"`` for a full weight block (``rows`` = destination nodes,
        ``cols`` = source nodes, ``positions [rows, cols]``), ``"edges"`` for any other set
        of edges (``rows`` = dst, ``cols`` = src, ``positions`` per edge) and ``"nodes"`` for
        biases (``rows`` = nodes). ``span`` is the slice of the flat parameter that
        ``positions`` covers when it is consecutive in order (an ``nn.Linear`` weight or bias),
        so the block is written with one slice instead of an index. Cached per graph (it
        depends only on the structure fields), and shared by the graphs that hold the same
        structure tensors (every conversion of one architecture), unless one of them was
        changed in place since.
        """
        cached = self.__dict__.get("_blocks_cache")
        if cached is not None:
            return cached
        # graphs of one architecture usually share their structure tensors (a converter's plan):
        # then they share the blocks too, unless one of those tensors was changed in place
        # weak references: an entry must not keep its own key (edge_param) alive
        structure = tuple((weakref.ref(self[key]), self[key]._version) for key in _BLOCK_STRUCTURE)
        shared = _BLOCKS_BY_STRUCTURE.get(self.edge_param)
        if shared is not None and all(kept() is self[key] and kept_version == self[key]._version
                                      for key, (kept, kept_version) in zip(_BLOCK_STRUCTURE, shared[0])):
            self.__dict__["_blocks_cache"] = shared[1]
            return shared[1]
        blocks = []
        src, dst = self.edge_index
        # one call site of a weight (its parameter and edge kind) is one dense block; a tied
        # weight has several
        for param, kind, edges in _edge_groups(self.edge_param, self.edge_kind):
            blocks.append((param, *_edge_block(src[edges], dst[edges], self.edge_param_pos[edges])))
        for param in torch.unique(self.node_param[self.node_param >= 0]).tolist():
            mask = self.node_param == param
            nodes = torch.nonzero(mask).flatten()
            positions = self.node_param_pos[mask]
            blocks.append((param, "nodes", nodes, nodes, positions, consecutive_span(positions)))
        self.__dict__["_blocks_cache"] = blocks
        _BLOCKS_BY_STRUCTURE[self.edge_param] = (structure, blocks)
        return blocks

    def _grads_by_parameter(self, reduce_mean: bool) -> dict[str, Tensor]:
        """Per-datapoint (``[b, numel]``) or mean (``[numel]``) gradients, summing tied uses."""
        self._require_single("per_sample_grads" if not reduce_mean else "mean_grad")
        num_datapoints = int(self.num_datapoints)
        num_components = self.act.shape[1]
        tokens = num_components // num_datapoints
        sample = self.component_sample.reshape(-1)
        regular = num_components == num_datapoints * tokens and torch.equal(
            sample, torch.arange(num_datapoints, device=sample.device).repeat_interleave(tokens)
        )
        flats: dict[int, Tensor] = {}
        for param, how, rows, cols, positions, span in self._parameter_blocks():
            numel = _numel(self.param_shapes[param])
            if how == "dense" and not reduce_mean:
                grad_rows, act_cols = self.grad[rows], self.act[cols]
                if regular:
                    values = _datapoint_outer_products(grad_rows, act_cols, num_datapoints, tokens)
                else:
                    per_component = torch.einsum("ob,ib->boi", grad_rows, act_cols)
                    values = per_component.new_zeros(num_datapoints, *per_component.shape[1:])
                    values.index_add_(0, sample, per_component)
                values = values.reshape(num_datapoints, -1)
                if param not in flats and span == slice(0, numel):
                    flats[param] = values  # the whole parameter in order (an nn.Linear weight): nothing to scatter
                    continue
            if param not in flats:
                shape = (numel,) if reduce_mean else (num_datapoints, numel)
                flats[param] = self.act.new_zeros(shape)
            target = flats[param]
            if how == "dense":
                if reduce_mean:
                    values = ((self.grad[rows] @ self.act[cols].T) / num_datapoints).reshape(-1)  # rows x cols
                _add_at(target, span, positions.reshape(-1), values)
                continue
            per_edge = self.grad[rows] if how == "nodes" else self.act[cols] * self.grad[rows]  # [k, B]
            if regular:
                per_datapoint = per_edge.reshape(len(rows), num_datapoints, tokens).sum(-1)
            else:
                per_datapoint = per_edge.new_zeros(len(rows), num_datapoints)
                per_datapoint.index_add_(1, sample, per_edge)
            if reduce_mean:
                _add_at(target, span, positions, per_datapoint.mean(dim=1))
            else:
                _add_at(target, span, positions, per_datapoint.T)
        result = {}
        for param, flat in flats.items():
            shape = self.param_shapes[param]
            name = self.param_names[param]
            result[name] = flat.reshape(tuple(shape)) if reduce_mean else flat.reshape(num_datapoints, *shape)
        if len(result) < len(self.param_names):  # a parameter with no entries has no edges (an nn.Linear(4, 0))
            for param, shape in enumerate(self.param_shapes):
                if param not in flats and _numel(shape) == 0:
                    empty = tuple(int(size) for size in shape)
                    result[self.param_names[param]] = self.act.new_zeros(empty if reduce_mean else (num_datapoints,
                                                                                                   *empty))
        return result

    def per_sample_grads(self) -> dict[str, Tensor]:
        """The gradient of every datapoint's loss, for every parameter.

        Computed per weight block as ``einsum(grad[dst], act[src])`` over each datapoint's
        components, written straight into the parameter's layout (no ``[E, B]``
        intermediate). Components of one datapoint (its tokens) are summed, and so are the
        uses of a parameter that appears in several places (tied weights).

        Returns:
            ``{name: Tensor[b, *param.shape]}`` keyed as in ``model.named_parameters()``; a
            parameter the forward never used (a mask token without a mask, an unused pooler) is
            not in the graph and not in the result (its gradient is zero).
        """
        return self._grads_by_parameter(reduce_mean=False)

    def mean_grad(self) -> dict[str, Tensor]:
        """The gradient of the mean loss over datapoints: ``{name: Tensor[*param.shape]}``."""
        return self._grads_by_parameter(reduce_mean=True)

    def per_sample_grad_norms(self, by_parameter: bool = False) -> Tensor | dict[str, Tensor]:
        r"""The Euclidean norm of every datapoint's gradient, from the factors.

        No per-sample gradient of a weight matrix is formed. For a weight block with rows
        (destination neurons) :math:`R` and columns (source neurons) :math:`C`, datapoint
        :math:`i`'s gradient is :math:`\sum_{t} g_{t} a_{t}^\top` over its components
        :math:`t` (one for an MLP, its tokens or positions otherwise), so

        .. math::
            \Big\|\sum_t g_t a_t^\top\Big\|_F^2 = \sum_{t, s} (g_t^\top g_s)(a_t^\top a_s),

        the elementwise product of the two ``T x T`` Gram matrices of the datapoint's
        components (for one component: :math:`\|g\|^2 \|a\|^2`). A bias's gradient is
        :math:`\sum_t g_t`. Squared norms add over parameters and over the blocks of one
        parameter when those cover disjoint entries; a parameter whose blocks share entries
        (a weight used twice) has its per-datapoint gradient summed first, entry by entry.

        Args:
            by_parameter: return one norm per parameter instead of the total.

        Returns:
            ``[b]``: :math:`\|\nabla_\theta L_i\|_2` over every parameter the graph covers; or,
            with ``by_parameter``, ``{name: Tensor[b]}`` keyed as in ``model.named_parameters()``.
        """
        self._require_single("per_sample_grad_norms")
        num_datapoints = int(self.num_datapoints)
        num_components = self.act.shape[1]
        tokens = num_components // num_datapoints
        sample = self.component_sample.reshape(-1)
        regular = num_components == num_datapoints * tokens and torch.equal(
            sample, torch.arange(num_datapoints, device=sample.device).repeat_interleave(tokens))
        by_param: dict[int, list] = {}
        for block in self._parameter_blocks():
            by_param.setdefault(block[0], []).append(block)
        squared: dict[str, Tensor] = {}
        for param, blocks in by_param.items():
            positions = torch.cat([block[4].reshape(-1) for block in blocks])
            if torch.unique(positions).numel() == positions.numel():
                squared[self.param_names[param]] = sum(
                    self._block_squared_norms(how, rows, cols, regular, num_datapoints, tokens, sample)
                    for _, how, rows, cols, _, _ in blocks)
                continue
            # entries shared by several uses: this parameter's per-datapoint gradient, then its norm
            flat = self.act.new_zeros(num_datapoints, _numel(self.param_shapes[param]))
            for _, how, rows, cols, block_positions, _ in blocks:
                if how == "dense":
                    rows, cols = rows.repeat_interleave(len(cols)), cols.repeat(len(rows))
                per_edge = self.grad[rows] if how == "nodes" else self.act[cols] * self.grad[rows]
                flat.index_add_(1, block_positions.reshape(-1), self._per_datapoint(per_edge, regular,
                                                                                    num_datapoints, tokens, sample).T)
            squared[self.param_names[param]] = flat.square().sum(1)
        if by_parameter:
            return {name: value.sqrt() for name, value in squared.items()}
        return torch.stack(list(squared.values())).sum(0).sqrt()

    @staticmethod
    def _per_datapoint(per_component: Tensor, regular: bool, num_datapoints: int, tokens: int,
                       sample: Tensor) -> Tensor:
        """``[k, B]`` -> ``[k, b]``: each datapoint's components summed."""
        if regular:
            return per_component.reshape(len(per_component), num_datapoints, tokens).sum(-1)
        summed = per_component.new_zeros(len(per_component), num_datapoints)
        return summed.index_add_(1, sample, per_component)

    def _block_squared_norms(self, how: str, rows: Tensor, cols: Tensor, regular: bool, num_datapoints: int,
                             tokens: int, sample: Tensor) -> Tensor:
        """``[b]``: the squared norm of each datapoint's gradient on one parameter block."""
        if how == "nodes":
            return self._per_datapoint(self.grad[rows], regular, num_datapoints, tokens, sample).square().sum(0)
        if how == "edges":
            per_edge = self.act[cols] * self.grad[rows]
            return self._per_datapoint(per_edge, regular, num_datapoints, tokens, sample).square().sum(0)
        grad_rows, act_cols = self.grad[rows], self.act[cols]
        if regular and tokens == 1:
            return grad_rows.square().sum(0) * act_cols.square().sum(0)
        if regular:  # per datapoint, the Gram matrices of its T components: [b, T, T]
            grad_tokens = grad_rows.reshape(len(rows), num_datapoints, tokens)
            act_tokens = act_cols.reshape(len(cols), num_datapoints, tokens)
            grad_gram = torch.einsum("rbt,rbs->bts", grad_tokens, grad_tokens)
            act_gram = torch.einsum("cbt,cbs->bts", act_tokens, act_tokens)
            return (grad_gram * act_gram).sum((1, 2))
        # components in any order: the Gram products of every pair of components, kept where
        # both belong to the same datapoint
        same = sample[:, None] == sample[None, :]
        pairs = (grad_rows.T @ grad_rows) * (act_cols.T @ act_cols) * same
        return pairs.new_zeros(num_datapoints).index_add_(0, sample, pairs.sum(1))

    def to_networkx(self):  # noqa: ANN201 - networkx is imported lazily
        """A :class:`networkx.DiGraph` with one node per neuron and one edge per weight.

        Node attributes: ``bias``, ``kind``, ``layer``; edge attributes: ``weight``,
        ``kind`` (the integer :class:`NodeKind` / :class:`EdgeKind`), and ``mean_grad``
        (the mean over datapoints of the edge's gradient).
        """
        from torch_geometric.utils import to_networkx

        self._require_single("to_networkx")
        edge_grads, _ = self._component_param_grads()
        plain = Data(
            edge_index=self.edge_index,
            num_nodes=self.num_nodes,
            bias=self.x[:, 0],
            kind=self.node_kind,
            layer=self.layer,
            weight=self.edge_attr[:, 0],
            edge_kind=self.edge_kind,
            mean_grad=edge_grads.mean(dim=1),
        )
        graph = to_networkx(
            plain, node_attrs=["bias", "kind", "layer"], edge_attrs=["weight", "edge_kind", "mean_grad"]
        )
        for _, _, attrs in graph.edges(data=True):
            attrs["kind"] = attrs.pop("edge_kind")
        return graph

    def __repr__(self) -> str:
        if isinstance(self, Batch):
            return super().__repr__()
        return (
            f"{self.__class__.__name__}(nodes={self.num_nodes}, edges={self.edge_index.shape[1]}, "
            f"components={self.num_components}, datapoints={int(self.num_datapoints)}, "
            f"parameters={sum(_numel(s) for s in self.param_shapes)})"
        )


# torch.load(weights_only=True) reads GradGraphs: the class and the PyG pieces a pickled Data holds
torch.serialization.add_safe_globals([GradGraph])
try:
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage])
except ImportError:  # a PyG that moved them: loading then names what is missing
    pass


def _datapoint_outer_products(grad_rows: Tensor, act_cols: Tensor, num_datapoints: int, tokens: int) -> Tensor:
    """``[b, rows, cols]``: per datapoint, ``sum_k grad[row, (i, k)] * act[col, (i, k)]`` over its
    ``tokens`` components (``[rows, b·tokens]`` and ``[cols, b·tokens]`` in), row-major."""
    if tokens == 1:  # one component per datapoint: a broadcast product, no reduction
        return torch.mul(grad_rows.T.contiguous()[:, :, None], act_cols.T.contiguous()[:, None, :])
    return torch.bmm(grad_rows.reshape(len(grad_rows), num_datapoints, tokens).permute(1, 0, 2),
                     act_cols.reshape(len(act_cols), num_datapoints, tokens).permute(1, 2, 0))


def _edge_groups(edge_param: Tensor, edge_kind: Tensor) -> list[tuple[int, int, slice | Tensor]]:
    """``(param, kind, edges)`` for every (parameter, edge kind) pair the edges hold, ascending;
    ``edges`` selects that pair's edges: a slice where they are one run in edge order (a
    converter writes a weight's edges together, so this is the usual case and needs no mask
    over all edges), else a boolean mask."""
    if edge_param.numel() == 0:
        return []
    kinds = int(edge_kind.max()) + 1
    key = torch.where(edge_param >= 0, edge_param * kinds + edge_kind, -1)
    starts = torch.cat((key.new_zeros(1), torch.nonzero(key[1:] != key[:-1]).flatten() + 1)).tolist()
    run_keys = key[starts].tolist()
    ends = [*starts[1:], key.numel()]
    runs = [(run_key, slice(start, end)) for run_key, start, end in zip(run_keys, starts, ends) if run_key >= 0]
    if len({run_key for run_key, _ in runs}) == len(runs):
        chosen = sorted(runs, key=lambda run: run[0])
    else:  # some pair's edges are interleaved with others': select them by mask
        chosen = [(run_key, key == run_key) for run_key in sorted({run_key for run_key, _ in runs})]
    return [(run_key // kinds, run_key % kinds, edges) for run_key, edges in chosen]


def _edge_block(src: Tensor, dst: Tensor, positions: Tensor) -> tuple[str, Tensor, Tensor, Tensor, slice | None]:
    """``(how, rows, cols, positions, span)`` of the edges of one call site of a parameter: a
    ``"dense"`` block when the edges join every source to every destination exactly once (an
    ``nn.Linear``), else ``"edges"`` (see :meth:`GradGraph._parameter_blocks`)."""
    (src_min, src_max), (dst_min, dst_max) = (tuple(int(v) for v in torch.aminmax(ends)) for ends in (src, dst))
    if (src_max - src_min + 1) * (dst_max - dst_min + 1) == len(src):
        # whole runs of node numbers (a converter lays out a layer's neurons consecutively): the
        # sources and destinations are named without a sort
        cols = torch.arange(src_min, src_max + 1, device=src.device)
        rows = torch.arange(dst_min, dst_max + 1, device=dst.device)
        shape = (len(rows), len(cols))
        if len(cols) > 1 and len(rows) > 1 and torch.equal(dst.reshape(shape), rows[:, None].expand(shape)) \
                and torch.equal(src.reshape(shape), cols[None, :].expand(shape)):
            # edges in row-major order (every nn.Linear of a converter): edge i is cell i, each
            # (row, column) pair once; the table is the positions as they are, no scatter
            table = positions.reshape(shape)
            if bool((table >= 0).all()):  # (else: as below, not a dense block)
                return "dense", rows, cols, table, consecutive_span(table)
        col_index, row_index = src - src_min, dst - dst_min
    else:
        cols, col_index = torch.unique(src, return_inverse=True)
        rows, row_index = torch.unique(dst, return_inverse=True)
    if len(cols) * len(rows) == len(src) and len(cols) > 1 and len(rows) > 1:
        table = torch.full((len(rows), len(cols)), -1, dtype=torch.long, device=positions.device)
        table[row_index, col_index] = positions
        # as many edges as cells and every cell written: each (row, column) pair exactly once
        if bool((table >= 0).all()):
            return "dense", rows, cols, table, consecutive_span(table)
    return "edges", dst, src, positions, consecutive_span(positions)


def consecutive_span(positions: Tensor) -> slice | None:
    """The slice ``positions`` (flattened) equals, if it is ``start, start + 1, ...``; else ``None``.

    Shared with the traced converter's parameter slot copies (same test, same slice)."""
    flat = positions.reshape(-1)
    if flat.numel() == 0:
        return None
    start, count = int(flat[0]), flat.numel()
    if flat.device.type != "cpu":  # one comparison: each piece's answer would be a device sync
        return slice(start, start + count) if torch.equal(
            flat, torch.arange(start, start + count, dtype=flat.dtype, device=flat.device)) else None
    # compared piece by piece against one ramp: no O(numel) temporaries (fresh memory is most of
    # the cost for the 1M-entry weights of a first conversion)
    size = min(count, _SPAN_CHUNK)
    ramp = torch.arange(start, start + size, dtype=flat.dtype, device=flat.device)
    shifted = torch.empty_like(ramp)
    for offset in range(0, count, size):
        piece = flat[offset:offset + size]
        expected = ramp if offset == 0 else torch.add(ramp, offset, out=shifted)
        if not torch.equal(piece, expected[:len(piece)]):
            return None
    return slice(start, start + count)


_SPAN_CHUNK = 1 << 16


def _add_at(target: Tensor, span: slice | None, positions: Tensor, values: Tensor) -> None:
    """``target[..., positions] += values`` over the last axis: a slice add when ``span`` is given."""
    if span is not None:
        target[..., span] += values
    elif target.dim() == 1:
        target.index_add_(0, positions, values)
    else:
        target.index_add_(1, positions, values.contiguous())


def _numel(shape: Any) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel
