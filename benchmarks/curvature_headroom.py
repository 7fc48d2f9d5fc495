"""How much better than the standard estimator can a curvature estimate be on this zoo?

Hand-built estimators of the Fisher diagonal on the test networks of the curvature zoo,
ordered by what they know (no learning anywhere; bandwidths are picked on training nets):

====================  ===========================================================================
standard              ``mean_i (∂f(x_i)/∂θ)²``
moment calibration    datapoint weights that make the weighted mean and variance of the 128
                      inputs match those of ``X_p̂`` (``p̂`` the maximum-likelihood ``p`` of the
                      128 inputs under the *known* family): what set means can give
kernel importance     :class:`~gradgraph_lab.tasks.curvature.KernelImportanceEstimator`: weights
                      ``N(z; 0, 1) / kde(z)``, knows only that inputs are roughly Gaussian
function, p̂           the exact Fisher under ``X_p̂``, computed by running the network itself on
                      fresh points: what knowing the weights *and* the family can give
function, true p      the same under the true ``X_p``: the floor set by the target's own
                      sampling noise (1024 points)
====================  ===========================================================================

Run: ``python benchmarks/curvature_headroom.py`` (paper-scale zoo, ~1 minute on 2 cores;
``--quick`` uses a small zoo). Prints the mean normalised ℓ2 error on the test networks and
the change against the standard estimator.
"""

from __future__ import annotations

import argparse

import torch

from gradgraph_lab.data import InputFamily, SirenZooConfig, fisher_diagonal, load_curvature_data, make_siren, sample_inputs
from gradgraph_lab.data.curvature import net_generator
from gradgraph_lab.data.siren_zoo import siren_graph
from gradgraph_lab.tasks.curvature import CurvatureSource, KernelImportanceEstimator, normalised_l2, reweighted_estimate


def maximum_likelihood_p(inputs: torch.Tensor, family: InputFamily, grid_size: int = 2001) -> torch.Tensor:
    """``[G]`` the ``p`` on a grid of ``[0, 1]`` that maximises the likelihood of ``inputs [G, B]``."""
    grid = torch.linspace(0.0, 1.0, grid_size, dtype=torch.float64)
    means = torch.tensor([family.mean(float(p)) for p in grid], dtype=torch.float64)
    stds = torch.tensor([family.std(float(p)) for p in grid], dtype=torch.float64)
    z = (inputs[:, None, :] - means[None, :, None]) / stds[None, :, None]
    log_likelihood = -0.5 * z.square().sum(-1) - inputs.shape[1] * stds.log()[None]
    return grid[log_likelihood.argmax(dim=1)]


def moment_calibration_weights(inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[G, B]`` weights ``w = (1 + (μ − φ̄)ᵀ S⁻¹ (φ_i − φ̄)) / B`` with ``φ = (z, z²)``, so the
    weighted first two moments of ``z = (x − mean)/std`` are those of ``N(0, 1)`` (the
    regression estimator written as weights)."""
    z = (inputs - mean[:, None]) / std[:, None]
    features = torch.stack([z, z.square()], dim=-1)  # [G, B, 2]
    centred = features - features.mean(dim=1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / inputs.shape[1] + 1e-9 * torch.eye(2, dtype=inputs.dtype)
    gap = torch.tensor([0.0, 1.0], dtype=inputs.dtype) - features.mean(dim=1)
    coefficients = torch.linalg.solve(covariance, gap[..., None])[..., 0]
    return (1.0 + (centred @ coefficients[..., None])[..., 0]) / inputs.shape[1]


def function_aware(config: SirenZooConfig, network: int, p: float, bias_nodes: torch.Tensor, points: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``[P]`` the exact Fisher diagonal of zoo network ``network`` under ``X_p`` (``points`` fresh inputs)."""
    siren = make_siren(config.hidden, generator=net_generator(config.seed, network), w0=config.w0)
    edge, node = fisher_diagonal(siren_graph(siren, sample_inputs(config.family, p, points, generator=generator)))
    return torch.cat([edge, node[bias_nodes]]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 60-network zoo (smoke run)")
    parser.add_argument("--function-networks", type=int, default=200, help="test networks for the function rows")
    parser.add_argument("--points", type=int, default=8192, help="fresh inputs per function-aware estimate")
    args = parser.parse_args()
    if args.quick:
        zoo, splits, args.function_networks, args.points = SirenZooConfig(num_nets=60, shard_size=30), (40, 20), 5, 256
    else:
        zoo, splits = SirenZooConfig(num_nets=3000), (2000, 500)
    data = load_curvature_data(zoo, progress=False)
    train = CurvatureSource(data.subset(torch.arange(splits[0])))
    test = CurvatureSource(data.subset(torch.arange(len(data) - splits[1], len(data))))
    batch = test.batch(torch.arange(len(test)))
    inputs = batch.act[:, test.input_nodes[0]].double()  # [G, B]: the input neuron's act is x
    p_hat = maximum_likelihood_p(inputs, zoo.family)
    mean = torch.tensor([zoo.family.mean(float(p)) for p in p_hat], dtype=torch.float64)
    std = torch.tensor([zoo.family.std(float(p)) for p in p_hat], dtype=torch.float64)
    calibration = moment_calibration_weights(inputs, mean, std).float()[..., None].expand(-1, -1, test.num_param_kinds)
    kernel = KernelImportanceEstimator.fitted(train)

    rows = {
        "standard": (batch.standard, len(test)),
        "moment calibration (family, p̂)": (reweighted_estimate(batch, calibration), len(test)),
        f"kernel importance (h={kernel.bandwidth})": (kernel(batch), len(test)),
    }
    generator = torch.Generator().manual_seed(0)
    count = min(args.function_networks, len(test))
    first = len(data) - splits[1]
    for label, ps in (("function, p̂", p_hat), ("function, true p", test.data.p)):
        estimates = torch.stack([
            function_aware(zoo, first + index, float(ps[index]), test.bias_nodes, args.points, generator)
            for index in range(count)
        ])
        rows[label] = (estimates, count)

    print("| estimator | test networks | test error ‖pred − F‖/‖F‖ | vs standard |")
    print("|---|---|---|---|")
    for label, (estimate, count) in rows.items():
        error = float(normalised_l2(estimate[:count], batch.target[:count]).mean())
        standard = float(normalised_l2(batch.standard[:count], batch.target[:count]).mean())
        print(f"| {label} | {count} | {error:.4f} | {100 * (error - standard) / standard:+.1f}% |")

if __name__ == "__main__":
    main()
