"""A ``cat`` along the neurons' axis whose parts hold the same neurons (``trace/rules_shape.py``,
``copy_repeated_parts``): CReLU's ``cat([relu(h), relu(-h)])``, ``cat([h, h ** 2])``, ``cat([h, h])`` over
features or a map's channels convert exactly, each repeated part a tied copy of the neurons it holds, so the
inferred group still permutes them (and moves every copy with them).

Before this rule the first two were refused ("joins two versions of the same neurons ... one neuron in two
parts") and ``cat([h, h])`` converted with ``h``'s neurons pinned (no symmetry); checked on main at 31513c7."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgraph
from gradgraph.nn import GradMetaNet
from gradgraph.testing import assert_equivariant
from convert_values import assert_crelu_copy_factors
from traced_models import assert_exact_per_sample_grads, assert_group_keeps_function, randomise_batch_norms


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


JOINS = {
    "crelu": lambda h: torch.cat([F.relu(h), F.relu(-h)], -1),
    "square": lambda h: torch.cat([torch.tanh(h), torch.tanh(h) ** 2], -1),
    "same": lambda h: (lambda t: torch.cat([t, t], -1))(torch.tanh(h)),
    "three": lambda h: torch.cat([h, 2 * h, torch.sigmoid(h)], -1),
    "part": lambda h: torch.cat([torch.tanh(h), torch.tanh(h[:, 1:4])], -1),
}


class JoinMLP(nn.Module):
    """``l3(tanh(l2(join(l1(x)))))``: the join's parts hold ``l1``'s neurons more than once."""

    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = JOINS[join]
        self.l1 = nn.Linear(4, 5)
        width = self.join(torch.zeros(1, 5)).shape[-1]
        self.l2, self.l3 = nn.Linear(width, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(self.join(self.l1(x)))))


def _mlp(join: str) -> JoinMLP:
    torch.manual_seed(0)
    return JoinMLP(join).double()


def _batch(features: int = 4, *shape: int):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(5, features, *shape, generator=generator, dtype=torch.float64),
            torch.tensor([0, 2, 1, 1, 0]))


@pytest.mark.parametrize("join", sorted(JOINS))
def test_repeated_neurons_in_a_feature_cat_are_exact_and_keep_their_symmetry(join):
    model = _mlp(join)
    inputs, targets = _batch()
    graph = assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    moved, _, perm = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=3)
    # l1's five neurons (nodes 4-8, after the 4 inputs) are still permuted: the copies did not pin them
    assert bool((perm[4:9] != torch.arange(4, 9)).any()), "l1's neurons lost their symmetry"
    assert moved > 0
    # each copy neuron has one MERGE edge from the neuron it copies and holds its part's values as act
    merge = graph.edge_kind == gradgraph.EdgeKind.MERGE
    assert int(merge.sum()) == model.l2.in_features - 5


def test_crelu_copy_holds_its_part_as_act_and_grad():
    """The copy's act is ``relu(-h)`` and its grad ``dL/d relu(-h)`` per datapoint; ``h``'s neurons hold
    ``relu(h)`` as act (read by ``l2``) and ``dL/dh`` as grad (``l1``'s output)."""
    model = _mlp("crelu")
    inputs, targets = _batch()
    graph = gradgraph.to_graph(model, inputs, targets, _cross_entropy)
    h = model.l1(inputs).detach().requires_grad_(True)
    joined = torch.cat([F.relu(h), F.relu(-h)], -1)
    joined.retain_grad()
    _cross_entropy(model.l3(torch.tanh(model.l2(joined))), targets).sum().backward()
    assert_crelu_copy_factors(graph, h, joined, first=4)


class CReLUNet(nn.Module):
    """A CNN with CReLU (``cat([relu(x), relu(-x)], 1)``, PVANet's block) after a BatchNorm'd convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.conv1(x))
        h = F.relu(self.conv2(torch.cat([F.relu(h), F.relu(-h)], 1)))
        return self.head(h.mean((2, 3)))


def test_crelu_over_a_maps_channels_is_exact_and_keeps_its_symmetry():
    torch.manual_seed(0)
    model = randomise_batch_norms(CReLUNet()).double().eval()
    inputs, targets = _batch(2, 6, 6)
    assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    moved, graph, perm = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=1)
    assert moved > 0


def test_the_cached_plan_replays_the_copies():
    model = _mlp("crelu")
    gradgraph.convert.clear_structure_cache()
    inputs, targets = _batch()
    first = gradgraph.to_graph(model, inputs, targets, _cross_entropy)
    again = gradgraph.to_graph(model, inputs + 1, targets, _cross_entropy)
    gradgraph.convert.clear_structure_cache()
    fresh = gradgraph.to_graph(model, inputs + 1, targets, _cross_entropy)
    assert first.num_nodes == again.num_nodes
    for key in ("act", "grad", "x", "edge_attr", "edge_index"):
        torch.testing.assert_close(getattr(again, key), getattr(fresh, key), atol=0, rtol=0)


def test_gradmetanet_is_equivariant_on_a_crelu_graph():
    model = _mlp("crelu")
    inputs, targets = _batch()
    graph = gradgraph.to_graph(model, inputs, targets, _cross_entropy)
    torch.manual_seed(0)
    assert_equivariant(GradMetaNet(8, num_component_layers=1, num_node_layers=1).double(), graph)


class MapTwice(nn.Module):
    """``cat([m, m], 1)`` of a feature map, average-pooled or flattened into a Linear (both were refused as one
    neuron twice before session 19: ``channel_neurons`` / ``spread_positions``)."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.read = read
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(6 if read == "pool" else 6 * 16, 3)

    def forward(self, x):
        m = torch.tanh(self.conv(x))
        joined = torch.cat([m, m], 1)
        return self.head(F.avg_pool2d(joined, 2).mean((2, 3)) if self.read == "pool" else joined.flatten(1))


@pytest.mark.parametrize("read", ["pool", "flatten"])
def test_a_map_joined_with_itself_over_channels_is_exact_and_keeps_its_symmetry(read):
    torch.manual_seed(0)
    model = MapTwice(read).double()
    inputs, targets = _batch(2, 4, 4)
    assert_exact_per_sample_grads(model, inputs, targets, _cross_entropy)
    moved, _, perm = assert_group_keeps_function(model, inputs, targets, _cross_entropy, seed=2)
    assert moved > 0
