"""How the interleaved speed benchmarks time their contenders and print their repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def spread(values) -> str:
    """Median and range of a benchmark's repeated ratios or times."""
    return f"{statistics.median(values):7.3f}  [{min(values):.3f}-{max(values):.3f}]"


def sync(device) -> None:
    """Wait for a CUDA device's queued work (nothing elsewhere), so that a timing covers it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device, repeat: int = 3, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls of `fn` after `warmup` untimed ones (which also compile)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, *, per: float = 1, rotate: bool = False,
                device=None, after_repeat: Callable | None = None) -> tuple[dict, dict]:
    """The contenders run in turn, `repeats` times, so that another process's load falls on all
    of them alike. Returns (wall, cpu): name → seconds of each repeat divided by `per` (per
    photo, per image), wall-clock and this process's CPU time.

    rotate: the order also rotates from one repeat to the next (whoever runs right after another
    may inherit its allocator state). device: its queued work is waited for around each call.
    after_repeat(r, wall, cpu): called after repeat r (to print its row)."""
    names = list(contenders)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)] if rotate else names:
            if device is not None:
                sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            contenders[name]()
            if device is not None:
                sync(device)
            wall[name].append((time.perf_counter() - t0) / per)
            cpu[name].append((time.process_time() - c0) / per)
        if after_repeat is not None:
            after_repeat(r, wall, cpu)
    return wall, cpu
