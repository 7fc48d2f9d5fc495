"""``mapping_inputs``: a mapping of inputs (a tokenizer's ``BatchEncoding``) read as the call
``model(**inputs)`` — the entry named as ``forward``'s first parameter is the input, the others
join ``forward_kwargs`` — and its refusals, messages matched in full.

Written for the 18 mutants of ``mapping_inputs`` that no test in capture's mutation list
reached (docs/mutation.md, capture run 4); each test's docstring names the mutants it was
checked against (run on each with ``MUTANT_UNDER_TEST=NAME`` in ``.mutation/capture/mutants/``:
the test failed). The same call through ``to_graph`` with a BERT model is tested in
``tests/convert/test_convert_safety.py``; these tests use modules that take a millisecond.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradgraph
from gradgraph import GradGraphError
from gradgraph.capture import mapping_inputs

DTYPE = torch.float64


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


class Tagger(nn.Module):
    """``lin(input_ids * mask) * scale``: the input first, a tensor and a float by name."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).to(DTYPE)

    def forward(self, input_ids, attention_mask=None, scale=1.0):
        hidden = input_ids if attention_mask is None else input_ids * attention_mask
        return self.lin(hidden) * scale


class Starred(nn.Module):
    def forward(self, *args):
        return args[0]


class KeywordOnly(nn.Module):
    def forward(self, *, input_ids):
        return input_ids


def test_the_named_entry_is_the_input_and_the_others_join_the_forward_kwargs():
    """Checked against ``x_mapping_inputs__mutmut_1``, ``2`` (no name read: every mapping refused),
    ``5``-``7`` (the three-way test inverted), ``12``-``15`` (``sorted(None)``, a union, ``set(None)``:
    a refusal or a ``TypeError``), ``17``
    (the other entries ``None``) and ``18`` (``key != name`` made ``==``: the input passed twice and the
    other entries dropped)."""
    ids, mask = torch.randn(4, 3, dtype=DTYPE), torch.ones(4, 3, dtype=DTYPE)
    inputs, kwargs = mapping_inputs(Tagger(), {"attention_mask": mask, "input_ids": ids}, {"scale": 2.0}, "to_graph")
    assert inputs is ids
    assert set(kwargs) == {"attention_mask", "scale"}
    assert kwargs["attention_mask"] is mask and kwargs["scale"] == 2.0
    # no forward_kwargs: the other entries only
    inputs, kwargs = mapping_inputs(Tagger(), {"input_ids": ids, "attention_mask": mask}, {}, "to_graph")
    assert inputs is ids and set(kwargs) == {"attention_mask"} and kwargs["attention_mask"] is mask


def test_a_mapping_without_a_tensor_under_the_first_parameter_names_its_keys_and_the_remedy():
    """The entry missing, not a tensor, or a forward whose first parameter cannot be passed by name
    (``*args``, keyword-only): one message, with the caller, the sorted keys, the model's class
    and the parameter's name. Checked against the mutants of the three-way test (``or`` made
    ``and``, ``is None`` made ``is not None``, ``not in`` made ``in``, the ``isinstance`` check
    dropped: ``x_mapping_inputs__mutmut_3``-``7``) and of the message (dropped or a part read from
    ``None``: ``8``-``10``)."""
    ids = torch.randn(4, 3, dtype=DTYPE)
    remedy = ("; pass the input tensor as inputs and the rest as forward_kwargs, e.g. to_graph(model, "
              "batch['input_ids'], ..., forward_kwargs={'attention_mask': batch['attention_mask']})")
    message = ("to_graph: inputs is a mapping with keys ['attention_mask', 'ids'], and Tagger.forward's first "
               "parameter is 'input_ids'" + remedy)
    with pytest.raises(GradGraphError, match=exactly(message)):
        mapping_inputs(Tagger(), {"ids": ids, "attention_mask": ids}, {}, "to_graph")
    message = "to_graph: inputs is a mapping with keys ['input_ids'], and Tagger.forward's first parameter is 'input_ids'"
    with pytest.raises(GradGraphError, match=exactly(message + remedy)):
        mapping_inputs(Tagger(), {"input_ids": ids.tolist()}, {}, "to_graph")
    for model in (Starred(), KeywordOnly()):
        message = (f"to_graph: inputs is a mapping with keys ['input_ids'], and {type(model).__name__}.forward's "
                   "first parameter is None" + remedy)
        with pytest.raises(GradGraphError, match=exactly(message)):
            mapping_inputs(model, {"input_ids": ids}, {}, "to_graph")


def test_an_entry_also_in_forward_kwargs_is_refused_with_the_sorted_names_of_all_such():
    """Checked against ``x_mapping_inputs__mutmut_11`` (no overlap found), ``16`` (its message
    dropped) and the two-entry overlap's sorted order."""
    ids = torch.randn(4, 3, dtype=DTYPE)
    mapping = {"input_ids": ids, "scale": 2.0, "attention_mask": ids}
    message = "to_graph: ['attention_mask', 'scale'] given both in the inputs mapping and in forward_kwargs"
    with pytest.raises(GradGraphError, match=exactly(message)):
        mapping_inputs(Tagger(), mapping, {"scale": 3.0, "attention_mask": ids}, "to_graph")
    message = "to_graph: ['scale'] given both in the inputs mapping and in forward_kwargs"
    with pytest.raises(GradGraphError, match=exactly(message)):
        mapping_inputs(Tagger(), mapping, {"scale": 3.0}, "to_graph")


def test_to_graph_of_a_mapping_is_to_graph_of_the_call_with_its_entries_by_name():
    """The public route: ``to_graph(model, mapping)`` gives the per-sample gradients of
    ``model(input_ids, attention_mask=..., scale=...)``, checked against torch.func; the mask and
    the scale are read (a gradient changes without them)."""
    torch.manual_seed(0)
    model = Tagger()
    ids = torch.randn(5, 3, dtype=DTYPE)
    mask = (torch.rand(5, 3) > 0.4).to(DTYPE)
    graph = gradgraph.to_graph(model, {"input_ids": ids, "attention_mask": mask}, forward_kwargs={"scale": 3.0})
    params = dict(model.named_parameters())

    def output(p, x, m):
        return torch.func.functional_call(model, p, (x[None],), {"attention_mask": m[None], "scale": 3.0}).squeeze()

    expected = torch.func.vmap(torch.func.grad(output), in_dims=(None, 0, 0))(params, ids, mask)
    ours = graph.per_sample_grads()
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, atol=1e-12, rtol=0, msg=name)
    unmasked = gradgraph.to_graph(model, ids).per_sample_grads()
    assert not torch.allclose(unmasked["lin.weight"], ours["lin.weight"])
