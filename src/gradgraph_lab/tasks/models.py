"""Model pieces the tasks share: their GradMetaNet built from one set of size fields, the mean
gradient of stacked factors, and a batch's per-edge / per-node outputs as one row per network.

The curvature and INR-editing tasks both learn on batches of ``G`` networks of one
architecture (built by :class:`~gradgraph_lab.data.curvature.GraphBatcher`), with factors stacked
as ``[G, N, B]``; their model files use these instead of each writing them out.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

from torch import Tensor

from gradgraph.nn import ComponentConv, GradMetaNet, GradMetaNetOutput

__all__ = ["GradMetaNetSizes", "build_gradmetanet", "mean_gradient", "per_graph_outputs"]


class GradMetaNetSizes(Protocol):
    """The size fields a task's model config shares (``ModelConfig``, ``EditModelConfig``).

    Attributes:
        hidden_channels: node-state width ``C``.
        component_channels: per-component width ``C_z``.
        num_component_layers: component layers.
        num_node_layers: node layers.
        product_channels: channels of the decoder's component-wise product.
        component_edge_messages: whether the component layers also pass per-component
            messages along every weight (``ComponentConv``'s edge terms, cost ``O(E·B·C_z)``).
    """

    hidden_channels: int
    component_channels: int
    num_component_layers: int
    num_node_layers: int
    product_channels: int
    component_edge_messages: bool


def build_gradmetanet(sizes: GradMetaNetSizes, *, components: bool = True, **outputs: int) -> GradMetaNet:
    """A :class:`~gradgraph.nn.GradMetaNet` of the given sizes, freshly initialised.

    Args:
        sizes: the task's model config.
        components: with the component layers (``False``: a graph metanetwork on the
            weights only, ``num_component_layers = 0``).
        outputs: output widths and readouts passed on (``edge_out_channels``,
            ``component_out_channels``, ``component_density_heads``, ...).

    Returns:
        The model: graph or batch ``->`` ``GradMetaNetOutput`` (``edge [E, k]``, ``node [N, k]``, ...).
    """
    return GradMetaNet(
        sizes.hidden_channels,
        component_channels=sizes.component_channels if components else None,
        num_component_layers=sizes.num_component_layers if components else 0,
        num_node_layers=sizes.num_node_layers,
        product_channels=sizes.product_channels,
        component_layer=partial(ComponentConv, edge_messages=sizes.component_edge_messages),
        **outputs,
    )


def mean_gradient(act: Tensor, grad: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over components of the rank-1 gradients: ``mean_i act[j, i] grad[k, i]`` per
    edge ``j → k`` and ``mean_i grad[k, i]`` per node (the bias's gradient).

    Args:
        act, grad: ``[..., N, B]`` factors (stacked networks ``[G, N, B]``, or a batch's ``[N, B]``).
        edge_index: ``[2, E]`` edges indexing the ``N`` axis.

    Returns:
        ``(edge [..., E], node [..., N])``.
    """
    src, dst = edge_index
    return (act[..., src, :] * grad[..., dst, :]).mean(dim=-1), grad.mean(dim=-1)


def per_graph_outputs(output: GradMetaNetOutput, num_graphs: int) -> tuple[Tensor, Tensor]:
    """Channel 0 of a batch's per-edge and per-node outputs, one row per network.

    Args:
        output: the model's output on a batch of ``num_graphs`` graphs of one architecture
            (``edge [G·E, k]``, ``node [G·N, k]``, graphs in order).
        num_graphs: ``G``.

    Returns:
        ``(edge [G, E], node [G, N])``.
    """
    return output.edge[:, 0].reshape(num_graphs, -1), output.node[:, 0].reshape(num_graphs, -1)
