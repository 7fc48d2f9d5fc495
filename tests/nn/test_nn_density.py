"""ComponentDensity: the formula, component-permutation equivariance, and inside GradMetaNet."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import build_mlp
from torch_geometric.data import Batch

import gradgraph
from gradgraph import GradGraphError
from gradgraph.nn import ComponentDensity, ComponentReadout, GradMetaNet
from gradgraph.testing import assert_equivariant


@torch.no_grad()
def direct_density(module: ComponentDensity, u: torch.Tensor) -> torch.Tensor:
    """The docstring's equation with explicit loops over graphs, heads and component pairs."""
    num_graphs, num_components, _ = u.shape
    heads, dim = module.heads, module.head_channels
    out = torch.empty(num_graphs, num_components, module.out_channels, dtype=u.dtype)
    for graph in range(num_graphs):
        embedded = module.embed(u[graph])  # [B, H*d]
        mean = embedded.mean(0)
        std = ((embedded - mean) ** 2).mean(0).add(1e-6).sqrt()
        standardised = (embedded - mean) / std
        out[graph, :, : heads * dim] = standardised
        for head in range(heads):
            out[graph, :, heads * dim + head] = -0.5 * (standardised[:, head * dim : (head + 1) * dim] ** 2).sum(-1)
            bandwidth = math.exp(float(module.log_bandwidth[head]))
            columns = slice(head * dim, (head + 1) * dim)
            for i in range(num_components):
                total = 0.0
                for j in range(num_components):
                    distance = float(((standardised[i, columns] - standardised[j, columns]) ** 2).sum())
                    total += math.exp(-distance / (2 * bandwidth**2))
                out[graph, i, heads * (dim + 1) + head] = math.log(total / num_components)
    return out


def test_density_equals_the_direct_double_loop():
    torch.manual_seed(0)
    module = ComponentDensity(5, heads=3, head_channels=2).double()
    with torch.no_grad():
        module.log_bandwidth.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    u = torch.randn(2, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(module(u), direct_density(module, u), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    num_graphs=st.integers(1, 3),
    num_components=st.integers(2, 9),
    heads=st.integers(1, 3),
    head_channels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_permuting_components_permutes_the_output(num_graphs, num_components, heads, head_channels, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = ComponentDensity(4, heads=heads, head_channels=head_channels).double()
    u = torch.randn(num_graphs, num_components, 4, generator=generator, dtype=torch.float64)
    order = torch.randperm(num_components, generator=generator)
    torch.testing.assert_close(module(u[:, order]), module(u)[:, order], rtol=1e-10, atol=1e-10)


def test_density_sees_clumping_that_set_means_do_not():
    """Two sets with the same mean and standard deviation: where the points clump, the
    density differs; any function of (own value, set mean, set std) would agree on the
    shared point 0."""
    module = ComponentDensity(1, heads=1, head_channels=1).double()
    with torch.no_grad():
        module.embed.weight.fill_(1.0)
        module.embed.bias.zero_()
    spread = torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5], dtype=torch.float64)
    clumped = torch.tensor([-0.02, -0.01, 0.0, 0.01, 0.02], dtype=torch.float64)
    extra = torch.tensor([-1.9, 1.9], dtype=torch.float64)
    sets = torch.stack([torch.cat([spread, torch.zeros(2, dtype=torch.float64)]), torch.cat([clumped, extra])])
    sets = (sets - sets.mean(1, keepdim=True)) / sets.std(1, unbiased=False, keepdim=True)
    density = module(sets[..., None])[..., -1]
    assert sets[0, 2] == pytest.approx(0.0, abs=1e-12) and sets[1, 2] == pytest.approx(0.0, abs=1e-12)
    assert density[1, 2] > density[0, 2] + 0.2


def squared_error(output, target):
    return ((output - target) ** 2).sum(dim=1)


def random_graph(widths, seed):
    model = build_mlp(widths, ["tanh"] * (len(widths) - 2) + ["none"], [True] * (len(widths) - 1), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(6, widths[0], generator=generator, dtype=torch.float64)
    targets = torch.randn(6, widths[-1], generator=generator, dtype=torch.float64)
    return gradgraph.to_graph(model, inputs, targets, loss_fn=squared_error)


def test_gradmetanet_with_density_readout_is_equivariant_and_uses_it():
    graphs = [random_graph([3, 5, 4, 2], seed=1), random_graph([2, 6, 1], seed=2)]
    torch.manual_seed(0)
    model = GradMetaNet(8, num_component_layers=1, component_out_channels=3, component_density_heads=2)
    errors = assert_equivariant(model, graphs, num_trials=2, atol=1e-9, rtol=1e-9)
    assert set(errors) == {"node permutation", "component permutation"}
    assert isinstance(model.component_readout.density, ComponentDensity)
    # The density is wired in: changing its bandwidths changes the component outputs.
    model = model.double()
    batch = Batch.from_data_list(graphs)
    before = model(batch).component
    with torch.no_grad():
        model.component_readout.density.log_bandwidth.add_(1.0)
    assert not torch.allclose(model(batch).component, before)


def test_bad_configurations_and_shapes_raise_clear_errors():
    with pytest.raises(GradGraphError, match="heads and head_channels"):
        ComponentDensity(4, heads=0)
    with pytest.raises(GradGraphError, match="bandwidth"):
        ComponentDensity(4, bandwidth=0.0)
    spread = ComponentDensity(4, heads=4).log_bandwidth.exp()
    torch.testing.assert_close(spread, torch.tensor([0.1, 0.2, 0.4, 0.8]), rtol=1e-5, atol=0)
    with pytest.raises(GradGraphError, match=r"expected u \[G, B, 4\], got \[3, 4\]"):
        ComponentDensity(4)(torch.randn(3, 4))
    readout = ComponentReadout(4, 2, density_heads=2)
    assert "density_heads=2" in repr(readout)
    assert "ComponentDensity(12, heads=2, head_channels=2)" in repr(readout.density)


def test_component_readout_fast_path_for_equal_graphs_equals_scatter():
    """One architecture in a batch takes a reshape path; it must equal the scatter path
    (values and gradients), which mixed batches use."""
    from torch_geometric.utils import scatter

    torch.manual_seed(0)
    readout = ComponentReadout(3, 2).double()
    z = torch.randn(12, 5, 3, dtype=torch.float64, requires_grad=True)
    batch = torch.arange(3).repeat_interleave(4)
    fixed = torch.tensor([True, False, False, True] * 3)
    fast = readout(z, batch, 3, fixed)
    pooled = torch.cat(
        [
            scatter(z, batch, dim=0, dim_size=3, reduce="mean"),
            scatter(z, batch, dim=0, dim_size=3, reduce="max"),
            scatter(z[fixed], batch[fixed], dim=0, dim_size=3, reduce="mean"),
        ],
        dim=-1,
    )
    reference = readout.mlp(pooled)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad(fast, z, cotangent)
    (grad_reference,) = torch.autograd.grad(reference, z, cotangent)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-12, atol=1e-12)
    # Unequal or unsorted graph blocks fall back to scatter and still agree with it.
    shuffled = batch[torch.tensor([0, 4, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11])]
    pooled = torch.cat(
        [
            scatter(z, shuffled, dim=0, dim_size=3, reduce="mean"),
            scatter(z, shuffled, dim=0, dim_size=3, reduce="max"),
            scatter(z[fixed], shuffled[fixed], dim=0, dim_size=3, reduce="mean"),
        ],
        dim=-1,
    )
    torch.testing.assert_close(readout(z, shuffled, 3, fixed), readout.mlp(pooled), rtol=1e-12, atol=1e-12)


def test_component_readout_masked_fixed_mean_equals_scatter_for_any_fixed_pattern():
    """The fast path's fixed-neuron mean is a masked sum (no read-back of the mask): it must
    equal the scatter of the selected rows when graphs differ in which neurons are fixed,
    including a graph with none (zeros), whether the block size is passed in or found."""
    from torch_geometric.utils import scatter

    torch.manual_seed(1)
    readout = ComponentReadout(3, 2).double()
    z = torch.randn(12, 5, 3, dtype=torch.float64, requires_grad=True)
    batch = torch.arange(3).repeat_interleave(4)
    fixed = torch.tensor([True, False, False, True] + [False] * 4 + [False, True, True, True])
    pooled = torch.cat(
        [
            scatter(z, batch, dim=0, dim_size=3, reduce="mean"),
            scatter(z, batch, dim=0, dim_size=3, reduce="max"),
            scatter(z[fixed], batch[fixed], dim=0, dim_size=3, reduce="mean"),
        ],
        dim=-1,
    )
    assert torch.equal(pooled[1, :, 6:], torch.zeros(5, 3, dtype=torch.float64))
    reference = readout.mlp(pooled)
    cotangent = torch.randn_like(reference)
    (grad_reference,) = torch.autograd.grad(reference, z, cotangent)
    for nodes_per_graph in (4, None):
        fast = readout(z, batch, 3, fixed, nodes_per_graph)
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
        (grad_fast,) = torch.autograd.grad(fast, z, cotangent)
        torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-12, atol=1e-12)
