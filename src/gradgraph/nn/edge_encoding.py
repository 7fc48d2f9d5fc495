"""`EdgeKindEncoding`: what an edge is (an MLP weight, a query weight, a residual link...)."""

from __future__ import annotations

from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph.graph import NUM_EDGE_KINDS
from gradgraph.nn.context import STRUCTURE_MEMO

__all__ = ["EdgeKindEncoding"]


class EdgeKindEncoding(nn.Module):
    r"""A learned embedding of every edge's :class:`~gradgraph.EdgeKind`.

    .. math::
        q_e = E_{\text{kind}}[k_e]

    GradGraphs keep the kind as the integer ``edge_kind`` rather than as one-hot columns of
    ``edge_attr`` (one value per weight is the graph's whole per-weight cost); adding
    :math:`q_e` to a linear map of ``edge_attr`` is the same function as a linear map of
    ``[edge_attr, one-hot(k_e)]``. The kind is the same for all edges that a hidden-neuron
    permutation exchanges, so the encoding is permutation-equivariant.

    Args:
        channels: embedding width ``C``.

    Shapes:
        - **input:** a GradGraph or Batch with ``edge_kind`` ``[E]``
        - **output:** ``[E, C]``
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.kind = nn.Embedding(NUM_EDGE_KINDS, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the table (small normal init, as :class:`PositionalEncoding`)."""
        nn.init.normal_(self.kind.weight, std=0.1)

    def forward(self, graph) -> Tensor:
        kind = graph.edge_kind
        # A graph of fixed structure (STRUCTURE_MEMO) is checked once: no device read-back per call.
        memo = graph.__dict__.get(STRUCTURE_MEMO)
        if memo is None or memo.get("edge_kind_checked") is not kind:
            if kind.numel() and (int(kind.min()) < 0 or int(kind.max()) >= NUM_EDGE_KINDS):
                raise GradGraphError(
                    f"EdgeKindEncoding: edge_kind must lie in [0, {NUM_EDGE_KINDS}) (gradgraph.EdgeKind), "
                    f"got values in [{int(kind.min())}, {int(kind.max())}]"
                )
            if memo is not None:
                memo["edge_kind_checked"] = kind
        return self.kind(kind)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        load_kind_table(self.kind, state_dict, prefix + "kind.weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, kinds={NUM_EDGE_KINDS})"


def load_kind_table(table: nn.Embedding, state_dict: dict, key: str) -> None:
    """Let a checkpoint with fewer kinds load: gradgraph only ever *appends* kinds
    (:class:`~gradgraph.NodeKind`, :class:`~gradgraph.EdgeKind`), so the saved rows are the
    first rows of the current table; rows of kinds added since keep their initial values."""
    saved = state_dict.get(key)
    if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[1] == table.weight.shape[1] \
            and saved.shape[0] < table.weight.shape[0]:
        padded = table.weight.detach().clone()
        padded[: saved.shape[0]] = saved
        state_dict[key] = padded
