"""From result rows to findings: the paper's tables and figures, run-to-run comparison, index.html.

Reads results with pyarrow/pandas only (never Ray), locally or on s3://; every number comes
from `opticam_core.metrics.aggregate` applied to per-image rows.

    from pipeline.report import open_run, read_rows, build_report
    run = open_run("runs/demo")                   # a run folder, or an output root → latest run
    rows = read_rows(run)                         # pandas, one row per sample × model × method
    report = build_report(run, "out/", against="previous")

Modules: runs (find and read runs), aggregates (rows → aggregates with bootstrap intervals),
tables (Figures 2–4, runtime; Markdown, CSV, LaTeX), studies (the paper's Tables 4, 6, A.9, A.12,
A.13, A.14 and Fig. A4, where the run holds their rows), sanity (Fig. A6), figures (PNG), compare
(paired run-to-run changes, thresholds), html (index.html), paper (the paper's numbers,
paper.csv), build (all of it into one folder), cli (`opticam report`).
"""

from .aggregates import Aggregator, aggregate_rows, error_summary, row_counts
from .build import Report, build_report, default_out
from .compare import Comparison, compare_rows, parse_thresholds, violations
from .runs import (
    Run,
    RunNotFound,
    list_runs,
    open_run,
    previous_run,
    read_rows,
    read_samples,
    read_table,
)
from .tables import (
    FIGURES,
    build_tables,
    runtime_table,
    table_latex,
    table_markdown,
    tables_frame,
)

__all__ = [
    "Aggregator", "Comparison", "FIGURES", "Report", "Run", "RunNotFound", "aggregate_rows", "build_report",
    "build_tables", "compare_rows", "default_out", "error_summary", "list_runs", "open_run", "parse_thresholds",
    "previous_run", "read_rows", "read_samples", "read_table", "row_counts", "runtime_table", "table_latex",
    "table_markdown", "tables_frame", "violations",
]
