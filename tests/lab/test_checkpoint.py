"""Resumable training (``fit(..., checkpoint=, resume=)``, the experiments' ``--resume``): a run
continued from its checkpoint trains exactly the epochs an uninterrupted run trains, a write
interrupted half-way leaves the last good checkpoint, and a checkpoint of another run is refused
with the setting that differs."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch_geometric.data import Data

from gradgraph_lab.cli import main
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.curvature import preset as curvature_preset
from gradgraph_lab.tasks.curvature import run_curvature
from gradgraph_lab.tasks.experiment import SeedRun, checkpointing, run_seeds
from gradgraph_lab.tasks.training import FitResult, LoaderSource, TrainConfig, fit

TRAIN = TrainConfig(epochs=6, batch_size=3, lr=0.03, seed=4, progress=False)


def source(count: int, offset: float) -> LoaderSource:
    """Items ``y = sin(3x)`` (float64) as PyG ``Data`` with ``x [1, 1]``, ``y [1]``."""
    xs = torch.linspace(-1.0, 1.0, count, dtype=torch.float64) + offset
    return LoaderSource([Data(x=x.reshape(1, 1), y=torch.sin(3 * x).reshape(1)) for x in xs])


TRAIN_SET, VAL_SET = source(10, 0.0), source(5, 0.05)


def squared_errors(model: nn.Module, batch: Any) -> torch.Tensor:
    return (model(batch.x)[:, 0] - batch.y).square()


def mean_squared_error(model: nn.Module, batch: Any) -> torch.Tensor:
    return squared_errors(model, batch).mean()


def network(seed: int) -> nn.Module:
    """Dropout draws from the global random stream, so a resumed run must restore it too."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1)).double()


def curve(result: FitResult) -> list[tuple[Any, ...]]:
    """The learning curve without its wall times (which differ between runs); NaN as None, so it compares."""
    return [tuple(None if value != value else value for value in (row["epoch"], row["train_loss"], row["val_error"]))
            for row in result.history]


def run(model: nn.Module, config: TrainConfig = TRAIN, **kwargs: Any) -> FitResult:
    return fit(model, TRAIN_SET, VAL_SET, mean_squared_error, squared_errors, config, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[FitResult, nn.Module]:
    model = network(0)
    result = run(model)
    return result, model


def assert_same_run(result: FitResult, model: nn.Module, reference: tuple[FitResult, nn.Module]) -> None:
    expected, expected_model = reference
    assert curve(result) == curve(expected)  # exactly: the same steps, bit for bit
    assert (result.best_epoch, result.best_val_error) == (expected.best_epoch, expected.best_val_error)
    for mine, theirs in zip(model.state_dict().values(), expected_model.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_a_run_resumed_after_every_epoch_equals_an_uninterrupted_one(tmp_path, uninterrupted):
    path = tmp_path / "run.pt"
    one_epoch_per_call = replace(TRAIN, max_seconds=1e-9)  # the budget is spent as soon as an epoch ends
    result = run(network(0), one_epoch_per_call, checkpoint=path)
    assert result.resumed_from is None and [row["epoch"] for row in result.history] == [0, 1]
    assert result.stopped_by_budget
    for done in range(1, TRAIN.epochs):
        # Another initialisation and another global random state each time: all of it must come from the file.
        model = network(100 + done)
        torch.manual_seed(1000 + done)
        result = run(model, one_epoch_per_call, checkpoint=path, resume=True)
        assert result.resumed_from == done and len(result.history) == done + 2
        assert result.stopped_by_budget == (done + 1 < TRAIN.epochs)  # the last call ends by finishing
    assert_same_run(result, model, uninterrupted)
    seconds = [row["seconds"] for row in result.history]
    assert seconds == sorted(seconds) and result.seconds >= seconds[-1]  # time adds up across calls


def test_a_finished_run_can_be_extended_and_a_resumed_finished_run_only_restores_its_best_weights(
        tmp_path, uninterrupted):
    path = tmp_path / "run.pt"
    run(network(0), replace(TRAIN, epochs=2), checkpoint=path)
    model = network(7)
    result = run(model, checkpoint=path, resume=True)  # 2 epochs on file, 6 asked for
    assert result.resumed_from == 2
    assert_same_run(result, model, uninterrupted)

    again = network(8)
    before = copy.deepcopy(torch.load(path, weights_only=True))
    restored = run(again, checkpoint=path, resume=True)
    assert restored.resumed_from == TRAIN.epochs
    assert_same_run(restored, again, uninterrupted)
    after = torch.load(path, weights_only=True)
    assert after["state"]["epoch"] == before["state"]["epoch"] and after["state"]["seconds"] == before["state"]["seconds"]  # nothing was trained


def test_an_interrupted_checkpoint_write_keeps_the_last_complete_one(tmp_path, monkeypatch, uninterrupted):
    path = tmp_path / "run.pt"
    real_save = torch.save
    calls = []

    def save_then_die_on_the_third(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            file.write(b"half a checkpoint")
            raise KeyboardInterrupt  # killed while writing epoch 3's checkpoint
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(network(0), checkpoint=path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temp file left beside it
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 2
    model = network(3)
    result = run(model, checkpoint=path, resume=True)
    assert result.resumed_from == 2
    assert_same_run(result, model, uninterrupted)


def test_resume_without_a_checkpoint_file_starts_afresh_and_without_resume_a_stale_file_is_replaced(
        tmp_path, uninterrupted):
    model = network(0)
    result = run(model, checkpoint=tmp_path / "none-yet.pt", resume=True)
    assert result.resumed_from is None
    assert_same_run(result, model, uninterrupted)

    stale = tmp_path / "stale.pt"
    stale.write_bytes(b"not a checkpoint")
    fresh = network(0)
    assert_same_run(run(fresh, checkpoint=stale), fresh, uninterrupted)  # no resume: the old file is not read
    assert torch.load(stale, weights_only=True)["state"]["epoch"] == TRAIN.epochs


@pytest.mark.parametrize("change, named", [
    (dict(config=replace(TRAIN, lr=0.01)), "lr: checkpoint 0.03, this run 0.01"),
    (dict(config=replace(TRAIN, seed=5)), "seed"),
    (dict(identity={"zoo": "another"}), "run.zoo: checkpoint 'one', this run 'another'"),
    (dict(model=nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1)).double()),
     r"parameters\[0\]\[1\]\[0\]: checkpoint 16, this run 8"),
    (dict(config=replace(TRAIN, epochs=2)), "has 3 epochs, more than the 2 asked for"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, change, named):
    path = tmp_path / "run.pt"
    run(network(0), replace(TRAIN, epochs=3), checkpoint=path, identity={"zoo": "one"})
    config = change.get("config", TRAIN)
    with pytest.raises(GradGraphError, match=rf"{path}.*{named}" if "epochs" not in named else named) as error:
        run(change.get("model", network(0)), config, checkpoint=path, resume=True,
            identity=change.get("identity", {"zoo": "one"}))
    assert str(path) in str(error.value)


def test_unreadable_checkpoints_and_resume_without_a_file_name_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(GradGraphError, match=rf"cannot read the checkpoint {broken}.*delete it"):
        run(network(0), checkpoint=broken, resume=True)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(GradGraphError, match="not a gradgraph fit checkpoint"):
        run(network(0), checkpoint=foreign, resume=True)
    with pytest.raises(GradGraphError, match="resume=True needs the checkpoint file"):
        run(network(0), resume=True)


# ----------------------------------------------------------------------------- experiments
def test_checkpointing_ignores_where_and_how_long_a_run_goes_but_not_what_it_trains(tmp_path):
    config = replace(curvature_preset("tiny"), output_dir=tmp_path / "a")
    settings = checkpointing(config, "gradmetanet", 3)
    assert settings["checkpoint"] == tmp_path / "a" / "checkpoints" / "gradmetanet-seed3.pt"
    assert settings["resume"] is False and settings["identity"]["model"] == "gradmetanet"
    moved = replace(config, output_dir=tmp_path / "b", device="auto", progress=True, seeds=(0, 1, 2, 3),
                    resume=True, train=replace(config.train, epochs=50, max_seconds=60.0))
    assert checkpointing(moved, "gradmetanet", 3)["identity"] == settings["identity"]
    assert checkpointing(moved, "gradmetanet", 3)["resume"] is True
    for other in (replace(config, train=replace(config.train, lr=0.5)), replace(config, num_val=2),
                  replace(config, model=replace(config.model, hidden_channels=4))):
        assert checkpointing(other, "gradmetanet", 3)["identity"] != settings["identity"]
    assert checkpointing(config, "gradmetanet_pp", 3)["identity"] != settings["identity"]


def histories(out: Path) -> dict[str, list[tuple[int, float, float]]]:
    models = json.loads((out / "results.json").read_text())["models"]
    return {name: [(row["epoch"], row["train_loss"], row["val_error"]) for row in entry["histories"][0]]
            for name, entry in models.items() if len(entry["histories"][0]) > 1}  # the trained models


@pytest.mark.slow  # a command-line end-to-end run
def test_the_cli_resumes_a_capped_curvature_run_to_the_uninterrupted_result(tmp_path):
    common = ["curvature", "--preset", "tiny", "--models", "standard", "gradmetanet", "gradmetanet_pp", "--quiet",
              "--epochs", "3", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    capped = [*common, "--output-dir", str(tmp_path / "capped"), "--max-minutes", "1e-9"]
    assert main(capped) == 0
    assert all(len(curve) == 2 for curve in histories(tmp_path / "capped").values())  # one epoch each
    assert sorted(p.name for p in (tmp_path / "capped" / "checkpoints").iterdir()) == [
        "gradmetanet-seed0.pt", "gradmetanet_pp-seed0.pt"]
    assert main([*common, "--output-dir", str(tmp_path / "capped"), "--resume"]) == 0
    whole, resumed = histories(tmp_path / "whole"), histories(tmp_path / "capped")
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert [row[0] for row in resumed[name]] == [0, 1, 2, 3]
        assert resumed[name] == whole[name]

    config = replace(curvature_preset("tiny"), output_dir=tmp_path / "capped", cache_root=tmp_path / "cache",
                     models=("standard", "gradmetanet"), resume=True)
    with pytest.raises(GradGraphError, match=r"gradmetanet-seed0.pt is of another run \(num_train: checkpoint 6, this "
                                             r"run 5; num_val: checkpoint 3, this run 4; run.config.num_train: "
                                             r"checkpoint 6, this run 5; run.config.num_val: checkpoint 3, this run 4\)"):
        run_curvature(replace(config, num_train=5, num_val=4))


@pytest.mark.slow  # a command-line end-to-end run
def test_inr_editing_resumes_its_capped_runs_too(tmp_path):
    common = ["inr-edit", "--preset", "tiny", "--models", "no_edit", "gradmetanet", "weight_space_sign", "--quiet",
              "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "capped"), "--max-minutes", "1e-9"]) == 0
    assert sorted(p.name for p in (tmp_path / "capped" / "checkpoints").iterdir()) == [
        "gradmetanet-seed0.pt", "weight_space_sign-seed0.pt"]
    assert main([*common, "--output-dir", str(tmp_path / "capped"), "--resume"]) == 0
    whole, resumed = histories(tmp_path / "whole"), histories(tmp_path / "capped")
    assert set(whole) == {"gradmetanet", "weight_space_sign"} and resumed == whole
    assert all([row[0] for row in curve] == [0, 1, 2] for curve in resumed.values())


def test_the_per_seed_line_says_when_a_run_was_resumed_or_stopped_by_its_budget(capsys):
    def seed_run(seed: int) -> SeedRun:
        history = [{"epoch": epoch, "val_error": 1.0 / (epoch + 1)} for epoch in range(5)]
        return SeedRun(seed=seed, test_error=0.5, fit=FitResult(history=history, best_epoch=3, seconds=12.0,
                                                                resumed_from=2 if seed else None,
                                                                stopped_by_budget=bool(seed)))
    run_seeds(seed_run, [0, 1], label="a model")
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("seed 0: test error 0.5000 (best epoch 3 of 4, 12s)")
    assert second.endswith("seed 1: test error 0.5000 (best epoch 3 of 4, resumed from epoch 2, "
                           "stopped by the time budget, 12s)")


# ----------------------------------------------------------------------------- meta-training
def _meta_config(out_dir, **changes):
    from gradgraph_lab.tasks.learned_optimizer.meta import MetaRunConfig

    return MetaRunConfig(**{**dict(variant="deepsets", start="fixed", max_outer_steps=4, num_particles=2,
                                   truncation=2, horizon=6, select_every=0, checkpoint_every=1,
                                   out_dir=str(out_dir), progress=False), **changes})


def test_meta_training_resumes_from_the_shared_checkpoint_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from gradgraph.optim.meta_train import MetaTrainer
    from gradgraph_lab.tasks.learned_optimizer.meta import run_meta_training

    whole = run_meta_training(_meta_config(tmp_path / "whole"))
    run_meta_training(_meta_config(tmp_path / "parts", max_outer_steps=2))  # "killed" after 2 outer steps
    saved = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert saved["kind"] == "meta-training" and saved["state"]["trainer"]["outer_steps"] == 2
    steps_taken = []
    real_step = MetaTrainer.step
    monkeypatch.setattr(MetaTrainer, "step", lambda self: steps_taken.append(1) or real_step(self))
    resumed = run_meta_training(_meta_config(tmp_path / "parts"))  # the step budget may change on resume
    assert len(steps_taken) == 2  # only the two missing outer steps were taken
    assert resumed.outer_steps == whole.outer_steps == 4
    for key, value in whole.meta_model.state_dict().items():
        assert torch.equal(resumed.meta_model.state_dict()[key], value), key


def test_meta_training_refuses_a_checkpoint_of_other_settings_naming_them(tmp_path):
    from gradgraph_lab.tasks.learned_optimizer.meta import run_meta_training

    run_meta_training(_meta_config(tmp_path, max_outer_steps=1))
    with pytest.raises(GradGraphError, match=r"checkpoint\.pt is of another run \(truncation: checkpoint 2, this run 3; "
                                             r"variant: checkpoint 'deepsets', this run 'sgdm'\); use another --out-dir"):
        run_meta_training(_meta_config(tmp_path, truncation=3, variant="sgdm"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(GradGraphError, match="not a gradgraph meta-training checkpoint"):
        run_meta_training(_meta_config(tmp_path))


def test_a_stopped_run_s_selected_candidate_is_exported_from_its_checkpoint(tmp_path, capsys):
    """``--export-from``: the checkpoint's selected candidate (else its last meta-model) becomes the
    file ``--export`` writes, loadable as a meta-model; anything else is refused by name."""
    from gradgraph_lab.cli import main
    from gradgraph_lab.tasks.learned_optimizer.meta import export_from_checkpoint, run_meta_training
    from gradgraph_lab.tasks.learned_optimizer.run import load_meta_model

    trainer = run_meta_training(_meta_config(tmp_path / "run", max_outer_steps=2))
    path = tmp_path / "run" / "checkpoint.pt"
    provenance = export_from_checkpoint(path, tmp_path / "last.pt")  # no selection: the last meta-model
    assert provenance["selected_outer_step"] is None and provenance["outer_steps"] == 2
    for key, value in trainer.meta_model.state_dict().items():
        assert torch.equal(load_meta_model(str(tmp_path / "last.pt")).state_dict()[key], value), key
    saved = torch.load(path, weights_only=False)  # a selected candidate of other weights
    chosen = {key: value + 1 if value.is_floating_point() else value
              for key, value in saved["state"]["trainer"]["meta_model"].items()}
    saved["state"]["selection"] = {"best": {"outer_step": 1, "meta_model": chosen}, "candidates": [{"outer_step": 1}]}
    torch.save(saved, path)
    assert main(["learned-optimizer", "--export-from", str(path), "--export", str(tmp_path / "best.pt")]) == 0
    assert "exported outer step 1" in capsys.readouterr().out
    exported = load_meta_model(str(tmp_path / "best.pt")).state_dict()
    assert all(torch.equal(exported[key], value) for key, value in chosen.items())
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(GradGraphError, match="not a gradgraph meta-training checkpoint"):
        export_from_checkpoint(tmp_path / "other.pt", tmp_path / "x.pt")


def _tiny_family(monkeypatch):
    from gradgraph_lab.tasks.learned_optimizer import tasks

    monkeypatch.setitem(tasks.TASK_FAMILIES, "tiny-family", {
        "relu": ("digits", (64, 8, 10), nn.ReLU, 16),
        "sigmoid-deep": ("digits", (64, 6, 6, 10), nn.Sigmoid, 8),
    })
    return "tiny-family"


def test_a_task_family_meta_trains_resumes_selects_and_exports(tmp_path, monkeypatch, capsys):
    """``--family``: one rule on two digits MLPs (other depths, activations, batch sizes), each member its
    own target and validation protocol; resumes to the uninterrupted result; the export loads."""
    from gradgraph_lab.cli import main
    from gradgraph_lab.tasks.learned_optimizer.meta import export_from_checkpoint, run_meta_training
    from gradgraph_lab.tasks.learned_optimizer.run import load_meta_model

    family = _tiny_family(monkeypatch)
    settings = dict(task=family, num_particles=4, meta_loss="first-passage", select_every=2, select_seeds=1,
                    select_steps=6)
    whole = run_meta_training(_meta_config(tmp_path / "whole", **settings))
    assert whole.outer_steps == 4 and len(whole.members) == 2
    targets = [member.config.target_loss for member in whole.members]
    assert all(t > 0 for t in targets) and targets[0] != targets[1]  # each member its own L*
    candidates = whole.selection["candidates"]
    assert [c["outer_step"] for c in candidates] == [0, 2, 4] and all(len(c["members"]) == 2 for c in candidates)
    assert candidates[0]["step_reduction"] == sum(candidates[0]["members"]) / 2
    run_meta_training(_meta_config(tmp_path / "parts", max_outer_steps=2, **settings))
    resumed = run_meta_training(_meta_config(tmp_path / "parts", **settings))
    for key, value in whole.meta_model.state_dict().items():
        assert torch.equal(resumed.meta_model.state_dict()[key], value), key
    provenance = export_from_checkpoint(tmp_path / "whole" / "checkpoint.pt", tmp_path / "family.pt")
    best = whole.selection["best"]
    assert provenance["selected_outer_step"] == best["outer_step"]
    loaded = load_meta_model(str(tmp_path / "family.pt")).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in best["meta_model"].items())
    with pytest.raises(GradGraphError, match="task family 'tiny-family' needs start='fixed'"):
        _meta_config(tmp_path, task=family, start="tuned-adam")
    with pytest.raises(SystemExit):  # the parser knows only the shipped families
        main(["learned-optimizer", "--meta-train", "--family", family])
    assert "invalid choice" in capsys.readouterr().err


def test_the_parser_s_family_names_are_the_task_families():
    from gradgraph_lab.tasks.learned_optimizer.command import FAMILIES
    from gradgraph_lab.tasks.learned_optimizer.tasks import TASK_FAMILIES, get_family

    assert tuple(FAMILIES) == tuple(TASK_FAMILIES)
    with pytest.raises(GradGraphError, match="unknown learned-optimizer task family 'mnist1d'"):
        get_family("mnist1d")
