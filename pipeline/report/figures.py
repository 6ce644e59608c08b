"""The report's figures as PNG files (matplotlib, Agg canvas, no pyplot state).

Every function writes one PNG of a size fixed by its arguments (figsize × dpi, no tight bbox),
so a caller or a test knows the pixel size in advance, and returns the path.

- `maps_grid`: the paper's Figure 5 layout: images × methods, maps overlaid on the
  preprocessed image (Resize(256)/CenterCrop(224)), from the rows' stored PNG maps.
- `metric_bars`: AD/AG/AI per method with bootstrap intervals (and the paper's values as marks).
- `mean_curves`: insertion and deletion curves averaged over images, per method (the means
  accumulate with `CurveMeans`, streamed, so large runs fit in memory).
- `convergence`: Opti-CAM's objective against iteration, and the distribution of iterations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..images import decode_gray, decode_image
from .tables import method_name, method_order

DPI = 100
SIZE = 224
RESIZE = 256


# --------------------------------------------------------------------------------------------
# Images and maps


def decode_map(png: bytes | None) -> np.ndarray | None:
    """A stored map (grayscale PNG, 8- or 16-bit) as float32 H×W in [0,1]; None when absent."""
    if png is None or (isinstance(png, float) and math.isnan(png)):
        return None
    return decode_gray(png)


def preprocess_image(data: bytes, size: int = SIZE, resize: int = RESIZE) -> np.ndarray:
    """Encoded image → H×W×3 float in [0,1], exactly as the job saw it: opticam_core's
    preprocessing (Resize(`resize`) then CenterCrop(`size`)), so stored maps line up."""
    from opticam_core.transforms import preprocess

    x = preprocess(decode_image(data), resize=resize, size=(size, size))
    return x.permute(1, 2, 0).numpy().astype(np.float32)


def load_images(samples_uri: str | None, sample_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """sample_id → preprocessed image, from a dataset's samples; {} when they cannot be read."""
    if not samples_uri or not len(sample_ids):
        return {}
    from .runs import read_samples

    try:
        table = read_samples(samples_uri, sample_ids)
    except (OSError, ValueError, KeyError):
        return {}
    out = {}
    for sid, data in zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist()):
        try:
            out[sid] = preprocess_image(data)
        except (OSError, ValueError):
            continue  # an undecodable sample: shown without its photo
    return out


def pick_grid_samples(maps: pd.DataFrame, k: int) -> list[str]:
    """Up to `k` sample ids with the most methods having a map, ties by id (deterministic)."""
    have = maps[maps["map_png"].notna()]
    if have.empty:
        return []
    per = have.groupby("sample_id")["method"].nunique().reset_index()
    per = per.sort_values(["method", "sample_id"], ascending=[False, True])
    return per["sample_id"].head(k).tolist()


def maps_grid(path: Path, maps: pd.DataFrame, images: Mapping[str, np.ndarray], *,
              sample_ids: Sequence[str] | None = None, methods: Sequence[str] | None = None,
              title: str = "", cell_in: float = 1.6, captions: Mapping[str, str] | None = None) -> Path:
    """Figure-5 grid: one row per image (photo, then one column per method's overlaid map).

    `maps`: rows with sample_id, method, map_png. Size: (1 + methods)·cell_in × rows·cell_in
    inches (+0.4 in for the title) at DPI."""
    sample_ids = list(sample_ids) if sample_ids is not None else pick_grid_samples(maps, 6)
    methods = list(methods) if methods is not None else method_order(maps["method"].unique())
    lookup = {(s, m): png for s, m, png in zip(maps["sample_id"], maps["method"], maps["map_png"])}
    nrow, ncol = max(len(sample_ids), 1), len(methods) + 1
    fig = Figure(figsize=(ncol * cell_in, nrow * cell_in + 0.4), dpi=DPI)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for i, sid in enumerate(sample_ids):
        photo = images.get(sid)
        ax = axes[i, 0]
        if photo is not None:
            ax.imshow(photo)
        else:
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        ax.set_ylabel((captions or {}).get(sid, sid), fontsize=6)
        for j, m in enumerate(methods, start=1):
            ax = axes[i, j]
            smap = decode_map(lookup.get((sid, m)))
            if photo is not None:
                ax.imshow(photo)
            if smap is not None:
                ax.imshow(smap, cmap="jet", alpha=0.5 if photo is not None else 1.0, vmin=0, vmax=1,
                          extent=(-0.5, SIZE - 0.5, SIZE - 0.5, -0.5) if photo is not None else None)
            else:
                ax.text(0.5, 0.5, "no map", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            if i == 0:
                ax.set_title(method_name(m), fontsize=8)
    if not sample_ids:
        axes[0, 0].text(0.5, 0.5, "no stored maps", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=1 - 0.45 / (nrow * cell_in + 0.4), wspace=0.03, hspace=0.03)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


# --------------------------------------------------------------------------------------------
# Charts

BARS = ("AD", "AG", "AI")


def metric_bars(path: Path, cells: pd.DataFrame, dataset: str, model: str, *, metrics: Sequence[str] = BARS,
                paper: Mapping[tuple[str, str], float] | None = None, size=(12.0, 4.0)) -> Path:
    """One panel per metric: a bar per method, whiskers = 95% bootstrap interval, ◆ = paper."""
    part = cells[(cells["dataset"] == dataset) & (cells["model"] == model) & (cells["subset"] == "all")]
    methods = method_order(part.loc[part["metric"].isin(metrics), "method"].unique())
    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(methods))
    for ax, metric in zip(axes, metrics):
        rows = part[part["metric"] == metric].set_index("method").reindex(methods)
        v, lo, hi = (rows[c].to_numpy(dtype=float) for c in ("value", "lo", "hi"))
        err = np.vstack([np.where(np.isfinite(lo), v - lo, 0), np.where(np.isfinite(hi), hi - v, 0)])
        ax.bar(x, np.nan_to_num(v), color=["#bbbbbb" if m == "fakecam" else "#4c72b0" if m != "opticam" else "#dd8452"
                                          for m in methods])
        ax.errorbar(x, np.nan_to_num(v), yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=3, lw=1)
        if paper:
            pv = np.array([paper.get((m, metric), np.nan) for m in methods], dtype=float)
            if np.isfinite(pv).any():
                ax.plot(x, pv, "kD", ms=4, label="paper")
                ax.legend(fontsize=7, loc="best")
        arrow = "↓" if metric in ("AD", "D") else "↑"
        ax.set_title(f"{metric}{arrow}", fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels([method_name(m) for m in methods], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{dataset} / {model}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.28, top=0.86, wspace=0.25)
    return _save(fig, path)


def _stack(curves) -> np.ndarray | None:
    """Equal-length curves as an N×L array (the most common length; others are left out)."""
    arrs = [np.asarray(c, dtype=np.float64) for c in curves if c is not None and not isinstance(c, float)]
    if not arrs:
        return None
    lengths = pd.Series([len(a) for a in arrs])
    L = int(lengths.mode().iloc[0])
    return np.stack([a for a in arrs if len(a) == L])


class CurveMeans:
    """Running sums of equal-length curves per (method, column), fed a table at a time, so the
    mean curves of a large run never need all curves in memory. Curves of another length than
    a method's first are counted in `skipped`."""

    def __init__(self, columns=("insertion_curve", "deletion_curve")):
        self.columns = tuple(columns)
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.skipped = 0

    def add(self, table) -> "CurveMeans":
        """`table`: a pyarrow Table or DataFrame with method, error and the curve columns."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table[["method", "error", *self.columns]], preserve_index=False)
        table = table.filter(pc.is_null(table.column("error")))
        for method in pc.unique(table.column("method")).to_pylist():
            part = table.filter(pc.equal(table.column("method"), method))
            for col in self.columns:
                arr = part.column(col).combine_chunks()
                arr = arr.filter(pc.is_valid(arr))
                if len(arr) == 0:
                    continue
                lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
                key = (method, col)
                L = len(self.sums[key]) if key in self.sums else int(np.bincount(lengths).argmax())
                same = arr.filter(pa.array(lengths == L))
                self.skipped += int((lengths != L).sum())
                if len(same) == 0:
                    continue
                values = same.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, L)
                self.sums[key] = self.sums.get(key, 0) + np.nansum(values, 0)
                self.counts[key] = self.counts.get(key, 0) + len(values)
        return self

    def means(self) -> dict[str, dict[str, np.ndarray]]:
        """method → column → mean curve."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for (method, col), total in self.sums.items():
            out.setdefault(method, {})[col] = total / self.counts[(method, col)]
        return out


def mean_curves(path: Path, means: Mapping[str, Mapping[str, np.ndarray]], dataset: str, model: str, *,
                scores: Mapping[tuple[str, str], float] | None = None, size=(10.0, 4.0)) -> Path:
    """Insertion (left) and deletion (right): the mean probability of the predicted class
    against the fraction of pixels inserted/deleted, one line per method (`CurveMeans.means()`)."""
    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, col, key, name in ((axes[0], "insertion_curve", "I", "insertion ↑"), (axes[1], "deletion_curve", "D", "deletion ↓")):
        for m in method_order(list(means)):
            curve = means[m].get(col)
            if curve is None:
                continue
            x = np.linspace(0, 1, len(curve))
            label = method_name(m)
            if scores and (m, key) in scores and np.isfinite(scores[(m, key)]):
                label += f" ({scores[(m, key)]:.1f})"
            ax.plot(x, curve, lw=1.8 if m == "opticam" else 1.0, ls="--" if m == "fakecam" else "-", label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("fraction of pixels", fontsize=8)
        ax.set_ylabel("mean probability of the predicted class", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{dataset} / {model}", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.13, top=0.86, wspace=0.22)
    return _save(fig, path)


def convergence(path: Path, rows: pd.DataFrame, dataset: str, model: str, *, method: str = "opticam",
                size=(10.0, 4.0)) -> Path:
    """Left: objective per iteration (mean over images still running, 10–90% band) and the
    fraction of images still running. Right: histogram of iterations used."""
    part = rows[(rows["dataset"] == dataset) & (rows["model"] == model) & (rows["method"] == method)
                & rows["error"].isna()]
    fig = Figure(figsize=size, dpi=DPI)
    ax, hx = fig.subplots(1, 2, squeeze=False)[0]
    stack = _stack(part["objective_history"]) if "objective_history" in part else None
    if stack is not None:
        it = np.arange(1, stack.shape[1] + 1)
        running = np.isfinite(stack)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(stack, 0)
                lo, hi = np.nanpercentile(stack, 10, 0), np.nanpercentile(stack, 90, 0)
        ax.plot(it, mean, color="#dd8452", label="mean objective")
        ax.fill_between(it, lo, hi, color="#dd8452", alpha=0.25, label="10–90% of images")
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("objective (logit of the masked image)", fontsize=8)
        tw = ax.twinx()
        tw.plot(it, running.mean(0), color="gray", ls=":", label="still running")
        tw.set_ylim(0, 1.05)
        tw.set_ylabel("fraction still running", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no objective histories", ha="center", va="center", transform=ax.transAxes)
    iters = part["iterations"].dropna().to_numpy(dtype=float) if "iterations" in part else np.array([])
    if iters.size:
        hx.hist(iters, bins=min(30, max(5, len(np.unique(iters)))), color="#4c72b0")
        early = part["early_stopped"].astype("boolean").fillna(False).astype(bool).mean() if "early_stopped" in part else float("nan")
        hx.set_title(f"iterations used (early stop: {100 * early:.0f}%)", fontsize=9)
        hx.set_xlabel("iterations", fontsize=8)
        hx.set_ylabel("images", fontsize=8)
    else:
        hx.text(0.5, 0.5, "no iteration counts", ha="center", va="center", transform=hx.transAxes)
    fig.suptitle(f"{method_name(method)} convergence: {dataset} / {model}", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.13, top=0.86, wspace=0.3)
    return _save(fig, path)


def metric_distributions(path: Path, rows: pd.DataFrame, columns: Sequence[str] = ("p", "o", "insertion", "deletion"),
                         *, by: str = "method", size=(12.0, 3.5)) -> Path:
    """Box plots of per-image columns, one panel per column, one box per method."""
    ok = rows[rows["error"].isna()]
    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    groups = method_order(ok[by].unique()) if by == "method" else sorted(ok[by].unique())
    for ax, col in zip(axes, columns):
        data = [ok.loc[ok[by] == g, col].dropna().to_numpy(dtype=float) for g in groups]
        ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showfliers=False)
        ax.set_xticks(np.arange(1, len(groups) + 1))
        ax.set_xticklabels([method_name(g) for g in groups], rotation=45, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.3, top=0.9, wspace=0.3)
    return _save(fig, path)


def selectivity_curves(path: Path, frame: pd.DataFrame, dataset: str, model: str, *,
                       metrics: Sequence[str] = BARS, size=(12.0, 4.0)) -> Path:
    """The paper's Fig. A4: AD, AG, AI of S^α against α (log scale), one line per method, the
    band its 95% bootstrap interval. `frame`: `studies.selectivity_frame`."""
    part = frame[(frame["dataset"] == dataset) & (frame["model"] == model)]
    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rows = part[part["metric"] == metric]
        for m in method_order(rows["method"].unique()):
            r = rows[rows["method"] == m].sort_values("alpha")
            x, v = r["alpha"].to_numpy(float), r["value"].to_numpy(float)
            line, = ax.plot(x, v, marker="o", ms=3, lw=1.8 if m == "opticam" else 1.0,
                            ls="--" if m == "fakecam" else "-", label=method_name(m))
            lo, hi = r["lo"].to_numpy(float), r["hi"].to_numpy(float)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.axvline(1.0, color="gray", lw=0.6, ls=":")
        arrow = "↓" if metric == "AD" else "↑"
        ax.set_title(f"{metric}{arrow} of S^α", fontsize=10)
        ax.set_xlabel("α", fontsize=8)
        if ax.lines and metric == metrics[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Selectivity: {dataset} / {model}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.86, wspace=0.22)
    return _save(fig, path)
