"""One inner step of ``P`` learned-optimizer runs as one batched computation (no per-particle loop).

Meta-training advances ``P`` inner runs ("particles") of one plain MLP. Two pieces replace the
general path's loop over particles:

* :func:`chain_gradients` — the closed-form batched forward and backward of all particles
  (:mod:`gradgraph.optim.fused`): losses, mean gradients and, for the GradMetaNet variant,
  the ``P`` GradGraphs filled from the factors (:class:`~gradgraph.optim.chain_graphs.ChainGraphs`),
  instead of a ``to_graph`` per particle;
* :func:`vmapped_update` — the update rule with every particle's own meta-parameters (PES),
  as ONE call: GradMetaNet's embedding for all graphs at once with per-graph parameters
  (:func:`~gradgraph.optim.per_graph.per_graph_parameters`; ``EMBED_CHUNK`` graphs per forward,
  which keeps the per-component states in cache), then the per-parameter rule vmapped over
  particles (``torch.func.vmap`` of ``functional_call``).

Both give the general path's updates (tests/optim/test_optim_protocol.py, every variant, PES
and TBPTT, with and without a schedule: 1e-10 in float64).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, vmap
from torch_geometric.data import Batch

from gradgraph.graph import GradGraph
from gradgraph.nn.context import STRUCTURE_MEMO
from gradgraph.optim.chain_graphs import ChainGraphs
from gradgraph.optim.fused import MLPChain, chain_backward, chain_forward, output_delta
from gradgraph.optim.meta_model import LearnedUpdate, OptimizerState

__all__ = ["chain_gradients", "vmapped_update"]

GRADMETANET_PREFIX = "gradmetanet."

#: particles whose graphs go through GradMetaNet in one forward: in one batch of all 32 particles of
#: the paper's protocol the per-component states ([32·82, 128, 8] for the MNIST-1D MLP) fall out of
#: cache, and a graph cost 5.5 ms against 3.4 in batches of 8 (docs/learned_optimizer.md)
EMBED_CHUNK = 8
#: where a template graph keeps the collated structure of a chunk of its copies, by chunk size
_CHUNK_STRUCTURES = "_gradgraph_embed_chunks"


def chain_gradients(chain: MLPChain, params: dict[str, Tensor], inputs: Tensor, targets: Any,
                    loss_fn: Callable[[Tensor, Any], Tensor], graphs: ChainGraphs | None = None
                    ) -> tuple[Tensor, dict[str, Tensor], Batch | None]:
    """Losses, mean gradients and (with ``graphs``) the GradGraphs of ``P`` particles on their batches.

    Args:
        chain: the network's :class:`~gradgraph.optim.fused.MLPChain`.
        params: ``{name: [P, *shape]}`` (used as data).
        inputs: ``[P, b, in]``; targets ``[P, b, ...]``.
        loss_fn: ``(output [n, out], targets [n, ...]) -> [n]``.
        graphs: the structure of the particles' graphs; ``None``: no graph is built.

    Returns:
        ``(losses [P, b], mean gradients {name: [P, *shape]}, Batch of P GradGraphs or None)``.
    """
    params = {name: value.detach() for name, value in params.items()}
    with torch.no_grad():
        output, pre, layer_inputs = chain_forward(chain, params, inputs)
    losses, delta = output_delta(output, targets, loss_fn)
    batch_size = inputs.shape[1]
    if graphs is None:
        grads, _, _ = chain_backward(chain, params, pre, layer_inputs, delta / batch_size)
        return losses, grads, None
    # The graph carries every datapoint's own ∂ℓ_b/∂u; the update reads the mean loss's gradient.
    sums, deltas, input_delta = chain_backward(chain, params, pre, layer_inputs, delta, input_grad=True)
    grads = {name: value / batch_size for name, value in sums.items()}
    return losses, grads, graphs.batch(params, layer_inputs, output, deltas, input_delta, losses)


def vmapped_update(meta_model: LearnedUpdate, meta_params: dict[str, Tensor], params: dict[str, Tensor],
                   grads: dict[str, Tensor], state: OptimizerState, graphs: Batch | None = None,
                   first_graph: GradGraph | None = None) -> tuple[dict[str, Tensor], OptimizerState]:
    """The update rule for every particle with its own meta-parameters, in one call.

    Each particle is seen by the rule as a run of ``P = 1`` (the leading axis it expects),
    exactly as the general path's per-particle call.

    Args:
        meta_model: the rule (its own parameters are not read: ``meta_params`` replace them).
        meta_params: ``{name: [P, *shape]}`` one set of ``meta_model``'s parameters per particle.
        params, grads: ``{name: [P, *shape]}``.
        state: the particles' :class:`OptimizerState`.
        graphs, first_graph: a ``Batch`` of the particles' GradGraphs and one of them (the
            GradMetaNet variant; ignored otherwise).

    Returns:
        ``(new params {name: [P, *shape]}, new state)``.
    """
    embeddings: dict[str, Tensor] | None = None
    emas = None
    if meta_model.needs_graph:
        per_particle = {name[len(GRADMETANET_PREFIX):]: value for name, value in meta_params.items()
                        if name.startswith(GRADMETANET_PREFIX)}
        num_particles = next(iter(params.values())).shape[0]
        if first_graph is not None and num_particles > EMBED_CHUNK:
            embeddings, emas = _embed_in_chunks(meta_model, graphs, first_graph, state, num_particles, per_particle)
        else:
            first = first_graph if first_graph is not None else graphs.get_example(0)
            embeddings, emas = meta_model.embed(graphs, first, state, num_particles, per_particle)
        state = OptimizerState(state.step, state.momentum, state.momenta)  # the EMAs are done: not vmapped

    def one(own_meta: dict[str, Tensor], own_params: dict[str, Tensor], own_grads: dict[str, Tensor],
            own_state: dict[str, Tensor], own_embeddings: dict[str, Tensor]
            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        new_params, new_state = functional_call(
            meta_model, own_meta, (own_params, own_grads, OptimizerState.from_tensors(own_state)),
            {"embeddings": own_embeddings if meta_model.needs_graph else None})
        return new_params, new_state.tensors()

    add_axis = lambda tensors: {key: value[:, None] for key, value in tensors.items()}  # noqa: E731
    new_params, new_state = vmap(one)(meta_params, add_axis(params), add_axis(grads), add_axis(state.tensors()),
                                      add_axis(embeddings or {}))
    new_state = OptimizerState.from_tensors({key: value[:, 0] for key, value in new_state.items()})
    new_state.factor_emas = emas
    return {key: value[:, 0] for key, value in new_params.items()}, new_state


def _embed_in_chunks(meta_model: LearnedUpdate, graphs: Batch, first: GradGraph, state: OptimizerState,
                     num_particles: int, per_particle: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """:meth:`LearnedUpdate.embed` of ``EMBED_CHUNK`` particles at a time: the same embeddings and EMAs.

    The particles' graphs are copies of ``first``'s structure with their own values, graph-major, so
    a chunk's ``Batch`` is the collated structure of that many copies (built once per chunk size and
    kept on ``first``) with the chunk's rows of the values; every op of GradMetaNet and of the
    factors' normalisation acts on each graph alone.
    """
    nodes, edges = first.num_nodes, first.num_edges
    components = int(graphs.loss.shape[0]) // num_particles if "loss" in graphs else 0
    embeddings: list[dict[str, Tensor]] = []
    emas: list[Tensor] = []
    for start in range(0, num_particles, EMBED_CHUNK):
        stop = min(start + EMBED_CHUNK, num_particles)
        chunk = copy.copy(_chunk_structure(first, stop - start))  # shares the structure and its memo
        rows, columns = slice(start * nodes, stop * nodes), slice(start * edges, stop * edges)
        chunk.act, chunk.grad, chunk.x = graphs.act[rows], graphs.grad[rows], graphs.x[rows]
        chunk.edge_attr = graphs.edge_attr[columns]
        if components:
            chunk.loss = graphs.loss[start * components:stop * components]
        own_state = OptimizerState(state.step, state.momentum, state.momenta,
                                   None if state.factor_emas is None else state.factor_emas[rows])
        own = {name: value[start:stop] for name, value in per_particle.items()}
        embedded, chunk_emas = meta_model.embed(chunk, first, own_state, stop - start, own)
        embeddings.append(embedded)
        emas.append(chunk_emas)
    return {name: torch.cat([part[name] for part in embeddings]) for name in embeddings[0]}, torch.cat(emas)


def _chunk_structure(first: GradGraph, count: int) -> Batch:
    """The collated ``Batch`` of ``count`` copies of ``first`` (kept on ``first``, by count)."""
    kept = first.__dict__.setdefault(_CHUNK_STRUCTURES, {})
    if count not in kept:
        batch = Batch.from_data_list([first] * count)
        batch.__dict__[STRUCTURE_MEMO] = {}  # GradMetaNet's context structure is built once per chunk size
        kept[count] = batch
    return kept[count]
