"""The folded layout of recurrent nets (docs/recurrent.md, "The folded layout").

``to_graph`` folds each loop over time by default (``fold_time=True``): the state and every
gate are one neuron set over all steps, ``W_hh`` is one edge set from a previous-state copy
``P`` (tied to the state; act ``h_{t-1}`` at step ``t``'s component, the initial state at the
first) to the gates, ``W_ih`` one edge set from the input, and there is one component per
(datapoint, step). What is checked here, for ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (2 layers,
bidirectional, ``batch_first`` both ways), stacked ``nn.*Cell`` loops and an Elman loop written
with ``gradgraph.recurrent_step`` whose zero state is made in ``forward``:

* per-sample gradients and ``mean_grad()`` equal a per-datapoint autograd loop (float64,
  1e-10; torch.func's vmap cannot run the fused ops, so the loop is the reference);
* the shape: every weight is one edge set (edges of ``W_hh`` = its numel, not ``T`` times it),
  ``B = b · T`` components, nodes and edges independent of ``T``;
* a sampled element of the inferred group keeps the function and maps the graph to the
  permuted model's graph; GradMetaNet's outputs move with it;
* what the folded layout adds (a head on every step, pooling over time, a constant initial
  state) converts exactly, and a loop whose steps do not fold is unrolled, exactly.

On main before this file every graph here was unrolled (``W_hh`` had ``T - 1`` edge blocks,
nodes grew with ``T``), so every shape test fails there, and the head on every step and the
pooling over time were refused.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_same_graph
from test_convert_recurrent import (DTYPE, LOOP_CASES, STOCK_CASES, RandomRecurrent, assert_exact, check_group,
                                    inputs, recurrent_programs, squared_output)
from torch import nn

import gradgraph
from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus
from gradgraph.testing import assert_equivariant

CELLS = {"RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM}


class Stack(nn.Module):
    """A recurrent module (2 layers, bidirectional or not) read at its last step by a linear head;
    ``[b, T, 3]`` in, transposed for the module when it is not ``batch_first``."""

    def __init__(self, cell: str, bidirectional: bool, batch_first: bool, layers: int = 2, **options) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = CELLS[cell](3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                               **options)
        self.head = nn.Linear(4 * (2 if bidirectional else 1), 2)

    def forward(self, x):
        output = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head(output[:, -1] if self.batch_first else output[-1])


class Elman(nn.Module):
    """``h_t = tanh(W x_t + b + U h_{t-1} + c)``, ``h_0 = 0`` made in ``forward``; each step through
    ``gradgraph.recurrent_step`` (``folded=True``) or written inline (``False``)."""

    def __init__(self, folded: bool = True) -> None:
        super().__init__()
        self.folded = folded
        self.input_map, self.recurrent_map, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def step(self, h, x_t):
        return torch.tanh(self.input_map(x_t) + self.recurrent_map(h))

    def forward(self, x):
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = gradgraph.recurrent_step(self.step, h, x[:, t]) if self.folded else self.step(h, x[:, t])
        return self.head(h)


class StackedCells(nn.Module):
    """Two cells stepped together in one Python loop (the second reads the first's state)."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.kind = cell
        self.first, self.second = getattr(nn, cell + "Cell")(3, 4), getattr(nn, cell + "Cell")(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a = b = None
        for t in range(x.shape[1]):
            a = self.first(x[:, t], a)
            b = self.second(a[0] if self.kind == "LSTM" else a, b)
        return self.head(b[0] if self.kind == "LSTM" else b)


class Tagger(nn.Module):
    """A head on every step's output (sequence labelling) and a mean over time."""

    def __init__(self, cell: str = "GRU") -> None:
        super().__init__()
        self.rnn, self.head = CELLS[cell](3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        output = self.rnn(x)[0]
        return self.head(output).sum(1) + self.head(output.mean(1))


class BufferState(nn.Module):
    """A stock LSTM handed buffers as its initial state."""

    def __init__(self, h0: torch.Tensor, c0: torch.Tensor) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
        self.register_buffer("h0", h0.to(DTYPE))
        self.register_buffer("c0", c0.to(DTYPE))

    def forward(self, x):
        state = (self.h0.expand(-1, x.shape[0], -1).contiguous(), self.c0.expand(-1, x.shape[0], -1).contiguous())
        return self.head(self.rnn(x, state)[0][:, -1])


class RepeatedInput(nn.Module):
    """One vector fed at every step (``x[:, :1].expand``): every step is at the same component, so
    the loop cannot fold (two steps would write one neuron's value at one component)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x[:, :1].expand(-1, x.shape[1], -1))[0][:, -1])


class FirstStepDiffers(nn.Module):
    """A ``recurrent_step`` loop whose first step reads another sequence (``input_map(u_0)``, later
    ``input_map(v_t)``): the same sets, labels and weights at every step, other source neurons.
    ``u`` is also read whole (``aux``), so it has values at every step; folded, ``input_map``'s
    edges from ``u`` would collect the terms of every step, so the loop is unrolled (a source
    that lives at its own step only folds: ``test_a_cell_loop_with_a_projection_per_step...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_proj, self.proj = nn.Linear(3, 5), nn.Linear(3, 5)
        self.input_map = nn.Linear(5, 5)
        self.recurrent_map, self.head, self.aux = nn.Linear(5, 5), nn.Linear(5, 2), nn.Linear(5, 2)

    def step(self, h, x_t):
        entry = self.input_map(self.u[:, self.t] if self.t == 0 else self.v[:, self.t])
        return torch.tanh(entry + self.recurrent_map(h))

    def forward(self, x):
        self.u, self.v = torch.tanh(self.first_proj(x)), torch.tanh(self.proj(x))
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            self.t = t
            h = gradgraph.recurrent_step(self.step, h, x[:, t])
        return self.head(h) + self.aux(self.u).sum(1)


def edges_of(graph: gradgraph.GradGraph, name: str) -> int:
    """How many edges carry an entry of parameter ``name``."""
    return int((graph.edge_param == graph.param_names.index(name)).sum())


def assert_folded(model: nn.Module, graph: gradgraph.GradGraph, batch: int, steps: int) -> None:
    """Every recurrent weight (``W_ih``, ``W_hh``, ``W_hr``, a step's maps) one edge set, one
    component per (datapoint, step)."""
    assert graph.num_components == batch * steps
    for name, param in model.named_parameters():
        if name in graph.param_names and param.dim() == 2 and not name.startswith(("head.", "init.")):
            assert edges_of(graph, name) == param.numel(), name


# ------------------------------------------------------------------ the stock modules
STACKS = [(cell, bidirectional, batch_first) for cell in CELLS for bidirectional in (False, True)
          for batch_first in (True, False)]


@pytest.mark.parametrize("cell, bidirectional, batch_first", STACKS)
def test_stock_modules_fold_exactly_with_one_edge_set_per_weight(cell, bidirectional, batch_first):
    torch.manual_seed(11)
    model = Stack(cell, bidirectional, batch_first).to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=5))
    assert_folded(model, graph, 3, 5)
    # the size does not grow with the sequence: the same nodes and edges for T = 2 and T = 7
    short = gradgraph.to_graph(model, inputs(batch=3, steps=2), None, squared_output)
    long = gradgraph.to_graph(model, inputs(batch=3, steps=7), None, squared_output)
    assert (short.num_nodes, short.num_edges) == (long.num_nodes, long.num_edges) == (graph.num_nodes, graph.num_edges)
    # the unrolled layout of the same model: W_hh once per step after the first (its zero state)
    unrolled = assert_exact(model, inputs(batch=3, steps=5), fold_time=False)
    assert edges_of(unrolled, "rnn.weight_hh_l0") == 4 * model.rnn.weight_hh_l0.numel()
    # the cached plan's replay gives the same graph, and the two layouts keep their own plans
    assert_same_graph(gradgraph.to_graph(model, inputs(batch=3, steps=5), None, squared_output), graph, atol=1e-12)


@pytest.mark.parametrize("name", ["lstm-projections-2-layers-bidirectional", "gru-initial-state",
                                  "lstm-initial-state", "gru-batch-first-false-no-bias"])
def test_projections_given_states_and_no_bias_fold_exactly(name):
    torch.manual_seed(12)
    model = STOCK_CASES[name]().to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=4))
    assert_folded(model, graph, 3, 4)


@pytest.mark.parametrize("name", ["lstm-2-layers-bidirectional", "gru-2-layers-bidirectional",
                                  "rnn-relu-2-layers-bidirectional"])
def test_the_unrolled_layout_stays_exact(name):
    """``fold_time=False`` keeps the unrolled layout, for every stock configuration."""
    torch.manual_seed(13)
    model = STOCK_CASES[name]().to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=4), fold_time=False)
    assert edges_of(graph, "rnn.weight_hh_l0") == 3 * model.rnn.weight_hh_l0.numel()


@pytest.mark.parametrize("name", [*STOCK_CASES, *(name for name in LOOP_CASES if "cell" in name)])
def test_no_configuration_of_the_stock_modules_and_cells_falls_back_to_unrolled(name):
    """A fresh trace of every configuration of ``test_convert_recurrent.py`` folds: no warning
    that a loop was converted unrolled (an LSTM cell's given ``(h, sigmoid(h))`` did not fold
    before the previous-state read stopped splitting its state)."""
    torch.manual_seed(24)
    model = {**STOCK_CASES, **LOOP_CASES}[name]().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        graph = gradgraph.to_graph(model, inputs(batch=3, steps=4), None, squared_output)
    assert_folded(model, graph, 3, 4)


# ------------------------------------------------------------------ loops written by hand
def test_an_elman_loop_with_recurrent_step_folds_exactly():
    torch.manual_seed(14)
    model = Elman().to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=6))
    assert_folded(model, graph, 3, 6)
    # input 3, previous state 5, W x 5, U h 5 (the state), head 2
    assert graph.num_nodes == 20
    assert_same_graph(gradgraph.to_graph(model, inputs(batch=3, steps=6), None, squared_output), graph, atol=1e-12)


def test_an_elman_loop_without_recurrent_step_stays_unrolled_and_exact():
    """A plain Python loop is not recognised as one: it converts exactly, one block per step."""
    torch.manual_seed(14)
    model = Elman(folded=False).to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=6))
    assert edges_of(graph, "recurrent_map.weight") == 5 * model.recurrent_map.weight.numel()


class LambdaStep(nn.Module):
    """``recurrent_step`` with a lambda written in the loop's body: a new function object at every
    step (one code object), still one loop."""

    def __init__(self) -> None:
        super().__init__()
        self.input_map, self.recurrent_map, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = gradgraph.recurrent_step(lambda h, x_t: torch.tanh(self.input_map(x_t) + self.recurrent_map(h)),
                                         h, x[:, t])
        return self.head(h)


def test_a_lambda_step_written_in_the_loop_folds_exactly():
    torch.manual_seed(25)
    model = LambdaStep().to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=5))
    assert_folded(model, graph, 3, 5)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_stacked_cell_loops_fold_exactly(cell):
    """The calls of one ``nn.*Cell``, each on the state the call before returned, are one loop;
    two cells stepped together are two loops open at once."""
    torch.manual_seed(15)
    model = StackedCells(cell).to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=5))
    assert_folded(model, graph, 3, 5)


class CustomStep(nn.Module):
    """Hand-written cells stepped with ``recurrent_step``, every step's state read by a head:
    a layer norm in the step, a residual state, a gated (GRU-like) state, an MLP on the input,
    a tuple state ``(h, c)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.input_map, self.recurrent_map = nn.Linear(3, 5), nn.Linear(5, 5)
        self.gate_input, self.gate_recurrent = nn.Linear(3, 5), nn.Linear(5, 5, bias=False)
        self.norm, self.pre, self.head = nn.LayerNorm(5), nn.Linear(3, 3), nn.Linear(5, 2)

    def step(self, h, x_t):
        if self.kind == "tuple":
            h, c = h
            c = torch.tanh(self.input_map(x_t) + self.recurrent_map(h)) + c
            return torch.tanh(c) * torch.sigmoid(self.gate_input(x_t)), c
        if self.kind == "mlp-input":
            x_t = torch.relu(self.pre(x_t))
        candidate = torch.tanh(self.input_map(x_t) + self.recurrent_map(h))
        if self.kind == "norm":
            return self.norm(candidate)
        if self.kind == "residual":
            return h + candidate
        if self.kind == "gated":
            z = torch.sigmoid(self.gate_input(x_t) + self.gate_recurrent(h))
            return z * h + (1 - z) * candidate
        return candidate

    def forward(self, x):
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        state = (h, torch.zeros_like(h)) if self.kind == "tuple" else h
        outputs = []
        for t in range(x.shape[1]):
            state = gradgraph.recurrent_step(self.step, state, x[:, t])
            outputs.append(state[0] if self.kind == "tuple" else state)
        return self.head(torch.stack(outputs, 1)).sum(1)


@pytest.mark.parametrize("kind", ["norm", "residual", "gated", "mlp-input", "tuple"])
def test_hand_written_cells_fold_exactly_with_their_group(kind):
    torch.manual_seed(22)
    model = CustomStep(kind).to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=4))
    assert edges_of(graph, "recurrent_map.weight") == 25  # one edge set
    check_group(model, inputs(batch=3, steps=4), seed=4)


class ProjectedCellLoop(nn.Module):
    """A cell loop whose input is projected at every step inside the loop (``cell(embed(x_t), h)``):
    the projection is a new neuron set per step (outside the loop's steps), so ``W_ih`` reads
    other neurons at every step; each lives at its own step only, so the loop still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.cell, self.head = nn.Linear(3, 4), nn.LSTMCell(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(torch.tanh(self.embed(x[:, t])), state)
        return self.head(state[0])


def test_a_cell_loop_with_a_projection_per_step_folds_exactly():
    torch.manual_seed(23)
    model = ProjectedCellLoop().to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=4))
    assert edges_of(graph, "cell.weight_hh") == model.cell.weight_hh.numel()
    assert edges_of(graph, "cell.weight_ih") == 4 * model.cell.weight_ih.numel()  # one block per source set
    check_group(model, inputs(batch=3, steps=4), seed=5)


# ------------------------------------------------------------------ what folding adds
@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_a_head_on_every_step_and_pooling_over_time_convert_folded(cell):
    """Refused unrolled (each step its own neuron set); folded, the output sequence is one set of
    features over positions, as tokens are."""
    torch.manual_seed(16)
    model = Tagger(cell).to(DTYPE).eval()
    graph = assert_exact(model, inputs(batch=3, steps=4))
    assert graph.num_components == 3 * (4 + 2)  # the steps, and a key per pooling (the sum, the mean)
    check_group(model, inputs(batch=3, steps=4), seed=2)


def test_a_constant_initial_state_is_the_act_of_the_first_step():
    """A buffer as the initial state (refused unrolled): the previous-state copy holds it at the
    first step, so ``W_hh``'s first-step term ``δ_0 ⊗ h_0`` is exact; a replay reads the buffer's
    new values; a buffer whose values differ between units fixes the units (the group stays true)."""
    torch.manual_seed(17)
    model = BufferState(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)).to(DTYPE).eval()
    assert_exact(model, inputs(batch=3, steps=4))
    with torch.no_grad():
        model.h0.fill_(0.5)
        model.c0.fill_(-0.25)
    graph = assert_exact(model, inputs(batch=3, steps=4))  # the cached plan, new act values
    check_group(model, inputs(batch=3, steps=4), seed=3)
    with torch.no_grad():
        model.h0.copy_(torch.randn(1, 1, 4, dtype=DTYPE))
    graph = assert_exact(model, inputs(batch=3, steps=4))
    check_group(model, inputs(batch=3, steps=4), seed=3)
    first = graph.param_names.index("rnn.weight_hh_l0")
    hidden = graph.edge_index[1][graph.edge_param == first].unique()
    assert bool((graph.perm_group[hidden] < 0).all())  # the units the buffer tells apart are fixed


# ------------------------------------------------------------------ loops that do not fold
@pytest.mark.parametrize("make, block", [(RepeatedInput, "rnn.weight_hh_l0"),
                                         (FirstStepDiffers, "recurrent_map.weight")])
def test_a_loop_whose_steps_do_not_fold_is_unrolled_exactly(make, block):
    """Folded, the repeated input would put every step at one component (each step's value
    overwriting the last) and the first step's own weight would get every step's term: both
    silently wrong. The trace notices and unrolls the loop."""
    torch.manual_seed(18)
    model = make().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()  # a fresh trace: it says that the loop did not fold
    with pytest.warns(UserWarning, match="does not fold over time"):
        graph = assert_exact(model, inputs(batch=3, steps=4))
    weight = dict(model.named_parameters())[block]
    assert edges_of(graph, block) > weight.numel()  # one block per step: unrolled


# ------------------------------------------------------------------ the group and GradMetaNet
@pytest.mark.parametrize("make", [lambda: Stack("LSTM", True, True), lambda: Stack("GRU", True, False),
                                  lambda: Stack("RNN", False, True), lambda: Elman(), lambda: StackedCells("LSTM")])
def test_the_group_of_a_folded_graph_keeps_the_function_and_maps_graph_to_graph(make):
    torch.manual_seed(19)
    model = make().to(DTYPE).eval()
    moved = 0
    for seed in range(3):
        graph, perm, _ = check_group(model, inputs(1, batch=3, steps=4), seed)
        moved = max(moved, int((perm != torch.arange(graph.num_nodes)).sum()))
    assert moved > 0


@pytest.mark.parametrize("make", [lambda: Stack("LSTM", True, True), lambda: Stack("GRU", False, False),
                                  lambda: Elman()])
def test_gradmetanet_outputs_move_with_the_group_on_folded_graphs(make):
    torch.manual_seed(20)
    model = make().to(DTYPE).eval()
    graph = gradgraph.to_graph(model, inputs(3, batch=2, steps=3), None, squared_output)
    assert graph.num_components == 2 * 3
    metanet = GradMetaNet(8, num_component_layers=1, num_node_layers=1, edge_out_channels=2, node_out_channels=1,
                          graph_out_channels=1).to(DTYPE)
    assert_equivariant(metanet, [graph])
    plusplus = GradMetaNetPlusPlus(6, num_layers=1, heads=2, graph_out_channels=1, component_out_channels=1).to(DTYPE)
    assert_equivariant(plusplus, [graph])


# ------------------------------------------------------------------ plans
@pytest.mark.parametrize("make", [lambda: Stack("LSTM", True, False), lambda: Elman(), lambda: StackedCells("GRU"),
                                  lambda: BufferState(torch.zeros(1, 1, 4), torch.ones(1, 1, 4))])
def test_a_folded_plan_is_replayed_not_traced_again(make, monkeypatch):
    """The replay of a folded plan runs the same ops as its trace (the tracer's bookkeeping at the
    step events is no op of the forward), so a second conversion does not trace."""
    import gradgraph.convert.traced as traced

    torch.manual_seed(21)
    model = make().to(DTYPE).eval()
    first = gradgraph.to_graph(model, inputs(batch=3, steps=4), None, squared_output)
    traces = []
    original = traced.trace_model
    monkeypatch.setattr(traced, "trace_model", lambda *args, **kwargs: traces.append(1) or original(*args, **kwargs))
    again = gradgraph.to_graph(model, inputs(batch=3, steps=4), None, squared_output)
    assert not traces
    assert_same_graph(again, first, atol=1e-12)


# ------------------------------------------------------------------ random stacks
@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 12)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(recurrent_programs())
def test_every_random_recurrent_stack_folds(program):
    """The random stacks of ``test_convert_recurrent.py`` (which checks them exact with their
    group) all fold: none falls back to the unrolled layout."""
    blocks, read, seed, steps = program
    torch.manual_seed(seed)
    model = RandomRecurrent(blocks, read).to(DTYPE).eval()
    graph = gradgraph.to_graph(model, inputs(seed, batch=3, steps=steps), None, squared_output)
    assert graph.num_components == 3 * steps
    for name, param in model.named_parameters():
        if "weight_hh" in name or "weight_hr" in name:
            assert edges_of(graph, name) == param.numel(), name


class RandomLoops(nn.Module):
    """A stack of loops written by hand, drawn by hypothesis: each block is an ``nn.*Cell``
    stepped in a Python loop or a :class:`CustomStep`-style cell through ``recurrent_step``,
    reading the previous block's output sequence; read out at the last step, as the mean over
    time, or by a head on every step."""

    def __init__(self, blocks: list[tuple[str, str]], read: str) -> None:
        super().__init__()
        self.blocks, self.read = blocks, read
        self.cells = nn.ModuleList()
        width = 3
        for family, kind in blocks:
            if family == "cell":
                self.cells.append(getattr(nn, kind + "Cell")(width, 4))
            else:
                cell = CustomStep(kind)
                if width != 3:  # the custom cells read 3 features
                    cell.adapt = nn.Linear(width, 3)
                self.cells.append(cell)
            width = 4 if family == "cell" else 5
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        sequence = x
        for (family, kind), cell in zip(self.blocks, self.cells):
            outputs, state = [], None
            if family == "step":
                zeros = torch.zeros(x.shape[0], 5, dtype=x.dtype)
                state = (zeros, zeros) if kind == "tuple" else zeros
            for t in range(sequence.shape[1]):
                x_t = sequence[:, t]
                if family == "cell":
                    state = cell(x_t, state)
                    outputs.append(state[0] if kind == "LSTM" else state)
                else:
                    x_t = cell.adapt(x_t) if hasattr(cell, "adapt") else x_t
                    state = gradgraph.recurrent_step(cell.step, state, x_t)
                    outputs.append(state[0] if kind == "tuple" else state)
            sequence = torch.stack(outputs, 1)
        if self.read == "last":
            return self.head(sequence[:, -1])
        if self.read == "mean":
            return self.head(sequence.mean(1))
        return self.head(sequence).sum(1)


@st.composite
def loop_programs(draw):
    blocks = [draw(st.one_of(st.tuples(st.just("cell"), st.sampled_from(sorted(CELLS))),
                             st.tuples(st.just("step"), st.sampled_from(["plain", "norm", "residual", "gated",
                                                                          "mlp-input", "tuple"]))))
              for _ in range(draw(st.integers(1, 2)))]
    return blocks, draw(st.sampled_from(["last", "mean", "every step"])), draw(st.integers(0, 2**16)), \
        draw(st.integers(1, 4))


@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 12)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(loop_programs())
def test_a_random_stack_of_hand_written_loops_folds_exactly_with_its_group(program):
    """Every such stack converts exactly, folded (each recurrent weight one edge set), and a
    sampled element of its group keeps the function and maps graph to graph."""
    blocks, read, seed, steps = program
    torch.manual_seed(seed)
    model = RandomLoops(blocks, read).to(DTYPE).eval()
    batch = inputs(seed, batch=3, steps=steps)
    graph = assert_exact(model, batch)
    for name, param in model.named_parameters():
        if name in graph.param_names and ("weight_hh" in name or "recurrent_map.weight" in name):
            assert edges_of(graph, name) == param.numel(), name
    check_group(model, batch, seed)
