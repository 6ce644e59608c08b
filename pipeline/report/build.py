"""One report: read a run, aggregate, write tables, figures, the comparison and index.html.

Files under the output folder (see `build_report`):

    index.html            the page: summary, tables, comparison, runtime, failures, figures
    report.md             the same in Markdown
    tables.md, tables.tex Figures 2–4 per dataset × model (LaTeX: one table environment each), then
                          the studies the run holds (Tables 4, 6, A.9, A.12, A.13, A.14; `studies`)
    figure2.csv …4.csv    one line per table cell (value, interval, n, failed, paper, gap, best)
    studies.csv           the same for the studies' tables (column ``figure``: table4, tableA9, …)
    selectivity.csv       AD/AG/AI of S^α per method and α (Fig. A4), when the rows have them
    aggregates.csv        every aggregate of every dataset × model × method × subset (maps for other
                          classes: subset ``target=top1`` …)
    runtime.csv           seconds per image per method
    row_counts.csv        ok / failed rows per dataset × model × method
    failures.csv          the most frequent error messages
    figures/*.png         maps grid, AD/AG/AI bars, insertion/deletion curves, Opti-CAM convergence,
                          selectivity (Fig. A4), the randomisation sanity check (Fig. A6)
    comparison.md, comparison.csv, moved.csv, newly_failed.csv   with --against
    summary.json          machine-readable: run ids, counts, files, violations
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from . import figures as figs
from .aggregates import (
    LABEL,
    Aggregator,
    aggregate_rows,
    error_summary,
    label_only,
    row_counts,
)
from .compare import Comparison, compare_rows, comparison_markdown, violations
from .finetuned import finetuned_captions
from .html import comparison_html, write_index
from .paper import paper_value
from .runs import Run, iter_tables, open_run, previous_run, read_table
from .studies import selectivity_frame, study_tables, target_cells
from .tables import (
    FIGURES,
    build_tables,
    runtime_markdown,
    runtime_table,
    table_latex,
    table_markdown,
    tables_frame,
)


@dataclass
class Report:
    run: Run
    out: Path
    rows: pd.DataFrame
    cells: pd.DataFrame
    counts: pd.DataFrame
    tables: list
    runtime: pd.DataFrame
    errors: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    figures: list[tuple[str, str]] = field(default_factory=list)
    against: Run | None = None
    comparison: Comparison | None = None
    violations: pd.DataFrame | None = None
    selectivity: pd.DataFrame | None = None


def default_out(run: Run) -> Path:
    """``OUTPUT/report=RUN_ID`` beside a local run (outside its folder, so readers of the run
    see only the job's files); ``./reports/RUN_ID`` for a run on object storage."""
    if run.remote:
        return Path("reports") / run.run_id
    return Path(run.root) / f"report={run.run_id}"


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in str(s))


def _splits(rows: pd.DataFrame) -> dict[str, str]:
    if rows.empty:
        return {}
    return {d: g.mode().iloc[0] if g.notna().any() else None for d, g in rows.groupby("dataset")["split"]}


def build_report(run: Run | str, out: str | Path | None = None, *, against: Run | str | None = None,
                 resamples: int = 200, seed: int = 0, om_rule: str = "ilsvrc", grid_images: int = 6,
                 figures: bool = True, paper: bool = True, paper_datasets: tuple[str, ...] = (), top: int = 20,
                 thresholds: dict[str, float] | None = None, direction: str = "any",
                 aggregate: Callable | None = None, log: Callable[[str], None] | None = None) -> Report:
    """Read `run` (a Run or URI), write the report under `out`, and return what was computed.

    `against`: a Run, a URI, or "previous" (the latest earlier run under the same output root).
    `thresholds`/`direction`: see `compare.violations`; the result is in `Report.violations`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run = open_run(run) if isinstance(run, str) else run
    out = Path(out) if out is not None else default_out(run)
    out.mkdir(parents=True, exist_ok=True)
    log(f"report: run {run.run_id} at {run.uri} ({len(run.files)} files) → {out}")

    table = read_table(run)
    rows = table.to_pandas()
    agg = Aggregator(aggregate, om_rule=om_rule)
    cells = aggregate_rows(rows, resamples=resamples, seed=seed, agg=agg, log=log)
    others = target_cells(rows, resamples=resamples, seed=seed, agg=agg)
    if len(others):
        cells = pd.concat([cells, others], ignore_index=True)
    counts = row_counts(rows)
    splits = _splits(rows)
    tables = build_tables(cells, counts, splits=splits, force_paper=tuple(paper_datasets), paper=paper)
    tables += study_tables(rows, cells, counts, splits=splits, force_paper=tuple(paper_datasets), paper=paper,
                           manifest=run.manifest)
    accuracy = finetuned_captions(run.manifest or {})  # fine-tuned medical models: test accuracy vs the paper's
    for t in tables:
        if t.model in accuracy:
            t.caption = f"{t.caption} {accuracy[t.model]}".strip()
    runtime = runtime_table(rows, paper=paper, splits=splits)
    errors = error_summary(rows)
    report = Report(run, out, rows, cells, counts, tables, runtime, errors)
    report.selectivity = selectivity_frame(rows, resamples=resamples, seed=seed)
    log(f"report: {len(rows)} rows ({int(rows['error'].notna().sum())} failed), {len(cells)} aggregates, "
        f"{resamples} bootstrap resamples")

    _write_tables(report)
    if figures:
        _write_figures(report, grid_images=grid_images, splits=splits, paper=paper, log=log, resamples=resamples,
                       seed=seed)

    comp_md = ""
    if against is not None:
        old = previous_run(run) if against == "previous" else (open_run(against) if isinstance(against, str) else against)
        if old is None:
            log("report: no earlier run under the same output root; comparison skipped")
        else:
            log(f"report: comparing with {old.run_id} at {old.uri}")
            old_rows = read_table(old).to_pandas()
            comp = compare_rows(rows, old_rows, resamples=resamples, seed=seed, agg=agg, top=top,
                                new_run=run.run_id, old_run=old.run_id)
            viol = violations(comp, thresholds or {}, direction) if thresholds else None
            report.against, report.comparison, report.violations = old, comp, viol
            comp_md = comparison_markdown(comp, viol)
            _write(report, "comparison.md", comp_md)
            comp.changes.to_csv(_path(report, "comparison.csv"), index=False)
            comp.moved.to_csv(_path(report, "moved.csv"), index=False)
            comp.newly_failed.to_csv(_path(report, "newly_failed.csv"), index=False)

    _write(report, "report.md", _report_markdown(report, comp_md))
    _write_summary(report)
    downloads = [name for name in ("report.md", "tables.md", "tables.tex", "figure2.csv", "figure3.csv", "figure4.csv",
                                   "studies.csv", "selectivity.csv", "aggregates.csv", "runtime.csv", "row_counts.csv", "failures.csv", "comparison.md",
                                   "comparison.csv", "moved.csv", "summary.json") if name in report.files]
    report.files["index.html"] = write_index(
        out / "index.html", title=f"Opti-CAM report: {run.run_id}", summary=_summary_pairs(report),
        tables=tables, figures=report.figures, runtime=runtime, errors=errors, downloads=downloads, counts=counts,
        comparison_html=comparison_html(report.comparison, report.violations) if report.comparison else "")
    log(f"report: wrote {len(report.files)} files; open {out / 'index.html'}")
    return report


def _path(report: Report, name: str) -> Path:
    p = report.out / name
    p.parent.mkdir(parents=True, exist_ok=True)
    report.files[name] = p
    return p


def _write(report: Report, name: str, text: str) -> Path:
    p = _path(report, name)
    p.write_text(text, encoding="utf-8")
    return p


def _write_tables(report: Report) -> None:
    _write(report, "tables.md", "\n".join(table_markdown(t) for t in report.tables) + "\n" + runtime_markdown(report.runtime))
    _write(report, "tables.tex", "% Generated by `opticam report`. Needs no package beyond LaTeX itself.\n"
           + "\n".join(table_latex(t) for t in report.tables))
    frame = tables_frame(report.tables)
    for spec in FIGURES:
        name = {"fig2": "figure2.csv", "fig3": "figure3.csv", "fig4": "figure4.csv"}[spec.key]
        frame[frame["figure"] == spec.key].to_csv(_path(report, name), index=False)
    studies = frame[~frame["figure"].isin([spec.key for spec in FIGURES])]
    if len(studies):
        studies.to_csv(_path(report, "studies.csv"), index=False)
    if report.selectivity is not None and len(report.selectivity):
        report.selectivity.to_csv(_path(report, "selectivity.csv"), index=False)
    report.cells.to_csv(_path(report, "aggregates.csv"), index=False)
    report.runtime.to_csv(_path(report, "runtime.csv"), index=False)
    report.counts.to_csv(_path(report, "row_counts.csv"), index=False)
    report.errors.to_csv(_path(report, "failures.csv"), index=False)


def _partition_files(run: Run) -> dict[tuple[str, str], list[str]]:
    """(dataset, model) → the files holding its rows (one cheap pass over two columns)."""
    out: dict[tuple[str, str], list[str]] = {}
    for f in run.files:
        t = read_table(run, ["dataset", "model"], files=[f])
        for d, m in set(zip(t.column("dataset").to_pylist(), t.column("model").to_pylist())):
            out.setdefault((d, m), []).append(f)
    return out


def grid_sample_ids(rows: pd.DataFrame, k: int) -> list[str]:
    """Up to `k` images for the maps grid: ids in sorted order, one per class first, among the
    images with the most successful methods."""
    ok = rows[rows["error"].isna()]
    if ok.empty or k <= 0:
        return []
    per = ok.groupby("sample_id").agg(methods=("method", "nunique"), label=("label_name", "first")).reset_index()
    per = per[per["methods"] == per["methods"].max()].sort_values("sample_id")
    first = per.drop_duplicates("label", keep="first")
    chosen = first["sample_id"].tolist()[:k]
    if len(chosen) < k:
        chosen += [s for s in per["sample_id"] if s not in set(chosen)][: k - len(chosen)]
    return chosen


def _write_figures(report: Report, *, grid_images: int, splits: dict, paper: bool, log, resamples: int = 200,
                   seed: int = 0) -> None:
    run, rows, cells = report.run, report.rows, report.cells
    parts = _partition_files(run)
    datasets = run.datasets()
    for (dataset, model) in sorted(parts):
        files = parts[(dataset, model)]
        every = rows[(rows["dataset"] == dataset) & (rows["model"] == model)]
        sel = label_only(every)  # the figures show the maps made for the label (Table A.9 has the others)
        if sel.empty:
            continue
        tag = f"{_slug(dataset)}_{_slug(model)}"
        part_cells = cells[(cells["dataset"] == dataset) & (cells["model"] == model) & (cells["subset"] == "all")]
        pv = {}
        if paper:
            for m in sel["method"].unique():
                for metric in figs.BARS:
                    v = paper_value("fig2", dataset, model, m, metric, split=splits.get(dataset))
                    if v is not None:
                        pv[(m, metric)] = v
        rel = f"figures/bars_{tag}.png"
        figs.metric_bars(_path(report, rel), cells, dataset, model, paper=pv)
        report.figures.append((f"AD/AG/AI per method with 95% bootstrap intervals: {dataset} / {model}", rel))

        means = figs.CurveMeans()
        for t in iter_tables(run, ["dataset", "model", "method", "error", "insertion_curve", "deletion_curve"],
                             files=files, where={"dataset": dataset, "model": model, "target": LABEL}):
            means.add(t)
        if means.sums:
            scores = {(r.method, r.metric): r.value for r in part_cells.itertuples() if r.metric in ("I", "D")}
            rel = f"figures/curves_{tag}.png"
            figs.mean_curves(_path(report, rel), means.means(), dataset, model, scores=scores)
            report.figures.append((f"Mean insertion and deletion curves (AUC ×100 in the legend): {dataset} / {model}", rel))

        if (sel["method"] == "opticam").any():
            opt = read_table(run, ["method", "error", "iterations", "early_stopped", "objective_history"], files=files,
                             where={"dataset": dataset, "model": model, "method": "opticam", "target": LABEL}).to_pandas()
            rel = f"figures/convergence_{tag}.png"
            figs.convergence(_path(report, rel), opt, dataset, model)
            report.figures.append((f"Opti-CAM: objective per iteration and iterations used: {dataset} / {model}", rel))

        ids = grid_sample_ids(sel, grid_images)
        if ids:
            maps = read_table(run, ["sample_id", "method", "error", "map_png"], files=files,
                              where={"dataset": dataset, "model": model, "sample_id": ids, "target": LABEL}).to_pandas()
            if maps["map_png"].notna().any():
                images = figs.load_images((datasets.get(dataset) or {}).get("uri"), ids)
                if not images:
                    log(f"report: samples of {dataset} not readable; maps shown without photos")
                rel = f"figures/maps_{tag}.png"
                labels = dict(zip(sel["sample_id"], sel["label_name"]))
                figs.maps_grid(_path(report, rel), maps, images, sample_ids=ids, title=f"{dataset} / {model}",
                               captions={s: f"{s}\n{labels.get(s) or ''}" for s in ids})
                report.figures.append((f"Saliency maps (Figure 5 layout): {dataset} / {model}", rel))

        sv = report.selectivity
        if sv is not None and len(sv) and ((sv["dataset"] == dataset) & (sv["model"] == model)).any():
            rel = f"figures/selectivity_{tag}.png"
            figs.selectivity_curves(_path(report, rel), sv, dataset, model)
            report.figures.append((f"Selectivity (Fig. A4): AD/AG/AI of the map raised to α, 95% bootstrap bands: "
                                   f"{dataset} / {model}", rel))

        sanity = [c for c in every.columns if c.startswith("sanity_") and every[c].notna().any()]
        if sanity:  # the randomisation sanity check (Fig. A6), wherever its rows are
            from .sanity import sanity_figure

            rel = f"figures/sanity_{tag}.png"
            if sanity_figure(every[every[sanity].notna().any(axis=1)], _path(report, rel), resamples=resamples,
                             seed=seed) is not None:
                report.figures.append((f"Randomisation sanity check (Fig. A6): similarity to the original map against "
                                       f"randomised blocks, 95% bootstrap bands: {dataset} / {model}", rel))
            else:
                report.files.pop(rel, None)


def _summary_pairs(report: Report) -> list[tuple[str, str]]:
    run, rows = report.run, report.rows
    m = run.manifest
    pairs = [("run", run.run_id), ("location", run.uri)]
    if m.get("started"):
        pairs.append(("started", str(m.get("started"))))
    if m.get("finished"):
        pairs.append(("finished", str(m.get("finished"))))
    pairs += [("datasets", ", ".join(sorted(rows["dataset"].unique()))), ("models", ", ".join(sorted(rows["model"].unique()))),
              ("methods", ", ".join(sorted(rows["method"].unique()))),
              ("rows", f"{len(rows)} ({int(rows['error'].notna().sum())} failed)")]
    if report.against is not None:
        pairs.append(("compared with", f"{report.against.run_id} ({report.against.uri})"))
    return pairs


def _report_markdown(report: Report, comp_md: str) -> str:
    lines = [f"# Opti-CAM report: {report.run.run_id}", ""]
    lines += [f"- {k}: {v}" for k, v in _summary_pairs(report)] + [""]
    lines += [table_markdown(t) for t in report.tables]
    lines += ["### Rows", "", "| dataset | model | method | map for | rows | ok | failed | constant maps |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.dataset} | {r.model} | {r.method} | {r.target} | {r.rows} | {r.ok} | {r.failed} | {r.constant} |"
              for r in report.counts.itertuples()]
    lines.append("")
    lines.append(runtime_markdown(report.runtime))
    if len(report.errors):
        lines += ["### Failures", "", "| error | methods | rows |", "|---|---|---|"]
        lines += [f"| {str(r.error).replace('|', '/')} | {r.methods} | {r.rows} |" for r in report.errors.itertuples()]
        lines.append("")
    if comp_md:
        lines.append(comp_md)
    if report.figures:
        lines += ["## Figures", ""] + [f"![{cap}]({rel})" for cap, rel in report.figures] + [""]
    return "\n".join(lines)


def _write_summary(report: Report) -> None:
    data = {
        "run_id": report.run.run_id, "run": report.run.uri, "out": str(report.out),
        "rows": int(len(report.rows)), "failed": int(report.rows["error"].notna().sum()),
        "aggregates": int(len(report.cells)), "tables": [t.slug for t in report.tables],
        "figures": [rel for _, rel in report.figures],
    }
    if report.comparison is not None:
        data["against"] = {"run_id": report.comparison.old_run, "run": report.against.uri,
                           "counts": report.comparison.counts, "flagged": int(len(report.comparison.flagged)),
                           "violations": None if report.violations is None else int(len(report.violations))}
    _write(report, "summary.json", json.dumps(data, indent=1, default=str))
