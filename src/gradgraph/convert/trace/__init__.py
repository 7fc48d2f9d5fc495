"""The traced converter: read the computation a model performs, op by op, and build its graph.

``to_graph`` runs the model's own ``forward`` once under a
:class:`torch.overrides.TorchFunctionMode`. Every torch function, ``Tensor`` method and
operator the forward calls passes through :meth:`Tracer.__torch_function__`, which runs it
and then *replays* it on integer id tensors that say, for every element of every tensor,

* which **neuron** it belongs to (``nodes``: a node id, ``-1`` where the element is no
  neuron's value, e.g. a normalisation statistic), and
* which **component** it belongs to (``comps``: ``datapoint * KEY_STRIDE + key``, where a
  *key* names a position: a token, a patch, a class token, a pooled vector).

Shape ops (``view``, ``reshape``, ``permute``, ``transpose``, ``split``, slicing, ``cat`` …)
need no rule of their own: the same call on the id tensors moves the ids exactly as it
moves the values, so a head split ``[b, T, d] -> [b, H, T, d_h]`` or a fused ``qkv`` slice is
followed whatever code wrote it. The rules are for the ops that *create* neurons or relate
them:

=======================  ===================================================================
op                       what the tracer does
=======================  ===================================================================
affine map               ``F.linear``, ``@`` / ``matmul`` / ``mm`` with a parameter, ``addmm``
                         (``transformers``' ``Conv1D``): a new neuron set, one edge per weight
                         entry, the bias as node values; the input's values become the source
                         neurons' ``act``
``F.embedding``          a TOKEN input neuron per table row (one-hot ``act``), an edge per
                         table entry; with constant indices (``arange``) it is a position
                         embedding, bound to the components of the tensor it is added to
elementwise unary        activations, scalar arithmetic, casts: a new *version* of the same
                         neurons (the first named activation labels the set)
elementwise binary       same neurons: a new version; different neurons (residual add, gated
                         product): tied sets, the sum absorbed into a fresh affine output or
                         written to a new MERGE set; a parameter varying per neuron: a scale
                         (NORM_SCALE edges) or a bias
norms                    ``layer_norm``, ``rms_norm`` (and hand-written ones from reductions):
                         the input's ``act`` is the normalised value, NORM_SCALE edges carry
                         ``γ``, ``β`` is the bias of a NORM set
reductions               over all neurons of a set: a statistic (no neuron); over positions
                         (mean / CLS pooling): a new set at a new component key
convolutions             ``F.conv1d/2d/3d`` run as ``gather_taps`` (one tap set of ``C``
                         neurons per kernel tap, tied to the channels) and ``F.linear``;
                         spatial pooling, group / instance norm, a flatten into a linear head
                         (``rules_conv.py``, ``docs/convolutions.md``)
message passing          gathers (``index_select``, ``x[src]``) and scatters into zeros
                         (``scatter_add_``, ``index_add_``, ``scatter_reduce`` sum / mean) along
                         a data graph's node axis: tied copies of the features at the edges and
                         nodes (``rules_graph.py``, ``docs/gnn.md``); PyG's ``GATConv`` runs
                         op by op (``stock_graph.py``)
attention                ``q @ kᵀ`` (scaled, masked, softmaxed) then ``@ v``, or
                         ``F.scaled_dot_product_attention``: heads found from the id layout,
                         an ATTENTION set for the output, QUERY_KEY / VALUE_ATTENTION /
                         QUERY_ATTENTION relations, heads as permutation blocks
=======================  ===================================================================

Anything else yields an *opaque* tensor. That is fine after the last parameterised op
(pooling, a loss computed in ``forward``); an opaque tensor that reaches a parameterised op
raises :class:`UnsupportedOperationError` naming the source line and module of the op that
made it, what it was, and what to do.

Why a torch-function trace (not ``torch.fx`` or ``torch.export``): it runs the real
forward on real inputs, so Python control flow, ``transformers`` models, masks built at run
time and shape arithmetic all work unchanged, and the error for an unsupported op points at
the user's own source line. ``torch.fx`` fails on data-dependent control flow and reports
trace-internal node names; ``torch.export`` needs export-friendly code and lowers ops to ATen,
losing ``F.linear`` / ``F.layer_norm`` as units.
"""

from gradgraph.convert.trace.meta import KEY_STRIDE, NeuronSet, UnsupportedOperationError
from gradgraph.convert.trace.ops import register_elementwise
from gradgraph.convert.trace.recurrent import recurrent_step
from gradgraph.convert.trace.result import EdgeGroup, TraceResult
from gradgraph.convert.trace.run import PlanMismatch, replay_model, trace_model

__all__ = [
    "EdgeGroup",
    "KEY_STRIDE",
    "NeuronSet",
    "PlanMismatch",
    "TraceResult",
    "UnsupportedOperationError",
    "recurrent_step",
    "register_elementwise",
    "replay_model",
    "trace_model",
]
