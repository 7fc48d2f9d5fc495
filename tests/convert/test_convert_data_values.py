"""Per-function checks of ``convert/trace/rules_data.py`` (issue 31, run decompositions 1): data computed from a
model's integer input (position ids, token types, padding and attention masks, lengths) converts with exact
per-sample gradients (float64, against torch.func); such data mixed across datapoints and then read by a
parameterised op is refused with its reason in full. The tests written for a run's survivors name the mutants they kill
(``.mutation/convert-decompositions/``'s numbering); two are the bugs those runs found (roll / diff, keywords)."""

from __future__ import annotations

import re

import pytest
import torch
from convert_values import exact, squared
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError

DTYPE = torch.float64
PAD = 1


def ids_with_padding(seed=0, shape=(4, 6)):
    ids = torch.randint(2, 9, shape, generator=torch.Generator().manual_seed(seed))
    ids[0, -2:] = PAD
    ids[2, -1] = PAD
    return ids


class Roberta(nn.Module):
    """RoBERTa's embeddings: position ids counted over the non-padding tokens, token types of zeros, the hidden
    states multiplied by the padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(9, 4, padding_idx=PAD), nn.Embedding(9, 4)
        self.types, self.out = nn.Embedding(2, 4), nn.Linear(4, 2)

    def forward(self, ids):
        mask = ids.ne(PAD).int()
        positions = torch.cumsum(mask, dim=1).type_as(mask) * mask + PAD
        h = self.tokens(ids) + self.positions(positions) + self.types(torch.zeros_like(ids))
        h = torch.tanh(h) * mask.unsqueeze(-1).to(h.dtype)
        return self.out(h).sum(1)


def test_position_ids_token_types_and_a_padding_mask_convert_exactly():
    torch.manual_seed(0)
    exact(Roberta().to(DTYPE), ids_with_padding())


class MaskedAttention(nn.Module):
    """One attention head whose scores get the additive mask ``(1 - mask) * finfo.min`` of the padding."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.qkv, self.out = nn.Embedding(9, 4), nn.Linear(4, 12), nn.Linear(4, 2)

    def forward(self, ids):
        mask = (ids != PAD).to(DTYPE)
        additive = (1.0 - mask)[:, None, :] * torch.finfo(DTYPE).min
        q, k, v = self.qkv(self.tokens(ids)).chunk(3, dim=-1)
        weights = (q @ k.transpose(-2, -1) / 2.0 + additive).softmax(-1)
        return self.out(weights @ v).sum(1)


def test_an_additive_attention_mask_made_from_the_ids_converts_exactly():
    torch.manual_seed(1)
    exact(MaskedAttention().to(DTYPE), ids_with_padding(1))


class Along(nn.Module):
    """Position ids made by ``op`` from the ids, read by an embedding."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.tokens, self.positions, self.out = nn.Embedding(9, 4), nn.Embedding(64, 4), nn.Linear(4, 2)

    def forward(self, ids):
        positions = self.op(ids.ne(PAD).long()).clamp(0, 63)
        return self.out(torch.tanh(self.tokens(ids) + self.positions(positions))).sum(1)


ALONG_POSITIONS = {
    "cumsum dim 1": lambda m: m.cumsum(1),
    "cumsum dim -1": lambda m: m.cumsum(-1),
    "torch.cumsum keyword": lambda m: torch.cumsum(m, dim=1),
    "flip dims (1,)": lambda m: m.cumsum(1).flip((1,)),
    "flip dims [-1]": lambda m: torch.flip(m.cumsum(1), dims=[-1]),
    "sum keepdim": lambda m: m.sum(1, keepdim=True).expand(-1, m.shape[1]),
}


@pytest.mark.parametrize("name", sorted(ALONG_POSITIONS))
def test_data_combined_along_positions_converts_exactly(name):
    torch.manual_seed(2)
    exact(Along(ALONG_POSITIONS[name]).to(DTYPE), ids_with_padding(2))


MIXED = "combines data of different datapoints (an op along the batch axis), so a datapoint's values depend on " \
        "the others"
ALONG_DATAPOINTS = {  # name: (op, the op's name in the message)
    "cumsum dim 0": (lambda m: m.cumsum(0), "Tensor.cumsum"),
    "cumsum dim -2": (lambda m: m.cumsum(-2), "Tensor.cumsum"),
    "torch.cumsum keyword": (lambda m: torch.cumsum(m, dim=0), "torch.cumsum"),
    "flip dims (0,)": (lambda m: m.flip((0,)), "Tensor.flip"),
    "flip dims [1, 0]": (lambda m: torch.flip(m, dims=[1, 0]), "torch.flip"),
    "sum of everything": (lambda m: m.sum().expand(m.shape), "Tensor.sum"),
    "sum dims (1, 0)": (lambda m: m.sum((1, 0)).expand(m.shape), "Tensor.sum"),
    "amax dim 0": (lambda m: m.amax(0, keepdim=True).expand(m.shape), "Tensor.amax"),
}


def refused_mixed(model, ids, op):
    """Refused at the op that mixed the datapoints, naming the embedding that reads its result (the op's own
    location matched loosely: under mutmut its innermost frame is the trampoline's)."""
    gradgraph.convert.clear_structure_cache()
    message = (rf"^\S+:\d+ in \S+: {re.escape(op)}: {re.escape(MIXED)}, and its result "
               r"reaches torch\.nn\.functional\.embedding with the parameter 'positions\.weight' at "
               r"test_convert_data_values\.py:\d+ in Along\.forward \(module 'positions'\)\. Write it with supported "
               r"ops, register it with gradgraph\.convert\.register_elementwise if it is elementwise, or register a "
               r"converter for the whole module$")
    with pytest.raises(UnsupportedOperationError, match=message):
        gradgraph.to_graph(model, ids, None, squared)


@pytest.mark.parametrize("name", sorted(ALONG_DATAPOINTS))
def test_data_combined_along_the_datapoints_is_refused_where_an_embedding_reads_it(name):
    torch.manual_seed(2)
    op, op_name = ALONG_DATAPOINTS[name]
    refused_mixed(Along(op).to(DTYPE), ids_with_padding(2), op_name)


# roll(input, shifts, dims) and diff(input, n, dim, ...) take their axis third: their second argument is no axis
ROLLED_ALONG_DATAPOINTS = {
    "Tensor.roll(1, 0)": (lambda m: m.roll(1, 0), "Tensor.roll"),
    "torch.roll(m, 1): flattened": (lambda m: torch.roll(m, 1), "torch.roll"),
    "torch.roll(m, (1,), (0,))": (lambda m: torch.roll(m, (1,), (0,)), "torch.roll"),
    "torch.diff(m, 1, 0)": (lambda m: torch.diff(m, 1, 0, prepend=m[:1]), "torch.diff"),
    "Tensor.diff(1, -2)": (lambda m: m.diff(1, -2, m[:1]), "Tensor.diff"),
}
ROLLED_ALONG_POSITIONS = {
    "Tensor.roll(2, 1)": lambda m: m.roll(2, 1),
    "torch.roll(m, 1, -1)": lambda m: torch.roll(m, 1, -1),
    "Tensor.roll(1, dims=1)": lambda m: m.roll(1, dims=1),
    "torch.diff(m, 1, 1)": lambda m: torch.diff(m, 1, 1, prepend=m[:, :1]),
    "torch.diff(m): the last axis": lambda m: torch.diff(m, prepend=m[:, :1]),
    "Tensor.diff(2)": lambda m: m.diff(2, prepend=m[:, :2]),
    "Tensor.sort(): the last axis": lambda m: m.sort(descending=True).values,
    "torch.argsort(m): the last axis": lambda m: torch.argsort(m, stable=True),
}


@pytest.mark.parametrize("name", sorted(ROLLED_ALONG_DATAPOINTS))
def test_a_roll_or_difference_along_the_datapoints_is_refused_whatever_its_second_argument(name):
    """``roll(x, 1, 0)`` shifts the datapoints; ``roll(x, 1)`` the flattened tensor; ``diff(x, 1, 0)`` takes
    differences of consecutive datapoints. The rule read their second argument (a shift, a count) as the axis,
    saw the positions' axis 1 and let them through: each datapoint's position ids then came from another
    datapoint, and the per-sample gradients were those of the batch's forward, not torch.func's (a silent wrong
    answer; checked to fail before the fix). Kills rules_data ``_mixes_datapoints`` (the table of where an op
    takes its axis)."""
    torch.manual_seed(2)
    op, op_name = ROLLED_ALONG_DATAPOINTS[name]
    refused_mixed(Along(op).to(DTYPE), ids_with_padding(2), op_name)


@pytest.mark.parametrize("name", sorted(ROLLED_ALONG_POSITIONS))
def test_a_roll_or_difference_along_the_positions_converts_exactly(name):
    """``roll(x, 2, 1)`` was refused as an op along the batch axis (its shift 2 read as the axis, ``2 % 2 = 0``);
    ``diff(x)`` is along the last axis (its default), and so are ``sort(x)`` and ``argsort(x)`` (read as along
    every axis, so refused, until session 18)."""
    torch.manual_seed(2)
    exact(Along(ROLLED_ALONG_POSITIONS[name]).to(DTYPE), ids_with_padding(2))


class Alone(nn.Module):
    """Indices made by ``op`` from the ids read by an embedding whose rows go to an affine map before meeting any
    token value: each index needs its datapoint's component, known where the ops kept the ids' elements one to
    one (elementwise ops, casts, shape ops, an op along the positions)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.positions, self.out = nn.Embedding(64, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.positions(self.op(ids)))).flatten(1).sum(1, keepdim=True)


ONE_TO_ONE = {
    "cumsum along the positions": lambda m: m.ne(PAD).long().cumsum(1),
    "arithmetic": lambda m: m * 3 % 64,
    "a slice": lambda m: m[:, 1:] + 1,
    "flip along the positions": lambda m: m.flip(1),
    "a size-1 axis added by broadcasting, then squeezed": lambda m: (m + torch.zeros(1, 1, 1, dtype=torch.long))[0],
    "a float round trip": lambda m: (m.float() * 2).long(),
    "flattened and back": lambda m: (m + 1).view(-1).view(m.shape),
    "a 0-d datum along its axis": lambda m: m + m[0, 0].cumsum(0) * 0,
}


@pytest.mark.parametrize("name", sorted(ONE_TO_ONE))
def test_indices_that_keep_the_ids_elements_one_to_one_convert_exactly(name):
    """Kills rules_data ``_elementwise`` (the element map kept, or broadcast over a size-1 axis) and
    ``_mixes_datapoints`` on a 0-d datum (no axis to mix)."""
    torch.manual_seed(3)
    exact(Alone(ONE_TO_ONE[name]).to(DTYPE), ids_with_padding(3))


COPIED = {
    "expanded": lambda m: (m + 1).unsqueeze(-1).expand(-1, -1, 2),
    "broadcast over a new axis": lambda m: m.unsqueeze(-1) + torch.zeros(1, 1, 2, dtype=torch.long),
    "broadcast against a column of constants": lambda m: m.unsqueeze(-1) + torch.arange(2)[None, None, :],
    "a sum over the positions": lambda m: m.sum(1, keepdim=True) % 64,
    "a table indexed by the ids": lambda m: torch.arange(64)[m],
    "a count per datapoint expanded as the ids": lambda m: (m.sum(1, keepdim=True) % 7).expand_as(m),
}


@pytest.mark.parametrize("name", sorted(COPIED))
def test_indices_that_copy_or_combine_the_ids_elements_are_constants_an_affine_map_cannot_read_alone(name):
    """An element copied (a broadcast) or combined (a sum) has no one datapoint component of its own: the embedding
    reads them as constants, and an affine map of those alone is refused. Kills rules_data ``_elementwise``
    (a copy taken for one to one) and ``data_op``'s index by data, and ``data_op`` 74 (the count expanded as the
    ids given the ids' element map: a shape op of data without one, of which only ``__getitem__`` kept ``None``)."""
    torch.manual_seed(3)
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in Alone\.forward \(module 'out' of type Linear\): "
                       r"torch\.nn\.functional\.linear: an affine map of values that do not depend on the input$"):
        gradgraph.to_graph(Alone(COPIED[name]).to(DTYPE), ids_with_padding(3), None, squared)


INPUT_BY_KEYWORD = {
    "torch.cumsum(input=m, dim=0)": (lambda m: torch.cumsum(input=m, dim=0), "torch.cumsum"),
    "torch.flip(input=m, dims=(0,))": (lambda m: torch.flip(input=m, dims=(0,)), "torch.flip"),
    "torch.sum(input=m, dim=0)": (lambda m: torch.sum(input=m, dim=0, keepdim=True).expand(m.shape), "torch.sum"),
    "torch.roll(input=m, shifts=1, dims=0)": (lambda m: torch.roll(input=m, shifts=1, dims=0), "torch.roll"),
}


@pytest.mark.parametrize("name", sorted(INPUT_BY_KEYWORD))
def test_data_combined_along_the_datapoints_is_refused_with_its_input_passed_by_keyword(name):
    """torch hands the mode no positional argument for ``torch.cumsum(input=ids, dim=0)``: the rule looked for the
    input in ``args`` only, found none, and let the op through (the per-sample gradients those of the batch's
    forward: a silent wrong answer; checked to fail before the fix). Kills rules_data ``data_op`` 86 as run
    decompositions 2 numbered the code before the fix."""
    torch.manual_seed(2)
    op, op_name = INPUT_BY_KEYWORD[name]
    refused_mixed(Along(op).to(DTYPE), ids_with_padding(2), op_name)


MORE_ONE_TO_ONE = {
    "a count per datapoint plus the ids": lambda m: m.sum(1, keepdim=True) % 7 + m,
    "the ids gathered by their own order": lambda m: torch.gather(m, 1, m.argsort(1)[:, :3]),
    "the larger of two": lambda m: torch.max(m, m.flip(1)),
    "the smaller of two": lambda m: m.min(m.flip(1)),
}


@pytest.mark.parametrize("name", sorted(MORE_ONE_TO_ONE))
def test_indices_from_two_operands_take_the_element_map_of_the_one_that_has_it(name):
    """An op of two data operands takes the element map of the first that has the output's shape (the count per
    datapoint has none; the gathered ids' map does not fit the gather's output, its index's does); ``max`` /
    ``min`` of two tensors are elementwise, no op along an axis. Kills rules_data ``_elementwise`` 5, 11 and
    ``_mixes_datapoints`` 29, 31."""
    torch.manual_seed(3)
    exact(Alone(MORE_ONE_TO_ONE[name]).to(DTYPE), ids_with_padding(3))


class Lengths(nn.Module):
    """A table read at each datapoint's count of tokens, broadcast over its positions (data without an element map
    through a shape op), added to the token values."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.lengths, self.out = nn.Embedding(9, 4), nn.Embedding(8, 4), nn.Linear(4, 2)

    def forward(self, ids):
        lengths = ids.ne(PAD).sum(1, keepdim=True).expand(-1, ids.shape[1])
        return self.out(torch.tanh(self.tokens(ids) + self.lengths(lengths))).sum(1)


def test_indices_without_an_element_map_are_read_again_by_a_replay():
    """The counts are data (not constants of the architecture): a cached plan reads them again on another batch
    with other padding (no new trace, exact). Kills rules_data ``data_op`` 80, 81 (the shape op's output left
    untracked: the embedding's rows are then guarded as constants and the second batch traces again)."""
    from gradgraph.convert.plan import PLAN_CACHE

    torch.manual_seed(4)
    model = Lengths().to(DTYPE)
    exact(model, ids_with_padding(4))
    misses = PLAN_CACHE.misses
    ids = ids_with_padding(5)
    ids[1, -3:] = PAD
    assert_exact_per_sample_grads(model, ids, None, squared)
    assert PLAN_CACHE.misses == misses


def test_the_input_joined_with_a_constant_by_keyword_is_refused_with_the_remedy():
    """``torch.cat(tensors=(ids, constant), dim=1)``: the joined constant found in the keywords. Kills rules_data
    ``data_op`` 26."""

    class Joined(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.out = nn.Embedding(9, 4), nn.Linear(4, 2)

        def forward(self, ids):
            ids = torch.cat(tensors=(ids, torch.full((ids.shape[0], 1), 2)), dim=1)
            return self.out(self.tokens(ids)).sum(1)

    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in \S+: torch\.cat: joins the model's input \(or "
                       r"data made from it\) with a constant of shape \[4, 1\], whose entries belong to no datapoint "
                       r"and no parameter; join them before calling the model \(pass the input with the token "
                       r"prepended or the features padded\)$"):
        gradgraph.to_graph(Joined().to(DTYPE), ids_with_padding(0), None, squared)


class MovedCopies(nn.Module):
    """A table read at the ids taken back out of a broadcast copy (data without an element map, through a shape
    op), its rows then moved along the positions before they join the token values."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.copies, self.out = nn.Embedding(9, 4), nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, ids):
        copies = (ids.unsqueeze(-1) + torch.zeros(2, dtype=torch.long))[..., 0]
        moved = self.copies(copies)[:, torch.tensor([2, 0, 1, 3, 5, 4])]
        return self.out(torch.tanh(self.tokens(ids) + moved)).sum(1)


def test_data_indices_whose_rows_move_before_they_join_the_tokens_are_refused():
    """Indices computed from the input are data, read again on every call: rows that move before they join the
    token values are refused (as constants they would only be guarded). Kills rules_data ``data_op`` 80, 81 (the
    shape op's output of data without an element map left untracked)."""
    gradgraph.convert.clear_structure_cache()
    with pytest.raises(UnsupportedOperationError, match=r"^\S+:\d+ in MovedCopies\.forward: embedding: its indices are "
                       r"computed from the input and their positions move before they join the token values; pass "
                       r"them in \(e\.g\. position_ids\) or compute them with elementwise ops on the ids$"):
        gradgraph.to_graph(MovedCopies().to(DTYPE), ids_with_padding(0), None, squared)


# ---- issue 31, branch mut51: data given another tensor's shape by expand_as / view_as (a bug found beside run convert 60)


class ShapedLikeMask(nn.Module):
    """The padding mask given the shape of the values it masks by ``expand_as`` / ``view_as`` (the second tensor
    gives only a shape, or a dtype): four-head attention scores masked or biased, or hidden states mean-pooled over
    the tokens that are not padding (sentence-transformers' pooling written with ``expand_as`` or ``type_as``)."""

    def __init__(self, form: str, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.form, self.heads = form, heads
        self.tokens, self.qkv, self.out = nn.Embedding(9, 8), nn.Linear(8, 24), nn.Linear(8, 2)

    def forward(self, ids):
        b, t = ids.shape
        h = self.tokens(ids)
        keep = ids != PAD
        if self.form.startswith("pool"):
            h = torch.tanh(self.qkv(h)[..., :8])
            weights = keep.to(DTYPE).unsqueeze(-1)
            if self.form == "pool type_as":
                weights = keep.unsqueeze(-1).type_as(h)
            elif self.form == "pool expand_as other=":
                weights = weights.expand_as(other=h)
            else:
                weights = weights.expand_as(h) if self.form == "pool expand_as" else \
                    weights.expand(b, t, 8).reshape(-1).view_as(h)
            return self.out((h * weights).sum(1) / weights.sum(1))
        q, k, v = (part.view(b, t, self.heads, -1).transpose(1, 2) for part in self.qkv(h).chunk(3, dim=-1))
        scores = q @ k.transpose(-2, -1) / 2.0
        mask = keep[:, None, None, :]
        if self.form == "scores masked_fill":
            scores = scores.masked_fill(~mask.expand_as(scores), float("-inf"))
        else:
            scores = scores + (1.0 - mask.to(DTYPE)).expand_as(scores) * torch.finfo(DTYPE).min
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)).sum(1)


@pytest.mark.parametrize("form", ["scores masked_fill", "scores added", "pool expand_as", "pool view_as",
                                  "pool type_as", "pool expand_as other="])
def test_a_padding_mask_given_the_shape_of_the_values_it_masks_converts_exactly_with_its_symmetries(form):
    """``mask.expand_as(scores)`` / ``mask.expand_as(h)`` / ``mask.type_as(h)``: data made from the ids, given the shape
    (or dtype) of neuron values or attention scores whose values it does not read. The trace took the second tensor for an operand: the attention
    forms were refused as "moves attention scores between datapoints" (the scores' rule replayed the op on the
    mask), the pooling forms as "combines values of different datapoints", both blamed on a model that converts
    (fails before the fix in ``Tracer.dispatch``, branch mut51). Exact against torch.func, and sampled group elements
    keep the function and map the graph to the permuted model's (the mask tells no head or feature apart)."""
    model = ShapedLikeMask(form).to(DTYPE)
    ids = ids_with_padding(4)
    exact(model, ids)
    moved = [assert_group_keeps_function(model, ids, None, squared, seed=seed)[0] for seed in range(3)]
    assert max(moved) > 0
