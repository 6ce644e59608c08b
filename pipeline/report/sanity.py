"""The sanity-check figure (the paper's Fig. A6): similarity of each method's map to its maps on the
model with its top N blocks randomised, against N.

The numbers come from `opticam_core.metrics.aggregate_sanity` (per-N means over the images); the
band is the 95% bootstrap interval over images (2.5–97.5 percentiles of `resamples` resamples,
one vectorised call through its `weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from opticam_core.metrics.sanity import MEASURES, aggregate_sanity

from .aggregates import counts_from_indices, resample_indices
from .figures import DPI, _save
from .tables import method_name, method_order


def block_labels(model: str, count: int) -> list[str]:
    """x tick labels: "none", then the model's blocks from the top ("N=k" where the architecture
    is unknown here)."""
    from opticam_core.models.randomize import architecture, block_names

    try:
        names = block_names(architecture(model))
    except Exception:  # a toy or custom network: numbers are all we can say
        names = []
    return ["none"] + [names[k] if k < len(names) else f"N={k + 1}" for k in range(count - 1)]


def _curves(frame: pd.DataFrame, resamples: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """measure → (mean, lo, hi) per N."""
    values = {c: frame[c].to_numpy() for c in frame.columns}
    point = aggregate_sanity(values)
    n = len(frame)
    out = {}
    if resamples and n > 1:
        idx = resample_indices(n, resamples, np.random.default_rng(seed))
        boot = aggregate_sanity(values, weights=counts_from_indices(idx, n))
    else:
        boot = {}
    for m, v in point.items():
        if m in boot:
            with np.errstate(invalid="ignore"):
                lo, hi = np.nanpercentile(boot[m], [2.5, 97.5], axis=0) if np.isfinite(boot[m]).any() else (v, v)
        else:
            lo = hi = v
        out[m] = (v, np.asarray(lo), np.asarray(hi))
    return out


def sanity_figure(rows: pd.DataFrame, path, *, measures: Sequence[str] = tuple(MEASURES), resamples: int = 200,
                  seed: int = 0, panel_size: tuple[float, float] = (3.6, 3.0)) -> Path | None:
    """One PNG: a row of panels per model (one panel per measure), x = the number of randomised
    blocks (labelled with the model's block names), y = similarity, one line per method (mean
    over images) with its 95% bootstrap band. `rows`: result rows with `model`, `method` and the
    `sanity_*` columns (and `error`, whose rows are left out). Returns None when no row has them."""
    fields = [MEASURES[m][0] for m in measures]
    have = [f for f in fields if f in rows.columns]
    if not have or rows.empty:
        return None
    models = sorted(rows["model"].unique())
    fig = Figure(figsize=(panel_size[0] * len(measures), panel_size[1] * len(models) + 0.6), dpi=DPI)
    axes = fig.subplots(len(models), len(measures), squeeze=False)
    colors = {}
    for r, model in enumerate(models):
        part = rows[rows["model"] == model]
        curves = {method: _curves(part[part["method"] == method], resamples, seed)
                  for method in method_order(part["method"].unique())}
        width = max((len(c[0]) for cs in curves.values() for c in cs.values()), default=1)
        x = np.arange(width)
        labels = block_labels(model, width)
        for c, measure in enumerate(measures):
            ax = axes[r][c]
            for method, cs in curves.items():
                if measure not in cs:
                    continue
                v, lo, hi = cs[measure]
                k = len(v)
                line, = ax.plot(x[:k], v, "o-", ms=3, lw=1.5, label=method_name(method),
                                color=colors.get(method))
                colors.setdefault(method, line.get_color())
                ax.fill_between(x[:k], lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            ax.axhline(0.0, color="#999999", lw=0.8, ls="--")
            lows = [np.nanmin(cs[measure][1]) for cs in curves.values()
                    if measure in cs and np.isfinite(cs[measure][1]).any()]
            ax.set_ylim(min([-0.2 if measure != "ssim" else -0.05, *(lo - 0.05 for lo in lows)]), 1.05)
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{MEASURES[measure][1]}" + (f"\n{model}" if len(models) > 1 else ""), fontsize=9)
            if c == 0:
                ax.set_ylabel("similarity to the original map", fontsize=8)
            if r == len(models) - 1:
                ax.set_xlabel("randomised blocks (cumulative, from the top)", fontsize=8)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.22 / len(models) + 0.05, top=1 - 0.6 / fig.get_figheight(),
                        wspace=0.25, hspace=0.9)
    return _save(fig, path)


__all__ = ["block_labels", "sanity_figure"]
