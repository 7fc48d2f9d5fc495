"""The GradGraphs of ``P`` copies of a plain MLP, filled from the closed-form factors.

The GradMetaNet variant of the learned optimizer reads the batch's GradGraph. For a plain
chain (:func:`gradgraph.optim.fused.mlp_chain`) every value of that graph is already in the
closed-form forward and backward of :mod:`gradgraph.optim.fused`, so no ``to_graph`` is
needed after the first: one conversion gives the structure (``edge_index``, kinds, layers,
parameter slots, …) once per architecture and batch size, collated once for ``P`` graphs, and
every step only writes the values (graph-major, as PyG batches them):

* ``act [P·N, B]`` — per node ``(layer l, position i)``: the inputs for ``l = 0``, the
  activations ``h_l`` of hidden layers, the network's outputs for the last layer;
* ``grad [P·N, B]`` — ``∂ℓ_b/∂u`` of every datapoint's loss with respect to the node's
  pre-activation (to the input for ``l = 0``);
* ``x [P·N, 1]`` — the node's bias (0 for inputs), ``edge_attr [P·E, 1]`` — the edge's weight;
* ``loss [P·B]`` — the per-datapoint losses.

These are the tensors ``to_graph`` gives (tested: batched and general learned-optimizer
updates agree to 1e-10 in float64).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch

from gradgraph.convert import to_graph
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.nn.context import STRUCTURE_MEMO
from gradgraph.optim.fused import MLPChain

__all__ = ["ChainGraphs"]


class ChainGraphs:
    """Structure of one plain MLP's GradGraph, collated for ``P`` graphs, and the values of a step.

    Args:
        chain: the network's :class:`~gradgraph.optim.fused.MLPChain`.
        template: a GradGraph of the network on a batch of ``B`` datapoints (``to_graph``);
            only its structure is used.
        num_graphs: ``P``.

    Shapes:
        - :meth:`batch`: factors of ``P`` particles -> a ``Batch`` of ``P`` GradGraphs
          (``act``/``grad`` ``[P·N, B]``, ``x`` ``[P·N, 1]``, ``edge_attr`` ``[P·E, 1]``)
    """

    def __init__(self, chain: MLPChain, template: GradGraph, num_graphs: int) -> None:
        self.chain, self.template, self.num_graphs = chain, template, num_graphs
        self.num_components = int(template.act.shape[1])
        layer, position = template.layer, template.position
        widths = [int((layer == index).sum()) for index in range(int(layer.max()) + 1)]
        expected = None
        if len(widths) == len(chain.weights) + 1:
            expected = [template.param_shapes[template.param_names.index(chain.weights[0])][1]]
            expected += [template.param_shapes[template.param_names.index(w)][0] for w in chain.weights]
        if [int(w) for w in expected or []] != widths or self.num_components != int(template.num_datapoints):
            raise GradGraphError(f"ChainGraphs: the graph's layers have {widths} neurons and {self.num_components} "
                                 f"components for {int(template.num_datapoints)} datapoints; the chain "
                                 f"{chain.weights} needs one neuron per unit and one component per datapoint")
        offsets = torch.tensor([0] + widths, device=layer.device).cumsum(0)
        #: ``[N]`` column of every node in the concatenation of the layers' factors
        self.node_columns = offsets[layer] + position
        sizes = [int(torch.tensor(shape).prod()) for shape in template.param_shapes]
        starts = torch.tensor([0] + sizes, device=layer.device).cumsum(0)
        zero_slot = int(starts[-1])
        #: ``[N]`` / ``[E]``: entry of the flat parameter vector every node's bias / edge's weight is
        self.node_slots = torch.where(template.node_param >= 0,
                                      starts[template.node_param.clamp(min=0)] + template.node_param_pos,
                                      torch.full_like(template.node_param, zero_slot))
        if bool((template.edge_param < 0).any()):
            raise GradGraphError("ChainGraphs: an edge of the graph carries no weight; not a plain chain's graph")
        self.edge_slots = starts[template.edge_param] + template.edge_param_pos
        self.names = list(template.param_names)
        batch = Batch.from_data_list([template] * num_graphs)
        batch.__dict__[STRUCTURE_MEMO] = {}  # GradMetaNet's context structure is built once too
        self._collated = batch

    @classmethod
    def from_model(cls, chain: MLPChain, model: nn.Module, inputs: Tensor, targets: Any,
                   loss_fn: Callable[[Tensor, Any], Tensor], num_graphs: int) -> "ChainGraphs":
        """Convert ``model`` on one batch ``inputs [B, in]`` for the structure (its values are not used)."""
        return cls(chain, to_graph(model, inputs, targets, loss_fn), num_graphs)

    def matches(self, num_components: int, num_graphs: int) -> bool:
        """Whether this structure is the one of ``num_graphs`` graphs of ``num_components`` datapoints."""
        return num_components == self.num_components and num_graphs == self.num_graphs

    def batch(self, params: dict[str, Tensor], layer_inputs: list[Tensor], output: Tensor, deltas: list[Tensor],
              input_delta: Tensor, losses: Tensor) -> Batch:
        """The ``Batch`` of the ``P`` particles' graphs on this step.

        Args:
            params: ``{name: [P, *shape]}``.
            layer_inputs: ``[P, B, n_{l}]`` the inputs of every linear layer (:func:`~gradgraph.optim.fused.chain_forward`).
            output: ``[P, B, out]`` the network's outputs.
            deltas: ``[P, B, n_{l+1}]`` the derivative of every datapoint's own loss (not the
                mean's) with respect to linear layer ``l``'s outputs (:func:`~gradgraph.optim.fused.chain_backward`).
            input_delta: ``[P, B, in]`` the same with respect to the inputs.
            losses: ``[P, B]`` per-datapoint losses.
        """
        num_graphs, num_components = output.shape[:2]
        if not self.matches(num_components, num_graphs):
            raise GradGraphError(f"ChainGraphs: built for {self.num_graphs} graphs of {self.num_components} components, "
                                 f"got factors of {num_graphs} x {num_components}")

        def nodes(layers: list[Tensor]) -> Tensor:  # [P, B, n_l] per layer -> [P·N, B]
            columns = torch.cat(layers, dim=2)[:, :, self.node_columns]
            return columns.transpose(1, 2).reshape(-1, num_components)

        flat = torch.cat([params[name].reshape(num_graphs, -1) for name in self.names]
                         + [output.new_zeros(num_graphs, 1)], dim=1)
        batch = copy.copy(self._collated)  # shares the structure tensors and the memo, owns its fields
        batch.act = nodes([*layer_inputs, output]).to(self.template.act.dtype)
        batch.grad = nodes([input_delta, *deltas]).to(self.template.grad.dtype)
        batch.x = flat[:, self.node_slots].reshape(-1, 1).to(self.template.x.dtype)
        batch.edge_attr = flat[:, self.edge_slots].reshape(-1, 1).to(self.template.edge_attr.dtype)
        if "loss" in self.template:
            batch.loss = losses.reshape(-1).to(self.template.loss.dtype)
        return batch
