"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, tables.

Timing: every method of one configuration is run in turn, round after round, so all of
them see the same machine load (the machine is shared); each method's time is the median
over rounds.

Peak memory: the bytes of torch CPU allocations that are live at the worst moment of
one call, above what was live when the call started. It is read from the allocation
events that ``torch.profiler`` records with ``profile_memory=True``: every allocation
and free of the CPU allocator is reported there with its size, in order, so a running
sum of those sizes is the number of live bytes the call added, and its maximum is the
peak. It counts everything torch allocates (the forward's activations, autograd's saved
tensors, the results) and nothing else (Python objects, allocator caching, library code),
which is the memory that grows with the model and the batch. ``tracemalloc`` cannot see
these allocations and ``ru_maxrss`` mixes them with the interpreter and the allocator's
caching; see benchmarks/README.md.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["format_bytes", "format_table", "interleaved_median_times", "peak_memory_bytes", "set_threads"]


def interleaved_median_times(
    methods: dict[str, Callable[[], Any]], *, rounds: int, min_seconds: float = 0.02, warmup: int = 2,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Median wall time (seconds per call) of every method, measured round-robin
    (``statistic=min``: the fastest round instead, steadier on a loaded machine).

    Each round times every method once, in an order rotated from round to round. A
    "time" is the mean over as many back-to-back calls as fit in ``min_seconds`` (at
    least one), so sub-millisecond calls are not dominated by timer resolution.
    """
    names = list(methods)
    for name in names:
        for _ in range(warmup):
            methods[name]()
    calls = {}
    for name in names:
        start = time.perf_counter()
        methods[name]()
        once = time.perf_counter() - start
        calls[name] = max(1, int(min_seconds / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            function, repeat = methods[name], calls[name]
            gc.collect()
            start = time.perf_counter()
            for _ in range(repeat):
                function()
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: statistic(values) for name, values in samples.items()}


def peak_memory_bytes(function: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak torch bytes live during one call of ``function``, above the start (see module doc).

    The call's result is kept alive until the call returns, so it is counted. On a CUDA
    ``device`` the caching allocator's own peak counter is read instead of the profiler.
    """
    from torch._C._profiler import _EventType

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = function()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
        del result
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
        stack.extend(event.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(row) for row in cells[1:])])


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (``None`` keeps the default); returns the number in use."""
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()
