"""Plain ``nn.Sequential`` chains: a cheaper way to record a cached plan's tensors.

A chain is converted like any model: the first call traces it and caches a
:class:`~gradgraph.convert.plan.TracePlan`, whose layout, labels and group are the graph's.
A later call of the same architecture must only record, for every tensor the plan reads, its
value in this forward (and then differentiate the loss with respect to them); the plan then
fills and assembles the graph. The general replay does that at the dispatch level, checking
every op against the trace's fingerprints (:func:`gradgraph.convert.trace.replay_model`).

For a *plain chain* there is nothing to check: its forward is ``for module in self: x =
module(x)`` over leaf modules with stock forwards, so the ops it performs are fixed by the
leaves' types and settings. When the trace showed that every tensor the plan reads is the
output of one leaf (or the input), :class:`ChainCapture` records them by calling the leaves in
order itself and keeping those outputs: no ``TorchFunctionMode``, no per-op fingerprints, no
hooks. It is a *capture strategy* of the plan, not a second converter: the graph comes from the
same plan, tensor for tensor (``tests/convert/test_convert_chain.py``).

Refused (the general replay runs) unless the plan was traced on this chain and every leaf still
has the type and settings it had then; anything that is not a plain chain (a ``Linear`` used
twice, a functional op between layers, a custom ``forward``, a hook) never gets a strategy.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from gradgraph.convert.activations import ACTIVATION_MODULES

__all__ = ["ACTIVATION_MODULES", "CHAIN_LEAVES", "ChainCapture", "chain_capture", "plain_chain"]

#: Leaf types of a plain chain: each stock forward is one op (or none) on the chain's tensor,
#: so what a chain computes follows from its leaves' types and settings.
CHAIN_LEAVES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Dropout, nn.Flatten, *ACTIVATION_MODULES)

_SETTING_TYPES = (bool, int, float, str, type(None))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def plain_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(path, module)`` of every leaf a plain (nested) ``nn.Sequential`` applies, in order.

    ``None`` unless every container is an ``nn.Sequential`` with ``Sequential.forward``, every
    leaf's type is one of :data:`CHAIN_LEAVES` exactly and none runs in place (``nn.ReLU(inplace=True)``
    would change the output of the leaf before it, which the capture keeps), no module appears
    twice, and no module has a hook or a ``forward`` set on the instance: then ``model(x)`` computes
    ``leaf_n(... leaf_1(x))`` and nothing else. A walk over the modules (microseconds).
    """
    chain: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> bool:
        if isinstance(module, torch.jit.ScriptModule):  # TorchScript: no Python forward to call (refused later)
            return False
        if type(module).forward is not nn.Sequential.forward or "forward" in vars(module) or _has_hooks(module):
            return False
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                return False
            seen.add(id(child))
            if isinstance(child, nn.Sequential):
                if not walk(child, f"{prefix}{name}."):
                    return False
            elif type(child) in CHAIN_LEAVES and "forward" not in vars(child) and not _has_hooks(child) \
                    and not getattr(child, "inplace", False):  # (in place, it would change a recorded output)
                chain.append((f"{prefix}{name}", child))
            else:
                return False
        return True

    return chain if walk(model, "") and chain else None


@dataclass(frozen=True)
class _Settings:
    """A leaf's type and its public scalar settings (``training``, ``p``, ``start_dim`` …)."""

    type: type
    read: Callable[[dict], Any]  # vars(module) -> the settings' values
    values: Any

    @classmethod
    def of(cls, module: nn.Module) -> "_Settings":
        keys = [key for key, value in vars(module).items() if key[0] != "_" and isinstance(value, _SETTING_TYPES)]
        read = operator.itemgetter(*keys) if keys else (lambda attributes: ())
        return cls(type(module), read, read(vars(module)))

    def match(self, module: nn.Module) -> bool:
        try:
            return type(module) is self.type and self.read(vars(module)) == self.values
        except KeyError:  # a setting was deleted
            return False


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
                or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks)


@dataclass(frozen=True)
class ChainCapture:
    """Records a plain chain's tensors for a cached plan by calling its leaves in order.

    Attributes:
        paths: module path of every leaf, in call order.
        settings: every leaf's type and scalar settings when the plan was traced.
        ops: per leaf, the op of the trace whose output the leaf's output is, if the plan
            reads it, else -1 (the plan's records name tensors by that op).
    """

    paths: tuple[str, ...]
    settings: tuple[_Settings, ...]
    ops: tuple[int, ...]

    def applies(self, chain: list[tuple[str, nn.Module]] | None) -> bool:
        """Whether ``chain`` (this call's :func:`plain_chain`) is the chain the plan was traced on."""
        if chain is None or len(chain) != len(self.paths) or _global_hooks():
            return False
        return all(path == expected and settings.match(module)
                   for (path, module), expected, settings in zip(chain, self.paths, self.settings))

    def run(self, chain: list[tuple[str, nn.Module]], x: Tensor) -> tuple[Tensor, dict[int, tuple[tuple, dict, Any]]]:
        """``(output, captured)``: the chain's forward on ``x`` and the outputs the plan reads,
        as ``{op: ((), {}, tensor)}`` (the form the trace and the replay capture in). Run it
        with grad enabled."""
        captured: dict[int, tuple[tuple, dict, Any]] = {}
        for (_, module), op in zip(chain, self.ops):
            x = module(x)
            if op >= 0:
                captured[op] = ((), {}, x)
        return x, captured


def chain_capture(chain: list[tuple[str, nn.Module]] | None, module_outputs: Sequence[tuple[str, Any]],
                  sources: Sequence[tuple], wanted: set[int]) -> ChainCapture | None:
    """The :class:`ChainCapture` of a plan just traced, or ``None`` where it would be wrong.

    Args:
        chain: :func:`plain_chain` of the traced model (``None``: not a plain chain).
        module_outputs: ``(path, source)`` per module call of the trace, in the order the calls
            returned; ``source`` is ``(op, position)`` of the op whose output the module
            returned (see :func:`gradgraph.convert.trace.trace_model`).
        sources: the sources of every tensor the plan reads (``("input",)``, ``("out", op,
            position)``, ``("derived", op, recipe)``), and one ``("onehot", op)`` per one-hot record.
        wanted: the ops the plan reads.

    Refused when the model is no plain chain, when the trace did not call each leaf once in
    order, or when the plan reads anything but the input and whole leaf outputs (a norm's
    normalised input, an embedding's indices, a piece of a leaf's output).
    """
    if chain is None:
        return None
    paths = tuple(path for path, _ in chain)
    leaf_paths = set(paths)
    leaf_calls = [(path, source) for path, source in module_outputs if path in leaf_paths]
    if tuple(path for path, _ in leaf_calls) != paths:
        return None
    if any(source[0] not in ("input", "out") or (source[0] == "out" and source[2] != 0) for source in sources):
        return None
    op_of_leaf = [source[0] if isinstance(source, tuple) and len(source) == 2 and source[1] == 0 else -1
                  for _, source in leaf_calls]
    ops, taken = [], set()
    for op in op_of_leaf:  # the first leaf that returned a wanted tensor records it
        ops.append(op if op in wanted and op not in taken else -1)
        taken.add(op)
    if not wanted <= taken:
        return None
    return ChainCapture(paths, tuple(_Settings.of(module) for _, module in chain), tuple(ops))
