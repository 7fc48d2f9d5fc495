"""Per-function checks of ``convert/trace/rules_shape.py`` and ``convert/trace/tracer.py``'s dispatch for what
session 19 changed (issue 31, group ``convert-tracer``, runs tracer 6 on): a ``cat`` that repeats neurons
(``copy_repeated_parts`` / ``join_copies``), the version merge (``joined_versions``), a ``cat`` with a constant
that is a pad (``join_as_pad``) and a constant ``F.pad`` of the features, dispatched to ``rules_pad.py``.

Each test is float64 against torch.func (``tests/traced_models.py``'s helpers, at 1e-10) or checks a refusal's
message in full, and names in its docstring the mutants it kills (``f N``: mutant ``N`` of function ``f``,
checked with ``MUTANT_UNDER_TEST``). The first two reach, cheaply, the dispatch and ``shape_op`` lines that only
``test_convert_feature_pad.py`` (19 s) reached in the group (coverage.py per test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from convert_values import assert_crelu_copy_factors, exact, refused, squared
from traced_models import assert_group_keeps_function

DTYPE = torch.float64


class PaddedFeatures(nn.Module):
    """``F.pad`` of a hidden layer's features with a constant, then a Linear: the pad rule of ``rules_pad.py``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(F.pad(torch.tanh(self.a(x)), (1, 2), value=0.5))


class JoinedWithZeros(nn.Module):
    """``cat([h, zeros])`` along the features: ``shape_op`` hands it to ``join_as_pad``, a constant pad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.cat([h, h.new_zeros(h.shape[0], 2)], 1))


def test_a_constant_pad_of_the_features_is_exact():
    torch.manual_seed(0)
    exact(PaddedFeatures().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


def test_a_cat_of_features_with_zeros_is_exact():
    torch.manual_seed(1)
    exact(JoinedWithZeros().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


def _structure(graph):
    return {key: getattr(graph, key) for key in ("edge_index", "edge_kind", "node_kind", "perm_group")}


class OneNeuronRepeated(nn.Module):
    """``cat([t, t[:, 2:3]])``: the second part holds one neuron the first holds, one element per datapoint
    in a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(torch.cat([t, t[:, 2:3]], -1))))


def test_a_repeated_part_of_one_element_is_a_copy_in_a_batch_of_one():
    """The graph of a batch of one is the graph of a batch of three (its structure and its group): the part
    ``t[:, 2:3]`` is a tied copy of neuron 2 in both. Kills copy_repeated_parts 16 (a part of one element
    skipped: in a batch of one the copy is not made and ``a``'s neurons are pinned)."""
    torch.manual_seed(2)
    model = OneNeuronRepeated().to(DTYPE)
    one = exact(model, torch.randn(1, 3, dtype=DTYPE))
    three = exact(model, torch.randn(3, 3, dtype=DTYPE))
    for key, value in _structure(three).items():
        assert torch.equal(_structure(one)[key], value), key
    assert bool((one.perm_group[3:8] >= 0).all())


class EmptyPartFirst(nn.Module):
    """``cat([l0(t), t, -t])`` with ``l0 = nn.Linear(5, 0)``: an empty part before the repeated ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.l0, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 0), nn.Linear(10, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(torch.cat([self.l0(t), t, -t], -1))))


def test_parts_after_an_empty_part_are_still_copied():
    """``-t`` is a tied copy of ``t``'s neurons (five MERGE edges) and the group still permutes them, with an
    empty part first. Kills copy_repeated_parts 17 (``break`` for ``continue`` at the empty part: no copy, and
    ``a``'s neurons are pinned) and 12 (``and`` for ``or``: the empty part's row read, a reshape error)."""
    torch.manual_seed(3)
    model = EmptyPartFirst().to(DTYPE)
    graph = exact(model, torch.randn(4, 3, dtype=DTYPE))
    assert int((graph.edge_kind == gradgraph.EdgeKind.MERGE).sum()) == 5
    assert bool((graph.perm_group[3:8] >= 0).all())


class ShapedLikeAndRead(nn.Module):
    """``tanh(h).view_as(h)`` read by one Linear and ``h`` itself by another: two versions of ``h``'s set read."""

    def __init__(self, op) -> None:
        super().__init__()
        self.lin, self.a, self.b, self.op = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2), op

    def forward(self, x):
        h = self.lin(x)
        return self.a(self.op(h)) * self.b(h)


SHAPED_LIKE = {
    "view_as": lambda h: torch.tanh(h).view_as(h),
    "reshape_as": lambda h: torch.tanh(h).reshape_as(h),
    "expand_as": lambda h: torch.tanh(h[:, :1]).expand_as(h),
}


@pytest.mark.parametrize("form", sorted(SHAPED_LIKE))
def test_a_value_shaped_like_another_version_keeps_its_own_version(form):
    """The ``*_as`` op's result is a version of ``tanh(h)``, not of ``h`` (whose shape it reads). Kills shape_op 17
    (the other argument kept as the tracked one)."""
    torch.manual_seed(4)
    exact(ShapedLikeAndRead(SHAPED_LIKE[form]).to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class TokensCReLU(nn.Module):
    """CReLU over the features of tokens ``[b, T, d]`` (``cat([relu(h), relu(-h)], -1)``), a Linear, a sum over them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(8, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.tanh(self.b(torch.cat([F.relu(h), F.relu(-h)], -1)))).sum(1)


def test_crelu_over_the_features_of_tokens_is_a_tied_copy():
    """The features of a ``[b, T, d]`` value are its last axis (not axis 1, a map's channels): ``relu(-h)`` is a tied
    copy of ``h``'s neurons, exact, and the group still permutes them. Kills copy_repeated_parts 28 (axis 1 taken
    for every part: the join refused as one neuron in two parts)."""
    torch.manual_seed(5)
    graph = exact(TokensCReLU().to(DTYPE), torch.randn(3, 4, 3, dtype=DTYPE))
    assert bool((graph.perm_group[3:7] >= 0).all())


class MapAfterAReshapedPart(nn.Module):
    """``cat([u, m, -m], 1)`` of maps ``[b, C, 2, 2]``: ``u`` a Linear's features reshaped (one neuron per place, no
    channel row), then ``m`` and its negation (a tied copy), flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lin = nn.Conv2d(2, 3, 1), nn.Linear(12, 4)
        self.head = nn.Linear(28, 2)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        u = torch.tanh(self.lin(m.flatten(1))).reshape(-1, 1, 2, 2)
        return self.head(torch.cat([u, m, -m], 1).flatten(1))


def test_a_copied_part_after_a_part_without_a_neuron_row_is_exact():
    torch.manual_seed(6)
    exact(MapAfterAReshapedPart().to(DTYPE), torch.randn(3, 2, 2, 2, dtype=DTYPE))


class CReLUByKeyword(nn.Module):
    """CReLU with the axis by keyword (``torch.cat([relu(h), relu(-h)], dim=-1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(8, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.tanh(self.b(torch.cat([F.relu(h), F.relu(-h)], dim=-1))))


def test_crelu_with_its_axis_by_keyword_is_a_tied_copy():
    """Kills shape_op 136, 140, 141 (the keyword not read: axis 0, no copy, the join refused as one neuron in two
    parts) and 137, 139 (no default: ``None`` as the axis, a TypeError)."""
    torch.manual_seed(7)
    graph = exact(CReLUByKeyword().to(DTYPE), torch.randn(3, 3, dtype=DTYPE))
    assert int((graph.edge_kind == gradgraph.EdgeKind.MERGE).sum()) == 4
    assert bool((graph.perm_group[3:7] >= 0).all())


class JoinedAlongTheDatapoints(nn.Module):
    """``cat([t, -t])`` along axis 0 (no ``dim``), then regrouped per datapoint: ``[b, 2, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        return self.b(torch.cat([t, -t]).reshape(2, x.shape[0], -1).transpose(0, 1)).sum(1)


def test_a_join_of_copies_along_the_datapoints_is_refused():
    """Kills shape_op 142 (the axis 1 by default: the parts taken as joined along their features)."""
    refused(JoinedAlongTheDatapoints().to(DTYPE), torch.randn(3, 3, dtype=DTYPE),
            ": torch.cat: joins two versions of the same neurons along their features, one neuron in two parts; "
            "gradgraph has one value per neuron")


class CopiesReadTwice(nn.Module):
    """``y = cat([t, -t])`` read by a Linear and, through a tanh (a new version of the copy), by another."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        y = torch.cat([t, -t], -1)
        return self.b(y) * self.c(torch.tanh(y))


def test_copies_read_at_two_versions_are_exact():
    torch.manual_seed(8)
    exact(CopiesReadTwice().to(DTYPE), torch.randn(3, 3, dtype=DTYPE))


class MapCReLU(nn.Module):
    """CReLU over a map's channels (``cat([relu(m), relu(-m)], 1)`` of ``[b, C, H, W]``), then a 1x1 convolution
    and a mean over the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2, self.head = nn.Conv2d(2, 3, 1), nn.Conv2d(6, 2, 1), nn.Linear(2, 2)

    def forward(self, x):
        m = self.conv(x)
        return self.head(torch.tanh(self.conv2(torch.cat([F.relu(m), F.relu(-m)], 1))).mean((2, 3)))


def test_crelu_over_a_maps_channels_is_a_tied_copy_of_its_channels():
    """The copy's neurons sit on axis 1 of the map, one per channel, each at every position: exact, and the group still
    permutes ``conv``'s channels. Kills copy_repeated_parts 27, 29 (the channels' axis taken as the last one, or as
    axis 2: no copy, the join refused), 52, 54, 55, 57-65 (the copy's row shaped wrong for the map: an error or
    another layout) — as ``test_convert_repeated_parts.py``'s CReLU network does, in the group's list."""
    torch.manual_seed(9)
    model = MapCReLU().to(DTYPE)
    inputs = torch.randn(3, 2, 2, 3, dtype=DTYPE)
    exact(model, inputs)
    moved, graph, _ = assert_group_keeps_function(model, inputs, None, squared, seed=1)
    assert moved > 0
    assert bool((graph.perm_group[2:5] >= 0).all())


def test_a_copy_holds_its_part_as_act_and_grad():
    """CReLU's copy holds ``relu(-h)`` as act and ``dL/d relu(-h)`` as grad per datapoint (autograd), and ``h``'s
    neurons ``relu(h)`` and ``dL/dh``; the input's neurons ``dL/dx``. Kills join_copies 47, 52, 58 (the copy's grad
    record dropped or written at the other parts' places) and 66 (the other parts' places filled with node 1, an
    input neuron, whose grad the output's gradient then overwrites)."""
    torch.manual_seed(10)
    model = CReLUByKeyword().to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    graph = gradgraph.to_graph(model, inputs, None, squared)
    x = inputs.clone().requires_grad_(True)
    h = model.a(x)
    h.retain_grad()
    joined = torch.cat([F.relu(h), F.relu(-h)], -1)
    joined.retain_grad()
    squared(model.c(torch.tanh(model.b(joined))), None).sum().backward()
    assert_crelu_copy_factors(graph, h, joined, first=3)
    torch.testing.assert_close(graph.grad[:3], x.grad.T, atol=1e-12, rtol=0)  # the input's neurons: dL/dx


class PartRepeated(nn.Module):
    """``cat([t, t[:, 1:4]])``: the second part repeats three of the first's five neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(torch.cat([t, t[:, 1:4]], -1))))


def test_a_copy_of_part_of_a_set_is_exact():
    """The copy of ``t[:, 1:4]``, a part narrower than the first, converts exactly. Kills join_copies 53 (the
    copy's grad record at every part's places: a part of another width, a shape error)."""
    torch.manual_seed(11)
    exact(PartRepeated().to(DTYPE), torch.randn(4, 3, dtype=DTYPE))


class CopyReadElementwiseOnly(nn.Module):
    """``y = cat([t, -t])`` whose copy ``-t`` is read only through ``tanh(y[:, 4:])``, summed into the output: no affine
    map reads the copy, so its act is its newest value (``plan_records``), ``tanh(-t)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x))
        y = torch.cat([t, -t], -1)
        return self.b(t) + torch.tanh(y[:, 4:]).sum(-1, keepdim=True)


def test_a_copy_read_elementwise_only_takes_its_newest_value_as_act():
    """The copy (nodes 7-10: input 3, ``a`` 4, then the copy) starts at version 0, so ``tanh(y[:, 4:])`` is its version
    1, newer than ``y``: its act per datapoint is ``tanh(-t)``, computed here from the model's own modules. Kills
    copy_repeated_parts 77 (the copy's first version numbered 1, as the tanh's: the narrower view of the same version
    does not replace the fuller ``y``, and the copy's act is ``-t``)."""
    torch.manual_seed(12)
    model, inputs = CopyReadElementwiseOnly().to(DTYPE), torch.randn(3, 3, dtype=DTYPE)
    graph = exact(model, inputs)
    with torch.no_grad():
        newest = torch.tanh(-torch.tanh(model.a(inputs)))
    torch.testing.assert_close(graph.act[7:11], newest.T, atol=1e-12, rtol=0)
