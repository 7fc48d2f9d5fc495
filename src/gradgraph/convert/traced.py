"""The traced converter's entry points: :func:`to_graph_traced` and its closure form.

A conversion is a forward pass under the trace (or a replay of the architecture's cached
:class:`~gradgraph.convert.plan.TracePlan`), the per-datapoint objective, and the finish:
the plan (:mod:`gradgraph.convert.layout` lays out the graph and its group), the one backward
pass and the graph (:mod:`gradgraph.convert.plan`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradgraph.capture import (LossFn, check_closure_losses, check_materialised, closure_inputs,
                               per_datapoint_objective)
from gradgraph.convert.chain import chain_capture, plain_chain
from gradgraph.convert.layout import make_plan
from gradgraph.convert.assembly import assemble, fill_factors
from gradgraph.convert.plan import PLAN_CACHE, PlanCache, TracePlan, parameter_signature, plan_key
from gradgraph.convert.trace import PlanMismatch, TraceResult, UnsupportedOperationError, replay_model, trace_model
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES
from gradgraph.errors import GradGraphError, UnsupportedModuleError
from gradgraph.graph import GradGraph
from gradgraph.value_reads import DerivedValueReads

__all__ = ["PLAN_CACHE", "PlanCache", "TracePlan", "convert_closure_traced", "default_datapoint_dim", "to_graph_traced"]


def to_graph_traced(
    model: nn.Module,
    inputs: Tensor,
    *,
    targets: Any = None,
    loss_fn: LossFn | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    datapoint_dim: int | None = None,
    datapoints: Tensor | None = None,
    fold_time: bool = True,
) -> GradGraph:
    """Convert any model whose forward gradgraph can follow; see :func:`gradgraph.to_graph`.

    Args:
        model: the network (``model.eval()`` for dropout; batch norm in eval mode).
        inputs: ``[b, ...]``: features last for float inputs (``[b, d]``, ``[b, T, d]``,
            images flattened by the model), token ids ``[b, T]`` for models starting with
            an embedding; sequence-first ``[T, b, d]`` with ``datapoint_dim=1``.
        targets, loss_fn, forward_kwargs: as for :func:`gradgraph.to_graph`; ``loss_fn``
            receives the model's output as the model returns it (a tensor, a tuple, a
            ``transformers`` ``ModelOutput``) and returns ``[b]``.
        datapoint_dim: the axis of ``inputs`` that counts datapoints. ``None``: 1 if the
            model's ``nn.MultiheadAttention`` modules are all sequence-first
            (``batch_first=False``, torch's default), else 0.
        datapoints: ``[n]`` int64, the datapoint of each row of ``inputs`` on axis 0 (PyG's
            ``batch`` vector: graphs joined into one ``x [n, features]``, each a datapoint);
            ``b = datapoints.max() + 1`` and every datapoint must own a row. ``None``: the rows
            along ``datapoint_dim`` are the datapoints.
        fold_time: the layout of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: ``True`` folds each
            loop over time (one neuron set per gate and state over all steps, each weight one
            edge set, one component per (datapoint, step); a loop whose steps do not fold is
            unrolled), ``False`` unrolls every loop (one set per gate and step). docs/recurrent.md.

    Returns:
        A :class:`~gradgraph.GradGraph` with ``B = b * K`` components.
    """
    scan = _Scan.of(model, "to_graph")
    _check_no_autocast("to_graph")
    datapoint_dim = _check_inputs(model, inputs, datapoint_dim, scan)
    datapoints = _check_datapoints(inputs, datapoints, datapoint_dim)
    kwargs = dict(forward_kwargs or {})

    def forward(x: Tensor) -> Any:
        try:
            if isinstance(model, nn.MultiheadAttention):  # a bare module: its output, not (output, weights)
                return model(x, **kwargs)[0]
            return model(x, **kwargs)
        except TypeError as error:
            # only a call the model's signature refuses: a TypeError raised inside the forward (the
            # model's own, or a bug of the trace's rules) is not about forward_kwargs
            if "argument" not in str(error) or _binds(model, x, kwargs):
                raise
            raise GradGraphError(
                f"to_graph: calling {type(model).__name__}(inputs, **forward_kwargs) failed: {error}. Pass the "
                "model's other arguments through forward_kwargs") from error

    with torch.enable_grad():  # the objective is differentiated, also when the caller is in no_grad
        run = _forward_pass(model, inputs, forward, kwargs, datapoint_dim, scan, plain_call=not kwargs,
                            datapoints=datapoints, fold_time=fold_time)
        objective = _objective(run.output, targets, loss_fn, run.num_datapoints)
    return _finish(run, objective, scan)


def _binds(model: nn.Module, x: Tensor, kwargs: dict) -> bool:
    """Whether ``model.forward`` accepts ``(x, **kwargs)`` (``True`` where its signature cannot be read)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(x, **kwargs)
    except TypeError:
        return False
    return True


def convert_closure_traced(model: nn.Module, closure: Callable[[], Tensor], *,
                           datapoint_dim: int | None = None,
                           datapoints: Tensor | None = None) -> tuple[GradGraph, Tensor]:
    """Convert ``model`` on the batch that ``closure`` runs it on, in that one call of ``closure``.

    The closure calls the model once, as ``model(inputs, *args, **kwargs)`` (or with the input
    by the name of ``forward``'s first parameter, ``model(input_ids=x)``), and returns the
    per-datapoint losses ``[b]`` without calling ``backward`` — the closure of a
    ``torch.optim.Optimizer.step``, minus the backward. The model's forward is traced (or a
    cached plan replayed) during that call; the losses' one backward pass gives the factors.
    Everything else the closure does (drawing a batch, the loss) runs once, as written.

    Args:
        model: the network the closure calls.
        closure: ``() -> [b]`` per-datapoint losses.
        datapoint_dim, datapoints: as for :func:`to_graph_traced` (``datapoints``: the rows' datapoints of
            the input the closure passes, PyG's ``batch`` vector).

    Returns:
        ``(graph, losses)``: the :class:`~gradgraph.GradGraph` (``B = b * K`` components) and
        the closure's losses ``[b]``, detached.

    Raises:
        GradGraphError: the closure never calls the model, calls it twice, calls it without an
            input tensor, or returns something other than ``[b]`` losses; the errors of
            :func:`to_graph_traced` for the model itself.
    """
    runs: list[_Pass] = []
    scan = _Scan.of(model, "convert_closure")

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs, rest, kwargs = closure_inputs(model, bool(runs), args, kwargs)
        _check_no_autocast("convert_closure")
        dim = _check_inputs(model, inputs, datapoint_dim, scan)
        rows = _check_datapoints(inputs, datapoints, dim)
        del model.forward  # the model's own forward (or the trace's stand-in for it) runs inside
        try:
            run = _forward_pass(model, inputs, lambda x: model.forward(x, *rest, **kwargs),
                                {"args": rest, **kwargs}, dim, scan, plain_call=not rest and not kwargs,
                                datapoints=rows)
        finally:
            model.forward = forward  # type: ignore[method-assign]
        runs.append(run)
        guard.follow(run.output, run.num_datapoints)
        return run.output

    if "forward" in vars(model):
        raise GradGraphError(f"{type(model).__name__} has a forward set on the instance; convert_closure needs the "
                             "class's forward")
    model.forward = forward  # type: ignore[method-assign]
    guard = DerivedValueReads("the closure")  # the loss after the model's call must not read the batch into Python
    try:
        with torch.enable_grad(), guard:  # the losses are differentiated, also when the caller is in no_grad
            losses = closure()
    finally:
        del model.forward
    if not runs:
        raise GradGraphError(f"the closure never called {type(model).__name__}")
    run = runs[0]
    check_closure_losses(losses, run.num_datapoints)
    return _finish(run, losses, scan), losses.detach()


@dataclass
class _Scan:
    """What a conversion reads off the model, once: ``named_parameters()`` and ``modules()``,
    and what the checks and the plan key read off them.

    Attributes:
        parameters: ``dict(model.named_parameters())``.
        modules: ``list(model.modules())``.
        signature: per parameter ``(name, shape, floating, device type, requires_grad)``: its
            part of the plan key (:func:`gradgraph.convert.plan.plan_key`).
        float_dtypes: the floating dtypes of the parameters.
    """

    parameters: dict[str, Tensor]
    modules: list[nn.Module]
    signature: tuple
    float_dtypes: set[torch.dtype]

    @classmethod
    def of(cls, model: nn.Module, caller: str) -> "_Scan":
        """The model's scan; raises (naming ``caller``) if a parameter is on the ``meta`` device
        (see :func:`gradgraph.capture.check_materialised`)."""
        scan = _walk(model)
        if scan is None:
            parameters = dict(model.named_parameters())
            scan = cls(parameters, list(model.modules()), parameter_signature(parameters),
                       {param.dtype for param in parameters.values() if param.dtype.is_floating_point})
        if any(param.is_meta for param in scan.parameters.values()):
            check_materialised(model, caller)
        return scan


_MODULE = nn.Module


def _walk(model: nn.Module) -> _Scan | None:
    """The :class:`_Scan` of ``model`` in one recursive walk over the modules' ``_modules`` and
    ``_parameters``, listing them as torch's generators do (pre-order, each module and parameter
    once, under its first name): a cached conversion of a small model pays this on every call,
    and one pass is a fraction of torch's nested generators plus a loop per check. ``None``
    where a module overrides how torch lists its members (then the caller asks torch)."""
    root = type(model)
    if (root.named_parameters is not _MODULE.named_parameters or root.modules is not _MODULE.modules
            or root._named_members is not _MODULE._named_members):
        return None
    parameters: dict[str, Tensor] = {}
    modules: list[nn.Module] = []
    signature: list[tuple] = []
    float_dtypes: set[torch.dtype] = set()
    seen_modules: set[nn.Module] = set()
    seen_parameters: set[int] = set()  # ids: Tensor.__hash__ is id() behind a Python call

    def visit(module: nn.Module, prefix: str) -> bool:
        if type(module).named_modules is not _MODULE.named_modules:
            return False
        seen_modules.add(module)
        modules.append(module)
        for name, param in module._parameters.items():
            if param is None or id(param) in seen_parameters:
                continue
            seen_parameters.add(id(param))
            name = prefix + name
            parameters[name] = param
            dtype = param.dtype
            floating = dtype.is_floating_point
            signature.append((name, param.shape, floating, param.device.type, param.requires_grad))
            if floating:
                float_dtypes.add(dtype)
        for name, child in module._modules.items():
            if child is not None and child not in seen_modules and not visit(child, prefix + name + "."):
                return False
        return True

    return _Scan(parameters, modules, tuple(signature), float_dtypes) if visit(model, "") else None


def _check_datapoints(inputs: Tensor, datapoints: Tensor | None, datapoint_dim: int) -> Tensor | None:
    """The rows' datapoints as an int64 CPU tensor, checked: ``[inputs.shape[0]]``, axis 0 the rows,
    values ``0 .. b-1`` with every datapoint owning a row."""
    if datapoints is None:
        return None
    if not isinstance(datapoints, Tensor) or datapoints.dim() != 1 or datapoints.is_floating_point() \
            or datapoints.dtype == torch.bool:
        raise GradGraphError("to_graph: datapoints must be a 1-D integer tensor (PyG's batch vector), got "
                             f"{type(datapoints).__name__}{list(datapoints.shape) if isinstance(datapoints, Tensor) else ''}")
    if datapoint_dim != 0 or inputs.dim() < (2 if inputs.is_floating_point() else 1) or len(datapoints) != inputs.shape[0]:
        raise GradGraphError(f"to_graph: datapoints [{len(datapoints)}] must name the datapoint of each row of inputs "
                             f"on axis 0 ([rows, ..., features], or [rows] ids); inputs have shape {list(inputs.shape)} and "
                             f"datapoint_dim {datapoint_dim}")
    datapoints = datapoints.detach().to("cpu", torch.long)
    count = int(datapoints.max()) + 1 if len(datapoints) else 0
    if len(datapoints) == 0 or int(datapoints.min()) < 0 or torch.unique(datapoints).numel() != count:
        raise GradGraphError(f"to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values "
                             f"{torch.unique(datapoints).tolist()[:20]}")
    return datapoints


def _check_inputs(model: nn.Module, inputs: Tensor, datapoint_dim: int | None, scan: _Scan) -> int:
    """The datapoint axis of ``inputs`` (non-negative), after checking the batch against the model."""
    if datapoint_dim is None:
        datapoint_dim = _default_datapoint_dim(scan.modules)
    if inputs.dim() == 0 or not -inputs.dim() <= datapoint_dim < inputs.dim() or inputs.shape[datapoint_dim] == 0:
        raise GradGraphError(f"inputs must be a batch with b > 0 datapoints on axis {datapoint_dim}, got shape "
                             f"{list(inputs.shape)}")
    datapoint_dim %= inputs.dim()
    empty = [axis for axis, size in enumerate(inputs.shape) if size == 0]
    if empty:
        # no datapoint holds a value there, so no component could carry a factor (the trace failed
        # inside its own bookkeeping on such an input, and the error blamed the model)
        raise GradGraphError(f"inputs {list(inputs.shape)}: axis {empty[0]} has length 0 (no tokens, positions or "
                             "features): every datapoint needs at least one value there")
    if inputs.is_floating_point() and inputs.dim() > 1 and datapoint_dim == inputs.dim() - 1:
        raise GradGraphError(f"inputs {list(inputs.shape)}: the datapoint axis {datapoint_dim} is the feature axis; "
                             "features must be the last axis")
    param_dtypes = scan.float_dtypes
    if inputs.is_floating_point() and param_dtypes and inputs.dtype not in param_dtypes:
        raise GradGraphError(f"inputs {list(inputs.shape)} are {inputs.dtype} but {type(model).__name__}'s parameters "
                             f"are {sorted(str(dtype) for dtype in param_dtypes)}: convert one to the other's dtype")
    return datapoint_dim


@dataclass
class _Pass:
    """One forward of the model under the trace (``plan`` is ``None``, ``trace`` what it found) or
    a replay of a cached plan."""

    key: tuple
    plan: TracePlan | None
    trace: TraceResult | None
    captured: dict
    output: Any
    x: Tensor
    num_datapoints: int
    dtype: torch.dtype
    chain: list[tuple[str, nn.Module]] | None = None


def _forward_pass(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any], kwargs: dict[str, Any],
                  datapoint_dim: int, scan: _Scan, *, plain_call: bool = False,
                  datapoints: Tensor | None = None, fold_time: bool = True) -> _Pass:
    """Record the tensors of this architecture's cached plan, or trace the forward afresh.

    A plan records its tensors by calling a plain chain's leaves (its :class:`ChainCapture`,
    when this call is ``model(inputs)`` on the chain the plan was traced on), else by a replay
    that checks every op against the plan's fingerprints. ``plain_call``: the model is called
    with the input alone. ``fold_time``: as for :func:`to_graph_traced` (part of the plan key).

    Frozen floating parameters (``requires_grad=False``) require grad for the length of the pass
    (:func:`_frozen_tracked`): the factors need the gradient at every neuron value, and a value
    that only frozen parameters and integer ids make (a frozen embedding of token ids) would
    otherwise have none — its neurons' ``grad`` and the frozen table's per-sample gradients
    silently zero.
    """
    with _frozen_tracked(scan.parameters):
        return _forward_pass_tracked(model, inputs, forward, kwargs, datapoint_dim, scan, plain_call=plain_call,
                                     datapoints=datapoints, fold_time=fold_time)


@contextmanager
def _frozen_tracked(parameters: Mapping[str, Tensor]) -> Iterator[None]:
    """Every floating parameter of ``parameters`` requires grad inside; the frozen ones are frozen
    again on the way out (the conversion reads their gradients only through the factors)."""
    frozen = [param for param in parameters.values() if param.is_floating_point() and not param.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def _forward_pass_tracked(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any], kwargs: dict[str, Any],
                          datapoint_dim: int, scan: _Scan, *, plain_call: bool,
                          datapoints: Tensor | None, fold_time: bool) -> _Pass:
    """:func:`_forward_pass`'s body, with every floating parameter requiring grad."""
    num_datapoints = inputs.shape[datapoint_dim] if datapoints is None else int(datapoints.max()) + 1
    dtype = inputs.dtype if inputs.is_floating_point() else next(iter(scan.parameters.values())).dtype
    key = (plan_key(model, inputs, kwargs, scan.signature, scan.modules), datapoint_dim, fold_time)
    if datapoints is not None:  # which rows are which datapoint's is layout: the key holds it (no chain capture)
        key = (*key, ("datapoints", datapoints.numpy().tobytes()))
        plain_call = False
    chain = plain_chain(model) if plain_call else None
    plan = PLAN_CACHE.get(key)
    if plan is not None:
        if plan.chain is not None and plan.chain.applies(chain):
            x = inputs.detach().clone().requires_grad_(inputs.is_floating_point())
            output, captured = plan.chain.run(chain, x)
            return _Pass(key, plan, None, captured, output, x, num_datapoints, dtype)
        try:
            replayer, output, x = replay_model(model, inputs, forward, plan.fingerprints, plan.wanted,
                                               plan.guards, plan.fold_time, scan.parameters, scan.modules)
        except PlanMismatch:
            pass  # the forward took another path this time: trace it again
        else:
            return _Pass(key, plan, None, replayer.captured, output, x, num_datapoints, dtype)
    if chain is not None:
        _check_chain_inputs(chain, inputs)
    _check_no_reparametrisation(model)
    _check_not_scripted(model)
    _check_registered_elementwise(model, scan)
    trace = trace_model(model, inputs, forward, datapoint_dim, datapoints, fold_time)
    if not trace.params:
        raise GradGraphError(f"{type(model).__name__}: the forward used no parameter of the model")
    return _Pass(key, None, trace, trace.captured, trace.output, trace.inputs, num_datapoints, dtype, chain)


def _check_no_reparametrisation(model: nn.Module) -> None:
    """Refuse a weight computed from other parameters (``torch.nn.utils.parametrizations``'
    ``weight_norm`` / ``spectral_norm``, or the older hook-based ``torch.nn.utils.weight_norm`` /
    ``spectral_norm``), with the remedy. The graph's edges hold a layer's effective weight; the
    gradient the user owns is that of ``g`` and ``v`` (or of the unnormalised weight), which is not
    a rank-1 term of the graph. Checked before a trace only (a refused model never has a plan)."""
    from torch.nn.utils import parametrize, prune

    for path, module in model.named_modules():
        pruned = [hook._tensor_name for hook in module._forward_pre_hooks.values()
                  if isinstance(hook, prune.BasePruningMethod)]
        if pruned:
            raise UnsupportedModuleError(
                path, type(module).__name__,
                f"its {', '.join(pruned)} is pruned (torch.nn.utils.prune: {pruned[0]} = {pruned[0]}_orig * "
                f"{pruned[0]}_mask, computed from the parameter you own), so the gradient of {pruned[0]}_orig is the "
                "graph's edge gradient times the mask, not a rank-1 term of the graph. Convert the model with the "
                f"pruning made permanent (torch.nn.utils.prune.remove(module, '{pruned[0]}'): {pruned[0]} becomes a "
                f"plain parameter holding the pruned values); the per-sample gradients of {pruned[0]}_orig are those "
                f"of {pruned[0]} times the mask (keep module.{pruned[0]}_mask before removing it)")
        names = []
        if parametrize.is_parametrized(module):
            names = [f"{name} ({', '.join(type(p).__name__.lstrip('_') for p in module.parametrizations[name])})"
                     for name in module.parametrizations]
        for hook in module._forward_pre_hooks.values():
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm") and hasattr(hook, "name"):
                names.append(f"{hook.name} ({type(hook).__name__}, hook-based)")
        if names:
            raise UnsupportedModuleError(
                path, type(module).__name__,
                f"its {', '.join(names)} is computed from other parameters, so the gradient of the parameters you "
                "own (weight_norm's g and v, spectral_norm's unnormalised weight) is not a rank-1 term of the graph. "
                "Convert a copy whose weights are the effective ones: m = copy.deepcopy(model); "
                "torch.nn.utils.parametrize.remove_parametrizations(module_of_m, 'weight') (or "
                "torch.nn.utils.remove_weight_norm / remove_spectral_norm for the hook-based versions)")


def _check_registered_elementwise(model: nn.Module, scan: _Scan) -> None:
    """Refuse a module registered with :func:`~gradgraph.convert.register_elementwise` that has trainable
    parameters, by its path: it runs as one elementwise op without parameters (its forward is not traced),
    so their gradients would be missing. The fill's check caught them, advising to register the module
    that already was. Checked before a trace only; ``scan`` holds which parameters were trainable before
    the pass made the frozen ones require grad."""
    if not ELEMENTWISE_MODULES:
        return
    registered = tuple(ELEMENTWISE_MODULES)
    trainable = {name for name, _, _, _, requires_grad in scan.signature if requires_grad}
    for path, module in model.named_modules():
        if isinstance(module, registered):
            owned = [name for name in (f"{path}.{local}" if path else local for local, _ in module.named_parameters())
                     if name in trainable]
            if owned:
                raise UnsupportedModuleError(
                    path, type(module).__name__,
                    f"it is registered with gradgraph.convert.register_elementwise, so it runs as one elementwise op "
                    f"without parameters, but it has trainable parameters {owned}, whose gradients gradgraph would "
                    "not write. Freeze them (requires_grad_(False)) to convert with them fixed, write its forward "
                    "with ops gradgraph follows and do not register it (a learned per-neuron scale or bias converts), "
                    "or register a converter for the model (gradgraph.register_converter)")


def _check_no_autocast(caller: str) -> None:
    """Refuse a conversion under ``torch.autocast``: the forward would compute in float16 / bfloat16,
    whose rounding the summed-gradient check cannot tell from a missing gradient path (it refused
    with a misleading "an op whose rule reads it as a constant"), and the factors would carry it."""
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            raise GradGraphError(
                f"{caller} was called under torch.autocast('{device}', dtype={dtype}): the forward would compute "
                f"in {dtype}, whose rounding (eps {torch.finfo(dtype).eps:.1e}) the factors would carry and "
                "gradgraph's check of the summed gradient cannot tell from a missing gradient path. Convert outside "
                f"autocast: wrap the call in torch.autocast('{device}', enabled=False) (the graph is then the "
                "full-precision model's)")


def _check_not_scripted(model: nn.Module) -> None:
    """Refuse a TorchScript module (``torch.jit.script`` / ``torch.jit.trace``), the model or a part of it,
    by name: its forward runs in the TorchScript interpreter, whose ops no ``TorchFunctionMode`` sees, so
    the trace would find its parameters used by no op it followed. Checked before a trace only."""
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            raise UnsupportedModuleError(
                path, type(module).__name__,
                "it is a TorchScript module (torch.jit.script / torch.jit.trace), whose forward runs in the "
                "TorchScript interpreter, where gradgraph cannot follow its ops. Convert the Python module it was "
                "made from "
                "(the per-sample gradients are the same; keep a reference to it before scripting)")


def _check_chain_inputs(chain: list[tuple[str, nn.Module]], inputs: Tensor) -> None:
    """A chain that starts with a ``Linear`` (after activations or dropout, not a ``Flatten``)
    reads features on the last axis: say which shape it needs, not where torch failed."""
    for name, module in chain:
        if isinstance(module, nn.Flatten):
            return
        if isinstance(module, nn.Linear):
            if inputs.dim() < 2 or inputs.shape[-1] != module.in_features:
                raise GradGraphError(f"inputs must have shape [b, {module.in_features}] (or [b, ..., "
                                     f"{module.in_features}]) for '{name}' ({module}), got {list(inputs.shape)}")
            return


def _finish(run: _Pass, objective: Tensor, scan: _Scan) -> GradGraph:
    """The graph of a forward pass, given the per-datapoint objective ``[b]`` computed from it."""
    plan = run.plan
    if plan is None:
        plan = make_plan(run.trace)
        # a chain capture checks no op's arguments: only for plans no constant's values shaped
        plan.chain = None if plan.guards else chain_capture(run.chain, run.trace.module_outputs, plan.sources,
                                                            plan.wanted)
    device = run.x.device if run.trace is None else run.trace.params[0].device
    # a fresh trace is checked once against autograd (a replay runs the same ops on the same plan)
    # (autograd's summed gradient, read off the conversion's one backward pass)
    checked = _checked_parameters(plan, objective, scan.parameters) if run.plan is None else ()
    # a forward that computes part of itself in a coarser dtype (Llama's and Gemma's RMSNorm in float32
    # whatever the model's dtype) rounds at that dtype's precision: the check of the sums allows for it
    coarsest = _coarsest_dtype(run.captured) if run.plan is None else None
    try:
        act, grad, truth = fill_factors(plan, run.x, run.captured, objective, scan.parameters, run.num_datapoints,
                                        run.dtype, device, sums_of=checked)
    except RuntimeError as error:
        if "use_reentrant=True" not in str(error):
            raise
        raise GradGraphError(
            "to_graph: the forward uses torch.utils.checkpoint(..., use_reentrant=True), whose recomputed activations "
            "torch.autograd.grad cannot reach; gradgraph differentiates the recorded values so. Use "
            "use_reentrant=False (exact), or turn checkpointing off for the conversion "
            "(model.gradient_checkpointing_disable() in transformers)"
        ) from error
    # the recorded activations are no longer needed: freeing them before the O(P) edge values
    # are allocated lowers the conversion's peak memory (the dict is their only holder)
    run.captured.clear()
    run.trace = None  # after a trace: the tensors its records and sets kept
    graph = assemble(plan, scan.parameters, act, grad, run.num_datapoints)
    if run.plan is None:
        _check_sums(graph, truth, run.num_datapoints, coarsest)
        PLAN_CACHE.put(run.key, plan)
    # the per-datapoint losses (output mode: outputs) the factors are the gradients of: [b]
    graph.loss = objective.detach()
    return graph


def _checked_parameters(plan: TracePlan, objective: Tensor, parameters: dict[str, Tensor]) -> list[str]:
    """The parameters of the plan whose summed gradient ``d(sum_i L_i)/dθ`` a fresh trace checks
    against autograd (those that require grad; none if the objective has no autograd graph)."""
    if objective.grad_fn is None:
        return []
    return [name for name in dict.fromkeys(plan.param_names) if parameters[name].requires_grad]


#: the graph's summed gradient and autograd's differ by rounding only; this many eps of the dtype
#: relative to the larger magnitude of the two (float64: 2e-12, float32: 1e-3), or, where that is
#: exceeded, of the sum of the terms' magnitudes (:func:`_magnitudes`)
_SUM_EPS_FACTOR = 1e4


def _magnitudes(graph: GradGraph) -> dict[str, Tensor]:
    """Per parameter entry, the mean over components of ``|act[src]| * |grad[dst]|``: the size of
    the terms whose sum is its gradient, which bounds that sum's rounding error. A gradient that
    cancels to about zero (a GroupNorm scale before a pooling that makes ``grad`` constant over the
    positions it normalised) is rounding noise of that size, not of its own."""
    magnitude = copy.copy(graph)  # the same structure (and its cached blocks), other factors
    magnitude.act, magnitude.grad = graph.act.abs(), graph.grad.abs()
    return magnitude.mean_grad()


def _coarsest_dtype(captured: dict) -> torch.dtype | None:
    """The floating dtype of least precision among the outputs of the ops the trace followed."""
    coarsest = None
    for _, _, output in captured.values():
        for value in (output,) if isinstance(output, Tensor) else output if isinstance(output, tuple | list) else ():
            if isinstance(value, Tensor) and value.is_floating_point() and (
                    coarsest is None or torch.finfo(value.dtype).eps > torch.finfo(coarsest).eps):
                coarsest = value.dtype
    return coarsest


def _check_sums(graph: GradGraph, truth: dict[str, Tensor], num_datapoints: int,
                coarsest: torch.dtype | None = None) -> None:
    """Refuse a fresh trace whose graph's gradient of some parameter, summed over datapoints,
    is not autograd's: a path from the parameter to the loss that no rule followed (a value computed
    from a parameter that an op's rule reads as a constant) would otherwise make every per-sample
    gradient of it silently wrong. Cost: ``mean_grad()``, on a fresh trace only (autograd's side,
    ``truth``, is read off the conversion's own backward pass: :func:`fill_factors`' ``sums_of``).
    Rounding is bounded at the precision of ``coarsest`` (at most float32's) where the forward
    computed in a coarser dtype than the graph's (a missing path is an error of the gradient's own
    size, not of ``eps``)."""
    if not truth:
        return
    # autograd's gradient of an nn.Embedding(sparse=True) table is a sparse tensor
    truth = {name: value.to_dense() if value.is_sparse else value for name, value in truth.items()}
    ours = graph.mean_grad()
    # a gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise on
    # both sides: the scale is the parameter's own or, if larger, a hundredth of the largest one
    overall = max(float(value.abs().max()) for value in truth.values() if value.numel()) if truth else 0.0
    magnitudes: dict[str, Tensor] | None = None
    for name, expected in truth.items():
        got = ours[name] * num_datapoints
        expected = expected.to(got.dtype)
        error = float((got - expected).abs().max()) if got.numel() else 0.0
        scale = max(float(expected.abs().max()), float(got.abs().max()), 1e-2 * overall) if got.numel() else 0.0
        # (never looser than float32's: at half precision rounding and a missing path look alike, so
        # a float16 / bfloat16 op inside a float32 model is checked as float32 and may be refused)
        inner = min(torch.finfo(coarsest).eps, torch.finfo(torch.float32).eps) if coarsest is not None else 0.0
        eps = max(torch.finfo(got.dtype).eps, inner)
        if error > _SUM_EPS_FACTOR * eps * scale:
            if magnitudes is None:  # worked out only when the cheap bound is exceeded
                magnitudes = _magnitudes(graph)
            bound = _SUM_EPS_FACTOR * eps * (magnitudes[name] * num_datapoints + expected.abs())
            if bool(((got - expected).abs() <= bound).all()):
                continue  # rounding of a sum of large terms that cancel
            path = name.rsplit(".", 1)[0] if "." in name else ""
            raise UnsupportedOperationError(
                path, "parameter use", "in the forward",
                f"the graph's gradient of '{name}' (summed over datapoints) differs from autograd's by {error:.2e} "
                f"(largest entry {scale:.2e}): a value computed from this parameter reaches the loss through an op "
                "whose gradgraph rule reads it as a constant, so the graph would be silently wrong. Write that part "
                "with supported ops or register a converter for the module (gradgraph.register_converter)")


def default_datapoint_dim(model: nn.Module) -> int:
    """1 for a model whose self-attention modules are all sequence-first (``[T, b, d]``), else 0."""
    return _default_datapoint_dim(list(model.modules()))


def _default_datapoint_dim(modules: list[nn.Module]) -> int:
    attentions = [module for module in modules if isinstance(module, nn.MultiheadAttention)]
    return 1 if attentions and not any(module.batch_first for module in attentions) else 0


def _objective(output: Any, targets: Any, loss_fn: LossFn | None, num_datapoints: int) -> Tensor:
    if loss_fn is None and not isinstance(output, Tensor):
        raise GradGraphError(f"output mode (loss_fn=None) needs a tensor output; the model returned "
                             f"{type(output).__name__}. Pass a loss_fn that reads it")
    return per_datapoint_objective(output, targets, loss_fn, num_datapoints)
