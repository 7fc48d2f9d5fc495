"""Merging the results of runs that differ only in their seeds or models
(gradgraph_lab.tasks.results.merge_results and ``--merge``): checked against the results of one
run that trained all of it, built here with the experiment's own run loop."""

from __future__ import annotations

import json

import pytest

from gradgraph_lab import cli
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.experiment import ExperimentRun, SeedRun
from gradgraph_lab.tasks.results import merge_results, read_results
from gradgraph_lab.tasks.training import FitResult
from toy_experiment import ToyConfig

LABELS = {"reference": "the reference", "learned": "a learned model", "other": "another learned model"}


def fake_run(name: str, seed: int) -> SeedRun:
    """Errors that name the model and seed; a history and a training time per seed."""
    error = {"reference": 10.0}.get(name, (1.0 if name == "learned" else 2.0) + seed / 10)
    history = [{"epoch": 0, "val_error": error + 1}, {"epoch": 1, "val_error": error}]
    return SeedRun(seed=seed, test_error=error,
                   fit=FitResult(history=history, best_epoch=1, seconds=0.0 if name == "reference" else 3.0 + seed))


def run(config: ToyConfig) -> dict:
    with ExperimentRun.open(config, "toy metric") as experiment_run:
        experiment_run.start_results()
        experiment_run.run_models(fake_run, labels=LABELS, baseline="reference", deterministic=("reference",))
        return experiment_run.finish(reference="reference")


def models_as_json(results: dict) -> dict:
    return json.loads(json.dumps(results["models"]))


def test_merging_runs_of_single_seeds_and_models_equals_the_run_of_all(tmp_path):
    whole = run(ToyConfig(output_dir=tmp_path / "whole", models=("learned", "other")))
    parts = [run(ToyConfig(output_dir=tmp_path / f"p{seed}{model}", seeds=(seed,), models=(model,)))
             for seed, model in [(2, "learned"), (0, "other"), (0, "learned"), (1, "learned"), (2, "other"),
                                 (1, "other")]]
    merged = merge_results(parts, reference="reference")
    assert models_as_json(merged) == models_as_json(whole)  # errors, mean, std, histories, improvement
    assert merged["config"]["seeds"] == [0, 1, 2] and sorted(merged["config"]["models"]) == sorted(whole["models"])
    assert [part["seeds"] for part in merged["merged_from"]][:2] == [{"reference": [0], "learned": [2]},
                                                                    {"reference": [0], "other": [0]}]


def test_the_same_seed_with_different_results_is_refused_naming_both_parts(tmp_path):
    first = run(ToyConfig(seeds=(0,), models=("learned",), output_dir=tmp_path))
    second = json.loads(json.dumps(first))
    second["models"]["learned"]["test_errors"] = [1.5]
    with pytest.raises(GradGraphError, match=r"learned seed 0 is in a\.json .* and in b\.json"):
        merge_results([first, second], reference="reference", sources=["a.json", "b.json"])
    assert merge_results([first, first], reference="reference")["models"]["learned"]["seeds"] == [0]


def test_runs_of_different_experiments_are_refused(tmp_path):
    first = run(ToyConfig(seeds=(0,), models=("learned",), output_dir=tmp_path / "a"))
    other_rate = run(ToyConfig(seeds=(1,), models=("learned",), extra={"learning_rate": 0.2}, output_dir=tmp_path / "b"))
    with pytest.raises(GradGraphError, match=r"config\.extra\.learning_rate: a has None, b has 0\.2"):
        merge_results([first, other_rate], reference="reference", sources=["a", "b"])
    other_metric = {**first, "metric": "another metric"}
    with pytest.raises(GradGraphError, match="not the same experiment"):
        merge_results([first, other_metric], reference="reference")
    with pytest.raises(GradGraphError, match="reference model 'nothing'"):
        merge_results([first], reference="nothing")
    with pytest.raises(GradGraphError, match="at least one"):
        merge_results([], reference="reference")


def with_train(results: dict, **train) -> dict:
    """``results`` with a ``config.train`` like the experiments' (what the toy config lacks)."""
    copied = json.loads(json.dumps(results))
    copied["config"]["train"] = {"epochs": 100, "lr": 0.001, "max_seconds": None, "progress": True,
                                 "description": "train", **train}
    return copied


def test_runs_with_different_time_budgets_merge_and_keep_each_budget(tmp_path):
    learned = run(ToyConfig(seeds=(0,), models=("learned",), output_dir=tmp_path / "a"))
    other = run(ToyConfig(seeds=(0,), models=("other",), output_dir=tmp_path / "b"))
    merged = merge_results([with_train(learned, max_seconds=445.2), with_train(other, max_seconds=340.8)],
                           reference="reference", sources=["a", "b"])
    assert set(merged["models"]) == {"reference", "learned", "other"}
    assert merged["config"]["train"]["max_seconds"] == 445.2 and merged["config"]["train"]["lr"] == 0.001
    assert [part["max_seconds"] for part in merged["merged_from"]] == [445.2, 340.8]
    unbounded = merge_results([with_train(learned, max_seconds=10.0), with_train(other)], reference="reference")
    assert unbounded["config"]["train"]["max_seconds"] is None  # one part had no budget
    with pytest.raises(GradGraphError, match=r"config\.train\.lr: a has 0\.001, b has 0\.003\)"):
        merge_results([with_train(learned), with_train(other, lr=0.003)], reference="reference", sources=["a", "b"])
    with pytest.raises(GradGraphError, match=r"config\.train\.epochs: part 0 has \d+, part 1 has 50"):
        merge_results([with_train(learned), with_train(other, epochs=50)], reference="reference")


def test_read_results_names_the_missing_or_broken_file(tmp_path):
    with pytest.raises(GradGraphError, match=f"no results file at {tmp_path / 'results.json'}"):
        read_results(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GradGraphError, match="broken.json is not a results.json"):
        read_results(tmp_path / "broken.json")


def test_the_merge_flag_trains_nothing_and_writes_the_merged_table(tmp_path, capsys):
    """``gradgraph curvature --merge`` on two curvature-shaped results: table, results.json, plot."""
    labels = {"standard": "standard estimator (mean of squares)", "gradmetanet": "GradMetaNet"}

    def curvature_run(name: str, seed: int) -> SeedRun:
        error = 0.2 if name == "standard" else 0.1 + seed / 100
        # seeds stopped by a time budget after different numbers of epochs: the plot still draws
        history = [{"epoch": epoch, "val_error": error + 0.01 * (2 - epoch)} for epoch in range(3 + seed)]
        return SeedRun(seed=seed, test_error=error, fit=FitResult(history=history, best_epoch=2, seconds=1.0))

    for seed in (0, 1):
        config = ToyConfig(seeds=(seed,), models=("gradmetanet",), output_dir=tmp_path / f"seed{seed}")
        with ExperimentRun.open(config, "toy metric") as experiment_run:
            experiment_run.start_results()
            experiment_run.run_models(curvature_run, labels=labels, baseline="standard", deterministic=("standard",))
            experiment_run.finish(reference="standard")
    code = cli.main(["curvature", "--merge", str(tmp_path / "seed1"), str(tmp_path / "seed0"),
                     "--output-dir", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert code == 0 and "merged 2 runs (seeds [0, 1])" in out
    assert "GradMetaNet" in out and "0.1050 ± 0.0050" in out and "+47.5%" in out
    written = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert written["models"]["gradmetanet"]["test_errors"] == [0.1, 0.11]
    assert (tmp_path / "merged" / "curvature.png").stat().st_size > 0

    code = cli.main(["curvature", "--merge", str(tmp_path / "nothing-here"), "--output-dir", str(tmp_path / "m2")])
    assert code == 1 and "no results file at" in capsys.readouterr().err
