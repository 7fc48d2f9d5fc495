"""``gradgraph.datasets.ModelZoo``: the cache round-trips, resumes byte for byte, loads with
``weights_only=True``, splits across ranks, and names the model behind every bad input.

Failing checks: without the safe-global registration in ``gradgraph.graph`` the weights-only
tests fail (``Unsupported global: GLOBAL gradgraph.graph.GradGraph``); a cache that rebuilt
existing shards, or wrote them non-deterministically, fails the byte-identity test; a zoo
that let a ``[k]`` or 0-dim target through fails the target tests.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.loader import DataLoader

import gradgraph
from gradgraph.datasets import ModelZoo
from gradgraph.errors import GradGraphError
from strategies import assert_same_graph

DTYPE = torch.float64
NUM_MODELS = 7
SHARD = 2


def _mlp(seed: int, width: int | None = None) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    width = width or 3 + seed % 3  # mixed architectures in one zoo
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh() if seed % 2 else nn.ReLU(), nn.Linear(width, 3)).to(DTYPE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=DTYPE))
    return model


def _cross_entropy(output, labels):
    return F.cross_entropy(output, labels, reduction="none")


PROBE = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
LABELS = torch.tensor([0, 1, 2, 1, 0])
TARGETS = torch.arange(NUM_MODELS * 2, dtype=DTYPE).reshape(NUM_MODELS, 2) / 10


def _zoo(root: Path, probe=PROBE, builder=_mlp, **kwargs) -> ModelZoo:
    options = dict(targets=TARGETS, probe_targets=LABELS, loss_fn=_cross_entropy, builder=builder, shard_size=SHARD)
    options.update(kwargs)
    return ModelZoo(root, list(range(NUM_MODELS)), probe, **options)


def test_cached_graphs_equal_fresh_ones_and_are_not_rebuilt(tmp_path: Path):
    built = _zoo(tmp_path)
    calls = []
    cached = _zoo(tmp_path, builder=lambda item: calls.append(item) or _mlp(item))
    assert calls == []  # read from the shards, no model built
    assert len(cached) == NUM_MODELS and cached.num_shards == 4
    for index in range(NUM_MODELS):
        fresh = built.convert(index)
        assert_same_graph(cached[index], fresh, exact=True)
        assert cached[index].y.shape == (1, 2) and int(cached[index].zoo_id) == index
        assert cached[index].loss.shape == (PROBE.shape[0],)
    torch.testing.assert_close(cached.targets, TARGETS, rtol=0, atol=0)
    batch = next(iter(DataLoader(cached, batch_size=4)))
    assert batch.y.shape == (4, 2)  # graph-level targets batch to [G, k]


def test_shards_load_with_weights_only(tmp_path: Path):
    zoo = _zoo(tmp_path)
    payload = torch.load(zoo.shard_path(0), weights_only=True)
    assert isinstance(payload["graphs"][0], gradgraph.GradGraph)
    buffer = io.BytesIO()
    torch.save([zoo[3], zoo[4]], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same_graph(loaded[0], zoo[3], exact=True)


def test_a_graph_that_computed_its_gradients_still_loads_with_weights_only():
    """``mean_grad()`` caches parameter blocks (tensors and slices) on the graph; pickling must leave
    them out (with them, the load fails on ``GLOBAL slice``)."""
    graph = gradgraph.to_graph(_mlp(0), PROBE, LABELS, _cross_entropy)
    graph.mean_grad()
    buffer = io.BytesIO()
    torch.save(graph, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same_graph(loaded, graph, exact=True)
    for name, value in graph.mean_grad().items():  # the loaded graph rebuilds the blocks it was saved without
        torch.testing.assert_close(loaded.mean_grad()[name], value, rtol=0, atol=0, msg=name)


class _Killed(Exception):
    pass


def test_a_killed_build_resumes_to_byte_identical_shards(tmp_path: Path):
    reference = _zoo(tmp_path / "uninterrupted")

    def dies_at_five(item):
        if item == 5:
            raise _Killed
        return _mlp(item)

    with pytest.raises(GradGraphError, match="model 5 of the zoo") as info:
        _zoo(tmp_path / "resumed", builder=dies_at_five)
    assert isinstance(info.value.__cause__, _Killed)
    processed = tmp_path / "resumed" / "processed"
    assert sorted(path.name for path in processed.glob("shard-*.pt")) == ["shard-00000.pt", "shard-00001.pt"]
    (processed / ".shard-00002.pt.partial.tmp").write_bytes(b"half a shard")  # a write cut off by a kill
    calls = []
    resumed = _zoo(tmp_path / "resumed", builder=lambda item: calls.append(item) or _mlp(item))
    assert calls == [4, 5, 6]  # only the missing shards were built
    for shard in range(reference.num_shards):
        assert resumed.shard_path(shard).read_bytes() == reference.shard_path(shard).read_bytes(), shard


def test_ranks_split_the_shards(tmp_path: Path):
    reference = _zoo(tmp_path / "one")
    with pytest.raises(GradGraphError, match="shard 0 .* missing; rank 0 of 2 builds it"):
        _zoo(tmp_path / "two", rank=1, world_size=2)
    built = sorted(path.name for path in (tmp_path / "two" / "processed").glob("shard-*.pt"))
    assert built == ["shard-00001.pt", "shard-00003.pt"]
    second = _zoo(tmp_path / "two", rank=0, world_size=2)
    for shard in range(reference.num_shards):
        assert second.shard_path(shard).read_bytes() == reference.shard_path(shard).read_bytes()


def test_a_cache_of_another_zoo_is_refused(tmp_path: Path):
    _zoo(tmp_path)
    with pytest.raises(GradGraphError, match="holds another zoo"):
        _zoo(tmp_path, targets=TARGETS + 1)


def test_a_model_the_converter_refuses_is_named(tmp_path: Path):
    def with_active_dropout(item):
        model = _mlp(item)
        return nn.Sequential(model[0], nn.Dropout(0.5), model[1], model[2]).train() if item == 3 else model

    with pytest.raises(GradGraphError, match=r"model 3 of the zoo \(Sequential\).*model\.eval"):
        _zoo(tmp_path, builder=with_active_dropout)


def test_a_probe_batch_of_another_width_is_named(tmp_path: Path):
    with pytest.raises(GradGraphError, match=r"model 0 of the zoo .*\[5, 6\].*\[b, 4\]"):
        ModelZoo(tmp_path, [_mlp(0)], torch.randn(5, 6, dtype=DTYPE), targets=TARGETS[:1], probe_targets=LABELS,
                 loss_fn=_cross_entropy)


@pytest.mark.parametrize("bad, shape", [(torch.tensor(0.5, dtype=DTYPE), r"\[\]"),
                                        (torch.ones(2, dtype=DTYPE), r"\[2\]"),
                                        (torch.ones(2, 2, dtype=DTYPE), r"\[2, 2\]")])
def test_a_target_of_the_wrong_shape_is_named(tmp_path: Path, bad: torch.Tensor, shape: str):
    targets = [TARGETS[index:index + 1] for index in range(NUM_MODELS)]
    targets[4] = bad
    with pytest.raises(GradGraphError, match=rf"model 4 of the zoo: its target must have shape \[1, k\].*got {shape}"):
        _zoo(tmp_path, targets=targets)


def test_targets_of_different_widths_and_flat_target_tensors_are_refused(tmp_path: Path):
    targets = [TARGETS[index:index + 1] for index in range(NUM_MODELS)]
    targets[6] = TARGETS[6:7, :1]
    with pytest.raises(GradGraphError, match="model 6 of the zoo: its target has k=1 columns, the models before it 2"):
        _zoo(tmp_path / "widths", targets=targets)
    with pytest.raises(GradGraphError, match=r"shape \[num_models, k\] = \[7, k\].*targets\[:, None\]"):
        _zoo(tmp_path / "flat", targets=TARGETS[:, 0])


# ----------------------------------------------------------- per-model probes, extra fields, dtype
def _own_probe(index, model):
    return torch.randn(3 + index % 2, 4, generator=torch.Generator().manual_seed(100 + index), dtype=DTYPE)


def _own_labels(index, model):
    return torch.arange(3 + index % 2) % 3


def _fields(index, model, graph):
    return {"target_node": graph.grad.square().mean(1), "p": torch.tensor([index / 10], dtype=DTYPE)}


def test_per_model_probes_fields_and_dtype_round_trip(tmp_path: Path):
    """A zoo whose members each have their own probe batch and per-node targets (the curvature
    zoo's shape): cached graphs equal a fresh conversion, fields and dtype included."""
    options = dict(targets=None, probe_targets=_own_labels, fields=_fields, dtype=torch.float32)
    built = _zoo(tmp_path, _own_probe, **options)
    cached = _zoo(tmp_path, _own_probe, builder=lambda item: pytest.fail("rebuilt"), **options)
    for index in range(NUM_MODELS):
        graph = cached[index]
        fresh = gradgraph.to_graph(_mlp(index), _own_probe(index, None), _own_labels(index, None), _cross_entropy)
        assert graph.act.shape[1] == 3 + index % 2 and "y" not in graph
        assert graph.act.dtype == graph.target_node.dtype == graph.p.dtype == torch.float32
        assert torch.equal(graph.act, fresh.act.float()) and torch.equal(graph.loss, fresh.loss.float())
        assert torch.equal(graph.target_node, fresh.grad.square().mean(1).float())
        assert_same_graph(graph, built.convert(index), exact=True)
    with pytest.raises(GradGraphError, match="targets=None"):
        cached.targets


def _zoo_with(root: Path, inputs, **kwargs) -> ModelZoo:
    options = dict(targets=TARGETS, probe_targets=LABELS, loss_fn=_cross_entropy, builder=_mlp, shard_size=SHARD)
    options.update(kwargs)
    return ModelZoo(root, list(range(NUM_MODELS)), inputs, **options)


def test_a_field_that_clashes_with_the_graph_or_is_no_tensor_is_named(tmp_path: Path):
    with pytest.raises(GradGraphError, match="model 0 of the zoo: field 'act' is already a field of its graph"):
        _zoo_with(tmp_path / "a", PROBE, fields=lambda index, model, graph: {"act": graph.act})
    with pytest.raises(GradGraphError, match="model 0 of the zoo: field 'p' must be a Tensor, got float"):
        _zoo_with(tmp_path / "b", PROBE, fields=lambda index, model, graph: {"p": 0.5})
    with pytest.raises(GradGraphError, match="model 0 of the zoo: its probe batch must be a Tensor, got list"):
        _zoo_with(tmp_path / "c", lambda index, model: [1.0])
    with pytest.raises(GradGraphError, match="dtype must be a floating dtype"):
        _zoo_with(tmp_path / "d", PROBE, dtype=torch.int64)


def test_a_truncated_shard_is_rebuilt_and_a_killed_writes_temp_file_removed(tmp_path: Path):
    reference = _zoo(tmp_path / "reference")
    root = tmp_path / "zoo"
    first = _zoo(root)
    shard = first.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:100])  # copied by a tool that is not atomic
    stray = shard.parent / ".shard-00003.pt.abcd.tmp"
    stray.write_bytes(b"half a shard")
    calls = []
    again = _zoo(root, builder=lambda item: calls.append(item) or _mlp(item))
    assert calls == [2, 3] and not stray.exists()
    assert shard.read_bytes() == reference.shard_path(1).read_bytes()
    assert_same_graph(again[2], reference[2], exact=True)


def test_every_rank_waits_at_the_barrier_after_writing_its_shards(tmp_path: Path):
    seen = []
    processed = tmp_path / "processed"
    barrier = lambda: seen.append(sorted(path.name for path in processed.glob("shard-*.pt")))  # noqa: E731
    with pytest.raises(GradGraphError, match="missing; rank 0 of 2 builds it"):  # rank 0 never ran: no shared group
        _zoo(tmp_path, rank=1, world_size=2, barrier=barrier)
    assert seen == [["shard-00001.pt", "shard-00003.pt"]]  # called once, after this rank's shards were written
    _zoo(tmp_path / "alone", barrier=lambda: seen.append("alone"))
    assert "alone" not in seen  # one process waits for nobody


def test_a_failed_process_group_barrier_is_a_gradgraph_error_naming_the_rank(tmp_path: Path, monkeypatch):
    def broken_barrier():
        raise RuntimeError("Connection closed by peer\n(a long backtrace)")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", broken_barrier)
    with pytest.raises(GradGraphError, match=r"rank 1 of 2 waited for the other ranks' shards in .*processed and the "
                                             r"barrier failed .* Rerun: finished shards are reused\. Cause: Connection "
                                             r"closed by peer$"):
        _zoo(tmp_path, rank=1, world_size=2)
