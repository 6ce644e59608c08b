"""The paper's tables (Figures 2, 3, 4) and the runtime table, from the tidy cells of
`aggregates.aggregate_rows`, rendered as Markdown, CSV and LaTeX.

One table per (figure, dataset, model): rows are methods (the paper's order), columns the
figure's metrics. Each cell carries its value, bootstrap interval, the number of images behind
it, and, where the paper reports this setting, the paper's value. The best value per column is
marked (bold) as in the paper: excluding Fake-CAM and the method-free rows, lower or higher by
the column's arrow, compared at the printed precision (ties are all marked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from opticam_core.methods import METHODS, REGISTRY
from opticam_core.metrics import lower_is_better

from .aggregates import label_only, unnormalized_models
from .paper import paper_value, unnormalized_paper_value

#: The method-free rows of the box study, listed after the methods.
PSEUDO_NAMES = {"box": "S := B", "not_box": "S := I∖B"}
LATEX_METHOD_NAMES = {"box": "$S := B$", "not_box": "$S := I \\setminus B$"}
#: Rows never marked best: the reference methods (Fake-CAM) and the method-free rows.
NOT_RANKED = tuple(k for k, s in REGISTRY.items() if s.family == "reference") + tuple(PSEUDO_NAMES)


def method_name(key: str) -> str:
    """The display name; a run config's variant `base:variant` reads "Base (variant)"."""
    base, _, variant = key.partition(":")
    if variant and base in REGISTRY:
        return f"{REGISTRY[base].name} ({variant})"
    spec = REGISTRY.get(key)
    return spec.name if spec is not None else PSEUDO_NAMES.get(key, key)


def method_order(methods) -> list[str]:
    """The paper's order (the methods' ranks), each method's variants right after it, then the
    method-free rows, then anything else."""
    present = set(methods)
    known = []
    for m in (*METHODS, *PSEUDO_NAMES):
        known += [m] if m in present else []
        known += sorted(k for k in present if k.partition(":")[2] and k.partition(":")[0] == m)
    return known + sorted(present - set(known))


@dataclass(frozen=True)
class Column:
    metric: str                   # the key of `aggregate`'s result
    label: str                    # e.g. "AD↓"
    latex: str                    # e.g. "AD$\downarrow$"
    digits: int = 1
    group: str | None = None      # Figure 4's upper header (AD↓ / AG↑ / AI↑)
    pseudo: dict = field(default_factory=dict)   # method-free row → its metric for this column
    lower: bool | None = None     # the direction, where `metric` is not a registered metric's key

    @property
    def lower_better(self) -> bool:
        return lower_is_better(self.metric) if self.lower is None else self.lower


def _arrow(metric: str) -> tuple[str, str]:
    down = lower_is_better(metric)
    return ("↓" if down else "↑"), ("$\\downarrow$" if down else "$\\uparrow$")


def _col(metric: str, digits: int = 1) -> Column:
    a, la = _arrow(metric)
    return Column(metric, metric + a, metric + la, digits)


@dataclass(frozen=True)
class FigureSpec:
    key: str                      # fig2 / fig3 / fig4 (paper.csv's figure)
    title: str
    subset: str                   # which subset of the cells ("all" / "boxed")
    columns: tuple[Column, ...]
    pseudo_rows: tuple[str, ...] = ()
    note: str = ""


def _box_study_columns() -> tuple[Column, ...]:
    cols = []
    regions = [("", "S", "$S$"), ("@box_and_map", "B∩S", "$B \\cap S$"), ("@map_minus_box", "S∖B", "$S \\setminus B$")]
    for base in ("AD", "AG", "AI"):
        a, la = _arrow(base)
        for suffix, label, latex in regions:
            pseudo = {"box": base + "@box", "not_box": base + "@not_box"} if not suffix else {}
            cols.append(Column(base + suffix, f"{base}{a} {label}", latex, 1, group=(base + a, base + la), pseudo=pseudo))
    return tuple(cols)


FIGURE2 = FigureSpec("fig2", "Figure 2: classification metrics", "all",
                     tuple(_col(m) for m in ("AD", "AG", "AI", "I", "D")),
                     note="AD/AG/AI: average drop/gain/increase; I/D: insertion/deletion AUC ×100.")
FIGURE3 = FigureSpec("fig3", "Figure 3: localization metrics", "all",
                     tuple(_col(m) for m in ("OM", "LE", "F1", "BA", "SP", "EP")) + (_col("SM", 2),),
                     note="OM: official metric; LE: localization error; F1: pixel-wise F1; BA: box accuracy; "
                          "SP/EP: standard/energy pointing game; SM: saliency metric. Images without a box are excluded.")
FIGURE4 = FigureSpec("fig4", "Figure 4: bounding-box study", "boxed", _box_study_columns(), ("box", "not_box"),
                     note="B: ground-truth box; I: whole image; S: saliency map. Images with a box only.")
FIGURES = (FIGURE2, FIGURE3, FIGURE4)


@dataclass
class Cell:
    value: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    excluded: int = 0
    paper: float | None = None
    best: bool = False

    @property
    def missing(self) -> bool:
        return not math.isfinite(self.value)


@dataclass
class Table:
    spec: FigureSpec
    dataset: str
    model: str
    rows: list[str]                               # method keys (pseudo rows first in Figure 4)
    cells: dict[tuple[str, str], Cell]            # (method, column metric) → cell
    ok: dict[str, int]                            # method → successful rows
    failed: dict[str, int]                        # method → failed rows
    labels: dict[str, str] = field(default_factory=dict)   # row → its name, where not the method's
    caption: str = ""                             # the setting (studies: subset, iterations, …)
    notes: list[str] = field(default_factory=list)          # under the table (the paper's contradictions)
    part: str = ""                                # tells apart tables of one figure, dataset and model

    @property
    def has_paper(self) -> bool:
        return any(c.paper is not None for c in self.cells.values())

    @property
    def slug(self) -> str:
        return f"{self.spec.key}_{_slug(self.dataset)}_{_slug(self.model)}" + (f"_{_slug(self.part)}" if self.part else "")

    def label(self, row: str) -> str:
        return self.labels.get(row) or method_name(row)

    def cell(self, method: str, column: Column) -> Cell:
        return self.cells.get((method, column.metric), Cell())


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in str(s))


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def build_tables(cells: pd.DataFrame, counts: pd.DataFrame, *, specs=FIGURES, splits: dict | None = None,
                 force_paper: tuple[str, ...] = (), paper: bool = True) -> list[Table]:
    """Tables for every figure and every (dataset, model) that has a value in that figure.

    `counts`: `aggregates.row_counts` (ok/failed per dataset, model, method). `splits`: dataset →
    split (from the rows) for deciding whether the paper's values apply."""
    splits = splits or {}
    counts = label_only(counts)  # the maps for other classes have their own table (studies, Table A.9)
    index = {(r.dataset, r.model, r.method, r.subset, r.metric): r for r in cells.itertuples(index=False)}
    ok = {(r.dataset, r.model, r.method): int(r.ok) for r in counts.itertuples(index=False)}
    failed = {(r.dataset, r.model, r.method): int(r.failed) for r in counts.itertuples(index=False)}
    tables = []
    for spec in specs:
        for (dataset, model), part in counts.groupby(["dataset", "model"], sort=True):
            methods = method_order(part["method"])
            rows = [m for m in spec.pseudo_rows] + methods
            table = Table(spec, dataset, model, [], {}, {}, {})
            for method in rows:
                filled = False
                for col in spec.columns:
                    metric = col.pseudo.get(method) if method in spec.pseudo_rows else col.metric
                    if metric is None:
                        continue
                    r = index.get((dataset, model, method, spec.subset, metric))
                    pv = paper_value(spec.key, dataset, model, method, metric, split=splits.get(dataset),
                                     force_datasets=force_paper) if paper else None
                    if r is None and pv is None:
                        continue
                    c = Cell(paper=pv) if r is None else Cell(r.value, r.lo, r.hi, int(r.n), int(r.excluded), pv)
                    table.cells[(method, col.metric)] = c
                    filled = filled or not c.missing
                if filled or method in methods:
                    table.rows.append(method)
                    table.ok[method] = ok.get((dataset, model, method), 0) if method in methods else (
                        max((table.cells[(method, c.metric)].n for c in spec.columns if (method, c.metric) in table.cells),
                            default=0))
                    table.failed[method] = failed.get((dataset, model, method), 0)
            if not any(not c.missing for c in table.cells.values()):
                continue
            _mark_best(table)
            tables.append(table)
    return tables


def _mark_best(table: Table) -> None:
    for col in table.spec.columns:
        ranked = [(m, table.cells[(m, col.metric)]) for m in table.rows
                  if m not in NOT_RANKED and (m, col.metric) in table.cells and not table.cells[(m, col.metric)].missing]
        if not ranked:
            continue
        shown = [(m, round(c.value, col.digits)) for m, c in ranked]
        best = (min if col.lower_better else max)(v for _, v in shown)
        for (m, v), (_, c) in zip(shown, ranked):
            c.best = v == best


# --------------------------------------------------------------------------------------------
# Markdown


def _md_cell(c: Cell, digits: int) -> str:
    if c.missing and c.paper is None:
        return "–"
    text = fmt(c.value, digits)
    if c.best:
        text = f"**{text}**"
    if math.isfinite(c.lo):
        text += f" [{fmt(c.lo, digits)}, {fmt(c.hi, digits)}]"
    if not c.missing:
        text += f" n={c.n}"
    if c.paper is not None:
        text += f" (paper {fmt(c.paper, digits)})"
    return text


def table_markdown(t: Table) -> str:
    header = ["method", "ok", "failed"] + [c.label for c in t.spec.columns]
    lines = [f"### {t.spec.title}: {t.dataset} / {t.model}", ""]
    if t.caption:
        lines += [t.caption, ""]
    if t.spec.note:
        lines += [t.spec.note + " Cells: value [95% bootstrap interval] n=images" +
                  (" (paper's value)." if t.has_paper else "."), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in t.rows:
        row = [t.label(m).replace("|", "\\|"), str(t.ok.get(m, 0)), str(t.failed.get(m, 0))]
        row += [_md_cell(t.cell(m, c), c.digits) for c in t.spec.columns]
        lines.append("| " + " | ".join(row) + " |")
    if t.notes:
        lines += [""] + [f"Note: {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def runtime_table(rows: pd.DataFrame, *, paper: bool = True, splits: dict | None = None) -> pd.DataFrame:
    """Seconds per image per (dataset, model, method) over successful rows (maps for the label:
    the other classes' maps cost the same). The paper's time: Tables 1–2, or Table A.14's for a
    model run without input normalisation."""
    rows = label_only(rows)
    ok = rows[rows["error"].isna() & rows["seconds"].notna()]
    cols = ["dataset", "model", "method", "images", "mean_s", "median_s", "p90_s", "total_s", "paper_s"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    g = ok.groupby(["dataset", "model", "method"], sort=True)["seconds"]
    out = pd.DataFrame({"images": g.size(), "mean_s": g.mean(), "median_s": g.median(),
                        "p90_s": g.quantile(0.9), "total_s": g.sum()}).reset_index()
    raw = set(unnormalized_models(rows))
    out["paper_s"] = [(unnormalized_paper_value("tableA14", d, mo, me, "seconds", split=(splits or {}).get(d))
                       if mo in raw else paper_value("timing", d, mo, me, "seconds", split=(splits or {}).get(d)))
                      if paper else None for d, mo, me in zip(out["dataset"], out["model"], out["method"])]
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    return out.sort_values(["dataset", "model", "method"], key=lambda s: s.map(order) if s.name == "method" else s
                           ).reset_index(drop=True)[cols]


def runtime_markdown(rt: pd.DataFrame) -> str:
    lines = ["### Runtime per method (seconds per image)", "",
             "| dataset | model | method | images | mean | median | p90 | total | paper |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rt.itertuples(index=False):
        paper = "–" if r.paper_s is None or pd.isna(r.paper_s) else f"{r.paper_s:.4g}"
        lines.append(f"| {r.dataset} | {r.model} | {method_name(r.method)} | {r.images} | {r.mean_s:.4g} | "
                     f"{r.median_s:.4g} | {r.p90_s:.4g} | {r.total_s:.4g} | {paper} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CSV (tidy: one line per cell)

CSV_COLUMNS = ["figure", "dataset", "model", "method", "metric", "label", "value", "ci_low", "ci_high", "n",
               "excluded", "ok_rows", "failed_rows", "paper", "gap", "best"]


def tables_frame(tables: list[Table]) -> pd.DataFrame:
    out = []
    for t in tables:
        for m in t.rows:
            for col in t.spec.columns:
                if (m, col.metric) not in t.cells:
                    continue
                c = t.cells[(m, col.metric)]
                metric = col.pseudo.get(m, col.metric) if m in t.spec.pseudo_rows else col.metric
                out.append({"figure": t.spec.key, "dataset": t.dataset, "model": t.model, "method": m,
                            "metric": metric, "label": col.label, "value": c.value, "ci_low": c.lo, "ci_high": c.hi,
                            "n": c.n, "excluded": c.excluded, "ok_rows": t.ok.get(m, 0), "failed_rows": t.failed.get(m, 0),
                            "paper": c.paper, "gap": (c.value - c.paper) if c.paper is not None else None,
                            "best": c.best})
    return pd.DataFrame(out, columns=CSV_COLUMNS)


# --------------------------------------------------------------------------------------------
# LaTeX

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "∖": r"$\setminus$", "∩": r"$\cap$", "↓": r"$\downarrow$", "↑": r"$\uparrow$"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(s))


def _latex_cell(c: Cell, digits: int, row_n: int) -> str:
    if c.missing and c.paper is None:
        return "--"
    text = fmt(c.value, digits).replace("–", "--")
    if c.best:
        text = f"\\textbf{{{text}}}"
    if math.isfinite(c.lo):
        text += f" {{\\scriptsize[{fmt(c.lo, digits)}, {fmt(c.hi, digits)}]}}"
    if not c.missing and c.n != row_n:
        text += f"\\textsuperscript{{n={c.n}}}"
    if c.paper is not None:
        text += f" \\textit{{({fmt(c.paper, digits)})}}"
    return text


def table_latex(t: Table) -> str:
    cols = t.spec.columns
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{latex_escape(t.spec.title)}, {latex_escape(t.dataset)}, {latex_escape(t.model)}. "
             + (latex_escape(t.caption) + " " if t.caption else "")
             + "Bold: best, excluding Fake-CAM. Small: 95\\% bootstrap interval"
             + ("; italic: the paper's value" if t.has_paper else "") + "; superscript: images, where fewer than the row's."
             + "".join(" " + latex_escape(n) for n in t.notes) + "}",
             f"\\label{{tab:{t.slug.replace('_', '-')}}}",
             "\\begin{tabular}{l" + "rr" + "r" * len(cols) + "}", "\\hline"]
    if any(c.group for c in cols):
        groups = []
        for c in cols:
            if groups and groups[-1][0] == c.group:
                groups[-1][1] += 1
            else:
                groups.append([c.group, 1])
        lines.append(" & & & " + " & ".join(f"\\multicolumn{{{k}}}{{c}}{{{g[1]}}}" for g, k in groups) + " \\\\")
        lines.append("Method & $n$ & failed & " + " & ".join(c.latex for c in cols) + " \\\\")
    else:
        lines.append("Method & $n$ & failed & " + " & ".join(c.latex for c in cols) + " \\\\")
    lines.append("\\hline")
    for m in t.rows:
        name = LATEX_METHOD_NAMES.get(m) or latex_escape(t.label(m))
        row_n = t.ok.get(m, 0)
        cells = [_latex_cell(t.cell(m, c), c.digits, row_n) for c in cols]
        lines.append(f"{name} & {row_n} & {t.failed.get(m, 0)} & " + " & ".join(cells) + " \\\\")
        if m in t.spec.pseudo_rows and m == t.spec.pseudo_rows[-1]:
            lines.append("\\hline")
    lines += ["\\hline", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"
