"""Exceptions raised by gradgraph.

Every error names what was wrong and where: the module path inside the model, the
tensor and its shape. They subclass the built-in exception a user would already catch
(``TypeError`` for unsupported structure, ``ValueError`` for bad values).
"""

from __future__ import annotations

__all__ = ["GradGraphError", "UnsupportedModuleError", "NonFiniteFactorError", "DatapointCouplingError"]


class GradGraphError(ValueError):
    """Bad input to a gradgraph function: a wrong shape, dtype, or inconsistent graph."""


class UnsupportedModuleError(TypeError):
    """A model contains a module (or operation) that no registered converter handles.

    Attributes:
        path: dotted module path inside the model (``""`` for the root module).
        module_type: the offending type's name.
    """

    def __init__(self, path: str, module_type: str, reason: str = "") -> None:
        self.path = path
        self.module_type = module_type
        where = f"'{path}'" if path else "the root module"
        message = f"unsupported module at {where} of type {module_type}"
        if reason:
            message += f": {reason}"
        super().__init__(message)


class NonFiniteFactorError(GradGraphError):
    """A captured activation or backpropagated signal contains NaN or Inf."""


class DatapointCouplingError(GradGraphError):
    """The loss of one datapoint depends on another datapoint (a loss over the batch, or a forward
    that mixes the batch after its last traced op): per-sample gradients would be wrong."""
