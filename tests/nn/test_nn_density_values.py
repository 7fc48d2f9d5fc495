""":class:`ComponentDensity`'s and :class:`ComponentReadout`'s configuration, initial
bandwidths, shape checks (messages in full) and the fixed-neuron mean of a graph with one
fixed neuron.

Written for the mutation run of the ``nn-density`` group (``./gg mutate nn-density``, see
docs/mutation.md); each docstring names what it was checked to kill, with
``MUTANT_UNDER_TEST=NAME`` in ``.mutation/nn-density/mutants/``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.nn import ComponentDensity, ComponentReadout


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_density_defaults_and_a_given_bandwidth():
    """Defaults: 4 heads of 2 channels (``out_channels`` 16); a given ``bandwidth`` (here 0.5,
    below 1) is every head's initial bandwidth, also after ``reset_parameters``.

    Checked to kill ``ComponentDensity.__init__`` 1, 2 (other defaults), 13 (``bandwidth > 1``
    required), 18 (the given bandwidth forgotten) and ``reset_parameters`` 24, 25 (the fill
    not of its log)."""
    default = ComponentDensity(3)
    assert (default.heads, default.head_channels, default.out_channels) == (4, 2, 16)
    assert default.embed.out_channels == 8 and default.log_bandwidth.shape == (4,)
    density = ComponentDensity(3, heads=3, bandwidth=0.5)
    torch.testing.assert_close(density.log_bandwidth.detach(), torch.full((3,), math.log(0.5)), atol=1e-7, rtol=0)
    with torch.no_grad():
        density.log_bandwidth.add_(1.0)
    density.reset_parameters()
    torch.testing.assert_close(density.log_bandwidth.detach(), torch.full((3,), math.log(0.5)), atol=1e-7, rtol=0)


@pytest.mark.parametrize(("heads", "bandwidths"), [(1, [0.3]), (2, [0.1, 0.8]), (3, [0.1, 0.8**0.5 * 0.1**0.5, 0.8])])
def test_density_spreads_its_initial_bandwidths_from_0_1_to_0_8(heads, bandwidths):
    """One head starts at 0.3; several are spread geometrically from 0.1 to 0.8.

    Checked to kill ``ComponentDensity.reset_parameters`` 4, 15, 16 (the one-head case taken
    for every head count, or for two heads)."""
    density = ComponentDensity(3, heads=heads)
    torch.testing.assert_close(density.log_bandwidth.detach().exp(), torch.tensor(bandwidths), atol=1e-6, rtol=0)


def test_density_shape_errors_in_full():
    """A wrong input width is refused for every width (also 1), naming the width; a lazy
    density (``in_channels=-1``) names it ``F``.

    Checked to kill ``ComponentDensity.forward`` 6 and 14 (``in_channels > 1``), 12, 15, 16
    (the lazy width printed as ``-1`` or misspelt)."""
    with pytest.raises(GradGraphError, match=full("ComponentDensity: expected u [G, B, 1], got [2, 3, 3]")):
        ComponentDensity(1)(torch.randn(2, 3, 3))
    with pytest.raises(GradGraphError, match=full("ComponentDensity: expected u [G, B, F], got [3, 4]")):
        ComponentDensity(-1)(torch.randn(3, 4))
    assert ComponentDensity(-1)(torch.randn(2, 3, 5)).shape == (2, 3, 16)


@pytest.mark.parametrize("in_channels", [0, -2])
def test_density_refuses_a_width_that_is_neither_positive_nor_inferred(in_channels):
    """``in_channels=0`` read zero features (a density of nothing) and failed later inside its
    ``Linear``; it is refused where it is given, as is any negative width but ``-1``. With it,
    ``ComponentDensity.forward`` 5 and 13 (``in_channels >= 0``, which differed only for a width
    of 0) are equivalent."""
    message = f"ComponentDensity: in_channels must be >= 1 (or -1: inferred), got {in_channels}"
    with pytest.raises(GradGraphError, match=full(message)):
        ComponentDensity(in_channels)


def readout_inputs(nodes=3, graphs=2, components=4, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(graphs * nodes, components, channels, generator=generator, dtype=torch.float64)
    batch = torch.arange(graphs).repeat_interleave(nodes)
    return z, batch


def test_component_readout_refuses_each_bad_shape_alone_in_full():
    """Each wrong shape alone — ``z`` not 3-D, ``z``'s width, ``batch``, ``fixed`` — is refused
    with the one message naming all three shapes.

    Checked to kill ``ComponentReadout.forward`` 1, 2, 3 (an ``or`` of the check made ``and``)
    and 13-16 (the message dropped or a shape in it replaced)."""
    readout = ComponentReadout(3, 2).double()
    z, batch = readout_inputs()
    fixed = torch.zeros(6, dtype=torch.bool)
    cases = [
        (z[:, 0], batch, fixed, "[6, 3], [6] and [6]"),
        (z[..., :2], batch, fixed, "[6, 4, 2], [6] and [6]"),
        (z, batch[:5], fixed, "[6, 4, 3], [5] and [6]"),
        (z, batch, fixed[:5], "[6, 4, 3], [6] and [5]"),
    ]
    for bad_z, bad_batch, bad_fixed, shapes in cases:
        message = f"ComponentReadout: expected z [N, B, 3], batch [N] and fixed [N]; got {shapes}"
        with pytest.raises(GradGraphError, match=full(message)):
            readout(bad_z, bad_batch, 2, bad_fixed)


@pytest.mark.parametrize("nodes_per_graph", [3, None])
def test_component_readout_fixed_mean_of_one_fixed_neuron_is_that_neuron(nodes_per_graph):
    """In a graph with exactly one fixed neuron, the fixed-neuron mean is that neuron's state
    (and zeros in a graph with none), on the fast path of equal graphs — by hand.

    Checked to kill ``ComponentReadout.forward`` 60 (the count clamped to at least 2)."""
    readout = ComponentReadout(3, 2).double()
    z, batch = readout_inputs()
    fixed = torch.tensor([False, True, False, False, False, False])
    blocks = z.view(2, 3, 4, 3)
    pooled = torch.cat([blocks.mean(1), blocks.amax(1), torch.stack([z[1], torch.zeros_like(z[1])])], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(readout(z, batch, 2, fixed, nodes_per_graph), readout.mlp(pooled),
                                   atol=1e-12, rtol=1e-12)


def test_component_readout_reset_and_repr_with_and_without_a_density():
    """``reset_parameters`` resets the density's bandwidths too and works without a density;
    ``repr`` names the density heads only when there is a density.

    Checked to kill ``ComponentReadout.reset_parameters`` 1 and ``__repr__`` 3, 5."""
    plain = ComponentReadout(3, 2)
    plain.reset_parameters()
    assert repr(plain) == "ComponentReadout(3, 2)"
    with_density = ComponentReadout(3, 2, density_heads=2)
    assert repr(with_density) == "ComponentReadout(3, 2, density_heads=2)"
    initial = with_density.density.log_bandwidth.detach().clone()
    with torch.no_grad():
        with_density.density.log_bandwidth.add_(1.0)
    with_density.reset_parameters()
    torch.testing.assert_close(with_density.density.log_bandwidth.detach(), initial, atol=0, rtol=0)


@pytest.mark.parametrize(("heads", "head_channels"), [(1, 2), (3, 4)])
def test_component_readout_builds_the_density_it_is_asked_for(heads, head_channels):
    """``density_heads`` heads of ``density_head_channels`` channels on the ``3 C`` pooled
    states, already for one head; the MLP reads ``3 C + H (d + 2)`` columns.

    Checked to kill ``ComponentReadout.__init__`` 12, 13 (an argument of the density dropped)
    and 17 (``density_heads > 1``)."""
    readout = ComponentReadout(3, 2, density_heads=heads, density_head_channels=head_channels)
    density = readout.density
    assert (density.in_channels, density.heads, density.head_channels) == (9, heads, head_channels)
    assert readout.mlp.channel_list[0] == 9 + heads * (head_channels + 2)


def test_component_readout_scatter_path_gives_num_graphs_rows():
    """On the scatter path (graphs of unequal sizes) the output has ``num_graphs`` rows even
    where the last graph has no fixed neuron (its fixed mean is zeros) or no node at all (a
    graph count the caller gives: its pools are zeros), by hand.

    Checked to kill ``ComponentReadout.forward`` 71, 76, 85, 90, 99, 104 (``dim_size`` dropped
    from a scatter: the row count then comes from the largest index present)."""
    readout = ComponentReadout(3, 2).double()
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 1, 1])
    fixed = torch.tensor([True, False, True, False, False])
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    rows = [
        torch.cat([z[:3].mean(0), z[:3].amax(0), z[[0, 2]].mean(0)], dim=-1),
        torch.cat([z[3:].mean(0), z[3:].amax(0), zeros], dim=-1),
        torch.cat([zeros, zeros, zeros], dim=-1),
    ]
    with torch.no_grad():
        got = readout(z, batch, 3, fixed)
        torch.testing.assert_close(got, readout.mlp(torch.stack(rows)), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(readout(z, batch, 2, fixed), got[:2], atol=1e-12, rtol=1e-12)
