"""Model pieces the tasks share: their GradMetaNet built from its config, the mean
gradient of stacked factors, and a batch's per-edge / per-node outputs as one row per network.

The curvature and INR-editing tasks both learn on batches of ``G`` networks of one
architecture (built by :class:`~gradgraph_lab.data.curvature.GraphBatcher`), with factors stacked
as ``[G, N, B]``; their model files use these instead of each writing them out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from gradgraph.nn import GradMetaNet, GradMetaNetConfig, GradMetaNetOutput

__all__ = ["LAZY_INPUT_WIDTHS", "build_gradmetanet", "mean_gradient", "per_graph_outputs"]


#: The inputs the tasks give GradMetaNet vary in width (extra columns of ``x`` and ``edge_attr``
#: per model); their widths are inferred at the first call (PyG's lazy ``Linear``), which
#: also keeps a seed's initial weights what they were when the recorded results were made.
LAZY_INPUT_WIDTHS = {"node_in_channels": -1, "edge_in_channels": -1, "component_in_channels": -1}


def build_gradmetanet(sizes: GradMetaNetConfig, *, components: bool = True, **outputs: Any) -> GradMetaNet:
    """A :class:`~gradgraph.nn.GradMetaNet` of the given sizes, freshly initialised, input widths
    inferred at its first call.

    Args:
        sizes: the task's model config (a :class:`~gradgraph.nn.GradMetaNetConfig` or a subclass).
        components: with the component layers (``False``: a graph metanetwork on the
            weights only, ``num_component_layers = 0``).
        outputs: output widths and readouts passed on (``edge_out_channels``,
            ``component_out_channels``, ``component_density_heads``, ...).

    Returns:
        The model: graph or batch ``->`` ``GradMetaNetOutput`` (``edge [E, k]``, ``node [N, k]``, ...).
    """
    if not components:
        sizes = replace(sizes, component_channels=None, num_component_layers=0)
    return GradMetaNet.from_config(sizes, **{**LAZY_INPUT_WIDTHS, **outputs})


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
