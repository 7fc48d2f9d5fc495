"""Running a forward under the trace or a replay of a cached trace; the module path stack."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gradgraph.capture import check_materialised
from gradgraph.convert.trace.decompositions import DECOMPOSABLE, decomposition, is_softmax, softmax_parts
from gradgraph.convert.trace.in_place import IN_PLACE_CANDIDATES, out_of_place_call, StaleValues
from gradgraph.convert.trace.meta import (
    CheckedOpLog, PlanMismatch, TraceAbort, ValueGuard, flat_arguments,
    GRADGRAPH_DIR, Neurons, Opaque, OpLog, Param, TORCH_DIR, UnsupportedOperationError, user_frame,
)
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES, numpy_keywords, op_name
from gradgraph.convert.trace.result import TraceResult
from gradgraph.convert.trace.recurrent import FoldMismatch, fold_listener, folding_time
from gradgraph.convert.trace.rules_conv import InputReadAgain
from gradgraph.convert.trace.stock_graph import (
    gat_attention, gat_refusal, is_gat, refuse_graph_attention, softmax_over_neighbours_unshifted,
)
from gradgraph.convert.trace.stock_attention import check_attention, self_attention
from gradgraph.convert.trace.tracer import Tracer
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import ActivationKind


# ----------------------------------------------------------------------- running it
class _ModuleTracker:
    """Global module hooks: the module path stack for messages, and registered elementwise modules."""

    def __init__(self, tracer: Any, replay: bool = False, modules: list[nn.Module] | None = None) -> None:
        self.tracer = tracer
        self.replay = replay
        self.modules = modules  # list(model.modules()) where the caller has it
        self.handles: list[Any] = []
        self.patched: list[nn.Module] = []
        #: ``(module path, (op, position) of the op that produced its output)`` per module call
        self.module_outputs: list[tuple[str, Any]] = []

    def __enter__(self) -> "_ModuleTracker":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        paths = None if self.replay else self.tracer.module_paths

        def pre(module: nn.Module, args: Any) -> None:
            self.tracer.module_stack.append(paths.get(id(module), type(module).__name__))
            self.tracer.module_types.append(type(module).__name__)

        module_outputs = self.module_outputs

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.tracer.module_stack:
                self.tracer.module_stack.pop()
                self.tracer.module_types.pop()
            # which op's output each module call returned: lets a plan of a plain chain record
            # its tensors by calling the leaves (gradgraph.convert.chain)
            module_outputs.append((paths.get(id(module), ""), self.tracer.log.source(output)
                                   if isinstance(output, Tensor) else None))

        # a replay raises nothing that names a module, so it skips the per-call hooks
        self.handles = [] if self.replay else [register_module_forward_pre_hook(pre),
                                               register_module_forward_hook(post)]
        for module in self.modules if self.modules is not None else self.tracer.model.modules():
            activation = next((kind for cls, kind in ELEMENTWISE_MODULES.items() if isinstance(module, cls)), None)
            if activation is not None:
                self._patch(module, activation)
            elif isinstance(module, nn.MultiheadAttention):
                self._patch_attention(module)
            elif is_gat(module) and gat_refusal(module) is None:
                self._patch_gat(module)
        return self

    def _patch_gat(self, module: nn.Module) -> None:
        """PyG's ``GATConv`` / ``GATv2Conv`` runs as :func:`~gradgraph.convert.trace.stock_graph.gat_attention` (its
        attention written op by op, checked against the module's own forward on every call)."""
        original = module.forward
        path = self.tracer.module_paths.get(id(module), "")

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return gat_attention(module, path, original, *args, **kwargs)

        module.forward = forward  # type: ignore[method-assign]
        self.patched.append(module)

    def _patch(self, module: nn.Module, activation: ActivationKind) -> None:
        original = module.forward
        tracer = self.tracer

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            # the module's forward, its step of the log and the trace's rule all outside the tracer's mode, as
            # the mode runs its own rules: under it, the log's read of the output's shape was logged as an op
            # of the forward before the module's own (and a replay's checked log reads it after), so no replay
            # of a model with a registered module matched its plan, and every conversion traced afresh
            with torch._C.DisableTorchFunction():
                output = original(x, *args, **kwargs)
                tracer.op_index = tracer.log.step(f"module {type(module).__name__}", (x, *args), kwargs, output)
                tracer.captured[tracer.op_index] = ((x, *args), kwargs, output)
                if not self.replay:
                    tracer.unary(x, output, type(module).__name__, activation)
            return output

        module.forward = forward  # type: ignore[method-assign]
        self.patched.append(module)

    def _patch_attention(self, module: nn.MultiheadAttention) -> None:
        original = module.forward
        path = self.tracer.module_paths.get(id(module), "")
        tracer = self.tracer

        def forward(query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                    key_padding_mask: Tensor | None = None, need_weights: bool = True,
                    attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
            # the stock module runs one fused kernel on its packed in_proj_weight; gradgraph's
            # functional form computes the same with F.linear on row slices, which the trace follows
            check_attention(path, module)
            key = query if key is None else key
            value = key if value is None else value
            if not (query is key and key is value):
                query_meta = tracer.meta(query) if isinstance(tracer, Tracer) else None  # (a replay has no metas)
                if isinstance(query_meta, Param):  # SigLIP's pooling head, a Perceiver's latents
                    reason = ("attention pooling with a learned query (the parameter "
                              f"'{tracer.param_names[query_meta.index]}' attends over the tokens) is not "
                              "supported: the query is a parameter, not values of the input. Pool the tokens "
                              "otherwise (their mean, a class token; SigLIP: vision_use_head=False)")
                else:
                    reason = ("cross-attention (query, key and value differ) is not supported; self-attention "
                              "takes one tensor (for a bare module pass nothing for key/value in forward_kwargs)")
                raise UnsupportedOperationError(path, "nn.MultiheadAttention", tracer.location(), reason,
                                                "MultiheadAttention")
            if is_causal and attn_mask is None:
                length = query.shape[1] if module.batch_first else query.shape[0]
                attn_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
            probabilities: list[Tensor] = []
            output = self_attention(module, query, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    path=path, probabilities=probabilities)
            if not need_weights:
                return output, None
            # the weights the module returns, made outside the trace: no op of the trace for a model that
            # drops them (the default need_weights=True), and for one that reads them autograd still
            # carries their gradient to the queries' and keys' neurons; a parameterised op of them is a
            # parameter use the trace does not see, which the summed-gradient check refuses
            with torch._C.DisableTorchFunction():
                weights = probabilities[0].mean(1) if average_attn_weights else probabilities[0]
            return output, weights

        del original
        module.forward = forward  # type: ignore[method-assign]
        self.patched.append(module)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.patched:
            del module.forward
        self.tracer.module_stack.clear()
        self.tracer.module_types.clear()


def trace_model(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any],
                datapoint_dim: int = 0, datapoints: Tensor | None = None, fold_time: bool = True) -> TraceResult:
    """Run ``forward(x)`` under the tracer and return what it found.

    ``x`` (:attr:`TraceResult.inputs`) is the input as the model saw it (a leaf that requires
    grad for float inputs); ``inputs.shape[datapoint_dim]`` counts the datapoints, or ``datapoints``
    ``[inputs.shape[0]]`` names each row's (``b = datapoints.max() + 1``).
    ``fold_time``: run the loops of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` folded over time
    (``rules_recurrent.py``); where a loop's steps do not fold, the forward is traced again with
    the loops unrolled (:attr:`TraceResult.fold_time` says which ran). A forward refused while a
    loop ran folded is traced again unrolled too (folded, the input terms of all steps are one
    ``F.linear``, which some inputs do not allow); if that is refused as well, the folded
    trace's error is raised.
    """
    check_materialised(model, "to_graph")
    refuse_graph_attention(model)  # GATConv & co.: attention over a data graph's neighbours, by name
    attempts = [(True, fold_time), (False, fold_time)]
    folded_error: UnsupportedModuleError | None = None
    unfold_reason: str | None = None
    while attempts:
        # an input read as convolution windows and again: read it as channels; a loop whose
        # steps do not fold: unroll it
        input_taps, fold = attempts.pop(0)
        tracer = Tracer(model, inputs.shape[datapoint_dim] if inputs.dim() else 1, datapoint_dim, datapoints)
        tracer.input_taps = input_taps
        x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
        tracer.bind_input(x)
        tracker = _ModuleTracker(tracer)
        try:
            tracer.fold_time = fold
            with torch.enable_grad(), tracker, tracer, folding_time(fold), fold_listener(tracer), \
                    softmax_over_neighbours_unshifted():
                output = _run_forward(model, forward, x, tracer)
            stale = tracer.stale.in_output(output)
            if stale is not None:
                raise tracer.unsupported("the model's output", StaleValues.message(stale))
            cut = tracer.cut_in_output(output)
            if cut is not None:
                raise tracer.unsupported("the model's output", (
                    f"is made from values of the datapoints whose gradient was cut ({cut}): a statistic of the "
                    f"batch made so (out / out.detach().abs().max()) couples the {tracer.num_datapoints} datapoints "
                    "where autograd sees a constant, and gradgraph cannot tell it from one of a datapoint alone, so "
                    "every per-sample gradient could be silently wrong. Compute the output with gradient (no detach "
                    "or torch.no_grad()), or convert one datapoint at a time"))
            tracer.close_folds()  # outside the mode: its bookkeeping is no op of the forward
        except InputReadAgain:
            continue
        except FoldMismatch as mismatch:
            unfold_reason = str(mismatch)  # said once the unrolled trace ends: converted, or refused
            attempts = [(input_taps, False)] + [(taps, False) for taps, _ in attempts]
            continue
        except UnsupportedModuleError as error:
            if unfold_reason is not None:  # the unrolled trace refused: no "converted unrolled" claim
                _unfolded(model, unfold_reason, "traced unrolled, the forward is refused (the error below)")
            if folded_error is not None:
                raise folded_error from None
            if not (fold and tracer.fold_seen):
                raise
            folded_error = error
            attempts = [(input_taps, False)] + [(taps, False) for taps, _ in attempts]
            continue
        break
    if unfold_reason is not None:
        _unfolded(model, unfold_reason)
    if folded_error is not None:
        _unfolded(model, f"folded, the forward was refused: {folded_error}")
    return TraceResult(fold_time=fold,
        sets=tracer.sets, num_nodes=tracer.num_nodes, edges=tracer.edges, ties=tracer.ties,
        attention=tracer.attention, cuts=tracer.cuts, num_keys=len(tracer.keys), param_names=tracer.param_names,
        param_shapes=tracer.param_shapes, params=tracer.params, fingerprints=tracer.log.fingerprints,
        value_guards=tracer.value_guards, output_sets=_output_sets(tracer, output), captured=tracer.captured,
        module_outputs=tracker.module_outputs, output=output, inputs=x, num_datapoints=tracer.num_datapoints,
        log=tracer.log, derived=tracer.derived, grouped=tracer.grouped)


def _unfolded(model: nn.Module, reason: str,
              outcome: str = "every loop is converted unrolled, exactly (docs/recurrent.md)") -> None:
    """Say that a model's recurrent loops were asked to fold and do not, and what came of it (by default:
    converted unrolled, exactly)."""
    # the user's call of to_graph / convert_closure: the first frame outside gradgraph and torch (a fixed
    # stacklevel pointed into gradgraph's traced.py)
    _, steps = user_frame(sys._getframe(1))
    warnings.warn(f"to_graph: a recurrent loop of {type(model).__name__} does not fold over time ({reason}); "
                  f"{outcome}. Pass fold_time=False to ask for the unrolled layout", UserWarning, stacklevel=2 + steps)


def _user_frame(traceback: Any) -> str:
    """``file:line in Class.forward`` of the innermost frame of the user's code in a traceback."""
    found = "<unknown location>"
    while traceback is not None:
        code = traceback.tb_frame.f_code
        filename = os.path.abspath(code.co_filename)
        if not filename.startswith(TORCH_DIR) and not filename.startswith(GRADGRAPH_DIR):
            name = getattr(code, "co_qualname", code.co_name)
            found = f"{os.path.basename(filename)}:{traceback.tb_lineno} in {name}"
        traceback = traceback.tb_next
    return found


#: gradgraph's files whose frames run torch ops on the model's behalf (an op split into parts, a
#: stock module run op by op): an error raised there is the model's, as if torch had raised it
_RUNS_MODEL_OPS = ("decompositions.py", "recurrent.py", "stock_attention.py", "stock_graph.py", "run.py")
_TRACE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _internal_frame(error: BaseException) -> str | None:
    """``file:line in function`` where an exception was raised, if that is the trace's own bookkeeping
    (a rule in ``convert/trace/``), not an op of the model: the tracer's ``__torch_function__`` runs every op
    of the model, so an error raised by the op itself has that frame (or torch's) innermost."""
    if isinstance(error, UnsupportedModuleError) or type(error).__module__.startswith("gradgraph"):
        return None  # a refusal, or one of the trace's own signals (a loop that does not fold, ...)
    traceback = error.__traceback__
    innermost = None
    while traceback is not None:
        innermost, traceback = traceback, traceback.tb_next
    if innermost is None:
        return None
    code = innermost.tb_frame.f_code
    filename = os.path.abspath(code.co_filename)
    if (not filename.startswith(_TRACE_DIR) or code.co_name == "__torch_function__"
            or os.path.basename(filename) in _RUNS_MODEL_OPS):
        return None
    return f"{os.path.relpath(filename, GRADGRAPH_DIR)}:{innermost.tb_lineno} in {code.co_name}"


def _run_forward(model: nn.Module, forward: Callable[[Tensor], Any], x: Tensor, tracer: Tracer | None = None) -> Any:
    """``forward(x)``; torch's own errors from the model's code become a GradGraphError that
    names the input and the line of the forward that failed."""
    try:
        return forward(x)
    except TraceAbort as abort:
        if tracer is not None and isinstance(abort.error, UnsupportedOperationError):
            _locate_in_module(abort.error, abort.__traceback__, tracer)
        raise abort.error from None
    except Exception as error:
        internal = _internal_frame(error)  # (never one of gradgraph's own errors)
        if internal is not None:
            raise GradGraphError(
                f"internal error in gradgraph's trace ({internal}) while {type(model).__name__} ran on inputs of "
                f"shape {list(x.shape)} ({x.dtype}), at {_user_frame(error.__traceback__)}: {type(error).__name__}: "
                f"{error}. This is a bug in gradgraph, not in the model: please report it with the model") from error
        if isinstance(error, GradGraphError) or not isinstance(error, RuntimeError | IndexError | ValueError):
            raise
        raise GradGraphError(
            f"{_user_frame(error.__traceback__)}: {type(model).__name__} failed on inputs of shape "
            f"{list(x.shape)} ({x.dtype}): {type(error).__name__}: {error}") from error


def _locate_in_module(error: UnsupportedOperationError, traceback: Any, tracer: Tracer) -> None:
    """Name the forward of the module the op ran in as the error's source line, where none of the
    user's code runs inside the model on the way to the op (a stock ``nn.Conv1d`` in an
    ``nn.Sequential`` model): the innermost user frame is then the line that called ``to_graph``,
    which says nothing about where in the model the op is. Where the user's code does run inside
    the model (a block's forward calling an ``nn.Sequential``), its line is the better location
    and is kept."""
    if not tracer.module_stack or error.path != tracer.module_stack[-1]:
        return  # the error is about an op of another module (an opaque value made earlier)
    module = dict(tracer.model.named_modules()).get(error.path)
    code = getattr(type(module).forward, "__code__", None) if module is not None else None
    model_code = getattr(type(tracer.model).forward, "__code__", None)
    module_frame, user_traceback, inside_model = None, None, False
    while traceback is not None:
        frame_code = traceback.tb_frame.f_code
        inside_model = inside_model or frame_code is model_code
        if frame_code is code:
            module_frame = traceback
            if not inside_model:  # the model's forward was not seen: count only frames below the module
                user_traceback = None
        elif not os.path.abspath(frame_code.co_filename).startswith((TORCH_DIR, GRADGRAPH_DIR)) and (
                inside_model or module_frame is not None):
            user_traceback = traceback
        traceback = traceback.tb_next
    if module_frame is None or user_traceback is not None:
        return  # the op ran under the user's code inside the model: its line is the location already
    name = getattr(code, "co_qualname", code.co_name)
    location = f"{os.path.basename(code.co_filename)}:{module_frame.tb_lineno} in {name}"
    if error.args and isinstance(error.args[0], str) and error.args[0].startswith(error.location):
        error.args = (location + error.args[0][len(error.location):], *error.args[1:])
    error.location = location


class _Replayer(TorchFunctionMode):
    """Runs a forward, checks each op against a trace's fingerprints and keeps the wanted ones.

    The cheap path of a converter that has seen the architecture: no id tensors, no rules,
    only the tensors the graph's factors come from.
    """

    def __init__(self, model: nn.Module, fingerprints: list[tuple], wanted: set[int],
                 guards: dict[int, list[ValueGuard]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.fingerprints = fingerprints
        self.wanted = wanted
        self.guards = guards or {}
        self.captured: dict[int, tuple[tuple, dict, Any]] = {}
        self.module_stack: list[str] = []
        self.module_types: list[str] = []
        self._module_paths: dict[int, str] | None = None
        self.log: OpLog | None = None
        self.op_index = -1
        self.stale = StaleValues()  # in-place ops run out of place, as the trace ran them (trace/in_place.py)

    @property
    def module_paths(self) -> dict[int, str]:
        """``id(module) -> path`` (only a patched attention module asks, so worked out on demand)."""
        if self._module_paths is None:
            self._module_paths = {id(module): name for name, module in self.model.named_modules()}
        return self._module_paths

    def location(self) -> str:
        return "<replay>"

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if kwargs is None:
            kwargs = {}
        try:
            decomposable = func in DECOMPOSABLE  # decomposition() would say None at once otherwise
        except TypeError:
            decomposable = False
        if decomposable:
            parts = decomposition(func, args, kwargs)
            if parts is not None:
                with self:  # as the trace ran it: the same ops, numbered the same
                    return parts()
        elif is_softmax(func):
            # the trace ran a softmax over positions as its parts for neuron values only: so does the replay
            # where its log has them (the parts' first op, not the softmax, comes next)
            expected = self.log.expected
            if self.log.count < len(expected) and expected[self.log.count][0] != op_name(func):
                parts = softmax_parts(func, args, kwargs)
                if parts is not None:
                    with self:
                        return parts()
        name = op_name(func)
        kwargs = numpy_keywords(name, kwargs)  # as the trace read them
        if self.stale.stale and self.stale.read(name, args, kwargs) is not None:
            raise PlanMismatch(self.log.count)  # the trace refuses it, by name
        in_place = out_of_place_call(func, name, args, kwargs) if name in IN_PLACE_CANDIDATES else None
        if in_place is not None:
            # as the trace ran it: out of place where its log has the out-of-place op (it keeps
            # some in place, attention scores: rules_attention.py)
            expected = self.log.expected
            if self.log.count < len(expected) and expected[self.log.count][0] == in_place[1]:
                target = args[0] if args else kwargs.get("input")
                func, name, args, kwargs = in_place
            else:
                in_place = None
        output = func(*args, **kwargs)
        if in_place is not None:
            self.stale.mark(target, output, name)
        # raises PlanMismatch at the first op that differs from the trace's fingerprint
        index = self.log.step(name, args, kwargs, output)
        if not self.guards and index not in self.wanted:
            return output
        guards = self.guards.get(index)
        if guards is not None:
            arguments = flat_arguments(args, kwargs)
            if not all(guard.holds(arguments) for guard in guards):
                raise PlanMismatch(index)  # a constant's values change the layout (another buffer)
        if index in self.wanted:
            self.captured[index] = (args, kwargs, output)
        return output


def replay_model(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any], fingerprints: list[tuple],
                 wanted: set[int], guards: dict[int, list[ValueGuard]] | None = None,
                 fold_time: bool = False, parameters: Mapping[str, Tensor] | None = None,
                 modules: list[nn.Module] | None = None) -> tuple[_Replayer, Any, Tensor]:
    """Run ``forward(x)`` checking it against ``fingerprints`` and the plan's value ``guards``;
    raises :class:`PlanMismatch` if it differs. ``fold_time``: as the trace ran the recurrent
    loops (:attr:`TraceResult.fold_time`). ``parameters`` (``dict(model.named_parameters())``) and
    ``modules`` (``list(model.modules())``): where the caller has read them already."""
    replayer = _Replayer(model, fingerprints, wanted, guards)
    x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
    named = parameters.items() if parameters is not None else model.named_parameters()
    replayer.log = CheckedOpLog(x, {id(p): name for name, p in named}, fingerprints)
    try:
        with torch.enable_grad(), _ModuleTracker(replayer, replay=True, modules=modules), replayer, \
                folding_time(fold_time), softmax_over_neighbours_unshifted():
            output = _run_forward(model, forward, x)
    except UnsupportedModuleError:
        # a module run in gradgraph's own form refused a call the trace did not see (cross-attention where it
        # saw self-attention): the replay knows no source line (its location is "<replay>"), so trace afresh,
        # which refuses the same call naming the user's line
        raise PlanMismatch(replayer.log.count) from None
    if replayer.stale.in_output(output) is not None:
        raise PlanMismatch(replayer.log.count)  # the trace refuses it, by name
    if replayer.log.mismatch is not None or replayer.log.count != len(fingerprints):
        # a mismatch the forward caught and went on from still counts; so do ops the trace had and this run not
        raise PlanMismatch(replayer.log.count if replayer.log.mismatch is None else replayer.log.mismatch)
    return replayer, output, x


def _output_sets(tracer: Tracer, output: Any) -> set[int]:
    """The neuron sets whose values reach the model output (directly or through opaque ops)."""
    sets: set[int] = set()
    for value in tree_flatten(output)[0]:
        meta = tracer.meta(value) if isinstance(value, Tensor) else None
        if isinstance(meta, Neurons):
            sets.update(meta.versions)
        elif isinstance(meta, Opaque):
            sets.update(meta.sets)
    return sets
