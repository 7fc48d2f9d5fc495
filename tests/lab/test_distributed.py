"""Several processes through torch.distributed (gloo on 127.0.0.1), spawned by the tests.

* two ranks train to the same parameters as one rank with the same global batch and seed;
* a zoo built by two ranks into one cache equals the one-process cache, every shard built once;
* a run capped after its first epoch and resumed by both ranks from rank 0's checkpoint ends
  with the uninterrupted run's weights;
* a rank that dies ends the other one with a clear DistributedError within seconds, and a
  rerun resumes from the cache.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import gradgraph_lab.data.curvature as curvature_data
from gradgraph_lab.data import SirenZooConfig, load_curvature_data
from gradgraph_lab.distributed import DistributedContext, DistributedError, init_distributed, shard_indices
from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.curvature import CurvatureSource, ModelConfig, build_model
from gradgraph_lab.tasks.curvature import curvature_error as _error
from gradgraph_lab.tasks.curvature import curvature_loss as _loss
from gradgraph_lab.tasks.training import LoaderSource, TrainConfig, evaluate, fit

# 7 training networks in batches of 3: global batches of 3, 3 and 1 items, so the ranks'
# slices are uneven (2 + 1) and, in the last batch, empty on rank 1.
ZOO = SirenZooConfig(num_nets=11, hidden=(4, 3), num_inputs=6, num_target_points=8, shard_size=2)
NUM_TRAIN = 7
TRAIN = TrainConfig(epochs=2, batch_size=3, lr=3e-3, seed=5, progress=False)
MODEL = ModelConfig(hidden_channels=8, component_channels=4, product_channels=4, mlp_hidden=8)
SPAWN_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _splits(data: curvature_data.CurvatureData) -> tuple[CurvatureSource, CurvatureSource]:
    train = CurvatureSource(data.subset(torch.arange(NUM_TRAIN)))
    val = CurvatureSource(data.subset(torch.arange(NUM_TRAIN, len(data))), train.batcher)
    return train, val


def _train(data: curvature_data.CurvatureData, context: DistributedContext | None, config: TrainConfig = TRAIN,
           **checkpointing) -> tuple[dict, list]:
    # float64: some GradMetaNet parameters have a gradient that is zero in exact arithmetic
    # (a softmax's shift); Adam scales float32 rounding noise there up to lr-sized steps,
    # which no reduction order can reproduce. In float64 that noise stays far below Adam's eps.
    train, val = _splits(data.to(dtype=torch.float64))
    torch.manual_seed(TRAIN.seed)
    model = build_model("gradmetanet", train, MODEL).double()
    result = fit(model, train, val, _loss, _error, config, context=context, **checkpointing)
    return model.state_dict(), result.history


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of the spawned job: build the zoo, train, then train again while rank 1 dies.

    One job for all three checks, because starting two Python processes with torch costs
    more than everything they do here. Writes what it saw to ``out/report-<rank>.json``
    after every phase; never raises to the parent.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    directory = Path(out)
    report: dict = {"rank": rank}

    def save() -> None:
        (directory / f"report-{rank}.json").write_text(json.dumps(report))

    try:
        context = init_distributed("cpu", timeout_s=10.0)
        generated: list[int] = []
        original = curvature_data.draw_network

        def counting(config, index):
            generated.append(index)
            return original(config, index)

        curvature_data.draw_network = counting
        data = load_curvature_data(ZOO, cache_root=directory / "cache", progress=False, context=context)
        report["generated"] = generated
        state, report["history"] = _train(data, context)
        torch.save(state, directory / f"params-{rank}.pt")
        save()

        # The same training stopped after its first epoch by the time budget, then resumed by both ranks
        # from rank 0's checkpoint (the budget check is a collective after the write, so rank 1 reads it whole).
        checkpoint = directory / "resumable.pt"
        _train(data, context, replace(TRAIN, max_seconds=1e-9), checkpoint=checkpoint)
        state, report["resumed_history"] = _train(data, context, checkpoint=checkpoint, resume=True)
        torch.save(state, directory / f"resumed-{rank}.pt")
        save()

        train, val = _splits(data)
        torch.manual_seed(0)
        model = build_model("gradmetanet", train, MODEL)
        steps = []

        def dying_loss(wrapped, batch):
            steps.append(1)
            if rank == 1 and len(steps) == 2:
                os._exit(17)  # a crash: no exception, no cleanup, the sockets just close
            return _loss(wrapped, batch)

        start = time.perf_counter()
        try:
            fit(model, train, val, dying_loss, _error, TRAIN, context=context)
            report["error"] = None
        except DistributedError as error:
            report["error"] = str(error)
        report["seconds_to_error"] = time.perf_counter() - start
    except BaseException as error:  # report everything: the parent asserts on it
        report["unexpected"] = f"{type(error).__name__}: {error}"
    finally:
        save()
        os._exit(0)  # skip a teardown that could wait on the dead peer


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run the 2-rank job once; its directory and the ranks' reports."""
    directory = tmp_path_factory.mktemp("two-ranks")
    ctx = mp.get_context("spawn")
    port = _free_port()
    processes = [ctx.Process(target=_worker, args=(rank, 2, port, str(directory))) for rank in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    assert not hung, f"ranks {hung} still ran after {SPAWN_TIMEOUT_S}s"
    reports = [json.loads((directory / f"report-{rank}.json").read_text()) for rank in range(2)]
    assert "unexpected" not in reports[0], reports[0]
    return directory, reports


def test_shard_indices_split_every_item_once_in_order():
    for num_items in (0, 1, 5, 12):
        for world_size in (1, 2, 3, 5):
            blocks = [shard_indices(num_items, rank, world_size) for rank in range(world_size)]
            assert [i for block in blocks for i in block] == list(range(num_items))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(GradGraphError, match="rank 2"):
        shard_indices(4, 2, 2)


def test_alone_every_collective_is_the_identity():
    context = init_distributed("cpu")
    assert context.world_size == 1 and context.is_main_process and not context.is_distributed
    values = torch.randn(3, 2)
    assert torch.equal(context.all_reduce_mean(values), values)
    assert torch.equal(context.all_gather_cat(values), values)
    assert context.any(True) and not context.any(False)
    context.barrier()
    model = torch.nn.Linear(2, 1)
    assert context.wrap(model) is model


def test_loader_source_batch_matches_its_loader(tmp_path):
    data = load_curvature_data(ZOO, cache_root=tmp_path, progress=False)
    graphs = [data.graph(i) for i in range(5)]
    source = LoaderSource(graphs)
    index = torch.tensor([3, 0, 4])
    batch = source.batch(index)
    assert batch.num_graphs == 3
    torch.testing.assert_close(batch.act, torch.cat([graphs[i].act for i in index.tolist()]), rtol=0, atol=0)


@pytest.mark.slow
def test_two_ranks_build_the_same_cache_and_reach_the_same_parameters(two_rank_job, tmp_path):
    job, reports = two_rank_job
    assert "history" in reports[1], reports[1]
    # Sharded zoo build: every network generated exactly once over both ranks ...
    built = sorted(i for report in reports for i in report["generated"])
    assert built == list(range(ZOO.num_nets))
    assert set(reports[0]["generated"]).isdisjoint(reports[1]["generated"])
    # ... and the cache files equal a one-process build, shard for shard.
    single = load_curvature_data(ZOO, cache_root=tmp_path / "single", progress=False)
    (sharded_dir,) = (job / "cache").iterdir()
    (single_dir,) = (tmp_path / "single").iterdir()
    sharded_dir, single_dir = sharded_dir / "processed", single_dir / "processed"  # ModelZoo's layout
    assert sorted(p.name for p in sharded_dir.iterdir()) == sorted(p.name for p in single_dir.iterdir())
    assert json.loads((sharded_dir / "zoo.json").read_text()) == json.loads((single_dir / "zoo.json").read_text())
    for shard in sorted(single_dir.glob("shard-*.pt")):
        assert shard.read_bytes() == (sharded_dir / shard.name).read_bytes(), shard.name  # byte for byte

    # Training: both ranks hold the same weights, equal to one rank's with the same global batch.
    reference_state, reference_history = _train(single, None)
    states = [torch.load(job / f"params-{rank}.pt", weights_only=True) for rank in range(2)]
    for name, expected in reference_state.items():
        assert torch.equal(states[0][name], states[1][name]), name
        # Relative, with an absolute floor for tensors that stay at ~0 in exact arithmetic
        # (the softmax-shift bias above starts at 0 and has a zero true gradient).
        difference, size = float((states[0][name] - expected).norm()), float(expected.norm())
        assert difference <= 1e-5 * size + 1e-9, f"{name}: |diff| {difference:.2e}, |param| {size:.2e}"
    flat = torch.cat([v.reshape(-1) for v in reference_state.values() if v.is_floating_point()])
    flat_ranks = torch.cat([v.reshape(-1) for v in states[0].values() if v.is_floating_point()])
    assert float((flat_ranks - flat).norm() / flat.norm()) <= 1e-5
    # The ranks' reduced metrics are the one-process metrics.
    for ours, theirs in zip(reports[0]["history"], reference_history):
        assert ours["epoch"] == theirs["epoch"]
        assert ours["val_error"] == pytest.approx(theirs["val_error"], rel=1e-5)
        if theirs["epoch"] > 0:
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
    # The training actually moved the weights (so equality above means something).
    assert reference_history[-1]["val_error"] != reference_history[0]["val_error"]


@pytest.mark.slow  # the two-rank job of the fixture: spawned processes, end to end
def test_two_ranks_resume_a_capped_run_to_the_uninterrupted_two_rank_result(two_rank_job):
    job, reports = two_rank_job
    assert "resumed_history" in reports[1], reports[1]
    for rank in range(2):
        uninterrupted = torch.load(job / f"params-{rank}.pt", weights_only=True)
        resumed = torch.load(job / f"resumed-{rank}.pt", weights_only=True)
        for name, expected in uninterrupted.items():
            assert torch.equal(resumed[name], expected), (rank, name)
        assert [(row["epoch"], row["val_error"]) for row in reports[rank]["resumed_history"]] == [
            (row["epoch"], row["val_error"]) for row in reports[rank]["history"]]


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_a_clear_error_and_a_rerun_resumes(two_rank_job, monkeypatch):
    job, reports = two_rank_job
    survivor = reports[0]
    assert survivor["error"] is not None, "rank 0 finished training although rank 1 died"
    assert "rank 0/2" in survivor["error"] and "another rank died" in survivor["error"]
    assert survivor["seconds_to_error"] < 30.0
    # The zoo both ranks built before the crash is complete: a rerun generates nothing.
    monkeypatch.setattr(curvature_data, "draw_network", lambda *a: pytest.fail("the cache was not reused"))
    data = load_curvature_data(ZOO, cache_root=job / "cache", progress=False)
    assert len(data) == ZOO.num_nets
    assert float(evaluate(build_model("standard", _splits(data)[0], MODEL), _splits(data)[1], _error).mean()) > 0
