"""The rules of ``trace/rules_norm.py`` (``NormRules.norm``, ``NormRules.batch_norm``; moved unchanged from
``rules_elementwise.py`` in session 19), checked by value where run norm 1 (group ``convert-elementwise``, issue 31)
showed them unchecked by the group's list. Mutant numbers are run norm 1's (``mutmut show NAME`` in
``.mutation/convert-elementwise/``); each test names the mutants it kills, each checked with
``MUTANT_UNDER_TEST=NAME``.

Every conversion is float64 against torch.func's per-sample gradients at 1e-10 (``traced_models``), and where a
symmetry is claimed a sampled element of the inferred group must keep the function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import batch, convert_exactly, refused

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.convert.trace.ops import LOST_TRACK

DTYPE = torch.float64




class NormAfterARead(nn.Module):
    """``h = Linear(3, 4)(x)`` read by a second ``Linear`` (its act: version 0 of h's set), then ``norm(h)``:
    the normalised value is a later version of the same neurons, so the rule's ``fix_act`` must split it off
    into a set of its own (``materialize`` of the normalised value)."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.norm = norm
        self.a, self.side, self.out = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        side = self.side(h)
        return self.out(torch.tanh(self.norm(h))) + side


NORMS = {
    "F.rms_norm": lambda: (lambda h: F.rms_norm(h, (4,), eps=0.25)),
    "nn.RMSNorm": lambda: nn.RMSNorm(4, eps=0.25),
    "nn.LayerNorm": lambda: nn.LayerNorm(4),
    "nn.BatchNorm1d": lambda: nn.BatchNorm1d(4),
}


@pytest.mark.parametrize("norm", NORMS)
def test_a_norm_of_a_value_another_layer_reads_is_exact(norm):
    """Kills ``norm`` 129 (the RMS norm's normalised value ``None``: the materialized set has no value),
    ``batch_norm`` 96 (the running statistics broadcast over four axes too many)."""
    torch.manual_seed(0)
    module = NORMS[norm]()
    if isinstance(module, nn.BatchNorm1d):
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
    model = NormAfterARead(module).to(DTYPE).eval()
    convert_exactly(model, *batch(5, 3))


class BatchNormedSequence(nn.Module):
    """``BatchNorm1d(2)`` of the ``[b, 2, 5]`` model input (two input channels at five positions), or of
    ``Conv1d(2, 3)``'s ``[b, 3, 3]`` map, then ReLU, a sum over the positions and ``Linear``."""

    def __init__(self, of_input: bool) -> None:
        super().__init__()
        self.of_input = of_input
        self.conv, self.bn = nn.Conv1d(2, 3, 3), nn.BatchNorm1d(2 if of_input else 3)
        self.out = nn.Linear(3, 3)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.conv(self.bn(x)) if self.of_input else self.bn(self.conv(x))
        return self.out(torch.relu(h).sum(-1))


@pytest.mark.parametrize("of_input", [True, False], ids=["of the input", "of a conv map"])
def test_a_batch_norm_of_a_sequence_map_normalises_each_channel(of_input):
    """``BatchNorm1d`` over ``[b, C, L]``: ``C`` channel neurons at ``L`` positions, the model input's too. The input's
    case kills ``batch_norm`` 75 (a ``[b, C, L]`` value read as ``[b, features]`` values: the input's ``L``
    features, which the convolution then refuses); a conv map gives the same graph either way (as 68, 69, 74)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(BatchNormedSequence(of_input).to(DTYPE).eval(), *batch(4, 2, 5))
    assert moved > 0


def refusal(model, inputs):
    """The words of ``to_graph``'s refusal of ``model``."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(model, inputs, None, lambda output, _: output.pow(2).flatten(1).sum(1))
    return str(error.value)


class Normed(nn.Module):
    """``Linear(3, 4)`` of ``[b, T, 3]`` tokens (``[b, 3]`` rows where ``rows``), ``op`` and a sum over the tokens."""

    def __init__(self, op, rows: bool = False) -> None:
        super().__init__()
        self.op, self.rows = op, rows
        self.a, self.pos, self.side = nn.Linear(3, 4), nn.Embedding(3, 4), nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.linspace(0.5, 2.0, 4))
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        out = self.op(self, self.a(x))
        return out if self.rows else out.sum(1)


REFUSALS = {
    # norm 50: need_neurons names the op where it refuses what the norm reads
    "a layer norm of a parameter": (
        lambda self, h: h + F.layer_norm(self.scale, (4,)), False,
        ": torch.nn.functional.layer_norm: the parameter 'scale' used where gradgraph expects neuron values"),
    # norm 78: a position table with its features on two axes (per head) has no datapoint: not a per-head norm
    "a norm of each head of a position table": (
        lambda self, h: h + F.rms_norm(self.pos(torch.arange(h.shape[1])).view(-1, 2, 2), (2,)).flatten(1), False,
        ": torch.nn.functional.rms_norm: a norm whose last axis is not the features of its input"),
    # batch_norm 77: channel_neurons names the op where a [b, T, d] value holds no channels on axis 1
    "a batch norm over the tokens' axis": (
        lambda self, h: F.batch_norm(h, torch.zeros(h.shape[1]), torch.ones(h.shape[1])), False,
        ": torch.nn.functional.batch_norm: its input does not hold channels on axis 1 (neurons)"),
    # batch_norm 196, 197, 201, 202; 210, 211, 215, 216: param_view names the op and the role
    "a buffer as a batch norm's weight": (
        lambda self, h: F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.table, self.bn.bias), True,
        ": torch.nn.functional.batch_norm: its weight is not a parameter of the model (or a view of one); "
        "gradgraph converts affine maps whose weights are parameters"),
    "a buffer as a batch norm's bias": (
        lambda self, h: F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.table), True,
        ": torch.nn.functional.batch_norm: its bias is not a parameter of the model (or a view of one); "
        "gradgraph converts affine maps whose weights are parameters"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_norms_refused_name_the_op_and_say_why(case):
    """Each refusal names the norm's op (and a weight's role). Kills ``norm`` 50 (``need_neurons``' op ``None``),
    78 (a per-head layout worked out for a position table: it went on past the refusal); ``batch_norm`` 77
    (``channel_neurons``' op ``None``), 196, 197, 201, 202, 210, 211, 215, 216 (``param_view``'s
    op or role ``None`` or misspelt)."""
    op, rows, message = REFUSALS[case]
    inputs = torch.randn(5, 3) if rows else torch.randn(5, 3, 3)
    model = Normed(op, rows).eval()
    words = refusal(model, inputs)
    assert message in words, words


class SplitStatistics(nn.Module):
    """``Linear(3, 4)``, ``F.batch_norm`` with the module's own weight, bias and running mean but the running variance
    of a child module (``holds_mean``; else the mean is the child's as well), ReLU, ``Linear(4, 3)``: no one module
    holds the bias with both statistics, so ``symmetry.permute_model`` would not move the statistics with the
    channels, and the norm's neurons are pinned."""

    def __init__(self, holds_mean: bool) -> None:
        super().__init__()
        self.holds_mean = holds_mean
        self.a, self.out, self.child = nn.Linear(3, 4), nn.Linear(4, 3), nn.Module()
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        mean, var = torch.linspace(-0.5, 0.5, 4), torch.linspace(0.5, 2.0, 4)
        if holds_mean:
            self.register_buffer("running_mean", mean)
        else:
            self.child.register_buffer("running_mean", mean)
        self.child.register_buffer("running_var", var)

    def forward(self, x):
        mean = self.running_mean if self.holds_mean else self.child.running_mean
        h = F.batch_norm(self.a(x), mean, self.child.running_var, self.weight, self.bias)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("holds_mean", [True, False], ids=["the mean its own", "both statistics a child's"])
def test_a_batch_norm_whose_statistics_lie_in_other_modules_pins_its_channels(holds_mean):
    """Kills ``batch_norm`` 113 (a module holding the running variance alone counted as the statistics' owner: the
    channels claimed to permute with statistics nothing moves), 127, 135 (``getattr`` of a statistic without its
    default: a module holding the bias but not a statistic raised ``AttributeError``)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(SplitStatistics(holds_mean).to(DTYPE).eval(), *batch(5, 3))
    assert graph.perm_group.tolist() == [-1] * 3 + [-1] * 4 + [-1] * 4 + [-1] * 3


class BatchNormedImage(nn.Module):
    """``BatchNorm2d(2)`` of the ``[b, 2, 3, 3]`` model input, ``Conv2d(2, 3, 2)``, ReLU, a sum over the positions,
    ``Linear(3, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv, self.out = nn.BatchNorm2d(2), nn.Conv2d(2, 3, 2), nn.Linear(3, 3)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.out(torch.relu(self.conv(self.bn(x))).sum((-2, -1)))


def test_a_batch_norm_of_an_input_image_normalises_each_channel():
    """Kills ``batch_norm`` 69, 74 (a ``[b, C, H, W]`` input read as ``[b, features]`` values: its last axis as
    the features, which the convolution then refuses)."""
    torch.manual_seed(0)
    graph, moved = convert_exactly(BatchNormedImage().to(DTYPE).eval(), *batch(4, 2, 3, 3))
    assert moved > 0


class OneFeatureNorm(nn.Module):
    """``Linear(3, 1)``, an RMS norm of its one feature (``eps`` 0.5: a smooth ``h / sqrt(h² + eps)``), a weight
    on it, ``Linear(1, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(3, 1), nn.RMSNorm(1, eps=0.5), nn.Linear(1, 3)

    def forward(self, x):
        return self.out(self.norm(self.a(x)))


def test_a_norm_of_one_feature_is_exact():
    """The neurons of ``[b, 1]`` vary along no axis: no per-head layout. Kills ``meta.neuron_axes_last`` 7 (group
    ``convert-run``, run run 5: ``and`` for ``or``, so the last of no axes was read: ``IndexError``)."""
    torch.manual_seed(0)
    convert_exactly(OneFeatureNorm().to(DTYPE), *batch(5, 3))


class HeadNormAfterARead(nn.Module):
    """``h = Linear(3, 6)(x)`` read by a second ``Linear`` (its act), then an RMS norm of each of its two heads of
    three features (``h.view(b, 2, 3)``), tanh, ``Linear(6, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.side, self.out = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        side = self.side(h)
        return self.out(torch.tanh(F.rms_norm(h.view(-1, 2, 3), (3,), eps=0.25)).flatten(1)) + side


def test_a_norm_of_each_head_of_a_value_another_layer_reads_is_refused_by_name():
    """The normalised heads are a later version of neurons whose act another layer read, so ``fix_act`` would copy
    them into a set of their own, one neuron per feature, and a ``[b, 2, 3]`` value holds other neurons in each head:
    refused (a limitation, not a wrong graph), naming the norm. Kills ``rules_affine.materialize`` 7-12 (group
    ``convert-affine``, run convert 21: its refusal's op or words ``None`` or misspelt) and ``norm`` 166
    (``fix_act``'s op ``None``)."""
    words = refusal(HeadNormAfterARead().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert words.endswith(" torch.nn.functional.rms_norm: these values do not hold one neuron per feature"), words
    assert ":  " not in words, words  # the op named at the root without the empty path's space (session 20)


# Brief mut39 (issue 31, run elementwise 14: the not-killed survivors of run norm 1, same numbers; the file is
# unchanged since)


class HeadsWithAStatistic(nn.Module):
    """``h = tanh(Linear(3, 4)(x))`` and its squared norm ``s = (h ** 2).sum(-1, keepdim=True)`` joined as
    ``cat([h, s, s])`` and read as two heads of three features (``view(b, 2, 3)``), an RMS or layer norm of each
    head, ``Linear(6, 3)``: the second head holds a statistic, which is no neuron of its own."""

    def __init__(self, layer: bool) -> None:
        super().__init__()
        self.layer = layer
        self.a, self.out = nn.Linear(3, 4), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        s = h.pow(2).sum(-1, keepdim=True)
        heads = torch.cat([h, s, s], -1).view(-1, 2, 3)
        normed = F.layer_norm(heads, (3,)) if self.layer else F.rms_norm(heads, (3,), eps=0.25)
        return self.out(normed.flatten(1))


@pytest.mark.parametrize("layer", [False, True], ids=["rms_norm", "layer_norm"])
def test_a_norm_of_each_head_whose_head_holds_a_statistic_is_refused_in_full(layer):
    """The per-head rule finds no row of neurons shared by every head (one holds node -1, a statistic): refused,
    the op named and the words in full. (The words speak of other neurons at other positions; a statistic is the
    one way found to reach them: every head of neuron values tried passes.) Kills ``norm`` 191-198 (the refusal's
    op or words ``None``, dropped or misspelt)."""
    op = "layer_norm" if layer else "rms_norm"
    refused(HeadsWithAStatistic(layer).to(DTYPE), torch.randn(5, 3, dtype=DTYPE),
            f": torch.nn.functional.{op}: a norm of each head's features whose heads hold other neurons at other "
            "positions")


class BatchNormOfTheTransposedInput(nn.Module):
    """``F.batch_norm`` (eval statistics) of the ``[b, 4]`` input transposed, ``[4, b]``: its axis 1 holds the
    datapoints, so the input's features are not its last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.batch_norm(x.T, x.new_zeros(x.shape[0]), x.new_ones(x.shape[0])).T)


def test_a_batch_norm_of_the_transposed_input_is_refused_naming_the_op():
    """A ``[b, C]`` value is read as neurons by ``need_neurons``, which names the norm where the input's features
    are not its last axis. Kills ``batch_norm`` 71 (``need_neurons``' op ``None``: an ``AttributeError``) and 68 (a
    ``[b, C]`` value read through ``channel_neurons`` as a map of no positions: refused in a convolution's words, "a
    convolution whose input's first axis is not the datapoints")."""
    refused(BatchNormOfTheTransposedInput().to(DTYPE), torch.randn(5, 4, dtype=DTYPE),
            ": torch.nn.functional.batch_norm: the input's features are not its last axis")


class NormOfTokenData(nn.Module):
    """A sum of the token embeddings with a norm (``BatchNorm1d(3)`` in eval, or ``LayerNorm(3)``) of a constant of
    the datapoints: how many tokens of each datapoint exceed 2, ``[b, 3]`` (data made from the ids, no neurons)."""

    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        self.emb, self.out, self.side = nn.Embedding(7, 4), nn.Linear(4, 3), nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3) if batch_norm else nn.LayerNorm(3)

    def forward(self, ids):
        counts = (ids > 2).to(torch.float64).sum(-1, keepdim=True) * torch.ones(3, dtype=torch.float64)
        return self.out(torch.tanh(self.emb(ids)).sum(1)) + self.side(self.norm(counts))


@pytest.mark.parametrize("batch_norm", [True, False], ids=["BatchNorm1d", "LayerNorm"])
def test_a_norm_with_a_weight_of_data_made_from_the_ids_is_refused_as_lost_track(batch_norm):
    """``need_neurons`` reads a constant of the datapoints as no neurons (``None``); a norm with a weight of it is
    refused with the lost-track words, naming the op. Kills ``batch_norm`` 86-89 (that refusal's op or words
    ``None`` or dropped); ``norm``'s own (line 32) was killed before."""
    op = "batch_norm" if batch_norm else "layer_norm"
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    module = "BatchNorm1d" if batch_norm else "LayerNorm"
    refused(NormOfTokenData(batch_norm).to(DTYPE).eval(), ids,
            f" (module 'norm' of type {module}): torch.nn.functional.{op}: {LOST_TRACK}")


class RepeatedThenNormalised(nn.Module):
    """``norm(tanh(a(x)).repeat(1, 2))``: every neuron of ``a`` held in two channels of the norm."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(3, 4), norm, nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(torch.tanh(self.a(x)).repeat(1, 2))))


def test_a_batch_norm_of_a_neuron_held_twice_is_refused_by_name():
    """Each of the two channels holding one neuron has a scale and shift of its own, which one neuron cannot carry:
    refused, naming the op and why (before session 21 the graph was built wrong and only the summed-gradient check
    refused it, with words that blamed a parameter use; mut39's report). A LayerNorm of the same value, whose
    statistic mixes every feature, converts exactly."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    with torch.no_grad():
        norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 1.5)
    message = refusal(RepeatedThenNormalised(norm).to(DTYPE).eval(), torch.randn(5, 3, dtype=DTYPE))
    assert "torch.nn.functional.batch_norm: a batch norm of a value that holds one neuron in two channels" in message
    torch.manual_seed(1)
    convert_exactly(RepeatedThenNormalised(nn.LayerNorm(8)).to(DTYPE), *batch(5, 3, classes=2))


class StatisticJoinedThenNormalised(nn.Module):
    """``norm(cat([h, (h ** 2).sum(-1, keepdim=True)]))``: a statistic of ``h`` among the normalised features."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(3, 4), norm, nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(torch.tanh(self.norm(torch.cat([h, (h ** 2).sum(-1, keepdim=True)], -1))))


@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
def test_a_norm_of_features_that_hold_a_statistic_is_refused_by_name(norm):
    """The statistic's scale would be an edge from no neuron: refused by the norm rule, naming the op (before
    session 21 ``make_plan`` refused the edge with its internal "Please report it" error; mut39's report)."""
    torch.manual_seed(0)
    module = {"layer": nn.LayerNorm(5), "rms": nn.RMSNorm(5), "batch": nn.BatchNorm1d(5)}[norm]
    message = refusal(StatisticJoinedThenNormalised(module).to(DTYPE).eval(), torch.randn(5, 3, dtype=DTYPE))
    assert "norm: a norm of a value whose features hold a statistic of neurons" in message, message


# ------------------------------------------------------------------------ mut42 (issue 31): the refusals in full
HELD_TWICE = ("a batch norm of a value that holds one neuron in two channels (h.repeat(1, 2), cat([h, h])): each "
              "channel has a scale and shift of its own, which one neuron cannot carry; normalise before repeating "
              "the neurons")
HOLDS_A_STATISTIC = ("a norm of a value whose features hold a statistic of neurons (a sum or mean over features "
                     "joined to them): the statistic is no neuron, so its scale has no rank-1 terms; normalise the "
                     "neurons before joining the statistic")


@pytest.mark.parametrize("case", ["held twice", "layer", "rms", "batch"])
def test_the_refusals_of_a_neuron_held_twice_and_of_a_statistic_say_why_in_full(case):
    """The words a user reads, matched in full after the location (the tests above match their first clause).
    Kills ``batch_norm`` 186-189 and ``check_sources_are_neurons`` 10-13 (the later pieces of each message
    misspelt or upper-cased)."""
    torch.manual_seed(0)
    if case == "held twice":
        norm = nn.BatchNorm1d(8)
        with torch.no_grad():
            norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 1.5)
        refused(RepeatedThenNormalised(norm).to(DTYPE).eval(), torch.randn(5, 3, dtype=DTYPE),
                f" (module 'norm' of type BatchNorm1d): torch.nn.functional.batch_norm: {HELD_TWICE}")
        return
    module, kind = {"layer": (nn.LayerNorm(5), "LayerNorm"), "rms": (nn.RMSNorm(5), "RMSNorm"),
                    "batch": (nn.BatchNorm1d(5), "BatchNorm1d")}[case]
    op = {"layer": "layer_norm", "rms": "rms_norm", "batch": "batch_norm"}[case]
    refused(StatisticJoinedThenNormalised(module).to(DTYPE).eval(), torch.randn(5, 3, dtype=DTYPE),
            f" (module 'norm' of type {kind}): torch.nn.functional.{op}: {HOLDS_A_STATISTIC}")
