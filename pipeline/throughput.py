"""GPU time from model evaluations: a measured per-model throughput table, else a stated assumption.

`opticam run --check` multiplies each plan's forward-equivalents per image (`opticam_core.cost`)
by the seconds one forward-equivalent of one image takes on the model:

- measured: the JSON table `python -m benchmarks.gpu` writes (`--throughput FILE`; by default
  `benchmarks/throughput.json` under the current directory when it exists, i.e. a checkout of the
  repository; the package itself never reads the repository's folders). Its shape:
  `{"device": "...", "date": "YYYY-MM-DD", "batch": 64,
    "seconds_per_equivalent": {model name: {precision: seconds per forward-equivalent per image}}}`;
- else assumed from the model's FLOPs: `ASSUMED` below, an H100 SXM datasheet peak (dense) ×
  an assumed utilisation. An assumption, printed as one, never a measurement.

Either figure is a floor: a forward-equivalent at the model's best pass time (batch 64). The
methods run above it by the ratios `python -m benchmarks.gpu` prints (small per-iteration
batches, Python between the passes, LIME's and TIBAV's CPU work).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

#: Where `--check` looks for a measured table when none is named (relative to the working directory).
DEFAULT_PATH = os.path.join("benchmarks", "throughput.json")

#: precision → datasheet peak TFLOP/s, dense, of an H100 SXM: bf16 and tf32 on the tensor cores,
#: fp32 on the CUDA cores (torch's fp32 matmuls by default; its cuDNN convolutions default to TF32,
#: so a CNN at fp32 may run faster than this assumes).
H100_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}
#: The fraction of that peak a run is assumed to reach (an assumption, not a measurement).
ASSUMED_UTILISATION = 0.4

#: Issue 14's goal for the nightly run: the whole config within 1 hour on 8 GPUs.
GOAL_HOURS, GOAL_GPUS = 1.0, 8


class ThroughputError(ValueError):
    """A throughput table that cannot be used (unreadable, or not the shape `load` expects)."""


@dataclass(frozen=True)
class Throughput:
    """A measured table: seconds per forward-equivalent per image, by model name and precision."""

    seconds: Mapping[str, Mapping[str, float]]
    device: str = "?"
    date: str = "?"
    source: str = ""
    extra: Mapping = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "") -> "Throughput":
        if not isinstance(data, Mapping) or not isinstance(data.get("seconds_per_equivalent"), Mapping):
            raise ThroughputError(f"{source or 'throughput table'}: no `seconds_per_equivalent` mapping "
                                  "(model → precision → seconds); see pipeline/throughput.py")
        seconds = {}
        for model, per in data["seconds_per_equivalent"].items():
            if not isinstance(per, Mapping):
                raise ThroughputError(f"{source}: seconds_per_equivalent[{model!r}] is not a precision → seconds mapping")
            for precision, s in per.items():
                if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s <= 0:
                    raise ThroughputError(f"{source}: seconds_per_equivalent[{model!r}][{precision!r}] = {s!r}; "
                                          "expected a positive number of seconds")
            seconds[str(model)] = {str(p): float(s) for p, s in per.items()}
        return cls(seconds, str(data.get("device", "?")), str(data.get("date", "?")), source,
                   {k: v for k, v in data.items() if k != "seconds_per_equivalent"})


def load(path: str) -> Throughput:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise ThroughputError(f"throughput table {path}: {type(err).__name__}: {err}") from err
    return Throughput.from_dict(data, source=path)


def find(path: str | None) -> Throughput | None:
    """The table named (errors if unusable), else DEFAULT_PATH when it exists, else None."""
    if path:
        return load(path)
    return load(DEFAULT_PATH) if os.path.isfile(DEFAULT_PATH) else None


def assumed_seconds(gflops: float, precision: str) -> float:
    """Seconds per forward-equivalent per image at the assumed H100 throughput."""
    peak = H100_PEAK_TFLOPS.get(precision, H100_PEAK_TFLOPS["fp32"])
    return gflops * 1e9 / (peak * 1e12 * ASSUMED_UTILISATION)


def assumption(precision: str) -> str:
    peak = H100_PEAK_TFLOPS.get(precision, H100_PEAK_TFLOPS["fp32"])
    return (f"ASSUMED, not measured: an H100 SXM at {ASSUMED_UTILISATION:.0%} of its {precision} datasheet peak "
            f"({peak:,.0f} TFLOP/s dense) = {peak * ASSUMED_UTILISATION:,.0f} TFLOP/s")


def seconds_per_equivalent(table: Throughput | None, model: str, precision: str,
                           gflops: float | None) -> tuple[float | None, str]:
    """(seconds per forward-equivalent per image, where it comes from) for one model; None when
    neither a measurement nor the model's FLOPs are known."""
    measured = (table.seconds.get(model) or {}).get(precision) if table is not None else None
    if measured is not None:
        return measured, f"measured on {table.device}, {table.date} ({table.source})"
    why = "" if table is None else f"{model} at {precision} not in {table.source}; "
    if not gflops:
        return None, why + "the model's FLOPs are unknown"
    return assumed_seconds(gflops, precision), why + assumption(precision)


def goal_line(total_hours: float) -> str:
    """Against issue 14's nightly goal (1 h on 8 GPUs), assuming the plans spread over the GPUs."""
    budget = GOAL_HOURS * GOAL_GPUS
    wall = total_hours / GOAL_GPUS
    if total_hours <= budget:
        return (f"goal (1 h on {GOAL_GPUS} GPUs = {budget:g} GPU-hours): met, {wall:.2f} h on {GOAL_GPUS} GPUs "
                f"({total_hours / budget:.0%} of the budget)")
    return (f"goal (1 h on {GOAL_GPUS} GPUs = {budget:g} GPU-hours): missed by ×{total_hours / budget:.1f} "
            f"({wall:.1f} h on {GOAL_GPUS} GPUs)")


__all__ = ["ASSUMED_UTILISATION", "DEFAULT_PATH", "GOAL_GPUS", "GOAL_HOURS", "H100_PEAK_TFLOPS", "Throughput",
           "ThroughputError", "assumed_seconds", "assumption", "find", "goal_line", "load",
           "seconds_per_equivalent"]
