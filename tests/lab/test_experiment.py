"""What the experiments share (gradgraph_lab.tasks.experiment): split bounds, the config checks,
the process set-up, training and testing one model for one seed, and the run of every model
and seed with its results.json — each checked against a direct computation."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from torch_geometric.data import Data

from gradgraph_lab.distributed import DistributedContext
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks import experiment
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun, check_experiment, split_bounds, train_and_test
from gradgraph_lab.tasks.training import FitResult, LoaderSource, TrainConfig, fit
from toy_experiment import ToyConfig

TRAIN = TrainConfig(epochs=3, batch_size=4, lr=0.05, seed=11, progress=False)


# ----------------------------------------------------------------------------- splits, checks
@pytest.mark.parametrize("sizes", [(1, 1, 1), (640, 160, 200), (7, 3, 5)])
def test_split_bounds_are_consecutive_ranges_of_the_given_sizes(sizes):
    bounds = split_bounds(*sizes)
    assert list(bounds) == ["train", "val", "test"]
    assert [stop - start for start, stop in bounds.values()] == list(sizes)
    covered = torch.cat([torch.arange(*span) for span in bounds.values()])
    assert torch.equal(covered, torch.arange(sum(sizes)))  # no gap, no overlap, from 0


def test_check_experiment_names_the_bad_device_and_accepts_every_choice():
    common = dict(models=("a",), known=("a", "b"), splits=(2, 1, 1), available=4, seeds=(0,))
    for device in (*experiment.DEVICE_CHOICES, "cuda:3", None):
        check_experiment("MyConfig", "item", device=device, **common)
    with pytest.raises(GradGraphError, match=r"MyConfig.device must be one of .* got 'gpu'"):
        check_experiment("MyConfig", "item", device="gpu", **common)
    with pytest.raises(GradGraphError, match="MyConfig: unknown model"):
        check_experiment("MyConfig", "item", device="cpu", **{**common, "models": ("c",)})


# ----------------------------------------------------------------------------- processes
class CountingContext(DistributedContext):
    """A single-process context that counts its teardowns."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__(rank=rank)
        self.teardowns = 0

    def teardown(self) -> None:
        self.teardowns += 1


def test_open_context_closes_only_what_it_opened(monkeypatch):
    opened: list[CountingContext] = []

    def fake_init(device):
        opened.append(CountingContext())
        opened[-1].requested_device = device
        return opened[-1]

    monkeypatch.setattr(experiment, "init_distributed", fake_init)
    given = CountingContext()
    with experiment.open_context("cpu", given) as context:
        assert context is given
    assert given.teardowns == 0 and not opened  # the caller's context stays open

    with pytest.raises(RuntimeError, match="boom"):
        with experiment.open_context("auto") as context:
            assert context is opened[0] and context.requested_device == "auto"
            raise RuntimeError("boom")
    assert opened[0].teardowns == 1  # torn down although the run failed


# ----------------------------------------------------------------------------- one seed
def regression_source(count: int, offset: int) -> LoaderSource:
    """Items ``y = 2x + 1`` (exact) as PyG ``Data`` with ``x [1, 1]``, ``y [1]``."""
    xs = torch.linspace(-1.0, 1.0, count, dtype=torch.float64) + offset
    return LoaderSource([Data(x=x.reshape(1, 1), y=(2 * x + 1).reshape(1)) for x in xs])


SPLITS = {"train": regression_source(8, 0), "val": regression_source(4, 1), "test": regression_source(5, 2)}


def squared_errors(model: nn.Module, batch: Any) -> torch.Tensor:
    return (model(batch.x)[:, 0] - batch.y).square()


def mean_squared_error(model: nn.Module, batch: Any) -> torch.Tensor:
    return squared_errors(model, batch).mean()


def by_hand(model: nn.Module, source: LoaderSource) -> float:
    with torch.no_grad():
        return sum(float((model(item.x)[0, 0] - item.y[0]) ** 2) for item in source.items) / len(source.items)


def test_a_model_without_trainable_parameters_is_evaluated_not_trained():
    model = nn.Linear(1, 1).double().requires_grad_(False)
    run = train_and_test(model, SPLITS, mean_squared_error, squared_errors, TRAIN, seed=0, name="fixed",
                         description="fixed model")
    assert len(run.fit.history) == 1 and run.fit.history[0]["epoch"] == 0
    assert run.fit.history[0]["val_error"] == pytest.approx(by_hand(model, SPLITS["val"]), rel=1e-12)
    assert run.test_error == pytest.approx(by_hand(model, SPLITS["test"]), rel=1e-12)
    assert (run.seed, run.parameters, run.description) == (0, 2, "fixed model")


def test_a_trainable_model_is_fit_with_the_runs_seed_and_tested_with_its_best_weights():
    torch.manual_seed(3)
    model = nn.Linear(1, 1).double()
    reference_model = copy.deepcopy(model)
    run = train_and_test(model, SPLITS, mean_squared_error, squared_errors, TRAIN, seed=5, name="linear",
                         progress=False)
    # Ground truth: the training loop called directly with the seed the run was given.
    reference = fit(reference_model, SPLITS["train"], SPLITS["val"], mean_squared_error, squared_errors,
                    replace(TRAIN, seed=5))
    assert [row["val_error"] for row in run.fit.history] == [row["val_error"] for row in reference.history]
    assert len(run.fit.history) == TRAIN.epochs + 1 and run.fit.best_epoch == reference.best_epoch
    assert torch.equal(model.weight, reference_model.weight)
    assert run.test_error == pytest.approx(by_hand(model, SPLITS["test"]), rel=1e-12)
    assert run.seed == 5 and run.parameters == 2 and TRAIN.seed == 11  # the caller's config is not changed

    other_seed = train_and_test(copy.deepcopy(reference_model), SPLITS, mean_squared_error, squared_errors, TRAIN,
                                seed=6, name="linear", progress=False)
    assert other_seed.fit.history != run.fit.history  # the seed reaches the shuffling


def test_a_spent_time_budget_ends_training_after_the_current_epoch_with_its_best_weights():
    torch.manual_seed(3)
    model = nn.Linear(1, 1).double()
    unlimited_model = copy.deepcopy(model)
    budget = replace(TRAIN, epochs=50, max_seconds=1e-9)  # spent as soon as the first epoch ends
    result = fit(model, SPLITS["train"], SPLITS["val"], mean_squared_error, squared_errors, budget)
    unlimited = fit(unlimited_model, SPLITS["train"], SPLITS["val"], mean_squared_error, squared_errors,
                    replace(TRAIN, epochs=1))
    assert [row["epoch"] for row in result.history] == [0, 1] and result.best_epoch == 1
    assert [row["val_error"] for row in result.history] == [row["val_error"] for row in unlimited.history]
    assert torch.equal(model.weight, unlimited_model.weight)
    roomy = fit(copy.deepcopy(unlimited_model), SPLITS["train"], SPLITS["val"], mean_squared_error, squared_errors,
                replace(TRAIN, max_seconds=3600.0))
    assert len(roomy.history) == TRAIN.epochs + 1  # a budget not spent changes nothing
    with pytest.raises(GradGraphError, match="max_seconds must be > 0"):
        replace(TRAIN, max_seconds=0.0)


# ----------------------------------------------------------------------------- the whole run
LABELS = {"reference": "the reference", "fixed": "a fixed model", "learned": "a learned model"}


def fake_run(name: str, seed: int) -> SeedRun:
    """A test error that names the model and the seed: 10 (reference), 5 (fixed), 1 + seed/10 (learned)."""
    error = {"reference": 10.0, "fixed": 5.0}.get(name, 1.0 + seed / 10)
    return SeedRun(seed=seed, test_error=error, fit=FitResult(history=[{"epoch": 0, "val_error": error}]))


def test_experiment_run_runs_every_model_and_seed_and_writes_results(tmp_path):
    config = ToyConfig(output_dir=tmp_path / "out", cache_root=tmp_path / "cache")
    context = CountingContext()
    loaded: list[tuple] = []

    def loader(zoo, *, cache_root, progress, context):
        loaded.append((zoo, cache_root, progress, context))
        return "data"

    calls: list[tuple[str, int]] = []
    with ExperimentRun.open(config, "toy metric", context) as run:
        assert run.load(loader) == "data" and loaded == [("toy zoo", config.cache_root, False, context)]
        run.start_results(note="hello")
        run.run_models(lambda name, seed: calls.append((name, seed)) or fake_run(name, seed), labels=LABELS,
                       baseline="reference", deterministic=("reference", "fixed"))
        results = run.finish(reference="reference")
    assert context.teardowns == 0  # a context passed in stays open

    # The baseline runs first although not requested; deterministic models once, with seed 0.
    assert calls == [("reference", 0), ("learned", 0), ("learned", 1), ("learned", 2), ("fixed", 0)]
    learned = results["models"]["learned"]
    assert learned["test_errors"] == [1.0, 1.1, 1.2] and learned["label"] == "a learned model"
    assert learned["test_error_mean"] == pytest.approx(1.1)
    assert learned["improvement_pct"] == pytest.approx(100 * (10 - 1.1) / 10)
    assert results["models"]["fixed"]["improvement_pct"] == pytest.approx(50.0)
    written = json.loads((config.output_dir / "results.json").read_text())
    assert list(written) == ["metric", "config", "machine", "world_size", "data_seconds", "note", "models",
                             "wall_seconds"]
    assert written["metric"] == "toy metric" and written["note"] == "hello"
    assert written["models"]["learned"]["test_errors"] == [1.0, 1.1, 1.2]
    assert written["wall_seconds"] >= written["data_seconds"] >= 0


def test_an_interrupted_run_keeps_the_models_it_finished_and_closes_its_processes(tmp_path, monkeypatch):
    opened: list[CountingContext] = []
    monkeypatch.setattr(experiment, "init_distributed", lambda device: opened.append(CountingContext()) or opened[-1])
    config = ToyConfig(output_dir=tmp_path / "out")

    def dies_on_learned(name: str, seed: int) -> SeedRun:
        if name == "learned":
            raise KeyboardInterrupt
        return fake_run(name, seed)

    with pytest.raises(KeyboardInterrupt):
        with ExperimentRun.open(config, "toy metric") as run:
            run.start_results()
            run.run_models(dies_on_learned, labels=LABELS, baseline="reference", deterministic=("reference",))
    written = json.loads((config.output_dir / "results.json").read_text())
    assert list(written["models"]) == ["reference"] and written["models"]["reference"]["test_errors"] == [10.0]
    assert opened[0].teardowns == 1


def test_only_rank_zero_writes_results(tmp_path):
    config = ToyConfig(output_dir=tmp_path / "out", models=("fixed",))
    with ExperimentRun.open(config, "toy metric", CountingContext(rank=1)) as run:
        run.start_results()
        run.run_models(fake_run, labels=LABELS, baseline="reference", deterministic=("reference", "fixed"))
        results = run.finish(reference="reference")
    assert list(results["models"]) == ["reference", "fixed"]
    assert not (config.output_dir / "results.json").exists()
