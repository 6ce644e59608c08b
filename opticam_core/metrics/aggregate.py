"""Per-image values → the paper's numbers (SPEC §4), with how many images each one used.

`aggregate(values)` takes any mapping from column name to a sequence (a pandas DataFrame of
result rows, a dict of lists, numpy arrays or tensors) with the names of FIELDS, plus optionally
`error`. It needs numpy only. Every number is in percent except SM. Rules, per metric:

- Rows whose `error` is not null are left out of everything.
- A metric whose columns are missing comes back as NaN with n = 0.
- AD, AG: the mean of the per-image terms where they are defined (`undefined="exclude"`, the
  authors' nanmean: p = 0 for AD, p = 1 for AG have 0/0 terms), or with those terms as 0
  (`undefined="zero"`). AI: every row with p and o. NaN p or o: left out.
- I, D: the mean AUC ×100 over rows where it is finite.
- OM, LE: rows with has_box and a finite loc_iou. `om_rule="ilsvrc"` (default): error
  1 − [IoU ≥ `iou_threshold`] (LE) and 1 − [IoU ≥ 0.5 and pred = label] (OM), the ILSVRC
  localization rule; `om_rule="iou"`: the paper's literal 1 − IoU and 1 − IoU·[pred = label].
- F1: rows with has_box; the mean of the per-image F1 = 2PR/(P+R) with P = energy, R = recall
  (0 when P + R = 0); `f1="of_means"` gives instead the F1 of the mean P and the mean R.
- BA (Choe et al.'s MaxBoxAcc): rows with has_box and a full box_iou vector. For each δ in
  `ba_deltas`, the accuracy at each η is the share of images with IoU ≥ δ, the best η is taken
  for that δ over the whole set, and BA is the mean over δ of those best accuracies.
- SP: rows with has_box; `pointing="pointing"` (tolerance 0, default) or "pointing_tol".
- EP: rows with has_box and a finite energy.
- SM: rows with a finite sm (no ×100).
- AOPC: the mean of the per-image aopc ×100 over rows where it is finite.
- MS: the mean of the per-image max_sensitivity over rows where it is finite (no ×100; an all-zero
  map gives ∞ or NaN, left out). ADCC, Coherency, Complexity: the means of adcc, adcc_coherency,
  adcc_complexity ×100 over rows where each is finite.
- Box study (X@box_and_map, X@map_minus_box, X@box, X@not_box for X in AD, AG, AI): the
  classification rules with o replaced by the study's o_* column (NaN for images without boxes,
  so those are left out).

Bootstrap: `weights` (an R×N matrix, e.g. how often each row is drawn in each of R resamples)
turns every mean into R weighted means in one call: each Aggregate's value is then an array of
R values (n and excluded still count the unweighted rows). BA re-picks its best η per resample.

Constant maps need no rule here: the localization fields already give them no credit
(see `localization`), and AD/AG/AI/I/D are well defined for them.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from ..choices import check_choice
from .box_study import REGIONS as STUDY
from .registry import METRICS

OM_RULES = ("ilsvrc", "iou")
POINTING = ("pointing", "pointing_tol")
F1_RULES = ("per_image", "of_means")


class Aggregate(NamedTuple):
    """A dataset-level number: its value (percent except SM; an array of R values with
    `weights`), the images used and left out."""

    value: float | np.ndarray
    n: int
    excluded: int


def _is_null(v) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN, and pandas' NA (whose comparison raises)
    except (TypeError, ValueError):
        return True


def _floats(column) -> np.ndarray:
    """A column of numbers, booleans or nulls → float64 array, nulls as NaN."""
    if hasattr(column, "detach"):  # torch tensor
        column = column.detach().cpu().numpy()
    arr = np.asarray(column)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64)
    out = np.empty(len(arr), dtype=np.float64)
    for i, v in enumerate(arr):
        try:
            out[i] = np.nan if v is None else float(v)
        except (TypeError, ValueError):
            out[i] = np.nan
    return out


def _vectors(column, rows: int) -> np.ndarray:
    """A column of equal-length vectors (lists, arrays) or nulls → rows×T float64, nulls as NaN rows."""
    if hasattr(column, "detach"):
        column = column.detach().cpu().numpy()
    arr = np.asarray(column, dtype=object) if not isinstance(column, np.ndarray) or column.dtype == object else column
    if arr.dtype != object and arr.ndim == 2:
        return arr.astype(np.float64)
    items = [None if (v is None or (np.ndim(v) == 0 and _is_null(v))) else np.asarray(v, dtype=np.float64).ravel()
             for v in arr]
    width = max((len(v) for v in items if v is not None), default=0)
    out = np.full((rows, width), np.nan)
    for i, v in enumerate(items):
        if v is not None and len(v) == width:
            out[i] = v
    return out


class _Table:
    def __init__(self, values: Mapping[str, Sequence], weights=None):
        self.values = values
        names = list(values.keys()) if hasattr(values, "keys") else list(values)
        self.names = set(names)
        lengths = {len(values[k]) for k in names}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        self.rows = lengths.pop() if lengths else 0
        if "error" in self.names:
            self.ok = np.array([_is_null(v) for v in np.asarray(values["error"], dtype=object)], dtype=bool)
        else:
            self.ok = np.ones(self.rows, dtype=bool)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.ndim != 2 or w.shape[1] != self.rows:
                raise ValueError(f"weights must be R×{self.rows}, got shape {w.shape}")
            self.weights = w

    def has(self, *names: str) -> bool:
        return all(n in self.names for n in names)

    def col(self, name: str) -> np.ndarray:
        return _floats(self.values[name])

    def boxed(self) -> np.ndarray:
        """Rows usable for localization: no error and has_box (or, without has_box, a finite loc_iou)."""
        if self.has("has_box"):
            return self.ok & (np.nan_to_num(self.col("has_box"), nan=0.0) > 0)
        return self.ok & np.isfinite(self.col("loc_iou")) if self.has("loc_iou") else np.zeros(self.rows, bool)

    def result(self, value, used: np.ndarray | int) -> Aggregate:
        n = int(used.sum()) if isinstance(used, np.ndarray) else int(used)
        if self.weights is not None:
            value = np.asarray(value, dtype=np.float64) if n else np.full(len(self.weights), math.nan)
            return Aggregate(value, n, self.rows - n)
        return Aggregate(float(value) if n else math.nan, n, self.rows - n)

    def missing(self) -> Aggregate:
        return self.result(math.nan, 0)

    def mean(self, terms: np.ndarray, use: np.ndarray):
        """The (weighted) mean of terms[use]: a float, or R floats with weights."""
        if self.weights is None:
            return terms[use].mean(0) if use.any() else math.nan
        w = self.weights[:, use]
        total = w.sum(1).reshape((-1,) + (1,) * (terms.ndim - 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, (w @ terms[use]) / total, math.nan)


def _mean(t: _Table, terms: np.ndarray, keep: np.ndarray, scale: float = 100.0) -> Aggregate:
    use = keep & np.isfinite(terms)
    return t.result(scale * t.mean(terms, use), use)


def _classification(t: _Table, o_name: str, undefined: str) -> dict[str, Aggregate]:
    if not t.has("p", o_name):
        return {"AD": t.missing(), "AG": t.missing(), "AI": t.missing()}
    p, o = t.col("p"), t.col(o_name)
    keep = t.ok & np.isfinite(p) & np.isfinite(o)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.where(p > 0, np.maximum(p - o, 0) / np.where(p > 0, p, 1), np.nan)
        gain = np.where(p < 1, np.maximum(o - p, 0) / np.where(p < 1, 1 - p, 1), np.nan)
    if undefined == "zero":
        drop, gain = np.where(keep, np.nan_to_num(drop, nan=0.0), np.nan), np.where(keep, np.nan_to_num(gain, nan=0.0), np.nan)
    increase = (p < o).astype(np.float64)
    return {"AD": _mean(t, drop, keep), "AG": _mean(t, gain, keep), "AI": _mean(t, increase, keep)}


def aggregate(values: Mapping[str, Sequence], *, om_rule: str = "ilsvrc", iou_threshold: float = 0.5,
              pointing: str = "pointing", ba_deltas: Sequence[float] = (0.3, 0.5, 0.7),
              f1: str = "per_image", undefined: str = "exclude", weights=None) -> dict[str, Aggregate]:
    """The paper's numbers from per-image values; see the module docstring for every rule."""
    check_choice("om_rule", om_rule, OM_RULES)
    check_choice("pointing", pointing, POINTING)
    check_choice("f1", f1, F1_RULES)
    check_choice("undefined", undefined, ("exclude", "zero"))
    t = _Table(values, weights)
    out: dict[str, Aggregate] = {}

    out.update(_classification(t, "o", undefined))
    for key, col in (("I", "insertion"), ("D", "deletion")):
        out[key] = _mean(t, t.col(col), t.ok) if t.has(col) else t.missing()

    boxed = t.boxed()
    if t.has("loc_iou"):
        iou = t.col("loc_iou")
        keep = boxed & np.isfinite(iou)
        located = iou >= iou_threshold if om_rule == "ilsvrc" else np.nan_to_num(iou)
        out["LE"] = _mean(t, 1.0 - located, keep)
        if t.has("pred", "label"):
            right = (t.col("pred") == t.col("label")).astype(np.float64)
            keep_om = keep & np.isfinite(t.col("pred")) & np.isfinite(t.col("label"))
            out["OM"] = _mean(t, 1.0 - located * right, keep_om)
        else:
            out["OM"] = t.missing()
    else:
        out["LE"] = out["OM"] = t.missing()

    if t.has("energy", "recall"):
        P, R = t.col("energy"), t.col("recall")
        keep = boxed & np.isfinite(P) & np.isfinite(R)
        if f1 == "per_image":
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(P + R > 0, 2 * P * R / np.where(P + R > 0, P + R, 1), 0.0)
            out["F1"] = _mean(t, score, keep)
        else:
            mp, mr = np.asarray(t.mean(P, keep)), np.asarray(t.mean(R, keep))
            with np.errstate(divide="ignore", invalid="ignore"):
                f = np.where(mp + mr > 0, 2 * mp * mr / np.where(mp + mr > 0, mp + mr, 1), 0.0)
            out["F1"] = t.result(100 * np.where(np.isnan(mp + mr), math.nan, f), keep)
    else:
        out["F1"] = t.missing()

    if t.has("box_iou"):
        ious = _vectors(t.values["box_iou"], t.rows)
        keep = boxed & (np.isfinite(ious).all(1) if ious.shape[1] else np.zeros(t.rows, bool))
        if keep.any():
            # accuracy at each η (per resample with weights), best η per δ, then the mean over δ
            per_delta = [np.max(t.mean((ious >= d).astype(np.float64), keep), axis=-1) for d in ba_deltas]
            out["BA"] = t.result(100 * np.mean(per_delta, axis=0), keep)
        else:
            out["BA"] = t.result(math.nan, 0)
    else:
        out["BA"] = t.missing()

    out["SP"] = _mean(t, t.col(pointing), boxed) if t.has(pointing) else t.missing()
    out["EP"] = _mean(t, t.col("energy"), boxed) if t.has("energy") else t.missing()
    out["SM"] = _mean(t, t.col("sm"), t.ok, scale=1.0) if t.has("sm") else t.missing()
    out["AOPC"] = _mean(t, t.col("aopc"), t.ok) if t.has("aopc") else t.missing()
    out["MS"] = _mean(t, t.col("max_sensitivity"), t.ok, scale=1.0) if t.has("max_sensitivity") else t.missing()
    for key, col in (("ADCC", "adcc"), ("Coherency", "adcc_coherency"), ("Complexity", "adcc_complexity")):
        out[key] = _mean(t, t.col(col), t.ok) if t.has(col) else t.missing()

    for suffix, col in STUDY.items():
        for key, agg in _classification(t, col, undefined).items():
            out[f"{key}@{suffix}"] = agg
    return {k: out[k] for k in METRICS}  # every declared metric, in declaration order
