"""Recurrent nets convert exactly: ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``, their cells, hand-written loops.

The stock modules run a fused op (``torch.lstm`` …) that the trace runs as its per-step
loop (``convert/trace/recurrent.py``); a hand-written Elman loop whose initial state is
``torch.zeros(...)`` made inside ``forward`` reads the zero state as a constant. For each
model: per-sample gradients equal a per-datapoint autograd loop (float64, 1e-10; torch.func's
vmap cannot run the fused ops); ``mean_grad()`` is their mean; a sampled element of the
inferred group keeps the function, maps the graph to the transformed model's graph and moves
hidden units as torch's equations allow (rows of every gate block of ``W_ih``, rows and
columns of ``W_hh``, the biases); GradMetaNet's outputs move with it.

On main before this file, every stock module here was refused (``torch.lstm: this op uses
the parameter ... no rule``) and the Elman loop with a zero state was refused (``its input is
not computed from the model input``), so every exactness test fails there.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_same_graph
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from gradgraph.nn import GradMetaNet
from gradgraph.symmetry import permute_model, permute_nodes, random_node_permutation
from gradgraph.testing import assert_equivariant

DTYPE = torch.float64
CELLS = {"RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM}


def squared_output(output, _targets):
    return output.pow(2).sum(1)


def loop_per_sample_grads(model: nn.Module, inputs: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    """``{name: [b, *shape]}``: each datapoint's gradient by its own forward and backward."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in model.named_parameters()}
    for index in range(inputs.shape[0]):
        model.zero_grad()
        loss_fn(model(inputs[index:index + 1]), None).sum().backward()
        for name, param in model.named_parameters():
            grads[name].append(torch.zeros_like(param) if param.grad is None else param.grad.clone())
    model.zero_grad()
    return {name: torch.stack(values) for name, values in grads.items()}


def assert_exact(model: nn.Module, inputs: torch.Tensor, loss_fn=squared_output, **options) -> gradgraph.GradGraph:
    """Per-sample gradients and ``mean_grad()`` equal the loop's; a parameter the graph leaves out
    must have no gradient (``W_hh`` of a one-step sequence from a zero state only meets zeros;
    the converter omits what the loss does not reach, as for any unused parameter). ``options``
    go to ``to_graph`` (``fold_time``)."""
    graph = gradgraph.to_graph(model, inputs, None, loss_fn, **options)
    ours, reference = graph.per_sample_grads(), loop_per_sample_grads(model, inputs, loss_fn)
    assert set(ours) <= set(reference)
    for name in set(reference) - set(ours):
        assert not bool(reference[name].any()), name
    reference = {name: reference[name] for name in ours}
    mean = graph.mean_grad()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(mean[name], value.mean(0), atol=1e-10, rtol=0, msg=name)
    return graph


def check_group(model: nn.Module, inputs: torch.Tensor, seed: int, loss_fn=squared_output):
    """A sampled group element keeps the function and maps graph to graph; returns it and the
    transformed model."""
    graph = gradgraph.to_graph(model, inputs, None, loss_fn)
    perm = random_node_permutation(graph, torch.Generator().manual_seed(seed))
    permuted = permute_model(model, graph, perm)
    with torch.no_grad():
        torch.testing.assert_close(permuted(inputs), model(inputs), atol=1e-10, rtol=0)
    assert_same_graph(gradgraph.to_graph(permuted, inputs, None, loss_fn), permute_nodes(graph, perm), atol=1e-10)
    return graph, perm, permuted


class Classifier(nn.Module):
    """A recurrent encoder read at its last step, then a linear head; the model takes
    ``[b, T, features]`` and hands the recurrent module ``[T, b, features]`` when
    ``batch_first`` is False."""

    def __init__(self, cell: str, batch_first: bool = True, hidden: int = 4, **options) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = CELLS[cell](3, hidden, batch_first=batch_first, **options)
        width = options.get("proj_size") or hidden
        self.head = nn.Linear(width * (2 if options.get("bidirectional") else 1), 2)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        output = self.rnn(x)[0]
        return self.head(output[:, -1] if self.batch_first else output[-1])


class WithInitialState(nn.Module):
    """The initial state (and cell state) computed from the input: ``h0 = tanh(A x_0)``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.cell = cell
        self.init = nn.Linear(3, 4)
        self.rnn = CELLS[cell](3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0).expand(2, -1, -1)
        if self.cell == "LSTM":
            hx = (h0, torch.sigmoid(self.init(x[:, 1])).unsqueeze(0).expand(2, -1, -1))
        else:
            hx = h0
        _, state = self.rnn(x, hx)
        h_n = state[0] if self.cell == "LSTM" else state
        return self.head(h_n[-1])


class Elman(nn.Module):
    """``h_t = tanh(W x_t + b + U h_{t-1} (+ c))`` written as a Python loop, ``h_0 = 0`` made in forward."""

    def __init__(self, recurrent_bias: bool = True, zeros: str = "zeros") -> None:
        super().__init__()
        self.zeros = zeros
        self.input_map = nn.Linear(3, 5)
        self.recurrent_map = nn.Linear(5, 5, bias=recurrent_bias)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        if self.zeros == "zeros":
            h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        else:  # zeros_like of the data: its values do not depend on the data's
            h = torch.zeros_like(x[:, 0, :1]).expand(-1, 5)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.recurrent_map(h))
        return self.head(h)


class CellLoop(nn.Module):
    """``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell`` stepped in a Python loop; the state starts
    as the cell's own zeros (``None``) or is computed from the first input."""

    def __init__(self, cell: str, given_state: bool) -> None:
        super().__init__()
        self.kind = cell
        self.cell = getattr(nn, cell + "Cell")(3, 4)
        self.init = nn.Linear(3, 4) if given_state else None
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        state = None
        if self.init is not None:
            h = torch.tanh(self.init(x[:, 0]))
            state = (h, torch.sigmoid(h)) if self.kind == "LSTM" else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.kind == "LSTM" else state)


STOCK_CASES = {
    "rnn-batch-first-false": lambda: Classifier("RNN", batch_first=False),
    "rnn-relu-2-layers-bidirectional": lambda: Classifier("RNN", nonlinearity="relu", num_layers=2,
                                                          bidirectional=True),
    "gru-2-layers-bidirectional": lambda: Classifier("GRU", num_layers=2, bidirectional=True),
    "gru-batch-first-false-no-bias": lambda: Classifier("GRU", batch_first=False, bias=False, num_layers=2),
    "lstm-2-layers-bidirectional": lambda: Classifier("LSTM", num_layers=2, bidirectional=True),
    "lstm-batch-first-false-no-bias": lambda: Classifier("LSTM", batch_first=False, bias=False,
                                                         bidirectional=True),
    "lstm-projections-2-layers-bidirectional": lambda: Classifier("LSTM", num_layers=2, bidirectional=True,
                                                                  proj_size=2),
    "gru-initial-state": lambda: WithInitialState("GRU"),
    "lstm-initial-state": lambda: WithInitialState("LSTM"),
    "rnn-initial-state": lambda: WithInitialState("RNN"),
}
LOOP_CASES = {
    "elman-zeros": lambda: Elman(),
    "elman-zeros-no-recurrent-bias": lambda: Elman(recurrent_bias=False),
    "elman-zeros-like": lambda: Elman(zeros="zeros_like"),
    **{f"{cell.lower()}-cell-loop{'-given-state' if given else ''}":
       (lambda cell=cell, given=given: CellLoop(cell, given)) for cell in CELLS for given in (False, True)},
}


def inputs(seed: int = 0, batch: int = 3, steps: int = 4) -> torch.Tensor:
    return torch.randn(batch, steps, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [*STOCK_CASES, *LOOP_CASES])
def test_recurrent_models_convert_exactly(name):
    torch.manual_seed(3)
    model = {**STOCK_CASES, **LOOP_CASES}[name]().to(DTYPE).eval()
    graph = assert_exact(model, inputs())
    assert graph.num_datapoints == 3
    # the cached plan's replay gives the same graph
    assert_same_graph(gradgraph.to_graph(model, inputs(), None, squared_output), graph, atol=1e-12)


@pytest.mark.parametrize("name", ["rnn-batch-first-false", "gru-2-layers-bidirectional", "lstm-2-layers-bidirectional",
                                  "lstm-initial-state", "lstm-projections-2-layers-bidirectional",
                                  "elman-zeros", "gru-cell-loop", "lstm-cell-loop-given-state"])
def test_the_inferred_group_keeps_the_function_and_maps_graph_to_graph(name):
    torch.manual_seed(4)
    model = {**STOCK_CASES, **LOOP_CASES}[name]().to(DTYPE).eval()
    moved = 0
    for seed in range(3):
        graph, perm, _ = check_group(model, inputs(1), seed)
        moved = max(moved, int((perm != torch.arange(graph.num_nodes)).sum()))
    assert moved > 0


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_a_group_element_permutes_hidden_units_of_every_gate_block_and_both_sides_of_w_hh(cell):
    """The element sampled on the graph, read back on the weights: one permutation ``p`` of the
    hidden units of each layer and direction moves the rows of every gate block of ``W_ih`` and
    ``W_hh``, the columns of ``W_hh``, the biases, and the next layer's input columns."""
    torch.manual_seed(5)
    model = Classifier(cell, num_layers=2, bidirectional=True).to(DTYPE).eval()
    hidden, gates = 4, 3 if cell == "GRU" else 4
    _, _, permuted = check_group(model, inputs(2), seed=1)
    before, after = dict(model.rnn.named_parameters()), dict(permuted.rnn.named_parameters())
    perms = {}
    for layer in range(2):
        for suffix in ("", "_reverse"):
            key = f"_l{layer}{suffix}"
            old_rows, new_rows = before["weight_hh" + key][:hidden], after["weight_hh" + key][:hidden]
            # p: where each new row of the first gate block came from, as a set (rows are distinct
            # almost surely); then the columns must follow the same p
            p = (new_rows.sort(1).values[:, None] == old_rows.sort(1).values[None]).all(-1).float().argmax(1)
            assert sorted(p.tolist()) == list(range(hidden))
            rows = torch.cat([block * hidden + p for block in range(gates)])
            torch.testing.assert_close(after["weight_hh" + key], before["weight_hh" + key][rows][:, p], atol=0, rtol=0)
            for name in ("bias_ih", "bias_hh"):
                torch.testing.assert_close(after[name + key], before[name + key][rows], atol=0, rtol=0)
            perms[key] = (p, rows)
    # layer 1 reads [forward, reverse] outputs of layer 0: its input columns move with both
    p_forward, p_reverse = perms["_l0"][0], perms["_l0_reverse"][0]
    columns = torch.cat([p_forward, hidden + p_reverse])
    for suffix in ("", "_reverse"):
        rows = perms[f"_l1{suffix}"][1]
        torch.testing.assert_close(after[f"weight_ih_l1{suffix}"], before[f"weight_ih_l1{suffix}"][rows][:, columns],
                                   atol=0, rtol=0)
    assert any(not torch.equal(p, torch.arange(hidden)) for p, _ in perms.values())


@pytest.mark.parametrize("name", ["gru-2-layers-bidirectional", "lstm-batch-first-false-no-bias", "elman-zeros"])
def test_gradmetanet_outputs_move_with_the_inferred_group(name):
    torch.manual_seed(6)
    model = {**STOCK_CASES, **LOOP_CASES}[name]().to(DTYPE).eval()
    graph = gradgraph.to_graph(model, inputs(3, batch=2, steps=3), None, squared_output)
    metanet = GradMetaNet(8, num_component_layers=1, num_node_layers=1, edge_out_channels=2, node_out_channels=1,
                          graph_out_channels=1).to(DTYPE)
    assert_equivariant(metanet, [graph])


class ZeroStateBuffer(nn.Module):
    """An Elman loop whose initial state is a buffer: zero at the first conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.input_map, self.recurrent_map, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("h0", torch.zeros(1, 4, dtype=DTYPE))

    def forward(self, x):
        h = self.h0.expand(x.shape[0], -1)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.recurrent_map(h))
        return self.head(h)


class GRUStateBuffer(nn.Module):
    """A stock GRU handed a buffer as its initial state: zero at the first conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)
        self.register_buffer("h0", torch.zeros(1, 1, 4, dtype=DTYPE))

    def forward(self, x):
        return self.head(self.rnn(x, self.h0.expand(-1, x.shape[0], -1).contiguous())[0][:, -1])


@pytest.mark.parametrize("make, refused", [(ZeroStateBuffer, "recurrent_map"), (GRUStateBuffer, "rnn")])
def test_a_zero_state_read_as_its_bias_is_a_value_guard_of_the_cached_plan(make, refused):
    """The plan that reads ``U · 0 + c`` as ``c`` must not be replayed once the state is no longer
    zero: the replay traces afresh and refuses the nonzero constant (its ``U`` gradient needs the
    state as a neuron value). Without the guard the replay reused the plan and every ``U``
    gradient from the first step was silently dropped. The stock modules' decomposition skips
    the zero state's term, so there the replay's ops differ and the fingerprints catch it.

    This is the unrolled layout's behaviour: the stock module runs unrolled with
    ``fold_time=False`` (the hand-written loop always is). Folded, a constant state is the
    previous-state copy's act at the first step and converts exactly
    (``test_convert_recurrent_folded.py``)."""
    torch.manual_seed(7)
    model = make().to(DTYPE).eval()
    assert_exact(model, inputs(), fold_time=False)
    with torch.no_grad():
        model.h0.fill_(0.5)
    with pytest.raises(UnsupportedOperationError, match=f"module '{refused}'"):
        gradgraph.to_graph(model, inputs(), None, squared_output, fold_time=False)


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        _, (h_n, _) = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
        return self.head(h_n[-1])


class MeanOverTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


class Tagger(nn.Module):  # a head on every step's output (sequence labelling)
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).sum(1)


@pytest.mark.parametrize("make, match", [
    (PackedLSTM, r"_pack_padded_sequence.*module 'rnn'"),
    (lambda: Classifier("GRU", num_layers=2, dropout=0.5).train(), r"module 'rnn' of type GRU.*active dropout"),
    (MeanOverTime, r"Tensor\.mean.*reduction over features and positions"),
    (Tagger, r"module 'head' of type Linear.*holds positions"),
])
def test_what_is_not_supported_is_refused_by_module_path(make, match):
    """Packed sequences, training dropout between layers, and, in the unrolled layout
    (``fold_time=False``: one neuron set per step, docs/recurrent.md), anything that reads all
    steps' outputs as one tensor of features: pooling over time, a head applied to every step.
    (Folded, the default, the last two convert exactly: ``test_convert_recurrent_folded.py``.)"""
    model = make().to(DTYPE)
    with pytest.raises(UnsupportedOperationError, match=match):
        gradgraph.to_graph(model, inputs(), None, squared_output, fold_time=False)


# ------------------------------------------------------------------ random recurrent programs
class RandomRecurrent(nn.Module):
    """A stack of recurrent modules drawn by hypothesis, each reading the previous one's output
    sequence; its state starts at zero or is computed from the first input; read at a step
    (the last, the first) or through its final state ``h_n``."""

    def __init__(self, blocks: list[dict], read: str) -> None:
        super().__init__()
        self.blocks, self.read = blocks, read
        self.rnns, self.inits = nn.ModuleList(), nn.ModuleList()
        width = 3
        for block in blocks:
            options = {key: block[key] for key in ("num_layers", "bidirectional", "bias", "batch_first")}
            if block["cell"] == "LSTM" and block["proj"]:
                options["proj_size"] = 1
            if block["cell"] == "RNN":
                options["nonlinearity"] = block["nonlinearity"]
            rnn = CELLS[block["cell"]](width, block["hidden"], **options)
            self.rnns.append(rnn)
            out = options.get("proj_size") or block["hidden"]
            self.inits.append(nn.Linear(3, out) if block["given_state"] else nn.Identity())
            width = out * (2 if block["bidirectional"] else 1)
        self.head = nn.Linear(width if read != "h_n" else (self.rnns[-1].proj_size or blocks[-1]["hidden"]), 2)

    def forward(self, x):
        sequence = x
        for block, rnn, init in zip(self.blocks, self.rnns, self.inits):
            state = None
            if block["given_state"]:
                stacks = block["num_layers"] * (2 if block["bidirectional"] else 1)
                h0 = torch.tanh(init(x[:, 0])).unsqueeze(0).expand(stacks, -1, -1).contiguous()
                state = (h0, torch.zeros(stacks, x.shape[0], block["hidden"], dtype=x.dtype)) \
                    if block["cell"] == "LSTM" else h0
            inputs = sequence if block["batch_first"] else sequence.transpose(0, 1)
            output, final = rnn(inputs, state)
            sequence = output if block["batch_first"] else output.transpose(0, 1)
        if self.read == "h_n":
            return self.head((final[0] if isinstance(final, tuple) else final)[-1])
        return self.head(sequence[:, -1 if self.read == "last" else 0])


@st.composite
def recurrent_programs(draw):
    blocks = [{
        "cell": draw(st.sampled_from(sorted(CELLS))), "hidden": draw(st.integers(2, 4)),
        "num_layers": draw(st.integers(1, 2)), "bidirectional": draw(st.booleans()), "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()), "proj": draw(st.booleans()), "given_state": draw(st.booleans()),
        "nonlinearity": draw(st.sampled_from(["tanh", "relu"])),
    } for _ in range(draw(st.integers(1, 2)))]
    return blocks, draw(st.sampled_from(["last", "first", "h_n"])), draw(st.integers(0, 2**16)), \
        draw(st.integers(1, 4))


@settings(max_examples=int(os.environ.get("GRADGRAPH_FUZZ_EXAMPLES", 12)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(recurrent_programs())
def test_a_random_recurrent_program_converts_exactly_with_its_group(program):
    """Every combination of cell, layers, directions, bias, ``batch_first``, projections, a given
    or zero state, stacking and read-out converts (none of these is refused) exactly, and a
    sampled element of its group keeps the function and maps graph to graph."""
    blocks, read, seed, steps = program
    torch.manual_seed(seed)
    model = RandomRecurrent(blocks, read).to(DTYPE).eval()
    batch = inputs(seed, batch=3, steps=steps)
    assert_exact(model, batch)
    check_group(model, batch, seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["lstm-2-layers-bidirectional", "gru-initial-state", "elman-zeros"])
def test_recurrent_conversion_on_cuda_equals_cpu(name):
    """On CUDA the stock modules would run cuDNN's fused kernel; the decomposition runs instead."""
    torch.manual_seed(8)
    model = {**STOCK_CASES, **LOOP_CASES}[name]().to(DTYPE).eval()
    on_cpu = gradgraph.to_graph(model, inputs(), None, squared_output)
    on_cuda = gradgraph.to_graph(model.cuda(), inputs().cuda(), None, squared_output)
    for key in on_cpu.keys():
        value = on_cuda[key]
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cuda", key
            torch.testing.assert_close(value.cpu(), on_cpu[key], atol=1e-10, rtol=0, msg=key)
