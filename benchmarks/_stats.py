"""What the interleaved speed benchmarks print about their repeats."""

from __future__ import annotations

import statistics


def spread(values) -> str:
    """Median and range of a benchmark's repeated ratios or times."""
    return f"{statistics.median(values):7.3f}  [{min(values):.3f}-{max(values):.3f}]"
