"""The rules of ``trace/rules_affine.py`` (affine maps, ``matmul`` / ``addmm`` with a parameter, the
zero-state shortcut, embeddings and position parameters), checked by value: what run convert 11
(docs/mutation.md, group ``convert-affine``) found unchecked.

Every conversion is float64 against torch.func's per-sample gradients (1e-10); a refusal is matched
in full after its location (``file:line in name``: under mutmut the innermost frame outside torch and
gradgraph is mutmut's trampoline, so the location is matched by its form only). Each test names the
mutants it kills (``mutmut show NAME`` in ``.mutation/convert-affine/``, ``f 12`` standing for
``gradgraph.convert.trace.rules_affine.xǁAffineRulesǁf__mutmut_12``), each checked with
``MUTANT_UNDER_TEST=NAME``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from convert_values import exact, refused, squared, TokenMixing, TwiceFlattened, UnboundPositions
from traced_models import assert_group_keeps_function

import gradgraph
from gradgraph.convert import UnsupportedOperationError

DTYPE = torch.float64


# ----------------------------------------------------------------------- the zero state
class ZeroState(nn.Module):
    """An Elman loop from ``h = torch.zeros(...)`` made in ``forward``: the first step's ``U · 0 + c``
    is the bias ``c`` alone. ``how`` writes the recurrent map as ``F.linear`` (with or without a
    bias), ``addmm`` (``c + h @ V``, ``V`` of shape ``[in, out]``) or ``h @ V`` (no bias)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.input_map, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        if how in ("linear", "linear no bias"):
            self.recurrent = nn.Linear(4, 4, bias=how == "linear")
        else:
            self.v = nn.Parameter(torch.randn(4, 4) / 2)
            if how == "addmm":
                self.c = nn.Parameter(torch.randn(4))

    def step(self, h):
        if self.how.startswith("linear"):
            return self.recurrent(h)
        if self.how == "addmm":
            return torch.addmm(self.c, h, self.v)
        return h @ self.v

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.step(h))
        return self.head(h)


@pytest.mark.parametrize("how", ["linear", "linear no bias", "addmm", "matmul"])
def test_an_affine_map_of_a_zero_state_is_its_bias(how):
    """``zero_state_affine``: the first step reads the bias alone (a view of it, added to the input
    map's neurons) and gives the recurrent weight no gradient there; the later steps are ordinary
    affine maps. Exact against torch.func, with and without a bias, ``F.linear`` and the transposed
    ``addmm`` / ``matmul``."""
    torch.manual_seed(1)
    model = ZeroState(how).to(DTYPE)
    exact(model, torch.randn(5, 3, 3, dtype=DTYPE))


# ----------------------------------------------------------------------- refusals, in full
class Refused(nn.Module):
    """One affine map (or embedding) that gradgraph refuses, after ``h = tanh(a(x))`` of width 4;
    the weights are not square, so an output count read from the wrong axis shows."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.out = nn.Linear(3, 4), nn.Linear(5, 2)
        self.register_buffer("constant", torch.randn(5, 4))
        self.vector, self.one = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(1))
        self.w, self.v = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        if self.kind == "the input transposed on the left":  # read so before any affine map fixes its layout
            return self.out((x.T @ torch.tanh(self.a(x))).sum().expand(x.shape[0], 5))
        h, kind = torch.tanh(self.a(x)), self.kind
        zero = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        if kind == "a buffer as weight":
            y = F.linear(h, self.constant)
        elif kind == "a buffer as bias":
            y = F.linear(h, self.w, self.constant[:, 0])
        elif kind == "a vector as weight":
            y = F.linear(h, self.vector).unsqueeze(-1).expand(-1, 5)
        elif kind == "a bias of one entry":
            y = F.linear(h, self.w, self.one)
        elif kind == "a bias of one entry, addmm":
            y = torch.addmm(self.one, h, self.v)
        elif kind == "a statistic among the features":
            y = F.linear(torch.cat([h[:, :3], h.mean(-1, keepdim=True)], -1), self.w)
        elif kind == "a zero state with a buffer as weight":
            y = F.linear(zero, self.constant, self.w[:, 0]) + F.linear(h, self.w)
        elif kind == "a zero state with a bias of one entry":
            y = F.linear(zero, self.w, self.one) + F.linear(h, self.w)
        elif kind == "a zero state with a bias of one entry, addmm":
            y = torch.addmm(self.one, zero, self.v) + F.linear(h, self.w)
        elif kind == "a zero state with a buffer as bias":
            y = F.linear(zero, self.w, self.constant[:, 0]) + F.linear(h, self.w)
        elif kind == "a parameter on the left":
            y = (self.w @ h.T).T
        elif kind == "a constant on the right":
            y = h @ self.constant.T
        elif kind == "a constant on the left":
            y = (self.constant @ h.T).T
        elif kind == "a vector as weight, matmul":
            y = F.linear(h, self.vector).unsqueeze(-1).expand(-1, 5)  # (h @ vector is a linear map with one output)
        elif kind == "scores on the right":
            heads = h.view(-1, 2, 2)
            y = (heads @ (heads @ heads.transpose(-1, -2))).flatten(1)[:, :1].expand(-1, 5)
        elif kind == "attention weights on a constant":
            heads = h.view(-1, 2, 2)
            weights = torch.softmax(heads @ heads.transpose(-1, -2), -1)
            y = (weights @ self.constant[:2, :2]).flatten(1)[:, :1].expand(-1, 5)
        elif kind == "scores as the input":
            heads = h.view(-1, 2, 2)
            y = F.linear(heads @ heads.transpose(-1, -2), self.w[:, :2]).sum(1)
        return self.out(y)


REFUSALS = {
    "a buffer as weight": "torch.nn.functional.linear: its weight is not a parameter of the model (or a view of "
                          "one); gradgraph converts affine maps whose weights are parameters",
    "a buffer as bias": "torch.nn.functional.linear: its bias is not a parameter of the model (or a view of one); "
                        "gradgraph converts affine maps whose weights are parameters",
    "a vector as weight": "torch.nn.functional.linear: a weight of shape [4]; expected a matrix",
    "a bias of one entry": "torch.nn.functional.linear: a bias of shape [1] for 5 outputs",
    "a bias of one entry, addmm": "torch.addmm: a bias of shape [1] for 5 outputs",
    "a statistic among the features": "torch.nn.functional.linear: its input holds values that are not neurons "
                                      "(e.g. a statistic)",
    "a zero state with a buffer as weight": "torch.nn.functional.linear: its weight is not a parameter of the model "
                                            "(or a view of one); gradgraph converts affine maps whose weights are "
                                            "parameters",
    "a zero state with a bias of one entry": "torch.nn.functional.linear: a bias of shape [1] for 5 outputs",
    "a zero state with a bias of one entry, addmm": "torch.addmm: a bias of shape [1] for 5 outputs",
    "a zero state with a buffer as bias": "torch.nn.functional.linear: its bias is not a parameter of the model (or a "
                                          "view of one); gradgraph converts affine maps whose weights are parameters",
    "a parameter on the left": "Tensor.matmul: a parameter on the left of a matmul; write x @ W (features last)",
    "a constant on the right": "Tensor.matmul: a matmul of neurons with a constant of shape [4, 5]",
    "a constant on the left": "Tensor.matmul: a matmul of neurons with a constant of shape [5, 4]",
    "a vector as weight, matmul": "torch.nn.functional.linear: a weight of shape [4]; expected a matrix",
    "the input transposed on the left": "Tensor.matmul: the input's features are not its last axis",
    "scores on the right": "Tensor.matmul: attention scores used as neuron values",
    "attention weights on a constant": "Tensor.matmul: attention weights applied to a constant",
    "scores as the input": "the affine map torch.nn.functional.linear: attention scores used as neuron values",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_affine_maps_gradgraph_cannot_convert_are_refused_with_their_reason(kind):
    """``param_view``, ``affine``, ``zero_state_affine`` and ``matmul``'s refusals, each message in full
    (the op, what is wrong, the shape read from the right axis). Kills param_view 4-9; affine 3, 8, 13,
    34, 35, 39, 40, 43-47, 90, 93-98, 163, 164, 168, 169, 171-175; matmul 6, 18, 22, 23, 25, 35, 40, 43,
    46-54; zero_state_affine 7, 8, 12, 13, 23, 24, 28, 29, 31, 32, 34, 36-40."""
    torch.manual_seed(2)
    refused(Refused(kind).to(DTYPE), torch.randn(5, 3, dtype=DTYPE), ": " + REFUSALS[kind])


class FrozenTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(6, 5))
        self.out = nn.Linear(5, 2)

    def forward(self, ids):
        return self.out(F.embedding(ids, self.table)).sum(1)


def test_an_embedding_whose_table_is_a_buffer_is_refused():
    """``param_view``'s role in the message: the table, not a weight. Kills embedding 3, 4, 8, 9."""
    refused(FrozenTable().to(DTYPE), torch.randint(0, 6, (4, 3)),
            ": torch.nn.functional.embedding: its table is not a parameter of the model (or a view of one); "
            "gradgraph converts affine maps whose weights are parameters")


# ----------------------------------------------------------------------- copies (materialize)
def fixed(count):
    return [-1] * count


def group_of(model, inputs):
    """The exact graph's ``perm_group`` and the most nodes a sampled group element moved (each sample
    keeps the function and maps the graph to the permuted model's)."""
    graph = exact(model, inputs)
    moved = max(assert_group_keeps_function(model, inputs, None, squared, seed=seed)[0] for seed in range(3))
    return graph.perm_group.tolist(), moved


class TwoVersions(nn.Module):
    """``z`` read by one affine map before its activation and by another after it: one version is
    the act of ``z``'s neurons, the other a copy of its own tied to them. ``kind``: ``linear`` (``z``
    of width 4), ``conv`` (a map ``[b, 3, 4, 4]``: its neurons on axis 1, positions last), ``conv1d``
    (``[b, 3, 6]``: the positions on the last axis only) or ``conv one channel`` (``C = 1``, whose last
    axis would otherwise pass for one neuron repeated)."""

    def __init__(self, kind: str, post_first: bool = False) -> None:
        super().__init__()
        self.kind, self.post_first = kind, post_first
        if kind == "linear":
            self.a, self.pre, self.post = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)
        elif kind == "tokens of one feature":
            self.a, self.pre, self.post = nn.Linear(3, 1), nn.Linear(1, 2), nn.Linear(1, 2)
        elif kind == "conv1d":
            self.a = nn.Conv1d(2, 3, 3, padding=1)
            self.pre, self.post = nn.Conv1d(3, 2, 1), nn.Conv1d(3, 2, 1)
        else:
            channels = 1 if kind == "conv one channel" else 3
            self.a = nn.Conv2d(2, channels, 3, padding=1)
            self.pre, self.post = nn.Conv2d(channels, 2, 1), nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        z = self.a(x)
        if self.post_first:
            y = self.post(torch.tanh(z)) + self.pre(z)
        else:
            y = self.pre(z) + self.post(torch.tanh(z))
        return y.flatten(1)


@pytest.mark.parametrize("post_first", [False, True], ids=["pre first", "post first"])
def test_a_value_read_before_and_after_its_activation_gets_a_tied_copy(post_first):
    """``materialize``'s tied copy (a unique row): ``z``'s 4 neurons and their copy permute together;
    a copy of its own, pinned (``!=`` for ``==`` on the unique count), would fix both.
    Kills materialize 38; fix_act 1, 11."""
    torch.manual_seed(3)
    group, moved = group_of(TwoVersions("linear", post_first).to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    # input 3 | z 4 | the first reader's 2 | the copy 4 | the second reader's 2
    assert group == fixed(3) + [0] * 4 + fixed(2) + [0] * 4 + fixed(2)
    assert moved > 0


CHANNEL_GROUPS = {
    # the input read through its 3x3 (or 3) taps | a's C channels (layer 1) | the copy and the 1x1 convs' sets
    "conv": fixed(18) + [0] * 6 + fixed(2) + [0] * 6 + fixed(4),
    "conv1d": fixed(6) + [0] * 6 + fixed(2) + [0] * 6 + fixed(4),
    "conv one channel": fixed(18) + [0] * 2 + fixed(2) + [0] * 2 + fixed(4),
    # [b, t, 1]: one neuron on the last axis, positions on axis 1 (not channels): a tied copy of one neuron
    "tokens of one feature": fixed(3) + [0] + fixed(2) + [0] + fixed(2),
}


@pytest.mark.parametrize("kind", list(CHANNEL_GROUPS))
def test_a_feature_map_read_before_and_after_its_activation_copies_its_channels(kind):
    """``materialize`` of a ``[b, C, *S]`` map: the neurons are its channels (axis 1), its last axis
    holds positions (checked along that axis: a 1-D map's axis 1 holds no positions); the copy has
    one neuron per channel, tied to it. With ``C = 1`` the last axis must not pass for one neuron
    repeated (that would pin the copy and lose the tie). The groups are as converted (each sampled
    element keeps the function and maps the graph); a copy without the tie fixes them all.
    A ``[b, t, 1]`` value of tokens is no feature map: its one neuron is on the last axis.
    Kills materialize 1-6, 16-24, 74, 76, 77, 79-87."""
    torch.manual_seed(4)
    shape = {"conv1d": (5, 2, 6), "tokens of one feature": (5, 4, 3)}.get(kind, (5, 2, 4, 4))
    group, moved = group_of(TwoVersions(kind).to(DTYPE), torch.randn(*shape, dtype=DTYPE))
    assert group == CHANNEL_GROUPS[kind]
    assert moved > 0 or kind in ("conv one channel", "tokens of one feature")


class SameTwice(nn.Module):
    """``h.repeat(1, 2)`` read by one affine map: one neuron on two features. (``cat([h, h])`` no longer
    reaches ``materialize`` so: its second part is a tied copy of ``h``,
    tests/convert/test_convert_repeated_parts.py.)"""

    def __init__(self, activation: bool) -> None:
        super().__init__()
        self.activation = activation
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if self.activation:
            h = torch.tanh(h)
        return self.b(h.repeat(1, 2))


@pytest.mark.parametrize("activation", [False, True], ids=["pre-activation", "tanh"])
def test_one_neuron_on_two_features_gets_a_merge_copy_each_and_pins_its_set(activation):
    """``materialize`` where the row holds a neuron twice: a pinned MERGE set of 8 neurons, one per
    feature, each reading its neuron (edges of weight one), and ``h``'s set pinned; exact.
    Kills materialize 52-54, 57-60, 63-67, 69-72; affine 101, 102, 111-113, 115-117."""
    torch.manual_seed(5)
    model = SameTwice(activation).to(DTYPE)
    group, moved = group_of(model, torch.randn(5, 3, dtype=DTYPE))
    assert group == fixed(3 + 4 + 8 + 2) and moved == 0


def test_the_merge_edges_of_one_neuron_on_two_features_carry_no_weight():
    """``materialize``'s copy of a row that holds a neuron twice (``h.repeat(1, 2)``): its 8 MERGE edges, one from
    each neuron it copies, carry no weight, ``edge_param`` ``-1`` (``graph.py``: "-1 if the edge is structural", a
    field a user reads), and every other edge a valid parameter index. Kills ``materialize`` 45 of run convert 21
    (68 of run convert 11; the MERGE edges written with parameter ``-2``, listed equivalent there: "every reader asks
    ``>= 0``", which a user's code need not)."""
    torch.manual_seed(5)
    graph = exact(SameTwice(True).to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    merge = graph.edge_kind == int(gradgraph.EdgeKind.MERGE)
    assert int(merge.sum()) == 8
    assert graph.edge_param[merge].tolist() == [-1] * 8
    assert graph.edge_param_pos[merge].tolist() == [-1] * 8
    assert bool(((graph.edge_param == -1) | ((graph.edge_param >= 0) & (graph.edge_param < len(graph.param_names))))
                .all())


class StateBuffer(nn.Module):
    """An Elman loop whose initial state is a buffer (zero at first); ``leaf`` instead makes the
    state in ``forward`` as a zero tensor that requires grad (a value gradgraph did not follow)."""

    def __init__(self, leaf: bool = False) -> None:
        super().__init__()
        self.leaf = leaf
        self.input_map, self.recurrent_map, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("h0", torch.zeros(1, 4))

    def forward(self, x):
        if self.leaf:
            h = torch.zeros(x.shape[0], 4, dtype=x.dtype, requires_grad=True)
        else:
            h = self.h0.expand(x.shape[0], -1)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.recurrent_map(h))
        return self.head(h)


LOST = (" (module 'recurrent_map' of type Linear): torch.nn.functional.linear: its input is not computed from the "
        "model input by ops gradgraph follows (a custom autograd.Function, a tensor made inside forward, .detach(), "
        "or a second input passed through forward_kwargs such as a data graph's edge features: gradgraph reads one "
        "input tensor); register the module that computes it with gradgraph.convert.register_elementwise if it is "
        "elementwise, or register a converter for it")


def test_an_affine_map_of_a_nonzero_constant_or_of_an_untracked_value_is_refused():
    """``zero_state_affine`` handles a constant zero only: a state of 0.5 (``W · 0.5`` gives ``W`` a
    gradient the shortcut would drop) and a zero that requires grad (a value gradgraph lost track of)
    are refused, each with the lost-track reason. Kills zero_state_affine 1, 2, 4, 5; affine 21-24."""
    torch.manual_seed(6)
    inputs = torch.randn(5, 3, 3, dtype=DTYPE)
    model = StateBuffer().to(DTYPE)
    with torch.no_grad():
        model.h0.fill_(0.5)
    refused(model, inputs, LOST)
    refused(StateBuffer(leaf=True).to(DTYPE), inputs, LOST)


def test_the_zero_state_is_a_value_guard_of_the_cached_plan():
    """The plan that read ``U · 0 + c`` as ``c`` is cached with the zero as a value guard: the same
    model with a state of 0.5 traces afresh (and is refused) instead of replaying the plan, whose
    ``U`` gradients from the first step would be silently dropped. Kills zero_state_affine 16, 19."""
    torch.manual_seed(7)
    inputs = torch.randn(5, 3, 3, dtype=DTYPE)
    model = StateBuffer().to(DTYPE)
    exact(model, inputs)
    with torch.no_grad():
        model.h0.fill_(0.5)
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+" + re.escape(LOST) + "$"):
        gradgraph.to_graph(model, inputs, None, squared)  # the cache is not cleared: a replay if unguarded


def test_a_copy_is_named_after_the_op_that_made_it():
    """The copies' origin is what ``mlp_layers`` names when it refuses a model that is no chain: the
    reader of the second version (``'post torch.nn.functional.linear'``) and the reader of ``h.repeat(1, 2)``
    (``'b input'``). Kills materialize 41, 55; fix_act 6; affine 114, 118, 122."""
    reason = ("not an MLP chain: a skip connection, gate, norm, concatenation or attention combines neurons (skip "
              "connections, concatenation and parameter access are unsupported)")
    for model, where in ((TwoVersions("linear"), "post torch.nn.functional.linear"), (SameTwice(True), "b input")):
        with pytest.raises(gradgraph.UnsupportedModuleError) as error:
            gradgraph.convert.mlp_layers(model.to(DTYPE))
        assert str(error.value) == f"unsupported module at '{where}' of type {type(model).__name__}: {reason}"


# ----------------------------------------------------------------------- embeddings and positions
class Tokens(nn.Module):
    """Token ids ``[b, 5]`` through a table whose padding row is counted from the end (``-2``: row 5
    of 7; ``F.embedding``, but in ``plain``, which calls the module), then ``kind``: ``plain``;
    ``positions`` (a position table over ``arange`` with padding row 1, bound when added to the
    tokens); ``types`` (a table indexed by ``ids % 3``, data indices, read by its own affine map) and
    ``types in two versions`` (read before and after tanh); ``position parameter`` (``[1, 5, 4]``) or
    ``position matrix`` (``[5, 4]``) added to the tokens; ``two versions`` (the sum read before and
    after tanh)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.tokens, self.out = nn.Embedding(7, 4, padding_idx=-2), nn.Linear(4, 2)
        if kind in ("positions", "two versions"):
            self.positions = nn.Embedding(5, 4, padding_idx=1 if kind == "positions" else None)
        if kind in ("types", "types in two versions"):
            self.types = nn.Embedding(3, 4)
        if kind == "types in two versions":
            self.other = nn.Linear(4, 2)

        if kind == "position parameter":
            self.pos = nn.Parameter(torch.randn(1, 5, 4))
        if kind == "position matrix":
            self.pos = nn.Parameter(torch.randn(5, 4))
        if kind == "two versions":
            self.other = nn.Linear(4, 2)

    def forward(self, ids):
        # the module counts its padding_idx from the end itself; F.embedding hands -2 to the rule
        x = self.tokens(ids) if self.kind == "plain" else F.embedding(ids, self.tokens.weight, padding_idx=-2)
        if self.kind in ("positions", "two versions"):
            x = x + self.positions(torch.arange(ids.shape[1]))
        if self.kind.startswith("position "):
            x = x + self.pos
        if self.kind == "types":
            return (self.out(torch.tanh(x)) + self.out(self.types(ids % 3))).sum(1)
        if self.kind == "types in two versions":
            types = self.types(ids % 3)
            return (self.out(types) + self.other(torch.tanh(types)) + self.out(torch.tanh(x))).sum(1)

        if self.kind == "two versions":
            return (self.out(x) + self.other(torch.tanh(x))).sum(1)
        return self.out(torch.tanh(x)).sum(1)


def token_ids():
    ids = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(8))
    ids[0, 0] = ids[3, 2] = 5  # the padding row (-2 of 7) is read: it must get no gradient
    return ids


@pytest.mark.parametrize("kind", ["plain", "positions", "types", "types in two versions", "position parameter",
                                  "position matrix", "two versions"])
def test_embeddings_and_position_parameters_convert_exactly(kind):
    """``embedding`` (token ids, the padding row counted from the end; data indices; constant
    position indices with a padding row of their own, bound by ``bind``), ``position_parameter``
    (a ``[1, T, d]`` and a ``[T, d]`` parameter added to tokens), a sum read in two versions and a
    data-index embedding read in two versions (its neurons start at version 0): every per-sample
    gradient exact, the padding rows' zero. Kills embedding 14-16, 29, 34, 36, 111, 128; bind 29, 34, 35."""
    torch.manual_seed(9)
    exact(Tokens(kind).to(DTYPE), token_ids())


class ScaledPositionsUnused(nn.Module):
    """Token and position tables; ``2.0 * positions`` computed first (a branch of the forward that does not reach
    the output), then the positions themselves added to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

    def forward(self, ids):
        positions = self.positions(torch.arange(ids.shape[1]))
        self.scaled = 2.0 * positions  # (kept for inspection; not part of the output)
        return self.out(torch.tanh(self.tokens(ids) + positions)).sum(1)


def test_positions_added_unchanged_convert_exactly_after_a_scaled_copy_of_them_was_made():
    """The scale makes a new version of the position values (version 1, recorded as changed by ``2.0 *``); the
    positions added to the tokens are the table's output itself, version 0, so the sum is no join of changed
    positions: it converts, exact against torch.func. Kills ``embedding`` 84 (the constant-index output made at
    version 1, which run convert 11 listed equivalent as its 109, before ``unary`` recorded changed position
    versions: under it the unchanged positions share the scaled copy's version and the sum is refused as a join of
    positions "that Tensor.__rmul__ ... changed")."""
    torch.manual_seed(16)
    exact(ScaledPositionsUnused().to(DTYPE), token_ids())


class PerPosition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.pos, self.out = nn.Embedding(7, 4), nn.Parameter(torch.randn(4, 1)), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.pos)).sum(1)


def test_a_parameter_that_varies_per_position_only_is_refused():
    """``position_parameter``: a ``[T, 1]`` parameter added to tokens ``[b, T, d]`` (here ``T = d = 4``,
    so reading it as rows of ``d`` would not fail by itself) is refused in full.
    Kills position_parameter 14, 25-30."""
    refused(PerPosition().to(DTYPE), token_ids()[:, :4],
            ": Tensor.add: a parameter added to neurons that does not vary per feature")


def test_a_non_finite_table_names_the_embedding():
    """The embedding's neurons carry its module path (``'tokens'``) into the non-finite check's message.
    Kills embedding 67, 73."""
    model = Tokens("plain").to(DTYPE)
    with torch.no_grad():
        model.tokens.weight[3] = float("nan")
    ids = token_ids()
    ids[:, 0] = 3
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.NonFiniteFactorError) as error:
        gradgraph.to_graph(model, ids, None, squared)
    count = 4 * int((ids == 3).sum())  # the 4 features of every token 3
    assert str(error.value) == (f"activation of the 'tokens' output neurons has {count} non-finite value(s) (shape "
                                "[4, 36]); check the inputs, the loss and the model's weights")


# ----------------------------------------------------------------------- scores, parameters after a read
class OneHead(nn.Module):
    """Single-head attention on ``[b, t, d]`` written out: scores ``q @ kᵀ`` of shape ``[b, t, t]``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        scores = (self.q(x) @ self.k(x).transpose(-1, -2)).reshape(x.shape[0], 4, 4)  # the same shape
        weights = torch.softmax(scores / 2, -1)
        return self.out(weights @ self.v(x)).sum(1)


def test_single_head_attention_scores_keep_their_batch_axes():
    """``matmul``'s scores of a 3-D ``q @ kᵀ``: the batch axes are ``shape[:-2]`` (one), not
    ``shape[:2]`` (a reshape to the same shape would then read as a change of the batch axes). Exact.
    Kills matmul 66."""
    torch.manual_seed(10)
    exact(OneHead().to(DTYPE), torch.randn(5, 4, 3, dtype=DTYPE))


class ShiftAfterRead(nn.Module):
    """``z = a(x)`` (no bias) read by an affine map, then shifted by a parameter and read again: the
    shift must not become ``z``'s bias (the first reader saw ``z`` without it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4, bias=False), nn.Linear(4, 2), nn.Linear(4, 2)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x):
        z = self.a(x)
        return self.b(z) + self.c(torch.tanh(z + self.shift))


def test_a_parameter_added_after_an_affine_read_is_not_absorbed_as_its_bias():
    """``fix_act`` marks the read set no longer fresh, so the shift is not absorbed as its bias (which
    would send ``b``'s signal into the shift's gradient). Exact. Kills fix_act 13."""
    torch.manual_seed(11)
    exact(ShiftAfterRead().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))


# ----------------------------------------------------------------------- partial reads
class PartRead(nn.Module):
    """``h = tanh(a(x))`` of width 6 read whole by ``c`` and in part by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.c = nn.Linear(3, 6), nn.Linear(6, 2)
        if kind in ("first two", "middle two", "every other", "chunks"):
            self.b = nn.Linear(2 if "two" in kind else 3, 2)
        if kind == "chunks":
            self.d = nn.Linear(3, 2)

    def forward(self, x):
        h, kind = torch.tanh(self.a(x)), self.kind
        y = self.c(h)
        if kind == "first two":
            return y + self.b(h[:, :2])
        if kind == "middle two":
            return y + self.b(h[:, 2:4])
        if kind == "every other":
            return y + self.b(h[:, ::2])
        if kind == "chunks":
            first, second = h.chunk(2, -1)
            return y + self.b(first) + self.d(second)
        if kind == "mean of a part":
            return y * h[:, 1:3].mean(-1, keepdim=True)
        if kind == "mean of every other":
            return y * h[:, ::2].mean(-1, keepdim=True)
        return y * h.mean(-1, keepdim=True)  # "mean of all"


PART_GROUPS = {
    # input 3 | h 6 | the readers' outputs
    "first two": fixed(3) + [0, 0, 1, 1, 1, 1] + fixed(4),
    "middle two": fixed(3) + [0, 0, 1, 1, 2, 2] + fixed(4),
    "every other": fixed(3 + 6 + 4),
    "chunks": fixed(3) + [0, 0, 0, 1, 1, 1] + fixed(6),
    "mean of a part": fixed(3) + [0, 1, 1, 2, 2, 2] + fixed(2),
    "mean of every other": fixed(3 + 6 + 2),
    "mean of all": fixed(3) + [0] * 6 + fixed(2),
}


@pytest.mark.parametrize("kind", list(PART_GROUPS))
def test_a_part_read_or_mixed_cuts_a_contiguous_part_and_pins_any_other(kind):
    """``separate_part_read`` (an affine map of part of ``h``) and ``separate_mixed_part`` (a mean over
    part of it): a contiguous part becomes a piece of its own (``h`` permutes within each piece),
    any other part pins ``h``; a mean over all of ``h`` keeps it whole. Each group is checked to keep
    the function. Kills separate_part_read 19, 20; separate_mixed_part 3, 4."""
    torch.manual_seed(12)
    group, _ = group_of(PartRead(kind).to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    assert group == PART_GROUPS[kind]


def test_a_non_finite_bias_names_the_affine_map():
    """An affine map's neurons carry its module path (``'a'``) into the non-finite check's message:
    the output ``a(x)`` with an infinite bias entry, under a loss ``tanh`` flattens there (its signal
    stays finite, so the input's check passes). Kills affine 140, 146."""
    model = nn.Sequential()
    model.add_module("a", nn.Linear(3, 4))
    model = model.to(DTYPE)
    with torch.no_grad():
        model.a.bias[1] = float("inf")
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.NonFiniteFactorError) as error:
        gradgraph.to_graph(model, torch.randn(5, 3, dtype=DTYPE), None, lambda output, _: torch.tanh(output).sum(1))
    assert str(error.value) == ("activation of the 'a' output neurons has 5 non-finite value(s) (shape [4, 5]); "
                                "check the inputs, the loss and the model's weights")


class ThreeVersions(nn.Module):
    """``z`` read by ``pre``; ``t = tanh(z)`` read by ``post`` (a copy of ``z``) and again by ``again``;
    ``tanh(t)`` read by ``post2`` (a version of the copy: a second copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pre, self.post, self.again, self.post2 = (nn.Linear(3, 4), *(nn.Linear(4, 2) for _ in range(4)))

    def forward(self, x):
        z = self.a(x)
        y = self.pre(z)
        t = torch.tanh(z)
        y = y + self.post(t) + self.again(t)
        return y + self.post2(torch.tanh(t))


def test_a_copy_is_read_again_as_it_is_and_its_next_version_gets_a_copy_of_its_own():
    """``materialize`` gives the copy version 0 and makes it the meta of ``t``: ``again`` reads the same
    copy (no third set), and ``tanh(t)`` (the copy's next version) conflicts with its act and is copied
    again; a copy at version 1 would take ``tanh(t)`` for its own act. Exact, and one copy per value.
    Kills materialize 99, 102."""
    torch.manual_seed(13)
    group, moved = group_of(ThreeVersions().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))
    # input 3 | z 4 | pre 2 | copy of t 4 | post 2 | again 2 | copy of tanh(t) 4 | post2 2
    assert group == fixed(3) + [0] * 4 + fixed(2) + [0] * 4 + fixed(4) + [0] * 4 + fixed(2)
    assert moved > 0


class Expanded(nn.Module):
    """``h`` copied over a new axis (``h[:, None].expand(-1, 3, -1)``) and read by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)).unsqueeze(1).expand(-1, 3, -1)).sum(1)


@pytest.mark.parametrize("kind", ["token mixing", "unbound positions", "twice flattened", "expanded"])
def test_affine_maps_over_what_is_not_one_feature_per_neuron_are_refused(kind):
    """``affine``'s refusals of its input's layout, in full: a Linear over tokens (the rows differ, the
    components along them do not: either is refused), over position embeddings not yet bound to
    a datapoint, over a flattened map that holds a channel at a position twice (``spread_positions``,
    named by the affine op) and over copies of one position (``check_no_copies``).
    Kills affine 26, 54-59, 78-87, 103-108."""
    model = {"token mixing": TokenMixing, "unbound positions": UnboundPositions, "twice flattened": TwiceFlattened,
             "expanded": Expanded}
    inputs = {"token mixing": lambda: torch.randn(5, 4, 3, dtype=DTYPE), "unbound positions": token_ids,
              "twice flattened": lambda: torch.randn(5, 2, 4, 4, dtype=DTYPE),
              "expanded": lambda: torch.randn(5, 3, dtype=DTYPE)}
    reasons = {
        "token mixing": " (module 'mix' of type Linear): torch.nn.functional.linear: applied to an axis that holds "
                        "positions or datapoints, not features (e.g. a Linear over tokens, as in MLP-Mixer); gradgraph "
                        "needs affine maps over the last, feature axis",
        "unbound positions": " (module 'proj' of type Linear): torch.nn.functional.linear: an affine map of values "
                             "that do not depend on the input",
        "twice flattened": " (module 'head' of type Linear): torch.nn.functional.linear: an affine map over features "
                           "that hold one neuron at one position twice",
        "expanded": " (module 'out' of type Linear): torch.nn.functional.linear: copies values of one position "
                    "over a new axis (a broadcast or expand of a [.., 1, ..] axis), so one neuron would hold several "
                    "values at one datapoint position; apply the op before adding the axis, or add it with a Linear",
    }
    torch.manual_seed(14)
    refused(model[kind]().to(DTYPE), inputs[kind](), reasons[kind])


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(torch.tanh(h + self.g(h)))


def test_a_residual_sum_lives_in_the_fresh_affine_output():
    """The affine set that absorbs the residual keeps its kind (hidden) in the graph. Exact.
    Kills affine 139."""
    torch.manual_seed(15)
    exact(Residual().to(DTYPE), torch.randn(5, 3, dtype=DTYPE))


class MovedPositions(nn.Module):
    """Position embeddings read in another order than their indices (``pos(arange(T))[order]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

    def forward(self, ids):
        moved = self.positions(torch.arange(ids.shape[1]))[[4, 3, 2, 1, 0]]
        return self.out(torch.tanh(self.tokens(ids) + moved)).sum(1)


def test_position_rows_moved_before_they_join_the_tokens_are_kept_as_constants_with_a_guard():
    """``index_op``: the moved rows are not the indices read again, so the layout keeps them, guarded
    by the indices' values. Exact. (It kills no mutant: index_op 37, 38 and 41 break the guard so that
    it never holds, and a guard that never holds only makes every call trace afresh.)"""
    torch.manual_seed(16)
    exact(MovedPositions().to(DTYPE), token_ids())


class NeuronIndices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.table, self.out = nn.Linear(3, 4), nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.table((self.a(x) * 0).to(torch.long))).sum(1)


def test_embedding_indices_computed_from_neuron_values_are_refused():
    """``embedding``'s refusal of indices that are neuron values (a cast keeps their ids), in full.
    Kills embedding 45-50."""
    refused(NeuronIndices().to(DTYPE), torch.randn(5, 3, dtype=DTYPE),
            " (module 'table' of type Embedding): torch.nn.functional.embedding: embedding indices computed from "
            "neuron values")


class SharedPositionIds(nn.Module):
    """Position ids computed from the first token id (``(ids[:, :1] + arange(T)) % 5``: data indices that
    are no one-to-one image of the ids), joining the tokens in place or (``moved``) reversed first."""

    def __init__(self, moved: bool) -> None:
        super().__init__()
        self.moved = moved
        self.tokens, self.positions, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

    def forward(self, ids):
        positions = self.positions((ids[:, :1] + torch.arange(ids.shape[1])) % 5)
        if self.moved:
            positions = positions[:, [4, 3, 2, 1, 0]]
        return self.out(torch.tanh(self.tokens(ids) + positions)).sum(1)


def test_position_ids_computed_from_the_ids_convert_in_place_and_are_refused_once_moved():
    """``index_op`` with data indices: read again where they join the tokens (exact), and refused in
    full where their positions moved first (a later call's ids would give other rows there).
    Kills index_op 24-35."""
    torch.manual_seed(17)
    exact(SharedPositionIds(moved=False).to(DTYPE), token_ids())
    refused(SharedPositionIds(moved=True).to(DTYPE), token_ids(),
            ": embedding: its indices are computed from the input and their positions move before they join the "
            "token values; pass them in (e.g. position_ids) or compute them with elementwise ops on the ids")


# ------------------------------------------------------------------ issue 31, branch mut38: the last survivors
class OnePerRow(nn.Module):
    """A value whose features sit on another axis than the last, the last of width 1: the features of the
    first position, transposed (``a(x).transpose(1, 2)[..., :1]``, ``[b, 4, 1]``), or the tokens of a one-feature
    value mixed by a Linear and transposed back (``[b, T, 1]``, a neuron per token); then a ``Linear(1, 2)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "first position transposed":
            self.a = nn.Linear(3, 4)
        else:
            self.a, self.mix = nn.Linear(3, 1), nn.Linear(4, 4)
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        if self.kind == "first position transposed":
            return self.head(self.a(x).transpose(1, 2)[..., :1])
        return self.head(torch.tanh(self.mix(self.a(x).transpose(1, 2)).transpose(1, 2)))


@pytest.mark.parametrize("kind", ["first position transposed", "one-feature tokens mixed"])
def test_an_affine_map_over_a_last_axis_of_width_one_whose_rows_hold_other_neurons_is_refused(kind):
    """A Linear over a last axis of width 1 whose rows (along another axis) hold different neurons: the
    components cannot differ along an axis of width 1, only the rows do, and that alone is refused as an affine
    map over positions. Kills affine 69 (``and`` for ``or``: both had to differ; the map converted, and the
    conversion's own gradient check refused it, "the graph's gradient of 'head.weight' ... differs from
    autograd's")."""
    torch.manual_seed(0)
    refused(OnePerRow(kind).to(DTYPE), torch.randn(5, 4, 3, dtype=DTYPE),
            " (module 'head' of type Linear): torch.nn.functional.linear: applied to an axis that holds positions or "
            "datapoints, not features (e.g. a Linear over tokens, as in MLP-Mixer); gradgraph needs affine maps over "
            "the last, feature axis")


class OneIdEmbedded(nn.Module):
    """The token ids embedded, plus the embedding of one id (``ids[0, 0]``, a 0-d index)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 3), nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.emb(ids) + self.emb(ids[0, 0]))


def test_an_embedding_of_one_element_of_the_ids_is_refused_naming_the_embedding():
    """``emb(ids[0, 0])``: a 0-d index read off the input has no datapoint axis; refused, naming the embedding.
    Kills embedding 25 (the op name ``None`` handed to ``neurons_from_raw``: an ``AttributeError``)."""
    torch.manual_seed(0)
    refused(OneIdEmbedded().to(DTYPE), torch.randint(0, 10, (5, 4)),
            " (module 'emb' of type Embedding): torch.nn.functional.embedding: the input must have a datapoint axis")


# ---- issue 31, branch mut46: `affine`'s refusal of a value with no features (session 22, e7a06e8), whose only test
# (test_convert_plan_records_values.py) is outside the group's list


class ZeroWidthRead(nn.Module):
    """``nn.Linear(4, 0)`` read by ``nn.Linear(0, 2)`` (the second layer's output is its bias alone), or (``mixed``)
    the zero-width layer concatenated with a layer of width 3, which a ``Linear`` then reads (no refusal)."""

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.mixed = mixed
        self.empty, self.wide = nn.Linear(4, 0), nn.Linear(4, 3)
        self.head = nn.Linear(3 if mixed else 0, 2)

    def forward(self, x):
        if self.mixed:
            return self.head(torch.tanh(torch.cat([self.empty(x), self.wide(x)], -1)))
        return self.head(self.empty(x))


def zero_width(mixed: bool) -> ZeroWidthRead:
    import warnings

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on initialising a zero-element tensor
        return ZeroWidthRead(mixed).to(DTYPE)


def test_an_affine_map_of_a_value_with_no_features_is_refused_with_the_shape_and_the_remedy():
    """``nn.Linear(0, 2)`` reading the output of ``nn.Linear(4, 0)``: refused at the map, naming the module, the
    value's shape and what to do, matched in full after the location (it failed inside ``rows_along_last`` before
    session 22, reported as the user's model failing). Kills affine's mutants of that refusal: the width read off
    another axis or compared with another number, and the message's words and shape."""
    refused(zero_width(False), torch.randn(3, 4, dtype=DTYPE),
            " (module 'head' of type Linear): torch.nn.functional.linear: an affine map of a value with no features "
            "(shape [3, 0], a layer of width 0 before it): it has no neurons to read. Remove the layer of width 0, or "
            "give it a width of at least 1")


@pytest.mark.parametrize("width", [1, 2])
def test_affine_maps_of_one_or_two_features_and_a_layer_of_no_outputs_convert_exactly(width):
    """What the refusal above must let through: a ``Linear`` of one (or two) input features, and a layer of no
    outputs (``nn.Linear(4, 0)``: a weight ``[0, 4]``, whose ``out`` axis is empty, not its ``in`` axis)
    concatenated into a set a ``Linear`` reads. Both convert, per-sample gradients equal to torch.func's at 1e-10.
    Kills affine's mutants that refuse a width of one or read the empty axis from the output side."""
    torch.manual_seed(1)
    narrow = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(DTYPE)
    exact(narrow, torch.randn(5, 3, dtype=DTYPE))
    exact(zero_width(True), torch.randn(5, 4, dtype=DTYPE))
