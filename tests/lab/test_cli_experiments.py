"""The path every experiment subcommand shares (curvature, inr-edit): flags -> config, and
run -> report, with the task's run replaced by a stand-in so no experiment actually runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import gradgraph_lab.distributed
from gradgraph_lab import cli
from gradgraph_lab.distributed import DistributedContext, DistributedError
from gradgraph_lab.tasks.curvature import preset as curvature_preset
from gradgraph_lab.tasks.inr_editing import preset as inr_preset

PRESETS = {"curvature": curvature_preset, "inr-edit": inr_preset}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gradgraph")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in cli.SUBCOMMANDS:
        add(subparsers)
    return parser.parse_args(argv)


@pytest.mark.parametrize("command", ["curvature", "inr-edit"])
def test_every_shared_flag_reaches_the_config(command, tmp_path):
    args = parse([command, "--preset", "tiny", "--epochs", "3", "--lr", "0.25", "--batch-size", "7", "--seeds", "2",
                  "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--quiet",
                  "--device", "auto", "--dist-timeout", "9"])
    base = PRESETS[command]("tiny")
    config = cli._apply_experiment_flags(base, args)
    assert (config.train.epochs, config.train.lr, config.train.batch_size) == (3, 0.25, 7)
    assert config.train.grad_clip == base.train.grad_clip  # what no flag names stays the preset's
    assert config.seeds == (0, 1) and config.models == base.models
    assert (config.output_dir, config.cache_root) == (tmp_path / "o", tmp_path / "c")
    assert not config.progress and config.device == "auto" and args.dist_timeout == 9.0

    plain = cli._apply_experiment_flags(base, parse([command, "--preset", "tiny"]))
    assert plain.train == base.train and plain.seeds == base.seeds and plain.progress
    assert plain.output_dir == Path("runs/curvature" if command == "curvature" else "runs/inr-edit")


@pytest.mark.parametrize("command", ["curvature", "inr-edit"])
def test_seed_lists_and_the_time_budget_reach_the_config(command):
    base = PRESETS[command]("tiny")
    config = cli._apply_experiment_flags(base, parse([command, "--seed", "3", "1", "3", "--max-minutes", "2.5"]))
    assert config.seeds == (3, 1) and config.train.max_seconds == 150.0
    assert cli._apply_experiment_flags(base, parse([command])).train.max_seconds is None
    with pytest.raises(SystemExit):  # one way of naming the seeds at a time
        parse([command, "--seeds", "2", "--seed", "4"])


class FakeContext(DistributedContext):
    def __init__(self, rank: int) -> None:
        super().__init__(rank=rank)
        self.teardowns = 0

    def teardown(self) -> None:
        self.teardowns += 1


RESULTS = {"metric": "a metric", "wall_seconds": 1.0, "models": {}}


def run_experiment(monkeypatch, rank: int, run) -> tuple[int, FakeContext]:
    context = FakeContext(rank)
    monkeypatch.setattr(gradgraph_lab.distributed, "init_distributed", lambda device, timeout_s=None: context)
    args = parse(["curvature", "--preset", "tiny", "--quiet"])
    config = cli._apply_experiment_flags(curvature_preset("tiny"), args)
    code = cli._run_experiment("curvature", args, config, run, lambda results: "THE TABLE", items="12 SIRENs",
                               outputs=[Path("a.json"), Path("b.png"), Path("c.png")],
                               notes=lambda results: ["a note"])
    return code, context


def test_rank_zero_prints_header_table_notes_and_files(monkeypatch, capsys):
    seen = []
    code, context = run_experiment(monkeypatch, 0, lambda config, context: seen.append(context) or RESULTS)
    out = capsys.readouterr().out
    assert code == 0 and seen == [context] and context.teardowns == 1
    assert out.startswith("gradgraph curvature (tiny): 12 SIRENs (train 6 / val 3 / test 3), 1 epochs, seeds [0]")
    assert "THE TABLE\n\nmetric: a metric\na note\nwall time 1s; wrote a.json, b.png and c.png\n" in out


def test_other_ranks_print_nothing(monkeypatch, capsys):
    code, context = run_experiment(monkeypatch, 1, lambda config, context: RESULTS)
    assert code == 0 and capsys.readouterr().out == "" and context.teardowns == 1


def test_a_lost_rank_is_one_line_on_stderr_and_exit_code_1(monkeypatch, capsys):
    def dies(config, context):
        raise DistributedError("rank 1 died while gathering")

    code, context = run_experiment(monkeypatch, 0, dies)
    captured = capsys.readouterr()
    assert code == 1 and context.teardowns == 1
    assert captured.err == "gradgraph curvature: rank 1 died while gathering\n"
    assert "THE TABLE" not in captured.out
