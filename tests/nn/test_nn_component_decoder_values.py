""":class:`ComponentProductDecoder`'s construction, checks (messages in full) and reset.

Written for the mutation run of the ``nn-decoder`` group (``./gg mutate nn-decoder``, see
docs/mutation.md); each docstring names what it was checked to kill, with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/nn-decoder/mutants/``. (Its values are checked
against a per-edge loop in ``tests/nn/test_nn_plusplus.py``.)
"""

from __future__ import annotations

import re

import pytest
import torch

import gradgraph
from gradgraph.nn import ComponentProductDecoder, GraphContext


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize("position, bad", [(0, 0), (1, 0), (2, 0), (3, 0), (4, -1), (4, 0)])
def test_each_count_below_one_is_refused(position, bad):
    """``component_channels, edge_dim, out_channels, product_channels`` each 0, or
    ``chunk_edges`` -1 or 0, alone is refused with the one message in full (``chunk_edges=0`` was
    accepted as the default before, through ``chunk_edges or 1``, although the message says >= 1).

    Checked to kill ``ComponentProductDecoder.__init__`` 11-15 (a count left out of the
    check) and 20-23 (the message)."""
    values = [2, 2, 2, 2, 3]
    values[position] = bad
    with pytest.raises(gradgraph.GradGraphError,
                       match=full("ComponentProductDecoder: channel counts and chunk_edges must be >= 1")):
        ComponentProductDecoder(*values[:4], chunk_edges=values[4])


def test_built_as_documented():
    """Default ``product_channels`` 16; the source and destination maps ``[A | U]``, ``[B | V]``
    are bias-free; ``chunk_edges`` is kept; ``repr`` names every setting.

    Checked to kill ``ComponentProductDecoder.__init__`` 1, 26, 29, 36, 39, 46, 49."""
    decoder = ComponentProductDecoder(3, 2, 4, chunk_edges=7)
    assert decoder.product_channels == 16 and decoder.chunk_edges == 7
    for layer in (decoder.edge_source, decoder.edge_target):
        assert (layer.in_channels, layer.out_channels, layer.bias) == (3, 32, None)
    assert repr(decoder) == "ComponentProductDecoder(3, edge_dim=2, out=4, product_channels=16, reduce='mean')"


def test_reset_parameters_redraws_every_layer():
    """``reset_parameters`` re-initialises every child layer.

    Checked to kill ``ComponentProductDecoder.reset_parameters`` 1, 5, 6."""
    decoder = ComponentProductDecoder(3, 2, 4)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.fill_(7.0)
    decoder.reset_parameters()
    for name, parameter in decoder.named_parameters():
        assert not torch.all(parameter == 7.0), name


def test_shape_errors_in_full():
    """Component states that are not 3-D (with the right node count), and edge features of
    another width, are refused in full.

    Checked to kill ``ComponentProductDecoder.forward`` 2 (an ``or`` made ``and``), 14, 16 (the
    edge-feature message)."""
    edge_index = torch.tensor([[0, 1], [2, 2]])
    context = GraphContext(edge_index, torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 1,
                           torch.tensor([0, 0, 1]), 2)
    decoder = ComponentProductDecoder(4, 2, 1)
    with pytest.raises(gradgraph.GradGraphError, match=full(
            "ComponentProductDecoder: component states must have shape [3, B, 4]; got [3, 4]")):
        decoder(torch.zeros(3, 4), context)
    with pytest.raises(gradgraph.GradGraphError, match=full(
            "ComponentProductDecoder: edge features have 3 channels, the decoder was built for edge_dim=2")):
        decoder(torch.zeros(3, 5, 4), context)
