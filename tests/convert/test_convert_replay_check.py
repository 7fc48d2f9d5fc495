"""The replay's per-op check (issue 27 item 6: the cheap cached path) still notices every way a
forward can differ from the trace its plan came from.

A replay compares each op with the trace's fingerprint as the op is logged
(:class:`~gradgraph.convert.trace.meta.CheckedOpLog`) instead of building a fingerprint per op,
and flattens arguments without pytree (:func:`~gradgraph.convert.trace.meta.flat_leaves`). These
tests pin that the shortcut sees what the full fingerprint saw: the same leaves as
``tree_flatten``; a fingerprint that differs in its name, one argument, one output shape, or one
op more or less is a mismatch; the ops of registered elementwise modules are checked too; and a
forward that catches the mismatch is still traced again, never replayed wrongly.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import gradgraph
from gradgraph.convert.plan import PLAN_CACHE
from gradgraph.convert.trace import PlanMismatch, replay_model
from gradgraph.convert.trace.meta import CheckedOpLog, OpLog, flat_arguments, flat_leaves
from gradgraph.convert.trace.ops import ELEMENTWISE_MODULES, register_elementwise
from traced_models import assert_per_sample_grads_match_loop

DTYPE = torch.float64

pytestmark = pytest.mark.usefixtures("empty_plan_cache")

Pair = namedtuple("Pair", "left right")

_TENSOR = torch.zeros(2)
_LEAVES = st.one_of(st.integers(-3, 3), st.floats(allow_nan=False), st.none(), st.booleans(), st.text(max_size=2),
                    st.just(slice(1, None)), st.just(Ellipsis), st.just(torch.float32), st.just(_TENSOR),
                    st.just(torch.Size([2, 3])), st.just(torch.device("cpu")))
_TREES = st.recursive(_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from("bac"), inner, max_size=3),
    st.tuples(inner, inner).map(lambda pair: Pair(*pair))), max_leaves=12)


def _same(left: list, right: list) -> bool:
    return len(left) == len(right) and all(a is b or (type(a) is type(b) and a == b) for a, b in zip(left, right))


@settings(max_examples=300, deadline=None)
@given(tree=_TREES, kwargs=st.dictionaries(st.sampled_from("yxz"), _TREES, max_size=2))
def test_flat_leaves_are_tree_flattens_leaves_in_order(tree, kwargs):
    assert _same(flat_leaves(tree), tree_flatten(tree)[0])
    args = tree if isinstance(tree, tuple) else (tree,)
    assert _same(list(flat_arguments(args, kwargs)), tree_flatten((args, kwargs))[0])


def _logged(log: OpLog, x: torch.Tensor, w: torch.Tensor, scale: float = 2.0, *, extra: bool = False,
            swap: bool = False, wide: bool = False, other_name: bool = False) -> None:
    """A few ops logged as a replay logs them; each keyword changes one thing of one fingerprint."""
    h = torch.matmul(x, w)
    log.step("torch.matmul", (x, w), {}, h)
    g = h * scale
    log.step("Tensor.mul", (h, scale), {}, g)
    size = g.size()
    log.step("Tensor.size", (g,), {}, size)
    out = torch.cat([g, h] if not swap else [h, g], dim=-1)
    if wide:
        out = torch.cat([out, h], dim=-1)
    log.step("torch.concat" if other_name else "torch.cat", ([g, h] if not swap else [h, g],), {"dim": -1}, out)
    if extra:
        log.step("Tensor.sum", (out,), {}, out.sum())


@pytest.mark.parametrize("change", [None, "scale", "extra", "swap", "wide", "other_name", "fewer", "input"])
def test_a_checked_log_accepts_the_same_ops_and_refuses_any_one_change(change):
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    params = {id(w): "w"}
    traced = OpLog(x, params)
    _logged(traced, x, w)
    replay_x = torch.randn(4, 3)
    checked = CheckedOpLog(replay_x, params, traced.fingerprints)
    options = {"scale": {"scale": 3.0}, "extra": {"extra": True}, "swap": {"swap": True}, "wide": {"wide": True},
               "other_name": {"other_name": True}}.get(change, {})
    if change is None:
        _logged(checked, replay_x, w)
        assert checked.count == len(traced.fingerprints) and checked.mismatch is None
        return
    if change == "fewer":  # all ops match, one is missing: the count says so (replay_model checks it)
        short = CheckedOpLog(replay_x, params, traced.fingerprints + [traced.fingerprints[-1]])
        _logged(short, replay_x, w)
        assert short.count == len(traced.fingerprints) < len(short.expected)
        return
    with pytest.raises(PlanMismatch):
        if change == "input":  # the matmul reads another tensor than the input: another producer
            _logged(checked, torch.randn(4, 3), w)
        else:
            _logged(checked, replay_x, w, **options)
    assert checked.mismatch is not None
    with pytest.raises(PlanMismatch):  # once differed, every later op is a mismatch too
        checked.step("Tensor.sum", (replay_x,), {}, replay_x.sum())


class Doubler(nn.Module):
    """A registered elementwise module (one op to the trace)."""

    def forward(self, x):
        return 2.0 * x


class Switch(nn.Module):
    """Applies the elementwise module to one of two hidden layers: only that module's op reads
    another tensor, every op after it is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.act, self.out = nn.Linear(3, 4), nn.Linear(3, 4), Doubler(), nn.Linear(4, 1)
        self.flip = False

    def forward(self, x):
        h1, h2 = self.first(x), self.second(x)
        return self.out(self.act(h2 if self.flip else h1))


def test_a_registered_elementwise_module_reading_another_tensor_is_traced_again():
    register_elementwise(Doubler)
    try:
        torch.manual_seed(3)
        model = Switch().to(DTYPE)
        inputs = torch.randn(5, 3, dtype=DTYPE)
        assert_per_sample_grads_match_loop(model, inputs)
        model.flip = True
        # a replay of the first plan gives exact per-sample gradients (the dead branch's tensors are
        # recorded too) but the first plan's edges: first -> act, where the forward now runs second -> act
        again = assert_per_sample_grads_match_loop(model, inputs)
        PLAN_CACHE.clear()
        fresh = gradgraph.to_graph(model, inputs)
        for key in ("edge_index", "edge_attr", "edge_param", "act", "grad"):
            assert torch.equal(again[key], fresh[key]), key
    finally:
        ELEMENTWISE_MODULES.pop(Doubler)


class Swallowing(nn.Module):
    """Catches every exception of one branch (as some user code does) and goes on without it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)
        self.steep = False

    def forward(self, x):
        h = self.a(x)
        try:
            h = torch.tanh(3.0 * h) if self.steep else torch.tanh(h)
        except Exception:  # noqa: BLE001 - the point of the model
            pass
        return self.b(h)


def test_a_mismatch_the_forward_catches_is_still_a_mismatch():
    torch.manual_seed(4)
    model = Swallowing().to(DTYPE)
    inputs = torch.randn(4, 3, dtype=DTYPE)
    assert_per_sample_grads_match_loop(model, inputs)
    plan = next(iter(PLAN_CACHE._entries.values()))
    model.steep = True
    with pytest.raises(PlanMismatch):
        replay_model(model, inputs, model, plan.fingerprints, plan.wanted, plan.guards, plan.fold_time)
    assert_per_sample_grads_match_loop(model, inputs)  # traced again: tanh(3h)'s gradients, not tanh(h)'s
