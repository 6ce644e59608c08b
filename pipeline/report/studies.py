"""The paper's studies beside its main tables: Tables 4, 6, A.9, A.12, A.13, A.14 and Fig. A4.

Each table appears only when the run holds its rows, and carries the paper's values only where
the run is in the paper's setting (ImageNet val, one of the paper's models as the study used it);
the caption names the setting the run had (dataset, subset, model, layer, Opti-CAM's iterations).
Every number comes from `opticam_core.metrics` (`aggregate`, `aggregate_selectivity`) on the
rows; this module picks the rows and lays out the cells, with bootstrap intervals as
`aggregates` draws them.

- Table 4 (AOPC, Max-Sensitivity, ADCC and its components): every (dataset, model) whose rows
  have any of them; only the metrics `aggregate` returns and the rows hold are shown.
- Tables 6 and A.12 (Opti-CAM's objective × normalisation): a (dataset, model) with several
  Opti-CAM settings (method keys ``opticam:VARIANT``; the setting is read from the rows'
  ``options``). Table 6: the Mask and Diff objectives under every normalisation; A.12: every
  objective under Range. The paper's value is set beside a variant only at 50 iterations.
- Table A.9 (maps for other classes): rows whose ``target`` is not the label; AD/AG/AI are on
  the label (as the rows hold them); "Most (misclassified only)" = the top-1 maps of images
  whose clean prediction is not the label.
- Table A.13 (layers): model keys ``{key}@{layer}`` of one network, two layers or more.
- Table A.14 (no input normalisation): models whose rows have ``normalized`` false.
- Fig. A4 (selectivity): AD/AG/AI of S^α against α, one line per method.

The paper's own numbers that contradict each other (shared/docs/PAPER.md §1) are said in a note
under the table, not smoothed over.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from opticam_core.metrics import aggregate_selectivity

from .aggregates import (
    CELL_COLUMNS,
    LABEL,
    Aggregator,
    _cells_for,
    _columns,
    _seed,
    counts_from_indices,
    interval,
    label_only,
    per_image_frame,
    resample_indices,
    unnormalized_models,
)
from .paper import (
    base_model,
    canonical_model,
    is_imagenet_val,
    layer_paper_value,
    paper_value,
)
from .tables import (
    Cell,
    Column,
    FigureSpec,
    Table,
    _mark_best,
    method_name,
    method_order,
)

OPTICAM = "opticam"
#: Opti-CAM's settings in the paper's row order (Table 6: normalisation-major; A.12: objective).
OBJECTIVES = ("mask", "diff", "iomask", "iodiff")
NORMALIZATIONS = ("range", "max", "sigmoid")
OBJECTIVE_NAMES = {"mask": "Mask", "diff": "Diff", "iomask": "IOMask", "iodiff": "IODiff"}
NORMALIZATION_NAMES = {"range": "Range", "max": "Max", "sigmoid": "Sigmoid"}
#: The iterations behind the paper's 1k ablations (Tables 5, 6, A.12).
PAPER_ITERATIONS = 50
#: Table A.9's columns: the class the map was made for → its header.
TARGETS = {"label": "GT", "top1": "Most", "top2": "Second", "least": "Least",
           "misclassified": "Most (misclassified only)"}
MISCLASSIFIED = "misclassified"
CLASSIFICATION = ("AD", "AG", "AI")


def _arrows(lower: bool) -> tuple[str, str]:
    return ("↓", "$\\downarrow$") if lower else ("↑", "$\\uparrow$")


def _column(metric: str, lower: bool, digits: int = 1, *, label: str | None = None, key: str | None = None,
            group: tuple[str, str] | None = None) -> Column:
    a, la = _arrows(lower)
    shown = label or metric
    return Column(key or metric, shown + a, shown + la, digits, group=group, lower=lower)


#: Table 4's columns with the paper's directions, except ADCC (higher is better: its authors'
#: definition and code; the paper's ↓ is a typo, see the note). MS is not a percentage.
TABLE4_COLUMNS = (_column("AOPC", False), _column("MS", True, 2), _column("ADCC", False),
                  _column("Coherency", False), _column("Complexity", True))
CLASSIFICATION_COLUMNS = tuple(_column(m, m == "AD") for m in CLASSIFICATION)

TABLE4 = FigureSpec("table4", "Table 4: AOPC, Max-Sensitivity and ADCC", "all", TABLE4_COLUMNS,
                    note="AOPC: area over the MoRF perturbation curve ×100 (14×14 patches, 10 regions); MS: "
                         "Max-Sensitivity (10 draws, U(−0.2, 0.2)); ADCC ×100 and its components (class: the prediction).")
TABLE6 = FigureSpec("table6", "Table 6: Opti-CAM objective and normalisation", "all", CLASSIFICATION_COLUMNS,
                    note="Opti-CAM rows: objective F / normalisation n of the saliency map; the other rows are the "
                         "baselines of the same run.")
TABLEA12 = FigureSpec("tableA12", "Table A.12: Opti-CAM objectives (normalisation Range)", "all",
                      CLASSIFICATION_COLUMNS,
                      note="Mask (10), Diff (19), IOMask (F.1), IODiff (F.2); the other rows are the baselines of the "
                           "same run.")
TABLEA13 = FigureSpec("tableA13", "Table A.13: target layer", "all", CLASSIFICATION_COLUMNS,
                      note="One row per target layer of the same network.")
TABLEA14 = FigureSpec("tableA14", "Table A.14: without input normalisation", "all", CLASSIFICATION_COLUMNS,
                      note="The network sees [0,1] pixels without mean/std normalisation.")


def table_a9_spec(targets) -> FigureSpec:
    """Table A.9 with a column group per target present (GT always first)."""
    cols = []
    for t in targets:
        head = TARGETS[t]
        for m in CLASSIFICATION:
            # the paper prints these ADs with two decimals (16.54): shown so, the paper's value exactly
            digits = 2 if m == "AD" and t != LABEL else 1
            cols.append(_column(m, m == "AD", digits, label=f"{head} {m}", key=f"{m}:{t}", group=(head, head)))
    return FigureSpec("tableA9", "Table A.9: maps for another class", "all", tuple(cols),
                      note="GT / Most / Second / Least: the map is made for the ground truth, or the most, second-most "
                           "or least probable class on the clean image; AD/AG/AI always on the ground truth.")


# --------------------------------------------------------------------------------------------
# The paper's contradictions (shared/docs/PAPER.md §1), said under the tables

NOTE_ADCC = ("The paper prints ADCC with ↓, but ADCC is higher-is-better in its authors' definition and code "
             "(ExPert, the worst on AD, has the lowest ADCC): ranked here as higher is better.")
NOTE_AOPC_R50 = ("On ResNet-50 the paper's Grad-CAM and XGrad-CAM AOPC differ (11.7 vs 11.9) although their "
                 "maps are identical there (Table 1 gives them the same AD/AG/AI): both cannot be matched.")
NOTE_TABLE4 = ("The paper has no Fake-CAM row and does not say whether Table 4 is on all of ImageNet val or on "
               "its 1,000-image subset.")
NOTE_BASELINES = ("The paper's Table 6 baselines give Fake-CAM AI 42.1 and Score-CAM AI 42.6, its Table 5 (the "
                  "same images and maps) 42.0 and 42.5.")
NOTE_LAYER42 = ("Opti-CAM Mask / Range at 50 iterations on VGG16's features.42 is one setting in Tables 6, A.12 "
                "and A.13, yet the paper prints AG 66.3 in the first two and 66.0 in A.13.")
NOTE_ITERATIONS = ("The paper ran these ablations at 50 iterations: rows with other iterations have no paper value.")
NOTE_A13_ITERATIONS = ("The paper does not state A.13's iterations; its layer-42 row is Tables 6/A.12's 50-iteration "
                       "setting (see above).")
NOTE_A9 = ("The paper's text leaves open which class the metric uses; read here as in PAPER.md (the map made "
           "for the named class, AD/AG/AI on the ground truth), which the paper's numbers fit.")
NOTE_MISCLASSIFIED = ("Most (misclassified only): the Most maps of the images whose clean prediction is not the "
                      "label.")
NOTE_A14_EXPERT = ("The paper's ExPert time in Table A.14 is about 10 times below its Table 1 time (15.67 vs "
                   "152.96 s per batch of 8 on ResNet-50), unexplained; see the runtime table.")


# --------------------------------------------------------------------------------------------
# What the rows say about their setting


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(s)) if p]


def method_settings(rows: pd.DataFrame) -> dict[str, dict]:
    """method key → its options (the rows' ``options`` JSON, defaults filled in for Opti-CAM)."""
    out: dict[str, dict] = {}
    if rows.empty or "options" not in rows:
        return out
    have = rows[rows["options"].notna()].drop_duplicates("method")
    for method, text in zip(have["method"], have["options"]):
        try:
            opts = json.loads(text) if isinstance(text, str) else dict(text)
        except (TypeError, ValueError):
            opts = {}
        out[method] = opts if isinstance(opts, dict) else {}
    for method in rows["method"].unique():
        out.setdefault(method, {})
    return out


def _opticam_defaults() -> dict:
    from opticam_core.methods import method_spec

    return method_spec(OPTICAM).resolved({})


def opticam_setting(options: Mapping) -> tuple[str, str, int | None]:
    """(objective, normalization, iterations) of an Opti-CAM row's options."""
    d = _opticam_defaults()
    it = options.get("iterations", d.get("iterations"))
    return (str(options.get("objective", d["objective"])), str(options.get("normalization", d["normalization"])),
            int(it) if it is not None else None)


def is_opticam(method: str) -> bool:
    return str(method).split(":", 1)[0] == OPTICAM


@dataclass
class Setting:
    """What a table's caption says about the run: read from the rows and the run's manifest."""

    manifest: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)

    def _config(self) -> dict:
        return self.manifest.get("config") or self.manifest

    def dataset_entry(self, dataset: str) -> dict:
        for e in self._config().get("datasets") or []:
            if isinstance(e, dict) and e.get("name") == dataset:
                return e
        return {}

    def model_entry(self, model: str) -> dict:
        for e in self._config().get("models") or []:
            if isinstance(e, dict) and model in (e.get("key"), e.get("name")):
                return e
        return {}

    def architecture(self, model: str) -> str:
        """The network's name behind a model key (the manifest's entry, else the key without
        what the studies add: `@layer`, `-unnormalized`)."""
        key = str(model).split("@", 1)[0]
        return self.model_entry(key).get("name") or base_model(model)

    def dataset_text(self, dataset: str, rows: pd.DataFrame) -> str:
        e = self.dataset_entry(dataset)
        images = rows["sample_id"].nunique() if "sample_id" in rows else 0
        text = dataset + (f" ({self.splits[dataset]})" if self.splits.get(dataset) else "")
        sub = e.get("subset")
        if isinstance(sub, dict) and sub.get("size"):
            text += f", class-balanced subset of {sub['size']} (seed {sub.get('seed', 0)})"
        if e.get("limit"):
            text += f", first {e['limit']} samples"
        return text + f", {images} images"

    def caption(self, dataset: str, model: str, rows: pd.DataFrame, *, targets: str = "maps for the label") -> str:
        """The setting: dataset (split, subset, images), model (network, layer, normalisation),
        Opti-CAM's iterations, which maps."""
        arch = self.architecture(model)
        layers = sorted(set(rows["layer"].dropna()), key=_natural) if "layer" in rows else []
        raw = bool(unnormalized_models(rows))
        model_text = model if arch == model else f"{model} ({arch})"
        if layers:
            model_text += f", layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}"
        model_text += ", input not normalised" if raw else ""
        parts = [f"Setting: {self.dataset_text(dataset, rows)}", f"model {model_text}"]
        its = sorted({opticam_setting(o)[2] for m, o in method_settings(rows).items() if is_opticam(m)} - {None})
        if its:
            parts.append(f"Opti-CAM {', '.join(map(str, its))} iterations")
        parts.append(targets)
        return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------
# Aggregates the main cells lack: maps made for other classes


def target_cells(rows: pd.DataFrame, *, resamples: int = 200, seed: int = 0, agg: Aggregator | None = None
                 ) -> pd.DataFrame:
    """AD/AG/AI of the maps made for classes other than the label, with intervals, as cells
    (CELL_COLUMNS) whose ``subset`` is ``target=TOP`` (and ``target=top1,misclassified``)."""
    agg = agg or Aggregator()
    if "target" not in rows or rows.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    other = rows[rows["target"].fillna(LABEL) != LABEL]
    cells: list[dict] = []
    only = lambda k: k in CLASSIFICATION  # noqa: E731
    for (dataset, model, method, target), g in other.groupby(["dataset", "model", "method", "target"], sort=True):
        g = g.sort_values("sample_id")
        failed = int(g["error"].notna().sum())
        ok = g[g["error"].isna()]
        parts = [(f"target={target}", ok)]
        if target == "top1":
            wrong = ok["pred"].notna() & ok["label"].notna() & (ok["pred"] != ok["label"])
            parts.append((f"target=top1,{MISCLASSIFIED}", ok[wrong.to_numpy(dtype=bool)]))
        for subset, part in parts:
            frame = _columns(per_image_frame(part), ("label", "pred", "p", "o"))
            cells += _cells_for(agg, frame, dict(dataset=dataset, model=model, method=method, subset=subset),
                                resamples=resamples, seed=seed, failed=failed, only=only)
    out = pd.DataFrame(cells, columns=CELL_COLUMNS)
    return out.astype({"n": "int64", "excluded": "int64", "failed": "int64"})


def _subset_of(target: str) -> str:
    if target == LABEL:
        return "all"
    if target == MISCLASSIFIED:
        return f"target=top1,{MISCLASSIFIED}"
    return f"target={target}"


# --------------------------------------------------------------------------------------------
# Tables


class _Builder:
    """Lays out one table from cells: rows, labels, the paper's value per cell, counts."""

    def __init__(self, cells: pd.DataFrame, counts: pd.DataFrame, *, splits: dict, force_paper: tuple,
                 paper: bool, raw_models: set[str]):
        self.index = {(r.dataset, r.model, r.method, r.subset, r.metric): r for r in cells.itertuples(index=False)}
        lab = label_only(counts)
        self.ok = {(r.dataset, r.model, r.method): int(r.ok) for r in lab.itertuples(index=False)}
        self.failed = {(r.dataset, r.model, r.method): int(r.failed) for r in lab.itertuples(index=False)}
        self.splits, self.force, self.paper, self.raw = splits, tuple(force_paper), paper, raw_models

    def in_paper_setting(self, dataset: str, model: str) -> bool:
        """ImageNet val (or a dataset the user says is) and a model run as the paper ran it."""
        return self.paper and model not in self.raw and (
            dataset in self.force or is_imagenet_val(dataset, self.splits.get(dataset)))

    def record(self, dataset, model, method, subset, metric):
        return self.index.get((dataset, model, method, subset, metric))

    def table(self, spec: FigureSpec, dataset: str, model: str, rows: list[tuple[str, str, str, str, str | None]],
              *, paper: Callable[[str, Column], float | None], labels=None, caption="", notes=(), part="",
              source: Callable[[str, Column], tuple[str, str]] | None = None) -> Table | None:
        """rows: (row key, model key, method, subset, label or None). `source(row, column)` →
        (subset, metric) when a column does not read the row's own subset and its metric key."""
        t = Table(spec, dataset, model, [], {}, {}, {}, labels=dict(labels or {}), caption=caption,
                  notes=list(notes), part=part)
        for key, mkey, method, subset, label in rows:
            filled = False
            for col in spec.columns:
                sub, metric = source(key, col) if source else (subset, col.metric)
                r = self.record(dataset, mkey, method, sub, metric)
                pv = paper(key, col)
                if r is None and pv is None:
                    continue
                c = Cell(paper=pv) if r is None else Cell(r.value, r.lo, r.hi, int(r.n), int(r.excluded), pv)
                t.cells[(key, col.metric)] = c
                filled = filled or not c.missing
            if filled:
                t.rows.append(key)
                t.ok[key] = self.ok.get((dataset, mkey, method), 0)
                t.failed[key] = self.failed.get((dataset, mkey, method), 0)
                if label:
                    t.labels[key] = label
        if not t.rows:
            return None
        _mark_best(t)
        return t


def _present(cells: pd.DataFrame, metric: str) -> bool:
    m = cells[cells["metric"] == metric]
    return bool(np.isfinite(m["value"].to_numpy(dtype=float)).any()) if len(m) else False


def table4(b: _Builder, cells: pd.DataFrame, dm_rows: pd.DataFrame, dataset: str, model: str,
           setting: Setting) -> Table | None:
    part = cells[(cells["dataset"] == dataset) & (cells["model"] == model) & (cells["subset"] == "all")]
    # only what `aggregate` returned for these rows (METRICS at run time) and the rows hold
    cols = tuple(c for c in TABLE4_COLUMNS if _present(part, c.metric))
    if not cols:
        return None
    spec = FigureSpec(TABLE4.key, TABLE4.title, TABLE4.subset, cols, note=TABLE4.note)
    in_setting = b.in_paper_setting(dataset, model)
    methods = method_order(part.loc[part["metric"].isin([c.metric for c in cols]), "method"].unique())

    def paper(m, col):
        return paper_value("table4", dataset, model, m, col.metric, split=b.splits.get(dataset),
                           force_datasets=b.force) if in_setting else None

    notes = []
    if any(c.metric == "ADCC" for c in cols):
        notes.append(NOTE_ADCC)
    if in_setting and canonical_model(model) == "resnet50" and any(c.metric == "AOPC" for c in cols):
        notes.append(NOTE_AOPC_R50)
    t = b.table(spec, dataset, model, [(m, model, m, "all", None) for m in methods], paper=paper,
                caption=setting.caption(dataset, model, dm_rows), notes=notes)
    if t is not None and t.has_paper:
        t.notes.append(NOTE_TABLE4)
    return t


def _variant_label(objective: str, normalization: str, iterations, *, with_iterations: bool) -> str:
    text = f"Opti-CAM: {OBJECTIVE_NAMES.get(objective, objective)} / {NORMALIZATION_NAMES.get(normalization, normalization)}"
    return text + (f", {iterations} it." if with_iterations and iterations is not None else "")


def ablation_tables(b: _Builder, dm_rows: pd.DataFrame, dataset: str, model: str, setting: Setting) -> list[Table]:
    """Tables 6 and A.12 for a (dataset, model) with several Opti-CAM settings."""
    opts = method_settings(dm_rows)
    variants = {m: opticam_setting(o) for m, o in opts.items() if is_opticam(m)}
    if len(variants) < 2:
        return []
    baselines = [m for m in method_order(opts) if not is_opticam(m)]
    norms = {v[1] for v in variants.values()}
    objs = {v[0] for v in variants.values()}
    with_its = len({v[2] for v in variants.values()}) > 1
    in_setting = b.in_paper_setting(dataset, model)

    def order(m):
        o, n, it = variants[m]
        return (NORMALIZATIONS.index(n) if n in NORMALIZATIONS else 99, OBJECTIVES.index(o) if o in OBJECTIVES else 99,
                -(it or 0), m)

    def labels_for(keys):
        labels = {m: _variant_label(*variants[m], with_iterations=with_its) for m in keys}
        seen = pd.Series(labels).value_counts()
        return {m: (f"{lab} [{m}]" if seen[lab] > 1 else lab) for m, lab in labels.items()}

    out = []
    wanted = []
    if norms != {"range"} or not (objs & {"iomask", "iodiff"}):
        wanted.append((TABLE6, [m for m in variants if variants[m][0] in ("mask", "diff")]))
    if objs & {"iomask", "iodiff"}:
        wanted.append((TABLEA12, [m for m in variants if variants[m][1] == "range"]))
    for spec, keys in wanted:
        keys = sorted(keys, key=order)
        if not keys:
            continue
        if spec is TABLEA12:
            keys = sorted(keys, key=lambda m: (OBJECTIVES.index(variants[m][0]) if variants[m][0] in OBJECTIVES
                                               else 99, -(variants[m][2] or 0), m))

        def paper(m, col, spec=spec):
            if not in_setting:
                return None
            if m in variants:
                o, n, it = variants[m]
                if it != PAPER_ITERATIONS:
                    return None
                m = f"{OPTICAM}/{o}/{n}"
            return paper_value(spec.key, dataset, model, m, col.metric, split=b.splits.get(dataset),
                               force_datasets=b.force)

        labels = labels_for(keys)
        t = b.table(spec, dataset, model,
                    [(m, model, m, "all", None) for m in baselines] + [(m, model, m, "all", labels[m]) for m in keys],
                    paper=paper, caption=setting.caption(dataset, model, dm_rows))
        if t is None:
            continue
        if t.has_paper:
            if {"fakecam", "scorecam"} & set(t.rows):
                t.notes.append(NOTE_BASELINES)
            if any(variants[m][:2] == ("mask", "range") and variants[m][2] == PAPER_ITERATIONS for m in t.rows
                   if m in variants):
                t.notes.append(NOTE_LAYER42)
            if any(variants[m][2] != PAPER_ITERATIONS for m in t.rows if m in variants):
                t.notes.append(NOTE_ITERATIONS)
        out.append(t)
    return out


def table_a9(b: _Builder, dm_rows: pd.DataFrame, dataset: str, model: str, setting: Setting) -> Table | None:
    if "target" not in dm_rows:
        return None
    present = set(dm_rows["target"].fillna(LABEL))
    others = [t for t in ("top1", "top2", "least") if t in present]
    if not others:
        return None
    targets = [LABEL] + others + ([MISCLASSIFIED] if "top1" in present else [])
    spec = table_a9_spec(targets)
    methods = method_order(dm_rows.loc[dm_rows["target"].fillna(LABEL) != LABEL, "method"].unique())
    in_setting = b.in_paper_setting(dataset, model)
    by_key = {c.metric: c.metric.split(":", 1) for c in spec.columns}

    def source(m, col):
        metric, target = by_key[col.metric]
        return _subset_of(target), metric

    def paper(m, col):
        return paper_value("tableA9", dataset, model, m, col.metric, split=b.splits.get(dataset),
                           force_datasets=b.force) if in_setting else None

    return b.table(spec, dataset, model, [(m, model, m, "all", None) for m in methods], paper=paper, source=source,
                   caption=setting.caption(dataset, model, dm_rows, targets="maps for the classes named by the columns"),
                   notes=[NOTE_A9] + ([NOTE_MISCLASSIFIED] if MISCLASSIFIED in targets else []))


def layer_tables(b: _Builder, rows: pd.DataFrame, setting: Setting) -> list[Table]:
    """Table A.13: per dataset and network, the model keys `{key}@{layer}` (two layers or more)."""
    out = []
    layered = rows[rows["model"].str.contains("@", regex=False)]
    if layered.empty:
        return out
    layered = layered.assign(_base=layered["model"].str.split("@", n=1).str[0])
    for (dataset, base), g in layered.groupby(["dataset", "_base"], sort=True):
        keys = sorted(g["model"].unique(), key=lambda k: _natural(k.split("@", 1)[1]), reverse=True)
        if len(keys) < 2:
            continue
        layer_of = {k: (g.loc[g["model"] == k, "layer"].dropna().iloc[0] if g.loc[g["model"] == k, "layer"].notna().any()
                        else k.split("@", 1)[1]) for k in keys}
        for method in method_order(g["method"].unique()):
            opts = method_settings(g[g["method"] == method]).get(method, {})
            default_opticam = is_opticam(method) and opticam_setting(opts)[:2] == ("mask", "range")

            def paper(k, col, default_opticam=default_opticam, dataset=dataset):
                if not (default_opticam and b.in_paper_setting(dataset, k)):
                    return None
                return layer_paper_value("tableA13", dataset, k, layer_of[k], OPTICAM, col.metric,
                                         split=b.splits.get(dataset), force_datasets=b.force)

            sub = g[g["method"] == method]
            spec = FigureSpec(TABLEA13.key, f"{TABLEA13.title} ({method_name(method)})", TABLEA13.subset,
                              TABLEA13.columns, note=TABLEA13.note)
            t = b.table(spec, dataset, base, [(k, k, method, "all", str(layer_of[k])) for k in keys], paper=paper,
                        caption=setting.caption(dataset, base, sub), part=method)
            if t is None:
                continue
            if t.has_paper:
                t.notes += [NOTE_LAYER42, NOTE_A13_ITERATIONS]
            out.append(t)
    return out


def table_a14(b: _Builder, dm_rows: pd.DataFrame, dataset: str, model: str, setting: Setting) -> Table | None:
    in_setting = b.paper and (dataset in b.force or is_imagenet_val(dataset, b.splits.get(dataset)))
    methods = method_order(dm_rows["method"].unique())

    def paper(m, col):
        return paper_value("tableA14", dataset, base_model(model), m, col.metric, split=b.splits.get(dataset),
                           force_datasets=b.force) if in_setting else None

    t = b.table(TABLEA14, dataset, model, [(m, model, m, "all", None) for m in methods], paper=paper,
                caption=setting.caption(dataset, model, dm_rows))
    if t is not None and t.has_paper and "extremal" in t.rows:
        t.notes.append(NOTE_A14_EXPERT)
    return t


def study_tables(rows: pd.DataFrame, cells: pd.DataFrame, counts: pd.DataFrame, *, splits: dict | None = None,
                 force_paper: tuple[str, ...] = (), paper: bool = True, manifest: dict | None = None) -> list[Table]:
    """Every study table the rows hold, in the paper's order (4, 6, A.9, A.12, A.13, A.14).

    `cells`: `aggregate_rows`'s cells plus `target_cells`'s; `counts`: `row_counts`."""
    splits = splits or {}
    raw = set(unnormalized_models(rows))
    b = _Builder(cells, counts, splits=splits, force_paper=force_paper, paper=paper, raw_models=raw)
    setting = Setting(manifest or {}, splits)
    label = label_only(rows)
    found: dict[str, list[Table]] = {k: [] for k in ("table4", "table6", "tableA9", "tableA12", "tableA13", "tableA14")}
    for (dataset, model), g in rows.groupby(["dataset", "model"], sort=True):
        lg = label[(label["dataset"] == dataset) & (label["model"] == model)]
        t = table4(b, cells, lg, dataset, model, setting)
        if t is not None:
            found["table4"].append(t)
        for t in ablation_tables(b, lg, dataset, model, setting):
            found[t.spec.key].append(t)
        t = table_a9(b, g, dataset, model, setting)
        if t is not None:
            found["tableA9"].append(t)
        if model in raw:
            t = table_a14(b, lg, dataset, model, setting)
            if t is not None:
                found["tableA14"].append(t)
    found["tableA13"] = layer_tables(b, label, setting)
    return [t for ts in found.values() for t in ts]


# --------------------------------------------------------------------------------------------
# Selectivity (Fig. A4)

SELECTIVITY_COLUMNS = ["dataset", "model", "method", "alpha", "metric", "value", "lo", "hi", "n"]


def selectivity_frame(rows: pd.DataFrame, *, resamples: int = 200, seed: int = 0) -> pd.DataFrame:
    """AD/AG/AI of S^α per (dataset, model, method, α) with bootstrap intervals (images
    resampled as for the tables), from `aggregate_selectivity`; empty without selectivity rows."""
    cols = ("p", "selectivity_alpha", "selectivity_o")
    if rows.empty or not all(c in rows for c in cols):
        return pd.DataFrame(columns=SELECTIVITY_COLUMNS)
    ok = label_only(rows)
    ok = ok[ok["error"].isna() & ok["selectivity_o"].notna()]
    out = []
    for (dataset, model, method), g in ok.groupby(["dataset", "model", "method"], sort=True):
        g = g.sort_values("sample_id")
        frame = _columns(per_image_frame(g), cols)
        point = aggregate_selectivity(frame)
        reps = {}
        if resamples and len(frame):
            idx = resample_indices(len(frame), resamples, _seed(seed, dataset, model, method, "selectivity"))
            reps = aggregate_selectivity(frame, weights=counts_from_indices(idx, len(frame)))
        for alpha, metrics in point.items():
            for metric, a in metrics.items():
                lo, hi = interval(reps[alpha][metric].value) if alpha in reps else (math.nan, math.nan)
                out.append(dict(dataset=dataset, model=model, method=method, alpha=float(alpha), metric=metric,
                                value=float(a.value), lo=lo, hi=hi, n=int(a.n)))
    return pd.DataFrame(out, columns=SELECTIVITY_COLUMNS)
