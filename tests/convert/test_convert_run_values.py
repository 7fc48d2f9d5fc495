"""Per-function checks of ``convert/trace/run.py`` and ``convert/trace/meta.py`` (issue 31, group ``convert-run``).

Written for mutmut's runs over the two files (docs/mutation.md): each test is float64 against an independent truth
(torch.func through ``tests/traced_models.py``'s helpers, or a per-datapoint autograd loop, at 1e-10), or checks a
refusal's or a warning's message in full where a user reads it, and names in its docstring the mutants it kills
(``f N``: mutant ``N`` of function ``f``, checked with ``MUTANT_UNDER_TEST``). The first tests reach, cheaply, what
only the costly files of ``tests/convert`` reached (coverage.py per test): PyG's GAT run as gradgraph's form, the
recurrent loops that do not fold, a causal ``nn.MultiheadAttention`` without a mask.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError
from convert_values import exact, squared
from test_convert_recurrent_folded import FirstStepDiffers  # the same model the folding tests refuse folded
from test_convert_tracer_values import DetachedTail  # the model whose cut the tracer's tests check

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

    def forward(self, x, edge_index, batch, edge_attr=None):
        h = torch.relu(self.conv1(x, edge_index) if edge_attr is None else self.conv1(x, edge_index, edge_attr))
        return self.head(self.pool(torch.tanh(self.conv2(h, edge_index=edge_index)), batch))  # by keyword


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


def test_a_gat_given_edge_attributes_is_refused_naming_its_module_path():
    """``edge_attr`` passed to a GATConv: gradgraph's form refuses it, naming the module by its path (the patched
    forward hands the path on). Kills ``_patch_gat`` 2, 3, 5, 7, 10."""
    pytest.importorskip("torch_geometric")
    torch.manual_seed(0)
    model = GatModel().to(DTYPE)
    _, batch = _graph_batch(seed=0)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.UnsupportedModuleError) as error:
        gradgraph.to_graph(model, batch.x, None, squared, datapoints=batch.batch,
                           forward_kwargs={"edge_index": batch.edge_index, "batch": batch.batch,
                                           "edge_attr": torch.ones(batch.edge_index.shape[1], 1, dtype=DTYPE)})
    assert str(error.value).endswith("unsupported module at 'conv1' of type GATConv: edge_attr, size or "
                                     "return_attention_weights passed to forward"), error.value


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
        r"\S+:\d+ in CrossAttention\.forward \(module 'attention' of type MultiheadAttention\): "
        r"nn\.MultiheadAttention: "
        + re.escape("cross-attention (query, key and value differ) is not supported; self-attention takes one tensor "
                    "(for a bare module pass nothing for key/value in forward_kwargs)"), str(error.value)), error.value
    assert (error.value.path, error.value.op) == ("attention", "nn.MultiheadAttention")



class LearnedQuery(nn.Module):
    """Attention pooling with a learned query (SigLIP's head, a Perceiver's latents): ``nn.MultiheadAttention(probe,
    x, x)``, the query a parameter repeated over the datapoints."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 4))
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attention(self.probe.repeat(x.shape[0], 1, 1), x, x)[0]


def test_attention_pooling_with_a_learned_query_is_refused_in_its_own_words_in_full():
    """A parameter as the query is refused as attention pooling with a learned query, naming the parameter and the
    remedy, not as cross-attention (whose advice is for another model). Kills ``_patch_attention`` 29, 30, 32 (the
    query's meta not read: the cross-attention words) and 33-41 (the words changed) of run run 11 (the tests of the
    SigLIP head, in ``test_convert_more_transformers.py``, are outside group ``convert-run``'s list)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.UnsupportedModuleError) as error:
        gradgraph.to_graph(LearnedQuery().to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE), None, squared)
    assert re.fullmatch(
        r"\S+:\d+ in LearnedQuery\.forward \(module 'attention' of type MultiheadAttention\): "
        r"nn\.MultiheadAttention: "
        + re.escape("attention pooling with a learned query (the parameter 'probe' attends over the tokens) is not "
                    "supported: the query is a parameter, not values of the input. Pool the tokens otherwise (their "
                    "mean, a class token; SigLIP: vision_use_head=False)"), str(error.value)), error.value
    assert (error.value.path, error.value.op) == ("attention", "nn.MultiheadAttention")


class Attention(nn.Module):
    """``nn.MultiheadAttention`` under ``attention``, called as ``how`` says; its output (and its weights, read)."""

    def __init__(self, how: str, **options) -> None:
        super().__init__()
        self.attention, self.how = nn.MultiheadAttention(4, 2, batch_first=True, **options), how
        self.register_buffer("padding", torch.tensor([False, False, True, False, True]))

    def forward(self, x):
        if self.how == "key only":  # the value defaults to the key, which is not the query
            return self.attention(x, x.flip(1))[0]
        if self.how == "weights":  # the averaged weights [b, T, S], read (no parameter after them)
            y, weights = self.attention(x, x, x)
            return y + weights.sum(-1, keepdim=True) * weights[..., :1]
        if self.how == "padding":
            return self.attention(x, x, x, key_padding_mask=self.padding.expand(x.shape[0], -1), need_weights=False)[0]
        if self.how == "mask":
            return self.attention(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))[0]
        return self.attention(x, x, x)[0]


def test_a_multihead_attention_given_a_key_other_than_the_query_and_no_value_is_refused():
    """No value: it defaults to the key, here not the query: cross-attention, refused (not the query's
    self-attention). Kills ``_patch_attention`` 19."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"cross-attention \(query, key and value differ\)"):
        gradgraph.to_graph(Attention("key only").to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE), None, squared)


@pytest.mark.parametrize("how", ["weights", "padding"])
def test_a_multihead_attentions_averaged_weights_and_its_key_padding_mask_are_the_stock_modules(how):
    """The weights it returns are averaged over the heads by default (``[b, T, S]``), and a key padding mask masks
    the keys: per-sample gradients equal a per-datapoint loop of the stock module. Kills ``_patch_attention`` 11
    (the weights per head), 72, 78 (the padding mask dropped)."""
    torch.manual_seed(5)
    gradgraph.convert.clear_structure_cache()
    _matches_loop(Attention(how).to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE))


def test_a_multihead_attention_refusal_names_its_module_path():
    """A mask of the wrong shape and ``add_zero_attn``: each refusal names the module by its path. Kills
    ``_patch_attention`` 13, 73, 79."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.GradGraphError) as error:
        gradgraph.to_graph(Attention("mask").to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE), None, squared)
    assert str(error.value).endswith("'attention': attn_mask must have shape [5, 5] or [6, 5, 5], got [3, 3]"), error
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.UnsupportedModuleError) as error:
        gradgraph.to_graph(Attention("plain", add_zero_attn=True).to(DTYPE), torch.randn(3, 5, 4, dtype=DTYPE), None,
                           squared)
    assert str(error.value).endswith(
        "unsupported module at 'attention' of type MultiheadAttention: add_zero_attn=True is not supported"), error


# ----------------------------------------------------------------------- registered elementwise modules (_patch)
class Shifted(nn.Module):
    """An elementwise module with more arguments than its input: ``erf(u) * scale + shift`` (``torch.special``)."""

    def forward(self, u, scale, *, shift=0.0):
        return torch.special.erf(u) * scale + shift


class Squashed(nn.Module):
    """``u / (1 + |u|)``, registered with the label TANH."""

    def forward(self, u):
        return u / (1 + u.abs())


@pytest.fixture
def registered():
    """``register_elementwise`` of this file's module types, undone afterwards."""
    from gradgraph.convert import register_elementwise
    from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES
    from gradgraph.graph import ActivationKind

    register_elementwise(Shifted)
    register_elementwise(Squashed, ActivationKind.TANH)
    yield
    ELEMENTWISE_MODULES.pop(Shifted, None)
    ELEMENTWISE_MODULES.pop(Squashed, None)


class RegisteredActivations(nn.Module):
    """Linear maps between registered elementwise modules; ``flip`` swaps which of two acts where."""

    def __init__(self) -> None:
        from gradgraph.modules import Sine

        super().__init__()
        self.first, self.second, self.third = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.sine, self.squashed, self.shifted = Sine(), Squashed(), Shifted()
        self.flip, self.on_weight = False, False

    def forward(self, x):
        a, b = (self.squashed, self.sine) if self.flip else (self.sine, self.squashed)
        h = self.shifted(self.first(x), 1.5, shift=0.25)
        h = b(self.second(a(h)))
        if self.on_weight:
            h = h * self.sine(self.third.weight).sum()
        return self.third(h)


def _labels(graph) -> list[int]:
    """The activation label of each hidden neuron, in node order."""
    from gradgraph.graph import NodeKind

    return [int(kind) for kind in graph.activation[graph.node_kind == int(NodeKind.HIDDEN)]]


def test_registered_modules_run_with_all_their_arguments_and_label_their_neurons(registered):
    """A registered module called with an extra positional argument and a keyword (both reach its forward: exact
    against torch.func), and each one's label on the neurons it acts on (Sine: SINE, Squashed: TANH; the
    unlabelled Shifted leaves IDENTITY). Kills ``_patch`` 6, 7 (arguments dropped), 23 (no label)."""
    from gradgraph.graph import ActivationKind

    torch.manual_seed(6)
    graph = exact(RegisteredActivations().to(DTYPE), torch.randn(3, 3, dtype=DTYPE))
    assert _labels(graph) == [int(ActivationKind.SINE)] * 4 + [int(ActivationKind.TANH)] * 4


def test_registered_modules_swapped_between_calls_are_traced_again_not_replayed(registered):
    """The same modules called in the other order: the ops differ (each module call is one op of the log, named by
    its type), so the second conversion traces afresh and labels the neurons as they now are, exactly. Kills
    ``_patch`` 9, 17 (every module call logged under one name: the replay reused the first plan's labels)."""
    from gradgraph.graph import ActivationKind

    torch.manual_seed(7)
    model = RegisteredActivations().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    model.flip = True
    graph = gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert _labels(graph) == [int(ActivationKind.TANH)] * 4 + [int(ActivationKind.SINE)] * 4


def test_a_registered_module_applied_to_a_parameter_is_refused_naming_the_module(registered):
    """Sine of a weight (no neuron values): refused, naming the module type as the op. Kills ``_patch`` 22, 28."""
    model = RegisteredActivations().to(DTYPE)
    model.on_weight = True
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert re.fullmatch(r"test_convert_run_values\.py:\d+ in RegisteredActivations\.forward "
                        r"\(module 'sine' of type Sine\): "
                        + re.escape("Sine: the parameter 'third.weight' used where gradgraph expects neuron values "
                                    "(arithmetic on a parameter before it meets the input: a learned slope, scale or "
                                    "mask)"), str(error.value)), error.value


def test_a_model_with_registered_modules_is_replayed_at_its_second_conversion(registered, monkeypatch):
    """The second conversion of a model with registered elementwise modules (a ``Sine`` among them) replays the
    cached plan (one trace in all), and is exact. Failed before the fix of ``_ModuleTracker._patch`` (the trace's
    bookkeeping of the module's output, ``tracer.unary``, ran under the tracer's own mode, so its reads of
    ``Tensor.shape`` were logged as ops of the forward: no replay ever matched, and every conversion traced
    afresh)."""
    from gradgraph.convert import traced

    traces = []
    trace_model = traced.trace_model
    monkeypatch.setattr(traced, "trace_model", lambda *args, **kwargs: traces.append(1) or trace_model(*args, **kwargs))
    torch.manual_seed(8)
    model = RegisteredActivations().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    graph = gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1)),
                               None, squared)
    assert len(traces) == 1
    reference = exact(model, torch.randn(3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1)))
    for name, value in reference.per_sample_grads().items():
        torch.testing.assert_close(graph.per_sample_grads()[name], value, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------- where an error is (_run_forward, _user_frame,
# _locate_in_module)
class Failing(nn.Module):
    """A forward that fails: torch's shape error, an IndexError, a ValueError, or gradgraph's own error."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.how = nn.Linear(4, 3), how

    def forward(self, x):
        h = self.lin(x)
        if self.how == "shapes":
            return h + x  # FAILS
        if self.how == "index":
            return h[:, [7]]  # FAILS
        if self.how == "value":
            raise ValueError("no value here")  # FAILS
        raise gradgraph.GradGraphError("gradgraph's own")


def _line(marker: str) -> int:
    """The line of this file that ends with ``# marker``."""
    with open(__file__) as source:
        return next(number for number, text in enumerate(source, 1) if text.rstrip().endswith(f"# {marker}"))


@pytest.mark.parametrize("how, error", [("shapes", RuntimeError), ("index", IndexError), ("value", ValueError)])
def test_torchs_error_in_a_forward_names_the_users_line_the_model_and_the_input(how, error):
    """torch's (or the model's own) RuntimeError, IndexError or ValueError becomes a GradGraphError naming the
    innermost line of the user's code (file, line, qualified function), the model's type, the input's shape and
    dtype, and the error, which it keeps as its cause."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(Failing(how).to(DTYPE), torch.randn(3, 4, dtype=DTYPE), None, squared)
    cause = caught.value.__cause__
    assert type(cause) is error and (how != "value" or str(cause) == "no value here")
    line = _line("FAILS") + ["shapes", "index", "value"].index(how) * 2
    assert str(caught.value) == (f"test_convert_run_values.py:{line} in Failing.forward: Failing failed on inputs of "
                                 f"shape [3, 4] (torch.float64): {error.__name__}: {cause}")


def test_gradgraphs_own_error_in_a_forward_is_raised_as_it_is():
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(Failing("own").to(DTYPE), torch.randn(3, 4, dtype=DTYPE), None, squared)
    assert str(caught.value) == "gradgraph's own" and caught.value.__cause__ is None


def test_an_error_with_no_user_code_on_its_way_has_an_unknown_location():
    """A stock module given an input of the wrong width: no frame of the user's code between the conversion and
    torch's error, so the location is ``<unknown location>``."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(nn.Linear(4, 2).to(DTYPE), torch.randn(3, 5, dtype=DTYPE), None, squared)
    assert str(caught.value) == ("<unknown location>: Linear failed on inputs of shape [3, 5] (torch.float64): "
                                 f"RuntimeError: {caught.value.__cause__}")


def internal_error(monkeypatch):
    """The error ``to_graph`` raises on a small MLP when a rule of the trace crashes (``neurons_from_raw`` handed a
    value with no features, the crash an input axis of length 0 caused)."""
    from gradgraph.convert.trace.tracer import Tracer

    original = Tracer.neurons_from_raw
    monkeypatch.setattr(Tracer, "neurons_from_raw", lambda self, value, meta, what: original(
        self, value[..., :0], meta, what))
    gradgraph.convert.clear_structure_cache()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(model, torch.randn(3, 4, dtype=DTYPE), None, squared)
    return caught


def test_an_error_inside_the_traces_own_rules_is_called_internal_not_the_models(monkeypatch):
    """An exception raised in a rule of ``convert/trace/`` (here: ``neurons_from_raw`` handed a value with no
    features, the crash an input axis of length 0 caused) is gradgraph's bug: before, it was reported as
    "Sequential failed on inputs ...", blaming the model."""
    caught = internal_error(monkeypatch)
    message = str(caught.value)
    assert message.startswith("internal error in gradgraph's trace (convert/trace/tracer.py:"), message
    assert " in neurons_from_raw) while Sequential ran on inputs of shape [3, 4] (torch.float64)" in message, message
    assert message.endswith(f"RuntimeError: {caught.value.__cause__}. This is a bug in gradgraph, not in the model: "
                            "please report it with the model"), message
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_an_internal_error_names_the_users_line_it_was_met_at(monkeypatch):
    """The internal error's message says where in the model's code the trace was ("at file:line in function", here
    the patched rule's lambda in this file; under mutmut a trampoline's frame), as an error of the model's does: kills
    ``_run_forward`` 16 of run run 11 (``_user_frame(None)``: "at <unknown location>")."""
    caught = internal_error(monkeypatch)
    assert re.search(r"\(torch\.float64\), at [\w.]+\.py:\d+ in [\w.<>]+: RuntimeError: ", str(caught.value)), caught.value
    if not os.environ.get("MUTANT_UNDER_TEST"):
        assert ", at test_convert_run_values.py:" in str(caught.value), caught.value


def test_a_type_error_inside_a_rule_is_called_internal_too(monkeypatch):
    """A ``TypeError`` from a rule (not an ``UnsupportedModuleError``) was reported as the model's call refusing its
    arguments ("calling Sequential(inputs, **forward_kwargs) failed: ... Pass the model's other arguments through
    forward_kwargs")."""
    from gradgraph.convert.trace import rules_elementwise

    def broken(*args, **kwargs):
        return rules_elementwise.broadcast_ids(torch.zeros(2), ("2",))  # expand() raises TypeError in meta.py

    monkeypatch.setattr(rules_elementwise.ElementwiseRules, "unary", broken)
    gradgraph.convert.clear_structure_cache()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    # (``\w*broadcast_ids\w*``: under mutmut, group convert-run, the frame is ``x_broadcast_ids__mutmut_orig``)
    with pytest.raises(gradgraph.GradGraphError, match=r"^internal error in gradgraph's trace \(convert/trace/"
                       r"meta\.py:\d+ in \w*broadcast_ids\w*\) while Sequential ran .* TypeError: "):
        gradgraph.to_graph(model, torch.randn(3, 4, dtype=DTYPE), None, squared)


class Block(nn.Module):
    """User code inside the model that calls an ``nn.Sequential`` holding the refused convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _refused_convolution()

    def forward(self, x):
        return self.seq(x)  # BLOCK CALLS


def _refused_convolution() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 1))


def test_a_refused_op_of_a_stock_module_in_a_sequential_is_located_in_that_modules_forward():
    """No user code runs between the conversion and the refused op: the location (the message's start, and the
    error's ``location``) is the stock module's own ``forward``, its file and line, not the caller of to_graph."""
    import inspect

    lines, first = inspect.getsourcelines(nn.Conv1d.forward)
    line = first + next(i for i, text in enumerate(lines) if "return" in text)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(_refused_convolution().to(DTYPE), torch.randn(3, 4, dtype=DTYPE))
    assert caught.value.location == f"conv.py:{line} in Conv1d.forward"
    assert str(caught.value).startswith(f"conv.py:{line} in Conv1d.forward (module '2' of type Conv1d): ")
    assert caught.value.args == (str(caught.value),) and caught.value.path == "2"


def test_a_refused_op_under_user_code_inside_the_model_keeps_the_users_line():
    """User code inside the model (a block's forward calling the ``nn.Sequential``): its line is the location."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(Block().to(DTYPE), torch.randn(3, 4, dtype=DTYPE))
    location = f"test_convert_run_values.py:{_line('BLOCK CALLS')} in Block.forward"
    assert caught.value.location == location
    assert str(caught.value).startswith(location + " (module 'seq.2' of type Conv1d): ")


# ----------------------------------------------------------------------- meta.py's helpers, against their docstrings
def test_a_trace_abort_reads_as_the_error_it_carries():
    """Kills ``TraceAbort.__init__`` 1, 2."""
    from gradgraph.convert.trace.meta import TraceAbort

    error = UnsupportedOperationError("lin", "torch.fft.rfft", "f.py:3 in M.forward", "no rule")
    abort = TraceAbort(error)
    assert abort.error is error
    assert str(abort) == str(error) == "f.py:3 in M.forward (module 'lin'): torch.fft.rfft: no rule"


def test_an_unsupported_operation_error_names_where_the_module_and_the_op():
    """The message: location, the module by path and type (or by path, or neither), the op, the reason; the
    attributes a caller reads. Kills ``UnsupportedOperationError.__init__`` 9, 11."""
    error = UnsupportedOperationError("block.attn", "Tensor.matmul", "m.py:7 in B.forward", "why", "Attention")
    assert (error.path, error.module_type, error.op, error.location) == (
        "block.attn", "Attention", "Tensor.matmul", "m.py:7 in B.forward")
    assert str(error) == "m.py:7 in B.forward (module 'block.attn' of type Attention): Tensor.matmul: why"
    bare = UnsupportedOperationError("block", "torch.cumsum", "m.py:8 in B.forward", "no rule")
    assert bare.module_type == "torch.cumsum"
    assert str(bare) == "m.py:8 in B.forward (module 'block'): torch.cumsum: no rule"
    root = UnsupportedOperationError("", "torch.cumsum", "m.py:9 in M.forward", "no rule", "M")
    assert str(root) == "m.py:9 in M.forward: torch.cumsum: no rule"
    assert isinstance(root, gradgraph.UnsupportedModuleError)


def test_a_neuron_set_holds_its_own_nodes_and_set_containing_finds_each_nodes_set():
    """``holds``: nodes ``first .. first + size - 1``; ``set_containing``: the set of each node, for sets of several
    sizes (a binary search over the sets' first nodes). Kills ``NeuronSet.holds`` 1, ``set_containing`` 4, 16."""
    from gradgraph.convert.trace.meta import NeuronSet, set_containing
    from gradgraph.graph import NodeKind

    sizes = [3, 1, 4, 2, 5, 1]
    sets, first = [], 0
    for index, size in enumerate(sizes):
        sets.append(NeuronSet(index, first, size, NodeKind.HIDDEN, f"s{index}"))
        first += size
    nodes = torch.arange(-1, first + 1)
    for neuron_set in sets:
        expected = (nodes >= neuron_set.first) & (nodes <= neuron_set.first + neuron_set.size - 1)
        assert torch.equal(neuron_set.holds(nodes), expected)
    owner = [index for index, size in enumerate(sizes) for _ in range(size)]
    for count in range(1, len(sets) + 1):  # an odd and an even number of sets, down to one
        for node in range(sum(sizes[:count])):
            assert set_containing(sets[:count], node).index == owner[node], (count, node)


def test_constant_varies_and_a_value_guard_as_their_docstrings_say():
    """A constant that does not broadcast counts as differing; a guard holds only where its argument is a tensor at
    its position, and (with values) equal to them. Kills ``constant_varies`` 6, ``ValueGuard.holds`` 1, 2, 4, 8."""
    from gradgraph.convert.trace.meta import ValueGuard, constant_varies

    assert constant_varies(torch.ones(3), (2,), (0,))
    assert not constant_varies(torch.ones(1), (2,), (0,))
    assert constant_varies(torch.tensor([1.0, 2.0]), (3, 2), (1,)) and not constant_varies(torch.tensor([1.0, 2.0]),
                                                                                            (3, 2), (0,))
    guard = ValueGuard(1, (3, 2), (1,), varies=True)
    assert guard.holds((torch.zeros(1), torch.tensor([1.0, 2.0])))
    assert not guard.holds((torch.zeros(1), torch.tensor([1.0, 1.0])))
    assert not guard.holds((torch.zeros(1),)) and not guard.holds((torch.zeros(1), 2.0))
    assert not ValueGuard(2).holds((torch.zeros(1), torch.zeros(1)))
    values = ValueGuard(0, values=torch.tensor([1.0, 2.0]))
    assert values.holds((torch.tensor([1.0, 2.0]),))
    assert not values.holds((torch.tensor([1.0, 3.0]),)) and not values.holds((torch.tensor([[1.0, 2.0]]),))


def test_rows_feature_row_and_channel_row_as_their_docstrings_say():
    """``rows_along_last`` of a scalar is one row of one; ``feature_row``: the neurons on the last axis where every
    position holds the same ones, all neurons (node 0 is one); ``channel_row``: axis 1 of a ``[b, C, *S]`` value
    held alike at every datapoint and position (one datapoint, one position included). Kills ``rows_along_last``
    2, 11-16, ``feature_row`` 8, 10, 11, ``channel_row`` 19-22."""
    from gradgraph.convert.trace.meta import channel_row, feature_row, rows_along_last

    assert torch.equal(rows_along_last(torch.tensor(5)), torch.tensor([[5]]))
    assert torch.equal(rows_along_last(torch.arange(6).reshape(1, 2, 3)), torch.arange(6).reshape(2, 3))
    assert torch.equal(feature_row(torch.tensor([[0, 4], [0, 4]])), torch.tensor([0, 4]))
    assert feature_row(torch.tensor([[0, 4], [0, 5]])) is None and feature_row(torch.tensor([[-1, 4], [-1, 4]])) is None
    for b, positions in ((1, (1,)), (2, (3,)), (2, (2, 2))):
        row = torch.tensor([0, 7, 3])
        ids = row.reshape(1, 3, *[1] * len(positions)).expand(b, 3, *positions)
        assert torch.equal(channel_row(ids, ids.shape), row)
        assert channel_row(torch.where(ids == 7, -1, ids), ids.shape) is None
        if positions != (1,):
            changed = ids.clone()
            changed.view(b, 3, -1)[0, 1, -1] = 8
            assert channel_row(changed, ids.shape) is None
        if b > 1:
            changed = ids.clone()
            changed[-1] = changed[-1] + 10
            assert channel_row(changed, ids.shape) is None
    assert channel_row(torch.tensor([[0, 1]]), (1, 2)) is None  # no positions: not a channel map


def test_describe_gives_each_non_tensor_argument_a_hashable_description():
    """Kills ``_describe`` 2-9."""
    from gradgraph.convert.trace.meta import _describe

    assert [_describe(value) for value in (None, True, 3, 2.5, "mean", torch.float32, torch.device("cpu"))] == [
        None, True, 3, 2.5, "mean", torch.float32, torch.device("cpu")]
    assert _describe(slice(1, None, 2)) == ("slice", 1, None, 2) and _describe(...) == "..."
    assert _describe([1, (slice(None, 3), ...)]) == (1, (("slice", None, 3, None), "..."))
    assert _describe(torch.Size([2, 3])) == (2, 3) and _describe(torch.Generator()) == "Generator"
    assert hash(_describe([slice(0, 1), torch.Size([2])])) is not None


# ----------------------------------------------------------------------- the replay (_Replayer, replay_model)
def _counting_traces(monkeypatch) -> list:
    from gradgraph.convert import traced

    traces: list = []
    trace_model = traced.trace_model
    monkeypatch.setattr(traced, "trace_model", lambda *args, **kwargs: traces.append(1) or trace_model(*args, **kwargs))
    return traces


class InPlaceBlock(nn.Module):
    """A torchvision-style residual block: ``h2 += h`` and ``F.relu(..., inplace=True)`` (the trace and the replay
    run them out of place), and ``Tensor.add_`` with its other operand positional."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h2 = self.b(torch.tanh(h))
        h2 += h
        h2 = F.relu(h2, inplace=True)
        h3 = self.b(h2)
        h3 = h3.add_(h2)  # the value the op returns
        return self.c(torch.tanh(h3))


class SwappedLayers(nn.Module):
    """Two Linear maps of one shape, applied in the order ``swap`` says: the same ops on other parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.swap = False

    def forward(self, x):
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        return self.head(torch.tanh(second(torch.tanh(first(x)))))


def _replayed_exactly(model, make_inputs, monkeypatch, traces_expected=1, change=None):
    """Convert twice (parameters moved between), the second conversion exact against torch.func; the trace count."""
    traces = _counting_traces(monkeypatch)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, make_inputs(0), None, squared)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    if change is not None:
        change(model)
    graph = gradgraph.to_graph(model, make_inputs(1), None, squared)
    reference = assert_exact(model, make_inputs(1))
    for name, value in reference.items():
        torch.testing.assert_close(graph.per_sample_grads()[name], value, atol=1e-10, rtol=0, msg=name)
    assert len(traces) == traces_expected
    return graph


def assert_exact(model, inputs):
    """torch.func per-sample gradients of ``squared``: the reference."""
    from traced_models import reference_per_sample_grads

    return reference_per_sample_grads(model, inputs, None, squared)


def test_in_place_ops_replay_out_of_place_as_the_trace_ran_them(monkeypatch):
    """The second conversion replays the plan (one trace), running ``+=``, ``inplace=True`` and ``add_`` out of
    place as the trace did and marking their targets stale; exact against torch.func. With the next test it
    kills (run run 3) ``_Replayer.__torch_function__`` 37, 44, 46, 47, 49, 50, 57, 62-64, 68."""
    torch.manual_seed(9)
    _replayed_exactly(InPlaceBlock().to(DTYPE), lambda seed: torch.randn(
        4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch)


@pytest.mark.parametrize("form", ["Tensor.softmax", "F.log_softmax"])
def test_a_softmax_over_positions_replays_as_its_parts(form, monkeypatch):
    """Attention pooling (a softmax over the tokens, run as its parts by the trace): the replay runs the parts too,
    so the second conversion is one trace in all, exact. Kills ``_Replayer.__torch_function__`` 15, 22, 29
    (run run 3)."""
    from test_convert_softmax_over_positions import AttentionPooling

    torch.manual_seed(10)
    _replayed_exactly(AttentionPooling(form).to(DTYPE), lambda seed: torch.randn(
        5, 4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch)


def test_the_same_ops_on_other_parameters_are_traced_again(monkeypatch):
    """The layers applied in the other order: the ops' names and shapes are the same, only the parameters they read
    differ (a fingerprint names a parameter by its name), so the second conversion traces again and is exact.
    Kills ``OpLog.source`` 9-12, 16."""
    torch.manual_seed(11)
    _replayed_exactly(SwappedLayers().to(DTYPE), lambda seed: torch.randn(
        4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch, traces_expected=2,
        change=lambda model: setattr(model, "swap", True))


def test_trace_model_folds_the_loops_by_default():
    """``trace_model``'s ``fold_time`` defaults to folding (its docstring). Kills ``trace_model`` 2."""
    from gradgraph.convert.trace import trace_model

    model = RefusedEitherWay().to(DTYPE)
    model.head = nn.Identity()
    model.forward = lambda x: model.rnn(x)[0][:, -1]
    assert trace_model(model, _sequences(), model.forward).fold_time is True


class CrossOnSecondCall(nn.Module):
    """Self-attention at the first call, cross-attention at the second, with the same ops before the module (its
    key is computed at both calls, and passed only at the second)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.cross = nn.MultiheadAttention(4, 2, batch_first=True), False

    def forward(self, x):
        other = x.flip(1)
        key = other if self.cross else x
        return self.attention(x, key, key)[0]  # CALLS ATTENTION


def test_a_refusal_met_during_a_replay_names_the_users_line():
    """A module that gradgraph runs in its own form refuses a call only the replay of a cached plan sees: the error
    names the user's line, as a fresh trace's does, not ``<replay>``. Failed before the fix of ``replay_model``
    (the replay's own refusal reached the user with the location ``<replay>``)."""
    model = CrossOnSecondCall().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, torch.randn(3, 5, 4, dtype=DTYPE), None, squared)
    model.cross = True
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(model, torch.randn(3, 5, 4, dtype=DTYPE), None, squared)
    assert str(caught.value) == (
        f"test_convert_run_values.py:{_line('CALLS ATTENTION')} in CrossOnSecondCall.forward (module 'attention' of "
        "type MultiheadAttention): nn.MultiheadAttention: cross-attention (query, key and value differ) is not "
        "supported; self-attention takes one tensor (for a bare module pass nothing for key/value in forward_kwargs)")


class Spectral(nn.Module):
    def forward(self, h):
        return torch.fft.rfft(h).real  # NO RULE


class UnregisteredModule(nn.Module):
    """A module made in the forward (not registered in the model): it has no path, so it is named by its type."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(Spectral()(self.a(x)))


def test_a_module_made_in_the_forward_is_named_by_its_type():
    """Refused in a module the model does not register: the message names it by its type, at its line. Kills
    ``_ModuleTracker.__enter__`` 6, 8, 10."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(UnregisteredModule().to(DTYPE), torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert str(caught.value).startswith(
        f"test_convert_run_values.py:{_line('NO RULE')} in Spectral.forward (module 'Spectral'): torch.fft.rfft: "
        "gradgraph has no rule for this op"), caught.value
    assert caught.value.path == "Spectral"


def test_trace_model_counts_the_datapoints_on_axis_0_by_default():
    """Kills ``trace_model`` 1 (``datapoint_dim`` 1 by default)."""
    from gradgraph.convert.trace import trace_model

    model = nn.Linear(3, 2).to(DTYPE)
    assert trace_model(model, torch.randn(5, 3, dtype=DTYPE), model).num_datapoints == 5


class ChangesBetweenCalls(nn.Module):
    """The same ops up to where ``mode`` says: fail, stop one op early, or return the value an in-place op left."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mode = nn.Linear(3, 3), "plain"

    def forward(self, x):
        h = self.a(x)
        if self.mode == "fails":
            raise ValueError("second call")  # FAILS AT REPLAY
        old = h
        h += 1.0
        if self.mode == "stale":
            return old
        return torch.tanh(h) if self.mode == "tanh" else h


def _second_call(mode: str, first: str = "plain"):
    torch.manual_seed(12)
    model = ChangesBetweenCalls().to(DTYPE)
    model.mode = first
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    model.mode = mode
    return model


def test_a_forward_that_fails_at_a_replay_is_named_as_at_a_trace():
    """The message names the model, its input and the user's line, as at a trace."""
    model = _second_call("fails")
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    where = f"test_convert_run_values.py:{_line('FAILS AT REPLAY')}"
    assert str(caught.value) == (f"{where} in ChangesBetweenCalls.forward: "
                                 "ChangesBetweenCalls failed on inputs of shape [3, 3] (torch.float64): ValueError: "
                                 "second call")


def test_a_replay_that_stops_an_op_early_is_traced_again_exactly():
    """One op fewer than the plan's: not a replay of it; traced afresh, exact."""
    model = _second_call("plain", first="tanh")
    exact(model, torch.randn(3, 3, dtype=DTYPE))
    _matches_loop(model, torch.randn(3, 3, dtype=DTYPE))


def test_a_replay_whose_output_is_a_value_an_in_place_op_changed_is_refused_as_a_trace_refuses_it():
    """The output is the value ``h += 1`` changed (run out of place, it would hold the old values): the replay
    traces afresh and that refuses it, naming the output. Kills ``replay_model`` 41 (the output not checked: the
    replay accepted, its loss read the old values)."""
    model = _second_call("stale")
    with pytest.raises(UnsupportedOperationError, match="the model's output"):
        gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)


# ------------------------------------------------- a replay that runs fewer ops, a replay's own error (issue 31, mut33)
class SumsItsOutputFirst(nn.Module):
    """Two layers; at the first call the output is summed over its features (one neuron), at the second the forward
    stops one op early and returns the last layer itself (three output neurons). Every op the second call runs is
    the plan's, in its order, with the same arguments and shapes: only the count tells the two calls apart."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.summed = nn.Linear(3, 3), nn.Linear(3, 3), True

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return h.sum(1, keepdim=True) if self.summed else h


def test_a_replay_that_stops_before_the_plans_last_op_converts_as_a_fresh_trace(monkeypatch):
    """The plan's last op (the sum over the output's features) not run at the second call: the replay stops one op
    early, so it is no replay of that plan; the model is traced again (two traces in all) and its graph equals a
    fresh trace's: the last layer's neurons are the output (``node_kind`` 2), in no permutation group, and the
    per-sample gradients are exact against a per-datapoint loop. Kills ``replay_model`` 44 (``and`` for ``or``:
    the shorter replay accepted; every op it ran matches the plan's, so its values are the model's and the
    per-sample gradients right, but the graph is the plan's, whose last layer was hidden: ``node_kind`` 1 and a
    permutation group of its own, a symmetry the model does not have, silently)."""
    from strategies import assert_same_graph

    traces = _counting_traces(monkeypatch)
    torch.manual_seed(13)
    model = SumsItsOutputFirst().to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, inputs, None, squared)
    model.summed = False
    graph = gradgraph.to_graph(model, inputs, None, squared)
    assert graph.node_kind.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert graph.perm_group[6:].tolist() == [-1, -1, -1]
    assert len(traces) == 2
    gradgraph.convert.clear_structure_cache()
    assert_same_graph(graph, _matches_loop(model, inputs))


class ReadsItsInputAfterTheLayer(nn.Module):
    """At the first call the forward reads its input's shape and dtype after the layer; at the second it fails
    there (a ValueError of its own). Building the error message reads the same two attributes of the input, the
    plan's next two ops, so the replay does not mismatch: the error is raised by the replay itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fails = nn.Linear(3, 3), False

    def forward(self, x):
        h = self.a(x)
        if self.fails:
            raise ValueError("fails at the replay")  # RAISED AT REPLAY
        assert x.shape[1] == 3 and x.dtype == h.dtype
        return h


def test_a_forward_that_fails_during_a_replay_names_the_model_and_the_users_line(monkeypatch):
    """The error raised by the replay itself (not a mismatch that traces again: one trace in all) names the user's
    line, the model's class, the input's shape and dtype, and the error, as a trace's does. Kills ``replay_model``
    34 (the replay ran the forward with no model: "NoneType failed")."""
    traces = _counting_traces(monkeypatch)
    model = ReadsItsInputAfterTheLayer().to(DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    model.fails = True
    with pytest.raises(gradgraph.GradGraphError) as caught:
        gradgraph.to_graph(model, torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert len(traces) == 1
    assert str(caught.value) == (
        f"test_convert_run_values.py:{_line('RAISED AT REPLAY')} in ReadsItsInputAfterTheLayer.forward: "
        "ReadsItsInputAfterTheLayer failed on inputs of shape [3, 3] (torch.float64): ValueError: fails at the replay")


class CatchesIndexError(nn.Module):
    """At the first call the forward ends at its layer; at the second it runs one op more (a softmax or an ``add_``)
    inside ``try: ... except IndexError``, the error torch raises for an axis out of range, falling back to the
    layer's own value."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.a, self.extra, self.more = nn.Linear(3, 3), extra, False

    def forward(self, x):
        h = self.a(x)
        if self.more:
            try:
                h = torch.softmax(h, -1) if self.extra == "softmax" else h.add_(1.0)
            except IndexError:
                pass
        return h


@pytest.mark.parametrize("extra", ["softmax", "add_"])
def test_an_op_after_the_plans_last_op_in_a_forward_that_catches_index_error_is_traced_again(extra, monkeypatch):
    """One op more than the plan, after its last op: the replay raises its own mismatch (no ``IndexError`` the
    forward could catch), so the model is traced again (two traces in all) and the per-sample gradients are those
    of the op's output, exact against a per-datapoint loop. Kills ``_Replayer.__torch_function__`` 18 (softmax) and
    61 (``add_``): ``<=`` for ``<`` read the plan's entry one past its end, an ``IndexError`` the forward caught, so
    the replay ended with the plan's count of ops and was accepted: the gradients of ``a(x)`` for a model whose
    output is its softmax (or that plus 1), silently."""
    traces = _counting_traces(monkeypatch)
    torch.manual_seed(14)
    model = CatchesIndexError(extra).to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    gradgraph.to_graph(model, inputs, None, squared)
    model.more = True
    graph = gradgraph.to_graph(model, inputs, None, squared)
    for i in range(4):
        model.zero_grad()
        squared(model(inputs[i:i + 1]), None).sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(graph.per_sample_grads()[name][i], param.grad, atol=1e-10, rtol=0,
                                       msg=f"{name}, datapoint {i}")
    assert len(traces) == 2


class NumpyKeywords(nn.Module):
    """NumPy's keyword names for a reduction (I-BERT's ``x.mean(axis=2)``, ImageGPT's ``torch.mean(..., axis=-1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(axis=-1, keepdims=True))


def test_a_forward_with_numpys_keyword_names_is_replayed_at_its_second_conversion(monkeypatch):
    """``axis=`` / ``keepdims=``: the replay renames them as the trace did, so the second conversion replays the plan
    (one trace in all), exact against torch.func. Kills ``_Replayer.__torch_function__`` 33 (the op's name not
    handed to ``numpy_keywords``: an ``AttributeError`` at the replay, which reached the user)."""
    torch.manual_seed(15)
    _replayed_exactly(NumpyKeywords().to(DTYPE), lambda seed: torch.randn(
        4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch)


class ScoresScaledInPlace(nn.Module):
    """Attention written out, its scores scaled and masked in place (``div_``, ``masked_fill_``): the trace keeps
    both in place (rules_attention.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        scores.div_(2.0)
        scores.masked_fill_(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        return self.out(torch.softmax(scores, -1) @ self.v(x))


def test_an_in_place_op_the_trace_kept_in_place_is_replayed_in_place(monkeypatch):
    """The second conversion replays the plan (one trace in all), running the op in place where the plan's log has
    it in place; exact against torch.func. Kills ``_Replayer.__torch_function__`` 60 (``or``: the op run out of
    place, which mismatches the log: traced again) and 73 (``in_place = ""``: the replay marks a target it never
    read as stale, an ``UnboundLocalError`` that reached the user); both also by the ``add_`` case above."""
    torch.manual_seed(16)
    _replayed_exactly(ScoresScaledInPlace().to(DTYPE), lambda seed: torch.randn(
        3, 5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch)


class MaskByKeyword(nn.Module):
    """A fixed mask that differs between neurons (it pins them: a value guard), passed by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0]))

    def forward(self, x):
        return self.b(torch.mul(torch.tanh(self.a(x)), other=self.mask))


def test_a_guarded_constant_passed_by_keyword_is_replayed_at_its_second_conversion(monkeypatch):
    """The value guard of ``other=mask`` finds the mask among the keyword arguments, so the second conversion
    replays the plan (one trace in all), exact against torch.func. Kills ``_Replayer.__torch_function__`` 101 (the
    keyword arguments left out of the guard's positions: the guard fails, and every conversion traces afresh)."""
    torch.manual_seed(17)
    _replayed_exactly(MaskByKeyword().to(DTYPE), lambda seed: torch.randn(
        4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)), monkeypatch)


class TapsThenRepeatedInput(nn.Module):
    """The input read as a convolution's windows (``conv``), then a GRU fed one vector at every step (refused folded:
    ``RepeatedInput``), then the input read again (``again``): the first trace is refused folded, the one after it
    (unrolled, the input as windows) meets the second read, and the input is read as channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.again = nn.Conv1d(3, 3, 2), nn.Conv1d(3, 2, 1)
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        out = self.head(self.rnn(h[:, :1].expand(-1, h.shape[1], -1))[0][:, -1])
        return out + self.again(x).sum(2)


class TapsThenWeightsPerStep(nn.Module):
    """The same with a hand-written loop whose steps use a weight each (``FoldMismatch`` at the second step, before
    the input is read again)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.again = nn.Conv1d(3, 3, 2), nn.Conv1d(3, 2, 1)
        self.maps = nn.ModuleList(nn.Linear(3, 4) for _ in range(4))
        self.recurrent_map, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def step(self, h, x_t):
        return torch.tanh(self.maps[self.t](x_t) + self.recurrent_map(h))

    def forward(self, x):
        c = self.conv(x).transpose(1, 2)
        h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        for t in range(c.shape[1]):
            self.t = t
            h = gradgraph.recurrent_step(self.step, h, c[:, t])
        return self.head(h) + self.again(x).sum(2)


@pytest.mark.parametrize("make, reason", [
    (TapsThenRepeatedInput, r"folded, the forward was refused: \S+:\d+ in TapsThenRepeatedInput\.forward \(module "
                            r"'rnn' of type GRU\): torch\.nn\.functional\.linear: copies values of one position .*"),
    (TapsThenWeightsPerStep, re.escape("a step labels its neuron sets otherwise than the first step")),
])
def test_a_loop_that_does_not_fold_before_the_input_is_read_again_is_unrolled_once(make, reason):
    """A loop that does not fold, met while the input is read as windows, and the input read again after it: every
    trace after the first runs unrolled, so the model converts exactly (a per-datapoint loop) with one warning.
    Kills ``trace_model`` 75 (the attempts left after a folded refusal run folded: the input-as-channels trace is
    refused folded again, and the folded refusal is raised: a model that converts, refused) and 66 (the same after
    a ``FoldMismatch``: a second warning). Since session 20 the warning is given once, after the last trace, so the
    latter (64 in run run 7) is one more folded trace that meets the same mismatch: equivalent in value
    (docs/mutation.md)."""
    torch.manual_seed(18)
    model = make().to(DTYPE).eval()
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _matches_loop(model, torch.randn(3, 3, 5, dtype=DTYPE))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fold" in str(w.message)]
    assert len(messages) == 1, messages
    assert re.fullmatch(rf"to_graph: a recurrent loop of {make.__name__} does not fold over time \({reason}\); "
                        + re.escape(_UNFOLDED), messages[0], flags=re.S), messages[0]


# ---------------------------------------------------------- where a refusal is located (_locate_in_module, _user_frame)
class ScaledByAHook(nn.Module):
    """A forward hook of the model itself runs after the module tracker left the model: no module is on the stack
    when it refuses ``exp`` of a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.scale = nn.Linear(3, 3), nn.Parameter(torch.ones(3))
        self.register_forward_hook(lambda module, args, output: output * torch.exp(module.scale))  # THE HOOK

    def forward(self, x):
        return self.a(x)


class ExpOf(nn.Module):
    def forward(self, h, w):
        return h * torch.exp(w)  # EXP IN A MODULE MADE IN THE FORWARD


class ScaledByAModuleMadeInTheForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.scale = nn.Linear(3, 3), nn.Parameter(torch.ones(3))

    def forward(self, x):
        return ExpOf()(self.a(x), self.scale)


_EXP_OF = ("torch.exp: the parameter '{}' used where gradgraph expects neuron values (arithmetic on a parameter "
           "before it meets the input: a learned slope, scale or mask)")


def test_a_refusal_with_no_module_on_the_stack_names_the_users_line():
    """A refusal in the model's own forward hook (no module on the tracker's stack): the user's line, no module.
    Kills ``_locate_in_module`` 1 (``and`` for ``or``: the stack's last entry read from an empty stack, an
    ``IndexError`` that reached the user)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(ScaledByAHook().to(DTYPE), torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert str(caught.value) == (f"test_convert_run_values.py:{_line('THE HOOK')} in "
                                 f"ScaledByAHook.__init__.<locals>.<lambda>: {_EXP_OF.format('scale')}")


def test_a_refusal_in_a_module_made_in_the_forward_names_its_line_and_type():
    """A module the model does not register (made in the forward) refuses an op at once: its own line, the module by
    its type. Kills ``_locate_in_module`` 11 (its forward's code read from ``type(None)``: an ``AttributeError``
    that reached the user)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(ScaledByAModuleMadeInTheForward().to(DTYPE), torch.randn(3, 3, dtype=DTYPE), None, squared)
    assert str(caught.value) == (f"test_convert_run_values.py:{_line('EXP IN A MODULE MADE IN THE FORWARD')} in "
                                 f"ExpOf.forward (module 'ExpOf' of type ExpOf): {_EXP_OF.format('scale')}")


def _exp_of(h, w):
    return h * torch.exp(w)  # EXP IN A HELPER


class ExpBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.scale = nn.Linear(4, 4), nn.Parameter(torch.ones(4))

    def forward(self, x):
        return _exp_of(self.a(x), self.scale)


class ForwardSetOnTheInstance(nn.Module):
    """The model's class forward is never run: the instance's ``forward`` (a lambda of the user's) calls a submodule,
    so no frame of the model's own forward is on the way to a refusal."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.seq, self.block = _refused_convolution(), ExpBlock()
        self.forward = (lambda x: self.seq(x)) if which == "seq" else (lambda x: self.block(x))  # THE LAMBDA


def test_a_refusal_in_a_stock_module_called_off_the_models_forward_is_located_in_that_modules_forward():
    """The lambda calls an ``nn.Sequential`` whose ``Conv1d`` refuses: the frames above the module (the lambda's)
    are not the model's, so the location is ``Conv1d.forward``'s line, as for the Sequential converted alone.
    Kills ``_locate_in_module`` 31, 36 (the model's forward counted as seen from the first frame on) and 40
    (``user_traceback = ""`` at the module's frame): each kept the lambda's line."""
    import inspect

    lines, first = inspect.getsourcelines(nn.Conv1d.forward)
    line = first + next(i for i, text in enumerate(lines) if "return" in text)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(ForwardSetOnTheInstance("seq").to(DTYPE), torch.randn(3, 4, dtype=DTYPE), None, squared)
    assert caught.value.location == f"conv.py:{line} in Conv1d.forward"
    assert str(caught.value).startswith(f"conv.py:{line} in Conv1d.forward (module 'seq.2' of type Conv1d): ")


def test_a_refusal_in_user_code_below_a_module_called_off_the_models_forward_keeps_the_users_line():
    """The lambda calls a block whose forward calls a helper of the user's that refuses: the helper's line (user
    code below the module's frame is the better location). Kills ``_locate_in_module`` 46 (``is None`` for ``is not
    None``: the helper's frame not counted, the location moved up to ``ExpBlock.forward``)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as caught:
        gradgraph.to_graph(ForwardSetOnTheInstance("block").to(DTYPE), torch.randn(3, 4, dtype=DTYPE), None, squared)
    assert str(caught.value) == (f"test_convert_run_values.py:{_line('EXP IN A HELPER')} in _exp_of (module 'block' "
                                 f"of type ExpBlock): {_EXP_OF.format('block.scale')}")


def test_without_co_qualname_a_location_names_the_function_by_its_co_name():
    """Python 3.10's code objects have no ``co_qualname`` (3.11 added it; gradgraph supports 3.10): a location then
    names the function by ``co_name``. Stand-ins for a traceback and a code object of 3.10 (this interpreter's have
    ``co_qualname``), for the two places that read it. Kills ``_user_frame`` 16, 19 and ``_locate_in_module`` 55, 58
    (the default ``None``, or none: "in None", or an ``AttributeError``)."""
    from types import SimpleNamespace

    from gradgraph.convert.trace import run

    code = SimpleNamespace(co_filename=os.path.join(os.sep, "work", "blocks.py"), co_name="forward")
    traceback = SimpleNamespace(tb_frame=SimpleNamespace(f_code=code), tb_lineno=7, tb_next=None)
    assert run._user_frame(traceback) == "blocks.py:7 in forward"

    class Stock(nn.Module):
        pass

    Stock.forward = SimpleNamespace(__code__=code)  # what _locate_in_module reads of the module's forward
    error = UnsupportedOperationError("0", "torch.exp", "model.py:3 in run", "no rule")
    tracer = SimpleNamespace(module_stack=["", "0"], model=nn.Sequential(Stock()))
    run._locate_in_module(error, traceback, tracer)
    assert error.location == "blocks.py:7 in forward"
    assert str(error) == "blocks.py:7 in forward (module '0'): torch.exp: no rule"


# ---------------------------------------------------------- a loop that does not fold, refused unrolled (mut40)
class TableStateThroughAMap(nn.Module):
    """``h_t = tanh(inp(x_t) + rec(h_{t-1}))`` with ``h_0`` a learned row of a table (``nn.Embedding`` at index 0):
    the loop does not fold (a state that does not depend on the model input) and, unrolled, ``rec`` reads the row,
    values that do not depend on the input: refused."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.inp, self.rec, self.head = nn.Embedding(2, 4), nn.Linear(3, 4), nn.Linear(4, 4), \
            nn.Linear(4, 2)

    def step(self, h, x_t):
        return torch.tanh(self.inp(x_t) + self.rec(h))

    def forward(self, x):
        h = self.table(torch.zeros(x.shape[0], dtype=torch.long))
        for t in range(x.shape[1]):
            h = gradgraph.recurrent_step(self.step, h, x[:, t])
        return self.head(h)


def test_a_loop_that_does_not_fold_and_is_refused_unrolled_warns_so_once_in_full():
    """``trace_model`` says, once the unrolled trace is refused, why the loop did not fold and that the forward is
    refused (not "converted unrolled, exactly"), the warning in full, and raises the unrolled refusal. Kills
    ``trace_model`` 67-74 (the model, the reason or the outcome of that warning dropped, ``None`` or misspelt)."""
    torch.manual_seed(28)
    gradgraph.convert.clear_structure_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedOperationError, match="module 'rec' of type Linear"):
            gradgraph.to_graph(TableStateThroughAMap().to(DTYPE).eval(), torch.randn(3, 4, 3, dtype=DTYPE), None,
                               squared)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fold" in str(w.message)] == [
        "to_graph: a recurrent loop of TableStateThroughAMap does not fold over time (a state that does not depend "
        "on the model input); traced unrolled, the forward is refused (the error below). Pass fold_time=False to ask "
        "for the unrolled layout"]


def test_of_datapoints_tells_the_values_of_datapoints_from_those_of_parameters_tables_and_data():
    """``meta.of_datapoints`` against its docstring, on hand-made metas: neurons bound to datapoints (``comps`` set),
    the input (``Raw``), scores whose query or key holds such neurons, and opaque values made from any of them vary
    with the datapoints; parameters (``Param``, ``Resampled``), a table's rows read at constant indices (``comps``
    ``None``), scores between two such tables, the data's masks and ids (``Data``) and constants (``None``) do not.
    Kills ``of_datapoints``' mutants: a test flipped, the scores' ``or`` made ``and``, the opaque value's own field
    not returned (issue 31, run run 13)."""
    from gradgraph.convert.trace.meta import Neurons, Opaque, Param, Raw, Resampled, Scores, of_datapoints
    from gradgraph.convert.trace.rules_data import Data

    nodes = torch.arange(3)
    bound, table = Neurons(nodes, torch.zeros(3, dtype=torch.long), {}), Neurons(nodes, None, {})
    varying = [bound, Raw(nodes), Scores(bound, bound, ()), Scores(table, bound, ()), Scores(bound, table, ()),
               Opaque("torch.cumsum", "m.py:1 in M.forward", "", "has no rule")]
    constant = [table, Scores(table, table, ()), Param(0, nodes), Resampled(0, nodes, nodes[:, None], torch.ones(3, 1)),
                Data(nodes), Data(None), None,
                Opaque("torch.cumsum", "m.py:1 in M.forward", "", "has no rule", of_datapoints=False)]
    assert [of_datapoints(meta) for meta in varying] == [True] * len(varying)
    assert [of_datapoints(meta) for meta in constant] == [False] * len(constant)


def test_an_output_made_from_detached_values_is_refused_by_trace_model_in_full():
    """``trace_model`` refuses a model output made from values of the datapoints whose gradient was cut
    (``out / out.detach().abs().max()``, two datapoints): the message in full, naming the detach and where it ran,
    the batch size and the remedies (``test_convert_safety.py``'s tests of it match its start). Kills
    ``trace_model`` 58-60 (the check dropped or flipped: the model converts) and 61-73 (the message: the op's
    name, the reason, its words) (issue 31, run run 13)."""
    torch.manual_seed(5)
    model, inputs = DetachedTail().to(DTYPE), torch.randn(2, 3, dtype=DTYPE)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError) as error:
        gradgraph.to_graph(model, inputs, None, squared)
    assert re.fullmatch(
        r"\S+:\d+ in \S+: the model's output: is made from values of the datapoints whose gradient was cut "
        r"\(Tensor\.detach at \S+:\d+ in \S+\): a statistic of the batch made so "
        r"\(out / out\.detach\(\)\.abs\(\)\.max\(\)\) couples the 2 datapoints where autograd sees a constant, and "
        r"gradgraph cannot tell it from one of a datapoint alone, so every per-sample gradient could be silently "
        r"wrong\. Compute the output with gradient \(no detach or torch\.no_grad\(\)\), or convert one datapoint at a "
        r"time", str(error.value)), \
        str(error.value)
