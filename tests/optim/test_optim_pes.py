"""``PES`` against its formulas written out: the perturbations it draws, the particles it
returns, the estimate ``ξ (L⁺ − L⁻) / (2 N σ²)`` summed over pairs, ``undo`` / ``reset`` /
checkpoints, and its argument checks with their messages in full.

Written for the survivors of optim run 3 (``pes.py``, docs/mutation.md); each test's docstring
names the mutants it was checked against (run on each with ``MUTANT_UNDER_TEST=NAME`` in
``.mutation/optim/mutants/``: the test failed).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.optim.pes import PES

DTYPE = torch.float64


def draws(seed: int, pairs: int, dim: int, dtype: torch.dtype = DTYPE) -> list[torch.Tensor]:
    """The first few ``randn(pairs, dim)`` of a CPU generator seeded with ``seed``: PES's ``ε / σ``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(pairs, dim, generator=generator, dtype=dtype) for _ in range(3)]


def whole(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize("num_pairs, dim, sigma", [
    (0, 3, 0.1), (2, 0, 0.1), (2, 3, 0.0), (2, 3, -0.5), (2, 3, math.nan), (-1, 3, 0.1), (2, -1, 0.1)])
def test_pes_refuses_an_empty_population_an_empty_vector_and_a_scale_that_is_not_positive(num_pairs, dim, sigma):
    """``num_pairs >= 1``, ``dim >= 1``, ``sigma > 0`` (NaN refused), message in full.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.__init__`` 3, 4, 10, 12.
    """
    message = f"PES needs num_pairs >= 1, dim >= 1, sigma > 0; got {num_pairs}, {dim}, {sigma}"
    with pytest.raises(GradGraphError, match=whole(message)):
        PES(num_pairs, dim, sigma)


def test_pes_accepts_one_pair_of_one_coordinate_and_keeps_its_arguments():
    """The smallest PES (one pair, ``dim`` 1) is accepted; it keeps ``num_pairs``, ``dim``,
    ``sigma`` and the generator, and starts with ``ξ = 0`` of shape ``[N, dim]`` in its dtype.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.__init__`` 7, 8, 20.
    """
    generator = torch.Generator().manual_seed(3)
    pes = PES(1, 1, 1e-300, generator=generator, dtype=DTYPE)
    assert (pes.num_pairs, pes.dim, pes.sigma) == (1, 1, 1e-300)
    assert pes.generator is generator
    assert pes.accumulated.dtype == DTYPE and pes.accumulated.device.type == "cpu"
    assert torch.equal(pes.accumulated, torch.zeros(1, 1, dtype=DTYPE))
    pes = PES(3, 5, 0.5)
    assert pes.accumulated.dtype == torch.float32 and torch.equal(pes.accumulated, torch.zeros(3, 5))


def test_perturb_returns_theta_plus_and_minus_sigma_times_the_generators_normals():
    """Rows ``0..N-1`` are ``θ + σ z``, rows ``N..2N-1`` ``θ − σ z``, with ``z`` the generator's
    next ``randn(N, dim)``; ``ξ`` sums every ``σ z`` since the start, and the estimate of two
    truncations uses that sum.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.perturb`` 13, 17.
    """
    pairs, dim, sigma = 3, 4, 0.25
    pes = PES(pairs, dim, sigma, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    theta = torch.linspace(-1.0, 1.0, dim, dtype=DTYPE)
    z = draws(7, pairs, dim)
    thetas = pes.perturb(theta)
    assert thetas.shape == (2 * pairs, dim) and thetas.dtype == DTYPE
    torch.testing.assert_close(thetas, torch.cat([theta + sigma * z[0], theta - sigma * z[0]]), atol=1e-15, rtol=0)
    torch.testing.assert_close(pes.accumulated, sigma * z[0], atol=1e-15, rtol=0)
    losses = torch.arange(2 * pairs, dtype=DTYPE) ** 2
    pes.estimate(losses)
    second = pes.perturb(theta)
    torch.testing.assert_close(second, torch.cat([theta + sigma * z[1], theta - sigma * z[1]]), atol=1e-15, rtol=0)
    xi = sigma * (z[0] + z[1])
    torch.testing.assert_close(pes.accumulated, xi, atol=1e-15, rtol=0)
    expected = (xi * (losses[:pairs] - losses[pairs:])[:, None]).sum(0) / (2 * pairs * sigma**2)
    torch.testing.assert_close(pes.estimate(losses), expected, atol=1e-13, rtol=0)


def test_perturb_refuses_a_theta_or_a_mask_of_the_wrong_shape_in_full():
    """Messages in full: a ``theta`` (or ``mask``) that is not ``[dim]``.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.__init__`` 20; ``PES.perturb`` 2, 3, 7, 8.
    """
    pes = PES(2, 3, 0.1, dtype=DTYPE)
    with pytest.raises(GradGraphError, match=whole("PES.perturb: theta must have shape [3], got [4]")):
        pes.perturb(torch.zeros(4, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=whole("PES.perturb: theta must have shape [3], got [1, 3]")):
        pes.perturb(torch.zeros(1, 3, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=whole("PES.perturb: mask must have shape [3], got [2]")):
        pes.perturb(torch.zeros(3, dtype=DTYPE), mask=torch.ones(2, dtype=torch.bool))
    assert torch.equal(pes.accumulated, torch.zeros(2, 3, dtype=DTYPE))  # nothing drawn on a refusal


def test_a_masked_perturbation_moves_only_the_masked_coordinates_with_the_same_draws():
    """``ε`` is ``σ z`` where the mask is true and exactly zero elsewhere, from the same draws as
    without a mask; ``ξ`` and the estimate are zero on the unmasked coordinates.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.perturb`` 13, 17.
    """
    pairs, dim, sigma = 2, 5, 0.5
    mask = torch.tensor([True, False, True, False, False])
    pes = PES(pairs, dim, sigma, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    theta = torch.arange(dim, dtype=DTYPE)
    z = draws(1, pairs, dim)[0]
    epsilon = sigma * z * mask
    thetas = pes.perturb(theta, mask=mask)
    assert torch.equal(thetas, torch.cat([theta + epsilon, theta - epsilon]))
    assert torch.equal(pes.accumulated, epsilon)
    estimate = pes.estimate(torch.tensor([3.0, -1.0, 1.0, 2.0], dtype=DTYPE))
    assert torch.equal(estimate[~mask], torch.zeros(3, dtype=DTYPE))
    differences = torch.tensor([[2.0], [-3.0]], dtype=DTYPE)
    torch.testing.assert_close(estimate, (epsilon * differences).sum(0) / (2 * pairs * sigma**2), atol=1e-14, rtol=0)


def test_a_float32_theta_is_perturbed_in_the_estimators_dtype_and_returned_in_its_own():
    """``θ ± ε`` is formed in PES's dtype (float64 here) and rounded once to ``θ``'s dtype, and the
    particles do not carry ``θ``'s autograd graph.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.perturb`` 30, 33.
    """
    pes = PES(2, 3, 1e-3, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    theta = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    z = draws(5, 2, 3)[0]
    thetas = pes.perturb(theta)
    assert thetas.dtype == torch.float32 and not thetas.requires_grad
    wide = theta.detach().to(DTYPE)
    assert torch.equal(thetas, torch.cat([wide + 1e-3 * z, wide - 1e-3 * z]).to(torch.float32))


def test_the_estimate_is_the_formula_and_clears_the_perturbation():
    """``ĝ = Σ_i ξ_i (L⁺_i − L⁻_i) / (2 N σ²)`` in PES's dtype, whatever the losses' dtype; after
    it, neither ``estimate`` nor ``undo`` has a perturbation to use (messages in full).
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.__init__`` 24; ``PES.estimate`` 2, 3, 4,
    5, 9, 10, 11, 12, 16; ``PES.perturb`` 13, 17; ``PES.undo`` 3, 4.
    """
    pairs, dim, sigma = 3, 2, 0.1
    pes = PES(pairs, dim, sigma, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    with pytest.raises(GradGraphError, match=whole("PES.estimate called before perturb")):
        pes.estimate(torch.zeros(2 * pairs, dtype=DTYPE))
    pes.perturb(torch.zeros(dim, dtype=DTYPE))
    xi = sigma * draws(2, pairs, dim)[0]
    with pytest.raises(GradGraphError, match=whole("PES.estimate: losses must have shape [6], got [5]")):
        pes.estimate(torch.zeros(5, dtype=DTYPE))
    with pytest.raises(GradGraphError, match=whole("PES.estimate: losses must have shape [6], got [6, 1]")):
        pes.estimate(torch.zeros(6, 1, dtype=DTYPE))
    losses = torch.tensor([1.5, -2.0, 0.25, 0.5, 1.0, -1.0], dtype=torch.float32)
    difference = torch.tensor([1.0, -3.0, 1.25], dtype=DTYPE)
    estimate = pes.estimate(losses)
    assert estimate.dtype == DTYPE and estimate.shape == (dim,)
    manual = sum(xi[i] * difference[i] for i in range(pairs)) / (2 * pairs * sigma**2)
    torch.testing.assert_close(estimate, manual, atol=1e-13, rtol=0)
    with pytest.raises(GradGraphError, match=whole("PES.estimate called before perturb")):
        pes.estimate(losses)
    with pytest.raises(GradGraphError, match=whole("PES.undo called without a perturbation to take back")):
        pes.undo()
    torch.testing.assert_close(pes.accumulated, xi, atol=0, rtol=0)  # the estimate kept ξ


def test_undo_takes_back_exactly_the_last_perturbation_once():
    """``undo`` subtracts the last ``ε`` from ``ξ`` (the earlier ones stay) and cannot be repeated.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.perturb`` 13, 17; ``PES.undo`` 3, 4.
    """
    pes = PES(2, 3, 0.5, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    z = draws(4, 2, 3)
    theta = torch.zeros(3, dtype=DTYPE)
    pes.perturb(theta)
    pes.estimate(torch.zeros(4, dtype=DTYPE))
    pes.perturb(theta)
    pes.undo()
    torch.testing.assert_close(pes.accumulated, 0.5 * z[0], atol=1e-15, rtol=0)
    with pytest.raises(GradGraphError, match=whole("PES.undo called without a perturbation to take back")):
        pes.undo()


def test_reset_zeros_the_chosen_pairs_only():
    """``reset(pairs)`` sets ``ξ`` of the true pairs to zero and keeps the others bit for bit."""
    pes = PES(3, 2, 0.5, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    pes.perturb(torch.zeros(2, dtype=DTYPE))
    before = pes.accumulated.clone()
    pes.reset(torch.tensor([False, True, False]))
    assert torch.equal(pes.accumulated[1], torch.zeros(2, dtype=DTYPE))
    assert torch.equal(pes.accumulated[[0, 2]], before[[0, 2]])


def test_a_checkpoint_is_a_copy_both_ways():
    """``state_dict`` returns a copy of ``ξ`` (changing it leaves PES alone), ``load_state_dict``
    takes a copy (changing the source afterwards leaves PES alone), and the loaded ``ξ`` is used.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.load_state_dict`` 5, 8.
    """
    pes = PES(2, 2, 0.5, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    pes.perturb(torch.zeros(2, dtype=DTYPE))
    state = pes.state_dict()
    assert set(state) == {"accumulated"} and torch.equal(state["accumulated"], pes.accumulated)
    state["accumulated"].add_(1.0)
    assert not torch.equal(state["accumulated"], pes.accumulated)
    source = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    other = PES(2, 2, 0.5, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    other.load_state_dict({"accumulated": source})
    source.zero_()
    assert torch.equal(other.accumulated, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE))
    assert other.accumulated.device.type == "cpu"


def test_a_float32_estimator_rounds_a_float64_theta_and_its_losses_to_float32():
    """With PES in float32, a float64 ``θ`` is rounded to float32 before ``± ε`` (the particles come
    back in float64, holding float32 values), and float64 losses give a float32 estimate from
    float32 differences.
    Kills (``MUTANT_UNDER_TEST``, optim run 3's numbers): ``PES.estimate`` 14; ``PES.perturb`` 30, 32, 33.
    """
    pes = PES(2, 3, 0.125, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    theta = torch.tensor([1.0 + 2.0**-40, 1.0 / 3.0, -2.0 - 2.0**-30], dtype=DTYPE)
    z = draws(11, 2, 3, dtype=torch.float32)[0]
    thetas = pes.perturb(theta)
    narrow = theta.to(torch.float32)
    assert thetas.dtype == DTYPE
    assert torch.equal(thetas, torch.cat([narrow + 0.125 * z, narrow - 0.125 * z]).to(DTYPE))
    losses = torch.tensor([1.0 + 2.0**-35, 2.0, 1.0, 0.5], dtype=DTYPE)
    estimate = pes.estimate(losses)
    assert estimate.dtype == torch.float32
    difference = (losses[:2] - losses[2:]).to(torch.float32)
    assert torch.equal(estimate, (0.125 * z * difference[:, None]).sum(0) / (2 * 2 * 0.125**2))
