"""Per-function checks of ``convert/trace/run.py`` and ``convert/trace/meta.py`` (issue 31, group ``convert-run``).

Written for mutmut's runs over the two files (docs/mutation.md): each test is float64 against an independent truth
(torch.func through ``tests/traced_models.py``'s helpers, or a per-datapoint autograd loop, at 1e-10), or checks a
refusal's or a warning's message in full where a user reads it, and names in its docstring the mutants it kills
(``f N``: mutant ``N`` of function ``f``, checked with ``MUTANT_UNDER_TEST``). The first tests reach, cheaply, what
only the costly files of ``tests/convert`` reached (coverage.py per test): PyG's GAT run as gradgraph's form, the
recurrent loops that do not fold, a causal ``nn.MultiheadAttention`` without a mask.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from convert_values import exact, squared

DTYPE = torch.float64


def _matches_loop(model: nn.Module, inputs: torch.Tensor, axis: int = 0, **options) -> gradgraph.GradGraph:
    """``to_graph(model, inputs, None, squared)``'s per-sample gradients against a backward pass of each
    datapoint alone (``inputs.narrow(axis, i, 1)``), float64 at 1e-10, for every parameter."""
    graph = gradgraph.to_graph(model, inputs, None, squared, **options)
    ours = graph.per_sample_grads()
    for i in range(inputs.shape[axis]):
        model.zero_grad()
        squared(model(inputs.narrow(axis, i, 1)), None).sum().backward()
        for name, param in model.named_parameters():
            truth = param.grad if param.grad is not None else torch.zeros_like(param)
            got = ours[name][i] if name in ours else torch.zeros_like(param)
            torch.testing.assert_close(got, truth, atol=1e-10, rtol=0, msg=f"{name}, datapoint {i}")
    return graph


def _sequences(batch: int = 3, steps: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, steps, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- PyG's GAT (_ModuleTracker._patch_gat)
class GatModel(nn.Module):
    """A GATConv (two heads) and a GATv2Conv between linear maps, mean-pooled per graph."""

    def __init__(self) -> None:
        super().__init__()
        pyg = pytest.importorskip("torch_geometric.nn")
        self.pool = pyg.global_mean_pool
        self.conv1, self.conv2 = pyg.GATConv(3, 4, heads=2), pyg.GATv2Conv(8, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x, edge_index, batch):
        h = torch.tanh(self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index))
        return self.head(self.pool(h, batch))


def _graph_batch(seed: int):
    from torch_geometric.data import Batch, Data

    generator = torch.Generator().manual_seed(seed)
    graphs = [Data(x=torch.randn(n, 3, generator=generator, dtype=DTYPE),
                   edge_index=torch.randint(0, n, (2, e), generator=generator)) for n, e in ((4, 6), (5, 7), (3, 3))]
    return graphs, Batch.from_data_list(graphs)


def test_pygs_gat_layers_convert_exactly_per_graph_traced_and_replayed():
    """GATConv / GATv2Conv run as gradgraph's op-by-op form while the trace and the replay run (the patched
    forward): each graph's gradients equal a backward pass of that graph alone, at the first call (the trace) and
    the second (a replay of the cached plan) after the parameters changed."""
    pytest.importorskip("torch_geometric")
    torch.manual_seed(0)
    model = GatModel().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    for call in range(2):
        graphs, batch = _graph_batch(seed=call)
        graph = gradgraph.to_graph(model, batch.x, None, squared, datapoints=batch.batch,
                                   forward_kwargs={"edge_index": batch.edge_index, "batch": batch.batch})
        ours = graph.per_sample_grads()
        for i, data in enumerate(graphs):
            model.zero_grad()
            squared(model(data.x, data.edge_index, torch.zeros(len(data.x), dtype=torch.long)), None).sum().backward()
            for name, param in model.named_parameters():
                torch.testing.assert_close(ours[name][i], param.grad, atol=1e-10, rtol=0, msg=f"{name}, graph {i}")
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))


# ----------------------------------------------------------------------- nn.MultiheadAttention (_patch_attention)
class CausalAttention(nn.Module):
    """A bare ``nn.MultiheadAttention`` called with ``is_causal=True`` and no mask (the stock module refuses the
    call; gradgraph's form makes the causal mask itself)."""

    def __init__(self, batch_first: bool, mask: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.mask, self.batch_first = mask, batch_first

    def forward(self, x):
        length = x.shape[1] if self.batch_first else x.shape[0]
        if self.mask:  # the reference: the stock module given the mask
            y, _ = self.attention(x, x, x, attn_mask=torch.ones(length, length, dtype=torch.bool).triu(1),
                                  is_causal=True, need_weights=False)
        else:
            y, _ = self.attention(x, is_causal=True, need_weights=False)
        return y if self.batch_first else y.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_causal_attention_without_a_mask_is_the_stock_module_with_the_causal_mask(batch_first):
    """``is_causal=True`` without ``attn_mask``: the masked positions are the strict upper triangle over the
    sequence axis (axis 1 batch-first, else 0): per-sample gradients equal the stock module's, given the mask,
    by a per-datapoint loop. Kills ``_patch_attention`` (the mask's length, its diagonal)."""
    torch.manual_seed(1)
    model = CausalAttention(batch_first).to(DTYPE)
    reference = CausalAttention(batch_first, mask=True).to(DTYPE)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    axis = 0 if batch_first else 1
    x = x if batch_first else x.transpose(0, 1).contiguous()  # [T, b, d]: the datapoints on axis 1
    gradgraph.convert.clear_structure_cache()
    ours = gradgraph.to_graph(model, x, None, squared).per_sample_grads()
    for i in range(3):
        reference.zero_grad()
        squared(reference(x.narrow(axis, i, 1)), None).sum().backward()
        for name, param in reference.named_parameters():
            torch.testing.assert_close(ours[name][i], param.grad, atol=1e-10, rtol=0, msg=f"{name}, datapoint {i}")


# ----------------------------------------------------------------------- loops that do not fold (trace_model)
class RepeatedInput(nn.Module):
    """One vector fed at every step: the loop cannot fold (``FoldMismatch``), so it is unrolled."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x[:, :1].expand(-1, x.shape[1], -1))[0][:, -1])


class FirstStepDiffers(nn.Module):
    """A ``recurrent_step`` loop whose first step reads another sequence: refused folded, exact unrolled."""

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


class RefusedEitherWay(nn.Module):
    """A GRU, then an op no rule follows between two linear maps: refused folded and unrolled alike."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.fft.rfft(self.rnn(x)[0][:, -1]).real)


_UNFOLDED = ("every loop is converted unrolled, exactly (docs/recurrent.md). Pass fold_time=False to ask for the "
             "unrolled layout")


@pytest.mark.parametrize("make, reason", [
    (FirstStepDiffers, re.escape("'first_proj' feeds one step of a loop and has values at other steps")),
    (RepeatedInput, r"folded, the forward was refused: \S+:\d+ in RepeatedInput\.forward \(module 'rnn' of type GRU\): "
                    r"torch\.nn\.functional\.linear: copies values of one position over a new axis .*"),
])
def test_a_loop_that_does_not_fold_is_unrolled_exactly_with_a_warning_that_says_why(make, reason):
    """Exact against a per-datapoint loop; the warning names the model, why (the fold's mismatch, or the folded
    trace's refusal) and what was done, once."""
    torch.manual_seed(2)
    model = make().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _matches_loop(model, _sequences())
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                and "fold" in str(w.message)]
    assert len(messages) == 1, messages
    assert re.fullmatch(rf"to_graph: a recurrent loop of {make.__name__} does not fold over time \({reason}\); "
                        + re.escape(_UNFOLDED), messages[0], flags=re.S), messages[0]


def test_a_forward_refused_folded_and_unrolled_raises_the_folded_refusal_and_warns_nothing():
    """Refused folded, traced again unrolled and refused again: the folded trace's error is raised (the op, its
    reason), and no warning says the loop was unrolled (nothing was converted)."""
    torch.manual_seed(3)
    model = RefusedEitherWay().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+.*torch\.fft\.rfft") as error:
            gradgraph.to_graph(model, _sequences(), None, squared)
    assert not [w for w in caught if "fold" in str(w.message)]
    assert error.value.op == "torch.fft.rfft"


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` given a key or a value that is not the query."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.attention, self.call = nn.MultiheadAttention(4, 2, batch_first=True), call

    def forward(self, x):
        other = x.flip(1)
        if self.call == "key":
            return self.attention(x, other, other)[0]
        return self.attention(x, x, other)[0]


@pytest.mark.parametrize("call", ["key", "value"])
def test_cross_attention_of_a_stock_multihead_attention_is_refused_naming_the_module(call):
    """A key or a value other than the query: refused, naming the module, the op and what to do (in full)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(CrossAttention(call).to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE), None, squared)
    assert re.fullmatch(
        r"\S+:\d+ in CrossAttention\.forward \(module 'attention' of type MultiheadAttention\): nn\.MultiheadAttention: "
        + re.escape("cross-attention (query, key and value differ) is not supported; self-attention takes one tensor "
                    "(for a bare module pass nothing for key/value in forward_kwargs)"), str(error.value)), error.value
    assert (error.value.path, error.value.op) == ("attention", "nn.MultiheadAttention")

