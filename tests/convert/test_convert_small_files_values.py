"""The small files of convert/ written out (issue 31, runs small 1-n of group ``convert-small``).

``registry.py`` (``register_converter``, ``registered_converters``, ``to_graph`` / ``convert_closure``'s checks and
dispatch), ``attention.py`` (``transformer_structure``), ``mlp.py`` (``mlp_layers``), ``trace/result.py``
(``TraceResult``), ``deprecated.py`` (the aliases). Each test checks against an independent ground truth: a
registered converter's graph against per-sample gradients by ``torch.func`` in float64, ``mlp_layers`` against the
model's own layers, a deprecated alias's graph tensor for tensor against ``to_graph``'s, a refusal's message in full
(what and where). The docstrings name the mutants each kills (checked with ``MUTANT_UNDER_TEST`` in
``.mutation/convert-small/mutants/``).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph import GradGraphError, UnsupportedModuleError
from gradgraph.convert import deprecated, mlp_layers, registry
from gradgraph.convert.attention import EncoderLayerParts, transformer_structure
from gradgraph.convert.trace import trace_model
from gradgraph.graph import ActivationKind
from gradgraph.symmetry.permutation import permute_hidden, random_hidden_perms

DTYPE = torch.float64


@pytest.fixture
def clean_registry():
    """The registry as it was before the test, whatever the test registered."""
    before = list(registry._REGISTRY)
    yield
    registry._REGISTRY[:] = before


def _squared_loss(output, target):
    return output.pow(2).sum(1)


def _assert_per_sample_grads(graph, model, inputs, loss_fn, targets=None):
    """The graph's per-sample gradients equal autograd's on each datapoint alone (a loop), float64 at 1e-10."""
    ours = graph.per_sample_grads()
    params = dict(model.named_parameters())
    assert set(ours) == set(params)
    for i in range(inputs.shape[0]):
        target = None if targets is None else targets[i:i + 1]
        expected = torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), target).sum(), list(params.values()))
        for (name, _), value in zip(params.items(), expected):
            torch.testing.assert_close(ours[name][i], value, rtol=0, atol=1e-10, msg=name)


def test_a_predicate_matcher_routes_its_models_to_its_converter_and_the_newest_is_asked_first(clean_registry):
    """A predicate registered with ``register_converter`` (not a type) is asked with the model; the converter it
    routes to gets the batch, the loss and the forward's keywords; the newest registration is asked first and named
    first; a registered converter's graph is the traced one of the same model (per-sample gradients by torch.func)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(5, 3, dtype=DTYPE)
    seen = []

    def older(model, inputs, *, targets, loss_fn, forward_kwargs):
        raise AssertionError("the older registration must not be asked first")

    def by_predicate(model, inputs, *, targets, loss_fn, forward_kwargs):
        seen.append((targets, loss_fn, dict(forward_kwargs)))
        return registry._FALLBACK[0](model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs)

    gradgraph.register_converter(lambda m: isinstance(m, nn.Sequential), older)
    gradgraph.register_converter(lambda m: isinstance(m, nn.Sequential) and len(m) == 3, by_predicate, name="three")
    names = gradgraph.registered_converters()
    assert names[:2] == ["three", "older"]
    assert names[-1] == registry._FALLBACK[0].__name__
    graph = gradgraph.to_graph(model, inputs, "the targets", _squared_loss)
    assert seen == [("the targets", _squared_loss, {})]
    _assert_per_sample_grads(graph, model, inputs, _squared_loss)


def _tanh_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE), torch.randn(5, 3, dtype=DTYPE)


def _same_graph(graph, expected):
    for key in ("edge_index", "act", "grad", "edge_attr", "x", "perm_group", "node_kind"):
        assert torch.equal(graph[key], expected[key]), key


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


class _SubCustom(_Custom):
    pass


def _traced(model, inputs, *, targets, loss_fn, forward_kwargs):
    return registry._FALLBACK[0](model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs)


def test_register_converter_as_a_decorator_returns_the_function_and_names_it(clean_registry):
    """The decorator form keeps the function (``add`` returns it) and names it by ``__name__``; a type matches its
    subclasses (``isinstance``) and nothing else; a callable without ``__name__`` is named by its ``repr``."""

    @gradgraph.register_converter(_Custom)
    def convert_custom(model, inputs, *, targets, loss_fn, forward_kwargs):
        return _traced(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs)

    assert convert_custom.__name__ == "convert_custom" and callable(convert_custom)
    assert gradgraph.registered_converters()[0] == "convert_custom"
    entry = registry._REGISTRY[-1]
    assert entry.converter is convert_custom and entry.name == "convert_custom"
    assert entry.matches(_SubCustom()) is True and entry.matches(nn.Linear(3, 2)) is False

    class Unnamed:
        def __call__(self, model, inputs, *, targets, loss_fn, forward_kwargs):
            return _traced(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs=forward_kwargs)

        def __repr__(self):
            return "<the unnamed converter>"

    unnamed = Unnamed()
    assert gradgraph.register_converter(nn.Sequential, unnamed) is unnamed
    assert gradgraph.registered_converters()[:2] == ["<the unnamed converter>", "convert_custom"]


def test_register_converter_refuses_a_type_that_is_no_module_and_a_match_that_is_neither(clean_registry):
    """The two refusals of ``register_converter``, in full; nothing is registered by either."""
    before = list(registry._REGISTRY)
    with pytest.raises(TypeError, match=r"^register_converter: int is not an nn\.Module subclass$"):
        gradgraph.register_converter(int, _traced)
    with pytest.raises(TypeError, match=r"^register_converter: match must be a module type or a predicate, got 3$"):
        gradgraph.register_converter(3, _traced)
    assert registry._REGISTRY == before


def test_registered_converters_lists_the_newest_first_and_the_traced_converter_last(clean_registry):
    """``registered_converters`` is the order ``to_graph`` asks: newest registration first, the fallback last."""
    registry._REGISTRY[:] = []
    assert gradgraph.registered_converters() == [registry._FALLBACK[0].__name__]
    gradgraph.register_converter(_Custom, _traced, name="first")
    gradgraph.register_converter(nn.Sequential, _traced, name="second")
    assert gradgraph.registered_converters() == ["second", "first", registry._FALLBACK[0].__name__]


def test_a_registered_converter_gets_the_models_call_and_its_graph_is_exact(clean_registry):
    """A converter registered for a type gets the model, the batch, the targets, the loss and the forward's
    keywords as given (a mapping input read as ``model(**inputs)``); the graph it returns is ``to_graph``'s answer
    (per-sample gradients against torch.func, float64, 1e-10)."""
    calls = []

    def convert_custom(model, inputs, *, targets, loss_fn, forward_kwargs):
        calls.append((model, inputs, targets, loss_fn, dict(forward_kwargs)))
        return _traced(model, inputs, targets=targets, loss_fn=loss_fn, forward_kwargs={})

    gradgraph.register_converter(_Custom, convert_custom)
    torch.manual_seed(3)
    model = _SubCustom().to(DTYPE)
    inputs, targets = torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,))

    def cross_entropy(output, target):
        return F.cross_entropy(output, target, reduction="none")

    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy, forward_kwargs={"scale": 2})
    assert len(calls) == 1
    assert calls[0][0] is model and calls[0][1] is inputs and calls[0][2] is targets and calls[0][3] is cross_entropy
    assert calls[0][4] == {"scale": 2}
    _assert_per_sample_grads(graph, model, inputs, cross_entropy, targets)
    gradgraph.to_graph(model, {"x": inputs}, targets, cross_entropy)
    assert calls[1][1] is inputs and calls[1][4] == {}


def test_a_registered_converter_refuses_datapoints_and_a_meta_model(clean_registry):
    """A registered converter takes no ``datapoints`` (only the traced converter reads rows of several datapoints)
    and never sees a model on the meta device: both refused, in full, before it is called."""
    gradgraph.register_converter(_Custom, lambda *args, **kwargs: pytest.fail("must not be called"), name="mine")
    inputs = torch.randn(4, 3)
    with pytest.raises(GradGraphError, match=re.escape(
            "to_graph: the registered converter 'mine' matches _Custom and takes no datapoints; only the traced "
            "converter reads rows of several datapoints")):
        gradgraph.to_graph(_Custom(), inputs, datapoints=torch.zeros(4, dtype=torch.long))
    with torch.device("meta"):
        meta = _Custom()
    with pytest.raises(GradGraphError, match=r"^to_graph: _Custom has parameters on the 'meta' device"):
        gradgraph.to_graph(meta, inputs)


def test_to_graph_refuses_what_is_no_module_and_inputs_that_are_no_tensor():
    """``to_graph``'s type checks, in full."""
    with pytest.raises(TypeError, match=r"^to_graph: model must be an nn\.Module, got function$"):
        gradgraph.to_graph(lambda x: x, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"^to_graph: inputs must be a Tensor, got list$"):
        gradgraph.to_graph(nn.Linear(3, 2), [torch.randn(2, 3)])


def test_to_graph_refuses_key_or_value_given_to_a_multihead_attention():
    """Cross-attention through ``forward_kwargs`` is refused, the keys named sorted; other keywords pass."""
    attention = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE).eval()
    inputs = torch.randn(2, 3, 4, dtype=DTYPE)
    for kwargs, named in (({"key": inputs}, "['key']"), ({"value": inputs, "key": inputs}, "['key', 'value']")):
        with pytest.raises(GradGraphError, match=re.escape(
                f"to_graph: {named} passed through forward_kwargs to an nn.MultiheadAttention; gradgraph converts "
                "self-attention, where `inputs` is the query, key and value at once (cross-attention is not "
                "supported)")):
            gradgraph.to_graph(attention, inputs, forward_kwargs=kwargs)


def test_to_graph_without_a_fallback_refuses_the_model(monkeypatch, clean_registry):
    """No registered converter matches and no traced converter is set: refused naming the model's type."""
    monkeypatch.setattr(registry, "_FALLBACK", [])
    with pytest.raises(UnsupportedModuleError, match="no registered converter matches it") as refusal:
        gradgraph.to_graph(_Custom(), torch.randn(2, 3))
    assert refusal.value.path == "" and "_Custom" in str(refusal.value)


def test_the_fallback_gets_datapoints_and_fold_time_only_when_set(monkeypatch):
    """Options past the common four reach the fallback only when set (a fallback made before them keeps working):
    ``datapoints`` when given, ``fold_time`` only when ``False``."""
    calls = []

    def old_fallback(model, inputs, *, targets, loss_fn, forward_kwargs, **options):
        calls.append(options)
        return "graph"

    monkeypatch.setattr(registry, "_FALLBACK", [old_fallback])
    model, inputs = _Custom(), torch.randn(4, 3)
    rows = torch.tensor([0, 0, 1, 1])
    assert gradgraph.to_graph(model, inputs) == "graph"
    gradgraph.to_graph(model, inputs, fold_time=True)
    gradgraph.to_graph(model, inputs, datapoints=rows)
    gradgraph.to_graph(model, inputs, fold_time=False)
    assert calls[:2] == [{}, {}]
    assert set(calls[2]) == {"datapoints"} and calls[2]["datapoints"] is rows
    assert calls[3] == {"fold_time": False}


def test_fold_time_false_unrolls_a_recurrent_loop_and_both_layouts_are_exact():
    """``to_graph(..., fold_time=False)`` reaches the traced converter: an ``nn.RNN`` unrolled has one component
    per datapoint, folded one per (datapoint, step); both give torch.func's per-sample gradients."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.RNN(2, 3, batch_first=True), nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(4)
    model, inputs = Recurrent().to(DTYPE), torch.randn(3, 4, 2, dtype=DTYPE)
    folded = gradgraph.to_graph(model, inputs, None, _squared_loss)
    unrolled = gradgraph.to_graph(model, inputs, None, _squared_loss, fold_time=False)
    assert unrolled.num_nodes > folded.num_nodes
    _assert_per_sample_grads(folded, model, inputs, _squared_loss)
    _assert_per_sample_grads(unrolled, model, inputs, _squared_loss)


def _cross_entropy(output, target):
    return F.cross_entropy(output, target, reduction="none")


def test_convert_closure_refuses_what_is_no_module_no_callable_or_a_meta_model():
    """``convert_closure``'s checks, in full."""
    with pytest.raises(TypeError, match=r"^convert_closure: model must be an nn\.Module, got int$"):
        gradgraph.convert_closure(3, lambda: None)
    with pytest.raises(TypeError, match=r"^convert_closure: closure must be callable, got int$"):
        gradgraph.convert_closure(nn.Linear(3, 2), 3)
    with torch.device("meta"):
        meta = _Custom()
    with pytest.raises(GradGraphError, match=r"^convert_closure: _Custom has parameters on the 'meta' device"):
        gradgraph.convert_closure(meta, lambda: pytest.fail("the closure must not run"))


def test_convert_closure_refuses_a_model_a_registered_converter_matches(clean_registry):
    """A registered converter takes a batch and a loss, not a closure: refused naming it and what to call."""
    gradgraph.register_converter(_Custom, _traced, name="mine")
    model = _SubCustom()
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "the registered converter 'mine' takes a batch and a loss function, not a closure: call "
            "to_graph(model, inputs, targets, loss_fn)")) as refusal:
        gradgraph.convert_closure(model, lambda: pytest.fail("the closure must not run"))
    assert refusal.value.path == "" and "_SubCustom" in str(refusal.value)


def test_convert_closure_passes_datapoints_and_its_graph_is_exact():
    """A closure's graph and losses are autograd's per datapoint; ``datapoints`` reaches the traced converter (rows
    of two datapoints, summed per datapoint)."""
    model, inputs = _tanh_chain()
    graph, losses = gradgraph.convert_closure(model, lambda: _squared_loss(model(inputs), None))
    _assert_per_sample_grads(graph, model, inputs, _squared_loss)
    torch.testing.assert_close(losses, _squared_loss(model(inputs), None).detach(), rtol=0, atol=0)
    rows = torch.tensor([0, 0, 1, 1, 1])

    def per_datapoint(output):
        return torch.zeros(2, dtype=DTYPE).index_add(0, rows, output.pow(2).sum(1))

    graph, losses = gradgraph.convert_closure(model, lambda: per_datapoint(model(inputs)), datapoints=rows)
    assert losses.shape == (2,)
    params = dict(model.named_parameters())
    for point in range(2):
        expected = torch.autograd.grad(per_datapoint(model(inputs))[point], list(params.values()))
        for (name, _), value in zip(params.items(), expected):
            torch.testing.assert_close(graph.per_sample_grads()[name][point], value, rtol=0, atol=1e-10, msg=name)


def test_convert_closure_in_inference_mode_passes_its_datapoints_and_reraises_other_errors():
    """Inside inference mode ``convert_closure`` runs again outside it with the same ``datapoints``; an error that is
    not torch's inference-tensor one comes out as it is (not reworded as one)."""
    model, inputs = _tanh_chain()
    rows = torch.tensor([0, 0, 1, 1, 1])

    def per_datapoint(output):
        return torch.zeros(2, dtype=DTYPE).index_add(0, rows, output.pow(2).sum(1))

    outside, _ = gradgraph.convert_closure(model, lambda: per_datapoint(model(inputs)), datapoints=rows)
    with torch.inference_mode():
        inside, losses = gradgraph.convert_closure(model, lambda: per_datapoint(model(inputs)), datapoints=rows)
    assert losses.shape == (2,)
    for name, value in outside.per_sample_grads().items():
        torch.testing.assert_close(inside.per_sample_grads()[name], value, rtol=0, atol=0, msg=name)

    def failing():
        model(inputs)
        raise RuntimeError("the closure's own error")

    with torch.inference_mode(), pytest.raises(RuntimeError, match="^the closure's own error$"):
        gradgraph.convert_closure(model, failing)


def test_to_graph_in_inference_mode_keeps_fold_time_datapoints_and_tensors_made_outside(monkeypatch):
    """The call inside inference mode is made again outside it with every argument: ``fold_time`` and
    ``datapoints`` reach the fallback, and a tensor made outside inference mode is passed as it is (only
    inference tensors are copied)."""
    calls = []

    def fallback(model, inputs, *, targets, loss_fn, forward_kwargs, **options):
        calls.append((inputs, targets, loss_fn, dict(forward_kwargs), options, torch.is_inference_mode_enabled()))
        return "graph"

    monkeypatch.setattr(registry, "_FALLBACK", [fallback])
    model = _Custom()
    inputs, targets, scale, rows = torch.randn(4, 3), torch.randn(4), torch.randn(4), torch.tensor([0, 0, 1, 1])
    with torch.inference_mode():
        made_inside = torch.randn(4, 3)
        assert gradgraph.to_graph(model, inputs, targets, _squared_loss, forward_kwargs={"scale": scale},
                                  datapoints=rows, fold_time=False) == "graph"
        gradgraph.to_graph(model, made_inside, [made_inside], _squared_loss)
    seen_inputs, seen_targets, loss_fn, kwargs, options, inference = calls[0]
    assert seen_inputs is inputs and seen_targets is targets and loss_fn is _squared_loss
    assert kwargs["scale"] is scale and options["datapoints"] is rows and options["fold_time"] is False
    assert inference is False
    assert calls[1][4] == {}  # fold_time left at its default inside inference mode too
    copied_inputs, copied_targets = calls[1][0], calls[1][1]
    assert not copied_inputs.is_inference() and not copied_targets[0].is_inference()
    assert torch.equal(copied_inputs, made_inside) and torch.equal(copied_targets[0], made_inside)


def test_a_compiled_model_converts_as_its_original_and_keeps_its_compiled_forward():
    """``torch.compile(model)``: ``to_graph`` and ``convert_closure`` convert the wrapped module (exact per-sample
    gradients), the closure's call of the wrapper reaches the original's forward, and the wrapper's compiled forward
    is back after the closure, also when the closure raises."""
    model, inputs = _tanh_chain()
    compiled = torch.compile(model)
    compiled_forward = vars(compiled)["forward"]
    graph = gradgraph.to_graph(compiled, inputs, None, _squared_loss)
    _assert_per_sample_grads(graph, model, inputs, _squared_loss)
    closure_graph, losses = gradgraph.convert_closure(compiled, lambda: _squared_loss(compiled(inputs), None))
    _assert_per_sample_grads(closure_graph, model, inputs, _squared_loss)
    assert vars(compiled)["forward"] is compiled_forward

    def failing():
        compiled(inputs)
        raise ValueError("stop")

    with pytest.raises(ValueError, match="^stop$"):
        gradgraph.convert_closure(compiled, failing)
    assert vars(compiled)["forward"] is compiled_forward


def test_a_module_named_like_a_compiled_wrapper_is_read_only_when_it_wraps_a_module_with_a_forward_of_its_own():
    """``_uncompiled`` unwraps only dynamo's wrapper: a class named ``OptimizedModule`` whose ``_orig_mod`` is no
    module, or that has no forward of its own in its ``__dict__``, is converted as it is."""

    class OptimizedModule(nn.Module):
        def __init__(self, inner, orig):
            super().__init__()
            self.inner = inner
            object.__setattr__(self, "_orig_mod", orig)

        def forward(self, x):
            return self.inner(x)

    class Wrapper(OptimizedModule):
        pass

    model, inputs = _tanh_chain()
    other = nn.Linear(3, 2).to(DTYPE)
    not_a_module, no_forward, other_name, unwrapped = (OptimizedModule(model, "not a module"),
                                                       OptimizedModule(model, other), Wrapper(model, other),
                                                       OptimizedModule(model, other))
    for wrapper in (not_a_module, other_name, unwrapped):
        wrapper.forward = wrapper.inner.__call__
    assert registry._uncompiled(not_a_module) is not_a_module and registry._uncompiled(no_forward) is no_forward
    assert registry._uncompiled(other_name) is other_name and registry._uncompiled(unwrapped) is other
    graph = gradgraph.to_graph(no_forward, inputs, None, _squared_loss)
    assert set(graph.per_sample_grads()) == {f"inner.{name}" for name, _ in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- attention.py


def _refused(model, path, module_type, reason):
    """``transformer_structure(model)`` refuses with exactly this path, type and reason."""
    where = f"'{path}'" if path else "the root module"
    with pytest.raises(UnsupportedModuleError, match=f"^{re.escape(f'unsupported module at {where} of type ')}"
                                                     f"{re.escape(f'{module_type}: {reason}')}$") as refusal:
        transformer_structure(model)
    assert refusal.value.path == path and refusal.value.module_type == module_type


def _layer(**kwargs):
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **kwargs).eval()


class _Chain(nn.Module):
    """``[nn.Linear] -> core -> [nn.Linear]`` under the given names (the forward is not read)."""

    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)


def test_transformer_structure_of_a_bare_attention_module_and_a_bare_layer():
    """A bare ``nn.MultiheadAttention``: the core is the model at path ``""``, its one attention, no layers, no norm,
    no linears; a bare encoder layer (which holds an attention itself) is the one outermost core, its parts' paths
    relative to the root (``sub('norm1') == 'norm1'``), its default activation ``F.relu`` read as RELU."""
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    structure = transformer_structure(attention)
    assert (structure.core_path, structure.core, structure.attentions) == ("", attention, [("", attention)])
    assert structure.layers == [] and structure.final_norm is None and structure.linears == []
    assert structure.batch_first is True and structure.embed_dim == 8
    layer = _layer()
    structure = transformer_structure(layer)
    assert structure.core_path == "" and structure.core is layer
    assert structure.layers == [EncoderLayerParts("", layer, ActivationKind.RELU)]
    assert structure.layers[0].sub("norm1") == "norm1"
    assert structure.attentions == [("self_attn", layer.self_attn)]
    assert structure.batch_first is False and structure.embed_dim == 8 and structure.linears == []


def test_transformer_structure_of_an_encoder_in_a_chain_of_linears():
    """An encoder of two layers with a final norm between two ``nn.Linear`` s: paths, activations (a module and a
    function), the final norm, the linears in order (a sibling whose name starts with the core's is outside it);
    parameterless modules of the wrapper are allowed."""
    first, second = _layer(activation=nn.GELU(), batch_first=True), _layer(activation=F.gelu, batch_first=True)
    encoder = nn.TransformerEncoder(first, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    encoder.layers[1] = second
    model = _Chain(proj=nn.Linear(3, 8), enc=encoder, act=nn.ReLU(), encx=nn.Linear(8, 2))
    structure = transformer_structure(model)
    assert structure.core_path == "enc" and structure.core is encoder
    assert structure.layers == [EncoderLayerParts("enc.layers.0", encoder.layers[0], ActivationKind.GELU),
                                EncoderLayerParts("enc.layers.1", second, ActivationKind.GELU)]
    assert structure.layers[1].sub("norm2") == "enc.layers.1.norm2"
    assert structure.attentions == [("enc.layers.0.self_attn", encoder.layers[0].self_attn),
                                    ("enc.layers.1.self_attn", second.self_attn)]
    assert structure.final_norm == ("enc.norm", encoder.norm)
    assert structure.linears == [("proj", model.proj), ("encx", model.encx)]
    assert structure.batch_first is True and structure.embed_dim == 8


def test_transformer_structure_reads_each_activation_kind_by_exact_module_type_or_function():
    """Each activation module or function of the table gives its kind; a subclass of one, an unknown module or an
    unknown function is refused at ``<layer>.activation``, named by type or ``__name__``."""
    for activation, kind in ((nn.ReLU(), ActivationKind.RELU), (nn.Tanh(), ActivationKind.TANH),
                             (torch.tanh, ActivationKind.TANH), (F.silu, ActivationKind.SILU)):
        layer = _layer()
        layer.activation = activation
        assert transformer_structure(layer).layers[0].activation == kind

    class MyReLU(nn.ReLU):
        pass

    reason = ("no elementwise activation rule for it (use relu, gelu or a module of "
              "gradgraph.convert.activations.ACTIVATION_MODULES)")
    for activation, what in ((MyReLU(), "MyReLU"), (nn.Softplus(), "Softplus"), (torch.exp, "exp")):
        layer = _layer()
        layer.activation = activation
        _refused(_Chain(block=layer), "block.activation", what, reason)


def test_transformer_structure_refuses_a_layer_with_another_norm_or_linear():
    """A layer's ``norm1`` / ``norm2`` must be a ``LayerNorm`` over ``embed_dim``, ``linear1`` / ``linear2`` an
    ``nn.Linear``: refused at the part's path."""
    for name, part, what in (("norm1", nn.Identity(), "Identity"), ("norm2", nn.LayerNorm(4), "LayerNorm")):
        layer = _layer()
        setattr(layer, name, part)
        _refused(_Chain(block=layer), f"block.{name}", what, "expected a LayerNorm over embed_dim")
    for name in ("linear1", "linear2"):
        layer = _layer()
        setattr(layer, name, nn.Identity())
        _refused(_Chain(block=layer), f"block.{name}", "Identity", "expected nn.Linear")


def test_transformer_structure_refuses_no_core_two_cores_and_an_encoder_of_other_layers():
    """No attention module; a second one beside the first (named with the first); an encoder whose layer is no
    ``TransformerEncoderLayer``; an encoder's final norm that is not over the layers' width; layers that disagree
    on ``batch_first`` or ``embed_dim``."""
    _refused(nn.Sequential(nn.Linear(3, 3)), "", "Sequential", "contains no nn.MultiheadAttention / Transformer module")
    _refused(_Chain(first=_layer(), second=nn.MultiheadAttention(8, 2)), "second", "MultiheadAttention",
             "a second attention module besides 'first'; one attention module, encoder layer or encoder stack per "
             "model is supported")
    encoder = nn.TransformerEncoder(_layer(), 2, enable_nested_tensor=False)
    encoder.layers[1] = nn.Identity()
    _refused(_Chain(enc=encoder), "enc.layers.1", "Identity", "expected nn.TransformerEncoderLayer")
    for norm, what in ((nn.LayerNorm(4), "LayerNorm"), (nn.Identity(), "Identity")):
        encoder = nn.TransformerEncoder(_layer(), 2, norm=norm, enable_nested_tensor=False)
        _refused(_Chain(enc=encoder), "enc.norm", what, "expected a LayerNorm over embed_dim")
    for other in (_layer(batch_first=True), nn.TransformerEncoderLayer(4, 2, 16, dropout=0.0).eval()):
        encoder = nn.TransformerEncoder(_layer(), 2, enable_nested_tensor=False)
        encoder.layers[1] = other
        _refused(_Chain(enc=encoder), "enc.layers.1.self_attn", "MultiheadAttention",
                 "layers disagree on batch_first or embed_dim")


def test_transformer_structure_refuses_a_wrapper_with_parameters_and_more_than_two_linears():
    """The wrapper may hold the core and at most two ``nn.Linear`` s: its own parameter or buffer, a module with
    parameters that is no ``Linear``, or a third ``Linear`` is refused (the bare core's own parameters are fine)."""
    chain = "the attention converter supports [nn.Linear] -> attention module -> [nn.Linear] chains"
    with_parameter = _Chain(core=_layer())
    with_parameter.scale = nn.Parameter(torch.ones(1))
    _refused(with_parameter, "", "_Chain", f"the wrapper holds parameters or buffers of its own; {chain}")
    with_buffer = _Chain(core=_layer())
    with_buffer.register_buffer("offset", torch.zeros(1))
    _refused(with_buffer, "", "_Chain", f"the wrapper holds parameters or buffers of its own; {chain}")
    _refused(_Chain(core=_layer(), norm=nn.LayerNorm(8)), "norm", "LayerNorm",
             f"a wrapper module with parameters; {chain}")
    buffers = nn.Module()
    buffers.register_buffer("table", torch.zeros(2))
    _refused(_Chain(core=_layer(), table=buffers), "table", "Module", f"a wrapper module with parameters; {chain}")
    _refused(_Chain(a=nn.Linear(8, 8), core=_layer(), b=nn.Linear(8, 8), c=nn.Linear(8, 8)), "c", "Linear",
             f"a third nn.Linear around 'core'; {chain}")
    assert len(transformer_structure(_Chain(a=nn.Linear(8, 8), core=_layer(), b=nn.Linear(8, 8))).linears) == 2


# ----------------------------------------------------------------------------------------------------- mlp.py


class _Three(nn.Module):
    def __init__(self, middle_bias=True, middle_out=4):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, middle_out, bias=middle_bias), nn.Linear(middle_out, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


_NOT_ROW_MAJOR = ("it does not read the previous layer as nn.Linear does (W[k, j] from neuron j to neuron k, every "
                  "entry once): its weight transposed, reordered or in part, or the neurons reordered between layers")


def _mlp_refused(model, path, module_type, reason):
    where = f"'{path}'" if path else "the root module"
    with pytest.raises(UnsupportedModuleError, match=f"^{re.escape(f'unsupported module at {where} of type ')}"
                                                     f"{re.escape(f'{module_type}: {reason}')}$") as refusal:
        mlp_layers(model)
    assert refusal.value.path == path and refusal.value.module_type == module_type


def test_mlp_layers_reads_a_float64_chain_as_the_models_own_layers_and_its_permutation_keeps_the_function():
    """The layers are the model's own ``nn.Linear`` s in forward order (not module order) with the activation that
    follows each; the probe runs in the weights' dtype (float64 here); a hidden permutation of what it read keeps the
    model's function (the ground truth of the structure the symmetry actions use)."""

    class Reordered(_Three):
        def __init__(self):
            super().__init__()
            self.b, self.c = nn.Linear(4, 2), nn.Linear(4, 4)  # registered a, b, c; applied a, c, b

        def forward(self, x):
            return self.b(torch.sigmoid(self.c(torch.relu(self.a(x)))))

    torch.manual_seed(5)
    model = Reordered().to(DTYPE)
    layers = mlp_layers(model)
    assert [(layer.name, layer.linear, layer.activation) for layer in layers] == [
        ("a", model.a, ActivationKind.RELU), ("c", model.c, ActivationKind.SIGMOID), ("b", model.b,
                                                                                       ActivationKind.IDENTITY)]
    inputs = torch.randn(6, 3, dtype=DTYPE)
    permuted = permute_hidden(model, random_hidden_perms(model, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(permuted(inputs), model(inputs), rtol=0, atol=1e-12)


def test_mlp_layers_refuses_a_linears_weight_read_in_another_order():
    """A forward that reads an ``nn.Linear``'s weight transposed, flipped or in part (``F.linear(h, W.flip(0))``), or
    the previous layer's neurons reordered (``b(h.flip(1))``), is no chain of that ``Linear``: its edges are not the
    weight's row-major entries, and a hidden permutation of the layers read from it changes the function (the
    symmetry actions' silent wrong answer). Failed before the fix (``mlp_layers`` read each as layer ``b``)."""

    class Transposed(_Three):
        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x)), self.b.weight.t(), self.b.bias)))

    class Flipped(_Three):
        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x)), self.b.weight.flip(0), self.b.bias)))

    class Part(_Three):
        def __init__(self):
            super().__init__(middle_bias=False, middle_out=5)

        def forward(self, x):
            return self.c(torch.tanh(F.linear(torch.relu(self.a(x))[:, :3], self.b.weight[:, :3])))

    class Reordered(_Three):
        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.relu(self.a(x)).flip(1))))

    for build in (Transposed, Flipped, Reordered):
        torch.manual_seed(6)
        model = build().to(DTYPE)
        inputs = torch.randn(6, 3, dtype=DTYPE)
        permuted = _Three().to(DTYPE)
        permuted.load_state_dict(model.state_dict())
        permuted = permute_hidden(permuted, random_hidden_perms(permuted, torch.Generator().manual_seed(2)))
        moved = build().to(DTYPE)
        moved.load_state_dict(permuted.state_dict())
        assert (moved(inputs) - model(inputs)).abs().max() > 1e-3  # what the action would do to this model
        _mlp_refused(model, "b", "Linear", _NOT_ROW_MAJOR)
    _mlp_refused(Part().to(DTYPE), "b", "Linear", _NOT_ROW_MAJOR)


class _Four(nn.Module):
    def __init__(self, a_bias=True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4, bias=a_bias), nn.Linear(4, 4), nn.Linear(3, 4)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))


def test_mlp_layers_refuses_each_way_a_forward_is_no_chain_by_path_in_full():
    """Each refusal of ``_chain_layers`` with its path and words: a second ``Linear`` reading the input (no chain),
    a forward that applies no ``Linear`` to its input, a bias of another layer (or one given to a layer without
    bias), a weight that belongs to no ``nn.Linear``, and a chain whose output is not returned."""
    cases = (
        (lambda s, x: (s.a(x), s.c(x))[1], "c", "_Four",
         "not an MLP chain: this op is not an nn.Linear applied to the previous layer's output"),
        (lambda s, x: x, "", "_Four",
         "not an MLP chain: its forward does not apply nn.Linear layers to its input one after the other"),
        (lambda s, x: F.linear(x, s.a.weight, s.b.bias), "a", "Linear", "its output gets a bias other than its own"),
        (lambda s, x: s.b(torch.relu(F.linear(x, s.a.weight)))[:, :2], "a", "Linear",
         "its output gets a bias other than its own"),
        (lambda s, x: (s.b(torch.relu(s.a(x))), s.a(x))[1], "a", "_Four",
         "not an MLP chain: this op is not an nn.Linear applied to the previous layer's output"),
        (lambda s, x: s.a(x) + 1, "a", "Linear",
         "its output goes through an elementwise op other than one named activation (a second activation, a scale, "
         "a custom function)"),
    )
    for forward, path, module_type, reason in cases:
        model = type("Case", (_Four,), {"forward": forward})().to(DTYPE)
        _mlp_refused(model, path, module_type.replace("_Four", "Case"), reason)

    class NoBias(_Four):
        def __init__(self):
            super().__init__(a_bias=False)

        def forward(self, x):
            return F.linear(x, self.a.weight, self.b.bias)

    _mlp_refused(NoBias().to(DTYPE), "a", "Linear", "its output gets a bias other than its own")

    class Foreign(_Four):
        def __init__(self):
            super().__init__()
            self.held = _Holder()

        def forward(self, x):
            return self.b(F.linear(x, self.held.weight, self.held.bias))

    _mlp_refused(Foreign().to(DTYPE), "torch.nn.functional.linear", "Foreign",
                 "not an MLP chain: this op is not an nn.Linear applied to the previous layer's output")

    class Unreturned(_Four):
        def forward(self, x):
            hidden = torch.relu(self.a(x))
            self.b(hidden)
            return hidden

    _mlp_refused(Unreturned().to(DTYPE), "", "Unreturned", "forward does not return the chain's output")


def test_mlp_layers_refuses_a_forward_that_fails_on_the_probe_and_passes_the_traces_own_refusals():
    """The probe is one all-zero datapoint of the first ``nn.Linear``'s width in its dtype: a forward that cannot
    run on it is refused naming the root and the trace's error (its cause); a refusal of the trace itself (an input
    not computed from the model input) comes out as the trace gave it."""

    class Reshaped(_Four):
        def forward(self, x):
            return self.b(self.a(x.reshape(2, -1)))

    with pytest.raises(UnsupportedModuleError, match=(
            r"^unsupported module at the root module of type Reshaped: its forward cannot be read as an MLP chain "
            r"\(.*Reshaped failed on inputs of shape \[1, 3\] \(torch\.float64\): RuntimeError: shape '\[2, -1\]' is "
            r"invalid for input of size 3\)$")) as refusal:
        mlp_layers(Reshaped().to(DTYPE))
    assert refusal.value.path == "" and isinstance(refusal.value.__cause__, GradGraphError)

    class Constant(_Four):
        def forward(self, x):
            return self.a(torch.ones_like(x))

    with pytest.raises(gradgraph.convert.UnsupportedOperationError, match="its input is not computed from the model "
                                                                          "input") as refusal:
        mlp_layers(Constant().to(DTYPE))
    assert refusal.value.__cause__ is None and "cannot be read as an MLP chain" not in str(refusal.value)


# --------------------------------------------------------------------------------------------- trace/result.py


def test_a_trace_result_finds_where_each_recorded_tensor_comes_from_and_the_set_of_each_node():
    """``source_of``: the input, an op's output (op and position), a value a rule derived (only for the very tensor
    it was recorded for: an id can be reused), and a parameter refused as no op's output; ``set_of``: every node's
    set, first and last nodes included."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    inputs = torch.randn(2, 3, dtype=DTYPE)
    trace = trace_model(model, inputs, model)
    assert trace.source_of(trace.inputs) == ("input",)
    outputs = [(op, captured[2]) for op, captured in trace.captured.items() if isinstance(captured[2], torch.Tensor)]
    assert len(outputs) >= 3
    for op, output in outputs:
        assert trace.source_of(output) == ("out", op, 0)
    split = [(op, captured[2]) for op, captured in trace.captured.items() if isinstance(captured[2], tuple)]
    for op, output in split:
        for position, value in enumerate(output):
            assert trace.source_of(value) == ("out", op, position)
    assert trace.derived, "the LayerNorm records its normalised input"
    for tensor, op, recipe in list(trace.derived.values()):
        assert trace.source_of(tensor) == ("derived", op, recipe)
    stranger, (op, output) = torch.zeros(1), outputs[0]
    trace.derived[id(output)] = (stranger, 99, ("a recipe",))  # the id of a tensor gone, reused by `output`
    assert trace.source_of(output) == ("out", op, 0)
    with pytest.raises(GradGraphError, match=r"^internal: a recorded tensor was produced by no op of the trace$"):
        trace.source_of(model[0].weight)
    with pytest.raises(GradGraphError, match=r"^internal: a recorded tensor was produced by no op of the trace$"):
        trace.source_of(torch.zeros(2))
    for neuron_set in trace.sets:
        for node in (neuron_set.first, neuron_set.first + neuron_set.size - 1):
            assert trace.set_of(node) is neuron_set


# ------------------------------------------------------------------------------------------------ deprecated.py


def test_each_deprecated_alias_warns_once_naming_old_and_new_and_gives_the_new_graph_tensor_for_tensor():
    """``convert_mlp`` / ``convert_attention`` / ``convert_traced``: one ``DeprecationWarning`` in full, and the graph
    ``to_graph`` gives, tensor for tensor, with the targets, the loss and the forward's keywords passed on."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x, scale):
            return self.second(torch.tanh(self.first(x)) * scale)

    torch.manual_seed(8)
    model = Scaled().to(DTYPE)
    inputs, targets = torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 2, (5,))
    kwargs = {"scale": torch.rand(5, 4, dtype=DTYPE) + 0.5}
    expected = gradgraph.to_graph(model, inputs, targets, _cross_entropy, forward_kwargs=kwargs)
    for alias in ("convert_mlp", "convert_attention", "convert_traced"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = getattr(deprecated, alias)(model, inputs, targets=targets, loss_fn=_cross_entropy,
                                               forward_kwargs=kwargs)
        assert [(w.category, str(w.message)) for w in caught] == [
            (DeprecationWarning, f"gradgraph.convert.{alias} is deprecated; use gradgraph.to_graph")]
        _same_graph(graph, expected)
        torch.testing.assert_close(graph.loss, expected.loss, rtol=0, atol=0)


def test_convert_traced_and_its_closure_pass_datapoint_dim_to_the_traced_converter():
    """``datapoint_dim`` reaches the traced converter: a ``[T, b, d]`` input read along axis 1 gives ``b``
    components' datapoints (the graph of ``to_graph_traced`` with that axis, tensor for tensor); without it the
    alias is ``to_graph`` / ``convert_closure``. ``convert_traced_closure`` warns naming ``convert_closure``. Kills
    ``convert_traced`` 22, 24, 28, 30 (run small 2: targets and keywords dropped with ``datapoint_dim``)."""
    from gradgraph.convert.traced import convert_closure_traced, to_graph_traced

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x, scale=None):
            hidden = torch.tanh(self.first(x))
            return self.second(hidden if scale is None else hidden * scale)

    torch.manual_seed(9)
    model = Scaled().to(DTYPE)
    inputs = torch.randn(4, 2, 3, dtype=DTYPE)  # [T, b, d]
    targets, kwargs = torch.randn(4, 2, 2, dtype=DTYPE), {"scale": torch.rand(4, 2, 4, dtype=DTYPE) + 0.5}

    def per_datapoint(output, target=None):
        return (output if target is None else output - target).pow(2).sum((0, 2))

    with pytest.warns(DeprecationWarning, match=r"^gradgraph\.convert\.convert_traced is deprecated; use "
                                                r"gradgraph\.to_graph$"):
        graph = deprecated.convert_traced(model, inputs, targets=targets, loss_fn=per_datapoint,
                                          forward_kwargs=kwargs, datapoint_dim=1)
    expected = to_graph_traced(model, inputs, targets=targets, loss_fn=per_datapoint, forward_kwargs=kwargs,
                               datapoint_dim=1)
    _same_graph(graph, expected)
    torch.testing.assert_close(graph.loss, per_datapoint(model(inputs, **kwargs), targets).detach(), rtol=0, atol=0)
    assert graph.per_sample_grads()["first.weight"].shape[0] == 2
    with pytest.warns(DeprecationWarning, match=r"^gradgraph\.convert\.convert_traced_closure is deprecated; use "
                                                r"gradgraph\.convert_closure$"):
        graph, losses = deprecated.convert_traced_closure(model, lambda: per_datapoint(model(inputs)),
                                                          datapoint_dim=1)
    expected, expected_losses = convert_closure_traced(model, lambda: per_datapoint(model(inputs)), datapoint_dim=1)
    _same_graph(graph, expected)
    torch.testing.assert_close(losses, expected_losses, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="convert_traced_closure"):
        graph, losses = deprecated.convert_traced_closure(model, lambda: _squared_loss(model(inputs[0]), None))
    expected, _ = gradgraph.convert_closure(model, lambda: _squared_loss(model(inputs[0]), None))
    _same_graph(graph, expected)


def test_a_deprecation_warning_points_at_the_callers_line():
    """``stacklevel=3``: the warning names the line that called the alias, not the alias (deselected under
    mutmut, whose trampolines add frames; checked by hand on a patched copy of ``src``: fails with ``stacklevel``
    dropped, 2, 4 or ``None``, ``_warn`` 6, 7 among them)."""
    model, inputs = _tanh_chain()
    for alias, arguments in (("convert_mlp", (model, inputs)), ("convert_attention", (model, inputs)),
                             ("convert_traced", (model, inputs)),
                             ("convert_traced_closure", (model, lambda: _squared_loss(model(inputs), None)))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(deprecated, alias)(*arguments, **({} if alias.endswith("closure") else {"loss_fn": _squared_loss}))
        assert len(caught) == 1 and caught[0].filename == __file__, (alias, caught[0].filename)


# --------------------------------------------------------------------- run small 2's survivors, every file of the group
def test_set_fallback_makes_a_converter_the_one_asked_when_none_matches_and_it_is_named_last(monkeypatch):
    """``set_fallback`` sets both forms: ``to_graph`` and ``convert_closure`` go to the new pair, and
    ``registered_converters`` names the fallback last (by ``repr`` when it has no ``__name__``). Kills
    ``set_fallback`` 1, 2 and ``registered_converters`` 5, 8, 11 (run small 2)."""
    monkeypatch.setattr(registry, "_FALLBACK", list(registry._FALLBACK))
    monkeypatch.setattr(registry, "_FALLBACK_CLOSURE", list(registry._FALLBACK_CLOSURE))

    class Fallback:
        def __call__(self, model, inputs, **kwargs):
            return ("graph", model)

        def __repr__(self):
            return "<a fallback without a name>"

    fallback = Fallback()

    def closure_fallback(model, closure, **kwargs):
        return ("closure graph", model)

    registry.set_fallback(fallback, closure_fallback)
    assert registry._FALLBACK == [fallback] and registry._FALLBACK_CLOSURE == [closure_fallback]
    model = _Custom()
    assert gradgraph.to_graph(model, torch.randn(2, 3)) == ("graph", model)
    assert gradgraph.convert_closure(model, lambda: None) == ("closure graph", model)
    assert gradgraph.registered_converters()[-1] == "<a fallback without a name>"


def test_mlp_layers_probes_with_one_datapoint_and_refuses_a_model_without_linear_in_full():
    """The probe is one datapoint (the docstring's contract): a forward written for one datapoint at a time reads as
    its chain; a model without ``nn.Linear`` is refused naming the root and its type. Kills ``mlp_layers`` 6, 9, 12
    (run small 2)."""

    class OneAtATime(_Four):
        def forward(self, x):
            return self.b(torch.relu(self.a(x.reshape(1, -1))))

    torch.manual_seed(10)
    model = OneAtATime().to(DTYPE)
    assert [(layer.name, layer.linear, layer.activation) for layer in mlp_layers(model)] == [
        ("a", model.a, ActivationKind.RELU), ("b", model.b, ActivationKind.IDENTITY)]
    _mlp_refused(nn.Sequential(nn.ReLU(), nn.Tanh()), "", "Sequential", "contains no nn.Linear")


def test_mlp_layers_refuses_combined_neurons_and_a_shared_layer_in_full():
    """The two refusals the structure tests match in part, in full: neurons combined by a sum of the input and a
    layer (at the op), by a sum of two layers (a tie between affine sets: no set to name, so the root), and a
    ``Linear`` called twice. Kills ``_chain_layers`` 7, 17, 24, 27, 30, 32-37, 111-119."""

    class InputResidual(_Four):
        def forward(self, x):
            return self.b(x.repeat(1, 2)[:, :4] + torch.relu(self.a(x)))

    class LayerSum(_Four):
        def forward(self, x):
            return self.b(self.a(x) + self.c(x))

    class Shared(_Four):
        def forward(self, x):
            return self.b(torch.relu(self.b(self.a(x))))

    combines = ("not an MLP chain: a skip connection, gate, norm, concatenation or attention combines neurons (skip "
                "connections, concatenation and parameter access are unsupported)")
    _mlp_refused(LayerSum().to(DTYPE), "", "LayerSum", combines)
    _mlp_refused(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DTYPE), "1", "Sequential",
                 combines)
    _mlp_refused(Shared().to(DTYPE), "b", "Linear", "called more than once (shared weights)")


def test_mlp_layers_refuses_a_layer_that_reads_part_of_the_previous_layers_neurons():
    """``b(h[:, :3])`` with ``h`` of 4 neurons: ``b``'s weight is read whole and in order, but the layer before has
    a neuron it does not read, so a hidden permutation of ``a``'s outputs would move read and unread neurons
    (``before.size != in_features``). Kills ``_chain_layers`` 123."""

    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))[:, :3])

    _mlp_refused(Narrow().to(DTYPE), "b", "Linear", _NOT_ROW_MAJOR)


def test_mlp_layers_of_a_bare_linear_is_the_model_at_the_root():
    """A bare ``nn.Linear`` is a chain of one layer at path ``""`` (its parameters ``weight`` and ``bias``, joined
    to the empty path without a dot). Kills ``mlp._join`` 2."""
    model = nn.Linear(3, 2).to(DTYPE)
    assert mlp_layers(model) == [gradgraph.convert.DenseLayer("", model, ActivationKind.IDENTITY)]


def test_to_graph_refuses_a_mapping_without_the_input_and_a_value_given_to_a_multihead_attention():
    """A mapping of inputs without the entry named as ``forward``'s first parameter is refused naming ``to_graph``;
    a ``value`` alone given to an ``nn.MultiheadAttention`` is refused as cross-attention (not only ``key``); with no
    fallback the refusal is in full. Kills ``to_graph`` 32, 37, 38, 46, 47, 94."""
    model = _Custom()
    with pytest.raises(GradGraphError, match=re.escape(
            "to_graph: inputs is a mapping with keys ['y'], and _Custom.forward's first parameter is 'x'; pass the "
            "input tensor as inputs and the rest as forward_kwargs, e.g. to_graph(model, batch['input_ids'], ..., "
            "forward_kwargs={'attention_mask': batch['attention_mask']})")):
        gradgraph.to_graph(model, {"y": torch.randn(2, 3)})
    attention = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE).eval()
    inputs = torch.randn(2, 3, 4, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=re.escape("to_graph: ['value'] passed through forward_kwargs")):
        gradgraph.to_graph(attention, inputs, forward_kwargs={"value": inputs})


def test_to_graph_without_a_fallback_refuses_in_full(monkeypatch):
    """No traced converter set and none registered: the refusal's words in full. Kills ``to_graph`` 94."""
    monkeypatch.setattr(registry, "_FALLBACK", [])
    with pytest.raises(UnsupportedModuleError, match=r"^unsupported module at the root module of type _Custom: no "
                                                     r"registered converter matches it$"):
        gradgraph.to_graph(_Custom(), torch.randn(2, 3))


def test_convert_closure_in_inference_mode_says_what_to_do_in_full():
    """The inference-tensor refusal of ``convert_closure``, its words in full around torch's error. Kills
    ``convert_closure`` 28, 30."""
    model, inputs = _tanh_chain()
    with torch.inference_mode():
        captured = torch.ones(5, 2, dtype=DTYPE)
        with pytest.raises(GradGraphError, match=(
                r"^convert_closure was called in torch\.inference_mode\(\) and the closure uses a tensor made "
                r"there \(.*Inference tensors cannot be saved.*\); make the closure's tensors outside inference mode, "
                r"or call convert_closure outside it \(torch\.no_grad\(\) is fine\)$")):
            gradgraph.convert_closure(model, lambda: (model(inputs) * captured).pow(2).sum(1))


def test_convert_closure_passes_datapoints_only_when_given_also_for_a_compiled_model(monkeypatch):
    """The closure form as the array form: ``datapoints`` reaches the fallback only when given (a fallback made
    before it existed keeps working), for a plain and for a compiled model (``OptimizedModule``, whose forward is
    swapped for the call). Kills ``convert_closure`` 47, 68."""
    calls = []

    def old_fallback(model, closure):
        calls.append((model, None))
        return "graph", "losses"

    def new_fallback(model, closure, **options):
        calls.append((model, options))
        return "graph", "losses"

    class OptimizedModule(nn.Module):
        def __init__(self, orig):
            super().__init__()
            self._orig_mod = orig
            self.forward = orig.__call__

    model = _Custom()
    monkeypatch.setattr(registry, "_FALLBACK_CLOSURE", [old_fallback])
    assert gradgraph.convert_closure(model, lambda: None) == ("graph", "losses")
    assert gradgraph.convert_closure(OptimizedModule(model), lambda: None) == ("graph", "losses")
    assert calls == [(model, None), (model, None)]
    monkeypatch.setattr(registry, "_FALLBACK_CLOSURE", [new_fallback])
    rows = torch.tensor([0, 1])
    gradgraph.convert_closure(OptimizedModule(model), lambda: None, datapoints=rows)
    assert calls[2][0] is model and set(calls[2][1]) == {"datapoints"} and calls[2][1]["datapoints"] is rows


def test_transformer_structure_refuses_a_layers_parts_at_their_paths():
    """The checks of a layer's parts name each part's path inside the model: a subclass overriding ``_ff_block``, a
    ``self_attn`` with ``add_bias_kv``, active dropout (training mode, ``p > 0``, named with its ``p``), an activation
    without ``__name__`` (named by its ``repr``); a bare attention core with ``add_bias_kv`` and an encoder subclass
    overriding ``forward`` at theirs. Kills ``_check_layer`` 1, 15, 19, 20, 23, 24, 36, 38, 42, 43, 122, 125, 128,
    ``transformer_structure`` 43, 54."""
    import functools

    class OwnFeedForward(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return x

    layer = OwnFeedForward(8, 2, 16, dropout=0.0).eval()
    _refused(_Chain(block=layer), "block", "OwnFeedForward", "overrides TransformerEncoderLayer._ff_block; only the "
                                                             "stock computation is modelled")
    layer = _layer()
    layer.self_attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    _refused(_Chain(block=layer), "block.self_attn", "MultiheadAttention",
             "add_bias_kv=True (learned extra key/value tokens) is not supported")
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.25).train()
    layer.self_attn.dropout = 0.0  # the attention's own dropout is checked first (check_attention)
    _refused(_Chain(block=layer), "block.dropout", "Dropout",
             "active dropout (p=0.25) makes the function random; call model.eval() or build it with dropout=0")
    assert transformer_structure(_Chain(block=nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).train())).layers
    layer = _layer()
    layer.activation = functools.partial(F.gelu, approximate="tanh")
    _refused(_Chain(block=layer), "block.activation", repr(layer.activation),
             "no elementwise activation rule for it (use relu, gelu or a module of "
             "gradgraph.convert.activations.ACTIVATION_MODULES)")
    _refused(_Chain(attn=nn.MultiheadAttention(8, 2, add_bias_kv=True)), "attn", "MultiheadAttention",
             "add_bias_kv=True (learned extra key/value tokens) is not supported")

    class OwnEncoder(nn.TransformerEncoder):
        def forward(self, src, *args, **kwargs):
            return src

    _refused(_Chain(enc=OwnEncoder(_layer(), 1, enable_nested_tensor=False)), "enc", "OwnEncoder",
             "overrides TransformerEncoder.forward; only the stock computation is modelled")


def test_transformer_structure_of_a_one_layer_encoder_and_linears_inside_containers():
    """An encoder of one layer reads its final norm against that layer's width; a ``Linear`` inside a container
    beside the core is collected at its own path (the container holds no parameter itself), and a buffer inside a
    container is refused at the module that holds it. Kills ``transformer_structure`` 96, 166, 169."""
    encoder = nn.TransformerEncoder(_layer(), 1, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    model = _Chain(enc=encoder, head=nn.Sequential(nn.Linear(8, 2)))
    structure = transformer_structure(model)
    assert structure.final_norm == ("enc.norm", encoder.norm)
    assert structure.linears == [("head.0", model.head[0])]
    table = nn.Module()
    table.register_buffer("values", torch.zeros(2))
    _refused(_Chain(enc=_layer(), head=nn.Sequential(table)), "head.0", "Module",
             "a wrapper module with parameters; the attention converter supports [nn.Linear] -> attention module -> "
             "[nn.Linear] chains")


# -------------------------------------------------------------------------- found by run small 3, fixed in the trace
@pytest.mark.parametrize("combine", ["h * tanh(h)", "relu(h) * h", "h * sin(h)"])
def test_a_layer_whose_activation_is_combined_with_its_own_input_is_no_chain_of_that_activation(combine):
    """``h * tanh(h)`` is even, not odd; ``relu(h) * h`` is homogeneous of degree 2, not 1: the label of the named
    activation inside is not the function's, and the symmetry actions that trust it change the model (``flip_hidden``
    by 0.64 on the first, ``rescale_hidden`` by 0.1 on the second). ``mlp_layers`` should refuse them as "an
    elementwise op other than one named activation" (its docstring), but the trace's same-neuron path of
    ``binary`` counted no op and kept the label (the graph of ``to_graph`` was labelled TANH / RELU / SINE too); it
    counts the product since session 19, and the graph labels the set OTHER."""
    functions = {"h * tanh(h)": lambda h: h * torch.tanh(h), "relu(h) * h": lambda h: torch.relu(h) * h,
                 "h * sin(h)": lambda h: h * torch.sin(h)}

    class Combined(_Four):
        def forward(self, x):
            return self.b(functions[combine](self.a(x)))

    with pytest.raises(UnsupportedModuleError, match="elementwise op other than one named activation"):
        mlp_layers(Combined().to(DTYPE))
    graph = gradgraph.to_graph(Combined().to(DTYPE), torch.randn(3, 3, dtype=DTYPE), None,
                               lambda output, _: output.pow(2).sum(1))
    hidden = graph.node_kind == int(gradgraph.NodeKind.HIDDEN)
    assert bool((graph.activation[hidden] == int(gradgraph.ActivationKind.OTHER)).any())
