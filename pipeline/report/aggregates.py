"""Rows → the paper's aggregates with bootstrap intervals, through `opticam_core.metrics.aggregate`.

The formulas live in opticam_core; this module only decides *which rows* go into each call
(groups, subsets, resamples) and collects what comes back into one tidy table of cells:

    dataset, model, method, subset, metric, value, n, excluded, failed, lo, hi

- Failed rows (``error`` set) never reach `aggregate`; they are counted in ``failed``.
- Only the maps made for the label (``target`` = "label", every row before targets existed)
  make these cells; maps made for other classes (Table A.9) are aggregated by `studies`.
- ``subset="all"``: every successful row of the (dataset, model, method).
  ``subset="boxed"``: only images with a ground-truth box; the box study (paper's Figure 4)
  is read from it, so its S, B∩S and S∖B columns describe the same images.
- The method-free rows of the box study (S:=B, S:=I∖B) come from one row per image
  (they do not depend on the method) and appear as methods ``box`` and ``not_box``.
- Bootstrap: images are resampled with replacement, `resamples` times, and every aggregate is
  recomputed on each resample (BA re-picks its best threshold per resample, because
  `aggregate` does); the 95% interval is the 2.5–97.5 percentile. All resamples go through one
  vectorised call, with ``weights`` (an R×N matrix of resampling counts, one aggregate per row).
"""

from __future__ import annotations

import time
import zlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from opticam_core.metrics import aggregate as core_aggregate
from pipeline.schema import FIELDS

CELL_COLUMNS = ["dataset", "model", "method", "subset", "metric", "value", "n", "excluded",
                "failed", "lo", "hi"]
GROUP = ("dataset", "model", "method")
#: Pseudo-methods for the method-free rows of the box study.
BOX_ROWS = {"box": "@box", "not_box": "@not_box"}
INTERVAL = (2.5, 97.5)


class Values(dict):
    """column → numpy array, one entry per image: what `aggregate` is given. A plain mapping
    (not a DataFrame) so that resampling is one fancy index per column and `aggregate` reads
    arrays without pandas overhead."""

    def __len__(self) -> int:  # the number of images, not of columns
        return len(next(iter(self.values()))) if dict.__len__(self) else 0

    def take(self, idx) -> "Values":
        return Values({k: v[idx] for k, v in self.items()})


def _dense(column: np.ndarray, kind: str) -> np.ndarray:
    """Nullable booleans → float (1/0/NaN); equal-length vectors → an N×T float array (NaN rows
    for nulls). Same values for `aggregate`, but numeric arrays it reads without a Python loop
    and that resample by one fancy index. Anything else is passed on unchanged."""
    if column.dtype != object:
        return column
    if kind == "bool":
        out = np.full(len(column), np.nan)
        for v in (True, False):
            out[column == v] = float(v)
        return out
    if kind == "list<float32>":
        present = [v for v in column if v is not None and not (isinstance(v, float) and v != v)]
        widths = {len(v) for v in present}
        if len(widths) == 1:
            width = widths.pop()
            out = np.full((len(column), width), np.nan)
            for i, v in enumerate(column):
                if v is not None and not (isinstance(v, float) and v != v):
                    out[i] = v
            return out
    return column


def per_image_frame(rows) -> Values:
    """The per-image columns `aggregate` reads (FIELDS) of `rows` (DataFrame or Table)."""
    if isinstance(rows, pa.Table):
        rows = rows.select([c for c in FIELDS if c in rows.columns]).to_pandas()
    return Values({c: _dense(rows[c].to_numpy(), FIELDS[c].kind) for c in FIELDS if c in rows.columns})


def _seed(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(p).encode()) for p in parts)])


def resample_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """R×N image indices drawn with replacement (row r = the images of resample r)."""
    return rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), dtype=np.int64)


def counts_from_indices(idx: np.ndarray, n: int) -> np.ndarray:
    """R×N resampling counts (how often each image is drawn in each resample)."""
    r = idx.shape[0]
    flat = (idx + np.arange(r)[:, None] * n).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def _as_floats(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


class Aggregator:
    """Calls `aggregate` on frames, with or without bootstrap; one instance per report."""

    def __init__(self, aggregate: Callable | None = None, *, om_rule: str = "ilsvrc", vectorised: bool = True,
                 **options):
        """`aggregate`: `opticam_core.metrics.aggregate` unless given (it must take `weights` as
        that one does, unless `vectorised` is False). `vectorised`: False = one call per resample
        (the reference the vectorised path is tested against)."""
        self.fn = aggregate or core_aggregate
        self.kwargs = {"om_rule": om_rule, **options}
        self.vectorised = bool(vectorised)

    def point(self, frame: Values) -> dict:
        """metric → (value, n, excluded) on the whole frame."""
        out = self.fn(frame, **self.kwargs)
        return {k: (float(a.value), int(a.n), int(a.excluded)) for k, a in out.items()}

    def replicates(self, frames: Sequence[Values], idx: np.ndarray) -> list[dict[str, np.ndarray]]:
        """For each frame (all of length N, aligned by image), metric → R values, one per
        resample row of `idx` (R×N). Paired frames share the same resamples."""
        n = idx.shape[1]
        if self.vectorised:
            weights = counts_from_indices(idx, n)
            outs = []
            for frame in frames:
                got = self.fn(frame, weights=weights, **self.kwargs)
                outs.append({k: _as_floats(a.value) for k, a in got.items()})
            return outs
        outs = [dict() for _ in frames]
        for r in range(idx.shape[0]):
            take = idx[r]
            for out, frame in zip(outs, frames):
                got = self.fn(frame.take(take), **self.kwargs)
                for k, a in got.items():
                    out.setdefault(k, []).append(float(a.value))
        return [{k: np.asarray(v, dtype=np.float64) for k, v in out.items()} for out in outs]


def interval(samples: np.ndarray) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(s, INTERVAL)
    return float(lo), float(hi)


def _cells_for(agg: Aggregator, frame: Values, key: dict, *, resamples: int, seed: int,
               failed: int, only: Callable[[str], bool] = lambda k: True) -> list[dict]:
    point = {k: v for k, v in agg.point(frame).items() if only(k)}
    if resamples and len(frame):
        rng = _seed(seed, *key.values())
        reps = agg.replicates([frame], resample_indices(len(frame), resamples, rng))[0]
    else:
        reps = {}
    cells = []
    for metric, (value, n, excluded) in point.items():
        lo, hi = interval(reps[metric]) if metric in reps else (float("nan"), float("nan"))
        cells.append({**key, "metric": metric, "value": value, "n": n, "excluded": excluded,
                      "failed": failed, "lo": lo, "hi": hi})
    return cells


def _is_box_free(metric: str) -> bool:
    return not any(metric.endswith(s) for s in BOX_ROWS.values())


#: The box study's aggregates of a method (paper's Figure 4), read from the "boxed" subset.
BOX_STUDY = tuple(f"{m}{s}" for s in ("", "@box_and_map", "@map_minus_box") for m in ("AD", "AG", "AI"))
#: Columns each kind of call needs: fewer columns, less work in `aggregate` per resample.
BOX_STUDY_COLUMNS = ("label", "pred", "p", "o", "o_box_and_map", "o_map_minus_box")
METHOD_FREE_COLUMNS = ("label", "pred", "p", "o_box", "o_not_box")


def _columns(frame: Values, names) -> Values:
    return Values({k: v for k, v in frame.items() if k in names})


def one_per_image(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, sample) for the method-free box-study rows: the first row
    (by method name) that has them."""
    have = ok[ok["o_box"].notna()] if "o_box" in ok else ok.iloc[:0]
    return have.sort_values(["dataset", "model", "sample_id", "method"]).drop_duplicates(
        ["dataset", "model", "sample_id"], keep="first")


LABEL = "label"


def label_only(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows (or counts) of maps made for the label: what every table but Table A.9 reads."""
    if "target" not in frame.columns:
        return frame
    return frame[frame["target"].fillna(LABEL) == LABEL]


def unnormalized_models(rows: pd.DataFrame) -> list[str]:
    """The model keys whose rows ran without input normalisation (``normalized`` false; rows
    written before the column existed count as normalised)."""
    if "normalized" not in rows.columns or rows.empty:
        return []
    raw = rows["normalized"].astype("boolean").fillna(True) == False  # noqa: E712  (a nullable boolean)
    return sorted(rows.loc[raw.to_numpy(dtype=bool), "model"].unique())


def _boxed(frame: pd.DataFrame) -> pd.Series:
    return frame["has_box"].astype("boolean").fillna(False).astype(bool)


def aggregate_rows(rows: pd.DataFrame, *, resamples: int = 200, seed: int = 0, om_rule: str = "ilsvrc",
                   aggregate: Callable | None = None, agg: Aggregator | None = None,
                   log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every aggregate of every (dataset, model, method), both subsets, with intervals.

    `rows`: result rows (a DataFrame in the RESULTS schema; heavy columns not needed)."""
    agg = agg or Aggregator(aggregate, om_rule=om_rule)
    rows = label_only(rows)
    failed_mask = rows["error"].notna()
    failed = rows[failed_mask].groupby(list(GROUP)).size().to_dict()
    ok = rows[~failed_mask]
    cells: list[dict] = []
    groups = sorted(set(map(tuple, rows[list(GROUP)].drop_duplicates().itertuples(index=False, name=None))))
    started = time.monotonic()
    for i, (dataset, model, method) in enumerate(groups):
        g = ok[(ok["dataset"] == dataset) & (ok["model"] == model) & (ok["method"] == method)]
        g = g.sort_values("sample_id")
        nfail = int(failed.get((dataset, model, method), 0))
        base = dict(dataset=dataset, model=model, method=method)
        frame = per_image_frame(g)
        all_cells = _cells_for(agg, frame, {**base, "subset": "all"}, resamples=resamples, seed=seed,
                               failed=nfail, only=_is_box_free)
        cells += all_cells
        boxed = _boxed(g).to_numpy()
        if boxed.all():  # same images: same numbers
            cells += [{**c, "subset": "boxed"} for c in all_cells if c["metric"] in BOX_STUDY]
        elif boxed.any():
            cells += _cells_for(agg, _columns(frame, BOX_STUDY_COLUMNS).take(np.flatnonzero(boxed)),
                                {**base, "subset": "boxed"}, resamples=resamples, seed=seed, failed=nfail,
                                only=lambda k: k in BOX_STUDY)
        if log and i == 0 and resamples and len(groups) > 1:
            spent = time.monotonic() - started
            log(f"bootstrap: {spent:.1f} s for the first of {len(groups)} groups (≈{spent * len(groups) / 60:.1f} min "
                f"in all{'' if agg.vectorised else '; one call per resample'})")
    per_image = one_per_image(ok)
    for (dataset, model), g in per_image.groupby(["dataset", "model"], sort=True):
        frame = _columns(per_image_frame(g), METHOD_FREE_COLUMNS)
        both = _cells_for(agg, frame, dict(dataset=dataset, model=model, method="", subset="boxed"),
                          resamples=resamples, seed=seed, failed=0, only=lambda k: not _is_box_free(k))
        for c in both:
            c["method"] = next(p for p, s in BOX_ROWS.items() if c["metric"].endswith(s))
        cells += both
    out = pd.DataFrame(cells, columns=CELL_COLUMNS)
    return out.astype({"n": "int64", "excluded": "int64", "failed": "int64"})


def row_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows, successes, failures and constant maps (successful rows whose map was constant and
    became zeros; they count in every aggregate) per (dataset, model, method, target): `target`
    (the class the maps were made for) is "label" for rows written before it existed."""
    err = rows["error"].notna()
    const = (rows["constant"].astype("boolean").fillna(False).astype(bool) & ~err) if "constant" in rows \
        else pd.Series(False, index=rows.index)
    target = rows["target"].fillna(LABEL) if "target" in rows else pd.Series(LABEL, index=rows.index)
    keys = [*GROUP, "target"]
    out = rows.assign(ok=~err, failed=err, constant=const, target=target).groupby(keys, sort=True)[
        ["ok", "failed", "constant"]].sum()
    out["rows"] = out["ok"] + out["failed"]
    out = out.reset_index().astype({"ok": "int64", "failed": "int64", "constant": "int64", "rows": "int64"})
    return out[[*keys, "rows", "ok", "failed", "constant"]]


def error_summary(rows: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The most frequent error messages (first line) with their counts."""
    err = rows.loc[rows["error"].notna(), ["method", "error"]].copy()
    if err.empty:
        return pd.DataFrame(columns=["error", "methods", "rows"])
    err["error"] = err["error"].astype(str).str.split("\n").str[0].str.slice(0, 200)
    g = err.groupby("error").agg(methods=("method", lambda m: ", ".join(sorted(set(m)))), rows=("method", "size"))
    return g.sort_values("rows", ascending=False).head(top).reset_index()
