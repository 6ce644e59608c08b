"""Run-to-run comparison: what changed between two runs, and whether it is more than noise.

Only the samples both runs hold, successful in both, are compared: rows are joined on
(dataset, sample_id, model, method). For each aggregate of each (dataset, model, method) the
change new − old comes with a *paired* bootstrap interval: each resample draws the same images
from both runs, so per-image noise shared by the runs cancels. A change is **flagged** when its
95% interval excludes zero (with no resamples: when it is not exactly zero).

With dozens of aggregates, a few flags happen by chance at 95%; the exit code therefore uses
thresholds (`--fail-on`): a flagged change fails the check only when it is larger than the
threshold given for its metric, in the metric's units (percentage points, SM in its own units).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from opticam_core.choices import check_choice
from opticam_core.metrics import lower_is_better
from pipeline.schema import ROW_KEY

from .aggregates import (
    BOX_ROWS,
    METHOD_FREE_COLUMNS,
    Aggregator,
    _columns,
    _is_box_free,
    _seed,
    interval,
    label_only,
    one_per_image,
    per_image_frame,
    resample_indices,
)

CHANGE_COLUMNS = ["dataset", "model", "method", "metric", "old", "new", "delta", "lo", "hi", "n", "flagged"]
#: Per-image fields in [0, 1] whose moves rank the samples that changed most.
MOVED_FIELDS = ("p", "o", "insertion", "deletion", "loc_iou", "energy", "recall", "o_box_and_map", "o_map_minus_box")


@dataclass
class Comparison:
    new_run: str
    old_run: str
    changes: pd.DataFrame                      # CHANGE_COLUMNS
    moved: pd.DataFrame                        # samples whose per-image values moved most
    counts: dict = field(default_factory=dict)  # shared / only_new / only_old / newly_failed / newly_fixed
    newly_failed: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def flagged(self) -> pd.DataFrame:
        return self.changes[self.changes["flagged"]]


def compare_rows(new: pd.DataFrame, old: pd.DataFrame, *, resamples: int = 200, seed: int = 0,
                 om_rule: str = "ilsvrc", aggregate=None, agg: Aggregator | None = None, top: int = 20,
                 new_run: str = "new", old_run: str = "old") -> Comparison:
    """Compare two runs' rows (DataFrames in the RESULTS schema)."""
    agg = agg or Aggregator(aggregate, om_rule=om_rule)
    key = list(ROW_KEY)
    status = new[key + ["error"]].merge(old[key + ["error"]], on=key, how="outer", suffixes=("_new", "_old"),
                                        indicator=True)
    both = status["_merge"] == "both"
    ok_new, ok_old = status["error_new"].isna(), status["error_old"].isna()
    newly_failed = status[both & ~ok_new & ok_old][key + ["error_new"]].rename(columns={"error_new": "error"})
    counts = {
        "shared": int((both & ok_new & ok_old).sum()),
        "only_new": int((status["_merge"] == "left_only").sum()),
        "only_old": int((status["_merge"] == "right_only").sum()),
        "newly_failed": int(len(newly_failed)),
        "newly_fixed": int((both & ok_new & ~ok_old).sum()),
        "failed_in_both": int((both & ~ok_new & ~ok_old).sum()),
    }
    a = new[new["error"].isna()]
    b = old[old["error"].isna()]
    pair = a.merge(b[key], on=key, how="inner")  # shared keys, new's columns
    pair = pair[key].sort_values(key).reset_index(drop=True)
    a = pair.merge(a, on=key, how="left")
    b = pair.merge(b, on=key, how="left")

    cells = []
    # aggregates of the maps made for the label, as in the tables (the other classes' rows are
    # compared row by row: counts, moved samples)
    for (dataset, model, method), idx in label_only(a).groupby(["dataset", "model", "method"], sort=True).groups.items():
        cells += _paired(agg, per_image_frame(a.loc[idx]), per_image_frame(b.loc[idx]), resamples=resamples,
                         seed=seed, key=dict(dataset=dataset, model=model, method=method), only=_is_box_free)
    ia, ib = one_per_image(label_only(a)), one_per_image(label_only(b))
    shared_img = ia[["dataset", "model", "sample_id"]].merge(ib[["dataset", "model", "sample_id"]])
    ia = shared_img.merge(ia, how="left")
    ib = shared_img.merge(ib, how="left")
    for (dataset, model), idx in ia.groupby(["dataset", "model"], sort=True).groups.items():
        both = _paired(agg, _columns(per_image_frame(ia.loc[idx]), METHOD_FREE_COLUMNS),
                       _columns(per_image_frame(ib.loc[idx]), METHOD_FREE_COLUMNS), resamples=resamples, seed=seed,
                       key=dict(dataset=dataset, model=model, method=""), only=lambda k: not _is_box_free(k))
        for c in both:
            c["method"] = next(p for p, s in BOX_ROWS.items() if c["metric"].endswith(s))
        cells += both
    changes = pd.DataFrame(cells, columns=CHANGE_COLUMNS)
    return Comparison(new_run, old_run, changes, moved_samples(a, b, top=top), counts, newly_failed.reset_index(drop=True))


def _paired(agg: Aggregator, fa: pd.DataFrame, fb: pd.DataFrame, *, resamples: int, seed: int, key: dict,
            only) -> list[dict]:
    pa_, pb_ = agg.point(fa), agg.point(fb)
    reps = None
    if resamples and len(fa):
        idx = resample_indices(len(fa), resamples, _seed(seed, "compare", *key.values()))
        ra, rb = agg.replicates([fa, fb], idx)
        reps = (ra, rb)
    out = []
    for metric in pa_:
        if not only(metric) or metric not in pb_:
            continue
        new, n, _ = pa_[metric]
        old = pb_[metric][0]
        delta = new - old
        if reps is not None and metric in reps[0] and metric in reps[1]:
            lo, hi = interval(reps[0][metric] - reps[1][metric])
            flagged = bool(lo > 0 or hi < 0)
        else:
            lo = hi = float("nan")
            flagged = bool(math.isfinite(delta) and delta != 0)
        out.append({**key, "metric": metric, "old": old, "new": new, "delta": delta, "lo": lo, "hi": hi,
                    "n": n, "flagged": flagged})
    return out


def moved_samples(a: pd.DataFrame, b: pd.DataFrame, *, top: int = 20) -> pd.DataFrame:
    """The `top` shared rows whose [0,1]-valued per-image fields moved most (largest |Δ| of any
    field), with the field, its old and new value, and whether the prediction changed."""
    cols = ["dataset", "model", "method", "sample_id", "label_name", "field", "old", "new", "delta", "pred_changed"]
    fields = [f for f in MOVED_FIELDS if f in a.columns and f in b.columns]
    if a.empty or not fields:
        return pd.DataFrame(columns=cols)
    da = a[fields].to_numpy(dtype=float)
    db = b[fields].to_numpy(dtype=float)
    diff = np.abs(da - db)
    diff[~np.isfinite(diff)] = -1
    j = diff.argmax(1)
    score = diff[np.arange(len(diff)), j]
    order = np.argsort(-score, kind="stable")[:top]
    order = order[score[order] > 0]
    rows = []
    for i in order:
        f = fields[j[i]]
        rows.append({"dataset": a.at[i, "dataset"], "model": a.at[i, "model"], "method": a.at[i, "method"],
                     "sample_id": a.at[i, "sample_id"], "label_name": a.at[i, "label_name"] if "label_name" in a else None,
                     "field": f, "old": float(db[i, j[i]]), "new": float(da[i, j[i]]), "delta": float(da[i, j[i]] - db[i, j[i]]),
                     "pred_changed": bool(a.at[i, "pred"] != b.at[i, "pred"]) if "pred" in a else False})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# Thresholds for the exit code


def parse_thresholds(specs: list[str] | str | None, threshold: float | None = None) -> dict[str, float]:
    """``'AD=2,AG=2'`` (repeatable) → {"AD": 2.0, "AG": 2.0}; `threshold` adds ``{"*": threshold}``.

    Keys are aggregate names (AD, AG, AI, I, D, OM, LE, F1, BA, SP, EP, SM, AD@box_and_map, …),
    shell-style patterns (``AD*``, ``*``), or ``failed`` (rows newly failed in the new run)."""
    out: dict[str, float] = {}
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs or []:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--fail-on wants METRIC=THRESHOLD items, got {item!r}")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--fail-on threshold for {name.strip()!r} is not a number: {value!r}") from None
            if out[name.strip()] < 0:
                raise ValueError(f"--fail-on threshold for {name.strip()!r} must be ≥ 0")
    if threshold is not None:
        if threshold < 0:
            raise ValueError("--threshold must be ≥ 0")
        out.setdefault("*", float(threshold))
    return out


def _threshold_for(metric: str, thresholds: dict[str, float]) -> float | None:
    if metric in thresholds:
        return thresholds[metric]
    # the most specific pattern wins (the longest one: "AD@*" over "AD*" over "*")
    matches = [(len(pat), t) for pat, t in thresholds.items() if pat != "failed" and fnmatch.fnmatchcase(metric, pat)]
    return max(matches)[1] if matches else None


def violations(comparison: Comparison, thresholds: dict[str, float], direction: str = "any") -> pd.DataFrame:
    """Flagged changes larger than their metric's threshold (``direction="worse"``: only changes
    in the metric's bad direction: up for AD/D/OM/LE/SM, down for the others)."""
    check_choice("direction", direction, ("any", "worse"))
    ch = comparison.flagged
    keep = []
    for r in ch.itertuples(index=False):
        thr = _threshold_for(r.metric, thresholds)
        if thr is None or not math.isfinite(r.delta):
            keep.append(False)
            continue
        if direction == "worse":
            bad = r.delta if lower_is_better(r.metric) else -r.delta
            keep.append(bad > thr)
        else:
            keep.append(abs(r.delta) > thr)
    out = ch[np.array(keep, dtype=bool)] if len(ch) else ch
    out = out.assign(threshold=[_threshold_for(m, thresholds) for m in out["metric"]])
    if "failed" in thresholds and comparison.counts.get("newly_failed", 0) > thresholds["failed"]:
        extra = pd.DataFrame([{"dataset": "*", "model": "*", "method": "*", "metric": "failed", "old": 0.0,
                               "new": float(comparison.counts["newly_failed"]),
                               "delta": float(comparison.counts["newly_failed"]), "lo": math.nan, "hi": math.nan,
                               "n": comparison.counts["newly_failed"], "flagged": True, "threshold": thresholds["failed"]}])
        out = pd.concat([out, extra], ignore_index=True) if len(out) else extra
    return out.reset_index(drop=True)


def comparison_markdown(c: Comparison, viol: pd.DataFrame | None = None, *, limit: int = 60) -> str:
    lines = [f"## Comparison: {c.new_run} against {c.old_run}", ""]
    k = c.counts
    lines.append(f"Rows compared (successful in both): {k.get('shared', 0)}; only in {c.new_run}: {k.get('only_new', 0)}; "
                 f"only in {c.old_run}: {k.get('only_old', 0)}; newly failed: {k.get('newly_failed', 0)}; "
                 f"newly fixed: {k.get('newly_fixed', 0)}; failed in both: {k.get('failed_in_both', 0)}.")
    lines.append("")
    fl = c.flagged.reindex(c.flagged["delta"].abs().sort_values(ascending=False).index)
    lines.append(f"Changes whose paired 95% bootstrap interval excludes zero: {len(fl)} of {len(c.changes)} aggregates.")
    lines.append("")
    if len(fl):
        lines += ["| dataset | model | method | metric | old | new | Δ | 95% interval | n |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fl.head(limit).itertuples(index=False):
            lines.append(f"| {r.dataset} | {r.model} | {r.method} | {r.metric} | {r.old:.2f} | {r.new:.2f} | "
                         f"{r.delta:+.2f} | [{r.lo:+.2f}, {r.hi:+.2f}] | {r.n} |")
        lines.append("")
    if viol is not None:
        if len(viol):
            lines.append(f"**Threshold exceeded** by {len(viol)} change(s): " + ", ".join(
                f"{r.dataset}/{r.model}/{r.method} {r.metric} {r.delta:+.2f} (> {r.threshold:g})" for r in viol.itertuples()))
        else:
            lines.append("No flagged change exceeds its threshold.")
        lines.append("")
    if len(c.moved):
        lines += ["### Samples that moved most", "", "| dataset | model | method | sample | field | old | new | Δ | prediction changed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in c.moved.itertuples(index=False):
            lines.append(f"| {r.dataset} | {r.model} | {r.method} | {r.sample_id} | {r.field} | {r.old:.3f} | {r.new:.3f} | "
                         f"{r.delta:+.3f} | {'yes' if r.pred_changed else ''} |")
        lines.append("")
    if len(c.newly_failed):
        lines += ["### Newly failed rows", ""]
        for r in c.newly_failed.head(limit).itertuples(index=False):
            lines.append(f"- {r.dataset}/{r.model}/{r.method} {r.sample_id}: {str(r.error).splitlines()[0][:160]}")
        lines.append("")
    return "\n".join(lines)
