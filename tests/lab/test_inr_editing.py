"""INR editing: the zoo, the edit, the gradient inputs, the models' symmetries, the pipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import grey_dilation
from torch.func import functional_call, grad, vmap

import gradgraph_lab.data.inr_zoo as inr_zoo
from gradgraph_lab.cli import main
from gradgraph_lab.data.cache import ShardedCache
from gradgraph_lab.data.inr_zoo import (
    InrLayout,
    InrZooConfig,
    coordinate_grid,
    digit_images,
    dilate,
    editing_graph,
    load_inr_zoo,
    make_inr,
    probe_indices,
    siren_init,
)
from gradgraph.errors import GradGraphError
from gradgraph.nn import outputs_to_parameters
from gradgraph.symmetry import flip_hidden, permute_hidden, random_hidden_perms
from gradgraph_lab.tasks.inr_editing import MODEL_NAMES, EditModelConfig, EditNet, InrSource, build_model, preset
from gradgraph_lab.tasks.inr_editing.models import DEFAULT_MODELS, FeatureScales
from gradgraph.testing import assert_equivariant

HIDDEN = (5, 4)
RESOLUTION = 8
SMALL_MODEL = EditModelConfig(hidden_channels=8, component_channels=4, num_component_layers=1, num_node_layers=2,
                              product_channels=2, output_gain=0.5)


def random_inr(seed: int, hidden: tuple[int, ...] = HIDDEN, w0: float = 30.0) -> torch.nn.Sequential:
    """A float64 SIREN with the SIREN initialisation (perturbed, so no two neurons tie)."""
    generator = torch.Generator().manual_seed(seed)
    inr = make_inr(hidden, w0, dtype=torch.float64)
    params = siren_init([2, *hidden, 1], w0, generator)
    linears = [m for m in inr if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, params):
            linear.weight.copy_(weight.double() + 0.01 * torch.randn(weight.shape, generator=generator, dtype=torch.float64))
            linear.bias.copy_(bias.double())
    return inr


def source_of(inrs: list[torch.nn.Module], targets: torch.Tensor, probes: torch.Tensor) -> InrSource:
    """Stack the editing graphs of ``inrs`` (float64) into an InrSource."""
    coords = coordinate_grid(RESOLUTION, dtype=torch.float64)
    graphs = [editing_graph(inr, coords[probes], target[probes]) for inr, target in zip(inrs, targets)]
    stacked = {name: torch.stack([getattr(g, name) for g in graphs]) for name in ("weight", "bias", "act", "grad")}
    return InrSource(stacked["weight"], stacked["bias"], stacked["act"], stacked["grad"], targets, graphs[0], coords,
                     w0=30.0)


@pytest.fixture(scope="module")
def small_problem():
    """Three INRs, targets, probes, and per-layer scales (float64)."""
    inrs = [random_inr(seed) for seed in range(3)]
    targets = torch.rand(3, RESOLUTION**2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    probes = torch.tensor([0, 5, 9, 18, 27, 33, 40, 47, 50, 63])
    source = source_of(inrs, targets, probes)
    return inrs, targets, probes, source, FeatureScales.measure(source)


def edited_render(model: torch.nn.Module, source: InrSource) -> torch.Tensor:
    batch = source.batch(torch.arange(len(source)))
    with torch.no_grad():
        return batch.render(*model(batch))


def randomise_steps(model: torch.nn.Module) -> None:
    """Give the learned gradient-step sizes (0 at initialisation) random values, so the checks cover them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_step"):
                parameter.uniform_(0.5, 1.5)


def fresh_model(name: str, scales: FeatureScales, source: InrSource, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, scales, SMALL_MODEL, int(source.act.shape[-1])).double()
    randomise_steps(model)
    edited_render(model, source)  # materialise lazy input widths
    return model.eval()


# ----------------------------------------------------------------------------- the zoo
@pytest.mark.slow
def test_zoo_fits_the_digits_above_40_db(tmp_path):
    # The real architecture (2 -> 32 -> 32 -> 1, ω0 = 30) and grid (16 x 16), 12 digits.
    config = InrZooConfig(num_images=12, shard_size=12)
    zoo = load_inr_zoo(config, cache_root=tmp_path, progress=False)
    assert zoo.psnr.shape == (12,)
    assert float(zoo.psnr.min()) > 40.0, zoo.psnr
    # The stored PSNR is what rendering the stored weights gives.
    rendered = zoo.layout().render(zoo.weight, zoo.bias, zoo.coords)
    recomputed = inr_zoo.psnr(rendered, zoo.image)
    assert float(recomputed.min()) > 40.0
    # ... and the stored weights are the INR module's own.
    module = zoo.inr(4)
    torch.testing.assert_close(module(zoo.coords)[:, 0], rendered[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zoo.image.reshape(12, 16, 16), digit_images(12, 16))


def test_interrupted_zoo_build_is_not_read_as_complete(tmp_path, monkeypatch):
    config = InrZooConfig(num_images=6, resolution=8, hidden=(4, 3), fit_steps=5, num_probe_points=8, shard_size=2)
    real_build = inr_zoo.build_shard
    calls = []
    interrupt = [True]

    def interrupted(config, indices, advance=None):
        calls.append(indices.start)
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt  # killed while building the second shard
        return real_build(config, indices, advance)

    monkeypatch.setattr(inr_zoo, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_inr_zoo(config, cache_root=tmp_path, progress=False)
    cache = ShardedCache(tmp_path, "inr-digits", config.cache_key_fields(), config.num_images, config.shard_size)
    assert not cache.is_complete()
    assert cache.shard_path(0).exists() and not cache.shard_path(1).exists()
    # Resuming builds only the missing shards and equals a build from scratch.
    calls.clear()
    interrupt[0] = False
    resumed = load_inr_zoo(config, cache_root=tmp_path, progress=False)
    assert calls == [2, 4] and cache.is_complete()
    monkeypatch.setattr(inr_zoo, "build_shard", real_build)
    fresh = load_inr_zoo(config, cache_root=tmp_path / "fresh", progress=False)
    for name in ("weight", "bias", "act", "grad", "target", "psnr"):
        torch.testing.assert_close(getattr(resumed, name), getattr(fresh, name), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the edit
def test_dilation_equals_scipy_grey_dilation():
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([digit_images(5, 16), torch.rand(3, 16, 16, generator=generator)])
    expected = np.stack([grey_dilation(image, size=(3, 3)) for image in images.numpy()])
    torch.testing.assert_close(dilate(images), torch.from_numpy(expected), rtol=0, atol=0)
    # A direct definition on one pixel: the max of its clipped 3x3 window.
    image = images[6]
    assert float(dilate(image)[0, 5]) == float(image[0:2, 4:7].max())
    with pytest.raises(GradGraphError, match="odd"):
        dilate(images, size=2)


def test_probe_points_are_fixed_pixel_centres():
    config = InrZooConfig()
    probes = probe_indices(config)
    assert probes.shape == (64,) and probes.unique().numel() == 64
    torch.testing.assert_close(probes, probe_indices(config))
    assert not torch.equal(probes, probe_indices(replace(config, seed=1)))


def test_gradient_inputs_equal_torch_func():
    inr = random_inr(1, hidden=(32, 32))
    coords = coordinate_grid(16, dtype=torch.float64)
    probes = probe_indices(InrZooConfig())
    target = dilate(digit_images(2, 16)[1]).reshape(-1).double()
    graph = editing_graph(inr, coords[probes], target[probes])
    params = {name: p.detach() for name, p in inr.named_parameters()}

    def one_loss(p, x, y):
        return (functional_call(inr, p, (x[None],))[0, 0] - y).square()

    reference = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, coords[probes], target[probes])
    from_graph = graph.per_sample_grads()
    assert graph.act.shape == (67, 64)
    for name in reference:
        torch.testing.assert_close(from_graph[name], reference[name], rtol=1e-10, atol=1e-12)


def test_layout_is_outputs_to_parameters_batched_and_renders_like_the_module(small_problem):
    inrs, _, _, source, _ = small_problem
    batch = source.batch(torch.arange(3))
    graphs = batch.graphs()
    generator = torch.Generator().manual_seed(2)
    edge = torch.randn(graphs.edge_index.shape[1], 1, generator=generator, dtype=torch.float64)
    node = torch.randn(graphs.num_nodes, 1, generator=generator, dtype=torch.float64)
    from gradgraph.nn import GradMetaNetOutput

    expected = outputs_to_parameters(graphs, GradMetaNetOutput(edge=edge, node=node, graph=None))
    got = source.layout.parameters(edge[:, 0].reshape(3, -1), node[:, 0].reshape(3, -1))
    for index in range(3):
        for name, value in expected[index].items():
            torch.testing.assert_close(got[name][index], value, rtol=0, atol=0)
    for index, inr in enumerate(inrs):
        torch.testing.assert_close(batch.render()[index], inr(source.coords)[:, 0], rtol=1e-12, atol=1e-12)
    assert isinstance(source.layout, InrLayout)


# ----------------------------------------------------------------------------- symmetries
@pytest.mark.parametrize("kind", ["weight_space", "gradmetanet", "gradmetanet_pp"])
def test_edit_net_is_permutation_equivariant(small_problem, kind):
    _, _, _, source, scales = small_problem
    torch.manual_seed(0)
    net = EditNet(kind, scales, SMALL_MODEL, int(source.act.shape[-1]))
    graphs = source.batch(torch.arange(3)).graphs()
    net.double()(graphs)
    randomise_steps(net)
    assert_equivariant(net, graphs, check_components=kind != "weight_space")


@pytest.mark.parametrize("name", ["weight_space", "probing", "gradmetanet", "gradmetanet_sign", "probing_sign"])
def test_edited_inrs_render_the_same_image_after_permuting_hidden_neurons(small_problem, name):
    inrs, targets, probes, source, scales = small_problem
    model = fresh_model(name, scales, source)
    generator = torch.Generator().manual_seed(5)
    permuted = source_of([permute_hidden(inr, random_hidden_perms(inr, generator)) for inr in inrs], targets, probes)
    assert not torch.allclose(permuted.weight, source.weight)
    original, moved = edited_render(model, source), edited_render(model, permuted)
    assert not torch.allclose(original, source.batch(torch.arange(3)).render(), atol=1e-3)  # the edit does something
    torch.testing.assert_close(moved, original, rtol=1e-9, atol=1e-10)


def random_signs(inr: torch.nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    widths = [m.out_features for m in inr if isinstance(m, torch.nn.Linear)][:-1]
    return [torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1 for width in widths]


@pytest.mark.parametrize("name", ["weight_space_sign", "probing_sign", "gradmetanet_sign", "gradmetanet_pp_sign"])
def test_sign_wrapped_edits_render_the_same_image_after_sign_flips(small_problem, name):
    inrs, targets, probes, source, scales = small_problem
    model = fresh_model(name, scales, source)
    generator = torch.Generator().manual_seed(7)
    flipped = source_of([flip_hidden(inr, random_signs(inr, generator)) for inr in inrs], targets, probes)
    torch.testing.assert_close(flipped.batch(torch.arange(3)).render(), source.batch(torch.arange(3)).render(),
                               rtol=1e-12, atol=1e-12)  # the same functions
    torch.testing.assert_close(edited_render(model, flipped), edited_render(model, source), rtol=1e-9, atol=1e-10)


def test_unwrapped_edits_are_not_sign_equivariant(small_problem):
    # Sensitivity: without ScaleEquivariant the same check must fail.
    inrs, targets, probes, source, scales = small_problem
    model = fresh_model("gradmetanet", scales, source)
    generator = torch.Generator().manual_seed(7)
    flipped = source_of([flip_hidden(inr, random_signs(inr, generator)) for inr in inrs], targets, probes)
    difference = (edited_render(model, flipped) - edited_render(model, source)).abs().max()
    assert float(difference) > 1e-4


def test_no_edit_and_registry():
    assert set(MODEL_NAMES) == {"no_edit", "weight_space", "probing", "gradmetanet", "gradmetanet_pp",
                                "weight_space_sign", "probing_sign", "gradmetanet_sign", "gradmetanet_pp_sign"}
    from gradgraph_lab.tasks.inr_editing.models import DEFAULT_MODELS
    from gradgraph_lab.tasks.inr_editing.run import InrEditConfig

    assert "gradmetanet_pp" not in DEFAULT_MODELS and InrEditConfig().models == DEFAULT_MODELS
    with pytest.raises(GradGraphError, match="unknown INR-editing model"):
        build_model("dws", None, SMALL_MODEL, 4)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_cli_run_writes_results_and_picture(tmp_path, capsys):
    code = main(["inr-edit", "--preset", "tiny", "--seeds", "2", "--output-dir", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == list(DEFAULT_MODELS)  # gradmetanet_pp only on request
    for name, entry in results["models"].items():
        expected_runs = 1 if name == "no_edit" else 2
        assert len(entry["test_errors"]) == expected_runs
        assert entry["test_error_mean"] == pytest.approx(float(np.mean(entry["test_errors"])))
        assert entry["test_error_std"] == pytest.approx(float(np.std(entry["test_errors"])))
    assert "MSE" in results["metric"] and results["zoo"]["num_inrs"] == 12
    assert set(results["targets"]) >= {"gradmetanet_vs_weight_space_pct", "gradmetanet_beats_probing"}
    assert (tmp_path / "out" / "inr_edits.png").stat().st_size > 1000
    assert (tmp_path / "out" / "inr_learning_curves.png").exists()
    out = capsys.readouterr().out
    assert "gradmetanet_sign" in out and "test MSE" in out and "vs weight_space" in out
    # The no_edit floor is the unedited INRs' MSE against the dilated images of the test split.
    config = replace(preset("tiny"), cache_root=tmp_path / "cache")
    zoo = load_inr_zoo(config.zoo, cache_root=config.cache_root, progress=False)
    order = torch.randperm(len(zoo), generator=torch.Generator().manual_seed(config.split_seed))
    test = order[config.num_train + config.num_val :]
    rendered = zoo.layout().render(zoo.weight[test], zoo.bias[test], zoo.coords)
    floor = float((rendered - zoo.target[test]).square().mean())
    assert results["models"]["no_edit"]["test_error_mean"] == pytest.approx(floor, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inr_editing_on_cuda_matches_cpu(tmp_path):
    from gradgraph_lab.tasks.inr_editing import run_inr_editing

    base = replace(preset("tiny"), models=("no_edit", "weight_space", "gradmetanet_sign"), cache_root=tmp_path / "c")
    cpu = run_inr_editing(replace(base, output_dir=tmp_path / "cpu", device="cpu"))
    cuda = run_inr_editing(replace(base, output_dir=tmp_path / "cuda", device="cuda"))
    assert cuda["machine"]["device"].startswith("cuda")
    assert cuda["models"]["no_edit"]["test_error_mean"] == pytest.approx(cpu["models"]["no_edit"]["test_error_mean"],
                                                                         rel=1e-4)
    for name in ("weight_space", "gradmetanet_sign"):  # same start; kernels differ in rounding only
        start = [run["models"][name]["histories"][0][0]["val_error"] for run in (cpu, cuda)]
        assert start[1] == pytest.approx(start[0], rel=1e-4)
