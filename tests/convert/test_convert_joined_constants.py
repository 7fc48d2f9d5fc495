"""``cat`` / ``stack`` of the model's input, or of a parameter, with a constant tensor is refused by name.

The trace follows the input's elements and a parameter's positions through shape ops by replaying the op on
their ids; a constant joined to them kept its *values* in that replay, so a prepended token id 7 read as the
input's element 7, and a float constant turned the ids into floats. Before this refusal such models crashed
deep inside the converter (``NotImplementedError: "bincount_cpu" not implemented for 'Double'`` for a
parameter padded with zeros; ``IndexError`` for PyG's ``GatedGraphConv``, which pads its input's features)
or were refused for an unrelated reason ("the input's features are not its last axis", "copies values of one
position over a new axis"). Each test below fails on the code before the check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.convert import UnsupportedOperationError

from traced_models import assert_exact_per_sample_grads

_D = torch.float64


def _cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


class PaddedWeight(nn.Module):
    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = join
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=_D))
        self.bias = nn.Parameter(torch.randn(2, dtype=_D))
        self.head = nn.Linear(5, 3, dtype=_D)

    def forward(self, x):
        if self.join == "weight rows":
            hidden = F.linear(x, torch.cat([self.weight, torch.zeros(2, 4, dtype=_D)]))
        elif self.join == "stacked row":
            hidden = F.linear(x, torch.cat([self.weight, torch.stack([self.weight[0], torch.ones(4, dtype=_D)])]))
        else:  # a bias with a constant entry
            hidden = F.linear(x, torch.cat([self.weight, self.weight[:2]]),
                              torch.cat([self.bias, torch.zeros(3, dtype=_D)]))
        return self.head(torch.tanh(hidden))


@pytest.mark.parametrize("join, name, shape", [("weight rows", "weight", [2, 4]), ("stacked row", "weight", [4]),
                                               ("bias", "bias", [3])])
def test_a_parameter_joined_with_a_constant_is_refused_naming_the_parameter(join, name, shape):
    model = PaddedWeight(join)
    x, y = torch.randn(5, 4, dtype=_D), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedOperationError, match=rf"joins the parameter '{name}' with a constant of shape "
                                                        rf"\{shape}.*a parameter of the joined shape") as error:
        gradgraph.to_graph(model, x, y, _cross_entropy)
    assert "in PaddedWeight.forward" in str(error.value)


class JoinedInput(nn.Module):
    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = join
        self.embedding = nn.Embedding(20, 4, dtype=_D)
        self.linear = nn.Linear(4, 3, dtype=_D)

    def forward(self, x):
        if self.join == "token id":  # a [CLS]-style id prepended inside forward
            tokens = self.embedding(torch.cat([torch.full((x.shape[0], 1), 7), x], 1))
            return self.linear(tokens).mean(1)
        if self.join == "features":  # zero features appended (PyG's GatedGraphConv does this)
            return self.linear(torch.cat([x, x.new_zeros(x.shape[0], 2)], 1))
        if self.join == "token vector":
            return self.linear(torch.cat([x.new_ones(x.shape[0], 1, 4), x], 1)).mean(1)
        return self.linear(torch.stack([x, torch.full_like(x, 0.5)], 1).flatten(1))  # "stacked"


@pytest.mark.parametrize("join, inputs, shape", [
    ("token id", lambda: torch.randint(0, 20, (5, 6)), [5, 1]),
    ("features", lambda: torch.randn(5, 2, dtype=_D), [5, 2]),
    ("token vector", lambda: torch.randn(5, 3, 4, dtype=_D), [5, 1, 4]),
    ("stacked", lambda: torch.randn(5, 2, dtype=_D), [5, 2]),
])
def test_the_input_joined_with_a_constant_is_refused_with_the_remedy(join, inputs, shape):
    x, y = inputs(), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedOperationError, match=rf"joins the model's input.* with a constant of shape "
                                                        rf"\{shape}.*join them before calling the model"):
        gradgraph.to_graph(JoinedInput(join), x, y, _cross_entropy)


def test_the_remedy_converts_exactly():
    """What the message advises: the token prepended to the input before the call."""
    model = JoinedInput("token id")

    class Prepended(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.linear = model.embedding, model.linear

        def forward(self, ids):
            return self.linear(self.embedding(ids)).mean(1)

    ids = torch.cat([torch.full((5, 1), 7), torch.randint(0, 20, (5, 6))], 1)
    assert_exact_per_sample_grads(Prepended(), ids, torch.randint(0, 3, (5,)), _cross_entropy)


def test_joins_of_the_input_with_itself_still_convert():
    class SelfJoin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.head = nn.Linear(4, 4, dtype=_D), nn.Linear(4, 3, dtype=_D)

        def forward(self, x):
            return self.head(torch.tanh(self.linear(torch.cat([x[:, 1:], x[:, :1]], 1)))).mean(1)  # tokens rotated

    assert_exact_per_sample_grads(SelfJoin(), torch.randn(5, 3, 4, dtype=_D), torch.randint(0, 3, (5,)), _cross_entropy)


def test_pyg_gated_graph_conv_is_refused_by_name_not_crashed():
    gnn = pytest.importorskip("torch_geometric.nn")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = gnn.GatedGraphConv(6, 2).double(), nn.Linear(6, 3, dtype=_D)

        def forward(self, x, edge_index, batch):
            return self.head(gnn.global_mean_pool(torch.relu(self.conv(x, edge_index)), batch))

    torch.manual_seed(0)
    x, edge_index = torch.randn(8, 4, dtype=_D), torch.randint(0, 8, (2, 16))
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    edge_index = edge_index % 4 + 4 * (edge_index >= 4)  # edges within each graph
    with pytest.raises(UnsupportedOperationError, match=r"GatedGraphConv.*torch\.cat: joins the model's input"):
        gradgraph.to_graph(Net(), x, torch.tensor([0, 2]), _cross_entropy,
                           forward_kwargs={"edge_index": edge_index, "batch": batch}, datapoints=batch)
