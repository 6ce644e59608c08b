"""index.html: one static page (no server, no scripts, no network) with the tables and figures.

Figures are linked by relative paths (the page and the PNGs travel together as one folder);
the tables are HTML built from the same `Table` objects as the Markdown and LaTeX.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from .tables import Cell, Table, fmt

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.45em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.m { text-align: left; white-space: nowrap; }
.ci, .n { color: #777; font-size: 0.8em; } .paper { color: #2a6; font-size: 0.8em; }
.gap { color: #b33; } b { color: #000; } img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.flag { color: #b33; font-weight: bold; } .note { color: #555; font-size: 0.85em; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _signed(x: float, digits: int) -> str:
    text = f"{x:+.{digits}f}"
    return "±" + text[1:] if float(text) == 0 else text


def _cell_html(c: Cell, digits: int) -> str:
    if c.missing and c.paper is None:
        return "<td>–</td>"
    v = _e(fmt(c.value, digits))
    text = f"<b>{v}</b>" if c.best else v
    if math.isfinite(c.lo):
        text += f' <span class="ci">[{fmt(c.lo, digits)}, {fmt(c.hi, digits)}]</span>'
    if not c.missing:
        text += f' <span class="n">n={c.n}</span>'
    if c.paper is not None:
        gap = "" if c.missing else f", Δ {_signed(c.value - c.paper, digits)}"
        cls = "paper gap" if not c.missing and (c.lo > c.paper or c.hi < c.paper) else "paper"
        text += f'<br><span class="{cls}">paper {fmt(c.paper, digits)}{gap}</span>'
    return f"<td>{text}</td>"


def table_html(t: Table) -> str:
    cols = t.spec.columns
    out = [f'<h3 id="{_e(t.slug)}">{_e(t.spec.title)}: {_e(t.dataset)} / {_e(t.model)}</h3>']
    if t.caption:
        out.append(f'<p class="note">{_e(t.caption)}</p>')
    if t.spec.note:
        out.append(f'<p class="note">{_e(t.spec.note)} Bold: best excluding Fake-CAM; grey: 95% bootstrap '
                   f'interval and images behind the cell' + ("; green: the paper's value (red when outside the interval)." if t.has_paper else ".") + "</p>")
    out.append("<table><tr><th>method</th><th>ok</th><th>failed</th>" + "".join(f"<th>{_e(c.label)}</th>" for c in cols) + "</tr>")
    for m in t.rows:
        cells = "".join(_cell_html(t.cell(m, c), c.digits) for c in cols)
        out.append(f'<tr><td class="m">{_e(t.label(m))}</td><td>{t.ok.get(m, 0)}</td><td>{t.failed.get(m, 0)}</td>{cells}</tr>')
    out.append("</table>")
    out += [f'<p class="note">Note: {_e(n)}</p>' for n in t.notes]
    return "\n".join(out)


def frame_html(df: pd.DataFrame, floats: str = "{:.4g}") -> str:
    if df is None or df.empty:
        return '<p class="note">(none)</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        tds = []
        for v in row:
            if isinstance(v, float):
                s = "–" if not math.isfinite(v) else floats.format(v)
            elif v is None or (isinstance(v, float) and math.isnan(v)):
                s = "–"
            else:
                s = str(v)
            tds.append(f"<td>{_e(s)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


def write_index(path: Path, *, title: str, summary: Sequence[tuple[str, str]], tables: Sequence[Table],
                figures: Sequence[tuple[str, str]], runtime: pd.DataFrame, errors: pd.DataFrame,
                downloads: Sequence[str], comparison_html: str = "", counts: pd.DataFrame | None = None) -> Path:
    """Write the page. `figures`: (caption, relative path); `downloads`: relative paths."""
    path = Path(path)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>", "<table>"]
    parts += [f'<tr><th style="text-align:left">{_e(k)}</th><td style="text-align:left">{_e(v)}</td></tr>' for k, v in summary]
    parts.append("</table>")
    if downloads:
        parts.append("<p>Files: " + " · ".join(f'<a href="{_e(d)}">{_e(d)}</a>' for d in downloads) + "</p>")
    if tables:
        parts.append("<h2>Tables</h2><ul>" + "".join(
            f'<li><a href="#{_e(t.slug)}">{_e(t.spec.title)}: {_e(t.dataset)} / {_e(t.model)}</a></li>' for t in tables) + "</ul>")
        parts += [table_html(t) for t in tables]
    if comparison_html:
        parts.append(comparison_html)
    if counts is not None:
        parts.append("<h2>Rows</h2>")
        parts.append('<p class="note">ok: rows behind the aggregates; failed: rows with an error (left out); '
                     'constant: ok rows whose map was constant (all zeros; they count as such).</p>')
        parts.append(frame_html(counts))
    parts.append("<h2>Runtime (seconds per image)</h2>")
    parts.append(frame_html(runtime))
    parts.append("<h2>Failures</h2>")
    parts.append(frame_html(errors))
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, rel in figures:
            parts.append(f'<figure><img src="{_e(rel)}" alt="{_e(caption)}"><figcaption class="note">{_e(caption)}</figcaption></figure>')
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def comparison_html(c, viol: pd.DataFrame | None, limit: int = 100) -> str:
    """The comparison section: counts, flagged changes, threshold result, moved samples."""
    k = c.counts
    out = [f"<h2>Comparison against {_e(c.old_run)}</h2>",
           f"<p>Rows compared (successful in both): {k.get('shared', 0)}; only in this run: {k.get('only_new', 0)}; "
           f"only in {_e(c.old_run)}: {k.get('only_old', 0)}; newly failed: {k.get('newly_failed', 0)}; "
           f"newly fixed: {k.get('newly_fixed', 0)}.</p>"]
    if viol is not None:
        if len(viol):
            out.append(f'<p class="flag">Threshold exceeded by {len(viol)} change(s).</p>')
            out.append(frame_html(viol[["dataset", "model", "method", "metric", "old", "new", "delta", "lo", "hi", "threshold"]]))
        else:
            out.append("<p>No flagged change exceeds its threshold.</p>")
    fl = c.flagged.reindex(c.flagged["delta"].abs().sort_values(ascending=False).index)
    out.append(f"<h3>Changes whose paired 95% interval excludes zero ({len(fl)} of {len(c.changes)})</h3>")
    out.append(frame_html(fl.head(limit)))
    out.append("<h3>Samples that moved most</h3>")
    out.append(frame_html(c.moved))
    if len(c.newly_failed):
        out.append("<h3>Newly failed rows</h3>")
        out.append(frame_html(c.newly_failed.head(limit)))
    return "\n".join(out)
