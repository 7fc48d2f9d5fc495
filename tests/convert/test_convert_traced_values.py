"""``to_graph_traced`` and the plain-chain capture, checked against what they must give (issue 31, group
``convert-traced`` of ``./gg mutate``): every refusal in full (what is wrong and where), a chain capture
tensor for tensor against the general replay and autograd, a cached plan never served for a model it does
not fit. Written for the survivors of runs traced 1-5 (each test's docstring names the mutants it kills,
checked with ``MUTANT_UNDER_TEST`` in ``.mutation/convert-traced/mutants``)."""

from __future__ import annotations

import re

import pytest
import torch
from strategies import cross_entropy
from torch import nn

import gradgraph
from gradgraph import GradGraphError
from gradgraph.convert.traced import convert_closure_traced, to_graph_traced

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("empty_plan_cache")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


def _batch(rows: int = 5, features: int = 3):
    return torch.randn(rows, features, dtype=DTYPE), torch.randint(0, 2, (rows,))


def _refused(match: str, call, error=GradGraphError):
    with pytest.raises(error, match=f"^{re.escape(match)}$"):
        call()


def autograd_per_sample(model, inputs, targets, loss_fn, call=None):
    """One autograd pass per datapoint, the model run on that datapoint alone: the ground truth."""
    call = call or (lambda x: model(x))
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    grads = {name: [] for name in params}
    for i in range(inputs.shape[0]):
        loss = loss_fn(call(inputs[i:i + 1]), None if targets is None else targets[i:i + 1]).sum()
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[name].append(torch.zeros_like(params[name]) if grad is None else grad)
    return {name: torch.stack(value) for name, value in grads.items()}


def assert_per_sample(graph, reference, atol=1e-11):
    ours = graph.per_sample_grads()
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------ refusals, in full
def test_datapoints_that_are_no_batch_vector_are_refused_with_what_they_are():
    model, (x, y) = _mlp(), _batch()
    for bad, shown in [(torch.tensor([0.0, 1, 1, 2, 2]), "Tensor[5]"), (torch.ones(5, dtype=torch.bool), "Tensor[5]"),
                       ([0, 1, 1, 2, 2], "list"), (torch.tensor([[0, 1, 1, 2, 2]]), "Tensor[1, 5]")]:
        _refused(f"to_graph: datapoints must be a 1-D integer tensor (PyG's batch vector), got {shown}",
                 lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=bad))


def test_datapoints_that_do_not_name_each_row_or_skip_a_datapoint_are_refused():
    model, (x, y) = _mlp(), _batch()
    _refused("to_graph: datapoints [4] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [5, 3] and datapoint_dim 0",
             lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=torch.tensor([0, 1, 1, 2])))
    _refused("to_graph: datapoints [5] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [5] and datapoint_dim 0",
             lambda: gradgraph.to_graph(model, x[:, 0], y, cross_entropy, datapoints=torch.tensor([0, 1, 1, 2, 2])))
    x3 = torch.randn(2, 5, 3, dtype=DTYPE)
    _refused("to_graph: datapoints [5] must name the datapoint of each row of inputs on axis 0 ([rows, ..., "
             "features], or [rows] ids); inputs have shape [2, 5, 3] and datapoint_dim 1",
             lambda: to_graph_traced(model, x3, targets=y, loss_fn=cross_entropy, datapoint_dim=1,
                                     datapoints=torch.tensor([0, 1, 1, 2, 2])))
    for bad, values in [([0, 2, 2, 2, 0], "[0, 2]"), ([-1, 0, 0, 1, 1], "[-1, 0, 1]"), ([1, 1, 2, 2, 3], "[1, 2, 3]")]:
        _refused(f"to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values {values}",
                 lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=torch.tensor(bad)))


def test_an_input_of_another_dtype_is_refused_naming_both():
    model, (x, y) = _mlp(), _batch()
    _refused("inputs [5, 3] are torch.float32 but Sequential's parameters are ['torch.float64']: convert one to "
             "the other's dtype", lambda: gradgraph.to_graph(model, x.float(), y, cross_entropy))


def test_a_chain_names_the_input_shape_its_first_linear_needs():
    model, (_, y) = _mlp(), _batch()
    first = "'0' (Linear(in_features=3, out_features=4, bias=True))"
    for shape in [(5, 4), (5,), (5, 2, 4)]:
        _refused(f"inputs must have shape [b, 3] (or [b, ..., 3]) for {first}, got {list(shape)}",
                 lambda: gradgraph.to_graph(model, torch.randn(*shape, dtype=DTYPE), y, cross_entropy))
    # an activation or dropout before it does not change the features it reads; a nested chain is walked
    nested = nn.Sequential(nn.ReLU(), nn.Dropout(0.0), nn.Sequential(nn.Linear(3, 2))).to(DTYPE)
    _refused("inputs must have shape [b, 3] (or [b, ..., 3]) for '2.0' (Linear(in_features=3, out_features=2, "
             "bias=True)), got [5, 6]", lambda: gradgraph.to_graph(nested, torch.randn(5, 6, dtype=DTYPE), y,
                                                                    cross_entropy))


def test_an_empty_or_scalar_batch_is_refused_on_its_axis():
    model, (_, y) = _mlp(), _batch()
    _refused("inputs must be a batch with b > 0 datapoints on axis 0, got shape [0, 3]",
             lambda: gradgraph.to_graph(model, torch.randn(0, 3, dtype=DTYPE), y[:0], cross_entropy))
    _refused("inputs must be a batch with b > 0 datapoints on axis 0, got shape []",
             lambda: gradgraph.to_graph(model, torch.tensor(1.0, dtype=DTYPE), y, cross_entropy))


def test_an_input_with_an_axis_of_length_zero_is_refused_naming_the_axis():
    """No token, position or feature: the trace failed inside its own bookkeeping on such inputs (an IndexError in
    ``neurons_from_raw``) and the error said the model had failed."""
    model, (_, y) = _mlp(), _batch()
    _refused("inputs [5, 0, 3]: axis 1 has length 0 (no tokens, positions or features): every datapoint needs at "
             "least one value there", lambda: gradgraph.to_graph(model, torch.randn(5, 0, 3, dtype=DTYPE), y,
                                                                 cross_entropy))
    tokens = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).to(DTYPE)
    _refused("inputs [5, 0]: axis 1 has length 0 (no tokens, positions or features): every datapoint needs at "
             "least one value there", lambda: gradgraph.to_graph(tokens, torch.zeros(5, 0, dtype=torch.long), y,
                                                                 lambda out, _: out.sum((1, 2))))


# ------------------------------------------------------------------ _check_sums, its bounds written out
class _Factors:
    """What ``_check_sums`` reads off a graph: ``mean_grad()`` of ``act`` and ``grad`` (one term per component
    and entry here: ``mean_grad()[name] = mean over components of act * grad``), copied by ``copy.copy``."""

    def __init__(self, **terms):
        self.widths = {name: act.shape[1] for name, (act, _) in terms.items()}
        self.act = torch.cat([act for act, _ in terms.values()], 1)
        self.grad = torch.cat([grad for _, grad in terms.values()], 1)

    def mean_grad(self):
        means, start = {}, 0
        for name, width in self.widths.items():
            means[name] = (self.act[:, start:start + width] * self.grad[:, start:start + width]).mean(0)
            start += width
        return means


_factors = _Factors


def _ones(values, components=2):
    """Terms whose mean over ``components`` components is ``values``, with no cancellation."""
    values = torch.as_tensor(values, dtype=DTYPE)
    return torch.ones(components, len(values), dtype=DTYPE), values.expand(components, -1).clone()


def _sums_refused(factors, truth, num_datapoints=1, coarsest=None):
    from gradgraph.convert.trace import UnsupportedOperationError
    from gradgraph.convert.traced import _check_sums

    try:
        _check_sums(factors, truth, num_datapoints, coarsest)
    except UnsupportedOperationError as error:
        return str(error)
    return None


EPS = torch.finfo(DTYPE).eps


def test_check_sums_refuses_a_gradient_off_by_more_than_1e4_eps_of_its_scale_naming_the_parameter():
    """The cheap bound: ``|ours * b - autograd| <= 1e4 eps max(|autograd|, |ours * b|, 1e-2 max over all)``
    where the terms do not cancel (their magnitude bound is the same size); the refusal names the parameter,
    its module and both sizes."""
    factors = _factors(**{"block.0.weight": _ones([0.5, -2.0, 1.0]), "head": _ones([4.0, 0.25])})
    exact = {name: value * 3 for name, value in factors.mean_grad().items()}
    assert _sums_refused(factors, exact, 3) is None
    assert _sums_refused(factors, {}, 3) is None
    # 'head' carries the largest entry (12): block.0.weight's scale is its own max 6 (> 1e-2 * 12)
    for delta, refused in [(0.9, False), (2.1, True)]:
        truth = dict(exact, **{"block.0.weight": exact["block.0.weight"] + torch.tensor([0.0, delta * 1e4 * EPS * 6,
                                                                                         0.0], dtype=DTYPE)})
        assert (_sums_refused(factors, truth, 3) is not None) == refused, delta
    truth = dict(exact, **{"block.0.weight": exact["block.0.weight"] + torch.tensor([0.0, 0.0, 1e-6], dtype=DTYPE)})
    assert _sums_refused(factors, truth, 3) == (
        "in the forward (module 'block.0'): parameter use: the graph's gradient of 'block.0.weight' (summed over "
        "datapoints) differs from autograd's by 1.00e-06 (largest entry 6.00e+00): a value computed from this "
        "parameter reaches the loss through an op whose gradgraph rule reads it as a constant, so the graph would "
        "be silently wrong. Write that part with supported ops or register a converter for the module "
        "(gradgraph.register_converter)")
    truth = dict(exact, head=exact["head"] - 1e-3)
    assert _sums_refused(factors, truth, 3) == (
        "in the forward: parameter use: the graph's gradient of 'head' (summed over datapoints) differs from "
        "autograd's by 1.00e-03 (largest entry 1.20e+01): a value computed from this parameter reaches the loss "
        "through an op whose gradgraph rule reads it as a constant, so the graph would be silently wrong. Write "
        "that part with supported ops or register a converter for the module (gradgraph.register_converter)")


def test_check_sums_scales_a_small_gradient_by_a_hundredth_of_the_largest_one():
    """A gradient that is zero in exact arithmetic is rounding noise at a hundredth of the largest gradient:
    ``small`` (entries 1e-9) next to ``large`` (entries up to 4) is checked at ``1e4 eps 4e-2``, not at its own
    size, nor at ``1e-2 / 4``; the larger of its own and ours counts too."""
    factors = _factors(small=_ones([1e-9, -1e-9]), large=_ones([4.0, 1.0]))
    exact = factors.mean_grad()
    bound = 1e4 * EPS * 4e-2
    for delta, refused in [(0.5 * bound, False), (0.9 * bound, False), (1.1 * bound, True)]:
        truth = dict(exact, small=exact["small"] + torch.tensor([0.0, delta], dtype=DTYPE))
        assert (_sums_refused(factors, truth) is not None) == refused, delta
    # a sparse autograd gradient (an nn.Embedding(sparse=True) table) is compared dense
    truth = dict(exact, large=exact["large"].to_sparse())
    assert _sums_refused(factors, truth) is None
    truth = dict(exact, large=(exact["large"] + torch.tensor([0.0, 1e-3], dtype=DTYPE)).to_sparse())
    assert "'large'" in _sums_refused(factors, truth)


def test_check_sums_accepts_the_rounding_of_large_terms_that_cancel_entry_by_entry():
    """Past the cheap bound, each entry is checked at ``1e4 eps (b * mean |act| |grad| + |autograd|)``: an entry
    whose terms are +-1000 (sum 0) may be off by rounding of 1000s, every other entry still by its own; all
    entries must pass (one entry off is refused)."""
    act = torch.ones(2, 3, dtype=DTYPE)
    grad = torch.tensor([[1000.0, 1.0, 0.0], [-1000.0, 1.0, 0.0]], dtype=DTYPE)
    factors = _factors(w=(act, grad))
    b = 2
    exact = {"w": factors.mean_grad()["w"] * b}  # [0, 2, 0]; magnitudes * b: [2000, 2, 0]
    cancelling = 1e4 * EPS * 2000
    for delta, refused in [(0.9 * cancelling, False), (0.3 * cancelling, False), (1.1 * cancelling, True)]:
        truth = {"w": exact["w"] + torch.tensor([delta, 0.0, 0.0], dtype=DTYPE)}
        assert (_sums_refused(factors, truth, b) is not None) == refused, delta
    # the entry's own autograd value counts too: 1e4 eps (2000 + |autograd|)
    big = 3000 * 1e4 * EPS
    truth = {"w": exact["w"] + torch.tensor([1500 * 1e4 * EPS, 0.0, 0.0], dtype=DTYPE)}
    assert _sums_refused(factors, truth, b) is None
    assert _sums_refused(factors, {"w": exact["w"] + torch.tensor([big, 0.0, 0.0], dtype=DTYPE)}, b) is not None
    # the entry that cancels is within its bound, the entry of no terms is not: refused
    off = {"w": exact["w"] + torch.tensor([0.5 * cancelling, 0.0, 1e-9], dtype=DTYPE)}
    assert "'w'" in _sums_refused(factors, off, b)


def test_check_sums_goes_on_to_the_next_parameter_after_one_within_its_cancelling_bound():
    """A parameter accepted by the bound of its cancelling terms does not end the check: the next one, off, is
    refused. Kills ``_check_sums`` 68 (``break`` for ``continue``)."""
    act = torch.ones(2, 2, dtype=DTYPE)
    factors = _factors(first=(act, torch.tensor([[1000.0, 1.0], [-1000.0, 1.0]], dtype=DTYPE)), second=_ones([1.0]))
    exact = {name: value * 2 for name, value in factors.mean_grad().items()}
    within = exact["first"] + torch.tensor([1e4 * EPS * 1000, 0.0], dtype=DTYPE)  # past 1e4 eps 2, within 1e4 eps 2000
    assert _sums_refused(factors, dict(exact, first=within), 2) is None
    refusal = _sums_refused(factors, {"first": within, "second": exact["second"] + 1e-6}, 2)
    assert refusal is not None and "'second'" in refusal


def test_check_sums_allows_float32_rounding_where_the_forward_computed_coarser():
    """``coarsest``: the least precise dtype the forward computed in; the bound is at its eps, but never looser
    than float32's (a float16 op inside a float64 model is checked as float32)."""
    factors = _factors(w=_ones([1.0, 1.0]))
    exact = factors.mean_grad()
    eps32 = torch.finfo(torch.float32).eps
    # (entries 1 of one term each: past the cheap bound 1e4 eps, the entry's bound is 1e4 eps (1 + 1 + delta))
    for coarsest, delta, refused in [(None, 1e-9, True), (torch.float64, 1e-9, True), (torch.float32, 1e-9, False),
                                     (torch.float32, 1.9e4 * eps32, False), (torch.float32, 2.1e4 * eps32, True),
                                     (torch.float16, 1.9e4 * eps32, False), (torch.float16, 2.1e4 * eps32, True),
                                     (torch.bfloat16, 2.1e4 * eps32, True)]:
        truth = {"w": exact["w"] + torch.tensor([delta, 0.0], dtype=DTYPE)}
        assert (_sums_refused(factors, truth, 1, coarsest) is not None) == refused, (coarsest, delta)


# ------------------------------------------------------------------ the plain-chain capture
def _leaky_chain() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 2))).to(
        DTYPE).eval()


def test_plain_chain_lists_the_leaves_of_nested_sequentials_and_nothing_else():
    from gradgraph.convert.chain import plain_chain

    model = _leaky_chain()
    assert [(path, module) for path, module in plain_chain(model)] == [
        ("0", model[0]), ("1", model[1]), ("2.0", model[2][0]), ("2.1", model[2][1])]
    assert plain_chain(nn.Sequential()) is None and plain_chain(nn.Sequential(nn.Sequential())) is None
    assert plain_chain(nn.Linear(2, 2)) is None  # a leaf alone is no chain
    assert plain_chain(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(2, 2))) is None
    assert plain_chain(nn.Sequential(nn.ReLU(inplace=False), nn.Linear(2, 2))) is not None
    assert plain_chain(nn.Sequential(nn.Linear(2, 2), nn.Softplus())) is None
    linear = nn.Linear(2, 2)
    assert plain_chain(nn.Sequential(linear, nn.Sequential(linear))) is None

    class MyLinear(nn.Linear):
        pass

    assert plain_chain(nn.Sequential(MyLinear(2, 2))) is None  # the exact types only
    with_none = nn.Sequential(nn.Linear(2, 2))
    with_none.add_module("gone", None)
    assert plain_chain(with_none) is None


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "backward", "backward_pre"])
@pytest.mark.parametrize("where", ["leaf", "container", "nested container"])
def test_a_hook_of_any_kind_on_any_module_makes_no_plain_chain(hook, where):
    """Kills chain ``_has_hooks`` 2, 3 (a backward hook or a backward pre-hook alone went unseen)."""
    from gradgraph.convert.chain import plain_chain

    model = _leaky_chain()
    module = {"leaf": model[2][1], "container": model, "nested container": model[2]}[where]
    register = {"forward": lambda: module.register_forward_hook(lambda m, args, out: None),
                "forward_pre": lambda: module.register_forward_pre_hook(lambda m, args: None),
                "backward": lambda: module.register_full_backward_hook(lambda m, gin, gout: None),
                "backward_pre": lambda: module.register_full_backward_pre_hook(lambda m, gout: None)}[hook]
    handle = register()
    assert plain_chain(model) is None
    handle.remove()
    assert plain_chain(model) is not None
    module.forward = module.forward  # a forward set on the instance
    assert plain_chain(model) is None



def _capture_of(model):
    """The chain capture of ``model``'s plan, traced now."""
    from gradgraph.convert.plan import PLAN_CACHE

    PLAN_CACHE.clear()
    x, y = _batch()
    gradgraph.to_graph(model, x, y, cross_entropy)
    (plan,) = PLAN_CACHE._entries.values()
    assert plan.chain is not None
    return plan.chain


def test_a_chain_capture_applies_only_to_the_chain_with_the_leaves_and_settings_it_was_traced_with():
    """Kills chain ``_Settings.match`` 7 (a deleted setting matched) and ``_Settings.of`` 3, 6 (private attributes
    taken for settings: a parameter replaced by a new one crashed the match, a backward hook added and removed
    again refused the capture)."""
    from gradgraph.convert.chain import plain_chain

    model = _leaky_chain()
    capture = _capture_of(model)
    assert capture.paths == ("0", "1", "2.0", "2.1")
    assert capture.applies(plain_chain(model))
    assert not capture.applies(None)
    assert not capture.applies(plain_chain(model)[:3])
    assert not capture.applies([("0", model[0]), ("1", model[1]), ("2.0", model[2][0]), ("3", model[2][1])])
    model[1].negative_slope = 0.3  # a setting changed
    assert not capture.applies(plain_chain(model))
    model[1].negative_slope = 0.2
    model[0].weight = nn.Parameter(torch.randn(4, 3, dtype=DTYPE))  # new values, not a new setting
    model[0].in_features = 3
    assert capture.applies(plain_chain(model))
    handle = model[2][1].register_full_backward_hook(lambda m, gin, gout: None)
    handle.remove()
    assert capture.applies(plain_chain(model))
    for changed in [lambda: model[2][0].train(), lambda: setattr(model[2][0], "p", 0.5),
                    lambda: setattr(model[0], "out_features", 5)]:
        changed()
        assert not capture.applies(plain_chain(model))
        model[2][0].eval(), setattr(model[2][0], "p", 0.0), setattr(model[0], "out_features", 4)
    assert capture.applies(plain_chain(model))
    swapped = nn.Sequential(model[0], nn.ReLU(), model[2])
    assert not capture.applies(plain_chain(swapped))  # another leaf type at a path
    model[1].note = 1.0  # a public setting the trace saw, deleted after
    capture = _capture_of(model)
    del model[1].note
    assert not capture.applies(plain_chain(model))


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "backward", "backward_pre"])
def test_a_global_module_hook_of_any_kind_refuses_the_chain_capture(hook):
    """A hook registered for every module runs inside each leaf: the capture would record what it returns.
    Kills chain ``_global_hooks`` 1-4 and ``ChainCapture.applies`` 1."""
    from torch.nn.modules import module as torch_module

    from gradgraph.convert.chain import plain_chain

    model = _leaky_chain()
    capture = _capture_of(model)
    register = {"forward": lambda: torch_module.register_module_forward_hook(lambda m, args, out: None),
                "forward_pre": lambda: torch_module.register_module_forward_pre_hook(lambda m, args: None),
                "backward": lambda: torch_module.register_module_full_backward_hook(lambda m, gin, gout: None),
                "backward_pre": lambda: torch_module.register_module_full_backward_pre_hook(lambda m, gout: None)}[hook]
    handle = register()
    try:
        assert not capture.applies(plain_chain(model))
    finally:
        handle.remove()
    assert capture.applies(plain_chain(model))


def test_a_global_hook_that_changes_the_leaves_outputs_converts_the_hooked_model():
    """The capture refused, the replay sees the hook's op and traces again: the graph is the hooked model's."""
    from torch.nn.modules import module as torch_module

    from gradgraph.convert.plan import PLAN_CACHE

    model = _leaky_chain()
    x, y = _batch()
    gradgraph.to_graph(model, x, y, cross_entropy)

    def doubled(module, args, output):
        return output * 2 if isinstance(module, nn.Linear) else None

    handle = torch_module.register_module_forward_hook(doubled)
    try:
        graph = gradgraph.to_graph(model, x, y, cross_entropy)
        assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy))
        torch.testing.assert_close(graph.loss, cross_entropy(model(x), y), rtol=0, atol=1e-14)
    finally:
        handle.remove()
    assert PLAN_CACHE.misses == 1  # the plan was found, its capture refused


def test_a_chain_reads_its_first_linears_features_on_the_last_axis_of_any_batch():
    """``[b, T, d]`` into a chain whose first ``Linear`` reads ``d``: converted, not refused by ``T``; and refused
    naming ``d`` where the last axis is not ``d``. Kills ``_check_chain_inputs`` 4 (``shape[+1]``)."""
    model = _mlp()
    x = torch.randn(5, 2, 3, dtype=DTYPE)

    def loss(output, _):
        return output.pow(2).sum((1, 2))

    graph = gradgraph.to_graph(model, x, None, loss)
    assert_per_sample(graph, autograd_per_sample(model, x, None, loss))
    _refused("inputs must have shape [b, 3] (or [b, ..., 3]) for '0' (Linear(in_features=3, out_features=4, "
             "bias=True)), got [5, 3, 2]",
             lambda: gradgraph.to_graph(model, torch.randn(5, 3, 2, dtype=DTYPE), None, loss))


# ------------------------------------------------------------------ convert_closure
def test_convert_closure_refuses_by_its_own_name():
    """Kills ``convert_closure_traced`` 4, 7, 8 (the caller named in the meta refusal), 23 (the model's name in
    the dtype refusal), 67, 68, 71-74 (a forward set on the instance)."""
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 2))
    _refused("convert_closure: Sequential has parameters on the 'meta' device (shapes without values); materialise "
             "and load its weights first (model.to_empty(device=...) + load_state_dict)",
             lambda: convert_closure_traced(meta, lambda: meta(torch.ones(2, 3))))
    model, (x, y) = _mlp(), _batch()
    _refused("inputs [5, 3] are torch.float32 but Sequential's parameters are ['torch.float64']: convert one to "
             "the other's dtype", lambda: gradgraph.convert_closure(model, lambda: cross_entropy(model(x.float()), y)))
    model.forward = model.forward
    _refused("Sequential has a forward set on the instance; convert_closure needs the class's forward",
             lambda: gradgraph.convert_closure(model, lambda: cross_entropy(model(x), y)))
    assert "forward" in vars(model)  # left as it was


def test_a_closure_that_reads_the_batchs_losses_into_python_or_detaches_them_is_refused_in_full():
    """After the model's call the closure's loss runs under ``DerivedValueReads("the closure")``, which follows the
    model's output (``guard.follow``): a read of the batch's losses into Python, or their detach, couples the
    datapoints where autograd sees a constant (on the code before, both converted with every per-sample gradient
    off), refused naming the closure and the batch size. With one datapoint the same closures convert exactly (the
    guard follows nothing). Kills ``convert_closure_traced``'s mutants of the guard: the output not followed, the
    code named ``None`` or otherwise (issue 31, run traced 11)."""
    model, (x, y) = _mlp(), _batch()
    tail = ("; a loss made with it depends on the other datapoints where autograd sees a constant, so every "
            "per-sample gradient would be silently wrong (only their sum right). Compute each datapoint's loss from "
            "its own output with tensor ops (no .item(), float() or if on the losses), or convert one datapoint at a "
            "time")

    def over_largest(inputs, targets):
        losses = cross_entropy(model(inputs), targets)
        return losses / losses.max().item()

    def over_detached(inputs, targets):
        losses = cross_entropy(model(inputs), targets)
        return losses / losses.detach().max()

    _refused("the closure hands values computed from the model's output to Python (item: a number or a branch), "
             "one for all 5 datapoints" + tail, lambda: convert_closure_traced(model, lambda: over_largest(x, y)),
             gradgraph.DatapointCouplingError)
    _refused("the closure cuts the gradient of values computed from the model's output (detach): a statistic of the "
             "batch made from them (losses / losses.detach().max()) couples the datapoints where autograd sees a "
             "constant, so every per-sample gradient would be silently wrong, and gradgraph cannot tell such a "
             "statistic from one of a datapoint alone. Compute each datapoint's loss from its own output without "
             "detach, or convert one datapoint at a time",
             lambda: convert_closure_traced(model, lambda: over_detached(x, y)), gradgraph.DatapointCouplingError)
    for closure in (over_largest, over_detached):
        graph, losses = convert_closure_traced(model, lambda closure=closure: closure(x[:1], y[:1]))
        params = dict(model.named_parameters())
        truth = torch.autograd.grad(closure(x[:1], y[:1]).sum(), list(params.values()))
        assert_per_sample(graph, {name: grad[None] for name, grad in zip(params, truth)}, atol=1e-12)
        torch.testing.assert_close(losses, closure(x[:1], y[:1]).detach(), atol=0, rtol=0)


class _RowMLP(nn.Module):
    """A per-row MLP whose rows are grouped into datapoints by a batch vector."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(3, 4, dtype=DTYPE), nn.Linear(4, 2, dtype=DTYPE)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_convert_closure_takes_the_rows_datapoints_and_the_sequence_first_axis():
    """``datapoints`` and ``datapoint_dim`` reach the closure's pass: the per-datapoint gradients are autograd's
    of each datapoint's loss. Kills ``convert_closure_traced`` 25, 31-34, 46, 54."""
    model = _RowMLP()
    x = torch.randn(6, 3, dtype=DTYPE)
    rows = torch.tensor([0, 0, 1, 1, 1, 2])

    def losses():
        return torch.zeros(3, dtype=DTYPE).index_add(0, rows, model(x).pow(2).sum(1))

    graph, loss = gradgraph.convert_closure(model, losses, datapoints=rows)
    params = dict(model.named_parameters())
    reference = {name: torch.stack([torch.autograd.grad(losses()[i], param)[0] for i in range(3)])
                 for name, param in params.items()}
    assert_per_sample(graph, reference)
    torch.testing.assert_close(loss, losses().detach(), rtol=0, atol=0)
    _refused("to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values [0, 1, 3]",
             lambda: gradgraph.convert_closure(model, losses, datapoints=torch.tensor([0, 0, 1, 1, 1, 3])))
    # sequence-first: [T, b, d], the datapoints on axis 1
    seq = torch.randn(2, 4, 3, dtype=DTYPE)
    graph, _ = convert_closure_traced(model, lambda: model(seq).pow(2).sum((0, 2)), datapoint_dim=1)
    reference = {name: torch.stack([torch.autograd.grad(model(seq[:, i:i + 1]).pow(2).sum(), param)[0]
                                    for i in range(4)]) for name, param in params.items()}
    assert_per_sample(graph, reference)


# ------------------------------------------------------------------ small helpers, by their contracts
def test_the_default_datapoint_axis_is_1_only_where_every_self_attention_is_sequence_first():
    """Kills ``default_datapoint_dim`` 1, 2 (reached by no test of the list)."""
    from gradgraph.convert.traced import default_datapoint_dim

    first, batch_first = nn.MultiheadAttention(4, 2), nn.MultiheadAttention(4, 2, batch_first=True)
    assert default_datapoint_dim(nn.Sequential(nn.Linear(4, 4), first)) == 1
    assert default_datapoint_dim(first) == 1
    assert default_datapoint_dim(nn.Sequential(first, batch_first)) == 0
    assert default_datapoint_dim(batch_first) == 0
    assert default_datapoint_dim(nn.Linear(4, 4)) == 0


def test_the_coarsest_dtype_is_read_off_every_recorded_output_tensor_and_tuple():
    """Kills ``_coarsest_dtype`` 3, 4 (the outputs of an op that returns several tensors went unread)."""
    from gradgraph.convert.traced import _coarsest_dtype

    def record(output):
        return ((), {}, output)

    half, single, double = (torch.zeros(2, dtype=dtype) for dtype in (torch.float16, torch.float32, torch.float64))
    assert _coarsest_dtype({}) is None
    assert _coarsest_dtype({0: record(double), 1: record(torch.zeros(2, dtype=torch.long))}) == torch.float64
    assert _coarsest_dtype({0: record(double), 1: record(single), 2: record(double)}) == torch.float32
    assert _coarsest_dtype({0: record(double), 1: record((double, half))}) == torch.float16
    assert _coarsest_dtype({0: record([single, 3]), 1: record(double)}) == torch.float32
    assert _coarsest_dtype({0: record(None), 1: record(7)}) is None
    bf16 = torch.zeros(2, dtype=torch.bfloat16)
    assert _coarsest_dtype({0: record(bf16), 1: record(half)}) == torch.bfloat16  # eps 7.8e-3 against 9.8e-4


def test_check_sums_passes_a_parameter_of_no_entries():
    """A parameter with no entries has no error and no scale (its max is not taken). Kills ``_check_sums`` 19, 25."""
    factors = _factors(empty=(torch.ones(2, 0, dtype=DTYPE), torch.ones(2, 0, dtype=DTYPE)), w=_ones([1.0, -2.0]))
    exact = factors.mean_grad()
    assert _sums_refused(factors, exact) is None
    assert "'w'" in _sums_refused(factors, dict(exact, w=exact["w"] + 1e-6))


def test_chain_capture_records_each_wanted_op_once_from_the_first_leaf_that_returned_it():
    """``chain_capture`` on a trace's records, written out: ``ops`` per leaf is the op whose output (position 0)
    the leaf returned if the plan reads it and no earlier leaf returned it, else -1; refused where the plan reads
    anything but the input and whole leaf outputs, or the leaves were not called once each in order. Kills chain
    ``chain_capture`` 11, 21, 22, 28, 30, 31, 37, 42, 43."""
    from gradgraph.convert.chain import chain_capture, plain_chain

    model = _leaky_chain()  # leaves 0, 1, 2.0 (dropout, eval: returns its input), 2.1
    chain = plain_chain(model)
    calls = [("0", (3, 0)), ("1", (4, 0)), ("2.0", (4, 0)), ("2", (6, 0)), ("2.1", (6, 0)), ("", (6, 0))]
    reads = [("input",), ("out", 3, 0), ("out", 4, 0), ("out", 6, 0)]
    capture = chain_capture(chain, calls, reads, {3, 4, 6})
    assert capture.paths == ("0", "1", "2.0", "2.1") and capture.ops == (3, 4, -1, 6)
    assert [settings.type for settings in capture.settings] == [nn.Linear, nn.LeakyReLU, nn.Dropout, nn.Linear]
    assert chain_capture(chain, calls, reads[:2], {3}).ops == (3, -1, -1, -1)  # unread ops: -1
    assert chain_capture(chain, calls, [("input",)], set()).ops == (-1, -1, -1, -1)
    assert chain_capture(None, calls, reads, {3, 4, 6}) is None
    # the plan reads a normalised input, an embedding's one-hot indices, a second output: refused
    for other in [("derived", 4, ("layer_norm", 1e-5)), ("onehot", 4), ("out", 4, 1)]:
        assert chain_capture(chain, calls, [*reads, other], {3, 4, 6}) is None, other
    # a wanted op that no leaf returned whole (as output 0) is refused; output 1 of an op is not its output
    for source in [(5, 1), None, "external", ("param", "0.weight")]:
        moved = [("0", (3, 0)), ("1", source), ("2.0", source), ("2.1", (6, 0))]
        assert chain_capture(chain, moved, reads, {3, 4, 6}) is None, source
        assert chain_capture(chain, moved, reads, {3, 6}).ops == (3, -1, -1, 6), source
    assert chain_capture(chain, [("0", (0, 0)), ("1", (7, 1)), ("2.0", (2, 0)), ("2.1", (2, 0))],
                         [("out", 0, 0), ("out", 1, 0), ("out", 2, 0)], {0, 1, 2}) is None
    # the leaves called out of order, twice or not at all: refused
    for order in [[0, 2, 1, 3], [0, 1, 2, 3, 3], [0, 1, 3]]:
        leaves = [("0", (3, 0)), ("1", (4, 0)), ("2.0", (4, 0)), ("2.1", (6, 0))]
        assert chain_capture(chain, [leaves[i] for i in order], reads, {3, 4, 6}) is None, order


# ------------------------------------------------------------------ reparametrised weights, refused in full
def _nested():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 2))).to(DTYPE)


def _refusal(model):
    x, y = _batch()
    with pytest.raises(gradgraph.UnsupportedModuleError) as info:
        gradgraph.to_graph(model, x, y, cross_entropy)
    return info.value


def _computed(path, module_type, names):
    return (f"unsupported module at '{path}' of type {module_type}: its {names} is computed from other parameters, "
            "so the gradient of the parameters you own (weight_norm's g and v, spectral_norm's unnormalised weight) "
            "is not a rank-1 term of the graph. Convert a copy whose weights are the effective ones: m = "
            "copy.deepcopy(model); torch.nn.utils.parametrize.remove_parametrizations(module_of_m, 'weight') (or "
            "torch.nn.utils.remove_weight_norm / remove_spectral_norm for the hook-based versions)")


def test_a_pruned_weight_is_refused_by_its_module_with_the_remedy_in_full():
    """Kills ``_check_no_reparametrisation``'s pruning mutants (its message, path and type; reached by
    ``test_convert_safety.py`` only, outside the group's list)."""
    from torch.nn.utils import prune

    model = _nested()
    prune.l1_unstructured(model[2][0], "weight", amount=0.5)
    refusal = _refusal(model)
    assert (refusal.path, refusal.module_type) == ("2.0", "Linear")
    assert str(refusal) == (
        "unsupported module at '2.0' of type Linear: its weight is pruned (torch.nn.utils.prune: weight = "
        "weight_orig * weight_mask, computed from the parameter you own), so the gradient of weight_orig is the "
        "graph's edge gradient times the mask, not a rank-1 term of the graph. Convert the model with the pruning "
        "made permanent (torch.nn.utils.prune.remove(module, 'weight'): weight becomes a plain parameter holding "
        "the pruned values); the per-sample gradients of weight_orig are those of weight times the mask (keep "
        "module.weight_mask before removing it)")
    prune.random_unstructured(model[2][0], "bias", amount=0.5)  # two pruned tensors: both named, the first explained
    assert str(_refusal(model)).startswith("unsupported module at '2.0' of type Linear: its weight, bias is pruned "
                                           "(torch.nn.utils.prune: weight = weight_orig * weight_mask")
    model = _nested()
    prune.l1_unstructured(model[0], "bias", amount=0.5)
    assert str(_refusal(model)).startswith("unsupported module at '0' of type Linear: its bias is pruned "
                                           "(torch.nn.utils.prune: bias = bias_orig * bias_mask")


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "two", "chained", "hook_weight_norm",
                                  "hook_spectral_norm"])
def test_a_weight_computed_from_other_parameters_is_refused_by_its_module_naming_each(kind):
    """Kills ``_check_no_reparametrisation``'s parametrization mutants (reached by ``test_convert_safety.py`` only;
    31: the class name stripped of X's)."""
    from torch.nn.utils import parametrizations, parametrize

    class XDoubled(nn.Module):  # (a name starting with X: the refusal names the class as it is)
        def forward(self, value):
            return 2 * value

    model = _nested()
    if kind == "weight_norm":
        parametrizations.weight_norm(model[0])
        where, names = ("0", "ParametrizedLinear"), "weight (WeightNorm)"
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model[2][0])
        where, names = ("2.0", "ParametrizedLinear"), "weight (SpectralNorm)"
    elif kind == "two":
        parametrize.register_parametrization(model[2][0], "weight", XDoubled())
        parametrize.register_parametrization(model[2][0], "bias", XDoubled())
        where, names = ("2.0", "ParametrizedLinear"), "weight (XDoubled), bias (XDoubled)"
    elif kind == "chained":
        parametrizations.weight_norm(model[0])
        parametrize.register_parametrization(model[0], "weight", XDoubled())
        where, names = ("0", "ParametrizedLinear"), "weight (WeightNorm, XDoubled)"
    elif kind == "hook_weight_norm":
        torch.nn.utils.weight_norm(model[0])
        where, names = ("0", "Linear"), "weight (WeightNorm, hook-based)"
    else:
        torch.nn.utils.spectral_norm(model[2][0], name="weight")
        where, names = ("2.0", "Linear"), "weight (SpectralNorm, hook-based)"
    refusal = _refusal(model)
    assert (refusal.path, refusal.module_type) == where
    assert str(refusal) == _computed(*where, names)


def test_a_forward_pre_hook_with_a_name_attribute_is_no_reparametrisation():
    """Only torch's ``WeightNorm`` / ``SpectralNorm`` hooks compute a weight; another pre-hook that carries a
    ``name`` converts (the hook runs in the forward, exact). Kills ``_check_no_reparametrisation`` 32."""

    class Named:
        name = "weight"

        def __call__(self, module, args):
            return None

    model = _nested()
    model[0].register_forward_pre_hook(Named())
    x, y = _batch()
    assert_per_sample(gradgraph.to_graph(model, x, y, cross_entropy), autograd_per_sample(model, x, y, cross_entropy))


# ------------------------------------------------------------------ the forward call, its arguments
def test_a_bare_multihead_attention_converts_as_its_output_with_its_keyword_arguments():
    """``to_graph(nn.MultiheadAttention, x)``: the module called as self-attention, its output (not the weights)
    read by the loss, its keyword arguments passed. Kills ``to_graph_traced`` 31-34."""
    torch.manual_seed(6)
    model = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE)
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    mask = torch.randn(5, 5, dtype=DTYPE)

    def loss(output, _):
        return output.pow(2).sum((1, 2))

    for kwargs in [{}, {"attn_mask": mask}]:
        graph = gradgraph.to_graph(model, x, None, loss, forward_kwargs=kwargs)
        reference = autograd_per_sample(model, x, None, loss, call=lambda xi: model(xi, xi, xi, **kwargs)[0])
        assert_per_sample(graph, reference)
        torch.testing.assert_close(graph.loss, loss(model(x, x, x, **kwargs)[0], None), rtol=0, atol=1e-13)


class _NeedsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=DTYPE)

    def forward(self, x, mask):
        return self.lin(x) * mask


class _TypeErrorInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=DTYPE)

    def forward(self, x):
        raise TypeError("unsupported operand type")


def test_a_forward_that_needs_more_arguments_is_refused_with_the_remedy_and_other_type_errors_pass_through():
    """Kills ``to_graph_traced`` 38, 39, 41-45."""
    x, y = _batch()
    _refused("to_graph: calling _NeedsMask(inputs, **forward_kwargs) failed: _NeedsMask.forward() missing 1 required "
             "positional argument: 'mask'. Pass the model's other arguments through forward_kwargs",
             lambda: gradgraph.to_graph(_NeedsMask(), x, y, cross_entropy))
    _refused("unsupported operand type", lambda: gradgraph.to_graph(_TypeErrorInside(), x, y, cross_entropy),
             error=TypeError)
    model = _NeedsMask()
    graph = gradgraph.to_graph(model, x, y, cross_entropy, forward_kwargs={"mask": 3.0})
    assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy, call=lambda xi: model(xi, 3.0)))


def test_a_forward_that_uses_no_parameter_is_refused_naming_the_model():
    """Kills ``_forward_pass_tracked`` 121, 122."""

    class Scales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3, dtype=DTYPE)

        def forward(self, x):
            return x * 2

    x, y = _batch()
    _refused("Scales: the forward used no parameter of the model",
             lambda: gradgraph.to_graph(Scales(), x, None, lambda out, _: out.sum(1)))


def test_reentrant_checkpointing_is_refused_in_full():
    """Kills ``_finish`` 61, 70, 71 (the message, matched in part by ``test_convert_checkpointing.py``)."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.head = nn.Linear(3, 4, dtype=DTYPE), nn.Linear(4, 2, dtype=DTYPE)

        def forward(self, x):
            return self.head(checkpoint(lambda h: torch.tanh(h), self.first(x), use_reentrant=True))

    x, y = _batch()
    _refused("to_graph: the forward uses torch.utils.checkpoint(..., use_reentrant=True), whose recomputed "
             "activations torch.autograd.grad cannot reach; gradgraph differentiates the recorded values so. Use "
             "use_reentrant=False (exact), or turn checkpointing off for the conversion "
             "(model.gradient_checkpointing_disable() in transformers)",
             lambda: gradgraph.to_graph(Checkpointed(), x, y, cross_entropy))


# ------------------------------------------------------------------ the plan key, and plans never served wrongly
def test_other_forward_kwargs_are_another_plan():
    """The plan key holds the keyword arguments' signature: a call with another one is a cache miss (the replay
    would only find out op by op), and each graph is exact. Kills ``to_graph_traced`` 50, ``_forward_pass`` 7,
    ``_forward_pass_tracked`` 16 and ``convert_closure_traced`` 42."""
    from gradgraph.convert.plan import PLAN_CACHE

    model, (x, y) = _NeedsMask(), _batch()
    for scale in (2.0, 3.0, torch.tensor([1.0, 2.0], dtype=DTYPE)):
        graph = gradgraph.to_graph(model, x, y, cross_entropy, forward_kwargs={"mask": scale})
        assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy, call=lambda xi: model(xi, scale)))
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (3, 0)
    gradgraph.to_graph(model, x, y, cross_entropy, forward_kwargs={"mask": 2.0})
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (3, 1)
    for scale in (2.0, 5.0):  # a closure's positional arguments are part of its key too
        graph, _ = gradgraph.convert_closure(model, lambda: cross_entropy(model(x, scale), y))
        assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy, call=lambda xi: model(xi, scale)))
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (5, 1)


def test_rows_grouped_into_datapoints_convert_exactly_and_other_groupings_get_their_own_plan():
    """``to_graph(..., datapoints=rows)``: ``b = rows.max() + 1`` datapoints, each the sum of its rows' losses;
    a second grouping of the same rows is another plan (the key holds the grouping), never the first one's.
    Kills ``to_graph_traced`` 54, 63 and ``_forward_pass_tracked`` 3, 5, 6, 7, 25, 112."""
    from gradgraph.convert.plan import PLAN_CACHE

    model = _RowMLP()
    x = torch.randn(6, 3, dtype=DTYPE)
    params = dict(model.named_parameters())
    for rows in ([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 2], [1, 0, 1, 0, 1, 0]):
        rows = torch.tensor(rows)
        b = int(rows.max()) + 1

        def loss(output, _, rows=rows, b=b):
            return torch.zeros(b, dtype=DTYPE).index_add(0, rows, output.pow(2).sum(1))

        graph = gradgraph.to_graph(model, x, None, loss, datapoints=rows)
        assert int(graph.num_datapoints) == b
        reference = {name: torch.stack([torch.autograd.grad(loss(model(x), None)[i], param)[0] for i in range(b)])
                     for name, param in params.items()}
        assert_per_sample(graph, reference)
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (3, 1)


def _rnn_model():
    torch.manual_seed(8)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.RNN(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    return Recurrent().to(DTYPE)


def test_a_recurrent_loop_is_folded_over_time_by_default_and_unrolled_on_request():
    """``fold_time=True`` by default, for ``to_graph`` and for ``convert_closure``, traced and replayed; ``False``
    unrolls (one set per step: more nodes). Kills ``to_graph_traced`` 1, 55, ``_forward_pass`` 2, 12,
    ``_forward_pass_tracked`` 113, 119."""
    from gradgraph.convert.plan import PLAN_CACHE

    model = _rnn_model()
    x, y = torch.randn(5, 3, 3, dtype=DTYPE), torch.randint(0, 2, (5,))
    reference = autograd_per_sample(model, x, y, cross_entropy)
    folded = [to_graph_traced(model, x, targets=y, loss_fn=cross_entropy) for _ in range(2)]
    unrolled = [to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, fold_time=False) for _ in range(2)]
    closure = [convert_closure_traced(model, lambda: cross_entropy(model(x), y))[0] for _ in range(2)]
    assert PLAN_CACHE.misses == 3 and PLAN_CACHE.hits == 3
    PLAN_CACHE.clear()
    explicit = to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, fold_time=True)
    for graph in folded + unrolled + closure:
        assert_per_sample(graph, reference)
    assert unrolled[0].num_nodes > folded[0].num_nodes
    assert unrolled[1].num_nodes == unrolled[0].num_nodes
    for graph in folded + closure:
        assert graph.num_nodes == explicit.num_nodes and graph.num_components == explicit.num_components
        assert torch.equal(graph.edge_index, explicit.edge_index)


# ------------------------------------------------------------------ the batch's axes and rows, checked
def test_the_datapoint_axis_is_checked_against_the_inputs_dimensions_and_their_features():
    """Kills ``_check_inputs`` 5, 10, 11 (the axis's range), 21, 23, 25-28 (the feature axis refused, in full)."""
    model, (x, y) = _mlp(), _batch()
    for axis in (2, -3, 5):
        _refused(f"inputs must be a batch with b > 0 datapoints on axis {axis}, got shape [5, 3]",
                 lambda: to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, datapoint_dim=axis))
    for axis in (1, -1):
        _refused("inputs [5, 3]: the datapoint axis 1 is the feature axis; features must be the last axis",
                 lambda: to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, datapoint_dim=axis))
    reference = autograd_per_sample(model, x, y, cross_entropy)
    assert_per_sample(to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, datapoint_dim=-2), reference)
    x3 = torch.randn(2, 5, 3, dtype=DTYPE)  # [T, b, d]: the datapoints on axis 1 (or -2)

    def loss(output, _):
        return output.pow(2).sum((0, 2))

    per_position = autograd_per_sample(model, x3.transpose(0, 1), None, lambda out, _: out.pow(2).sum((1, 2)))
    for axis in (1, -2):
        assert_per_sample(to_graph_traced(model, x3, loss_fn=loss, datapoint_dim=axis), per_position)


def test_datapoints_hold_each_value_from_0_and_may_group_one_row_or_token_ids():
    """Kills ``_check_datapoints`` 24, 26 (1-D token ids refused), 46 (negative values let through), 48 (one row
    refused), 56 (the values shown: the first 20), 33, 35 (int32 rows kept int32: another plan key)."""
    from gradgraph.convert.plan import PLAN_CACHE

    model, (x, y) = _mlp(), _batch()
    _refused("to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values [-1, 1]",
             lambda: gradgraph.to_graph(model, x, y, cross_entropy, datapoints=torch.tensor([-1, 1, 1, 1, 1])))
    rows = torch.cat([torch.arange(5), torch.arange(6, 23)])  # 22 values, 5 missing
    _refused("to_graph: datapoints must hold 0 .. b-1 with every datapoint owning a row; got values "
             f"{[*range(5), *range(6, 21)]}",
             lambda: gradgraph.to_graph(model, torch.randn(22, 3, dtype=DTYPE), None, lambda out, _: out.sum(1),
                                        datapoints=rows))
    one = gradgraph.to_graph(model, x[:1], y[:1], cross_entropy, datapoints=torch.tensor([0]))
    assert_per_sample(one, autograd_per_sample(model, x[:1], y[:1], cross_entropy))
    # token ids [rows], two datapoints of three tokens
    torch.manual_seed(9)
    embedded = nn.Sequential(nn.Embedding(7, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    ids, grouping = torch.tensor([1, 4, 4, 0, 6, 2]), torch.tensor([0, 0, 1, 1, 1, 0])

    def loss(output, _):
        return torch.zeros(2, dtype=DTYPE).index_add(0, grouping, output.pow(2).sum(1))

    PLAN_CACHE.clear()
    params = dict(embedded.named_parameters())
    reference = {name: torch.stack([torch.autograd.grad(loss(embedded(ids), None)[i], param)[0] for i in range(2)])
                 for name, param in params.items()}
    for rows in (grouping, grouping.int()):
        assert_per_sample(gradgraph.to_graph(embedded, ids, None, loss, datapoints=rows), reference)
    assert (PLAN_CACHE.misses, PLAN_CACHE.hits) == (1, 1)  # the rows are read as int64 either way


# ------------------------------------------------------------------ the other refusals, in full
def test_autocast_torchscript_and_a_non_tensor_output_are_refused_in_full():
    """Kills ``_check_no_autocast`` 10-14, ``_check_not_scripted`` 11, 14-17, ``_objective`` 4, 5."""
    model, (x, y) = _mlp(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _refused("to_graph was called under torch.autocast('cpu', dtype=torch.bfloat16): the forward would compute "
                 "in torch.bfloat16, whose rounding (eps 7.8e-03) the factors would carry and gradgraph's check of "
                 "the summed gradient cannot tell from a missing gradient path. Convert outside autocast: wrap the "
                 "call in torch.autocast('cpu', enabled=False) (the graph is then the full-precision model's)",
                 lambda: gradgraph.to_graph(model.float(), x.float(), y, cross_entropy))
    model.double()
    _refused("unsupported module at the root module of type RecursiveScriptModule: it is a TorchScript module "
             "(torch.jit.script / torch.jit.trace), whose forward runs in the TorchScript interpreter, where "
             "gradgraph cannot follow its ops. Convert the Python module it was made from (the per-sample gradients "
             "are the same; keep a reference to it before scripting)",
             lambda: gradgraph.to_graph(torch.jit.script(model), x, y, cross_entropy),
             error=gradgraph.UnsupportedModuleError)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2, dtype=DTYPE)

        def forward(self, x):
            return self.lin(x), self.lin(x)

    _refused("output mode (loss_fn=None) needs a tensor output; the model returned tuple. Pass a loss_fn that "
             "reads it", lambda: gradgraph.to_graph(Two(), x))


class _Snake(nn.Module):
    """``x + sin(α x)² / α``, registered as one elementwise op by the tests that use it."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=DTYPE))

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


def test_a_registered_module_with_trainable_parameters_is_refused_in_full_also_as_the_root():
    """Kills ``_check_registered_elementwise`` 7 (the root's parameters named '.alpha', so never found),
    16, 19-22 (the message)."""
    from gradgraph.convert import register_elementwise
    from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES

    register_elementwise(_Snake)
    try:
        x = torch.randn(5, 3, dtype=DTYPE)
        for model, path, owned in [(_Snake(), "", "['alpha']"), (nn.Sequential(_Snake()), "0", "['0.alpha']")]:
            refusal = _refusal_of(lambda: gradgraph.to_graph(model, x, None, lambda out, _: out.sum(1)))
            where = f"'{path}'" if path else "the root module"
            assert str(refusal) == (
                f"unsupported module at {where} of type _Snake: it is registered with "
                "gradgraph.convert.register_elementwise, so it runs as one elementwise op without parameters, but "
                f"it has trainable parameters {owned}, whose gradients gradgraph would not write. Freeze them "
                "(requires_grad_(False)) to convert with them fixed, write its forward with ops gradgraph follows "
                "and do not register it (a learned per-neuron scale or bias converts), or register a converter for "
                "the model (gradgraph.register_converter)")
    finally:
        ELEMENTWISE_MODULES.pop(_Snake, None)


def _refusal_of(call):
    with pytest.raises(gradgraph.UnsupportedModuleError) as info:
        call()
    return info.value


def test_the_scan_lists_what_torch_lists_where_the_root_lists_its_members_itself():
    """A root that overrides ``named_parameters``, ``modules`` or ``_named_members`` is read through torch, not
    walked. Kills ``_walk`` 3, 4."""
    from gradgraph.convert.traced import _Scan

    class HidesBias(nn.Sequential):
        def named_parameters(self, *args, **kwargs):
            return ((name, p) for name, p in super().named_parameters(*args, **kwargs) if not name.endswith("bias"))

    class HidesModules(nn.Sequential):
        def modules(self):
            return iter([self])

    class HidesMembers(nn.Sequential):
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return iter([])

    for cls in (HidesBias, HidesModules, HidesMembers):
        model = cls(nn.Linear(2, 3), nn.Linear(3, 1))
        scan = _Scan.of(model, "to_graph")
        assert list(scan.parameters) == [name for name, _ in model.named_parameters()], cls
        assert [id(module) for module in scan.modules] == [id(module) for module in model.modules()], cls


def test_the_graph_is_in_the_inputs_dtype_not_the_first_parameters():
    """A frozen float32 table listed first, a float64 layer used: the graph is float64 (the inputs'), exact, traced
    and replayed. Kills ``_forward_pass_tracked`` 9."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.ones(2), requires_grad=False)
            self.lin = nn.Linear(3, 2, dtype=DTYPE)

        def forward(self, x):
            return self.lin(x)

    model, (x, y) = Mixed(), _batch()
    for _ in range(2):
        graph = gradgraph.to_graph(model, x, y, cross_entropy)
        assert graph.act.dtype == graph.grad.dtype == DTYPE
        assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy), atol=1e-13)


class _Scaled(nn.Module):
    """A hidden layer times a constant buffer: a uniform scale keeps the hidden neurons exchangeable, distinct
    values pin them (a value guard of the plan)."""

    def __init__(self, scale) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.first, self.second = nn.Linear(3, 4, dtype=DTYPE), nn.Linear(4, 2, dtype=DTYPE)
        self.register_buffer("scale", torch.tensor(scale, dtype=DTYPE))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)) * self.scale)


def test_a_replay_checks_the_plans_value_guards():
    """The second model has the first one's key and ops but another constant: the replay must not keep the first
    one's group (its hidden neurons are pinned). Kills ``_forward_pass_tracked`` 68."""
    from gradgraph.convert.plan import PLAN_CACHE

    x, y = _batch()
    uniform, distinct = _Scaled([2.0] * 4), _Scaled([1.0, 2.0, 3.0, 4.0])
    fresh = []
    for model in (uniform, distinct):
        PLAN_CACHE.clear()
        fresh.append(gradgraph.to_graph(model, x, y, cross_entropy))
    hidden = fresh[0].layer == 1
    assert bool((fresh[0].perm_group[hidden] >= 0).all()) and bool((fresh[1].perm_group[hidden] < 0).all())
    PLAN_CACHE.clear()
    for model, reference in zip((uniform, distinct), fresh):
        graph = gradgraph.to_graph(model, x, y, cross_entropy)
        assert torch.equal(graph.perm_group, reference.perm_group)
        assert_per_sample(graph, autograd_per_sample(model, x, y, cross_entropy))


def test_a_plain_chain_with_datapoints_converts_exactly_twice():
    """Rows grouped by ``datapoints`` on a plain chain: traced, then from the cached plan (by the replay: the rows'
    grouping is layout), exact both times."""
    from gradgraph.convert import chain as chain_module

    model = _mlp()
    x = torch.randn(6, 3, dtype=DTYPE)
    rows = torch.tensor([0, 0, 1, 1, 1, 2])

    def loss(output, _):
        return torch.zeros(3, dtype=DTYPE).index_add(0, rows, output.pow(2).sum(1))

    params = dict(model.named_parameters())
    reference = {name: torch.stack([torch.autograd.grad(loss(model(x), None)[i], param)[0] for i in range(3)])
                 for name, param in params.items()}
    calls = []
    run = chain_module.ChainCapture.run
    try:
        chain_module.ChainCapture.run = lambda self, chain, x: calls.append(1) or run(self, chain, x)
        for _ in range(2):
            assert_per_sample(gradgraph.to_graph(model, x, None, loss, datapoints=rows), reference)
    finally:
        chain_module.ChainCapture.run = run
    assert calls == []


def test_a_folded_plan_is_replayed_folded_not_traced_again(monkeypatch):
    """The replay runs the loops as the trace did (folded): the second conversion replays, the third (unrolled)
    traces its own plan. Kills ``_forward_pass_tracked`` 69 (the replay run unrolled: its ops differ, so every
    conversion traced again, at a trace's cost)."""
    import gradgraph.convert.traced as traced_module

    traces = []
    trace_model = traced_module.trace_model
    monkeypatch.setattr(traced_module, "trace_model", lambda *args, **kwargs: traces.append(1) or trace_model(
        *args, **kwargs))
    model = _rnn_model()
    x, y = torch.randn(5, 3, 3, dtype=DTYPE), torch.randint(0, 2, (5,))
    reference = autograd_per_sample(model, x, y, cross_entropy)
    for fold_time, expected in [(True, [1]), (True, [1]), (False, [1, 1]), (False, [1, 1])]:
        assert_per_sample(to_graph_traced(model, x, targets=y, loss_fn=cross_entropy, fold_time=fold_time), reference)
        assert traces == expected, fold_time


def test_a_plan_serves_another_dtype_or_batch_of_one_architecture_and_its_chain_capture_equals_the_replay():
    """One architecture's plan is shared by float32 and float64 models and by batches of any size (the key holds
    no dtype, and the batch's shape only as the key's input shape); each conversion is autograd's, and the chain
    capture's graph is the per-op replay's tensor for tensor, in either dtype and for ``[b, T, d]`` inputs."""
    from strategies import assert_same_graph

    from gradgraph.convert import chain as chain_module
    from gradgraph.convert.plan import PLAN_CACHE

    model = _leaky_chain()
    for dtype, atol in [(DTYPE, 1e-12), (torch.float32, 1e-5)]:
        model.to(dtype)
        for shape in [(5, 3), (2, 3), (4, 2, 3)]:
            x, y = torch.randn(*shape, dtype=dtype), torch.randn(*shape[:-1], 2, dtype=dtype)

            def loss(output, target):
                return (output - target).pow(2).flatten(1).sum(1)

            captured = gradgraph.to_graph(model, x, y, loss)
            original = chain_module.ChainCapture.applies
            chain_module.ChainCapture.applies = lambda self, chain: False
            try:
                replayed = gradgraph.to_graph(model, x, y, loss)
            finally:
                chain_module.ChainCapture.applies = original
            assert captured.act.dtype == replayed.act.dtype == dtype
            assert_same_graph(captured, replayed, atol=0)
            assert_per_sample(captured, autograd_per_sample(model, x, y, loss), atol=atol)
    assert PLAN_CACHE.misses == 3  # one plan per input shape, both dtypes


@pytest.mark.parametrize("change", ["negative_slope", "dropout_p", "approximate", "flatten", "width", "type"])
def test_a_chain_changed_after_its_plan_was_cached_converts_as_a_fresh_one(change):
    """Whatever changes in a cached chain (a leaf's setting, a layer's width, a leaf's type), its next conversion is
    the fresh trace's graph of the changed chain, tensor for tensor, and autograd's per-sample gradients."""
    from strategies import assert_same_graph

    from gradgraph.convert.plan import PLAN_CACHE

    torch.manual_seed(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.LeakyReLU(0.1), nn.Dropout(0.0), nn.Linear(4, 3),
                          nn.GELU(), nn.Linear(3, 2)).to(DTYPE).eval()
    x, y = torch.randn(5, 2, 3, dtype=DTYPE), torch.randint(0, 2, (5,))
    gradgraph.to_graph(model, x, y, cross_entropy)
    if change == "negative_slope":
        model[2].negative_slope = 0.3
    elif change == "dropout_p":
        model[3].p = 0.7  # still eval: the identity
    elif change == "approximate":
        model[5].approximate = "tanh"
    elif change == "flatten":
        model[0] = nn.Flatten(start_dim=2)  # [5, 2, 3] -> [5, 2, 3]: the Linear now reads 3 features
        model[1] = nn.Linear(3, 4).to(DTYPE)
    elif change == "width":
        model[4], model[6] = nn.Linear(4, 5).to(DTYPE), nn.Linear(5, 2).to(DTYPE)
    else:
        model[2] = nn.Tanh()

    def loss(output, target):
        return cross_entropy(output.reshape(output.shape[0], -1, 2).sum(1), target)

    graph = gradgraph.to_graph(model, x, y, loss)
    PLAN_CACHE.clear()
    assert_same_graph(graph, gradgraph.to_graph(model, x, y, loss), atol=0)
    assert_per_sample(graph, autograd_per_sample(model, x, y, loss))


def test_a_closure_calling_a_chain_with_more_arguments_fails_on_them_not_on_the_input_shape():
    """``Sequential.forward`` takes the input alone: the call fails on the extra argument (torch's ``TypeError``),
    not with the chain's input-shape refusal meant for ``model(inputs)``. Kills ``convert_closure_traced`` 62
    (``plain_call`` when either the positional or the keyword arguments were empty)."""
    model = _mlp()
    x = torch.randn(5, 4, dtype=DTYPE)
    _refused("Sequential.forward() takes 2 positional arguments but 3 were given",
             lambda: gradgraph.convert_closure(model, lambda: model(x, 2.0).sum(1)), error=TypeError)
    _refused("Sequential.forward() got an unexpected keyword argument 'scale'",
             lambda: gradgraph.convert_closure(model, lambda: model(x, scale=2.0).sum(1)), error=TypeError)


class _ArgumentErrorInside(nn.Module):
    """A forward that takes ``(x, mask)`` and raises, inside, a ``TypeError`` whose message names an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=DTYPE)

    def forward(self, x, mask):
        return self.lin(x) * mask + torch.zeros(2, dtype=DTYPE).expand("2")


class _BuiltinForward(nn.Module):
    """A forward whose signature ``inspect`` cannot read (a builtin)."""

    forward = torch.relu


def test_a_type_error_naming_an_argument_is_the_models_where_the_call_binds_or_its_signature_is_unread():
    """The model's own ``TypeError`` passes through where ``forward`` accepts ``(x, **forward_kwargs)``, also when
    the message names an argument (``_binds`` (session 23), which reworded it before as the call refusing its
    arguments: kills ``_binds`` 5 (``x`` not bound), 6 (the keywords not bound) and 8 (every call refused)), and
    where the signature cannot be read (3: such a call refused)."""
    x, y = _batch()
    with pytest.raises(TypeError, match=re.escape("expand(): argument 'size' (position 1) must be tuple of ints")):
        gradgraph.to_graph(_ArgumentErrorInside(), x, y, cross_entropy, forward_kwargs={"mask": 2.0})
    with pytest.raises(TypeError, match="^relu\\(\\) got an unexpected keyword argument 'bogus'$"):
        gradgraph.to_graph(_BuiltinForward(), x, y, cross_entropy, forward_kwargs={"bogus": 1})
