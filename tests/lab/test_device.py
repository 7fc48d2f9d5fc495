"""``--device``: resolution, the flags, results that say where they ran, and CUDA runs
(skipped without a GPU) that must equal the CPU runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from gradgraph_lab.cli import main, run_demo
from gradgraph_lab.distributed import resolve_device
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.curvature import CurvatureConfig, preset, run_curvature

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The converters put every graph field on the device of the model's factors (issue 14).



def test_resolve_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(GradGraphError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(GradGraphError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(GradGraphError, match="only 2 CUDA"):
        resolve_device("cuda:5")


def test_bad_device_values_are_refused(capsys):
    with pytest.raises(GradGraphError, match="device must be one of"):
        CurvatureConfig(device="gpu")
    with pytest.raises(SystemExit):
        main(["curvature", "--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_results_record_device_and_world_size(tmp_path):
    config = replace(preset("tiny"), models=("standard",), output_dir=tmp_path / "out", cache_root=tmp_path / "c",
                     device="auto" if not torch.cuda.is_available() else "cpu")
    run_curvature(config)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["world_size"] == 1 and written["machine"]["world_size"] == 1
    assert written["machine"]["device"] == "cpu" and written["config"]["device"] == config.device
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written atomically: no temp file left


@requires_cuda
def test_demo_on_cuda_is_exact_and_equals_cpu():
    on_cpu = run_demo(hidden=(8,), num_datapoints=16, device="cpu")
    on_cuda = run_demo(hidden=(8,), num_datapoints=16, device="cuda")
    assert on_cuda["max_abs_error"] <= 1e-10
    assert {k: on_cuda[k] for k in ("nodes", "edges", "components")} == {
        k: on_cpu[k] for k in ("nodes", "edges", "components")
    }


@requires_cuda
def test_to_graph_on_cuda_equals_cpu():
    import gradgraph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    inputs, targets = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    on_cpu = gradgraph.to_graph(model, inputs, targets, loss_fn=loss)
    on_cuda = gradgraph.to_graph(model.cuda(), inputs.cuda(), targets.cuda(), loss_fn=loss)
    for key in ("act", "grad", "x", "edge_attr", "edge_index"):
        assert getattr(on_cuda, key).device.type == "cuda", key
        torch.testing.assert_close(getattr(on_cuda, key).cpu(), getattr(on_cpu, key), rtol=1e-12, atol=1e-12)


@requires_cuda
def test_curvature_pipeline_on_cuda_matches_cpu(tmp_path):
    base = replace(preset("tiny"), models=("standard", "kernel_importance", "gradmetanet", "mlp_concat"),
                   cache_root=tmp_path / "cache")
    cpu = run_curvature(replace(base, output_dir=tmp_path / "cpu", device="cpu"))
    cuda = run_curvature(replace(base, output_dir=tmp_path / "cuda", device="cuda"))
    assert json.loads((tmp_path / "cuda" / "results.json").read_text())["machine"]["device"].startswith("cuda")
    for name in ("standard", "kernel_importance"):  # no training: the same numbers up to float32 rounding
        assert cuda["models"][name]["test_error_mean"] == pytest.approx(cpu["models"][name]["test_error_mean"],
                                                                        rel=1e-4)
    for name in ("gradmetanet", "mlp_concat"):  # trained: same start, kernels differ in rounding only
        cpu_start = cpu["models"][name]["histories"][0][0]["val_error"]
        cuda_start = cuda["models"][name]["histories"][0][0]["val_error"]
        assert cuda_start == pytest.approx(cpu_start, rel=1e-4)
