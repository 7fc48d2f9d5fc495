"""Per-function checks of ``convert/trace/tracer.py``'s bookkeeping, written for the last survivors of runs tracer 3-5
(issue 31, branch mut56, group ``convert-tracer``): each calls a ``Tracer`` method on hand-made inputs and checks it
against the method's docstring or the comment on its line, refusals matched in their words in full (not their
location: under mutmut that is the trampoline's). Each test names the mutants it kills (checked with
``MUTANT_UNDER_TEST``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradgraph.convert.trace.meta import KEY_STRIDE, Neurons, Raw, TraceAbort, UnsupportedOperationError, ids_like
from gradgraph.convert.trace.rules_conv import InputReadAgain
from gradgraph.convert.trace.tracer import Tracer
from gradgraph.graph import NodeKind

DTYPE = torch.float64


def bound(x: torch.Tensor, num_datapoints: int = 2) -> Tracer:
    """A tracer of no model with ``x`` bound as its input (as ``trace_model`` binds it)."""
    tracer = Tracer(nn.Identity(), num_datapoints)
    tracer.bind_input(x)
    return tracer


def assert_refused(caught: pytest.ExceptionInfo, op: str, reason: str) -> None:
    """The refusal in full at the model's root (no module path, no module type): ``location: op: reason``."""
    error = caught.value
    assert error.op == op
    assert str(error) == f"{error.location}: {op}: {reason}"


def test_an_input_without_a_datapoint_axis_is_refused_in_full():
    """A 0-dim input has no datapoint axis: ``neurons_from_raw`` refuses it naming the reading op and saying so. Kills
    ``xǁTracerǁneurons_from_raw__mutmut_6``-``11`` (the op ``None``, the reason ``None``, missing or changed)."""
    x = torch.tensor(2.0, dtype=DTYPE)
    tracer = bound(x, 1)
    with pytest.raises(UnsupportedOperationError) as caught:
        tracer.neurons_from_raw(x, Raw(torch.arange(1).reshape(())), "linear")
    assert_refused(caught, "linear", "the input must have a datapoint axis")


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5)])
def test_an_input_map_read_as_channels_and_again_elementwise_is_read_as_channels_from_three_axes_on(shape):
    """A float input of 3 or more axes whose set a convolution read as channels is read again as channels
    (``channel_input``, handed the reading op's name); the three-axis map is the boundary. Kills
    ``xǁTracerǁneurons_from_raw__mutmut_17``, ``18`` (``> 3``, ``>= 4``: a ``[b, C, L]`` map read by features) and
    ``30`` (``channel_input`` handed no name, which its refusals print)."""
    x = torch.randn(shape, dtype=DTYPE)
    tracer = bound(x)
    tracer.input_neurons(shape[1], "conv", "as channels")
    tracer.input_set.read_as_channels = True
    calls = []
    tracer.channel_input = lambda tensor, meta, what: calls.append((tensor, meta, what)) or "as channels"
    meta = Raw(torch.arange(x.numel()).reshape(shape))
    assert tracer.neurons_from_raw(x, meta, "add") == "as channels"
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is meta and calls[0][2] == "add"


def test_token_ids_are_positions_without_nodes_or_versions():
    """Integer input (token ids): every element is one position of its datapoint, at no node (``ids_like``: -1) and
    no version. Kills ``xǁTracerǁneurons_from_raw__mutmut_41`` (nodes ``None``) and ``43`` (versions ``None``)."""
    ids = torch.tensor([[4, 1, 7], [0, 2, 2]])
    tracer = bound(ids)
    neurons = tracer.neurons_from_raw(ids, Raw(torch.arange(6).reshape(2, 3)), "embedding")
    assert isinstance(neurons, Neurons)
    assert neurons.nodes is not None and torch.equal(neurons.nodes, ids_like(ids))
    assert neurons.versions == {}
    assert torch.equal(neurons.comps, torch.tensor([[0, 1, 2], [KEY_STRIDE, KEY_STRIDE + 1, KEY_STRIDE + 2]]))


def test_the_input_read_by_features_is_the_pinned_input_set_at_version_0():
    """A float input ``[b, F]`` read by features is the input set's ``F`` nodes at its first version, 0 (an op's next
    version of a set is 1: ``next_version``), and the input set is pinned (``input_neurons``' docstring). Kills
    ``xǁTracerǁneurons_from_raw__mutmut_140`` (version 1) and ``xǁTracerǁinput_neurons__mutmut_15``, ``16``
    (``pinned`` ``None`` / ``False``)."""
    x = torch.randn(2, 3, dtype=DTYPE)
    tracer = bound(x)
    neurons = tracer.neurons_from_raw(x, Raw(torch.arange(6).reshape(2, 3)), "linear")
    assert tracer.input_set is not None and tracer.input_set.pinned is True
    assert neurons.versions == {tracer.input_set.index: 0}
    assert torch.equal(neurons.nodes, tracer.input_set.first + torch.arange(3).expand(2, 3))
    assert tracer.next_version(neurons.versions) == {tracer.input_set.index: 1}


def test_the_input_read_again_after_its_windows_aborts_the_trace_naming_the_op():
    """The input read as a convolution's windows and read again: ``input_neurons`` aborts the trace with
    ``InputReadAgain`` naming the op that read it again (``trace_model`` then traces afresh). Kills
    ``xǁTracerǁinput_neurons__mutmut_27`` (the op's name not handed on)."""
    tracer = bound(torch.randn(2, 3, dtype=DTYPE))
    tracer.input_neurons(3, "conv1d", "as windows")
    tracer.input_set.read_through_taps = True
    with pytest.raises(TraceAbort) as caught:
        tracer.input_neurons(3, "add", "with 3 features")
    assert isinstance(caught.value.error, InputReadAgain)
    assert caught.value.error.args == ("add",)
    assert str(caught.value) == "add"


def test_a_read_with_the_same_layout_is_kept_and_one_with_another_is_refused_in_full():
    """``assign_comps`` gives each element its component (``datapoint * KEY_STRIDE + position``) and refuses a later
    read that gives an element already read another component, component 0 included. Kills
    ``xǁTracerǁassign_comps__mutmut_28``, ``29`` (a known component 0 not checked) and ``30`` (the same layout
    refused, another one kept)."""
    tracer = bound(torch.randn(2, 2, dtype=DTYPE))
    element = torch.tensor([0, 1])
    datapoint = torch.tensor([0, 0])
    first = tracer.assign_comps(element, datapoint, torch.tensor([0, 1]))
    assert torch.equal(first, torch.tensor([0, 1]))
    again = tracer.assign_comps(element, datapoint, torch.tensor([0, 1]))  # the same layout: kept
    assert torch.equal(again, first)
    with pytest.raises(UnsupportedOperationError) as caught:  # element 0 (component 0) at position 1
        tracer.assign_comps(element[:1], datapoint[:1], torch.tensor([1]))
    assert_refused(caught, "input", "the input is read with two different layouts")


def test_the_sets_of_nodes_include_the_set_of_node_0():
    """``sets_in`` lists the sets of the nodes ``>= 0`` (``-1`` is no node): node 0, the first set's first node,
    counts. Kills ``xǁTracerǁsets_in__mutmut_3``, ``4`` (node 0 left out)."""
    tracer = Tracer(nn.Identity(), 2)
    first = tracer.new_set(1, NodeKind.INPUT, "input", "input")
    second = tracer.new_set(2, NodeKind.HIDDEN, "fc", "affine")
    assert tracer.sets_in(torch.tensor([[0, -1], [-1, 0]])) == [first]
    assert tracer.sets_in(torch.tensor([2, 0, 1])) == [first, second]  # in the order of their nodes
    assert tracer.sets_in(torch.tensor([-1])) == []


def test_the_path_outside_every_modules_forward_is_the_root():
    """``path`` is the innermost module whose forward runs, and ``''`` (the model's root) outside every one, as for a
    function converted with ``convert_closure``: a refusal there names no module. Kills
    ``xǁTracerǁpath__mutmut_5`` (``'XXXX'``)."""
    tracer = Tracer(nn.Identity(), 2)
    assert tracer.path() == ""
    error = tracer.unsupported("fft", "no rule")
    assert str(error) == f"{error.location}: fft: no rule"
    tracer.module_stack.append("encoder.0")
    assert tracer.path() == "encoder.0"
